//! `tollgate demo`: a gateway with everything it needs on one machine: an
//! embedded store in a temporary folder, three echo backends (crm,
//! messaging, marketing), one tenant and one token, and a printed list of
//! curl lines showing an allowed call and each rejection. Runs until Ctrl-C.
//!
//! For the two upstream failures there are two more CRM routes: `/crm/down/`
//! points at a port nothing listens on (502), and `/crm/slow/` at a backend
//! that accepts and never answers, with the demo's `upstream_timeout` at 2 s
//! (504).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use http::{Method, Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket};

use crate::client::AdminClient;
use crate::config::Config;

/// Starts a backend that answers every request with a JSON echo of what it
/// received: `{"backend","method","path","query","headers","body_bytes"}`.
pub async fn spawn_echo(name: &'static str, addr: SocketAddr) -> anyhow::Result<SocketAddr> {
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: Request<Incoming>| echo(name, req));
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    Ok(local)
}

async fn echo(
    name: &'static str,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let (parts, body) = req.into_parts();
    let mut headers = serde_json::Map::new();
    for (k, v) in &parts.headers {
        headers.insert(
            k.as_str().into(),
            json!(String::from_utf8_lossy(v.as_bytes())),
        );
    }
    let mut len = 0usize;
    let mut body = body;
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(f) => len += f.data_ref().map_or(0, |d| d.len()),
            Err(_) => break,
        }
    }
    let v = json!({
        "backend": name,
        "method": parts.method.as_str(),
        "path": parts.uri.path(),
        "query": parts.uri.query(),
        "headers": headers,
        "body_bytes": len,
    });
    let mut resp = Response::new(Full::new(Bytes::from(
        serde_json::to_vec_pretty(&v).unwrap_or_default(),
    )));
    resp.headers_mut().insert(
        "content-type",
        http::HeaderValue::from_static("application/json"),
    );
    Ok(resp)
}

/// Starts a backend that accepts connections and never answers.
async fn spawn_silent() -> anyhow::Result<SocketAddr> {
    let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
    let local = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                while matches!(stream.read(&mut buf).await, Ok(n) if n > 0) {}
            });
        }
    });
    Ok(local)
}

/// A loopback address nothing listens on (bound, then released).
async fn closed_port() -> anyhow::Result<SocketAddr> {
    Ok(TcpListener::bind(("127.0.0.1", 0)).await?.local_addr()?)
}

/// `127.0.0.1:port` when that port is free, else any free port.
async fn free_or_any(port: u16) -> SocketAddr {
    let want: SocketAddr = ([127, 0, 0, 1], port).into();
    match TcpListener::bind(want).await {
        Ok(l) => {
            drop(l);
            want
        }
        Err(_) => ([127, 0, 0, 1], 0).into(),
    }
}

/// Sends one request from `source` and returns the status code the gateway
/// answered, so the demo can show what each curl line gets.
async fn status_of(
    source: [u8; 4],
    target: SocketAddr,
    path: &str,
    token: Option<&str>,
) -> Option<u16> {
    let sock = TcpSocket::new_v4().ok()?;
    sock.bind((source, 0).into()).ok()?;
    let mut s = sock.connect(target).await.ok()?;
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let req = format!("GET {path} HTTP/1.1\r\nHost: demo\r\n{auth}Connection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.ok()?;
    let mut buf = vec![0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .ok()?
        .ok()?;
    let line = std::str::from_utf8(&buf[..n]).ok()?;
    line.split(' ').nth(1)?.parse().ok()
}

pub async fn run() -> anyhow::Result<()> {
    let dir = tempfile::tempdir().context("creating a temporary folder for the demo store")?;
    let crm = spawn_echo("crm", ([127, 0, 0, 1], 0).into()).await?;
    let messaging = spawn_echo("messaging", ([127, 0, 0, 1], 0).into()).await?;
    let marketing = spawn_echo("marketing", ([127, 0, 0, 1], 0).into()).await?;
    let silent = spawn_silent().await?;
    let down = closed_port().await?;
    let public = free_or_any(8080).await;
    let admin = free_or_any(9090).await;
    let admin_key = format!(
        "adm_{}",
        crate::auth::TokenFormat::new("x").generate().split_off(1)
    );
    let text = format!(
        r#"
[listen]
public = "{public}"
admin = "{admin}"
[store]
path = "{db}"
[admin]
key_hashes = ["blake3:{hash}"]
[limits]
upstream_timeout = "2s"
[log]
format = "text"
level = "warn"
[[route]]
prefix = "/crm/"
product = "crm"
upstream = "http://{crm}"
[[route]]
prefix = "/messaging/"
product = "messaging"
upstream = "http://{messaging}"
[[route]]
prefix = "/marketing/"
product = "marketing"
upstream = "http://{marketing}"
[[route]]
prefix = "/crm/down/"
product = "crm"
upstream = "http://{down}"
[[route]]
prefix = "/crm/slow/"
product = "crm"
upstream = "http://{silent}"
"#,
        db = dir
            .path()
            .join("tollgate.db")
            .display()
            .to_string()
            .replace('\\', "/"),
        hash = blake3::hash(admin_key.as_bytes()).to_hex(),
    );
    let config = Config::parse(&text).map_err(|e| anyhow::anyhow!("demo config: {e}"))?;
    let (log, _guard) = crate::telemetry::init(config.log_format, &config.log_level);
    let handle = crate::server::start(
        config,
        crate::server::StartOptions {
            config_path: None,
            log: Some(log),
        },
    )
    .await?;
    let (public, admin) = (handle.public_addr, handle.admin_addr);

    let api = AdminClient::new(&format!("http://{admin}"), &admin_key);
    api.expect_ok(
        Method::POST,
        "/v1/tenants",
        Some(json!({"id": "acme", "name": "Acme Corp", "products": ["crm", "messaging"]})),
    )
    .await?;
    let tok = api
        .expect_ok(
            Method::POST,
            "/v1/tenants/acme/tokens",
            Some(json!({"name": "demo", "ip_allowlist": ["127.0.0.1"]})),
        )
        .await?;
    let token = tok["token"]
        .as_str()
        .context("no token in the answer")?
        .to_string();
    let token_id = tok["id"].as_str().unwrap_or_default().to_string();
    let bad_token = format!(
        "{}{}",
        &token[..token.len() - 1],
        if token.ends_with('A') { 'B' } else { 'A' }
    );

    let base = format!("http://{public}");
    // (what it shows, curl line, source address, path, token)
    type Case<'a> = (&'a str, String, [u8; 4], &'a str, Option<&'a str>);
    let cases: Vec<Case> = vec![
        ("allowed: forwarded to the CRM backend, which echoes what it received", format!("curl -i -H 'Authorization: Bearer {token}' {base}/crm/v1/contacts"), [127, 0, 0, 1], "/crm/v1/contacts", Some(&token)),
        ("401 missing_token: no Authorization header", format!("curl -i {base}/crm/v1/contacts"), [127, 0, 0, 1], "/crm/v1/contacts", None),
        ("401 invalid_token: one character changed (the checksum catches it)", format!("curl -i -H 'Authorization: Bearer {bad_token}' {base}/crm/v1/contacts"), [127, 0, 0, 1], "/crm/v1/contacts", Some(&bad_token)),
        ("403 ip_not_allowed: same token from 127.0.0.2, not on the allowlist", format!("curl -i --interface 127.0.0.2 -H 'Authorization: Bearer {token}' {base}/crm/v1/contacts"), [127, 0, 0, 2], "/crm/v1/contacts", Some(&token)),
        ("403 product_not_enabled: acme has not bought marketing", format!("curl -i -H 'Authorization: Bearer {token}' {base}/marketing/v1/campaigns"), [127, 0, 0, 1], "/marketing/v1/campaigns", Some(&token)),
        ("404 no_route: no route for this path", format!("curl -i -H 'Authorization: Bearer {token}' {base}/billing/v1/invoices"), [127, 0, 0, 1], "/billing/v1/invoices", Some(&token)),
        ("400 bad_request: an encoded dot segment cannot sneak past the product check", format!("curl -i --path-as-is -H 'Authorization: Bearer {token}' '{base}/crm/%2e%2e/marketing/v1/campaigns'"), [127, 0, 0, 1], "/crm/%2e%2e/marketing/v1/campaigns", Some(&token)),
        ("403 product_not_enabled: /crm/../marketing/ is a Marketing request", format!("curl -i --path-as-is -H 'Authorization: Bearer {token}' {base}/crm/../marketing/v1/campaigns"), [127, 0, 0, 1], "/crm/../marketing/v1/campaigns", Some(&token)),
        ("502 upstream_unavailable: the /crm/down/ route's backend refuses connections", format!("curl -i -H 'Authorization: Bearer {token}' {base}/crm/down/v1/contacts"), [127, 0, 0, 1], "/crm/down/v1/contacts", Some(&token)),
        ("504 upstream_timeout: the /crm/slow/ route's backend never answers (takes 2 s)", format!("curl -i -H 'Authorization: Bearer {token}' {base}/crm/slow/v1/contacts"), [127, 0, 0, 1], "/crm/slow/v1/contacts", Some(&token)),
    ];

    println!();
    println!("tollgate demo is running (Ctrl-C to stop).");
    println!("  public listener  {base}   routes /crm/ /messaging/ /marketing/ (and /crm/down/, /crm/slow/)");
    println!("  admin listener   http://{admin}   admin key: {admin_key}");
    println!(
        "  tenant acme bought crm and messaging; token {token_id} may be used from 127.0.0.1 only"
    );
    println!("  token secret (shown once): {token}");
    println!();
    println!("Try these; the status the demo itself got is in brackets:");
    for (what, curl, source, path, tok) in &cases {
        let got = status_of(*source, public, path, *tok).await;
        println!();
        println!(
            "  # {what}  [{}]",
            got.map_or("?".to_string(), |s| s.to_string())
        );
        println!("  {curl}");
    }
    println!();
    println!("Admin API:");
    println!(
        "  curl -s -H 'Authorization: Bearer {admin_key}' http://{admin}/v1/tenants/acme/tokens"
    );
    println!("  curl -s -X DELETE -H 'Authorization: Bearer {admin_key}' http://{admin}/v1/tokens/{token_id}   # revoke: the first curl then gets 401");
    println!("  curl -s http://{admin}/metrics | grep tollgate_requests_total");
    println!();

    crate::shutdown::on_terminate(handle.shutdown_token()).await;
    handle.wait().await;
    drop(dir);
    Ok(())
}
