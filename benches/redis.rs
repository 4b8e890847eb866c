//! Redis store benchmarks (a plain binary, `harness = false`):
//!
//! 1. **Propagation**: two in-process gateways on one `redis-server`; for each
//!    trial a token is created on A, seen on B, then revoked through A's admin
//!    API; we time from the revoke call to the moment B's token table no
//!    longer holds the token (checked every 50 µs), and confirm with a real
//!    request on B that answers 401. Reports p50/p90/p99/max.
//! 2. **Load**: fills Redis with `TG_BENCH_TOKENS` tokens (default 1,000,000;
//!    `TG_BENCH_TOKENS_PER_TENANT` per tenant, default 1) in the store's own
//!    format, then a fresh child process loads them the way a starting
//!    gateway does (`spawn_sync` → first sync) and reports the load time and
//!    the resident-memory growth per token.
//!
//! `cargo bench --bench redis` (needs `redis-server` on PATH or in /usr/bin).
//! `cargo test --benches` runs it with tiny sizes as a smoke test.

// The allocator the gateway binary ships with (src/main.rs), so the load
// and memory figures are the production ones.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tollgate::auth::TokenHash;
use tollgate::model::{Tenant, Token};
use tollgate::store::{redis::RedisStore, Store, SyncStatus};
use tollgate::table::TokenTable;

const ADMIN_KEY: &str = "bench-admin-key-0123456789";

struct RedisServer {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl RedisServer {
    fn start() -> RedisServer {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let dir = tempfile::tempdir().unwrap();
        let bin = ["/usr/bin/redis-server", "/usr/local/bin/redis-server"]
            .into_iter()
            .find(|p| std::path::Path::new(p).exists())
            .unwrap_or("redis-server");
        let child = Command::new(bin)
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server");
        let r = RedisServer {
            child,
            port,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while r.connection().is_none() {
            assert!(Instant::now() < deadline, "redis-server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        r
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    fn connection(&self) -> Option<redis::Connection> {
        let mut c = redis::Client::open(self.url())
            .ok()?
            .get_connection_with_timeout(Duration::from_millis(200))
            .ok()?;
        redis::cmd("PING").query::<String>(&mut c).ok()?;
        Some(c)
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn config_text(url: &str) -> String {
    format!(
        r#"
[listen]
public = "127.0.0.1:0"
admin = "127.0.0.1:0"
[store]
kind = "redis"
url = "{url}"
key_prefix = "tg:"
[admin]
key_hashes = ["blake3:{hash}"]
[log]
level = "warn"
[[route]]
prefix = "/crm/"
product = "crm"
upstream = "http://127.0.0.1:9"
"#,
        hash = blake3::hash(ADMIN_KEY.as_bytes()).to_hex(),
    )
}

async fn start_gateway(url: &str, dir: &std::path::Path) -> tollgate::server::Handle {
    let path = dir.join("gateway.toml");
    std::fs::write(&path, config_text(url)).unwrap();
    let config = tollgate::config::Config::load(&path).unwrap();
    let h = tollgate::server::start(config, tollgate::server::StartOptions::default())
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !h.gateway.is_ready() {
        assert!(Instant::now() < deadline, "gateway not ready");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    h
}

async fn admin(
    c: &reqwest::Client,
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<Value>,
) -> (u16, Value) {
    let mut rb = c
        .request(method.parse().unwrap(), format!("http://{addr}{path}"))
        .bearer_auth(ADMIN_KEY);
    if let Some(b) = body {
        rb = rb.json(&b);
    }
    let r = rb.send().await.unwrap();
    let s = r.status().as_u16();
    let t = r.text().await.unwrap();
    (s, serde_json::from_str(&t).unwrap_or(Value::Null))
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1000.0)
}

async fn propagation(trials: usize) {
    let redis = RedisServer::start();
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = start_gateway(&redis.url(), da.path()).await;
    let b = start_gateway(&redis.url(), db.path()).await;
    let c = reqwest::Client::new();
    let (s, v) = admin(
        &c,
        a.admin_addr,
        "POST",
        "/v1/tenants",
        Some(json!({"id": "bench", "products": ["crm"], "token_quota": 1})),
    )
    .await;
    assert_eq!(s, 201, "{v}");
    let mut from_call = Vec::with_capacity(trials);
    let mut from_answer = Vec::with_capacity(trials);
    for _ in 0..trials {
        let (s, v) = admin(
            &c,
            a.admin_addr,
            "POST",
            "/v1/tenants/bench/tokens",
            Some(json!({"ip_allowlist": ["127.0.0.1"]})),
        )
        .await;
        assert_eq!(s, 201, "{v}");
        let id = v["id"].as_str().unwrap().to_string();
        let hash = TokenHash::of(v["token"].as_str().unwrap());
        let secret = v["token"].as_str().unwrap().to_string();
        let table_b = b.gateway.table.clone();
        let deadline = Instant::now() + Duration::from_secs(5);
        while table_b.get(&hash).is_none() {
            assert!(Instant::now() < deadline, "B never saw the token");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        // Revoke on A, in its own task so B is watched while it runs.
        let (c2, addr, path) = (c.clone(), a.admin_addr, format!("/v1/tokens/{id}"));
        let start = Instant::now();
        let call = tokio::spawn(async move {
            let r = admin(&c2, addr, "DELETE", &path, None).await;
            (r, Instant::now())
        });
        // Watched from a plain thread: tokio timers tick in whole ms.
        let refused = tokio::task::spawn_blocking(move || {
            while table_b.get(&hash).is_some() {
                assert!(
                    start.elapsed() < Duration::from_secs(5),
                    "B never refused the token"
                );
                std::thread::sleep(Duration::from_micros(50));
            }
            Instant::now()
        })
        .await
        .unwrap();
        let ((s, _), answered) = call.await.unwrap();
        assert_eq!(s, 204);
        from_call.push(refused - start);
        from_answer.push(refused.saturating_duration_since(answered));
        // B's data plane agrees.
        let r = c
            .get(format!("http://{}/crm/x", b.public_addr))
            .bearer_auth(&secret)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 401);
    }
    from_call.sort();
    from_answer.sort();
    println!("propagation: revoke on A -> refused on B, {trials} trials");
    for (name, v) in [
        ("from the DELETE call on A", &from_call),
        ("after A answered 204", &from_answer),
    ] {
        println!(
            "  {name:<28} p50 {}  p90 {}  p99 {}  max {}",
            ms(percentile(v, 0.5)),
            ms(percentile(v, 0.9)),
            ms(percentile(v, 0.99)),
            ms(*v.last().unwrap())
        );
    }
    a.shutdown();
    b.shutdown();
}

/// Writes `tokens` tokens straight into Redis in the store's format.
fn fill(redis: &RedisServer, tokens: usize, per_tenant: usize) {
    let mut con = redis.connection().unwrap();
    let started = Instant::now();
    let tenants = tokens.div_ceil(per_tenant);
    let mut pipe = redis::pipe();
    let mut version = 0u64;
    let mut queued = 0;
    let mut made = 0;
    for t in 0..tenants {
        let tid = format!("tenant{t:07}");
        version += 1;
        let tenant = Tenant {
            id: tid.clone(),
            name: tid.clone(),
            products: vec!["crm".into(), "messaging".into()],
            token_quota: per_tenant as u32,
            created_at: 1_700_000_000,
            version,
        };
        let key = format!("tg:tenant:{{{tid}}}");
        pipe.cmd("HSET")
            .arg(&key)
            .arg("tenant")
            .arg(serde_json::to_string(&tenant).unwrap())
            .ignore();
        for _ in 0..per_tenant {
            if made == tokens {
                break;
            }
            made += 1;
            version += 1;
            let id = tollgate::model::new_token_id();
            let token = Token {
                id: id.clone(),
                tenant: tid.clone(),
                name: String::new(),
                hash: TokenHash::of(&format!("tg_secret_{made}")),
                ip_allowlist: vec!["203.0.113.0/24".parse().unwrap()],
                products: None,
                created_at: 1_700_000_000,
                expires_at: None,
                disabled: false,
                revoked_at: None,
                previous: None,
                last_used_at: None,
                version,
            };
            pipe.cmd("HSET")
                .arg(&key)
                .arg(format!("tok:{id}"))
                .arg(serde_json::to_string(&token).unwrap())
                .ignore();
            pipe.cmd("HSET")
                .arg("tg:token-tenant")
                .arg(&id)
                .arg(&tid)
                .ignore();
            queued += 2;
        }
        pipe.cmd("HSET").arg(&key).arg("rev").arg(version).ignore();
        queued += 2;
        if queued >= 20_000 {
            pipe.query::<()>(&mut con).unwrap();
            pipe = redis::pipe();
            queued = 0;
        }
    }
    pipe.cmd("SET").arg("tg:version").arg(version).ignore();
    pipe.query::<()>(&mut con).unwrap();
    let used: String = redis::cmd("INFO").arg("memory").query(&mut con).unwrap();
    let used = used
        .lines()
        .find_map(|l| l.strip_prefix("used_memory_human:"))
        .unwrap_or("?")
        .trim()
        .to_string();
    println!(
        "load: filled redis with {made} tokens over {tenants} tenants in {:.1} s (redis used_memory {used})",
        started.elapsed().as_secs_f64()
    );
}

fn rss_kib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// Child process: load everything like a starting gateway, report as JSON.
async fn load_child(url: &str) {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter("info")
        .init();
    let before = rss_kib("VmRSS:");
    let store = Arc::new(RedisStore::open(url, "tg:").unwrap());
    let table = TokenTable::new();
    let status = Arc::new(SyncStatus::default());
    let started = Instant::now();
    let task = Arc::clone(&store).spawn_sync(table.clone(), Arc::clone(&status));
    status.wait_first_sync().await;
    let took = started.elapsed();
    let after = rss_kib("VmRSS:");
    let peak = rss_kib("VmHWM:");
    let tokens = table.live_tokens();
    if let Some(t) = task {
        t.abort();
    }
    println!(
        "{}",
        json!({"tokens": tokens, "tenants": table.tenants(), "load_ms": took.as_millis() as u64,
               "rss_before_kib": before, "rss_after_kib": after, "rss_peak_kib": peak})
    );
    drop(store);
}

fn load(tokens: usize, per_tenant: usize) {
    let redis = RedisServer::start();
    fill(&redis, tokens, per_tenant);
    let exe = std::env::current_exe().unwrap();
    let out = Command::new(exe)
        .arg("--load-child")
        .arg(redis.url())
        .stderr(Stdio::inherit())
        .output()
        .unwrap();
    assert!(out.status.success(), "load child failed");
    let line = String::from_utf8_lossy(&out.stdout);
    let v: Value = serde_json::from_str(line.trim()).unwrap();
    let n = v["tokens"].as_u64().unwrap().max(1);
    let delta = v["rss_after_kib"].as_u64().unwrap() - v["rss_before_kib"].as_u64().unwrap();
    let peak = v["rss_peak_kib"].as_u64().unwrap() - v["rss_before_kib"].as_u64().unwrap();
    println!(
        "load: {n} tokens / {} tenants loaded from redis in {:.2} s; RSS +{:.1} MiB = {} bytes/token after load (peak +{:.1} MiB)",
        v["tenants"],
        v["load_ms"].as_u64().unwrap() as f64 / 1000.0,
        delta as f64 / 1024.0,
        delta * 1024 / n,
        peak as f64 / 1024.0,
    );
}

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    if let Some(i) = args.iter().position(|a| a == "--load-child") {
        let url = args.get(i + 1).expect("url").clone();
        rt.block_on(load_child(&url));
        return;
    }
    // `cargo test --benches` runs this with no `--bench`: keep it quick.
    let full = args.iter().any(|a| a == "--bench");
    let trials = env_usize("TG_BENCH_TRIALS", if full { 200 } else { 5 });
    let tokens = env_usize("TG_BENCH_TOKENS", if full { 1_000_000 } else { 1000 });
    let per_tenant = env_usize("TG_BENCH_TOKENS_PER_TENANT", 1).max(1);
    rt.block_on(propagation(trials));
    load(tokens, per_tenant);
}
