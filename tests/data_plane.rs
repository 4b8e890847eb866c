//! The data plane against the contract (section 4): every row of the check
//! table with its status, `error.code`, JSON body and `WWW-Authenticate`, the
//! order of the checks, client IPs (127.x sources, trusted proxies,
//! IPv4-mapped peers), path normalization, forwarding, upstream failures,
//! HTTP/2, streamed uploads, request smuggling and oversized heads.

mod support;

use std::time::Duration;

use serde_json::json;
use support::*;

/// How long a raw socket waits for more bytes once the server went quiet.
/// Every raw exchange ends with the server closing (`Connection: close` or
/// an error), so this only bounds a hang.
const RAW_WAIT: Duration = Duration::from_secs(3);

/// A gateway with the standard config plus `extra`, tenant `acme` with
/// `products`, and one token allowed from `allow`.
async fn setup(
    extra: &str,
    products: &[&str],
    allow: &[&str],
) -> (Backends, TestGateway, String, String) {
    let b = Backends::start().await;
    let gw = TestGateway::start(&b, extra).await;
    gw.tenant("acme", products, 5).await;
    let (id, secret) = gw.token("acme", allow).await;
    (b, gw, id, secret)
}

/// A raw HTTP/1.1 answer: status, head (lower-cased) and body.
struct RawAnswer {
    status: u16,
    head: String,
    body: String,
    all: String,
}

fn parse_raw(all: String) -> RawAnswer {
    let status = all
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let (head, body) = all.split_once("\r\n\r\n").unwrap_or((&all, ""));
    RawAnswer {
        status,
        head: head.to_ascii_lowercase(),
        body: body.to_string(),
        all: all.clone(),
    }
}

/// Sends one request with a raw request target (so nothing normalizes the
/// path on the way) and `Connection: close`.
async fn raw_get(gw: &TestGateway, target: &str, token: Option<&str>) -> RawAnswer {
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let req = format!("GET {target} HTTP/1.1\r\nHost: gw\r\n{auth}Connection: close\r\n\r\n");
    parse_raw(raw("127.0.0.1", gw.public, req.as_bytes(), RAW_WAIT).await)
}

fn assert_raw_error(a: &RawAnswer, status: u16, code: &str) {
    assert_eq!(a.status, status, "{}", a.all);
    assert!(
        a.head.contains("content-type: application/json"),
        "{}",
        a.all
    );
    let v: serde_json::Value =
        serde_json::from_str(&a.body).unwrap_or_else(|_| panic!("{}", a.all));
    assert_eq!(v["error"]["code"], code, "{}", a.all);
}

fn message(g: &Got) -> &str {
    g.body["error"]["message"].as_str().unwrap()
}

// ---- row 0: bad path ------------------------------------------------------

#[tokio::test]
async fn encoded_separators_and_dot_segments_are_400_and_never_forwarded() {
    let (b, gw, _, secret) = setup("", &["crm", "messaging", "marketing"], &["127.0.0.1"]).await;
    for target in [
        "/crm/a%2Fb",
        "/crm/a%2fb",
        "/crm/..%2Fmarketing/x",
        "/crm/a%5Cb",
        "/crm/%5c",
        "/crm/%2E%2E/marketing/x",
        "/crm/%2e%2e/marketing/x",
        "/crm/.%2E/marketing/x",
        "/crm/%2E/x",
        "/crm/%zz",
    ] {
        let a = raw_get(&gw, target, Some(&secret)).await;
        assert_raw_error(&a, 400, "bad_request");
    }
    assert_eq!(b.total(), 0, "a refused path reached an upstream");
    gw.stop().await;
}

#[tokio::test]
async fn a_bad_path_is_refused_before_routing_and_before_the_token_check() {
    let (b, gw, _, _) = setup("", &["crm"], &["127.0.0.1"]).await;
    // No route would match and no token is sent: row 0 still answers first.
    let a = raw_get(&gw, "/nowhere/%2F", None).await;
    assert_raw_error(&a, 400, "bad_request");
    let a = raw_get(&gw, "/crm/%2E%2E/x", None).await;
    assert_raw_error(&a, 400, "bad_request");
    assert_eq!(b.total(), 0);
    gw.stop().await;
}

// ---- row 1: no route ------------------------------------------------------

#[tokio::test]
async fn unknown_path_is_404_no_route_even_without_a_token() {
    let (b, gw, _, secret) = setup("", &["crm"], &["127.0.0.1"]).await;
    for path in ["/", "/crm", "/billing/v1/x", "/CRM/v1/x"] {
        let g = get("127.0.0.1", &gw.url(path), None).await;
        assert_error(&g, 404, "no_route");
        assert!(!g.headers.contains_key("www-authenticate"));
        // A token (valid or not) does not change the answer.
        let g = get("127.0.0.1", &gw.url(path), Some(&secret)).await;
        assert_error(&g, 404, "no_route");
        let g = get("127.0.0.1", &gw.url(path), Some("garbage")).await;
        assert_error(&g, 404, "no_route");
    }
    assert_eq!(b.total(), 0);
    gw.stop().await;
}

// ---- row 2: missing token -------------------------------------------------

#[tokio::test]
async fn missing_token_is_401_with_a_bearer_challenge() {
    let (b, gw, _, secret) = setup("", &["crm"], &["127.0.0.1"]).await;
    let g = get("127.0.0.1", &gw.url("/crm/v1/contacts"), None).await;
    assert_error(&g, 401, "missing_token");
    assert_eq!(g.headers["www-authenticate"], "Bearer realm=\"tollgate\"");

    // Another scheme, or a bare "Bearer", is no bearer token.
    let client = client_from("127.0.0.1");
    for value in [
        format!("Basic {secret}"),
        "Bearer".to_string(),
        "Bearer ".to_string(),
        secret.clone(),
    ] {
        let g = send(
            client
                .get(gw.url("/crm/v1/contacts"))
                .header("authorization", value.as_str()),
        )
        .await;
        assert_error(&g, 401, "missing_token");
        assert_eq!(g.headers["www-authenticate"], "Bearer realm=\"tollgate\"");
        assert!(!g.text.contains(&secret));
    }
    assert_eq!(b.total(), 0);
    gw.stop().await;
}

#[tokio::test]
async fn the_bearer_scheme_is_case_insensitive() {
    let (b, gw, _, secret) = setup("", &["crm"], &["127.0.0.1"]).await;
    let client = client_from("127.0.0.1");
    for scheme in ["Bearer", "bearer", "BEARER", "bEaReR"] {
        let g = send(
            client
                .get(gw.url("/crm/v1/contacts"))
                .header("authorization", format!("{scheme} {secret}")),
        )
        .await;
        assert_eq!(g.status, 200, "{scheme}: {}", g.text);
    }
    assert_eq!(b.crm.count(), 4);
    gw.stop().await;
}

// ---- row 3: invalid token -------------------------------------------------

fn assert_invalid_token(g: &Got) {
    assert_error(g, 401, "invalid_token");
    assert_eq!(
        g.headers["www-authenticate"],
        "Bearer realm=\"tollgate\", error=\"invalid_token\""
    );
}

#[tokio::test]
async fn malformed_and_unknown_tokens_are_401_invalid_token() {
    let (b, gw, _, secret) = setup("", &["crm"], &["127.0.0.1"]).await;
    // Never issued by this gateway, but well-formed (prefix, length, checksum).
    let unknown = tollgate::auth::TokenFormat::new("tg_").generate();
    // Right shape, last checksum character changed.
    let mut bad_sum = secret.clone();
    let last = bad_sum.pop().unwrap();
    bad_sum.push(if last == 'A' { 'B' } else { 'A' });
    let truncated = &secret[..secret.len() - 1];
    let other_prefix = format!("xx_{}", &secret[3..]);
    for t in [
        "garbage",
        "tg_",
        unknown.as_str(),
        bad_sum.as_str(),
        truncated,
        other_prefix.as_str(),
    ] {
        let g = get("127.0.0.1", &gw.url("/crm/v1/contacts"), Some(t)).await;
        assert_invalid_token(&g);
        assert!(!g.text.contains(t), "the answer echoes the token");
    }
    assert_eq!(b.total(), 0);
    gw.stop().await;
}

#[tokio::test]
async fn revoked_token_is_refused_at_once() {
    let (b, gw, id, secret) = setup("", &["crm"], &["127.0.0.1"]).await;
    let g = get("127.0.0.1", &gw.url("/crm/x"), Some(&secret)).await;
    assert_eq!(g.status, 200);
    let (s, _) = gw.admin("DELETE", &format!("/v1/tokens/{id}"), None).await;
    assert_eq!(s, 204);
    let g = get("127.0.0.1", &gw.url("/crm/x"), Some(&secret)).await;
    assert_invalid_token(&g);
    assert_eq!(b.crm.count(), 1);
    gw.stop().await;
}

#[tokio::test]
async fn disabled_token_is_refused_and_works_again_when_enabled() {
    let (b, gw, id, secret) = setup("", &["crm"], &["127.0.0.1"]).await;
    let path = format!("/v1/tokens/{id}");
    let (s, v) = gw
        .admin("PATCH", &path, Some(json!({"disabled": true})))
        .await;
    assert_eq!(s, 200, "{v}");
    let g = get("127.0.0.1", &gw.url("/crm/x"), Some(&secret)).await;
    assert_invalid_token(&g);
    let (s, _) = gw
        .admin("PATCH", &path, Some(json!({"disabled": false})))
        .await;
    assert_eq!(s, 200);
    let g = get("127.0.0.1", &gw.url("/crm/x"), Some(&secret)).await;
    assert_eq!(g.status, 200, "{}", g.text);
    assert_eq!(b.crm.count(), 1);
    gw.stop().await;
}

#[tokio::test]
async fn expired_token_is_refused() {
    let b = Backends::start().await;
    let gw = TestGateway::start(&b, "").await;
    gw.tenant("acme", &["crm"], 1).await;
    let soon = time::OffsetDateTime::now_utc() + time::Duration::seconds(1);
    let soon = soon
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap();
    let (s, v) = gw
        .admin(
            "POST",
            "/v1/tenants/acme/tokens",
            Some(json!({"ip_allowlist": ["127.0.0.1"], "expires_at": soon})),
        )
        .await;
    assert_eq!(s, 201, "{v}");
    let secret = v["token"].as_str().unwrap().to_string();
    let id = v["id"].as_str().unwrap().to_string();
    // Poll until the expiry passes (whole seconds), then it stays refused.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let g = get("127.0.0.1", &gw.url("/crm/x"), Some(&secret)).await;
        if g.status == 401 {
            assert_invalid_token(&g);
            break;
        }
        assert_eq!(g.status, 200, "{}", g.text);
        assert!(std::time::Instant::now() < deadline, "token never expired");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (_, v) = gw.admin("GET", &format!("/v1/tokens/{id}"), None).await;
    assert_eq!(v["status"], "expired");
    gw.stop().await;
}

#[tokio::test]
async fn a_deleted_tenants_tokens_are_refused_at_once() {
    let (b, gw, _, secret) = setup("", &["crm"], &["127.0.0.1"]).await;
    let (s, _) = gw.admin("DELETE", "/v1/tenants/acme", None).await;
    assert_eq!(s, 204);
    let g = get("127.0.0.1", &gw.url("/crm/x"), Some(&secret)).await;
    assert_invalid_token(&g);
    assert_eq!(b.total(), 0);
    gw.stop().await;
}

// ---- row 4: client IP -----------------------------------------------------

#[tokio::test]
async fn ip_not_allowed_names_the_client_ip() {
    let (b, gw, _, secret) = setup("", &["crm"], &["127.0.0.2"]).await;
    let g = get("127.0.0.2", &gw.url("/crm/x"), Some(&secret)).await;
    assert_eq!(g.status, 200, "{}", g.text);
    for source in ["127.0.0.1", "127.0.0.3"] {
        let g = get(source, &gw.url("/crm/x"), Some(&secret)).await;
        assert_error(&g, 403, "ip_not_allowed");
        assert!(message(&g).contains(source), "{}", g.text);
        assert!(!g.text.contains(&secret));
    }
    assert_eq!(b.crm.count(), 1);
    gw.stop().await;
}

#[tokio::test]
async fn a_cidr_allowlist_admits_every_address_inside_it() {
    // 127.0.0.0/31 is 127.0.0.0 and 127.0.0.1; 127.0.0.2/31 adds .2 and .3.
    let (b, gw, _, secret) = setup("", &["crm"], &["127.0.0.0/31", "127.0.0.2/32"]).await;
    for source in ["127.0.0.1", "127.0.0.2"] {
        let g = get(source, &gw.url("/crm/x"), Some(&secret)).await;
        assert_eq!(g.status, 200, "{source}: {}", g.text);
    }
    let g = get("127.0.0.3", &gw.url("/crm/x"), Some(&secret)).await;
    assert_error(&g, 403, "ip_not_allowed");
    assert!(message(&g).contains("127.0.0.3"));
    assert_eq!(b.crm.count(), 2);
    gw.stop().await;
}

#[tokio::test]
async fn x_forwarded_for_is_ignored_unless_the_peer_is_a_trusted_proxy() {
    let (b, gw, _, secret) = setup("", &["crm"], &["127.0.0.3"]).await;
    let g = send(
        client_from("127.0.0.2")
            .get(gw.url("/crm/x"))
            .bearer_auth(&secret)
            .header("x-forwarded-for", "127.0.0.3"),
    )
    .await;
    assert_error(&g, 403, "ip_not_allowed");
    assert!(message(&g).contains("127.0.0.2"), "{}", g.text);
    assert_eq!(b.total(), 0);
    gw.stop().await;
}

const TRUSTED: &str = "[client_ip]\ntrusted_proxies = [\"127.0.0.1/32\"]\n";

#[tokio::test]
async fn a_trusted_proxy_passes_on_the_right_most_untrusted_address() {
    let (b, gw, _, secret) = setup(TRUSTED, &["crm"], &["127.0.0.3"]).await;
    let via_proxy = |xff: &'static str| {
        client_from("127.0.0.1")
            .get(gw.url("/crm/x"))
            .bearer_auth(&secret)
            .header("x-forwarded-for", xff)
    };
    // The proxy (127.0.0.1) says the client is 127.0.0.3.
    let g = send(via_proxy("127.0.0.3")).await;
    assert_eq!(g.status, 200, "{}", g.text);
    // Right-most untrusted wins: a spoofed left-most entry changes nothing,
    // and trusted hops on the right are skipped.
    let g = send(via_proxy("127.0.0.2, 127.0.0.3, 127.0.0.1")).await;
    assert_eq!(g.status, 200, "{}", g.text);
    let g = send(via_proxy("127.0.0.3, 127.0.0.2")).await;
    assert_error(&g, 403, "ip_not_allowed");
    assert!(message(&g).contains("127.0.0.2"), "{}", g.text);
    // Garbage right of the client: the last trusted hop is the client.
    let g = send(via_proxy("127.0.0.3, not-an-ip")).await;
    assert_error(&g, 403, "ip_not_allowed");
    assert!(message(&g).contains("127.0.0.1"), "{}", g.text);

    let seen = b.crm.seen();
    assert_eq!(seen.len(), 2);
    for s in &seen {
        let xff = s.headers["x-forwarded-for"].to_str().unwrap();
        assert!(xff.ends_with("127.0.0.3"), "{xff}");
    }
    // A direct client that is not a trusted proxy cannot use the header.
    let g = send(
        client_from("127.0.0.2")
            .get(gw.url("/crm/x"))
            .bearer_auth(&secret)
            .header("x-forwarded-for", "127.0.0.3"),
    )
    .await;
    assert_error(&g, 403, "ip_not_allowed");
    assert!(message(&g).contains("127.0.0.2"), "{}", g.text);
    gw.stop().await;
}

#[tokio::test]
async fn an_ipv4_client_of_a_dual_stack_listener_matches_an_ipv4_allowlist() {
    let b = Backends::start().await;
    let dir = tempfile::tempdir().unwrap();
    let text = config_text(&b, &dir.path().join("tollgate.db"), "").replacen(
        "public = \"127.0.0.1:0\"",
        "public = \"[::]:0\"",
        1,
    );
    assert!(text.contains("[::]:0"));
    let gw = TestGateway::start_text(dir, &text).await;
    assert!(gw.public.is_ipv6(), "{}", gw.public);
    gw.tenant("acme", &["crm"], 2).await;
    let (_, ok) = gw.token("acme", &["127.0.0.1"]).await;
    let (_, other) = gw.token("acme", &["127.0.0.2"]).await;
    // Reach [::]:port through 127.0.0.1: the peer is ::ffff:127.0.0.1.
    let url = format!("http://127.0.0.1:{}/crm/x", gw.public.port());
    let g = get("127.0.0.1", &url, Some(&ok)).await;
    assert_eq!(g.status, 200, "{}", g.text);
    let seen = b.crm.seen();
    assert_eq!(seen[0].headers["x-forwarded-for"], "127.0.0.1");
    let g = get("127.0.0.1", &url, Some(&other)).await;
    assert_error(&g, 403, "ip_not_allowed");
    assert!(message(&g).contains("client IP 127.0.0.1 "), "{}", g.text);
    assert!(!message(&g).contains("::ffff:"), "{}", g.text);
    assert_eq!(b.crm.count(), 1);
    gw.stop().await;
}

#[tokio::test]
async fn an_ipv6_client_is_matched_against_ipv6_entries() {
    let b = Backends::start().await;
    let dir = tempfile::tempdir().unwrap();
    let text = config_text(&b, &dir.path().join("tollgate.db"), "").replacen(
        "public = \"127.0.0.1:0\"",
        "public = \"[::]:0\"",
        1,
    );
    let gw = TestGateway::start_text(dir, &text).await;
    gw.tenant("acme", &["crm"], 2).await;
    let (_, v6) = gw.token("acme", &["::1"]).await;
    let (_, v4) = gw.token("acme", &["127.0.0.1"]).await;
    let url = format!("http://[::1]:{}/crm/x", gw.public.port());
    let g = get("::1", &url, Some(&v6)).await;
    assert_eq!(g.status, 200, "{}", g.text);
    assert_eq!(b.crm.seen()[0].headers["x-forwarded-for"], "::1");
    let g = get("::1", &url, Some(&v4)).await;
    assert_error(&g, 403, "ip_not_allowed");
    assert!(message(&g).contains("client IP ::1 "), "{}", g.text);
    // And the IPv6 entry does not admit an IPv4 client.
    let url4 = format!("http://127.0.0.1:{}/crm/x", gw.public.port());
    let g = get("127.0.0.1", &url4, Some(&v6)).await;
    assert_error(&g, 403, "ip_not_allowed");
    assert_eq!(b.crm.count(), 1);
    gw.stop().await;
}

// ---- row 5: products ------------------------------------------------------

#[tokio::test]
async fn a_product_the_tenant_has_not_bought_is_403_product_not_enabled() {
    let (b, gw, _, secret) = setup("", &["crm"], &["127.0.0.1"]).await;
    let g = get("127.0.0.1", &gw.url("/crm/x"), Some(&secret)).await;
    assert_eq!(g.status, 200);
    for path in ["/marketing/x", "/messaging/x"] {
        let g = get("127.0.0.1", &gw.url(path), Some(&secret)).await;
        assert_error(&g, 403, "product_not_enabled");
    }
    assert_eq!(b.total(), 1);
    // Buying the product enables it at once.
    let (s, _) = gw
        .admin(
            "PATCH",
            "/v1/tenants/acme",
            Some(json!({"products": ["crm", "marketing"]})),
        )
        .await;
    assert_eq!(s, 200);
    let g = get("127.0.0.1", &gw.url("/marketing/x"), Some(&secret)).await;
    assert_eq!(g.status, 200, "{}", g.text);
    assert_eq!(g.body["upstream"], "marketing");
    gw.stop().await;
}

#[tokio::test]
async fn a_token_limited_to_some_products_cannot_use_the_others() {
    let b = Backends::start().await;
    let gw = TestGateway::start(&b, "").await;
    gw.tenant("acme", &["crm", "marketing"], 1).await;
    let (s, v) = gw
        .admin(
            "POST",
            "/v1/tenants/acme/tokens",
            Some(json!({"ip_allowlist": ["127.0.0.1"], "products": ["crm"]})),
        )
        .await;
    assert_eq!(s, 201, "{v}");
    let secret = v["token"].as_str().unwrap();
    let g = get("127.0.0.1", &gw.url("/crm/x"), Some(secret)).await;
    assert_eq!(g.status, 200);
    let g = get("127.0.0.1", &gw.url("/marketing/x"), Some(secret)).await;
    assert_error(&g, 403, "product_not_enabled");
    assert_eq!(b.marketing.count(), 0);
    // Taking the product away from the tenant also disables it for the token.
    let (s, _) = gw
        .admin(
            "PATCH",
            "/v1/tenants/acme",
            Some(json!({"products": ["marketing"]})),
        )
        .await;
    assert_eq!(s, 200);
    let g = get("127.0.0.1", &gw.url("/crm/x"), Some(secret)).await;
    assert_error(&g, 403, "product_not_enabled");
    assert_eq!(b.crm.count(), 1);
    gw.stop().await;
}

// ---- order of the checks --------------------------------------------------

#[tokio::test]
async fn checks_run_in_the_contracts_order() {
    // Token allowed from 127.0.0.2 only, tenant has crm only.
    let (b, gw, _, secret) = setup("", &["crm"], &["127.0.0.2"]).await;
    // 1 before 2 and 3.
    let g = get("127.0.0.3", &gw.url("/billing/x"), Some("garbage")).await;
    assert_error(&g, 404, "no_route");
    // 2 before 4: no token from a disallowed address.
    let g = get("127.0.0.3", &gw.url("/marketing/x"), None).await;
    assert_error(&g, 401, "missing_token");
    // 3 before 4 and 5: bad token from a disallowed address on an unbought product.
    let g = get("127.0.0.3", &gw.url("/marketing/x"), Some("garbage")).await;
    assert_error(&g, 401, "invalid_token");
    // 4 before 5: good token, wrong address, unbought product.
    let g = get("127.0.0.3", &gw.url("/marketing/x"), Some(&secret)).await;
    assert_error(&g, 403, "ip_not_allowed");
    // 5 when everything else passes.
    let g = get("127.0.0.2", &gw.url("/marketing/x"), Some(&secret)).await;
    assert_error(&g, 403, "product_not_enabled");
    assert_eq!(b.total(), 0);
    gw.stop().await;
}

// ---- path normalization ---------------------------------------------------

#[tokio::test]
async fn dot_segments_make_a_crm_path_a_marketing_request_in_every_respect() {
    // A crm-only tenant cannot reach marketing through /crm/../.
    let (b, gw, _, secret) = setup("", &["crm"], &["127.0.0.1"]).await;
    let a = raw_get(&gw, "/crm/../marketing/x", Some(&secret)).await;
    assert_raw_error(&a, 403, "product_not_enabled");
    let a = raw_get(&gw, "/crm/./a/../../marketing/x", Some(&secret)).await;
    assert_raw_error(&a, 403, "product_not_enabled");
    assert_eq!(b.total(), 0);
    gw.stop().await;

    // When marketing is bought, it reaches the marketing upstream as /marketing/x.
    let (b, gw, _, secret) = setup("", &["marketing"], &["127.0.0.1"]).await;
    let a = raw_get(&gw, "/crm/../marketing/x?q=1", Some(&secret)).await;
    assert_eq!(a.status, 200, "{}", a.all);
    assert_eq!(b.crm.count(), 0);
    let seen = b.marketing.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].path_and_query, "/marketing/x?q=1");
    // And a marketing path that climbs into crm is a crm request.
    let a = raw_get(&gw, "/marketing/../crm/x", Some(&secret)).await;
    assert_raw_error(&a, 403, "product_not_enabled");
    // Climbing out of every route is no route at all.
    let a = raw_get(&gw, "/crm/../../etc/passwd", Some(&secret)).await;
    assert_raw_error(&a, 404, "no_route");
    assert_eq!(b.total(), 1);
    gw.stop().await;
}

#[tokio::test]
async fn harmless_percent_encoding_is_forwarded_untouched() {
    let (b, gw, _, secret) = setup("", &["crm"], &["127.0.0.1"]).await;
    let a = raw_get(&gw, "/crm/a%20b/c%2Ed", Some(&secret)).await;
    assert_eq!(a.status, 200, "{}", a.all);
    assert_eq!(b.crm.seen()[0].path_and_query, "/crm/a%20b/c%2Ed");
    gw.stop().await;
}

// ---- forwarding -----------------------------------------------------------

#[tokio::test]
async fn forwarded_request_keeps_method_path_query_and_body() {
    let (b, gw, _, secret) = setup("", &["crm", "messaging"], &["127.0.0.1"]).await;
    let client = client_from("127.0.0.1");
    for method in ["GET", "POST", "PUT", "PATCH", "DELETE"] {
        let g = send(
            client
                .request(
                    method.parse().unwrap(),
                    gw.url("/crm/v1/contacts/7?x=1&y=a%20b"),
                )
                .bearer_auth(&secret)
                .body("hello world"),
        )
        .await;
        assert_eq!(g.status, 200, "{}", g.text);
    }
    let seen = b.crm.seen();
    assert_eq!(seen.len(), 5);
    for (s, method) in seen.iter().zip(["GET", "POST", "PUT", "PATCH", "DELETE"]) {
        assert_eq!(s.method, method);
        assert_eq!(s.path_and_query, "/crm/v1/contacts/7?x=1&y=a%20b");
        assert_eq!(s.body_len, 11);
    }
    // strip_prefix (set for /messaging/ in the test config).
    let g = send(
        client
            .post(gw.url("/messaging/v1/send?to=42"))
            .bearer_auth(&secret)
            .body("hi"),
    )
    .await;
    assert_eq!(g.status, 200, "{}", g.text);
    assert_eq!(g.body["upstream"], "messaging");
    let seen = b.messaging.seen();
    assert_eq!(seen[0].path_and_query, "/v1/send?to=42");
    assert_eq!(seen[0].body_len, 2);
    let g = get("127.0.0.1", &gw.url("/messaging/"), Some(&secret)).await;
    assert_eq!(g.status, 200);
    assert_eq!(b.messaging.seen()[1].path_and_query, "/");
    gw.stop().await;
}

#[tokio::test]
async fn forwarded_request_loses_credentials_hop_by_hop_and_spoofed_headers() {
    let (b, gw, id, secret) = setup("", &["crm"], &["127.0.0.2"]).await;
    // Raw, so the hop-by-hop headers are sent exactly as written.
    let req = format!(
        "GET /crm/x HTTP/1.1\r\nHost: gw.example\r\nAuthorization: Bearer {secret}\r\n\
         Connection: close, x-custom-hop\r\nX-Custom-Hop: 1\r\nKeep-Alive: timeout=5\r\n\
         Proxy-Authorization: Basic Zm9vOmJhcg==\r\nTE: trailers\r\nTrailer: x-t\r\n\
         X-Tollgate-Tenant: evil\r\nX-Tollgate-Token-Id: tok_evil\r\nX-Tollgate-Admin: 1\r\n\
         X-Forwarded-For: 198.51.100.7\r\nX-Forwarded-Proto: https\r\nX-Kept: yes\r\n\r\n"
    );
    let a = parse_raw(raw("127.0.0.2", gw.public, req.as_bytes(), RAW_WAIT).await);
    assert_eq!(a.status, 200, "{}", a.all);
    let seen = b.crm.seen();
    assert_eq!(seen.len(), 1);
    let h = &seen[0].headers;
    for gone in [
        "authorization",
        "x-custom-hop",
        "keep-alive",
        "proxy-authorization",
        "te",
        "trailer",
        "x-tollgate-admin",
    ] {
        assert!(!h.contains_key(gone), "{gone} reached the upstream: {h:?}");
    }
    if let Some(c) = h.get("connection") {
        assert!(!c.to_str().unwrap().contains("x-custom-hop"));
    }
    for v in h.values() {
        assert!(!v.to_str().unwrap_or("").contains(&secret));
    }
    assert_eq!(h["x-kept"], "yes");
    assert_eq!(h.get_all("x-tollgate-tenant").iter().count(), 1);
    assert_eq!(h["x-tollgate-tenant"], "acme");
    assert_eq!(h.get_all("x-tollgate-token-id").iter().count(), 1);
    assert_eq!(h["x-tollgate-token-id"], id.as_str());
    // The peer is not a trusted proxy: its claims are kept for the record,
    // the address the gateway saw is appended, and the protocol is ours.
    let xff = h["x-forwarded-for"].to_str().unwrap();
    assert!(xff.ends_with("127.0.0.2"), "{xff}");
    assert_eq!(h["x-forwarded-proto"], "http");
    gw.stop().await;
}

#[tokio::test]
async fn forwarded_request_gains_identity_and_forwarding_headers() {
    let (b, gw, id, secret) = setup("", &["crm"], &["127.0.0.3"]).await;
    let g = get("127.0.0.3", &gw.url("/crm/x"), Some(&secret)).await;
    assert_eq!(g.status, 200, "{}", g.text);
    let seen = b.crm.seen();
    let h = &seen[0].headers;
    assert_eq!(h["x-tollgate-tenant"], "acme");
    assert_eq!(h["x-tollgate-token-id"], id.as_str());
    assert_eq!(h["x-forwarded-for"], "127.0.0.3");
    assert_eq!(h["x-forwarded-proto"], "http");
    assert!(!h.contains_key("authorization"));
    // A request id was made up, sent up and returned.
    let rid = h["x-request-id"].to_str().unwrap();
    assert!(!rid.is_empty());
    assert_eq!(g.headers["x-request-id"], rid);
    // The upstream's answer comes back as it was.
    assert_eq!(g.headers["x-upstream"], "crm");
    assert_eq!(g.body["path"], "/crm/x");
    gw.stop().await;
}

#[tokio::test]
async fn a_sane_caller_request_id_is_kept_and_an_insane_one_replaced() {
    let (b, gw, _, secret) = setup("", &["crm"], &["127.0.0.1"]).await;
    let client = client_from("127.0.0.1");
    let g = send(
        client
            .get(gw.url("/crm/x"))
            .bearer_auth(&secret)
            .header("x-request-id", "req-42.a:b_c"),
    )
    .await;
    assert_eq!(g.status, 200);
    assert_eq!(g.headers["x-request-id"], "req-42.a:b_c");
    assert_eq!(b.crm.seen()[0].headers["x-request-id"], "req-42.a:b_c");

    for insane in ["has space", "semi;colon", &"a".repeat(200)] {
        let g = send(
            client
                .get(gw.url("/crm/x"))
                .bearer_auth(&secret)
                .header("x-request-id", insane),
        )
        .await;
        assert_eq!(g.status, 200);
        let returned = g.headers["x-request-id"].to_str().unwrap().to_string();
        assert_ne!(returned, insane);
        assert!(!returned.is_empty());
        let seen = b.crm.seen();
        assert_eq!(
            seen.last().unwrap().headers["x-request-id"],
            returned.as_str()
        );
    }
    // Rejections carry the request id too.
    let g = send(
        client
            .get(gw.url("/crm/x"))
            .header("x-request-id", "rejected-1"),
    )
    .await;
    assert_error(&g, 401, "missing_token");
    assert_eq!(g.headers["x-request-id"], "rejected-1");
    gw.stop().await;
}

// ---- rows 6 and 7: upstream failures --------------------------------------

#[tokio::test]
async fn an_unreachable_upstream_is_502_upstream_unavailable() {
    let closed = free_port();
    let extra = format!(
        "[[route]]\nprefix = \"/down/\"\nproduct = \"crm\"\nupstream = \"http://127.0.0.1:{closed}\"\n"
    );
    let (_b, gw, _, secret) = setup(&extra, &["crm"], &["127.0.0.1"]).await;
    let g = get("127.0.0.1", &gw.url("/down/x"), Some(&secret)).await;
    assert_error(&g, 502, "upstream_unavailable");
    assert!(g.headers.contains_key("x-request-id"));
    // The checks before it still come first.
    let g = get("127.0.0.1", &gw.url("/down/x"), None).await;
    assert_error(&g, 401, "missing_token");
    gw.stop().await;
}

#[tokio::test]
async fn an_upstream_without_a_response_head_in_time_is_504_upstream_timeout() {
    let slow = Upstream::start_with_delay("slow", Duration::from_secs(3)).await;
    let extra = format!(
        "[limits]\nupstream_timeout = \"200ms\"\n[[route]]\nprefix = \"/slow/\"\nproduct = \"crm\"\nupstream = \"{}\"\n",
        slow.url()
    );
    let (b, gw, _, secret) = setup(&extra, &["crm"], &["127.0.0.1"]).await;
    let g = get("127.0.0.1", &gw.url("/slow/x"), Some(&secret)).await;
    assert_error(&g, 504, "upstream_timeout");
    assert_eq!(slow.count(), 1);
    // Fast upstreams are unaffected.
    let g = get("127.0.0.1", &gw.url("/crm/x"), Some(&secret)).await;
    assert_eq!(g.status, 200);
    assert_eq!(b.crm.count(), 1);
    gw.stop().await;
}

// ---- protocols and bodies -------------------------------------------------

#[tokio::test]
async fn http2_prior_knowledge_clients_are_served() {
    let (b, gw, _, secret) = setup("", &["crm"], &["127.0.0.2"]).await;
    let client = reqwest::Client::builder()
        .http2_prior_knowledge()
        .local_address("127.0.0.2".parse::<std::net::IpAddr>().unwrap())
        .no_proxy()
        .build()
        .unwrap();
    let resp = client
        .post(gw.url("/crm/v1/x?h=2"))
        .bearer_auth(&secret)
        .body("over h2")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.version(), reqwest::Version::HTTP_2);
    assert_eq!(resp.status(), 200);
    assert!(resp.headers().contains_key("x-request-id"));
    let seen = b.crm.seen();
    assert_eq!(seen[0].path_and_query, "/crm/v1/x?h=2");
    assert_eq!(seen[0].body_len, 7);
    assert_eq!(seen[0].headers["x-forwarded-for"], "127.0.0.2");
    // The h2 :authority travels as X-Forwarded-Host, like an h1 Host.
    assert_eq!(
        seen[0].headers["x-forwarded-host"],
        gw.public.to_string().as_str()
    );
    assert_eq!(seen[0].version, http::Version::HTTP_11);
    // Rejections over h2 have the same shape.
    let resp = client.get(gw.url("/crm/x")).send().await.unwrap();
    assert_eq!(resp.status(), 401);
    assert_eq!(resp.headers()["content-type"], "application/json");
    let v: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(v["error"]["code"], "missing_token");
    gw.stop().await;
}

#[tokio::test]
async fn a_100_mb_streamed_upload_reaches_the_upstream_whole() {
    const CHUNK: usize = 1 << 20;
    const CHUNKS: usize = 100;
    let (b, gw, _, secret) = setup("", &["crm"], &["127.0.0.1"]).await;
    let chunks = futures_util::stream::iter(
        (0..CHUNKS).map(|i| Ok::<_, std::io::Error>(bytes::Bytes::from(vec![i as u8; CHUNK]))),
    );
    let g = send(
        client_from("127.0.0.1")
            .post(gw.url("/crm/upload"))
            .bearer_auth(&secret)
            .body(reqwest::Body::wrap_stream(chunks)),
    )
    .await;
    assert_eq!(g.status, 200, "{}", g.text);
    assert_eq!(g.body["body_len"], CHUNK * CHUNKS);
    assert_eq!(b.crm.seen()[0].body_len, CHUNK * CHUNKS);
    gw.stop().await;
}

// ---- request smuggling ----------------------------------------------------

/// No upstream saw a request whose path contains `marker`.
fn assert_never_forwarded(b: &Backends, marker: &str) {
    for up in [&b.crm, &b.messaging, &b.marketing] {
        for s in up.seen() {
            assert!(
                !s.path_and_query.contains(marker),
                "{} reached {}",
                s.path_and_query,
                up.name
            );
        }
    }
}

#[tokio::test]
async fn content_length_with_transfer_encoding_never_reaches_an_upstream_together() {
    let (b, gw, _, secret) = setup("", &["crm", "marketing"], &["127.0.0.1"]).await;
    // CL.TE: by Content-Length the body is "0\r\n\r\nGET /marketing/smuggled…",
    // by Transfer-Encoding the body ends at "0\r\n\r\n" and a tokenless
    // request follows.
    let smuggled = "GET /marketing/smuggled HTTP/1.1\r\nHost: gw\r\n\r\n";
    let body = format!("0\r\n\r\n{smuggled}");
    let req = format!(
        "POST /crm/x HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {secret}\r\n\
         Content-Length: {}\r\nTransfer-Encoding: chunked\r\n\r\n{body}",
        body.len()
    );
    let a = parse_raw(raw("127.0.0.1", gw.public, req.as_bytes(), RAW_WAIT).await);
    // TE.CL: by Transfer-Encoding the chunk holds a request, by
    // Content-Length the body is 4 bytes.
    let chunk = "GET /marketing/smuggled2 HTTP/1.1\r\nHost: gw\r\n\r\n";
    let req2 = format!(
        "POST /crm/y HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {secret}\r\n\
         Transfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n{:x}\r\n{chunk}\r\n0\r\n\r\n",
        chunk.len()
    );
    let a2 = parse_raw(raw("127.0.0.1", gw.public, req2.as_bytes(), RAW_WAIT).await);

    for s in b.crm.seen() {
        assert!(
            !(s.headers.contains_key("content-length")
                && s.headers.contains_key("transfer-encoding")),
            "both framing headers reached the upstream: {s:?}"
        );
    }
    assert_never_forwarded(&b, "smuggled");
    assert_eq!(b.marketing.count(), 0);
    // The contract allows two answers: 400 bad_request with the connection
    // closed, or framing by Transfer-Encoding alone (hyper drops the
    // Content-Length and closes the connection after the response, so the
    // bytes after the chunked body are never read as a request).
    for (answer, path, te_body) in [(&a, "/crm/x", 0), (&a2, "/crm/y", chunk.len())] {
        assert!(answer.head.contains("connection: close"), "{}", answer.all);
        assert_eq!(answer.all.matches("HTTP/1.1 ").count(), 1, "{}", answer.all);
        if answer.status == 400 {
            assert_raw_error(answer, 400, "bad_request");
            assert!(b.crm.seen().iter().all(|s| s.path_and_query != path));
        } else {
            assert_eq!(answer.status, 200, "{}", answer.all);
            let seen = b.crm.seen();
            let s = seen.iter().find(|s| s.path_and_query == path).unwrap();
            assert_eq!(s.body_len, te_body, "not framed by Transfer-Encoding");
        }
    }
    gw.stop().await;
}

#[tokio::test]
async fn two_different_content_lengths_are_refused() {
    let (b, gw, _, secret) = setup("", &["crm", "marketing"], &["127.0.0.1"]).await;
    for cl in [
        "Content-Length: 5\r\nContent-Length: 40\r\n",
        "Content-Length: 5, 40\r\n",
    ] {
        let req = format!(
            "POST /crm/x HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {secret}\r\n{cl}\r\n\
             helloGET /marketing/smuggled HTTP/1.1\r\n\r\n"
        );
        let a = parse_raw(raw("127.0.0.1", gw.public, req.as_bytes(), RAW_WAIT).await);
        assert_eq!(a.status, 400, "{}", a.all);
        // One answer, then the connection ends: the bytes after the head are
        // never read as a request.
        assert_eq!(a.all.matches("HTTP/1.1 ").count(), 1, "{}", a.all);
    }
    assert_eq!(b.total(), 0);
    gw.stop().await;
}

#[tokio::test]
async fn a_request_pipelined_after_an_upgrade_must_pass_every_check_itself() {
    let (b, gw, _, secret) = setup("", &["crm", "marketing"], &["127.0.0.1"]).await;
    // The first request asks for an upgrade; the bytes after it are a second,
    // tokenless request. The gateway does not tunnel: the upgrade headers are
    // stripped and the second request is judged on its own (401).
    let req = format!(
        "GET /crm/ws HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {secret}\r\n\
         Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n\
         GET /marketing/smuggled HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n"
    );
    let out = raw("127.0.0.1", gw.public, req.as_bytes(), RAW_WAIT).await;
    assert_never_forwarded(&b, "smuggled");
    assert_eq!(b.marketing.count(), 0);
    let seen = b.crm.seen();
    assert_eq!(seen.len(), 1);
    assert!(!seen[0].headers.contains_key("upgrade"));
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    assert!(out.contains("missing_token"), "{out}");
    assert!(!out.contains("101 Switching"), "{out}");
    gw.stop().await;
}

#[tokio::test]
async fn a_request_hidden_in_a_body_is_never_forwarded_unauthenticated() {
    let (b, gw, _, secret) = setup("", &["crm", "marketing"], &["127.0.0.1"]).await;
    let hidden = "GET /marketing/hidden HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n";
    // The hidden request is the body: it travels as bytes, not as a request.
    let req = format!(
        "POST /crm/x HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {secret}\r\n\
         Connection: close\r\nContent-Length: {}\r\n\r\n{hidden}",
        hidden.len()
    );
    let out = raw("127.0.0.1", gw.public, req.as_bytes(), RAW_WAIT).await;
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    // A body shorter than the bytes sent: the rest is a pipelined request
    // without a token, answered 401 by the gateway itself.
    let req = format!(
        "POST /crm/y HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {secret}\r\n\
         Content-Length: 0\r\n\r\n{hidden}"
    );
    let out = raw("127.0.0.1", gw.public, req.as_bytes(), RAW_WAIT).await;
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    assert!(out.contains("missing_token"), "{out}");
    // The same inside a chunked body.
    let req = format!(
        "POST /crm/z HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {secret}\r\n\
         Transfer-Encoding: chunked\r\n\r\n{:x}\r\n{hidden}\r\n0\r\n\r\n{hidden}",
        hidden.len()
    );
    let out = raw("127.0.0.1", gw.public, req.as_bytes(), RAW_WAIT).await;
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    assert!(out.contains("missing_token"), "{out}");

    assert_never_forwarded(&b, "hidden");
    assert_eq!(b.marketing.count(), 0);
    let seen = b.crm.seen();
    let paths: Vec<&str> = seen.iter().map(|s| s.path_and_query.as_str()).collect();
    assert_eq!(paths, ["/crm/x", "/crm/y", "/crm/z"]);
    assert_eq!(seen[0].body_len, hidden.len());
    assert_eq!(seen[1].body_len, 0);
    assert_eq!(seen[2].body_len, hidden.len());
    gw.stop().await;
}

#[tokio::test]
async fn connect_and_asterisk_targets_are_400_and_never_forwarded() {
    let (b, gw, _, secret) = setup("", &["crm"], &["127.0.0.1"]).await;
    for line in [
        format!("CONNECT {} HTTP/1.1", b.crm.addr),
        "OPTIONS * HTTP/1.1".to_string(),
    ] {
        let req = format!(
            "{line}\r\nHost: gw\r\nAuthorization: Bearer {secret}\r\nConnection: close\r\n\r\n"
        );
        let a = parse_raw(raw("127.0.0.1", gw.public, req.as_bytes(), RAW_WAIT).await);
        assert_raw_error(&a, 400, "bad_request");
    }
    // The absolute form is routed by its path like any other request.
    let req = format!(
        "GET http://elsewhere.example/crm/abs?x=1 HTTP/1.1\r\nHost: elsewhere.example\r\n\
         Authorization: Bearer {secret}\r\nConnection: close\r\n\r\n"
    );
    let a = parse_raw(raw("127.0.0.1", gw.public, req.as_bytes(), RAW_WAIT).await);
    assert_eq!(a.status, 200, "{}", a.all);
    let seen = b.crm.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].path_and_query, "/crm/abs?x=1");
    gw.stop().await;
}

// ---- oversized heads ------------------------------------------------------

#[tokio::test]
async fn a_request_head_over_64_kib_is_431() {
    let (b, gw, _, secret) = setup("", &["crm"], &["127.0.0.1"]).await;
    let big = "a".repeat(70 * 1024);
    let req = format!(
        "GET /crm/x HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {secret}\r\nX-Big: {big}\r\n\r\n"
    );
    let out = raw("127.0.0.1", gw.public, req.as_bytes(), RAW_WAIT).await;
    assert!(out.starts_with("HTTP/1.1 431"), "{out}");
    // Fewer than 100 headers adding up to more than the limit, too.
    let many: String = (0..90)
        .map(|i| format!("X-H{i}: {}\r\n", "b".repeat(800)))
        .collect();
    let req =
        format!("GET /crm/x HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {secret}\r\n{many}\r\n");
    let out = raw("127.0.0.1", gw.public, req.as_bytes(), RAW_WAIT).await;
    assert!(out.starts_with("HTTP/1.1 431"), "{out}");
    // More than 100 header fields, however small (hyper's limit, as
    // Envoy's default max_headers_count), is 431 as well.
    let fields = |n: usize| -> String { (0..n).map(|i| format!("X-H{i}: b\r\n")).collect() };
    let req = format!(
        "GET /crm/x HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {secret}\r\n{}\r\n",
        fields(101)
    );
    let out = raw("127.0.0.1", gw.public, req.as_bytes(), RAW_WAIT).await;
    assert!(out.starts_with("HTTP/1.1 431"), "{out}");
    assert_eq!(b.total(), 0);
    let req = format!(
        "GET /crm/x HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {secret}\r\n{}Connection: close\r\n\r\n",
        fields(90)
    );
    let out = raw("127.0.0.1", gw.public, req.as_bytes(), RAW_WAIT).await;
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    assert_eq!(b.total(), 1);
    // A head just under the limit still works.
    let ok = "c".repeat(32 * 1024);
    let g = send(
        client_from("127.0.0.1")
            .get(gw.url("/crm/x"))
            .bearer_auth(&secret)
            .header("x-big", ok),
    )
    .await;
    assert_eq!(g.status, 200, "{}", g.text);
    gw.stop().await;
}
