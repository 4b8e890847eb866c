mod support;
use support::*;

#[tokio::test]
async fn allowed_request_reaches_the_crm_backend() {
    let b = Backends::start().await;
    let gw = TestGateway::start(&b, "").await;
    gw.tenant("acme", &["crm"], 1).await;
    let (_, secret) = gw.token("acme", &["127.0.0.1"]).await;
    let g = get("127.0.0.1", &gw.url("/crm/v1/contacts"), Some(&secret)).await;
    assert_eq!(g.status, 200, "{}", g.text);
    assert_eq!(g.body["upstream"], "crm");
    let g = get("127.0.0.2", &gw.url("/crm/v1/contacts"), Some(&secret)).await;
    assert_error(&g, 403, "ip_not_allowed");
    assert!(g.body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("127.0.0.2"));
    gw.stop().await;
}
