//! The real binary: restart durability after `kill -9`, the `listening` log
//! line, `check-config` exit codes and messages, and `hash-key`.

mod support;

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::*;

/// A `tollgate run` child process; killed (SIGKILL) when dropped.
struct Running {
    child: Child,
    /// stdout lines, read by a thread so the pipe never fills.
    lines: mpsc::Receiver<String>,
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Running {
    fn start(config: &Path) -> Running {
        let mut child = Command::new(bin())
            .args(["run", "--config"])
            .arg(config)
            .env("TOLLGATE_ADMIN_KEY", ADMIN_KEY)
            .env_remove("RUST_LOG")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn tollgate run");
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Running { child, lines }
    }

    /// The first stdout line for which `pick` returns something, within 20 s.
    fn wait_for_line<T>(&self, mut pick: impl FnMut(&str) -> Option<T>) -> T {
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut seen = Vec::new();
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    if let Some(t) = pick(&line) {
                        return t;
                    }
                    seen.push(line);
                }
                Err(_) => break,
            }
        }
        panic!("no such line on stdout; saw: {seen:#?}");
    }

    /// SIGKILL, as `kill -9` does.
    fn kill_9(mut self) {
        self.child.kill().unwrap();
        let status = self.child.wait().unwrap();
        assert!(!status.success());
    }
}

/// Polls `/readyz` until it answers 200.
async fn wait_ready(admin: SocketAddr) {
    let client = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(r) = client.get(format!("http://{admin}/readyz")).send().await {
            if r.status() == 200 {
                let v: Value = r.json().await.unwrap();
                assert_eq!(v["ready"], true, "{v}");
                return;
            }
        }
        assert!(Instant::now() < deadline, "gateway never became ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

struct Setup {
    dir: tempfile::TempDir,
    config: PathBuf,
    public: SocketAddr,
    admin: SocketAddr,
}

/// Writes a gateway.toml with free ports and the store in a temp dir.
fn write_config(b: &Backends) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let public: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let text = format!(
        r#"[listen]
public = "{public}"
admin = "{admin}"

[store]
kind = "embedded"
path = "{db}"

[[route]]
prefix = "/crm/"
product = "crm"
upstream = "{crm}"
"#,
        db = dir.path().join("data/tollgate.db").display(),
        crm = b.crm.url(),
    );
    let config = dir.path().join("gateway.toml");
    std::fs::write(&config, text).unwrap();
    Setup {
        dir,
        config,
        public,
        admin,
    }
}

async fn admin(s: &Setup, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
    admin_call(s.admin, method, path, body, Some(ADMIN_KEY)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_survive_kill_9_and_a_restart() {
    let b = Backends::start().await;
    let s = write_config(&b);
    let run = Running::start(&s.config);
    wait_ready(s.admin).await;

    let (st, v) = admin(
        &s,
        "POST",
        "/v1/tenants",
        Some(json!({"id": "acme", "products": ["crm"], "token_quota": 2})),
    )
    .await;
    assert_eq!(st, 201, "{v}");
    let (st, v) = admin(
        &s,
        "POST",
        "/v1/tenants/acme/tokens",
        Some(json!({"name": "kept", "ip_allowlist": ["127.0.0.2"]})),
    )
    .await;
    assert_eq!(st, 201, "{v}");
    let kept_id = v["id"].as_str().unwrap().to_string();
    let kept = v["token"].as_str().unwrap().to_string();
    let (st, v) = admin(
        &s,
        "POST",
        "/v1/tenants/acme/tokens",
        Some(json!({"name": "revoked", "ip_allowlist": ["127.0.0.2"]})),
    )
    .await;
    assert_eq!(st, 201, "{v}");
    let revoked_id = v["id"].as_str().unwrap().to_string();
    let revoked = v["token"].as_str().unwrap().to_string();
    let (st, _) = admin(&s, "DELETE", &format!("/v1/tokens/{revoked_id}"), None).await;
    assert_eq!(st, 204);
    let url = format!("http://{}/crm/v1/x", s.public);
    assert_eq!(get("127.0.0.2", &url, Some(&kept)).await.status, 200);

    // No shutdown, no flush: the acknowledged writes must already be on disk.
    run.kill_9();
    let run = Running::start(&s.config);
    wait_ready(s.admin).await;

    let g = get("127.0.0.2", &url, Some(&kept)).await;
    assert_eq!(g.status, 200, "{}", g.text);
    let g = get("127.0.0.2", &url, Some(&revoked)).await;
    assert_error(&g, 401, "invalid_token");
    let g = get("127.0.0.3", &url, Some(&kept)).await;
    assert_error(&g, 403, "ip_not_allowed");
    let (st, v) = admin(&s, "GET", "/v1/tenants/acme/tokens", None).await;
    assert_eq!(st, 200, "{v}");
    let tokens = v["tokens"].as_array().unwrap();
    assert_eq!(tokens.len(), 2, "{v}");
    assert_eq!(tokens[0]["id"], kept_id.as_str());
    assert_eq!(tokens[0]["status"], "active");
    assert_eq!(tokens[0]["name"], "kept");
    assert_eq!(tokens[1]["id"], revoked_id.as_str());
    assert_eq!(tokens[1]["status"], "revoked");
    let (st, v) = admin(&s, "GET", "/v1/tenants/acme", None).await;
    assert_eq!(st, 200);
    assert_eq!(v["products"], json!(["crm"]));
    assert_eq!(v["token_quota"], 2);
    assert_eq!(b.crm.count(), 2);
    // The database file holds hashes only, never a secret.
    let db = std::fs::read(s.dir.path().join("data/tollgate.db")).unwrap();
    let hay = String::from_utf8_lossy(&db);
    assert!(!hay.contains(&kept) && !hay.contains(&revoked));
    drop(run);
}

/// `tollgate store <verb> --config <config>` with `input` on stdin.
fn store_cli(verb: &str, config: &Path, input: &[u8]) -> (i32, String, String) {
    let mut child = Command::new(bin())
        .args(["store", verb, "--config"])
        .arg(config)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(input).unwrap();
    let out = child.wait_with_output().unwrap();
    (
        out.status.code().unwrap(),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_export_and_import_move_tokens_with_hashes_only() {
    let b = Backends::start().await;
    let from = write_config(&b);
    let run = Running::start(&from.config);
    wait_ready(from.admin).await;
    let (st, _) = admin(
        &from,
        "POST",
        "/v1/tenants",
        Some(json!({"id": "acme", "products": ["crm"]})),
    )
    .await;
    assert_eq!(st, 201);
    let (st, v) = admin(
        &from,
        "POST",
        "/v1/tenants/acme/tokens",
        Some(json!({"ip_allowlist": ["127.0.0.2"]})),
    )
    .await;
    assert_eq!(st, 201, "{v}");
    let secret = v["token"].as_str().unwrap().to_string();
    let token_id = v["id"].as_str().unwrap().to_string();
    drop(run); // the embedded store is one process's at a time

    let (code, export, err) = store_cli("export", &from.config, b"");
    assert_eq!(code, 0, "{err}");
    let lines: Vec<Value> = export
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect();
    assert_eq!(lines.len(), 2, "{export}");
    assert!(!export.contains(&secret), "the export holds a secret");
    assert!(
        export.contains(blake3::hash(secret.as_bytes()).to_hex().as_str()),
        "the export lacks the token's hash: {export}"
    );

    // A garbage line is refused whole, naming the line, and writes nothing.
    let to = write_config(&b);
    let bad = format!("{export}{{\"type\":\"nonsense\"}}\n");
    let (code, _, err) = store_cli("import", &to.config, bad.as_bytes());
    assert_eq!(code, 1);
    assert!(err.contains("line 3"), "{err}");
    let (code, _, err) = store_cli("import", &to.config, export.as_bytes());
    assert_eq!(code, 0, "{err}");

    let run = Running::start(&to.config);
    wait_ready(to.admin).await;
    let url = format!("http://{}/crm/v1/x", to.public);
    let g = get("127.0.0.2", &url, Some(&secret)).await;
    assert_eq!(g.status, 200, "{}", g.text);
    let (st, v) = admin(&to, "GET", &format!("/v1/tokens/{token_id}"), None).await;
    assert_eq!((st, v["tenant"].as_str()), (200, Some("acme")), "{v}");
    drop(run);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_logs_a_json_listening_line_with_both_addresses() {
    let b = Backends::start().await;
    let s = write_config(&b);
    let run = Running::start(&s.config);
    let line: Value = run.wait_for_line(|l| {
        let v: Value = serde_json::from_str(l).ok()?;
        (v["message"] == "listening" || v["fields"]["message"] == "listening").then_some(v)
    });
    let field = |name: &str| {
        line.get(name)
            .or_else(|| line["fields"].get(name))
            .and_then(Value::as_str)
            .unwrap_or_else(|| panic!("{name} missing in {line}"))
            .to_string()
    };
    assert_eq!(field("public"), s.public.to_string());
    assert_eq!(field("admin"), s.admin.to_string());
    // Logged once both listeners accept connections.
    let r = reqwest::get(format!("http://{}/healthz", s.admin))
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let g = get("127.0.0.1", &format!("http://{}/crm/x", s.public), None).await;
    assert_error(&g, 401, "missing_token");
    drop(run);
}

fn check_config(text: &str) -> (i32, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gateway.toml");
    std::fs::write(&path, text).unwrap();
    let out = Command::new(bin())
        .args(["check-config", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    (
        out.status.code().unwrap(),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

const VALID: &str = r#"
[listen]
public = "127.0.0.1:8080"
admin = "127.0.0.1:9090"
[store]
path = "data/tollgate.db"
[limits]
upstream_timeout = "30s"
[[route]]
prefix = "/crm/"
product = "crm"
upstream = "http://127.0.0.1:7001"
"#;

#[test]
fn check_config_prints_ok_and_exits_0_for_a_valid_file() {
    let (code, out, err) = check_config(VALID);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.trim(), "ok");
    // The example gateway.toml shipped with the project is valid too.
    let out = Command::new(bin())
        .args(["check-config", "--config"])
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("gateway.toml"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "ok");
}

#[test]
fn check_config_names_an_unknown_key_and_exits_1() {
    let text = VALID.replace("upstream_timeout", "upstream_timeot");
    let (code, out, err) = check_config(&text);
    assert_eq!(code, 1, "{out}");
    assert!(err.contains("upstream_timeot"), "{err}");
    assert!(!out.contains("ok"));
    let text = format!("{VALID}\n[listn]\npublic = \"127.0.0.1:1\"\n");
    let (code, _, err) = check_config(&text);
    assert_eq!(code, 1);
    assert!(err.contains("listn"), "{err}");
}

#[test]
fn check_config_names_a_bad_value_and_exits_1() {
    for (from, to, key) in [
        ("\"30s\"", "\"soon\"", "limits.upstream_timeout"),
        ("\"127.0.0.1:8080\"", "\"not an address\"", "listen.public"),
        ("\"http://127.0.0.1:7001\"", "\"ftp://x\"", "upstream"),
        ("product = \"crm\"", "product = \"CRM Suite\"", "product"),
    ] {
        let text = VALID.replace(from, to);
        assert_ne!(text, VALID);
        let (code, out, err) = check_config(&text);
        assert_eq!(code, 1, "{to}: {out}");
        assert!(err.contains(key), "{to}: {err}");
        assert!(out.trim().is_empty(), "{out}");
    }
}

#[test]
fn check_config_gives_the_full_key_path_for_unknown_keys_and_wrong_types() {
    // CONTRACT §2: "each problem with its key path (and line where known)".
    let unknown = VALID.replace("upstream_timeout", "upstream_timeot");
    let wrong_type = VALID.replace("\"30s\"", "30");
    for (text, key) in [
        (unknown, "limits.upstream_timeot"),
        (wrong_type, "limits.upstream_timeout"),
    ] {
        let (code, _, err) = check_config(&text);
        assert_eq!(code, 1);
        assert!(err.contains(key), "{key} not named: {err}");
        // VALID starts with a newline: `upstream_timeout` is on line 8.
        assert!(err.contains("line 8"), "{err}");
    }
    // Both at once: each problem is named, not only the first.
    let both = VALID
        .replace("upstream_timeout", "upstream_timeot")
        .replace("[limits]", "[limits]\nidle_timeout = 60");
    let (code, _, err) = check_config(&both);
    assert_eq!(code, 1);
    assert!(err.contains("limits.upstream_timeot"), "{err}");
    assert!(err.contains("limits.idle_timeout"), "{err}");
}

#[test]
fn check_config_and_run_read_gateway_toml_in_the_working_directory_by_default() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("gateway.toml"), VALID).unwrap();
    let out = Command::new(bin())
        .arg("check-config")
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "ok");
    // `run` refuses the same bad file `check-config` refuses, with exit 1
    // and the key named, before it binds or opens anything.
    std::fs::write(
        dir.path().join("gateway.toml"),
        VALID.replace("\"30s\"", "\"soon\""),
    )
    .unwrap();
    let out = Command::new(bin())
        .arg("run")
        .current_dir(dir.path())
        .env_remove("RUST_LOG")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(all.contains("limits.upstream_timeout"), "{all}");
    assert!(
        !dir.path().join("data").exists(),
        "run opened the store anyway"
    );
}

#[test]
fn check_config_of_a_missing_file_exits_1() {
    let out = Command::new(bin())
        .args(["check-config", "--config", "/nonexistent/gateway.toml"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(!String::from_utf8_lossy(&out.stderr).trim().is_empty());
}

fn hash_key(input: &str) -> (i32, String) {
    let mut child = Command::new(bin())
        .arg("hash-key")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    (
        out.status.code().unwrap(),
        String::from_utf8(out.stdout).unwrap(),
    )
}

#[test]
fn hash_key_prints_the_blake3_form_for_admin_key_hashes() {
    let want = format!("blake3:{}\n", blake3::hash(b"s3cret-key").to_hex());
    assert_eq!(hash_key("s3cret-key\n"), (0, want.clone()));
    // With or without the newline (`printf` vs `echo`), the same hash.
    assert_eq!(hash_key("s3cret-key"), (0, want));
    let (code, out) = hash_key("");
    assert_eq!(code, 1, "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hash_key_output_is_accepted_as_an_admin_key() {
    let out = {
        let (code, out) = hash_key("operator-key-1");
        assert_eq!(code, 0);
        out
    };
    let b = Backends::start().await;
    let s = write_config(&b);
    let text = std::fs::read_to_string(&s.config).unwrap().replace(
        "[store]",
        &format!("[admin]\nkey_hashes = [\"{}\"]\n\n[store]", out.trim()),
    );
    std::fs::write(&s.config, text).unwrap();
    let run = Running::start(&s.config);
    wait_ready(s.admin).await;
    let (st, v) = admin_call(s.admin, "GET", "/v1/tenants", None, Some("operator-key-1")).await;
    assert_eq!(st, 200, "{v}");
    // The environment key works alongside.
    let (st, _) = admin(&s, "GET", "/v1/tenants", None).await;
    assert_eq!(st, 200);
    let (st, v) = admin_call(s.admin, "GET", "/v1/tenants", None, Some("operator-key-2")).await;
    assert_eq!(st, 401, "{v}");
    assert_eq!(v["error"]["code"], "unauthorized");
    drop(run);
}
