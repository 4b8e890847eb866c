//! Operations: TLS, https upstreams, limits and timeouts, reload under load,
//! upstream pools, graceful shutdown and the access log.

mod support;

use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use support::*;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};

struct Cert {
    cert_pem: String,
    key_pem: String,
}

fn make_cert() -> Cert {
    let c =
        rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()]).unwrap();
    Cert {
        cert_pem: c.cert.pem(),
        key_pem: c.signing_key.serialize_pem(),
    }
}

/// A private CA and a `localhost` certificate it signed: `(ca_pem, leaf)`.
fn make_ca_signed() -> (String, Cert) {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "tollgate test CA");
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let leaf_key = rcgen::KeyPair::generate().unwrap();
    let leaf = rcgen::CertificateParams::new(vec!["localhost".to_string()])
        .unwrap()
        .signed_by(&leaf_key, &issuer)
        .unwrap();
    (
        ca_cert.pem(),
        Cert {
            cert_pem: leaf.pem(),
            key_pem: leaf_key.serialize_pem(),
        },
    )
}

fn tls_client(root_pem: &str, gw: &TestGateway) -> reqwest::Client {
    reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(root_pem.as_bytes()).unwrap())
        .resolve("localhost", gw.public)
        .tls_built_in_root_certs(false)
        .no_proxy()
        .build()
        .unwrap()
}

async fn setup_token(gw: &TestGateway) -> String {
    gw.tenant("acme", &["crm", "messaging", "marketing"], 1)
        .await;
    gw.token("acme", &["127.0.0.1"]).await.1
}

#[tokio::test]
async fn tls_listener_serves_http1_and_h2_and_swaps_its_certificate_on_reload() {
    let b = Backends::start().await;
    let dir = tempfile::tempdir().unwrap();
    let first = make_cert();
    let cert = dir.path().join("gw.pem");
    let key = dir.path().join("gw.key");
    std::fs::write(&cert, &first.cert_pem).unwrap();
    std::fs::write(&key, &first.key_pem).unwrap();
    let extra = format!(
        "[listen.tls]\ncert = \"{}\"\nkey = \"{}\"\n",
        cert.display(),
        key.display()
    );
    let text = config_text(&b, &dir.path().join("t.db"), &extra);
    let gw = TestGateway::start_text(dir, &text).await;
    let secret = setup_token(&gw).await;
    let url = format!("https://localhost:{}/crm/x", gw.public.port());

    let client = tls_client(&first.cert_pem, &gw);
    let r = client.get(&url).bearer_auth(&secret).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.version(), reqwest::Version::HTTP_2, "ALPN should pick h2");
    let seen = b.crm.seen();
    assert_eq!(seen.last().unwrap().headers["x-forwarded-proto"], "https");

    let h1 = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(first.cert_pem.as_bytes()).unwrap())
        .resolve("localhost", gw.public)
        .http1_only()
        .build()
        .unwrap();
    let r = h1.get(&url).bearer_auth(&secret).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.version(), reqwest::Version::HTTP_11);

    // Plain HTTP on the TLS port gets no HTTP answer.
    let plain = raw(
        "127.0.0.1",
        gw.public,
        b"GET /crm/x HTTP/1.1\r\nHost: x\r\n\r\n",
        Duration::from_millis(500),
    )
    .await;
    assert!(!plain.starts_with("HTTP/1.1 200"), "{plain}");

    // New certificate, reload: new connections get it.
    let second = make_cert();
    std::fs::write(&cert, &second.cert_pem).unwrap();
    std::fs::write(&key, &second.key_pem).unwrap();
    let (s, v) = gw.admin("POST", "/v1/reload", None).await;
    assert_eq!(s, 200, "{v}");
    let fresh_new = tls_client(&second.cert_pem, &gw);
    let r = fresh_new
        .get(&url)
        .bearer_auth(&secret)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let fresh_old = tls_client(&first.cert_pem, &gw);
    assert!(
        fresh_old
            .get(&url)
            .bearer_auth(&secret)
            .send()
            .await
            .is_err(),
        "old certificate still served"
    );
    gw.stop().await;
}

/// An https upstream with its own self-signed certificate.
async fn tls_upstream(cert: &Cert) -> std::net::SocketAddr {
    use rustls::pki_types::pem::PemObject;
    let certs =
        vec![rustls::pki_types::CertificateDer::from_pem_slice(cert.cert_pem.as_bytes()).unwrap()];
    let key = rustls::pki_types::PrivateKeyDer::from_pem_slice(cert.key_pem.as_bytes()).unwrap();
    let cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = listener.accept().await else {
                continue;
            };
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(s).await else {
                    return;
                };
                let mut buf = vec![0u8; 4096];
                let _ = tls.read(&mut buf).await;
                let body = "{\"upstream\":\"tls\"}";
                let resp = format!("HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}", body.len());
                let _ = tls.write_all(resp.as_bytes()).await;
                let _ = tls.shutdown().await;
            });
        }
    });
    addr
}

#[tokio::test]
async fn https_upstream_is_verified_against_the_route_ca_file() {
    let b = Backends::start().await;
    let (ca_pem, up_cert) = make_ca_signed();
    let up = tls_upstream(&up_cert).await;
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, &ca_pem).unwrap();
    let mut text = config_text(&b, &dir.path().join("t.db"), "");
    text.push_str(&format!(
        "[[route]]\nprefix = \"/secure/\"\nproduct = \"crm\"\nupstream = \"https://localhost:{}\"\nca_file = \"{}\"\n\
         [[route]]\nprefix = \"/untrusted/\"\nproduct = \"crm\"\nupstream = \"https://localhost:{}\"\n",
        up.port(),
        ca.display(),
        up.port()
    ));
    let gw = TestGateway::start_text(dir, &text).await;
    let secret = setup_token(&gw).await;
    let g = get("127.0.0.1", &gw.url("/secure/x"), Some(&secret)).await;
    assert_eq!(g.status, 200, "{}", g.text);
    assert_eq!(g.body["upstream"], "tls");
    // Without the CA file the certificate is not trusted: 502.
    let g = get("127.0.0.1", &gw.url("/untrusted/x"), Some(&secret)).await;
    assert_error(&g, 502, "upstream_unavailable");
    gw.stop().await;
}

#[tokio::test]
async fn request_head_over_max_header_bytes_gets_431() {
    let b = Backends::start().await;
    let gw = TestGateway::start(&b, "[limits]\nmax_header_bytes = 16384\n").await;
    let secret = setup_token(&gw).await;
    let big = "a".repeat(20_000);
    let req = format!(
        "GET /crm/x HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {secret}\r\nX-Big: {big}\r\n\r\n"
    );
    let out = raw(
        "127.0.0.1",
        gw.public,
        req.as_bytes(),
        Duration::from_secs(2),
    )
    .await;
    assert!(out.starts_with("HTTP/1.1 431"), "{out}");
    assert_eq!(b.total(), 0);
    // Under the limit is fine.
    let ok = format!("GET /crm/x HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {secret}\r\nX-Big: {}\r\nConnection: close\r\n\r\n", "a".repeat(8000));
    let out = raw(
        "127.0.0.1",
        gw.public,
        ok.as_bytes(),
        Duration::from_secs(2),
    )
    .await;
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    gw.stop().await;
}

/// Reads until EOF or `limit`; returns whether the server closed.
async fn closed_by_server(s: &mut tokio::net::TcpStream, limit: Duration) -> (bool, String) {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return (true, String::from_utf8_lossy(&out).into()),
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
            Err(_) => return (false, String::from_utf8_lossy(&out).into()),
        }
    }
}

#[tokio::test]
async fn slowloris_client_is_cut_at_header_read_timeout() {
    let b = Backends::start().await;
    let gw = TestGateway::start(&b, "[limits]\nheader_read_timeout = \"300ms\"\n").await;
    let mut s = connect_from("127.0.0.1", gw.public).await;
    s.write_all(b"GET /crm/x HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    // Trickle one header byte now and then, never finishing the head.
    let mut closed = false;
    for _ in 0..50 {
        if s.write_all(b"X").await.is_err() {
            closed = true;
            break;
        }
        let (c, _) = closed_by_server(&mut s, Duration::from_millis(100)).await;
        if c {
            closed = true;
            break;
        }
    }
    assert!(closed, "connection still open after 5 s of trickling");
    assert_eq!(b.total(), 0);
    gw.stop().await;
}

#[tokio::test]
async fn idle_keep_alive_connection_is_closed_at_idle_timeout() {
    let b = Backends::start().await;
    let gw = TestGateway::start(&b, "[limits]\nidle_timeout = \"300ms\"\n").await;
    let secret = setup_token(&gw).await;
    let mut s = connect_from("127.0.0.1", gw.public).await;
    let req = format!("GET /crm/x HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {secret}\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut buf = [0u8; 4096];
    let n = s.read(&mut buf).await.unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    let (closed, _) = closed_by_server(&mut s, Duration::from_secs(10)).await;
    assert!(closed, "idle connection was not closed");
    gw.stop().await;
}

#[tokio::test]
async fn connections_over_max_connections_wait_in_the_accept_queue() {
    let b = Backends::start().await;
    let gw = TestGateway::start(&b, "[limits]\nmax_connections = 1\n").await;
    let secret = setup_token(&gw).await;
    let req = format!("GET /crm/x HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {secret}\r\n\r\n");
    let mut first = connect_from("127.0.0.1", gw.public).await;
    first.write_all(req.as_bytes()).await.unwrap();
    let mut buf = [0u8; 4096];
    let n = first.read(&mut buf).await.unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    // The first connection stays open: the second is accepted by the
    // kernel but not served yet.
    let mut second = connect_from("127.0.0.1", gw.public).await;
    second.write_all(req.as_bytes()).await.unwrap();
    let waited = tokio::time::timeout(Duration::from_millis(500), second.read(&mut buf)).await;
    assert!(
        waited.is_err(),
        "second connection was served while the first held the only slot"
    );
    drop(first);
    let n = tokio::time::timeout(Duration::from_secs(10), second.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    gw.stop().await;
}

#[tokio::test]
async fn hundred_reloads_under_sustained_load_fail_no_request() {
    let b = Backends::start().await;
    let gw = TestGateway::start(&b, "").await;
    let secret = setup_token(&gw).await;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut workers = Vec::new();
    for _ in 0..4 {
        let url = gw.url("/crm/load");
        let secret = secret.clone();
        let stop = Arc::clone(&stop);
        workers.push(tokio::spawn(async move {
            let client = client_from("127.0.0.1");
            let (mut ok, mut failed) = (0u32, Vec::new());
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                match client.get(&url).bearer_auth(&secret).send().await {
                    Ok(r) if r.status() == 200 => ok += 1,
                    Ok(r) => failed.push(r.status().to_string()),
                    Err(e) => failed.push(e.to_string()),
                }
            }
            (ok, failed)
        }));
    }
    let original = std::fs::read_to_string(&gw.config_path).unwrap();
    for i in 0..100 {
        // Alternate a value that matters to requests (timeouts) and one
        // that does not, so each reload really swaps something.
        let text = original.replace(
            "[admin]",
            &format!("[limits]\nupstream_timeout = \"{}s\"\n[admin]", 10 + i % 3),
        );
        std::fs::write(&gw.config_path, text).unwrap();
        if i % 2 == 0 {
            let (s, v) = gw.admin("POST", "/v1/reload", None).await;
            assert_eq!(s, 200, "{v}");
            assert_eq!(v["reloaded"], true, "{v}");
            assert_eq!(v["restart_needed"], json!([]), "{v}");
        } else {
            gw.gateway().reload().unwrap();
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut total = 0;
    for w in workers {
        let (ok, failed) = w.await.unwrap();
        assert!(
            failed.is_empty(),
            "failed requests during reloads: {failed:?}"
        );
        total += ok;
    }
    assert!(total > 0);
    let metrics = gw.metrics().await;
    assert!(
        metrics.contains("tollgate_config_reloads_total{result=\"ok\"} 100"),
        "{metrics}"
    );
    gw.stop().await;
}

#[tokio::test]
async fn invalid_reload_is_refused_whole_and_the_running_config_stays() {
    let b = Backends::start().await;
    let gw = TestGateway::start(&b, "").await;
    let secret = setup_token(&gw).await;
    let original = std::fs::read_to_string(&gw.config_path).unwrap();
    // A valid change (route /crm/ removed) plus a bad value: nothing applies.
    let broken = original
        .replace("prefix = \"/crm/\"", "prefix = \"/crm2/\"")
        .replace("[admin]", "[limits]\nidle_timeout = \"soon\"\n[admin]");
    std::fs::write(&gw.config_path, broken).unwrap();
    let (s, v) = gw.admin("POST", "/v1/reload", None).await;
    assert_eq!(s, 422, "{v}");
    assert_eq!(v["error"]["code"], "invalid_config");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("limits.idle_timeout"),
        "{v}"
    );
    let g = get("127.0.0.1", &gw.url("/crm/x"), Some(&secret)).await;
    assert_eq!(g.status, 200);
    let metrics = gw.metrics().await;
    assert!(
        metrics.contains("tollgate_config_reloads_total{result=\"error\"} 1"),
        "{metrics}"
    );
    // Unknown keys are refused too.
    std::fs::write(
        &gw.config_path,
        format!("{original}\n[limits]\nidle_timout = \"1s\"\n"),
    )
    .unwrap();
    let (s, _) = gw.admin("POST", "/v1/reload", None).await;
    assert_eq!(s, 422);
    // A listener change is reported as needing a restart, not half-applied.
    std::fs::write(
        &gw.config_path,
        original.replace("admin = \"127.0.0.1:0\"", "admin = \"127.0.0.1:1\""),
    )
    .unwrap();
    let (s, v) = gw.admin("POST", "/v1/reload", None).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["reloaded"], true, "{v}");
    assert_eq!(v["restart_needed"], json!(["listen.admin"]));
    let (s, _) = gw.admin("GET", "/v1/tenants", None).await;
    assert_eq!(s, 200, "admin listener must stay where it is");
    gw.stop().await;
}

#[tokio::test]
async fn a_dead_upstream_in_a_pool_fails_no_request() {
    let b = Backends::start().await;
    let dead = format!("http://127.0.0.1:{}", free_port());
    let dir = tempfile::tempdir().unwrap();
    let text = config_text(&b, &dir.path().join("t.db"), "").replace(
        &format!("upstream = \"{}\"", b.crm.url()),
        &format!("upstream = [\"{dead}\", \"{}\"]", b.crm.url()),
    );
    let gw = TestGateway::start_text(dir, &text).await;
    let secret = setup_token(&gw).await;
    for _ in 0..20 {
        let g = get("127.0.0.1", &gw.url("/crm/x"), Some(&secret)).await;
        assert_eq!(g.status, 200, "{}", g.text);
    }
    assert_eq!(b.crm.count(), 20);
    let metrics = gw.metrics().await;
    assert!(
        metrics.contains("tollgate_upstream_errors_total{route=\"/crm/\",kind=\"connect\"} 1"),
        "{metrics}"
    );
    gw.stop().await;
}

/// Starts the real binary on `config` and waits for its listening line.
async fn spawn_binary(
    config: &std::path::Path,
) -> (
    tokio::process::Child,
    tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStdout>>,
    serde_json::Value,
) {
    let mut child = tokio::process::Command::new(bin())
        .args(["run", "--config"])
        .arg(config)
        .env_remove("RUST_LOG")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let listening = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            let line = lines
                .next_line()
                .await
                .unwrap()
                .expect("exited before listening");
            let v: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
            if v["message"] == "listening" {
                return v;
            }
        }
    })
    .await
    .unwrap();
    (child, lines, listening)
}

fn binary_config(b: &Backends, dir: &std::path::Path, extra: &str) -> std::path::PathBuf {
    let text = config_text(b, &dir.join("t.db"), extra)
        .replace(
            "public = \"127.0.0.1:0\"",
            &format!("public = \"127.0.0.1:{}\"", free_port()),
        )
        .replace(
            "admin = \"127.0.0.1:0\"",
            &format!("admin = \"127.0.0.1:{}\"", free_port()),
        );
    let path = dir.join("gateway.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// The binary's listeners from its `listening` line, with tenant `acme`
/// (crm) and a token for 127.0.0.1 created through its admin API:
/// `(admin, public, secret, token_id)`.
async fn binary_with_token(
    listening: &serde_json::Value,
) -> (std::net::SocketAddr, std::net::SocketAddr, String, String) {
    let addr =
        |k: &str| -> std::net::SocketAddr { listening[k].as_str().unwrap().parse().unwrap() };
    let (admin, public) = (addr("admin"), addr("public"));
    let (s, _) = admin_call(
        admin,
        "POST",
        "/v1/tenants",
        Some(json!({"id": "acme", "products": ["crm"]})),
        Some(ADMIN_KEY),
    )
    .await;
    assert_eq!(s, 201);
    let (s, v) = admin_call(
        admin,
        "POST",
        "/v1/tenants/acme/tokens",
        Some(json!({"ip_allowlist": ["127.0.0.1"]})),
        Some(ADMIN_KEY),
    )
    .await;
    assert_eq!(s, 201);
    let secret = v["token"].as_str().unwrap().to_string();
    let token_id = v["id"].as_str().unwrap().to_string();
    (admin, public, secret, token_id)
}

/// Runs the binary with an upstream that answers after `delay`, sends one
/// request, sends `signal` once the upstream has it, and returns the
/// request's status (`None` if its connection broke) and the exit code.
async fn signal_during_a_slow_request(
    signal: &str,
    delay: Duration,
    extra: &str,
) -> (Option<u16>, Option<i32>) {
    let slow = Upstream::start_with_delay("crm", delay).await;
    let b = Backends {
        crm: slow,
        messaging: Upstream::start("messaging").await,
        marketing: Upstream::start("marketing").await,
    };
    let dir = tempfile::tempdir().unwrap();
    let config = binary_config(&b, dir.path(), extra);
    let (mut child, _lines, listening) = spawn_binary(&config).await;
    let (_, public, secret, _) = binary_with_token(&listening).await;
    let url = format!("http://{public}/crm/slow");
    let in_flight = tokio::spawn(async move {
        let resp = client_from("127.0.0.1")
            .get(&url)
            .bearer_auth(&secret)
            .send()
            .await
            .ok()?;
        let status = resp.status().as_u16();
        resp.bytes().await.ok()?;
        Some(status)
    });
    // Wait until the upstream has the request, then send the signal.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while b.crm.count() == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "request never reached the upstream"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    self::signal(&child, signal);
    // Bounds a hang only: with the contract's limits the process is gone
    // long before this.
    let status = tokio::time::timeout(Duration::from_secs(20), child.wait())
        .await
        .expect("the gateway did not exit")
        .unwrap();
    (in_flight.await.unwrap(), status.code())
}

#[tokio::test]
async fn sigterm_lets_the_request_in_flight_finish_then_exits_0() {
    let got = signal_during_a_slow_request("TERM", Duration::from_millis(1500), "").await;
    assert_eq!(got, (Some(200), Some(0)));
}

#[tokio::test]
async fn sigint_drains_like_sigterm() {
    let got = signal_during_a_slow_request("INT", Duration::from_millis(1500), "").await;
    assert_eq!(got, (Some(200), Some(0)));
}

#[tokio::test]
async fn shutdown_timeout_bounds_the_wait_for_a_request_in_flight() {
    // The upstream would answer after 60 s; the drain gives up at 500 ms,
    // the process exits 0 and the unfinished exchange is cut.
    let got = signal_during_a_slow_request(
        "TERM",
        Duration::from_secs(60),
        "[limits]\nshutdown_timeout = \"500ms\"\n",
    )
    .await;
    assert_eq!(got, (None, Some(0)));
}

#[tokio::test]
async fn access_log_is_one_json_line_per_request_without_secrets() {
    let b = Backends::start().await;
    let dir = tempfile::tempdir().unwrap();
    let config = binary_config(&b, dir.path(), "");
    let (mut child, mut lines, listening) = spawn_binary(&config).await;
    assert!(listening["public"].is_string() && listening["admin"].is_string());
    let (_, public, secret, token_id) = binary_with_token(&listening).await;
    let g = get(
        "127.0.0.1",
        &format!("http://{public}/crm/v1/x?q=1"),
        Some(&secret),
    )
    .await;
    assert_eq!(g.status, 200);
    let g = get(
        "127.0.0.2",
        &format!("http://{public}/crm/v1/x"),
        Some(&secret),
    )
    .await;
    assert_eq!(g.status, 403);
    let mut access = Vec::new();
    let mut all = String::new();
    tokio::time::timeout(Duration::from_secs(10), async {
        while access.len() < 2 {
            let line = lines.next_line().await.unwrap().unwrap();
            all.push_str(&line);
            let v: serde_json::Value = serde_json::from_str(&line).unwrap();
            if v["target"] == "access" {
                access.push(v);
            }
        }
    })
    .await
    .unwrap();
    let _ = child.kill().await;
    assert!(!all.contains(&secret), "a token secret reached the log");
    // Each worker hands its lines to the writer in batches, so lines of
    // requests served by different workers need not come in request order.
    access.sort_by_key(|v| v["status"].as_u64());
    let a = &access[0];
    for field in [
        "ts",
        "request_id",
        "client_ip",
        "method",
        "path",
        "route",
        "status",
        "outcome",
        "tenant",
        "token_id",
        "duration_ms",
        "upstream_ms",
    ] {
        assert!(!a[field].is_null(), "access log lacks {field}: {a}");
    }
    assert_eq!(a["status"], 200);
    assert_eq!(a["outcome"], "forwarded");
    assert_eq!(a["tenant"], "acme");
    assert_eq!(a["token_id"], token_id.as_str());
    assert_eq!(a["path"], "/crm/v1/x");
    assert_eq!(a["route"], "/crm/");
    assert_eq!(access[1]["outcome"], "ip_not_allowed");
    assert_eq!(access[1]["client_ip"], "127.0.0.2");
    assert_eq!(access[1]["status"], 403);
}

#[tokio::test]
async fn upstream_that_never_completes_the_connect_gets_502_at_connect_timeout() {
    // A listener that never accepts, with its backlog filled: the kernel
    // drops further SYNs, so a connect hangs until the gateway gives up.
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let blackhole = sock.listen(1).unwrap();
    let addr = blackhole.local_addr().unwrap();
    let mut fillers = Vec::new();
    for _ in 0..4 {
        let s = tokio::net::TcpSocket::new_v4().unwrap();
        if let Ok(Ok(c)) = tokio::time::timeout(Duration::from_millis(200), s.connect(addr)).await {
            fillers.push(c);
        }
    }
    let b = Backends::start().await;
    let dir = tempfile::tempdir().unwrap();
    let text = config_text(
        &b,
        &dir.path().join("t.db"),
        "[limits]\nupstream_connect_timeout = \"200ms\"\nupstream_timeout = \"20s\"\n",
    )
    .replace(&b.crm.url(), &format!("http://{addr}"));
    let gw = TestGateway::start_text(dir, &text).await;
    let secret = setup_token(&gw).await;
    let g = get("127.0.0.1", &gw.url("/crm/x"), Some(&secret)).await;
    assert_error(&g, 502, "upstream_unavailable");
    let metrics = gw.metrics().await;
    assert!(
        metrics.contains("tollgate_upstream_errors_total{route=\"/crm/\",kind=\"connect\"} 1"),
        "{metrics}"
    );
    drop(fillers);
    drop(blackhole);
    gw.stop().await;
}

/// Runs the binary with `extra` config and `rust_log`, makes one allowed
/// request, and returns every stdout line up to and including the first
/// line that mentions the request's path (or all lines after 3 s).
async fn log_lines(extra: &str, rust_log: Option<&str>) -> Vec<String> {
    let b = Backends::start().await;
    let dir = tempfile::tempdir().unwrap();
    let config = binary_config(&b, dir.path(), extra);
    let mut cmd = tokio::process::Command::new(bin());
    cmd.args(["run", "--config"])
        .arg(&config)
        .env_remove("RUST_LOG")
        .stdout(Stdio::piped())
        .kill_on_drop(true);
    if let Some(l) = rust_log {
        cmd.env("RUST_LOG", l);
    }
    let mut child = cmd.spawn().unwrap();
    let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let text = std::fs::read_to_string(&config).unwrap();
    let port = |key: &str| -> u16 {
        let line = text.lines().find(|l| l.starts_with(key)).unwrap();
        line.rsplit(':')
            .next()
            .unwrap()
            .trim_end_matches('"')
            .parse()
            .unwrap()
    };
    let (public, admin) = (port("public"), port("admin"));
    let admin: std::net::SocketAddr = ([127, 0, 0, 1], admin).into();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while tokio::net::TcpStream::connect(admin).await.is_err() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "gateway never listened"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    admin_call(
        admin,
        "POST",
        "/v1/tenants",
        Some(json!({"id": "acme", "products": ["crm"]})),
        Some(ADMIN_KEY),
    )
    .await;
    let (_, v) = admin_call(
        admin,
        "POST",
        "/v1/tenants/acme/tokens",
        Some(json!({"ip_allowlist": ["127.0.0.1"]})),
        Some(ADMIN_KEY),
    )
    .await;
    let secret = v["token"].as_str().unwrap().to_string();
    let g = get(
        "127.0.0.1",
        &format!("http://127.0.0.1:{public}/crm/log-probe"),
        Some(&secret),
    )
    .await;
    assert_eq!(g.status, 200);
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(3), async {
        while let Ok(Some(line)) = lines.next_line().await {
            let done = line.contains("/crm/log-probe");
            out.push(line);
            if done {
                break;
            }
        }
    })
    .await;
    let _ = child.kill().await;
    assert!(
        out.iter().all(|l| !l.contains(&secret)),
        "a secret reached the log"
    );
    out
}

#[tokio::test]
async fn text_log_format_writes_key_value_lines() {
    let lines = log_lines("[log]\nformat = \"text\"\n", None).await;
    assert!(
        lines
            .iter()
            .any(|l| l.contains("listening public=127.0.0.1:") && l.contains(" admin=127.0.0.1:")),
        "{lines:?}"
    );
    let access = lines
        .iter()
        .find(|l| l.contains("/crm/log-probe"))
        .expect("no access line");
    assert!(
        serde_json::from_str::<serde_json::Value>(access).is_err(),
        "text format wrote JSON: {access}"
    );
    for field in [
        "request_id=",
        "client_ip=127.0.0.1",
        "status=200",
        "outcome=\"forwarded\"",
        "tenant=\"acme\"",
        "token_id=\"tok_",
    ] {
        assert!(access.contains(field), "{field} missing in {access}");
    }
}

#[tokio::test]
async fn log_level_from_config_hides_access_lines_and_rust_log_wins() {
    let quiet = log_lines("[log]\nlevel = \"warn\"\n", None).await;
    assert!(
        quiet.iter().all(|l| !l.contains("/crm/log-probe")),
        "{quiet:?}"
    );
    // The start-up line is part of the command-line contract: it is written
    // whatever the level.
    assert!(
        quiet
            .iter()
            .any(|l| l.contains("\"listening\"") && l.contains("\"public\"")),
        "{quiet:?}"
    );
    let loud = log_lines("[log]\nlevel = \"warn\"\n", Some("info")).await;
    assert!(
        loud.iter().any(|l| l.contains("/crm/log-probe")),
        "RUST_LOG=info did not win: {loud:?}"
    );
}

/// The data-plane workers run on threads of their own. A gateway whose
/// runtime goes away (a test ending, an embedding application shutting its
/// runtime down) must not leave them accepting.
#[test]
fn workers_stop_when_the_runtime_that_started_the_gateway_is_dropped() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let public = rt.block_on(async {
        let b = Backends::start().await;
        let gw = TestGateway::start(&b, "").await;
        let g = get("127.0.0.1", &gw.url("/crm/v1/contacts"), None).await;
        assert_error(&g, 401, "missing_token");
        gw.public
    });
    assert!(std::net::TcpStream::connect(public).is_ok());
    drop(rt);
    for _ in 0..100 {
        if std::net::TcpStream::connect(public).is_err() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("{public} still accepts connections after its runtime was dropped");
}

/// Sends `signal` (a `kill` name such as `HUP`) to `child`.
fn signal(child: &tokio::process::Child, signal: &str) {
    let pid = child.id().unwrap().to_string();
    assert!(std::process::Command::new("kill")
        .args([&format!("-{signal}"), &pid])
        .status()
        .unwrap()
        .success());
}

/// Reads JSON log lines until one satisfies `want`; returns it.
async fn wait_for_line(
    lines: &mut tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStdout>>,
    want: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let line = lines.next_line().await.unwrap().expect("exited");
            let v: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
            if want(&v) {
                return v;
            }
        }
    })
    .await
    .expect("log line never came")
}

#[tokio::test]
async fn sighup_applies_a_valid_file_and_refuses_an_invalid_one_naming_key_and_line() {
    let b = Backends::start().await;
    let dir = tempfile::tempdir().unwrap();
    let config = binary_config(&b, dir.path(), "");
    let (child, mut lines, listening) = spawn_binary(&config).await;
    let (admin, public, secret, _) = binary_with_token(&listening).await;
    let xff_get = |path: &str| {
        let url = format!("http://{public}{path}");
        let secret = secret.clone();
        async move {
            let r = client_from("127.0.0.1")
                .get(url)
                .bearer_auth(secret)
                .header("x-forwarded-for", "127.0.0.9")
                .send()
                .await
                .unwrap();
            let status = r.status().as_u16();
            let body: serde_json::Value = r.json().await.unwrap_or_default();
            (
                status,
                body["error"]["code"].as_str().unwrap_or("").to_string(),
            )
        }
    };
    assert_eq!(xff_get("/crm/x").await, (200, String::new()));

    // A valid file: the route moves, 127.0.0.1 becomes a trusted proxy (so
    // its X-Forwarded-For is believed), and the admin key changes.
    let original = std::fs::read_to_string(&config).unwrap();
    let second_key = "a-second-admin-key";
    let changed = original
        .replace("prefix = \"/crm/\"", "prefix = \"/crm2/\"")
        .replace(
            &blake3::hash(ADMIN_KEY.as_bytes()).to_hex().to_string(),
            blake3::hash(second_key.as_bytes()).to_hex().as_str(),
        )
        .replace(
            "[admin]",
            "[client_ip]\ntrusted_proxies = [\"127.0.0.1/32\"]\n[admin]",
        );
    std::fs::write(&config, changed).unwrap();
    signal(&child, "HUP");
    wait_for_line(&mut lines, |v| v["message"] == "config reloaded").await;
    assert_eq!(xff_get("/crm/x").await, (404, "no_route".to_string()));
    assert_eq!(
        xff_get("/crm2/x").await,
        (403, "ip_not_allowed".to_string()),
        "the client IP is now the X-Forwarded-For address"
    );
    let (s, _) = admin_call(admin, "GET", "/v1/tenants", None, Some(ADMIN_KEY)).await;
    assert_eq!(s, 401, "the old admin key is gone");
    let (s, _) = admin_call(admin, "GET", "/v1/tenants", None, Some(second_key)).await;
    assert_eq!(s, 200);

    // An invalid file: refused whole, logged with its key and line; the
    // running config stays.
    std::fs::write(
        &config,
        original.replace("[admin]", "[limits]\nidle_timeout = \"soon\"\n[admin]"),
    )
    .unwrap();
    signal(&child, "HUP");
    let refused = wait_for_line(&mut lines, |v| {
        v["message"]
            .as_str()
            .is_some_and(|m| m.contains("reload refused"))
    })
    .await;
    assert_eq!(refused["key"], "limits.idle_timeout", "{refused}");
    let line = refused["line"].as_u64().expect("line number");
    let text = std::fs::read_to_string(&config).unwrap();
    assert!(
        text.lines()
            .nth(line as usize - 1)
            .is_some_and(|l| l.contains("idle_timeout")),
        "line {line} of the file is not the bad key: {refused}"
    );
    assert_eq!(
        xff_get("/crm2/x").await,
        (403, "ip_not_allowed".to_string())
    );
    let (s, _) = admin_call(admin, "GET", "/v1/tenants", None, Some(second_key)).await;
    assert_eq!(s, 200);
    let metrics = reqwest::get(format!("http://{admin}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("tollgate_config_reloads_total{result=\"ok\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("tollgate_config_reloads_total{result=\"error\"} 1"),
        "{metrics}"
    );
    drop(child);
}

/// The value of an unlabelled sample; panics naming it when absent.
fn sample(metrics: &str, name: &str) -> f64 {
    metric_value(metrics, name).unwrap_or_else(|| panic!("{name} missing from\n{metrics}"))
}

#[tokio::test]
async fn request_duration_covers_the_response_body_not_just_its_head() {
    // An upstream that sends its response head at once and the body 400 ms
    // later, the way a slow download or a long stream does.
    let (addr, _) = raw_upstream(vec![
        (
            Duration::ZERO,
            b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n",
        ),
        (Duration::from_millis(400), b"hello"),
    ])
    .await;
    let (gw, secret) = gateway_to(addr).await;
    let g = get("127.0.0.1", &gw.url("/crm/slow-body"), Some(&secret)).await;
    assert_eq!(g.status, 200);
    assert_eq!(g.text, "hello");
    // The request is logged when its body is done, which is before or
    // about when the client has read it; wait for the count, not a time.
    let mut metrics = gw.metrics().await;
    for _ in 0..100 {
        if sample(&metrics, "tollgate_request_duration_seconds_count") >= 1.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        metrics = gw.metrics().await;
    }
    assert_eq!(
        sample(&metrics, "tollgate_request_duration_seconds_count"),
        1.0
    );
    // The whole request cannot have taken less than the body's 400 ms.
    assert!(
        sample(&metrics, "tollgate_request_duration_seconds_sum") >= 0.4,
        "{metrics}"
    );
    gw.stop().await;
}

#[tokio::test]
async fn a_new_token_prefix_at_reload_names_new_tokens_and_locks_no_one_out() {
    let b = Backends::start().await;
    let gw = TestGateway::start(&b, "").await;
    gw.tenant("acme", &["crm"], 2).await;
    let (_, before) = gw.token("acme", &["127.0.0.1"]).await;
    assert!(before.starts_with("tg_"));
    let text = std::fs::read_to_string(&gw.config_path).unwrap().replacen(
        "[[route]]",
        "[tokens]\nprefix = \"new_\"\n[[route]]",
        1,
    );
    std::fs::write(&gw.config_path, text).unwrap();
    let (s, v) = gw.admin("POST", "/v1/reload", None).await;
    assert_eq!(s, 200, "{v}");
    let (_, after) = gw.token("acme", &["127.0.0.1"]).await;
    assert!(after.starts_with("new_"), "{after}");
    for secret in [&before, &after] {
        let g = get("127.0.0.1", &gw.url("/crm/v1/x"), Some(secret)).await;
        assert_eq!(g.status, 200, "{}", g.text);
    }
    gw.stop().await;
}

/// A raw upstream for exchanges hyper would not produce: on each
/// connection it reads one request head, writes `parts` (each after its
/// delay), then closes the connection. Counts the connections it accepted.
async fn raw_upstream(
    parts: Vec<(Duration, &'static [u8])>,
) -> (std::net::SocketAddr, Arc<std::sync::atomic::AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = Arc::clone(&accepted);
    let parts = Arc::new(parts);
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let parts = Arc::clone(&parts);
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 4096];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                for (delay, bytes) in parts.iter() {
                    tokio::time::sleep(*delay).await;
                    if s.write_all(bytes).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (addr, accepted)
}

#[tokio::test]
async fn upstream_connections_are_kept_alive_and_reused() {
    let up = Upstream::start("crm").await;
    let b = Backends {
        crm: up,
        messaging: Upstream::start("messaging").await,
        marketing: Upstream::start("marketing").await,
    };
    let gw = TestGateway::start(&b, "").await;
    let secret = setup_token(&gw).await;
    let client = client_from("127.0.0.1");
    for _ in 0..20 {
        let r = client
            .get(gw.url("/crm/v1/x"))
            .bearer_auth(&secret)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        r.bytes().await.unwrap();
    }
    // Counted from the upstream's side: how many connections it accepted.
    let conns: std::collections::HashSet<_> = b.crm.seen().iter().map(|s| s.conn).collect();
    assert_eq!(
        conns.len(),
        1,
        "20 sequential requests, one upstream connection"
    );
    gw.stop().await;
}

#[tokio::test]
async fn an_upstream_closing_an_idle_connection_fails_no_request() {
    // A keep-alive response, then the connection closed 50 ms later.
    let (addr, accepted) = raw_upstream(vec![
        (
            Duration::ZERO,
            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok",
        ),
        (Duration::from_millis(50), b""),
    ])
    .await;
    let (gw, secret) = gateway_to(addr).await;
    for _ in 0..5 {
        let g = get("127.0.0.1", &gw.url("/crm/v1/x"), Some(&secret)).await;
        assert_eq!(g.status, 200, "{}", g.text);
        assert_eq!(g.text, "ok");
        // Long enough for the upstream's close to arrive before the next.
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 5);
    gw.stop().await;
}

/// A gateway whose CRM route goes to `addr`, with a token for it.
async fn gateway_to(addr: std::net::SocketAddr) -> (TestGateway, String) {
    let b = Backends::start().await;
    let dir = tempfile::tempdir().unwrap();
    let text = config_text(&b, &dir.path().join("t.db"), "")
        .replace(&b.crm.url(), &format!("http://{addr}"));
    let gw = TestGateway::start_text(dir, &text).await;
    let secret = setup_token(&gw).await;
    (gw, secret)
}

#[tokio::test]
async fn responses_that_close_their_connection_are_forwarded_whole() {
    // `Connection: close` with a length, and a body delimited by the close.
    for response in [
        &b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 5\r\n\r\nhello"[..],
        &b"HTTP/1.1 200 OK\r\n\r\nhello"[..],
    ] {
        let (addr, accepted) = raw_upstream(vec![(Duration::ZERO, response)]).await;
        let (gw, secret) = gateway_to(addr).await;
        for _ in 0..3 {
            let g = get("127.0.0.1", &gw.url("/crm/v1/x"), Some(&secret)).await;
            assert_eq!(g.status, 200);
            assert_eq!(g.text, "hello");
        }
        // Each answer ended its connection: none was reused.
        assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 3);
        gw.stop().await;
    }
}

#[tokio::test]
async fn an_upstream_answering_garbage_is_502_upstream_unavailable() {
    let (addr, _) = raw_upstream(vec![(Duration::ZERO, b"SSH-2.0-OpenSSH\r\n\r\n")]).await;
    let (gw, secret) = gateway_to(addr).await;
    let g = get("127.0.0.1", &gw.url("/crm/v1/x"), Some(&secret)).await;
    assert_error(&g, 502, "upstream_unavailable");
    let metrics = gw.metrics().await;
    assert!(
        metrics.contains("tollgate_upstream_errors_total{route=\"/crm/\",kind=\"protocol\"} 1"),
        "{metrics}"
    );
    gw.stop().await;
}
