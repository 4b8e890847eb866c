#!/usr/bin/env bash
# End-to-end comparison: the same request through
#   direct   -> the upstream itself (no proxy)
#   nginx    -> nginx reverse proxy doing the equivalent check: a `map` from
#               $http_authorization to the tenant (1,000 tokens), an
#               `allow 127.0.0.1; deny all;` source-IP rule, keep-alive upstream
#   tollgate -> tollgate with the same 1,000 tokens (allowlist 127.0.0.1)
# all in front of the same upstream (examples/bench_upstream.rs, 1 thread).
#
# Usage:  benches/e2e.sh            (from the repository root; one command)
# Knobs (environment): ROUNDS=5 DURATION=10 CONNS=64 TOKENS=1000
#   RATE=<req/s for the constant-rate run; default: 40% of nginx's median>
#   PROXY_CPU=1 LOAD_CPU=0 (taskset cores; the proxy under test gets PROXY_CPU,
#   wrk and the upstream share LOAD_CPU), LOGS_RUN=1 (also run with access
#   logs on), OUT=<dir for raw results; default a temp dir>.
#
# Installs nginx and wrk with apt-get when they are missing; builds tollgate
# and the bench helpers in release mode (CARGO_TARGET_DIR is honoured).
set -euo pipefail
cd "$(dirname "$0")/.."

ROUNDS=${ROUNDS:-5}
DURATION=${DURATION:-10}
CONNS=${CONNS:-64}
TOKENS=${TOKENS:-1000}
PROXY_CPU=${PROXY_CPU:-1}
LOAD_CPU=${LOAD_CPU:-0}
LOGS_RUN=${LOGS_RUN:-1}
UP_PORT=18001 NGINX_PORT=18081 TG_PORT=18082 TG_ADMIN=18092

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else "$@"; fi
}
need=()
command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || need+=(nginx)
command -v wrk >/dev/null || need+=(wrk)
command -v taskset >/dev/null || need+=(util-linux)
command -v curl >/dev/null || need+=(curl)
if [ ${#need[@]} -gt 0 ]; then
    echo "==> installing ${need[*]}"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null 2>&1 ||
        { as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq &&
          as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null; }
fi
NGINX=$(command -v nginx || echo /usr/sbin/nginx)

echo "==> cargo build --release (tollgate + bench helpers)"
cargo build --release --quiet --bin tollgate --example bench_upstream --example bench_tokens --example bench_rate
BIN=${CARGO_TARGET_DIR:-target}/release
EX=$BIN/examples

OUT=${OUT:-$(mktemp -d "${TMPDIR:-/tmp}/tollgate-e2e.XXXXXX")}
mkdir -p "$OUT"
# The embedded store on tmpfs when there is one: importing is 1 commit per record.
WORK=$(mktemp -d "$( [ -d /dev/shm ] && echo /dev/shm || echo "${TMPDIR:-/tmp}")/tollgate-e2e.XXXXXX")
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT

wait_port() { # port
    for _ in $(seq 1 200); do
        (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
        sleep 0.05
    done
    echo "port $1 never opened" >&2
    return 1
}

echo "==> $TOKENS tokens, upstream, nginx, tollgate (raw results in $OUT)"
"$EX/bench_tokens" "$WORK" "$TOKENS"
TOKEN=$(cat "$WORK/token.txt")

taskset -c "$LOAD_CPU" "$EX/bench_upstream" "127.0.0.1:$UP_PORT" 2>"$OUT/upstream.log" &
UP_PID=$!
PIDS+=($UP_PID)
wait_port $UP_PORT

# --- nginx -------------------------------------------------------------
write_nginx_conf() { # access_log directive
    cat >"$WORK/nginx.conf" <<EOF
worker_processes 1;
daemon off;
pid $WORK/nginx.pid;
error_log $OUT/nginx-error.log warn;
events { worker_connections 4096; }
http {
    access_log $1;
    client_body_temp_path $WORK/nginx-body;
    proxy_temp_path $WORK/nginx-proxy;
    fastcgi_temp_path $WORK/nginx-fastcgi;
    uwsgi_temp_path $WORK/nginx-uwsgi;
    scgi_temp_path $WORK/nginx-scgi;
    map_hash_bucket_size 128;
    map_hash_max_size 65536;
    keepalive_requests 1000000;
    include $WORK/nginx_map.conf;
    upstream backend {
        server 127.0.0.1:$UP_PORT;
        keepalive 128;
    }
    server {
        listen 127.0.0.1:$NGINX_PORT backlog=4096;
        location / {
            allow 127.0.0.1;
            deny all;
            if (\$tollgate_tenant = "") { return 401; }
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Authorization "";
            proxy_set_header X-Tollgate-Tenant \$tollgate_tenant;
            proxy_set_header X-Forwarded-For \$proxy_add_x_forwarded_for;
            proxy_set_header X-Forwarded-Proto \$scheme;
            proxy_set_header X-Request-Id \$request_id;
            add_header X-Request-Id \$request_id;
        }
    }
}
EOF
}
NGINX_PID=
start_nginx() { # access_log directive
    write_nginx_conf "$1"
    taskset -c "$PROXY_CPU" "$NGINX" -p "$WORK" -c "$WORK/nginx.conf" 2>>"$OUT/nginx.log" &
    NGINX_PID=$!
    PIDS+=($NGINX_PID)
    wait_port $NGINX_PORT
}
stop_nginx() { kill "$NGINX_PID" 2>/dev/null || true; wait "$NGINX_PID" 2>/dev/null || true; }

# --- tollgate ----------------------------------------------------------
write_tollgate_conf() { # log level
    cat >"$WORK/gateway.toml" <<EOF
[listen]
public = "127.0.0.1:$TG_PORT"
admin = "127.0.0.1:$TG_ADMIN"
[store]
kind = "embedded"
path = "$WORK/store/tollgate.db"
[log]
format = "json"
level = "$1"
[[route]]
prefix = "/crm/"
product = "crm"
upstream = "http://127.0.0.1:$UP_PORT"
[[route]]
prefix = "/messaging/"
product = "messaging"
upstream = "http://127.0.0.1:$UP_PORT"
[[route]]
prefix = "/marketing/"
product = "marketing"
upstream = "http://127.0.0.1:$UP_PORT"
EOF
}
write_tollgate_conf warn
"$BIN/tollgate" store import --config "$WORK/gateway.toml" <"$WORK/records.jsonl" 2>>"$OUT/tollgate.log"
TG_PID=
start_tollgate() { # log level
    write_tollgate_conf "$1"
    TOKIO_WORKER_THREADS=1 taskset -c "$PROXY_CPU" "$BIN/tollgate" run --config "$WORK/gateway.toml" \
        >"$OUT/tollgate-$1.log" 2>&1 &
    TG_PID=$!
    PIDS+=($TG_PID)
    wait_port $TG_PORT
}
stop_tollgate() { kill "$TG_PID" 2>/dev/null || true; wait "$TG_PID" 2>/dev/null || true; }

# --- sanity: every path answers 200 with the token, 401 without --------
URL_PATH=/crm/v1/contacts
check() { # name port
    local ok no
    ok=$(curl -s -o /dev/null -w '%{http_code}' -H "Authorization: Bearer $TOKEN" "http://127.0.0.1:$2$URL_PATH")
    no=$(curl -s -o /dev/null -w '%{http_code}' -H "Authorization: Bearer tg_nope" "http://127.0.0.1:$2$URL_PATH")
    echo "    $1: with token $ok, bad token $no"
    [ "$ok" = 200 ] || { echo "$1 does not answer 200" >&2; exit 1; }
}

cat >"$WORK/report.lua" <<'EOF'
done = function(summary, latency, requests)
    local secs = summary.duration / 1e6
    local non2xx = summary.errors.status + summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout
    io.write(string.format("RESULT rps=%.0f p50_us=%d p99_us=%d p999_us=%d errors=%d n=%d\n",
        summary.requests / secs, latency:percentile(50), latency:percentile(99),
        latency:percentile(99.9), non2xx, summary.requests))
end
EOF

# CPU time (user + system, clock ticks) used so far by a process and its
# children (nginx's worker is a child of its master).
cpu_ticks() { # pid
    local t=0 p
    for p in "$1" $(ps -o pid= --ppid "$1" 2>/dev/null); do
        t=$((t + $(awk '{print $14 + $15}' "/proc/$p/stat" 2>/dev/null || echo 0)))
    done
    echo "$t"
}
HZ=$(getconf CLK_TCK)
load() { # name port file pid -> appends "name RESULT rps=.. p50_us=.. .. cpu_us_per_req=.." to file
    local line before after n
    before=$(cpu_ticks "$4")
    line=$(taskset -c "$LOAD_CPU" wrk -t1 -c"$CONNS" -d"${DURATION}s" -s "$WORK/report.lua" \
        -H "Authorization: Bearer $TOKEN" "http://127.0.0.1:$2$URL_PATH" | grep '^RESULT')
    after=$(cpu_ticks "$4")
    n=$(echo "$line" | tr ' ' '\n' | grep '^n=' | cut -d= -f2)
    echo "$1 $line cpu_us_per_req=$(awk -v d=$((after - before)) -v n="$n" -v hz="$HZ" 'BEGIN { printf "%.1f", d * 1e6 / hz / (n > 0 ? n : 1) }')" | tee -a "$3"
}
rate() { # name port rate -> appends to $OUT/rate.txt
    local line
    line=$(taskset -c "$LOAD_CPU" "$EX/bench_rate" "http://127.0.0.1:$2$URL_PATH" "$3" "$DURATION" 32 \
        "Authorization: Bearer $TOKEN")
    echo "$1 $line" | tee -a "$OUT/rate.txt"
}

echo "==> start to ready and idle RSS: tollgate run, empty embedded store, default threads (5 runs)"
: >"$OUT/startup.txt"
for i in 1 2 3 4 5; do
    rm -rf "$WORK/empty"
    sed -e "s#$WORK/store/tollgate.db#$WORK/empty/tollgate.db#" "$WORK/gateway.toml" >"$WORK/empty.toml"
    t0=$(date +%s%N)
    "$BIN/tollgate" run --config "$WORK/empty.toml" >"$OUT/tollgate-empty.log" 2>&1 &
    pid=$!
    until curl -s -o /dev/null -f "http://127.0.0.1:$TG_ADMIN/readyz"; do sleep 0.002; done
    t1=$(date +%s%N)
    sleep 1
    rss=$(awk '/VmRSS/ {print $2}' "/proc/$pid/status")
    kill "$pid"; wait "$pid" 2>/dev/null || true
    echo "startup ready_ms=$(( (t1 - t0) / 1000000 )) idle_rss_kb=$rss" | tee -a "$OUT/startup.txt"
done

start_nginx off
start_tollgate warn
check direct $UP_PORT
check nginx $NGINX_PORT
check tollgate $TG_PORT
echo "    tollgate threads: $(ls /proc/$TG_PID/task | wc -l) in all, $(grep -l tollgate-worker /proc/$TG_PID/task/*/comm 2>/dev/null | wc -l) data-plane worker(s)"
# Warm-up: fill both proxies' upstream pools.
for p in $NGINX_PORT $TG_PORT; do
    taskset -c "$LOAD_CPU" wrk -t1 -c"$CONNS" -d2s -H "Authorization: Bearer $TOKEN" "http://127.0.0.1:$p$URL_PATH" >/dev/null
done

echo "==> closed loop: wrk -t1 -c$CONNS -d${DURATION}s, $ROUNDS rounds interleaved (logs: tollgate warn, nginx access_log off)"
: >"$OUT/closed.txt"
for r in $(seq 1 "$ROUNDS"); do
    echo "  round $r"
    load direct $UP_PORT "$OUT/closed.txt" "$UP_PID"
    load nginx $NGINX_PORT "$OUT/closed.txt" "$NGINX_PID"
    load tollgate $TG_PORT "$OUT/closed.txt" "$TG_PID"
done

median() { sort -n | awk '{a[NR]=$1} END {if (NR==0) print 0; else if (NR%2) print a[(NR+1)/2]; else printf "%.0f\n", (a[NR/2]+a[NR/2+1])/2}'; }
field() { # file name key
    grep "^$2 " "$1" | tr ' ' '\n' | grep "^$3=" | cut -d= -f2 | median
}
fieldf() { # like field, one decimal
    grep "^$2 " "$1" | tr ' ' '\n' | grep "^$3=" | cut -d= -f2 | sort -n |
        awk '{a[NR]=$1} END {if (NR==0) print 0; else if (NR%2) print a[(NR+1)/2]; else printf "%.1f\n", (a[NR/2]+a[NR/2+1])/2}'
}

if [ -z "${RATE:-}" ]; then
    RATE=$(( $(field "$OUT/closed.txt" nginx rps) * 4 / 10 / 1000 * 1000 ))
    [ "$RATE" -ge 1000 ] || RATE=1000
fi
echo "==> constant rate: $RATE req/s over 32 connections, ${DURATION}s, 3 rounds interleaved"
: >"$OUT/rate.txt"
for r in 1 2 3; do
    echo "  round $r"
    rate direct $UP_PORT "$RATE"
    rate nginx $NGINX_PORT "$RATE"
    rate tollgate $TG_PORT "$RATE"
done

if [ "$LOGS_RUN" = 1 ]; then
    echo "==> access logs on (tollgate: log.level=info, json to a file; nginx: access_log to a file), 3 rounds"
    stop_nginx; stop_tollgate
    start_nginx "$WORK/nginx-access.log"
    start_tollgate info
    : >"$OUT/logs.txt"
    for r in 1 2 3; do
        echo "  round $r"
        load logs-nginx $NGINX_PORT "$OUT/logs.txt" "$NGINX_PID"
        load logs-tollgate $TG_PORT "$OUT/logs.txt" "$TG_PID"
    done
fi

ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b == 0) print "n/a"; else printf "%.2f", a / b }'; }
{
echo
echo "## Medians ($ROUNDS rounds x ${DURATION}s, wrk -t1 -c$CONNS; proxy on CPU $PROXY_CPU, wrk + upstream on CPU $LOAD_CPU)"
echo
echo "| target | req/s | p50 µs | p99 µs | p99.9 µs | errors | CPU µs/request (proxy or upstream process) |"
echo "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"
for n in direct nginx tollgate; do
    echo "| $n | $(field "$OUT/closed.txt" $n rps) | $(field "$OUT/closed.txt" $n p50_us) | $(field "$OUT/closed.txt" $n p99_us) | $(field "$OUT/closed.txt" $n p999_us) | $(field "$OUT/closed.txt" $n errors) | $(fieldf "$OUT/closed.txt" $n cpu_us_per_req) |"
done
T=$(field "$OUT/closed.txt" tollgate rps); N=$(field "$OUT/closed.txt" nginx rps); D=$(field "$OUT/closed.txt" direct rps)
echo
echo "throughput ratio tollgate/nginx = $(ratio "$T" "$N"), tollgate/direct = $(ratio "$T" "$D"), nginx/direct = $(ratio "$N" "$D")"
echo "CPU per request ratio tollgate/nginx = $(ratio "$(fieldf "$OUT/closed.txt" tollgate cpu_us_per_req)" "$(fieldf "$OUT/closed.txt" nginx cpu_us_per_req)") (below 1.00: tollgate does the same work with less CPU)"
echo "p99 ratio tollgate/nginx = $(ratio "$(field "$OUT/closed.txt" tollgate p99_us)" "$(field "$OUT/closed.txt" nginx p99_us)")"
echo
echo "## Constant rate $RATE req/s (3 rounds x ${DURATION}s, 32 connections; medians)"
echo
echo "| target | p50 µs | p90 µs | p99 µs | p99.9 µs | added p50 over direct | added p99 over direct | errors |"
echo "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
D50=$(field "$OUT/rate.txt" direct p50_us); D99=$(field "$OUT/rate.txt" direct p99_us)
for n in direct nginx tollgate; do
    P50=$(field "$OUT/rate.txt" $n p50_us); P99=$(field "$OUT/rate.txt" $n p99_us)
    echo "| $n | $P50 | $(field "$OUT/rate.txt" $n p90_us) | $P99 | $(field "$OUT/rate.txt" $n p999_us) | $((P50 - D50)) | $((P99 - D99)) | $(field "$OUT/rate.txt" $n errors) |"
done
echo
echo "p99 at $RATE req/s, tollgate/nginx = $(ratio "$(field "$OUT/rate.txt" tollgate p99_us)" "$(field "$OUT/rate.txt" nginx p99_us)")"
echo
echo "## tollgate start to ready (spawn -> /readyz 200, empty embedded store) and idle RSS, median of 5"
echo
echo "ready: $(field "$OUT/startup.txt" startup ready_ms) ms, idle RSS: $(( $(field "$OUT/startup.txt" startup idle_rss_kb) / 1024 )) MB"
if [ "$LOGS_RUN" = 1 ]; then
    echo
    echo "## Access logs on (3 rounds, medians)"
    echo
    echo "| target | req/s | p50 µs | p99 µs | p99.9 µs | CPU µs/request |"
    echo "| --- | ---: | ---: | ---: | ---: | ---: |"
    for n in logs-nginx logs-tollgate; do
        echo "| $n | $(field "$OUT/logs.txt" $n rps) | $(field "$OUT/logs.txt" $n p50_us) | $(field "$OUT/logs.txt" $n p99_us) | $(field "$OUT/logs.txt" $n p999_us) | $(fieldf "$OUT/logs.txt" $n cpu_us_per_req) |"
    done
    echo
    echo "throughput ratio with logs, tollgate/nginx = $(ratio "$(field "$OUT/logs.txt" logs-tollgate rps)" "$(field "$OUT/logs.txt" logs-nginx rps)")"
fi
} | tee "$OUT/summary.md"
