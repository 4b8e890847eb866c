//! `tollgate tenant …` and `tollgate token …` against a running gateway:
//! each command makes its admin call and prints the answer as JSON; errors
//! exit 1 with the API's status and code on stderr.

mod support;

use serde_json::Value;
use support::*;

/// Runs the real binary as the admin client of `gw`. Async so the
/// in-process gateway keeps serving while the child runs.
async fn cli(gw: &TestGateway, key: Option<&str>, args: &[&str]) -> (i32, Value, String) {
    let mut cmd = tokio::process::Command::new(bin());
    cmd.args(args)
        .env("TOLLGATE_ADMIN_URL", format!("http://{}", gw.admin))
        .env_remove("TOLLGATE_ADMIN_KEY");
    if let Some(k) = key {
        cmd.env("TOLLGATE_ADMIN_KEY", k);
    }
    let out = cmd.output().await.unwrap();
    let stdout = String::from_utf8(out.stdout).unwrap();
    let stderr = String::from_utf8(out.stderr).unwrap();
    let v = serde_json::from_str(&stdout).unwrap_or(Value::Null);
    (out.status.code().unwrap(), v, stderr)
}

/// A command that must succeed; returns its JSON.
async fn ok(gw: &TestGateway, args: &[&str]) -> Value {
    let (code, v, err) = cli(gw, Some(ADMIN_KEY), args).await;
    assert_eq!(code, 0, "{args:?}: {err}");
    assert!(!v.is_null(), "{args:?} printed no JSON");
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenant_commands_create_list_show_update_and_delete() {
    let b = Backends::start().await;
    let gw = TestGateway::start(&b, "").await;
    let v = ok(
        &gw,
        &[
            "tenant",
            "create",
            "acme",
            "--name",
            "Acme Corp",
            "--product",
            "crm",
            "--product",
            "marketing",
            "--quota",
            "2",
        ],
    )
    .await;
    assert_eq!(v["id"], "acme");
    assert_eq!(v["name"], "Acme Corp");
    assert_eq!(v["products"], serde_json::json!(["crm", "marketing"]));
    assert_eq!(v["token_quota"], 2);
    let v = ok(&gw, &["tenant", "create", "globex"]).await;
    assert_eq!(v["products"], serde_json::json!([]));
    assert_eq!(v["token_quota"], 1);

    let v = ok(&gw, &["tenant", "list"]).await;
    let ids: Vec<&str> = v["tenants"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["acme", "globex"]);

    let v = ok(&gw, &["tenant", "show", "acme"]).await;
    assert_eq!(v["name"], "Acme Corp");

    let v = ok(
        &gw,
        &[
            "tenant",
            "update",
            "acme",
            "--product",
            "crm",
            "--quota",
            "3",
        ],
    )
    .await;
    assert_eq!(v["products"], serde_json::json!(["crm"]));
    assert_eq!(v["token_quota"], 3);
    assert_eq!(v["name"], "Acme Corp");
    // The change went through the API: the gateway itself sees it.
    let (_, shown) = gw.admin("GET", "/v1/tenants/acme", None).await;
    assert_eq!(shown["token_quota"], 3);

    let v = ok(&gw, &["tenant", "delete", "globex"]).await;
    assert_eq!(v["deleted"], "globex");
    let (s, _) = gw.admin("GET", "/v1/tenants/globex", None).await;
    assert_eq!(s, 404);

    // Errors: exit 1, the API's status and code on stderr.
    let (code, _, err) = cli(&gw, Some(ADMIN_KEY), &["tenant", "show", "globex"]).await;
    assert_eq!(code, 1);
    assert!(
        err.contains("404") && err.contains("tenant_not_found"),
        "{err}"
    );
    let (code, _, err) = cli(&gw, Some(ADMIN_KEY), &["tenant", "create", "acme"]).await;
    assert_eq!(code, 1);
    assert!(
        err.contains("409") && err.contains("tenant_exists"),
        "{err}"
    );
    let (code, _, err) = cli(&gw, Some(ADMIN_KEY), &["tenant", "create", "Bad Id"]).await;
    assert_eq!(code, 1);
    assert!(
        err.contains("422") && err.contains("invalid_tenant"),
        "{err}"
    );
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_commands_create_list_show_update_rotate_and_revoke() {
    let b = Backends::start().await;
    let gw = TestGateway::start(&b, "").await;
    gw.tenant("acme", &["crm", "marketing"], 1).await;
    let url = gw.url("/crm/x");

    let v = ok(
        &gw,
        &[
            "token",
            "create",
            "acme",
            "--allow",
            "127.0.0.1",
            "--allow",
            "10.0.0.0/8",
            "--name",
            "ci",
            "--product",
            "crm",
        ],
    )
    .await;
    let id = v["id"].as_str().unwrap().to_string();
    let secret = v["token"].as_str().unwrap().to_string();
    assert_eq!(v["name"], "ci");
    assert_eq!(v["products"], serde_json::json!(["crm"]));
    assert_eq!(
        v["ip_allowlist"],
        serde_json::json!(["127.0.0.1", "10.0.0.0/8"])
    );
    assert_eq!(get("127.0.0.1", &url, Some(&secret)).await.status, 200);

    let v = ok(&gw, &["token", "list", "acme"]).await;
    assert_eq!(v["tokens"].as_array().unwrap().len(), 1);
    assert_eq!(v["tokens"][0]["id"], id.as_str());
    assert!(!v.to_string().contains(&secret));
    let v = ok(&gw, &["token", "show", &id]).await;
    assert_eq!(v["id"], id.as_str());
    assert!(v.get("token").is_none());

    // Over the quota: exit 1 with the code.
    let (code, _, err) = cli(
        &gw,
        Some(ADMIN_KEY),
        &["token", "create", "acme", "--allow", "127.0.0.1"],
    )
    .await;
    assert_eq!(code, 1);
    assert!(
        err.contains("409") && err.contains("token_quota_exceeded"),
        "{err}"
    );
    let (code, _, err) = cli(
        &gw,
        Some(ADMIN_KEY),
        &["token", "update", &id, "--allow", "0.0.0.0/0"],
    )
    .await;
    assert_eq!(code, 1);
    assert!(
        err.contains("invalid_allowlist") && err.contains("0.0.0.0/0"),
        "{err}"
    );

    let v = ok(
        &gw,
        &[
            "token",
            "update",
            &id,
            "--allow",
            "127.0.0.2",
            "--name",
            "ci-2",
        ],
    )
    .await;
    assert_eq!(v["ip_allowlist"], serde_json::json!(["127.0.0.2"]));
    assert_eq!(v["name"], "ci-2");
    assert_eq!(get("127.0.0.2", &url, Some(&secret)).await.status, 200);
    assert_error(
        &get("127.0.0.1", &url, Some(&secret)).await,
        403,
        "ip_not_allowed",
    );

    let v = ok(&gw, &["token", "update", &id, "--disable"]).await;
    assert_eq!(v["status"], "disabled");
    assert_error(
        &get("127.0.0.2", &url, Some(&secret)).await,
        401,
        "invalid_token",
    );
    let v = ok(&gw, &["token", "update", &id, "--enable"]).await;
    assert_eq!(v["status"], "active");
    assert_eq!(get("127.0.0.2", &url, Some(&secret)).await.status, 200);

    let v = ok(&gw, &["token", "rotate", &id, "--grace", "5m"]).await;
    let rotated = v["token"].as_str().unwrap().to_string();
    assert_ne!(rotated, secret);
    assert_eq!(get("127.0.0.2", &url, Some(&rotated)).await.status, 200);
    assert_eq!(get("127.0.0.2", &url, Some(&secret)).await.status, 200);
    let v = ok(&gw, &["token", "rotate", &id]).await;
    let latest = v["token"].as_str().unwrap().to_string();
    assert_error(
        &get("127.0.0.2", &url, Some(&rotated)).await,
        401,
        "invalid_token",
    );

    let v = ok(&gw, &["token", "revoke", &id]).await;
    assert_eq!(v["revoked"], id.as_str());
    assert_error(
        &get("127.0.0.2", &url, Some(&latest)).await,
        401,
        "invalid_token",
    );
    let v = ok(&gw, &["token", "show", &id]).await;
    assert_eq!(v["status"], "revoked");
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_client_needs_a_valid_key() {
    let b = Backends::start().await;
    let gw = TestGateway::start(&b, "").await;
    let (code, _, err) = cli(&gw, None, &["tenant", "list"]).await;
    assert_eq!(code, 1);
    assert!(err.contains("TOLLGATE_ADMIN_KEY"), "{err}");
    let (code, _, err) = cli(&gw, Some("wrong"), &["tenant", "list"]).await;
    assert_eq!(code, 1);
    assert!(err.contains("401") && err.contains("unauthorized"), "{err}");
    // An unreachable admin API is reported as such.
    let out = tokio::process::Command::new(bin())
        .args(["tenant", "list"])
        .env(
            "TOLLGATE_ADMIN_URL",
            format!("http://127.0.0.1:{}", free_port()),
        )
        .env("TOLLGATE_ADMIN_KEY", ADMIN_KEY)
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("TOLLGATE_ADMIN_URL"));
    gw.stop().await;
}
