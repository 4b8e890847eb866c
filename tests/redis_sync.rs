//! The Redis store with several gateway instances: live propagation,
//! cross-instance quota, outages (paused, killed, cut off, down at start),
//! migration, and no secret in Redis. Every test runs real `redis-server`
//! processes on loopback ports.

mod support;

use std::time::Duration;

use serde_json::json;
use support::redis::{eventually, redis_config_text, RedisServer, Relay};
use support::*;

/// Generous upper bound for propagation polls (the contract says 1 s; the
/// benchmark measures the real figure).
const SOON: Duration = Duration::from_secs(5);

async fn gateway_on(b: &Backends, url: &str) -> TestGateway {
    let dir = tempfile::tempdir().unwrap();
    TestGateway::start_text(dir, &redis_config_text(b, url, "tg:")).await
}

/// Waits until the instance has loaded from Redis (`/readyz` 200).
async fn wait_ready(gw: &TestGateway) {
    let admin = gw.admin;
    eventually(
        Duration::from_secs(20),
        "the gateway is ready",
        || async move { admin_call(admin, "GET", "/readyz", None, None).await.0 == 200 },
    )
    .await;
}

async fn status_of(gw: &TestGateway, path: &str, token: &str) -> u16 {
    get("127.0.0.1", &gw.url(path), Some(token)).await.status
}

async fn wait_status(gw: &TestGateway, path: &str, token: &str, want: u16, what: &str) {
    let url = gw.url(path);
    let token = token.to_string();
    eventually(SOON, what, || {
        let (url, token) = (url.clone(), token.clone());
        async move { get("127.0.0.1", &url, Some(&token)).await.status == want }
    })
    .await;
}

async fn store_connected(gw: &TestGateway) -> bool {
    let (_, v) = admin_call(gw.admin, "GET", "/readyz", None, None).await;
    v["store"]["connected"] == true
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_on_one_instance_reach_the_other() {
    let redis = RedisServer::start();
    let b = Backends::start().await;
    let a = gateway_on(&b, &redis.url()).await;
    let bb = gateway_on(&b, &redis.url()).await;
    wait_ready(&a).await;
    wait_ready(&bb).await;

    // Create on A → works on B.
    a.tenant("acme", &["crm", "messaging"], 5).await;
    let (id, secret) = a.token("acme", &["127.0.0.1"]).await;
    assert_eq!(status_of(&a, "/crm/x", &secret).await, 200);
    wait_status(
        &bb,
        "/crm/x",
        &secret,
        200,
        "B accepts the token created on A",
    )
    .await;
    let (s, v) = bb.admin("GET", &format!("/v1/tokens/{id}"), None).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["tenant"], "acme");

    // Patch on A (allowlist elsewhere) → B refuses with 403.
    let (s, v) = a
        .admin(
            "PATCH",
            &format!("/v1/tokens/{id}"),
            Some(json!({"ip_allowlist": ["10.9.9.9"]})),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    wait_status(&bb, "/crm/x", &secret, 403, "B applies the new allowlist").await;
    let g = get("127.0.0.1", &bb.url("/crm/x"), Some(&secret)).await;
    assert_error(&g, 403, "ip_not_allowed");

    // Patch back on B → A accepts again.
    let (s, v) = bb
        .admin(
            "PATCH",
            &format!("/v1/tokens/{id}"),
            Some(json!({"ip_allowlist": ["127.0.0.1"]})),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    wait_status(&a, "/crm/x", &secret, 200, "A applies B's patch").await;

    // Tenant product change on B → A refuses the product.
    let (s, v) = bb
        .admin(
            "PATCH",
            "/v1/tenants/acme",
            Some(json!({"products": ["messaging"]})),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    wait_status(&a, "/crm/x", &secret, 403, "A sees the tenant lost crm").await;
    let g = get("127.0.0.1", &a.url("/crm/x"), Some(&secret)).await;
    assert_error(&g, 403, "product_not_enabled");
    assert_eq!(status_of(&a, "/messaging/x", &secret).await, 200);

    // Revoke on A → B refuses with 401.
    let (s, _) = a.admin("DELETE", &format!("/v1/tokens/{id}"), None).await;
    assert_eq!(s, 204);
    wait_status(
        &bb,
        "/messaging/x",
        &secret,
        401,
        "B refuses the revoked token",
    )
    .await;
    let g = get("127.0.0.1", &bb.url("/messaging/x"), Some(&secret)).await;
    assert_error(&g, 401, "invalid_token");

    // Rotation on B → A accepts the new secret and refuses the old one.
    let (id2, secret2) = bb.token("acme", &["127.0.0.1"]).await;
    wait_status(&a, "/messaging/x", &secret2, 200, "A accepts B's token").await;
    let (s, v) = bb
        .admin("POST", &format!("/v1/tokens/{id2}/rotate"), Some(json!({})))
        .await;
    assert_eq!(s, 200, "{v}");
    let rotated = v["token"].as_str().unwrap().to_string();
    wait_status(
        &a,
        "/messaging/x",
        &rotated,
        200,
        "A accepts the rotated secret",
    )
    .await;
    wait_status(
        &a,
        "/messaging/x",
        &secret2,
        401,
        "A refuses the old secret",
    )
    .await;

    // Tenant delete on B → A refuses its tokens and forgets the tenant.
    let (s, _) = bb.admin("DELETE", "/v1/tenants/acme", None).await;
    assert_eq!(s, 204);
    wait_status(
        &a,
        "/messaging/x",
        &rotated,
        401,
        "A drops the deleted tenant's tokens",
    )
    .await;
    let (s, v) = a.admin("GET", "/v1/tenants/acme", None).await;
    assert_eq!(s, 404, "{v}");
    assert_eq!(v["error"]["code"], "tenant_not_found");
    let (s, _) = a.admin("GET", &format!("/v1/tokens/{id2}"), None).await;
    assert_eq!(s, 404);
    assert_eq!(a.gateway().table.tenants(), 0);
    eventually(SOON, "B's table forgets the tenant", || async {
        bb.gateway().table.tenants() == 0
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forty_concurrent_creates_on_a_quota_one_tenant_over_two_instances_give_one_token() {
    let redis = RedisServer::start();
    let b = Backends::start().await;
    let a = gateway_on(&b, &redis.url()).await;
    let bb = gateway_on(&b, &redis.url()).await;
    wait_ready(&a).await;
    wait_ready(&bb).await;
    a.tenant("solo", &["crm"], 1).await;

    let mut calls = Vec::new();
    for i in 0..40 {
        let admin = if i % 2 == 0 { a.admin } else { bb.admin };
        calls.push(tokio::spawn(async move {
            admin_call(
                admin,
                "POST",
                "/v1/tenants/solo/tokens",
                Some(json!({"ip_allowlist": ["127.0.0.1"]})),
                Some(ADMIN_KEY),
            )
            .await
        }));
    }
    let mut created = 0;
    for c in calls {
        let (s, v) = c.await.unwrap();
        match s {
            201 => created += 1,
            409 => assert_eq!(v["error"]["code"], "token_quota_exceeded", "{v}"),
            other => panic!("unexpected {other}: {v}"),
        }
    }
    assert_eq!(created, 1);
    for gw in [&a, &bb] {
        let (s, v) = gw.admin("GET", "/v1/tenants/solo", None).await;
        assert_eq!(s, 200);
        assert_eq!(v["active_tokens"], 1, "{v}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paused_redis_keeps_the_data_plane_serving_and_refuses_admin_writes() {
    let redis = RedisServer::start();
    let b = Backends::start().await;
    let a = gateway_on(&b, &redis.url()).await;
    let bb = gateway_on(&b, &redis.url()).await;
    wait_ready(&a).await;
    wait_ready(&bb).await;
    a.tenant("acme", &["crm"], 5).await;
    let (_, secret) = a.token("acme", &["127.0.0.1"]).await;
    wait_status(&bb, "/crm/x", &secret, 200, "B knows the token").await;

    redis.pause();
    // Admin writes: 503 store_unavailable (each answers within the
    // command timeout rather than hanging).
    for gw in [&a, &bb] {
        let (s, v) = gw
            .admin(
                "POST",
                "/v1/tenants",
                Some(json!({"id": "late", "products": ["crm"]})),
            )
            .await;
        assert_eq!(s, 503, "{v}");
        assert_eq!(v["error"]["code"], "store_unavailable", "{v}");
    }
    let (s, v) = a
        .admin(
            "POST",
            "/v1/tenants/acme/tokens",
            Some(json!({"ip_allowlist": ["127.0.0.1"]})),
        )
        .await;
    assert_eq!(s, 503, "{v}");
    assert_eq!(v["error"]["code"], "store_unavailable", "{v}");
    // The data plane never waits on the store: every request is a 200.
    for _ in 0..20 {
        for gw in [&a, &bb] {
            assert_eq!(status_of(gw, "/crm/x", &secret).await, 200);
        }
    }
    // Readiness stays 200 and says the store is down; metrics agree.
    eventually(SOON, "readyz reports the store disconnected", || async {
        !store_connected(&bb).await
    })
    .await;
    let (s, v) = admin_call(bb.admin, "GET", "/readyz", None, None).await;
    assert_eq!(s, 200, "{v}");
    let metrics = bb.metrics().await;
    assert!(metrics.contains("tollgate_store_connected 0"), "{metrics}");
    assert_eq!(status_of(&bb, "/crm/x", &secret).await, 200);

    redis.resume();
    eventually(SOON, "both instances reconnect", || async {
        store_connected(&a).await && store_connected(&bb).await
    })
    .await;
    let metrics = bb.metrics().await;
    assert!(metrics.contains("tollgate_store_connected 1"), "{metrics}");
    let age = metric_value(&metrics, "tollgate_store_last_sync_age_seconds")
        .expect("tollgate_store_last_sync_age_seconds");
    assert!(age >= 0.0, "a connected store has synced: {metrics}");
    // Writes work again and propagate.
    bb.tenant("after", &["crm"], 1).await;
    let (_, s2) = bb.token("after", &["127.0.0.1"]).await;
    wait_status(&a, "/crm/x", &s2, 200, "A gets B's token after the pause").await;
    // The writes refused during the pause did not happen later either.
    let (s, v) = a.admin("GET", "/v1/tenants/late", None).await;
    assert_eq!(s, 404, "{v}");
    let (s, v) = a.admin("GET", "/v1/tenants/acme", None).await;
    assert_eq!(s, 200);
    assert_eq!(v["active_tokens"], 1, "{v}");
    assert!(b.crm.count() > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_and_restarted_redis_keeps_serving_and_resumes_sync() {
    let mut redis = RedisServer::start_persistent();
    let b = Backends::start().await;
    let a = gateway_on(&b, &redis.url()).await;
    let bb = gateway_on(&b, &redis.url()).await;
    wait_ready(&a).await;
    wait_ready(&bb).await;
    a.tenant("acme", &["crm"], 5).await;
    let (id, secret) = a.token("acme", &["127.0.0.1"]).await;
    wait_status(&bb, "/crm/x", &secret, 200, "B knows the token").await;

    // Traffic runs through the whole outage.
    let stop = tokio_util::sync::CancellationToken::new();
    let traffic = {
        let (ua, ub, secret, stop) = (
            a.url("/crm/x"),
            bb.url("/crm/x"),
            secret.clone(),
            stop.clone(),
        );
        tokio::spawn(async move {
            let mut seen = Vec::new();
            while !stop.is_cancelled() {
                for u in [&ua, &ub] {
                    seen.push(get("127.0.0.1", u, Some(&secret)).await.status);
                }
            }
            seen
        })
    };

    redis.kill();
    let (s, v) = a
        .admin("PATCH", "/v1/tenants/acme", Some(json!({"name": "x"})))
        .await;
    assert_eq!(s, 503, "{v}");
    assert_eq!(v["error"]["code"], "store_unavailable");
    let (s, v) = bb.admin("DELETE", &format!("/v1/tokens/{id}"), None).await;
    assert_eq!(s, 503, "{v}");
    eventually(SOON, "both report the store down", || async {
        !store_connected(&a).await && !store_connected(&bb).await
    })
    .await;

    redis.restart();
    eventually(SOON, "both reconnect", || async {
        store_connected(&a).await && store_connected(&bb).await
    })
    .await;
    stop.cancel();
    let seen = traffic.await.unwrap();
    assert!(!seen.is_empty());
    assert!(seen.iter().all(|s| *s == 200), "{seen:?}");

    // The token survived (the 503'd revoke did nothing) and sync resumed.
    assert_eq!(status_of(&bb, "/crm/x", &secret).await, 200);
    let (s, _) = bb.admin("DELETE", &format!("/v1/tokens/{id}"), None).await;
    assert_eq!(s, 204);
    wait_status(
        &a,
        "/crm/x",
        &secret,
        401,
        "A sees the revoke after the restart",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_made_while_an_instance_is_cut_off_reaches_it_after_reconnect() {
    let redis = RedisServer::start();
    let relay = Relay::start(redis.addr()).await;
    let b = Backends::start().await;
    let a = gateway_on(&b, &redis.url()).await;
    let cut = gateway_on(&b, &relay.url()).await;
    wait_ready(&a).await;
    wait_ready(&cut).await;
    a.tenant("acme", &["crm"], 5).await;
    let (id1, s1) = a.token("acme", &["127.0.0.1"]).await;
    wait_status(
        &cut,
        "/crm/x",
        &s1,
        200,
        "the cut-off-to-be instance knows the token",
    )
    .await;

    relay.cut();
    eventually(SOON, "the cut-off instance notices", || async {
        !store_connected(&cut).await
    })
    .await;
    let (s, v) = cut
        .admin("POST", "/v1/tenants", Some(json!({"id": "nope"})))
        .await;
    assert_eq!(s, 503, "{v}");
    assert_eq!(v["error"]["code"], "store_unavailable");

    // Changes while cut off.
    let (s, _) = a.admin("DELETE", &format!("/v1/tokens/{id1}"), None).await;
    assert_eq!(s, 204);
    a.tenant("newco", &["crm"], 1).await;
    let (_, s2) = a.token("newco", &["127.0.0.1"]).await;
    // Still serving from memory meanwhile (the stale token is still known).
    assert_eq!(status_of(&cut, "/crm/x", &s1).await, 200);
    assert_eq!(status_of(&cut, "/crm/x", &s2).await, 401);

    relay.restore();
    wait_status(
        &cut,
        "/crm/x",
        &s1,
        401,
        "the revoke reaches the reconnected instance",
    )
    .await;
    wait_status(&cut, "/crm/x", &s2, 200, "the new token reaches it").await;
    assert!(store_connected(&cut).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_started_while_redis_is_down_becomes_ready_when_it_is_up() {
    let port = free_port();
    let b = Backends::start().await;
    let gw = gateway_on(&b, &format!("redis://127.0.0.1:{port}/0")).await;
    // Listeners are up; not ready; admin writes refused.
    let (s, v) = admin_call(gw.admin, "GET", "/readyz", None, None).await;
    assert_eq!(s, 503, "{v}");
    assert_eq!(v["store"]["kind"], "redis");
    assert_eq!(v["store"]["connected"], false);
    let (s, v) = gw
        .admin("POST", "/v1/tenants", Some(json!({"id": "early"})))
        .await;
    assert_eq!(s, 503, "{v}");
    assert_eq!(v["error"]["code"], "store_unavailable");

    let _redis = RedisServer::start_on(port);
    wait_ready(&gw).await;
    assert!(store_connected(&gw).await);
    gw.tenant("acme", &["crm"], 1).await;
    let (_, secret) = gw.token("acme", &["127.0.0.1"]).await;
    assert_eq!(status_of(&gw, "/crm/x", &secret).await, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_never_holds_a_token_secret() {
    let redis = RedisServer::start();
    let b = Backends::start().await;
    let gw = gateway_on(&b, &redis.url()).await;
    wait_ready(&gw).await;
    gw.tenant("acme", &["crm", "marketing"], 10).await;
    gw.tenant("beta", &["crm"], 10).await;
    let mut secrets = Vec::new();
    for t in ["acme", "acme", "beta"] {
        let (id, s) = gw.token(t, &["127.0.0.1", "10.0.0.0/8"]).await;
        secrets.push(s);
        let (st, v) = gw
            .admin(
                "POST",
                &format!("/v1/tokens/{id}/rotate"),
                Some(json!({"grace": "5m"})),
            )
            .await;
        assert_eq!(st, 200, "{v}");
        secrets.push(v["token"].as_str().unwrap().to_string());
    }
    let (_, revoked) = gw.token("beta", &["127.0.0.1"]).await;
    secrets.push(revoked);

    // Every key, every value, whatever its type.
    let mut con = redis.connection();
    let keys: Vec<String> = ::redis::cmd("KEYS").arg("*").query(&mut con).unwrap();
    assert!(keys.iter().all(|k| k.starts_with("tg:")), "{keys:?}");
    let mut dump = String::new();
    for k in &keys {
        dump.push_str(k);
        dump.push('\n');
        let ty: String = ::redis::cmd("TYPE").arg(k).query(&mut con).unwrap();
        let v: ::redis::Value = match ty.as_str() {
            "string" => ::redis::cmd("GET").arg(k).query(&mut con).unwrap(),
            "hash" => ::redis::cmd("HGETALL").arg(k).query(&mut con).unwrap(),
            "list" => ::redis::cmd("LRANGE")
                .arg(k)
                .arg(0)
                .arg(-1)
                .query(&mut con)
                .unwrap(),
            "stream" => ::redis::cmd("XRANGE")
                .arg(k)
                .arg("-")
                .arg("+")
                .query(&mut con)
                .unwrap(),
            other => panic!("unexpected key type {other} for {k}"),
        };
        dump.push_str(&format!("{v:?}\n"));
    }
    for s in &secrets {
        assert!(
            !dump.contains(s.as_str()),
            "a token secret is stored in redis"
        );
        // The part after the prefix is the secret's entropy: absent too.
        let body = s.trim_start_matches("tg_");
        assert!(
            !dump.contains(body),
            "a token secret body is stored in redis"
        );
        // What is stored is the hash: the scan would have found the secret.
        let hex = blake3::hash(s.as_bytes()).to_hex().to_string();
        assert!(dump.contains(&hex), "the token's hash is stored");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_import_round_trips_embedded_to_redis_and_back() {
    let redis = RedisServer::start();
    let b = Backends::start().await;
    // Data in an embedded store.
    let emb = TestGateway::start(&b, "").await;
    emb.tenant("acme", &["crm"], 3).await;
    emb.tenant("beta", &["crm", "messaging"], 2).await;
    let (_, s1) = emb.token("acme", &["127.0.0.1"]).await;
    let (_, s2) = emb.token("beta", &["127.0.0.1", "10.0.0.0/8"]).await;
    let (id3, s3) = emb.token("beta", &["127.0.0.1"]).await;
    let (st, _) = emb
        .admin("DELETE", &format!("/v1/tokens/{id3}"), None)
        .await;
    assert_eq!(st, 204);
    let emb_config = tollgate::config::Config::load(&emb.config_path).unwrap();
    // Stop it but keep its directory (and database file).
    let mut emb = emb;
    let h = emb.handle.take().unwrap();
    h.shutdown();
    h.wait().await;

    let mut first = Vec::new();
    tollgate::store::transfer::export(&emb_config, &mut first)
        .await
        .unwrap();

    // Into Redis.
    let dir = tempfile::tempdir().unwrap();
    let rpath = dir.path().join("gateway.toml");
    std::fs::write(&rpath, redis_config_text(&b, &redis.url(), "tg:")).unwrap();
    let rconfig = tollgate::config::Config::load(&rpath).unwrap();
    let n = tollgate::store::transfer::import(&rconfig, &first[..])
        .await
        .unwrap();
    assert_eq!(n, 5);
    let mut second = Vec::new();
    tollgate::store::transfer::export(&rconfig, &mut second)
        .await
        .unwrap();

    // A gateway on Redis accepts the migrated secrets.
    let gw = gateway_on(&b, &redis.url()).await;
    wait_ready(&gw).await;
    assert_eq!(status_of(&gw, "/crm/x", &s1).await, 200);
    assert_eq!(status_of(&gw, "/crm/x", &s2).await, 200);
    assert_eq!(status_of(&gw, "/crm/x", &s3).await, 401);
    let (_, v) = gw.admin("GET", "/v1/tenants/beta", None).await;
    assert_eq!(v["active_tokens"], 1, "{v}");

    // And back into a fresh embedded store.
    let back = tempfile::tempdir().unwrap();
    let epath = back.path().join("gateway.toml");
    std::fs::write(&epath, config_text(&b, &back.path().join("back.db"), "")).unwrap();
    let econfig = tollgate::config::Config::load(&epath).unwrap();
    tollgate::store::transfer::import(&econfig, &second[..])
        .await
        .unwrap();
    let mut third = Vec::new();
    tollgate::store::transfer::export(&econfig, &mut third)
        .await
        .unwrap();

    let normalize = |bytes: &[u8]| {
        let mut v: Vec<serde_json::Value> = std::str::from_utf8(bytes)
            .unwrap()
            .lines()
            .map(|l| {
                let mut r: serde_json::Value = serde_json::from_str(l).unwrap();
                // Versions are the store's own counter; everything else
                // must survive unchanged.
                r.as_object_mut().unwrap().remove("version");
                r
            })
            .collect();
        v.sort_by_key(|r| r.to_string());
        v
    };
    assert_eq!(normalize(&first), normalize(&second));
    assert_eq!(normalize(&first), normalize(&third));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_whose_feed_position_was_trimmed_reloads_everything_on_reconnect() {
    let redis = RedisServer::start();
    let relay = Relay::start(redis.addr()).await;
    let b = Backends::start().await;
    let a = gateway_on(&b, &redis.url()).await;
    let cut = gateway_on(&b, &relay.url()).await;
    wait_ready(&a).await;
    wait_ready(&cut).await;
    a.tenant("acme", &["crm"], 5).await;
    a.tenant("gone", &["crm"], 5).await;
    let (id1, s1) = a.token("acme", &["127.0.0.1"]).await;
    let (_, s_gone) = a.token("gone", &["127.0.0.1"]).await;
    wait_status(
        &cut,
        "/crm/x",
        &s_gone,
        200,
        "the instance knows both tokens",
    )
    .await;
    wait_status(&cut, "/crm/x", &s1, 200, "the instance knows both tokens").await;

    relay.cut();
    eventually(SOON, "the cut-off instance notices", || async {
        !store_connected(&cut).await
    })
    .await;
    let (s, _) = a.admin("DELETE", &format!("/v1/tokens/{id1}"), None).await;
    assert_eq!(s, 204);
    let (s, _) = a.admin("DELETE", "/v1/tenants/gone", None).await;
    assert_eq!(s, 204);
    let (_, s2) = a.token("acme", &["127.0.0.1"]).await;
    // The feed loses those events (as MAXLEN trimming would after a long
    // partition): only a full reload can bring the instance up to date.
    let mut con = redis.connection();
    let _: i64 = ::redis::cmd("XTRIM")
        .arg("tg:changes")
        .arg("MAXLEN")
        .arg(0)
        .query(&mut con)
        .unwrap();

    relay.restore();
    wait_status(&cut, "/crm/x", &s1, 401, "the revoke arrives by reload").await;
    wait_status(
        &cut,
        "/crm/x",
        &s_gone,
        401,
        "the deleted tenant's token is pruned",
    )
    .await;
    wait_status(&cut, "/crm/x", &s2, 200, "the new token arrives by reload").await;
    assert_eq!(cut.gateway().table.tenants(), 1);
    // And the feed is followed again afterwards.
    let (_, s3) = a.token("acme", &["127.0.0.1"]).await;
    wait_status(&cut, "/crm/x", &s3, 200, "later changes follow the feed").await;
}
