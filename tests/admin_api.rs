//! The admin API against the contract (section 5): every call, every 4xx,
//! the secret shown once, quota under concurrency, the audit log, metrics
//! and health endpoints, and that every change holds on the data plane
//! before the call returns.

mod support;

use serde_json::{json, Value};
use support::*;

async fn gateway(extra: &str) -> (Backends, TestGateway) {
    let b = Backends::start().await;
    let gw = TestGateway::start(&b, extra).await;
    (b, gw)
}

/// An admin call with a raw body, for malformed JSON.
async fn admin_raw(gw: &TestGateway, method: &str, path: &str, body: &str) -> (u16, Value, String) {
    let resp = reqwest::Client::new()
        .request(method.parse().unwrap(), gw.admin_url(path))
        .bearer_auth(ADMIN_KEY)
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let ct = resp
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default();
    let text = resp.text().await.unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::Null),
        ct,
    )
}

#[track_caller]
fn assert_api_error(status: u16, v: &Value, want_status: u16, code: &str) {
    assert_eq!(status, want_status, "{v}");
    assert_eq!(v["error"]["code"], code, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "{v}"
    );
}

fn msg(v: &Value) -> &str {
    v["error"]["message"].as_str().unwrap_or("")
}

async fn create_token(gw: &TestGateway, tenant: &str, body: Value) -> (u16, Value) {
    gw.admin("POST", &format!("/v1/tenants/{tenant}/tokens"), Some(body))
        .await
}

// ---- authentication -------------------------------------------------------

#[tokio::test]
async fn errors_axum_answers_itself_are_json_too() {
    let (_b, gw) = gateway("").await;
    gw.tenant("acme", &["crm"], 1).await;
    // Unknown endpoint, under /v1 and outside it.
    for path in ["/v1/no-such-endpoint", "/nothing-here"] {
        let (s, v) = gw.admin("GET", path, None).await;
        assert_api_error(s, &v, 404, "not_found");
    }
    // Known endpoint, wrong method.
    let (s, v) = gw
        .admin("PUT", "/v1/tenants", Some(json!({"id": "x"})))
        .await;
    assert_api_error(s, &v, 405, "method_not_allowed");
    // A query string that does not decode into the endpoint's parameters.
    let (s, v) = gw.admin("GET", "/v1/audit?limit=1&limit=2", None).await;
    assert_api_error(s, &v, 400, "bad_request");
    // A body over the 1 MiB limit: refused as JSON, and nothing created.
    let huge = json!({"id": "big", "name": "x".repeat(2 << 20)});
    let (s, v) = gw.admin("POST", "/v1/tenants", Some(huge)).await;
    assert_api_error(s, &v, 413, "payload_too_large");
    let (s, v) = gw.admin("GET", "/v1/tenants/big", None).await;
    assert_api_error(s, &v, 404, "tenant_not_found");
    gw.stop().await;
}

#[tokio::test]
async fn every_v1_call_without_or_with_a_wrong_key_is_401_unauthorized() {
    let (_b, gw) = gateway("").await;
    gw.tenant("acme", &["crm"], 1).await;
    let (tok, _) = gw.token("acme", &["127.0.0.1"]).await;
    let calls = [
        ("POST", "/v1/tenants".to_string(), Some(json!({"id": "x"}))),
        ("GET", "/v1/tenants".to_string(), None),
        ("GET", "/v1/tenants/acme".to_string(), None),
        (
            "PATCH",
            "/v1/tenants/acme".to_string(),
            Some(json!({"name": "x"})),
        ),
        ("DELETE", "/v1/tenants/acme".to_string(), None),
        (
            "POST",
            "/v1/tenants/acme/tokens".to_string(),
            Some(json!({"ip_allowlist": ["127.0.0.1"]})),
        ),
        ("GET", "/v1/tenants/acme/tokens".to_string(), None),
        ("GET", format!("/v1/tokens/{tok}"), None),
        (
            "PATCH",
            format!("/v1/tokens/{tok}"),
            Some(json!({"disabled": true})),
        ),
        ("DELETE", format!("/v1/tokens/{tok}"), None),
        ("POST", format!("/v1/tokens/{tok}/rotate"), Some(json!({}))),
        ("GET", "/v1/audit?limit=5".to_string(), None),
        ("POST", "/v1/reload".to_string(), None),
        // Paths and methods that do not exist are no way around the key.
        ("GET", "/v1/no-such-endpoint".to_string(), None),
        ("PUT", "/v1/tenants".to_string(), Some(json!({"id": "x"}))),
    ];
    for (method, path, body) in &calls {
        for key in [None, Some("wrong-key"), Some("")] {
            let (s, v) = admin_call(gw.admin, method, path, body.clone(), key).await;
            assert_api_error(s, &v, 401, "unauthorized");
        }
        // The right key in a non-bearer scheme is no key.
        let resp = reqwest::Client::new()
            .request(method.parse().unwrap(), gw.admin_url(path))
            .header("authorization", format!("Basic {ADMIN_KEY}"))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 401);
        assert_eq!(resp.headers()["content-type"], "application/json");
    }
    // Nothing changed: the tenant and token are as they were.
    let (s, v) = gw.admin("GET", &format!("/v1/tokens/{tok}"), None).await;
    assert_eq!(s, 200);
    assert_eq!(v["status"], "active");
    assert_eq!(v["name"], "");
    let (s, v) = gw.admin("GET", "/v1/tenants/acme", None).await;
    assert_eq!(s, 200);
    assert_eq!(v["name"], "acme");
    gw.stop().await;
}

#[tokio::test]
async fn health_readiness_and_metrics_need_no_key() {
    let (_b, gw) = gateway("").await;
    let client = reqwest::Client::new();
    let r = client.get(gw.admin_url("/healthz")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let r = client.get(gw.admin_url("/readyz")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("application/json"));
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["ready"], true, "{v}");
    let r = client.get(gw.admin_url("/metrics")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/plain"));
    let text = r.text().await.unwrap();
    assert!(text.contains("tollgate_tenants"), "{text}");
    gw.stop().await;
}

// ---- tenants --------------------------------------------------------------

#[tokio::test]
async fn tenant_create_answers_201_with_the_contract_defaults() {
    let (_b, gw) = gateway("").await;
    let (s, v) = gw
        .admin("POST", "/v1/tenants", Some(json!({"id": "acme"})))
        .await;
    assert_eq!(s, 201, "{v}");
    assert_eq!(v["id"], "acme");
    assert_eq!(v["products"], json!([]));
    assert_eq!(v["token_quota"], 1);
    assert_eq!(v["active_tokens"], 0);
    assert!(v["name"].is_string());
    assert!(
        v["created_at"].as_str().is_some_and(|t| t.ends_with('Z')),
        "{v}"
    );

    let (s, v) = gw
        .admin(
            "POST",
            "/v1/tenants",
            Some(json!({"id": "globex-2_b", "name": "Globex Inc.", "products": ["crm", "marketing"], "token_quota": 3})),
        )
        .await;
    assert_eq!(s, 201, "{v}");
    assert_eq!(v["name"], "Globex Inc.");
    assert_eq!(v["products"], json!(["crm", "marketing"]));
    assert_eq!(v["token_quota"], 3);
    gw.stop().await;
}

#[tokio::test]
async fn the_default_token_quota_comes_from_the_config() {
    let (_b, gw) = gateway("[tenants]\ndefault_token_quota = 4\n").await;
    let (s, v) = gw
        .admin("POST", "/v1/tenants", Some(json!({"id": "acme"})))
        .await;
    assert_eq!(s, 201, "{v}");
    assert_eq!(v["token_quota"], 4);
    gw.stop().await;
}

#[tokio::test]
async fn tokens_carry_the_configured_prefix_and_work_on_the_data_plane() {
    let (_b, gw) = gateway("[tokens]\nprefix = \"acme_live_\"\n").await;
    gw.tenant("acme", &["crm"], 1).await;
    let (_, secret) = gw.token("acme", &["127.0.0.1"]).await;
    assert!(secret.starts_with("acme_live_"), "{secret}");
    assert_eq!(secret.len(), "acme_live_".len() + 49, "{secret}");
    let g = get("127.0.0.1", &gw.url("/crm/v1/x"), Some(&secret)).await;
    assert_eq!(g.status, 200, "{}", g.text);
    // The same body under another prefix fails the checksum, which covers
    // the prefix.
    let other = format!("tg_{}", &secret["acme_live_".len()..]);
    let g = get("127.0.0.1", &gw.url("/crm/v1/x"), Some(&other)).await;
    assert_error(&g, 401, "invalid_token");
    gw.stop().await;
}

#[tokio::test]
async fn creating_a_tenant_twice_is_409_tenant_exists() {
    let (_b, gw) = gateway("").await;
    gw.tenant("acme", &["crm"], 1).await;
    let (s, v) = gw
        .admin(
            "POST",
            "/v1/tenants",
            Some(json!({"id": "acme", "products": ["marketing"]})),
        )
        .await;
    assert_api_error(s, &v, 409, "tenant_exists");
    // The first one is untouched.
    let (_, v) = gw.admin("GET", "/v1/tenants/acme", None).await;
    assert_eq!(v["products"], json!(["crm"]));
    gw.stop().await;
}

#[tokio::test]
async fn bad_tenant_ids_products_and_types_are_422_invalid_tenant() {
    let (_b, gw) = gateway("").await;
    let long = "a".repeat(64);
    let bad = [
        json!({"id": "Acme"}),
        json!({"id": "-acme"}),
        json!({"id": "_acme"}),
        json!({"id": "ac me"}),
        json!({"id": "acme.corp"}),
        json!({"id": ""}),
        json!({"id": long}),
        json!({"id": "acme", "products": ["CRM"]}),
        json!({"id": "acme", "products": ["crm", "bad product"]}),
        json!({"id": "acme", "products": [""]}),
        json!({"id": 5}),
        json!({"id": null}),
        json!({}),
        json!({"id": "acme", "products": "crm"}),
        json!({"id": "acme", "products": [1]}),
        json!({"id": "acme", "token_quota": -1}),
        json!({"id": "acme", "token_quota": "3"}),
        json!({"id": "acme", "token_quota": 1.5}),
        json!({"id": "acme", "name": 7}),
        json!({"id": "acme", "quota": 3}),
        json!(["acme"]),
    ];
    for body in bad {
        let (s, v) = gw.admin("POST", "/v1/tenants", Some(body.clone())).await;
        assert_api_error(s, &v, 422, "invalid_tenant");
    }
    let (s, v) = gw.admin("GET", "/v1/tenants", None).await;
    assert_eq!(s, 200);
    assert_eq!(v["tenants"], json!([]), "a refused tenant was created");
    // The longest legal id is fine.
    let ok = "a".repeat(63);
    let (s, v) = gw
        .admin("POST", "/v1/tenants", Some(json!({"id": ok})))
        .await;
    assert_eq!(s, 201, "{v}");
    gw.stop().await;
}

#[tokio::test]
async fn unparseable_json_is_400_bad_request() {
    let (_b, gw) = gateway("").await;
    gw.tenant("acme", &["crm"], 1).await;
    let (tok, _) = gw.token("acme", &["127.0.0.1"]).await;
    for (method, path) in [
        ("POST", "/v1/tenants".to_string()),
        ("PATCH", "/v1/tenants/acme".to_string()),
        ("POST", "/v1/tenants/acme/tokens".to_string()),
        ("PATCH", format!("/v1/tokens/{tok}")),
        ("POST", format!("/v1/tokens/{tok}/rotate")),
    ] {
        for body in ["{not json", "{\"id\": ", "nope", "{\"id\":\"x\"} trailing"] {
            let (s, v, ct) = admin_raw(&gw, method, &path, body).await;
            assert_api_error(s, &v, 400, "bad_request");
            assert_eq!(ct, "application/json");
        }
    }
    gw.stop().await;
}

#[tokio::test]
async fn tenants_are_listed_and_shown_and_unknown_ones_are_404() {
    let (_b, gw) = gateway("").await;
    gw.tenant("beta", &["crm"], 2).await;
    gw.tenant("alpha", &["marketing"], 1).await;
    gw.token("beta", &["127.0.0.1"]).await;
    let (s, v) = gw.admin("GET", "/v1/tenants", None).await;
    assert_eq!(s, 200);
    let list = v["tenants"].as_array().unwrap();
    let ids: Vec<&str> = list.iter().map(|t| t["id"].as_str().unwrap()).collect();
    assert_eq!(ids.len(), 2);
    assert!(ids.contains(&"alpha") && ids.contains(&"beta"), "{v}");
    let beta = list.iter().find(|t| t["id"] == "beta").unwrap();
    assert_eq!(beta["active_tokens"], 1);
    assert_eq!(beta["token_quota"], 2);

    let (s, v) = gw.admin("GET", "/v1/tenants/beta", None).await;
    assert_eq!(s, 200);
    assert_eq!(v["id"], "beta");
    assert_eq!(v["products"], json!(["crm"]));
    assert_eq!(v["active_tokens"], 1);

    for path in ["/v1/tenants/nobody", "/v1/tenants/nobody/tokens"] {
        let (s, v) = gw.admin("GET", path, None).await;
        assert_api_error(s, &v, 404, "tenant_not_found");
    }
    let (s, v) = gw
        .admin("PATCH", "/v1/tenants/nobody", Some(json!({"name": "x"})))
        .await;
    assert_api_error(s, &v, 404, "tenant_not_found");
    let (s, v) = gw.admin("DELETE", "/v1/tenants/nobody", None).await;
    assert_api_error(s, &v, 404, "tenant_not_found");
    let (s, v) = create_token(&gw, "nobody", json!({"ip_allowlist": ["127.0.0.1"]})).await;
    assert_api_error(s, &v, 404, "tenant_not_found");
    gw.stop().await;
}

#[tokio::test]
async fn tenant_patch_changes_only_the_given_fields() {
    let (_b, gw) = gateway("").await;
    gw.tenant("acme", &["crm"], 1).await;
    let (s, v) = gw
        .admin(
            "PATCH",
            "/v1/tenants/acme",
            Some(json!({"name": "Acme Corp"})),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["name"], "Acme Corp");
    assert_eq!(v["products"], json!(["crm"]));
    assert_eq!(v["token_quota"], 1);
    let (s, v) = gw
        .admin(
            "PATCH",
            "/v1/tenants/acme",
            Some(json!({"products": ["crm", "messaging"], "token_quota": 5})),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["name"], "Acme Corp");
    assert_eq!(v["products"], json!(["crm", "messaging"]));
    assert_eq!(v["token_quota"], 5);
    let (_, shown) = gw.admin("GET", "/v1/tenants/acme", None).await;
    assert_eq!(shown, v);
    for bad in [
        json!({"products": ["Not Valid"]}),
        json!({"products": "crm"}),
        json!({"token_quota": -2}),
        json!({"id": "other"}),
    ] {
        let (s, v) = gw.admin("PATCH", "/v1/tenants/acme", Some(bad)).await;
        assert_api_error(s, &v, 422, "invalid_tenant");
    }
    gw.stop().await;
}

#[tokio::test]
async fn deleting_a_tenant_is_204_and_its_tokens_stop_working_at_once() {
    let (b, gw) = gateway("").await;
    gw.tenant("acme", &["crm"], 1).await;
    let (tok, secret) = gw.token("acme", &["127.0.0.1"]).await;
    let g = get("127.0.0.1", &gw.url("/crm/x"), Some(&secret)).await;
    assert_eq!(g.status, 200);
    let (s, v) = gw.admin("DELETE", "/v1/tenants/acme", None).await;
    assert_eq!(s, 204, "{v}");
    assert_eq!(v, Value::Null);
    let g = get("127.0.0.1", &gw.url("/crm/x"), Some(&secret)).await;
    assert_error(&g, 401, "invalid_token");
    let (s, v) = gw.admin("GET", "/v1/tenants/acme", None).await;
    assert_api_error(s, &v, 404, "tenant_not_found");
    let (s, v) = gw.admin("GET", &format!("/v1/tokens/{tok}"), None).await;
    assert_api_error(s, &v, 404, "token_not_found");
    // Re-creating the id does not bring the old token back.
    gw.tenant("acme", &["crm"], 1).await;
    let g = get("127.0.0.1", &gw.url("/crm/x"), Some(&secret)).await;
    assert_error(&g, 401, "invalid_token");
    assert_eq!(b.crm.count(), 1);
    gw.stop().await;
}

// ---- tokens ---------------------------------------------------------------

#[tokio::test]
async fn token_create_shows_the_secret_once_and_nothing_else_ever_does() {
    let (_b, gw) = gateway("").await;
    gw.tenant("acme", &["crm", "marketing"], 1).await;
    let (s, v) = create_token(
        &gw,
        "acme",
        json!({"name": "ci", "ip_allowlist": ["127.0.0.1", "198.51.100.0/24", "2001:db8::/48"]}),
    )
    .await;
    assert_eq!(s, 201, "{v}");
    let secret = v["token"].as_str().unwrap().to_string();
    let id = v["id"].as_str().unwrap().to_string();
    assert!(secret.starts_with("tg_"), "{secret}");
    assert!(id.starts_with("tok_"), "{id}");
    assert_ne!(secret, id);
    assert_eq!(v["tenant"], "acme");
    assert_eq!(v["name"], "ci");
    assert_eq!(
        v["ip_allowlist"],
        json!(["127.0.0.1", "198.51.100.0/24", "2001:db8::/48"])
    );
    assert_eq!(v["products"], Value::Null);
    assert_eq!(v["status"], "active");
    assert_eq!(v["expires_at"], Value::Null);
    assert_eq!(v["last_used_at"], Value::Null);
    assert!(v["created_at"].is_string());

    // Use it once so last_used_at is set, then look everywhere.
    let g = get("127.0.0.1", &gw.url("/crm/x"), Some(&secret)).await;
    assert_eq!(g.status, 200);
    let hash = blake3::hash(secret.as_bytes()).to_hex().to_string();
    let mut outputs = Vec::new();
    let (_, shown) = gw.admin("GET", &format!("/v1/tokens/{id}"), None).await;
    assert!(shown.get("token").is_none(), "{shown}");
    assert!(shown.get("hash").is_none(), "{shown}");
    assert_eq!(shown["id"], id.as_str());
    assert!(shown["last_used_at"].is_string(), "{shown}");
    outputs.push(shown);
    let (_, list) = gw.admin("GET", "/v1/tenants/acme/tokens", None).await;
    assert_eq!(list["tokens"].as_array().unwrap().len(), 1);
    assert!(list["tokens"][0].get("token").is_none());
    outputs.push(list);
    outputs.push(gw.admin("GET", "/v1/tenants", None).await.1);
    outputs.push(gw.admin("GET", "/v1/tenants/acme", None).await.1);
    outputs.push(gw.admin("GET", "/v1/audit?limit=100", None).await.1);
    let (s, patched) = gw
        .admin(
            "PATCH",
            &format!("/v1/tokens/{id}"),
            Some(json!({"name": "ci2"})),
        )
        .await;
    assert_eq!(s, 200);
    assert!(patched.get("token").is_none(), "{patched}");
    outputs.push(patched);
    outputs.push(gw.admin("GET", "/v1/audit?limit=100", None).await.1);
    let metrics = gw.metrics().await;
    outputs.push(Value::String(metrics));
    for out in outputs {
        let text = out.to_string();
        assert!(!text.contains(&secret), "secret in {text}");
        assert!(!text.contains(&hash), "hash in {text}");
        assert!(
            !text.contains(&secret[3..20]),
            "part of the secret in {text}"
        );
    }
    gw.stop().await;
}

#[tokio::test]
async fn a_second_token_over_the_quota_is_409_token_quota_exceeded() {
    let (_b, gw) = gateway("").await;
    gw.tenant("acme", &["crm"], 1).await;
    gw.token("acme", &["127.0.0.1"]).await;
    let (s, v) = create_token(&gw, "acme", json!({"ip_allowlist": ["127.0.0.2"]})).await;
    assert_api_error(s, &v, 409, "token_quota_exceeded");
    // A disabled token still counts.
    let (_, list) = gw.admin("GET", "/v1/tenants/acme/tokens", None).await;
    let id = list["tokens"][0]["id"].as_str().unwrap().to_string();
    let (s, _) = gw
        .admin(
            "PATCH",
            &format!("/v1/tokens/{id}"),
            Some(json!({"disabled": true})),
        )
        .await;
    assert_eq!(s, 200);
    let (s, v) = create_token(&gw, "acme", json!({"ip_allowlist": ["127.0.0.2"]})).await;
    assert_api_error(s, &v, 409, "token_quota_exceeded");
    // Raising the quota lets one more in.
    let (s, _) = gw
        .admin("PATCH", "/v1/tenants/acme", Some(json!({"token_quota": 2})))
        .await;
    assert_eq!(s, 200);
    let (s, v) = create_token(&gw, "acme", json!({"ip_allowlist": ["127.0.0.2"]})).await;
    assert_eq!(s, 201, "{v}");
    let (s, v) = create_token(&gw, "acme", json!({"ip_allowlist": ["127.0.0.2"]})).await;
    assert_api_error(s, &v, 409, "token_quota_exceeded");
    let (_, t) = gw.admin("GET", "/v1/tenants/acme", None).await;
    assert_eq!(t["active_tokens"], 2);
    gw.stop().await;
}

#[tokio::test]
async fn bad_allowlists_are_422_invalid_allowlist_naming_the_entry() {
    let (_b, gw) = gateway("").await;
    gw.tenant("acme", &["crm"], 5).await;
    let cases: Vec<(Value, Option<String>)> = vec![
        (json!({"ip_allowlist": []}), None),
        (json!({}), None),
        (json!({"name": "x"}), None),
        (
            json!({"ip_allowlist": ["10.0.0.300"]}),
            Some("10.0.0.300".into()),
        ),
        (
            json!({"ip_allowlist": ["127.0.0.1", "not-an-ip"]}),
            Some("not-an-ip".into()),
        ),
        (
            json!({"ip_allowlist": ["10.0.0.0/33"]}),
            Some("10.0.0.0/33".into()),
        ),
        (
            json!({"ip_allowlist": ["example.com"]}),
            Some("example.com".into()),
        ),
        (
            json!({"ip_allowlist": ["fe80::1%eth0"]}),
            Some("fe80::1%eth0".into()),
        ),
        (json!({"ip_allowlist": [""]}), Some("\"\"".into())),
        (
            json!({"ip_allowlist": ["0.0.0.0/0"]}),
            Some("0.0.0.0/0".into()),
        ),
        (json!({"ip_allowlist": ["::/0"]}), Some("::/0".into())),
        // Not a list of strings: still the allowlist's code, naming the field.
        (
            json!({"ip_allowlist": "127.0.0.1"}),
            Some("ip_allowlist".into()),
        ),
        (
            json!({"ip_allowlist": ["127.0.0.1", 5]}),
            Some("ip_allowlist[1]".into()),
        ),
        (json!({"ip_allowlist": null}), None),
        (
            json!({"ip_allowlist": ["127.0.0.1", "0.0.0.0/0"]}),
            Some("0.0.0.0/0".into()),
        ),
    ];
    for (body, named) in cases {
        let (st, v) = create_token(&gw, "acme", body.clone()).await;
        assert_api_error(st, &v, 422, "invalid_allowlist");
        if let Some(entry) = named {
            assert!(msg(&v).contains(&entry), "{body}: {v}");
        }
    }
    // More than tokens.max_allowlist_entries (64): the first one over is named.
    let many: Vec<String> = (0..65).map(|i| format!("10.0.{i}.1")).collect();
    let (st, v) = create_token(&gw, "acme", json!({"ip_allowlist": many})).await;
    assert_api_error(st, &v, 422, "invalid_allowlist");
    assert!(msg(&v).contains("10.0.64.1"), "{v}");
    // Exactly 64 is fine.
    let (st, v) = create_token(&gw, "acme", json!({"ip_allowlist": many[..64]})).await;
    assert_eq!(st, 201, "{v}");
    // Nothing refused was created.
    let (_, list) = gw.admin("GET", "/v1/tenants/acme/tokens", None).await;
    assert_eq!(list["tokens"].as_array().unwrap().len(), 1);
    gw.stop().await;
}

#[tokio::test]
async fn any_address_blocks_are_allowed_when_allow_any_ip_is_true() {
    let (b, gw) = gateway("[tokens]\nallow_any_ip = true\n").await;
    gw.tenant("acme", &["crm"], 1).await;
    let (_, secret) = gw.token("acme", &["0.0.0.0/0", "::/0"]).await;
    for source in ["127.0.0.1", "127.0.0.2", "127.0.0.3"] {
        let g = get(source, &gw.url("/crm/x"), Some(&secret)).await;
        assert_eq!(g.status, 200, "{}", g.text);
    }
    assert_eq!(b.crm.count(), 3);
    gw.stop().await;
}

#[tokio::test]
async fn a_lower_max_allowlist_entries_is_enforced() {
    let (_b, gw) = gateway("[tokens]\nmax_allowlist_entries = 2\n").await;
    gw.tenant("acme", &["crm"], 1).await;
    let (s, v) = create_token(
        &gw,
        "acme",
        json!({"ip_allowlist": ["10.0.0.1", "10.0.0.2", "10.0.0.3"]}),
    )
    .await;
    assert_api_error(s, &v, 422, "invalid_allowlist");
    assert!(msg(&v).contains("10.0.0.3"), "{v}");
    gw.stop().await;
}

#[tokio::test]
async fn token_products_outside_the_tenants_are_422_product_not_purchased() {
    let (_b, gw) = gateway("").await;
    gw.tenant("acme", &["crm"], 2).await;
    let (s, v) = create_token(
        &gw,
        "acme",
        json!({"ip_allowlist": ["127.0.0.1"], "products": ["crm", "marketing"]}),
    )
    .await;
    assert_api_error(s, &v, 422, "product_not_purchased");
    assert!(msg(&v).contains("marketing"), "{v}");
    let (s, v) = create_token(
        &gw,
        "acme",
        json!({"ip_allowlist": ["127.0.0.1"], "products": ["crm"]}),
    )
    .await;
    assert_eq!(s, 201, "{v}");
    assert_eq!(v["products"], json!(["crm"]));
    let id = v["id"].as_str().unwrap();
    let (s, v) = gw
        .admin(
            "PATCH",
            &format!("/v1/tokens/{id}"),
            Some(json!({"products": ["messaging"]})),
        )
        .await;
    assert_api_error(s, &v, 422, "product_not_purchased");
    let (_, v) = gw.admin("GET", &format!("/v1/tokens/{id}"), None).await;
    assert_eq!(v["products"], json!(["crm"]));
    gw.stop().await;
}

#[tokio::test]
async fn tokens_are_listed_and_shown_and_unknown_ones_are_404() {
    let (_b, gw) = gateway("").await;
    gw.tenant("acme", &["crm"], 3).await;
    gw.tenant("other", &["crm"], 3).await;
    let (t1, _) = gw.token("acme", &["127.0.0.1"]).await;
    let (t2, _) = gw.token("acme", &["127.0.0.2"]).await;
    gw.token("other", &["127.0.0.3"]).await;
    let (s, v) = gw.admin("GET", "/v1/tenants/acme/tokens", None).await;
    assert_eq!(s, 200);
    let ids: Vec<&str> = v["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, [t1.as_str(), t2.as_str()]);
    let (s, v) = gw.admin("GET", &format!("/v1/tokens/{t2}"), None).await;
    assert_eq!(s, 200);
    assert_eq!(v["id"], t2.as_str());
    assert_eq!(v["tenant"], "acme");
    assert_eq!(v["ip_allowlist"], json!(["127.0.0.2"]));
    let nobody = "tok_01ARZ3NDEKTSV4RRFFQ69G5FAV";
    let (s, v) = gw.admin("GET", &format!("/v1/tokens/{nobody}"), None).await;
    assert_api_error(s, &v, 404, "token_not_found");
    let (s, v) = gw
        .admin(
            "PATCH",
            &format!("/v1/tokens/{nobody}"),
            Some(json!({"name": "x"})),
        )
        .await;
    assert_api_error(s, &v, 404, "token_not_found");
    let (s, v) = gw
        .admin("DELETE", &format!("/v1/tokens/{nobody}"), None)
        .await;
    assert_api_error(s, &v, 404, "token_not_found");
    let (s, v) = gw
        .admin(
            "POST",
            &format!("/v1/tokens/{nobody}/rotate"),
            Some(json!({})),
        )
        .await;
    assert_api_error(s, &v, 404, "token_not_found");
    gw.stop().await;
}

#[tokio::test]
async fn token_patch_changes_each_field_and_the_data_plane_follows_at_once() {
    let (b, gw) = gateway("").await;
    gw.tenant("acme", &["crm", "marketing"], 1).await;
    let (id, secret) = gw.token("acme", &["127.0.0.1"]).await;
    let path = format!("/v1/tokens/{id}");
    let call = |p: &'static str, src: &'static str| {
        let url = gw.url(p);
        let secret = secret.clone();
        async move { get(src, &url, Some(&secret)).await }
    };

    // name
    let (s, v) = gw
        .admin("PATCH", &path, Some(json!({"name": "deploy bot"})))
        .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["name"], "deploy bot");
    assert_eq!(v["ip_allowlist"], json!(["127.0.0.1"]));

    // ip_allowlist
    let (s, v) = gw
        .admin("PATCH", &path, Some(json!({"ip_allowlist": ["127.0.0.2"]})))
        .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["ip_allowlist"], json!(["127.0.0.2"]));
    assert_eq!(call("/crm/x", "127.0.0.2").await.status, 200);
    assert_error(&call("/crm/x", "127.0.0.1").await, 403, "ip_not_allowed");
    for bad in [json!([]), json!(["nope"]), json!(["::/0"])] {
        let (s, v) = gw
            .admin("PATCH", &path, Some(json!({"ip_allowlist": bad})))
            .await;
        assert_api_error(s, &v, 422, "invalid_allowlist");
    }

    // products, then null (= all of the tenant's)
    let (s, v) = gw
        .admin("PATCH", &path, Some(json!({"products": ["crm"]})))
        .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["products"], json!(["crm"]));
    assert_error(
        &call("/marketing/x", "127.0.0.2").await,
        403,
        "product_not_enabled",
    );
    let (s, v) = gw
        .admin("PATCH", &path, Some(json!({"products": null})))
        .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["products"], Value::Null);
    assert_eq!(call("/marketing/x", "127.0.0.2").await.status, 200);

    // expires_at, then null
    let (s, v) = gw
        .admin(
            "PATCH",
            &path,
            Some(json!({"expires_at": "2999-01-31T00:00:00Z"})),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["expires_at"], "2999-01-31T00:00:00Z");
    assert_eq!(v["status"], "active");
    let (s, v) = gw
        .admin("PATCH", &path, Some(json!({"expires_at": null})))
        .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["expires_at"], Value::Null);

    // disabled
    let (s, v) = gw
        .admin("PATCH", &path, Some(json!({"disabled": true})))
        .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["status"], "disabled");
    assert_error(&call("/crm/x", "127.0.0.2").await, 401, "invalid_token");
    let (_, v) = gw.admin("GET", &path, None).await;
    assert_eq!(v["status"], "disabled");
    let (s, v) = gw
        .admin("PATCH", &path, Some(json!({"disabled": false})))
        .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["status"], "active");
    assert_eq!(call("/crm/x", "127.0.0.2").await.status, 200);

    // The untouched fields kept their values throughout.
    let (_, v) = gw.admin("GET", &path, None).await;
    assert_eq!(v["name"], "deploy bot");
    assert_eq!(v["ip_allowlist"], json!(["127.0.0.2"]));
    assert_eq!(b.crm.count(), 2);
    gw.stop().await;
}

#[tokio::test]
async fn deleting_a_token_revokes_it_and_frees_its_quota_slot() {
    let (b, gw) = gateway("").await;
    gw.tenant("acme", &["crm"], 1).await;
    let (id, secret) = gw.token("acme", &["127.0.0.1"]).await;
    assert_eq!(
        get("127.0.0.1", &gw.url("/crm/x"), Some(&secret))
            .await
            .status,
        200
    );
    let (s, v) = gw.admin("DELETE", &format!("/v1/tokens/{id}"), None).await;
    assert_eq!(s, 204, "{v}");
    let g = get("127.0.0.1", &gw.url("/crm/x"), Some(&secret)).await;
    assert_error(&g, 401, "invalid_token");
    let (s, v) = gw.admin("GET", &format!("/v1/tokens/{id}"), None).await;
    assert_eq!(s, 200);
    assert_eq!(v["status"], "revoked");
    let (_, t) = gw.admin("GET", "/v1/tenants/acme", None).await;
    assert_eq!(t["active_tokens"], 0);
    // A new token fits in the freed slot; the old one stays dead.
    let (_, secret2) = gw.token("acme", &["127.0.0.1"]).await;
    assert_eq!(
        get("127.0.0.1", &gw.url("/crm/x"), Some(&secret2))
            .await
            .status,
        200
    );
    let g = get("127.0.0.1", &gw.url("/crm/x"), Some(&secret)).await;
    assert_error(&g, 401, "invalid_token");
    // A revoked token cannot be brought back by enabling it.
    let (s, _) = gw
        .admin(
            "PATCH",
            &format!("/v1/tokens/{id}"),
            Some(json!({"disabled": false})),
        )
        .await;
    assert_ne!(s, 200);
    let g = get("127.0.0.1", &gw.url("/crm/x"), Some(&secret)).await;
    assert_error(&g, 401, "invalid_token");
    assert_eq!(b.crm.count(), 2);
    gw.stop().await;
}

#[tokio::test]
async fn rotation_with_grace_keeps_the_old_secret_working_for_the_grace() {
    let (b, gw) = gateway("").await;
    gw.tenant("acme", &["crm"], 1).await;
    let (id, old) = gw.token("acme", &["127.0.0.1"]).await;
    let (s, v) = gw
        .admin(
            "POST",
            &format!("/v1/tokens/{id}/rotate"),
            Some(json!({"grace": "5m"})),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    let new = v["token"].as_str().unwrap().to_string();
    assert_ne!(new, old);
    assert_eq!(v["id"], id.as_str());
    assert_eq!(v["status"], "active");
    assert_eq!(
        get("127.0.0.1", &gw.url("/crm/x"), Some(&old)).await.status,
        200
    );
    assert_eq!(
        get("127.0.0.1", &gw.url("/crm/x"), Some(&new)).await.status,
        200
    );
    let (_, shown) = gw.admin("GET", &format!("/v1/tokens/{id}"), None).await;
    assert!(shown.get("token").is_none());
    assert!(!shown.to_string().contains(&new));
    // Rotating is not a second token: the quota of 1 is not exceeded.
    let (_, t) = gw.admin("GET", "/v1/tenants/acme", None).await;
    assert_eq!(t["active_tokens"], 1);
    // Revoking ends the grace too.
    let (s, _) = gw.admin("DELETE", &format!("/v1/tokens/{id}"), None).await;
    assert_eq!(s, 204);
    for t in [&old, &new] {
        assert_error(
            &get("127.0.0.1", &gw.url("/crm/x"), Some(t)).await,
            401,
            "invalid_token",
        );
    }
    assert_eq!(b.crm.count(), 2);
    gw.stop().await;
}

#[tokio::test]
async fn rotation_without_grace_refuses_the_old_secret_at_once() {
    let (_b, gw) = gateway("").await;
    gw.tenant("acme", &["crm"], 1).await;
    let (id, old) = gw.token("acme", &["127.0.0.1"]).await;
    // An empty body and an empty object both mean "no grace".
    let (s, v) = gw
        .admin("POST", &format!("/v1/tokens/{id}/rotate"), None)
        .await;
    assert_eq!(s, 200, "{v}");
    let mid = v["token"].as_str().unwrap().to_string();
    assert_error(
        &get("127.0.0.1", &gw.url("/crm/x"), Some(&old)).await,
        401,
        "invalid_token",
    );
    let (s, v) = gw
        .admin("POST", &format!("/v1/tokens/{id}/rotate"), Some(json!({})))
        .await;
    assert_eq!(s, 200, "{v}");
    let new = v["token"].as_str().unwrap().to_string();
    assert_error(
        &get("127.0.0.1", &gw.url("/crm/x"), Some(&mid)).await,
        401,
        "invalid_token",
    );
    assert_eq!(
        get("127.0.0.1", &gw.url("/crm/x"), Some(&new)).await.status,
        200
    );
    // A grace that is not a duration is refused and changes nothing.
    let (s, _) = gw
        .admin(
            "POST",
            &format!("/v1/tokens/{id}/rotate"),
            Some(json!({"grace": "soon"})),
        )
        .await;
    assert_eq!(s, 422);
    assert_eq!(
        get("127.0.0.1", &gw.url("/crm/x"), Some(&new)).await.status,
        200
    );
    gw.stop().await;
}

#[tokio::test]
async fn the_old_secret_is_refused_once_the_grace_has_passed() {
    let (_b, gw) = gateway("").await;
    gw.tenant("acme", &["crm"], 1).await;
    let (id, old) = gw.token("acme", &["127.0.0.1"]).await;
    let (s, v) = gw
        .admin(
            "POST",
            &format!("/v1/tokens/{id}/rotate"),
            Some(json!({"grace": "1s"})),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    let new = v["token"].as_str().unwrap().to_string();
    let url = gw.url("/crm/x");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let g = get("127.0.0.1", &url, Some(&old)).await;
        if g.status == 401 {
            assert_error(&g, 401, "invalid_token");
            break;
        }
        assert_eq!(g.status, 200, "{}", g.text);
        assert!(
            std::time::Instant::now() < deadline,
            "the grace never ended"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(get("127.0.0.1", &url, Some(&new)).await.status, 200);
    gw.stop().await;
}

// ---- quota under concurrency ----------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn twenty_concurrent_creates_on_a_quota_of_one_give_exactly_one_token() {
    let (_b, gw) = gateway("").await;
    gw.tenant("acme", &["crm"], 1).await;
    let admin = gw.admin;
    let tasks: Vec<_> = (0..20)
        .map(|i| {
            tokio::spawn(async move {
                admin_call(
                    admin,
                    "POST",
                    "/v1/tenants/acme/tokens",
                    Some(json!({"name": format!("t{i}"), "ip_allowlist": ["127.0.0.1"]})),
                    Some(ADMIN_KEY),
                )
                .await
            })
        })
        .collect();
    let mut created = 0;
    let mut refused = 0;
    for t in tasks {
        let (s, v) = t.await.unwrap();
        match s {
            201 => created += 1,
            409 => {
                assert_eq!(v["error"]["code"], "token_quota_exceeded", "{v}");
                refused += 1;
            }
            other => panic!("unexpected {other}: {v}"),
        }
    }
    assert_eq!((created, refused), (1, 19));
    let (_, list) = gw.admin("GET", "/v1/tenants/acme/tokens", None).await;
    assert_eq!(list["tokens"].as_array().unwrap().len(), 1);
    let (_, t) = gw.admin("GET", "/v1/tenants/acme", None).await;
    assert_eq!(t["active_tokens"], 1);
    gw.stop().await;
}

#[tokio::test]
async fn lowering_a_quota_below_the_count_refuses_new_tokens_but_revokes_none() {
    let (b, gw) = gateway("").await;
    gw.tenant("acme", &["crm"], 3).await;
    let mut secrets = Vec::new();
    for _ in 0..3 {
        secrets.push(gw.token("acme", &["127.0.0.1"]).await.1);
    }
    let (s, v) = gw
        .admin("PATCH", "/v1/tenants/acme", Some(json!({"token_quota": 1})))
        .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["token_quota"], 1);
    assert_eq!(v["active_tokens"], 3);
    let (s, v) = create_token(&gw, "acme", json!({"ip_allowlist": ["127.0.0.1"]})).await;
    assert_api_error(s, &v, 409, "token_quota_exceeded");
    for secret in &secrets {
        assert_eq!(
            get("127.0.0.1", &gw.url("/crm/x"), Some(secret))
                .await
                .status,
            200
        );
    }
    let (_, list) = gw.admin("GET", "/v1/tenants/acme/tokens", None).await;
    for t in list["tokens"].as_array().unwrap() {
        assert_eq!(t["status"], "active");
    }
    // Edits to the over-quota tokens still work.
    let id = list["tokens"][0]["id"].as_str().unwrap();
    let (s, v) = gw
        .admin(
            "PATCH",
            &format!("/v1/tokens/{id}"),
            Some(json!({"name": "kept"})),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    // Revoking two brings the count to the quota; still no room for a new one.
    for t in &list["tokens"].as_array().unwrap()[..2] {
        let (s, _) = gw
            .admin(
                "DELETE",
                &format!("/v1/tokens/{}", t["id"].as_str().unwrap()),
                None,
            )
            .await;
        assert_eq!(s, 204);
    }
    let (s, v) = create_token(&gw, "acme", json!({"ip_allowlist": ["127.0.0.1"]})).await;
    assert_api_error(s, &v, 409, "token_quota_exceeded");
    assert_eq!(b.crm.count(), 3);
    gw.stop().await;
}

// ---- audit, metrics -------------------------------------------------------

#[tokio::test]
async fn the_audit_log_lists_changes_newest_first_with_the_key_id_as_actor() {
    let (_b, gw) = gateway("").await;
    gw.tenant("acme", &["crm"], 2).await;
    let (id, secret) = gw.token("acme", &["127.0.0.1"]).await;
    let (s, _) = gw
        .admin(
            "PATCH",
            &format!("/v1/tokens/{id}"),
            Some(json!({"disabled": true})),
        )
        .await;
    assert_eq!(s, 200);
    let (s, _) = gw
        .admin("POST", &format!("/v1/tokens/{id}/rotate"), None)
        .await;
    assert_eq!(s, 200);
    let (s, _) = gw.admin("DELETE", &format!("/v1/tokens/{id}"), None).await;
    assert_eq!(s, 204);
    let (s, _) = gw
        .admin("PATCH", "/v1/tenants/acme", Some(json!({"name": "Acme"})))
        .await;
    assert_eq!(s, 200);
    // Reads and refused calls are not changes.
    gw.admin("GET", "/v1/tenants", None).await;
    gw.admin("POST", "/v1/tenants", Some(json!({"id": "acme"})))
        .await;

    let (s, v) = gw.admin("GET", "/v1/audit?limit=100", None).await;
    assert_eq!(s, 200, "{v}");
    let events = v["events"].as_array().unwrap();
    let targets: Vec<(&str, &str)> = events
        .iter()
        .map(|e| (e["action"].as_str().unwrap(), e["target"].as_str().unwrap()))
        .collect();
    assert_eq!(targets.len(), 6, "{v}");
    assert_eq!(targets[0], ("tenant.update", "acme"));
    assert_eq!(targets[5], ("tenant.create", "acme"));
    for (e, target) in events.iter().zip(["acme", &id, &id, &id, &id, "acme"]) {
        assert_eq!(e["target"], target, "{e}");
    }
    let key_id = &blake3::hash(ADMIN_KEY.as_bytes()).to_hex()[..8];
    let mut last_at = String::from("~");
    for e in events {
        assert!(e["at"].is_string() && e.get("detail").is_some(), "{e}");
        let actor = e["actor"].as_str().unwrap();
        assert!(actor.contains(key_id), "{actor}");
        assert!(!actor.contains(ADMIN_KEY));
        let at = e["at"].as_str().unwrap().to_string();
        assert!(at <= last_at, "not newest first: {v}");
        last_at = at;
    }
    let text = v.to_string();
    assert!(!text.contains(ADMIN_KEY));
    assert!(!text.contains(&secret));
    assert!(!text.contains(&blake3::hash(ADMIN_KEY.as_bytes()).to_hex().to_string()));

    let (s, v) = gw.admin("GET", "/v1/audit?limit=2", None).await;
    assert_eq!(s, 200);
    let two = v["events"].as_array().unwrap();
    assert_eq!(two.len(), 2);
    assert_eq!(two[0], events[0]);
    assert_eq!(two[1], events[1]);
    gw.stop().await;
}

/// The value of the `tollgate_requests_total` line with these labels.
fn requests_total(metrics: &str, route: &str, outcome: &str, status: u16) -> Option<f64> {
    metrics
        .lines()
        .filter(|l| l.starts_with("tollgate_requests_total{"))
        .find(|l| {
            l.contains(&format!("route=\"{route}\""))
                && l.contains(&format!("outcome=\"{outcome}\""))
                && l.contains(&format!("status=\"{status}\""))
        })
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[tokio::test]
async fn metrics_count_requests_by_route_outcome_and_status() {
    let (_b, gw) = gateway("").await;
    gw.tenant("acme", &["crm"], 1).await;
    let (_, secret) = gw.token("acme", &["127.0.0.1"]).await;
    for _ in 0..3 {
        assert_eq!(
            get("127.0.0.1", &gw.url("/crm/x"), Some(&secret))
                .await
                .status,
            200
        );
    }
    get("127.0.0.1", &gw.url("/crm/x"), None).await;
    get("127.0.0.1", &gw.url("/crm/x"), Some("garbage")).await;
    get("127.0.0.2", &gw.url("/crm/x"), Some(&secret)).await;
    get("127.0.0.1", &gw.url("/marketing/x"), Some(&secret)).await;
    get("127.0.0.1", &gw.url("/nowhere"), None).await;
    let text = gw.metrics().await;
    assert_eq!(
        requests_total(&text, "/crm/", "forwarded", 200),
        Some(3.0),
        "{text}"
    );
    assert_eq!(
        requests_total(&text, "/crm/", "missing_token", 401),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        requests_total(&text, "/crm/", "invalid_token", 401),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        requests_total(&text, "/crm/", "ip_not_allowed", 403),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        requests_total(&text, "/marketing/", "product_not_enabled", 403),
        Some(1.0),
        "{text}"
    );
    assert!(
        text.lines().any(
            |l| l.starts_with("tollgate_requests_total{") && l.contains("outcome=\"no_route\"")
        ),
        "{text}"
    );
    for name in [
        "tollgate_request_duration_seconds",
        "tollgate_upstream_duration_seconds",
        "tollgate_tokens",
        "tollgate_tenants",
    ] {
        assert!(text.contains(name), "{name} missing: {text}");
    }
    assert!(!text.contains(&secret));
    gw.stop().await;
}

/// The value of an unlabelled gauge in a Prometheus text page.
#[tokio::test]
async fn the_tokens_gauge_counts_active_tokens_only() {
    let (_b, gw) = gateway("").await;
    gw.tenant("acme", &["crm"], 5).await;
    gw.tenant("zeta", &["crm"], 5).await;
    let mut ids = Vec::new();
    for t in ["acme", "acme", "acme", "zeta"] {
        let (st, v) = create_token(&gw, t, json!({"ip_allowlist": ["127.0.0.1"]})).await;
        assert_eq!(st, 201, "{v}");
        ids.push(v["id"].as_str().unwrap().to_string());
    }
    let scrape = || async {
        let text = gw.metrics().await;
        (
            metric_value(&text, "tollgate_tokens"),
            metric_value(&text, "tollgate_tenants"),
        )
    };
    assert_eq!(scrape().await, (Some(4.0), Some(2.0)));
    let (st, v) = gw
        .admin(
            "PATCH",
            &format!("/v1/tokens/{}", ids[0]),
            Some(json!({"disabled": true})),
        )
        .await;
    assert_eq!((st, v["status"].as_str()), (200, Some("disabled")), "{v}");
    let (st, _) = gw
        .admin("DELETE", &format!("/v1/tokens/{}", ids[1]), None)
        .await;
    assert_eq!(st, 204);
    assert_eq!(scrape().await, (Some(2.0), Some(2.0)));
    let (st, _) = gw.admin("DELETE", "/v1/tenants/zeta", None).await;
    assert_eq!(st, 204);
    assert_eq!(scrape().await, (Some(1.0), Some(1.0)));
    gw.stop().await;
}
