#!/usr/bin/env bash
# Static checks for deploy/ that need neither Docker nor a cluster.
#   deploy/check.sh                          # syntax and structure
#   TOLLGATE_BIN=target/release/tollgate deploy/check.sh   # also `tollgate check-config`
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
DEPLOY=deploy
failures=0
fail() { echo "FAIL: $*" >&2; failures=$((failures + 1)); }
ok() { echo "ok:   $*"; }

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

command -v python3 >/dev/null || { echo "FAIL: python3 is required" >&2; exit 1; }
if ! python3 -c 'import yaml' 2>/dev/null; then
    echo "PyYAML missing; installing it with pip"
    python3 -m pip install --quiet --disable-pip-version-check pyyaml >&2 \
        || { echo "FAIL: could not install PyYAML" >&2; exit 1; }
fi

# --- YAML, TOML, k8s, compose, Dockerfile (python) -------------------------
# Also writes the ConfigMap's gateway.toml to $tmp/configmap-gateway.toml.
if ! python3 - "$DEPLOY" "$tmp" <<'PY'; then failures=$((failures + 1)); fi
import pathlib, sys, tomllib, yaml

deploy, tmp = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
bad = 0
def fail(msg):
    global bad
    bad += 1
    print(f"FAIL: {msg}", file=sys.stderr)
def ok(msg):
    print(f"ok:   {msg}")

# Keys the contract fixes for gateway.toml (unknown keys are an error in tollgate).
SCHEMA = {
    "listen": {"public", "admin", "tls"},
    "listen.tls": {"cert", "key"},
    "store": {"kind", "path", "url", "key_prefix"},
    "admin": {"key_hashes"},
    "tenants": {"default_token_quota"},
    "tokens": {"prefix", "max_allowlist_entries", "allow_any_ip"},
    "client_ip": {"trusted_proxies"},
    "limits": {"max_header_bytes", "header_read_timeout", "upstream_connect_timeout",
               "upstream_timeout", "idle_timeout", "max_connections", "shutdown_timeout"},
    "log": {"format", "level"},
}
ROUTE = {"prefix", "product", "upstream", "strip_prefix", "ca_file"}

def check_gateway(name, cfg):
    errs = []
    for section, body in cfg.items():
        if section == "route":
            if not isinstance(body, list) or not body:
                errs.append("[[route]] must be a non-empty array of tables")
                continue
            for i, r in enumerate(body):
                errs += [f"route[{i}].{k}: unknown key" for k in r if k not in ROUTE]
                errs += [f"route[{i}].{k}: missing" for k in ("prefix", "product", "upstream") if k not in r]
            continue
        if section not in SCHEMA:
            errs.append(f"[{section}]: unknown section")
            continue
        for k, v in body.items():
            if k not in SCHEMA[section]:
                errs.append(f"{section}.{k}: unknown key")
            elif isinstance(v, dict):
                errs += [f"{section}.{k}.{kk}: unknown key" for kk in v if kk not in SCHEMA.get(f"{section}.{k}", ())]
    store = cfg.get("store", {})
    if store.get("kind") not in (None, "embedded", "redis"):
        errs.append(f"store.kind: {store.get('kind')!r} is not embedded|redis")
    if store.get("kind") == "redis" and not str(store.get("url", "")).startswith(("redis://", "rediss://")):
        errs.append("store.url: redis store needs a redis:// url")
    if cfg.get("log", {}).get("format") not in (None, "json", "text"):
        errs.append("log.format: not json|text")
    for e in errs:
        fail(f"{name}: {e}")
    if not errs:
        ok(f"{name}: keys match the gateway.toml contract")

# TOML files
for path in sorted(deploy.rglob("*.toml")):
    try:
        cfg = tomllib.loads(path.read_text())
    except Exception as e:
        fail(f"{path}: TOML does not parse: {e}")
        continue
    ok(f"{path}: TOML parses")
    if path.name == "gateway.toml":
        check_gateway(path, cfg)

# YAML files
docs = {}
for path in sorted(list(deploy.rglob("*.yaml")) + list(deploy.rglob("*.yml"))):
    try:
        docs[path] = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    except yaml.YAMLError as e:
        fail(f"{path}: YAML does not parse: {e}")
        continue
    ok(f"{path}: YAML parses ({len(docs[path])} document(s))")

# Kubernetes manifests
k8s = deploy / "k8s"
kust = k8s / "kustomization.yaml"
if kust in docs and docs[kust]:
    listed = docs[kust][0].get("resources", [])
    for r in listed:
        if not (k8s / r).is_file():
            fail(f"{kust}: lists {r}, which does not exist")
    for path in docs:
        if path.parent == k8s and path != kust and path.name not in listed:
            fail(f"{kust}: does not list {path.name}")
elif kust.exists():
    fail(f"{kust}: empty or unparsable")
else:
    fail(f"{kust}: missing")

configmap_toml = None
for path, ds in docs.items():
    if path.parent != k8s or path == kust:
        continue
    if not ds:
        fail(f"{path}: no documents")
    for i, d in enumerate(ds):
        where = f"{path} (document {i + 1})"
        if not isinstance(d, dict):
            fail(f"{where}: not a mapping")
            continue
        missing = [k for k in ("apiVersion", "kind") if not d.get(k)]
        if not (d.get("metadata") or {}).get("name"):
            missing.append("metadata.name")
        if missing:
            fail(f"{where}: missing {', '.join(missing)}")
        else:
            ok(f"{where}: {d['kind']}/{d['metadata']['name']}")
        if d.get("kind") == "ConfigMap" and "gateway.toml" in (d.get("data") or {}):
            configmap_toml = d["data"]["gateway.toml"]
            try:
                cfg = tomllib.loads(configmap_toml)
            except Exception as e:
                fail(f"{where}: data.gateway.toml does not parse: {e}")
            else:
                ok(f"{where}: data.gateway.toml parses")
                check_gateway(f"{path} data.gateway.toml", cfg)
            (tmp / "configmap-gateway.toml").write_text(configmap_toml)
if configmap_toml is None:
    fail(f"{k8s}: no ConfigMap with data key gateway.toml")

# docker-compose.yml
compose = deploy / "docker-compose.yml"
if compose in docs and docs[compose]:
    services = docs[compose][0].get("services") or {}
    missing = [s for s in ("redis", "gateway-a", "gateway-b") if s not in services]
    if missing:
        fail(f"{compose}: missing services {', '.join(missing)}")
    else:
        ok(f"{compose}: services {', '.join(services)}")
    for name in ("gateway-a", "gateway-b"):
        svc = services.get(name) or {}
        for p in svc.get("ports", []):
            if str(p).endswith(":9090") and not str(p).startswith("127.0.0.1:"):
                fail(f"{compose}: {name} publishes the admin port beyond loopback: {p}")
        for v in svc.get("volumes", []):
            src = str(v).split(":")[0]
            if src.startswith(".") and not (compose.parent / src).exists():
                fail(f"{compose}: {name} mounts {src}, which does not exist")
elif compose.exists():
    fail(f"{compose}: empty or unparsable")
else:
    fail(f"{compose}: missing")

# Dockerfile
dockerfile = deploy / "Dockerfile"
if dockerfile.is_file():
    lines = [l.strip() for l in dockerfile.read_text().splitlines()]
    instr = [l.split(None, 1) for l in lines if l and not l.startswith("#")]
    froms = [a for a in instr if a[0].upper() == "FROM"]
    users = [a[1].strip() if len(a) > 1 else "" for a in instr if a[0].upper() == "USER"]
    if len(froms) < 2:
        fail(f"{dockerfile}: expected a multi-stage build (>= 2 FROM lines), found {len(froms)}")
    if not users:
        fail(f"{dockerfile}: no USER line (would run as root)")
    elif users[-1].split(":")[0] in ("", "root", "0"):
        fail(f"{dockerfile}: final USER is root ({users[-1]!r})")
    if len(froms) >= 2 and users and users[-1].split(":")[0] not in ("", "root", "0"):
        ok(f"{dockerfile}: {len(froms)} stages, runs as USER {users[-1]}")
else:
    fail(f"{dockerfile}: missing")

sys.exit(1 if bad else 0)
PY

# --- systemd unit ------------------------------------------------------------
unit=$DEPLOY/systemd/tollgate.service
if [[ ! -f $unit ]]; then
    fail "$unit: missing"
else
    for key in ExecStart ExecReload; do
        grep -Eq "^${key}=" "$unit" || fail "$unit: no ${key}= line"
    done
    if command -v systemd-analyze >/dev/null; then
        # verify insists the executables exist: point them at the real binary
        # if we have it, else at /bin/true.
        stand_in=/bin/true
        if [[ -n ${TOLLGATE_BIN:-} && -x ${TOLLGATE_BIN} ]]; then
            stand_in=$(realpath "$TOLLGATE_BIN")
        fi
        mkdir -p "$tmp/unit"
        sed "s#/usr/local/bin/tollgate#${stand_in}#g" "$unit" >"$tmp/unit/tollgate.service"
        # verify exits 0 on mere warnings (e.g. a bad value it ignores), so any
        # message about this unit counts as a failure too.
        rc=0
        out=$(systemd-analyze verify "$tmp/unit/tollgate.service" 2>&1) || rc=$?
        if ((rc == 0)) && ! grep -q 'tollgate.service' <<<"$out"; then
            ok "$unit: systemd-analyze verify passed (tollgate path -> $stand_in)"
        else
            fail "$unit: systemd-analyze verify failed:"$'\n'"$out"
        fi
    else
        ok "$unit: systemd-analyze not found; checked ExecStart/ExecReload only"
    fi
fi

# --- kustomize build (optional) -------------------------------------------------
if command -v kubectl >/dev/null; then
    if out=$(kubectl kustomize "$DEPLOY/k8s" 2>&1 >/dev/null); then
        ok "$DEPLOY/k8s: kubectl kustomize builds"
    else
        fail "$DEPLOY/k8s: kubectl kustomize failed:"$'\n'"$out"
    fi
else
    echo "skip: kubectl not found; kustomize build not checked"
fi

# --- tollgate check-config (optional) ------------------------------------------
if [[ -n ${TOLLGATE_BIN:-} ]]; then
    if [[ ! -x $TOLLGATE_BIN ]]; then
        fail "TOLLGATE_BIN=$TOLLGATE_BIN is not an executable file"
    else
        check_config() { # label file
            local out
            if out=$("$TOLLGATE_BIN" check-config --config "$2" 2>&1); then
                ok "$1: tollgate check-config passed"
            else
                fail "$1: tollgate check-config failed:"$'\n'"$out"
            fi
        }
        check_config "$DEPLOY/compose/gateway.toml" "$DEPLOY/compose/gateway.toml"
        if [[ -f $tmp/configmap-gateway.toml ]]; then
            check_config "$DEPLOY/k8s/configmap.yaml (data.gateway.toml)" "$tmp/configmap-gateway.toml"
        else
            fail "$DEPLOY/k8s/configmap.yaml: no gateway.toml extracted to validate"
        fi
    fi
else
    echo "skip: TOLLGATE_BIN not set; configs not validated with tollgate check-config"
fi

if ((failures)); then
    echo "deploy/check.sh: FAILED ($failures problem group(s))" >&2
    exit 1
fi
echo "deploy/check.sh: all checks passed"
