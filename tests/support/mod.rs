//! Test support: a real gateway on loopback (in-process, or the real binary
//! as a child process), a recording upstream, clients bound to chosen
//! 127.x source addresses, and raw-socket helpers.
#![allow(dead_code)]

pub mod redis;

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

pub const ADMIN_KEY: &str = "test-admin-key-0123456789";

/// One request as the upstream saw it.
#[derive(Clone, Debug)]
pub struct Seen {
    pub method: String,
    pub path_and_query: String,
    pub headers: http::HeaderMap,
    pub body_len: usize,
    pub version: http::Version,
    /// Which of the upstream's connections it came on (1, 2, …).
    pub conn: usize,
}

/// A real HTTP upstream that records what it receives and answers 200 with
/// `{"upstream":NAME,"path":…}` (after `delay`, if set).
#[derive(Clone)]
pub struct Upstream {
    pub addr: SocketAddr,
    pub name: &'static str,
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl Upstream {
    pub async fn start(name: &'static str) -> Upstream {
        Self::start_with_delay(name, Duration::ZERO).await
    }

    pub async fn start_with_delay(name: &'static str, delay: Duration) -> Upstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
        let seen2 = Arc::clone(&seen);
        tokio::spawn(async move {
            let mut conns = 0;
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                conns += 1;
                let conn = conns;
                let seen = Arc::clone(&seen2);
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                        let seen = Arc::clone(&seen);
                        async move {
                            let (parts, body) = req.into_parts();
                            let mut len = 0;
                            let mut body = body;
                            while let Some(Ok(f)) = body.frame().await {
                                len += f.data_ref().map_or(0, |d| d.len());
                            }
                            let pq = parts
                                .uri
                                .path_and_query()
                                .map(|p| p.to_string())
                                .unwrap_or_default();
                            seen.lock().unwrap().push(Seen {
                                method: parts.method.to_string(),
                                path_and_query: pq.clone(),
                                headers: parts.headers.clone(),
                                body_len: len,
                                version: parts.version,
                                conn,
                            });
                            if !delay.is_zero() {
                                tokio::time::sleep(delay).await;
                            }
                            let body =
                                json!({"upstream": name, "path": pq, "body_len": len}).to_string();
                            let mut r = Response::new(Full::new(Bytes::from(body)));
                            r.headers_mut()
                                .insert("content-type", "application/json".parse().unwrap());
                            r.headers_mut().insert("x-upstream", name.parse().unwrap());
                            Ok::<_, std::convert::Infallible>(r)
                        }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Upstream { addr, name, seen }
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    pub fn count(&self) -> usize {
        self.seen.lock().unwrap().len()
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

/// The three product backends.
pub struct Backends {
    pub crm: Upstream,
    pub messaging: Upstream,
    pub marketing: Upstream,
}

impl Backends {
    pub async fn start() -> Backends {
        Backends {
            crm: Upstream::start("crm").await,
            messaging: Upstream::start("messaging").await,
            marketing: Upstream::start("marketing").await,
        }
    }

    pub fn total(&self) -> usize {
        self.crm.count() + self.messaging.count() + self.marketing.count()
    }
}

/// The standard test config: three routes, loopback listeners on free
/// ports, embedded store at `db`, `extra` appended (may add sections).
pub fn config_text(b: &Backends, db: &Path, extra: &str) -> String {
    format!(
        r#"
[listen]
public = "127.0.0.1:0"
admin = "127.0.0.1:0"
[store]
path = "{db}"
[admin]
key_hashes = ["blake3:{hash}"]
{extra}
[[route]]
prefix = "/crm/"
product = "crm"
upstream = "{crm}"
[[route]]
prefix = "/messaging/"
product = "messaging"
upstream = "{messaging}"
strip_prefix = true
[[route]]
prefix = "/marketing/"
product = "marketing"
upstream = "{marketing}"
"#,
        db = db.display(),
        hash = blake3::hash(ADMIN_KEY.as_bytes()).to_hex(),
        crm = b.crm.url(),
        messaging = b.messaging.url(),
        marketing = b.marketing.url(),
    )
}

/// A gateway running in this process.
pub struct TestGateway {
    pub handle: Option<tollgate::server::Handle>,
    pub public: SocketAddr,
    pub admin: SocketAddr,
    pub dir: tempfile::TempDir,
    pub config_path: PathBuf,
}

impl TestGateway {
    /// Starts a gateway with the standard config plus `extra`.
    pub async fn start(b: &Backends, extra: &str) -> TestGateway {
        let dir = tempfile::tempdir().unwrap();
        let text = config_text(b, &dir.path().join("tollgate.db"), extra);
        Self::start_text(dir, &text).await
    }

    /// Starts a gateway from full config text, kept in `dir/gateway.toml`.
    pub async fn start_text(dir: tempfile::TempDir, text: &str) -> TestGateway {
        let config_path = dir.path().join("gateway.toml");
        std::fs::write(&config_path, text).unwrap();
        let config = tollgate::config::Config::load(&config_path)
            .unwrap_or_else(|e| panic!("test config: {e}"));
        let handle = tollgate::server::start(
            config,
            tollgate::server::StartOptions {
                config_path: Some(config_path.clone()),
                log: None,
            },
        )
        .await
        .unwrap();
        TestGateway {
            public: handle.public_addr,
            admin: handle.admin_addr,
            handle: Some(handle),
            dir,
            config_path,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.public, path)
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{}", self.admin, path)
    }

    /// The Prometheus text of `/metrics`.
    pub async fn metrics(&self) -> String {
        reqwest::get(self.admin_url("/metrics"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    pub fn gateway(&self) -> &tollgate::server::Gateway {
        &self.handle.as_ref().unwrap().gateway
    }

    /// Calls the admin API with the test key.
    pub async fn admin(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        admin_call(self.admin, method, path, body, Some(ADMIN_KEY)).await
    }

    /// Creates a tenant with products and returns nothing; panics on failure.
    pub async fn tenant(&self, id: &str, products: &[&str], quota: u32) {
        let (s, v) = self
            .admin(
                "POST",
                "/v1/tenants",
                Some(json!({"id": id, "products": products, "token_quota": quota})),
            )
            .await;
        assert_eq!(s, 201, "{v}");
    }

    /// Creates a token and returns `(token_id, secret)`.
    pub async fn token(&self, tenant: &str, allow: &[&str]) -> (String, String) {
        let (s, v) = self
            .admin(
                "POST",
                &format!("/v1/tenants/{tenant}/tokens"),
                Some(json!({"ip_allowlist": allow})),
            )
            .await;
        assert_eq!(s, 201, "{v}");
        (
            v["id"].as_str().unwrap().into(),
            v["token"].as_str().unwrap().into(),
        )
    }

    pub async fn stop(mut self) {
        if let Some(h) = self.handle.take() {
            h.shutdown();
            h.wait().await;
        }
    }
}

/// One admin call; `key` None sends no Authorization.
pub async fn admin_call(
    admin: SocketAddr,
    method: &str,
    path: &str,
    body: Option<Value>,
    key: Option<&str>,
) -> (u16, Value) {
    let client = reqwest::Client::new();
    let mut rb = client.request(method.parse().unwrap(), format!("http://{admin}{path}"));
    if let Some(k) = key {
        rb = rb.bearer_auth(k);
    }
    if let Some(b) = body {
        rb = rb.json(&b);
    }
    let resp = rb.send().await.unwrap();
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap();
    let v = if text.is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&text).unwrap_or(Value::String(text))
    };
    (status, v)
}

/// An HTTP client whose connections come from `source` (any 127.x works on
/// Linux loopback).
pub fn client_from(source: &str) -> reqwest::Client {
    reqwest::Client::builder()
        .local_address(source.parse::<IpAddr>().unwrap())
        .no_proxy()
        .build()
        .unwrap()
}

/// A data-plane response: status, headers and body parsed as JSON if it is.
pub struct Got {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub body: Value,
    pub text: String,
}

/// GET `url` from `source` with an optional bearer token.
pub async fn get(source: &str, url: &str, token: Option<&str>) -> Got {
    let mut rb = client_from(source).get(url);
    if let Some(t) = token {
        rb = rb.bearer_auth(t);
    }
    send(rb).await
}

pub async fn send(rb: reqwest::RequestBuilder) -> Got {
    let resp = rb.send().await.unwrap();
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let text = resp.text().await.unwrap();
    let body = serde_json::from_str(&text).unwrap_or(Value::Null);
    Got {
        status,
        headers,
        body,
        text,
    }
}

/// The value of an unlabelled sample (`name value`) in Prometheus text.
pub fn metric_value(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// Asserts a contract error answer: status, `error.code`, JSON content type.
pub fn assert_error(g: &Got, status: u16, code: &str) {
    assert_eq!(g.status, status, "body: {}", g.text);
    assert_eq!(g.body["error"]["code"], code, "body: {}", g.text);
    assert!(g.body["error"]["message"]
        .as_str()
        .is_some_and(|m| !m.is_empty()));
    assert_eq!(g.headers["content-type"], "application/json");
}

/// Writes raw bytes from `source` and returns everything read until the
/// server closes or `wait` passes without data.
pub async fn raw(source: &str, addr: SocketAddr, bytes: &[u8], wait: Duration) -> String {
    let mut s = connect_from(source, addr).await;
    s.write_all(bytes).await.unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        match tokio::time::timeout(wait, s.read(&mut buf)).await {
            Ok(Ok(0)) | Err(_) | Ok(Err(_)) => break,
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

pub async fn connect_from(source: &str, addr: SocketAddr) -> TcpStream {
    let sock = TcpSocket::new_v4().unwrap();
    sock.bind(SocketAddr::new(source.parse().unwrap(), 0))
        .unwrap();
    sock.connect(addr).await.unwrap()
}

/// Path of the built `tollgate` binary.
pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_tollgate")
}

/// A free loopback port for a server a test starts later (a child process,
/// a config file).
///
/// Chosen below the kernel's ephemeral range: a port from `bind(0)`, once
/// released, can be taken by any outgoing connection or `bind(0)` of a
/// test running alongside before the server binds it, and the server then
/// fails to start. Ports below the range are only ever taken by an
/// explicit bind.
pub fn free_port() -> u16 {
    let low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    const FROM: u16 = 10_000;
    if low > FROM + 1000 {
        for _ in 0..200 {
            let port = FROM + rand::random::<u16>() % (low - FROM);
            if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
                return port;
            }
        }
    }
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}
