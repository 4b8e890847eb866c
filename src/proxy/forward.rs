//! Forwarding: the header rewriting of requests on their way up and
//! responses on their way down (the upstream connections are in
//! [`super::pool`]).

use std::net::IpAddr;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http_body_util::{Either, Empty};
use hyper::body::Incoming;

/// A request body going upstream: the client's, streamed, or empty (a
/// bodyless request replayed on another upstream).
pub type UpstreamBody = Either<Incoming, Empty<Bytes>>;

static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
static X_TOLLGATE_TENANT: HeaderName = HeaderName::from_static("x-tollgate-tenant");
static X_TOLLGATE_TOKEN_ID: HeaderName = HeaderName::from_static("x-tollgate-token-id");
static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// Hop-by-hop headers (RFC 9110 §7.6.1) that go whether or not
/// `Connection` names them.
static HOP_BY_HOP: [&HeaderName; 7] = [
    &KEEP_ALIVE,
    &PROXY_CONNECTION,
    &header::TE,
    &header::TRAILER,
    &header::TRANSFER_ENCODING,
    &header::UPGRADE,
    &header::PROXY_AUTHORIZATION,
];

/// Removes hop-by-hop headers (RFC 9110 §7.6.1), including any header the
/// `Connection` header names.
///
/// Most messages carry none, so one pass over the names (standard names
/// compare as enum tags) decides first; a `remove` per candidate would hash
/// and probe the map eight times for every request and every response.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let any = headers
        .keys()
        .any(|k| k == header::CONNECTION || HOP_BY_HOP.contains(&k));
    if !any {
        return;
    }
    if headers.contains_key(header::CONNECTION) {
        let named: Vec<HeaderName> = headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
            .collect();
        for n in named {
            headers.remove(n);
        }
        headers.remove(header::CONNECTION);
    }
    for h in HOP_BY_HOP {
        headers.remove(h);
    }
}

/// Identity the gateway vouches for to the upstream.
pub struct Identity<'a> {
    pub tenant: &'a HeaderValue,
    pub token_id: &'a HeaderValue,
    pub client_ip: IpAddr,
    pub peer_trusted: bool,
    pub tls: bool,
    pub request_id: &'a HeaderValue,
}

/// Rewrites a request's headers for the upstream.
pub fn upstream_request_headers(headers: &mut HeaderMap, id: &Identity<'_>) {
    strip_hop_by_hop(headers);
    headers.remove(header::AUTHORIZATION);
    if headers
        .keys()
        .any(|k| k.as_str().starts_with("x-tollgate-"))
    {
        let spoofed: Vec<HeaderName> = headers
            .keys()
            .filter(|k| k.as_str().starts_with("x-tollgate-"))
            .cloned()
            .collect();
        for k in spoofed {
            headers.remove(k);
        }
    }
    // The client sets Host from the upstream URL (nginx's default); the
    // caller's Host travels as X-Forwarded-Host.
    if let Some(host) = headers.remove(header::HOST) {
        if !id.peer_trusted || !headers.contains_key(&X_FORWARDED_HOST) {
            headers.insert(X_FORWARDED_HOST.clone(), host);
        }
    }
    headers.insert(X_TOLLGATE_TENANT.clone(), id.tenant.clone());
    headers.insert(X_TOLLGATE_TOKEN_ID.clone(), id.token_id.clone());
    append_forwarded_for(headers, id.client_ip);
    if !id.peer_trusted || !headers.contains_key(&X_FORWARDED_PROTO) {
        let proto = if id.tls { "https" } else { "http" };
        headers.insert(X_FORWARDED_PROTO.clone(), HeaderValue::from_static(proto));
    }
    headers.insert(X_REQUEST_ID.clone(), id.request_id.clone());
}

/// `X-Forwarded-For: <existing>, <client ip>`, as one header line.
fn append_forwarded_for(headers: &mut HeaderMap, client: IpAddr) {
    use std::fmt::Write;
    let mut v = String::with_capacity(64);
    for existing in headers.get_all(&X_FORWARDED_FOR) {
        if let Ok(s) = existing.to_str() {
            if !s.trim().is_empty() {
                v.push_str(s.trim());
                v.push_str(", ");
            }
        }
    }
    let _ = write!(v, "{client}");
    if let Ok(value) = HeaderValue::from_str(&v) {
        headers.insert(X_FORWARDED_FOR.clone(), value);
    }
}

/// Rewrites an upstream response's headers for the client.
pub fn downstream_response_headers(headers: &mut HeaderMap, request_id: &HeaderValue) {
    strip_hop_by_hop(headers);
    headers.insert(X_REQUEST_ID.clone(), request_id.clone());
}

/// The caller's `X-Request-Id` when sane (1-128 of `[A-Za-z0-9._:-]`), else
/// a new ULID.
pub fn request_id(headers: &HeaderMap) -> HeaderValue {
    if let Some(v) = headers.get(&X_REQUEST_ID) {
        let b = v.as_bytes();
        if !b.is_empty()
            && b.len() <= 128
            && b.iter()
                .all(|c| c.is_ascii_alphanumeric() || b"._:-".contains(c))
        {
            return v.clone();
        }
    }
    let mut buf = [0u8; ulid::ULID_LEN];
    let s = ulid::Ulid::new().array_to_str(&mut buf);
    HeaderValue::from_str(s).expect("ULID is ASCII")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_and_connection_named_headers_go() {
        let mut h = HeaderMap::new();
        h.insert("connection", "close, x-secret".parse().unwrap());
        h.insert("x-secret", "1".parse().unwrap());
        h.insert("keep-alive", "timeout=5".parse().unwrap());
        h.insert("transfer-encoding", "chunked".parse().unwrap());
        h.insert("upgrade", "websocket".parse().unwrap());
        h.insert("x-kept", "1".parse().unwrap());
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("x-kept"));
    }

    #[test]
    fn request_headers_lose_secrets_and_spoofs_and_gain_identity() {
        let mut h = HeaderMap::new();
        h.insert("authorization", "Bearer secret".parse().unwrap());
        h.insert("x-tollgate-tenant", "evil".parse().unwrap());
        h.insert("x-tollgate-anything", "evil".parse().unwrap());
        h.insert("x-forwarded-for", "1.1.1.1".parse().unwrap());
        h.insert("host", "gw.example".parse().unwrap());
        let tenant = HeaderValue::from_static("acme");
        let token = HeaderValue::from_static("tok_1");
        let rid = HeaderValue::from_static("rid");
        upstream_request_headers(
            &mut h,
            &Identity {
                tenant: &tenant,
                token_id: &token,
                client_ip: "127.0.0.2".parse().unwrap(),
                peer_trusted: false,
                tls: false,
                request_id: &rid,
            },
        );
        assert!(!h.contains_key("authorization"));
        assert!(!h.contains_key("x-tollgate-anything"));
        assert!(!h.contains_key("host"));
        assert_eq!(h["x-tollgate-tenant"], "acme");
        assert_eq!(h["x-tollgate-token-id"], "tok_1");
        assert_eq!(h["x-forwarded-for"], "1.1.1.1, 127.0.0.2");
        assert_eq!(h["x-forwarded-proto"], "http");
        assert_eq!(h["x-forwarded-host"], "gw.example");
        assert_eq!(h["x-request-id"], "rid");
    }

    #[test]
    fn request_id_is_kept_only_when_sane() {
        let mut h = HeaderMap::new();
        h.insert("x-request-id", "abc-123".parse().unwrap());
        assert_eq!(request_id(&h), "abc-123");
        h.insert("x-request-id", "has space".parse().unwrap());
        assert_eq!(request_id(&h).len(), 26);
        h.insert("x-request-id", "a".repeat(129).parse().unwrap());
        assert_eq!(request_id(&h).len(), 26);
        assert_eq!(request_id(&HeaderMap::new()).len(), 26);
    }
}
