//! One request through the data plane, phase by phase:
//!
//! 1. `request_filter`: normalize the path, pick the route, read the bearer
//!    token, resolve the client IP, look the token up and decide. Every
//!    failure is a [`ProxyError`] with the contract's status and code.
//! 2. `upstream_request_filter`: rewrite headers and URI for the upstream.
//! 3. the upstream call, bounded by `limits.upstream_timeout`.
//! 4. `response_filter`: strip hop-by-hop headers, add `x-request-id`.
//! 5. `logging`: metrics and one access-log event, written when the
//!    response body is done (see [`ProxyBody`]).

use std::borrow::Cow;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Request, Response, StatusCode, Uri, Version};
use http_body_util::{Either, Full};
use hyper::body::{Body, Frame, Incoming, SizeHint};

use super::client_ip;
use super::forward::{self, Identity};
use super::pool::{PooledBody, SendError};
use super::route::{normalize_path, Route, Upstream};
use crate::auth::{decide, Deny, TokenHash};
use crate::metrics::RequestLabels;
use crate::server::{Gateway, Runtime};
use crate::table::{Grant, TokenTable};

/// A response body: the upstream's, streamed, or one of ours.
type Payload = Either<PooledBody, Full<Bytes>>;

/// The body the public listener sends. It carries the request's log record
/// and writes it (metrics and access log) when dropped, which hyper does
/// once the last byte is handed to the connection or the exchange is
/// abandoned. So `tollgate_request_duration_seconds` and the access log's
/// `duration_ms` cover the whole request, body included, as nginx's
/// `$request_time` and Envoy's `%DURATION%` do.
pub struct ProxyBody {
    payload: Payload,
    log: Option<Logged>,
}

impl ProxyBody {
    fn new(payload: Payload) -> ProxyBody {
        ProxyBody { payload, log: None }
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = <Payload as Body>::Error;

    #[inline]
    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        // Every part of a `ProxyBody` is `Unpin`.
        Pin::new(&mut self.get_mut().payload).poll_frame(cx)
    }

    #[inline]
    fn is_end_stream(&self) -> bool {
        self.payload.is_end_stream()
    }

    #[inline]
    fn size_hint(&self) -> SizeHint {
        self.payload.size_hint()
    }
}

impl Drop for ProxyBody {
    fn drop(&mut self) {
        if let Some(log) = self.log.take() {
            logging(log);
        }
    }
}

/// Why the data plane answered instead of the upstream. The status code and
/// error code fall out of the variant; this is the one place they are set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProxyError {
    /// The client sent something unusable (path, framing).
    BadRequest(&'static str),
    NoRoute,
    MissingToken,
    InvalidToken,
    IpNotAllowed(IpAddr),
    ProductNotEnabled(Box<str>),
    /// Upstream refused, failed to connect, or broke the exchange.
    UpstreamUnavailable,
    UpstreamTimeout,
}

impl ProxyError {
    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ProxyError::NoRoute => StatusCode::NOT_FOUND,
            ProxyError::MissingToken | ProxyError::InvalidToken => StatusCode::UNAUTHORIZED,
            ProxyError::IpNotAllowed(_) | ProxyError::ProductNotEnabled(_) => StatusCode::FORBIDDEN,
            ProxyError::UpstreamUnavailable => StatusCode::BAD_GATEWAY,
            ProxyError::UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
        }
    }

    /// The contract's `error.code`, also the metrics `outcome`.
    pub fn code(&self) -> &'static str {
        match self {
            ProxyError::BadRequest(_) => "bad_request",
            ProxyError::NoRoute => "no_route",
            ProxyError::MissingToken => "missing_token",
            ProxyError::InvalidToken => "invalid_token",
            ProxyError::IpNotAllowed(_) => "ip_not_allowed",
            ProxyError::ProductNotEnabled(_) => "product_not_enabled",
            ProxyError::UpstreamUnavailable => "upstream_unavailable",
            ProxyError::UpstreamTimeout => "upstream_timeout",
        }
    }

    pub fn message(&self) -> Cow<'static, str> {
        match self {
            ProxyError::BadRequest(m) => Cow::Borrowed(m),
            ProxyError::NoRoute => "no route matches this path".into(),
            ProxyError::MissingToken => {
                "send the API token as 'Authorization: Bearer <token>'".into()
            }
            ProxyError::InvalidToken => {
                "the API token is malformed, unknown, revoked, disabled or expired".into()
            }
            ProxyError::IpNotAllowed(ip) => format!(
                "client IP {ip} is not in this token's ip_allowlist; add it to the allowlist to use the token from here"
            )
            .into(),
            ProxyError::ProductNotEnabled(p) => format!(
                "the product '{p}' is not enabled for this token or its tenant"
            )
            .into(),
            ProxyError::UpstreamUnavailable => "the backend could not be reached".into(),
            ProxyError::UpstreamTimeout => "the backend did not answer in time".into(),
        }
    }

    /// The JSON error response.
    pub fn response(&self, request_id: Option<&HeaderValue>) -> Response<ProxyBody> {
        let body = crate::error::error_body(self.code(), &self.message());
        let mut resp = Response::new(ProxyBody::new(Either::Right(Full::new(body))));
        *resp.status_mut() = self.status();
        let h = resp.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        match self {
            ProxyError::MissingToken => {
                h.insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer realm=\"tollgate\""),
                );
            }
            ProxyError::InvalidToken => {
                h.insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer realm=\"tollgate\", error=\"invalid_token\""),
                );
            }
            ProxyError::BadRequest(_) => {
                // The framing may be in doubt: do not reuse the connection.
                h.insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            _ => {}
        }
        if let Some(id) = request_id {
            h.insert(forward::X_REQUEST_ID.clone(), id.clone());
        }
        resp
    }
}

/// Metrics labels when no route was chosen.
const NONE: (&str, &str) = ("none", "none");

/// What the data plane knows about the connection a request came on.
#[derive(Clone, Copy, Debug)]
pub struct ConnInfo {
    pub peer: SocketAddr,
    pub tls: bool,
}

/// A request that passed every check.
struct Allowed<'r> {
    route: &'r Route,
    path: String,
    grant: Grant,
    client_ip: IpAddr,
    peer_trusted: bool,
}

/// What the access log and metrics record about a request; written by
/// [`logging`] when the response body is dropped.
struct Logged {
    gw: Arc<Gateway>,
    start: Instant,
    method: http::Method,
    /// The path as received, without the query.
    path: Box<str>,
    request_id: HeaderValue,
    /// Route and product labels.
    route: (&'static str, &'static str),
    outcome: &'static str,
    status: u16,
    grant: Option<Grant>,
    client_ip: IpAddr,
    upstream_ms: Option<f64>,
}

/// Handles one request on the public listener.
pub async fn handle(
    gw: Arc<Gateway>,
    req: Request<Incoming>,
    conn: ConnInfo,
) -> Response<ProxyBody> {
    let start = Instant::now();
    let rt = gw.runtime.load_full();
    let request_id = forward::request_id(req.headers());
    let method = req.method().clone();
    let path: Box<str> = req.uri().path().into();

    let decision = request_filter(&rt, &gw.table, &req, conn);
    let (mut resp, route, outcome, grant, client_ip, upstream_ms) = match decision {
        Err((err, route, client_ip)) => (
            err.response(Some(&request_id)),
            route,
            err.code(),
            None,
            client_ip,
            None,
        ),
        Ok(allowed) => {
            let route = (allowed.route.label, allowed.route.product_label);
            let (result, upstream_ms) =
                forward_request(&gw, &rt, req, &allowed, conn, &request_id).await;
            let (outcome, resp) = match result {
                Ok(r) => ("forwarded", r),
                Err(e) => (e.code(), e.response(Some(&request_id))),
            };
            (
                resp,
                route,
                outcome,
                Some(allowed.grant),
                allowed.client_ip,
                upstream_ms,
            )
        }
    };
    let status = resp.status().as_u16();
    resp.body_mut().log = Some(Logged {
        gw,
        start,
        method,
        path,
        request_id,
        route,
        outcome,
        status,
        grant,
        client_ip,
        upstream_ms,
    });
    resp
}

/// Phase 1: every check of the contract's table, in its order.
fn request_filter<'r>(
    rt: &'r Runtime,
    table: &TokenTable,
    req: &Request<Incoming>,
    conn: ConnInfo,
) -> Result<Allowed<'r>, (ProxyError, (&'static str, &'static str), IpAddr)> {
    let cfg = &rt.config;
    let peer_ip = client_ip::unmap(conn.peer.ip());
    let fail = |e: ProxyError, route: (&'static str, &'static str), ip: IpAddr| Err((e, route, ip));

    // Content-Length together with Transfer-Encoding is refused outright
    // (RFC 9112 §6.1 allows it; it is the classic smuggling vector).
    let headers = req.headers();
    if headers.contains_key(header::TRANSFER_ENCODING)
        && headers.contains_key(header::CONTENT_LENGTH)
    {
        return fail(
            ProxyError::BadRequest("Content-Length and Transfer-Encoding must not both be sent"),
            NONE,
            peer_ip,
        );
    }
    let path = match normalize_path(req.uri().path()) {
        Ok(p) => p,
        Err(e) => return fail(ProxyError::BadRequest(e.message()), NONE, peer_ip),
    };
    let Some(route) = cfg.routes.find(&path) else {
        return fail(ProxyError::NoRoute, NONE, peer_ip);
    };
    let label = (route.label, route.product_label);

    let Some(token) = bearer_token(headers) else {
        return fail(ProxyError::MissingToken, label, peer_ip);
    };
    if !cfg.token_format.is_well_formed(token) {
        return fail(ProxyError::InvalidToken, label, peer_ip);
    }
    let hash = TokenHash::of(token);
    let Some(grant) = table.get(&hash) else {
        return fail(ProxyError::InvalidToken, label, peer_ip);
    };

    let client_ip = client_ip::resolve(conn.peer.ip(), headers, &cfg.trusted_proxies);
    let peer_trusted = cfg.trusted_proxies.iter().any(|n| n.contains(&peer_ip));
    let now = crate::model::now();
    match decide(&grant, client_ip, &route.product_id, now) {
        Ok(()) => {}
        Err(Deny::InvalidToken) => return fail(ProxyError::InvalidToken, label, client_ip),
        Err(Deny::IpNotAllowed) => {
            return fail(ProxyError::IpNotAllowed(client_ip), label, client_ip)
        }
        Err(Deny::ProductNotEnabled) => {
            return fail(
                ProxyError::ProductNotEnabled(route.product.clone()),
                label,
                client_ip,
            )
        }
    }
    table.touch(&hash, now);
    Ok(Allowed {
        route,
        path: path.into_owned(),
        grant,
        client_ip,
        peer_trusted,
    })
}

/// The token from `Authorization: Bearer <token>` (scheme case-insensitive).
fn bearer_token(headers: &http::HeaderMap) -> Option<&str> {
    let v = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, rest) = v.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    let token = rest.trim();
    (!token.is_empty()).then_some(token)
}

/// The upstream request target (origin form: path and query) for a
/// normalized path and the original query.
fn upstream_uri(upstream: &Upstream, path: &str, query: Option<&str>) -> Option<Uri> {
    let mut pq = String::with_capacity(
        upstream.base_path.len() + path.len() + query.map_or(0, |q| q.len() + 1),
    );
    pq.push_str(&upstream.base_path);
    pq.push_str(path);
    if let Some(q) = query {
        pq.push('?');
        pq.push_str(q);
    }
    Uri::try_from(pq).ok()
}

/// Phases 2-4: rewrite, call the upstream, rewrite the response.
///
/// A request without a body that could not connect to one upstream of a
/// pool is sent once more to another; nothing else is retried, since a
/// streamed body cannot be replayed.
async fn forward_request(
    gw: &Gateway,
    rt: &Runtime,
    req: Request<Incoming>,
    allowed: &Allowed<'_>,
    conn: ConnInfo,
    request_id: &HeaderValue,
) -> (Result<Response<ProxyBody>, ProxyError>, Option<f64>) {
    let (mut parts, body) = req.into_parts();
    let route = allowed.route;
    let mut upstream = route.pick_upstream();

    // Phase 2: upstream_request_filter.
    let path = route.upstream_path(&allowed.path);
    let query = parts.uri.query().map(str::to_owned);
    let Some(uri) = upstream_uri(upstream, path, query.as_deref()) else {
        return (
            Err(ProxyError::BadRequest(
                "the request target cannot be forwarded",
            )),
            None,
        );
    };
    // HTTP/2 carries the host in :authority, not in a Host header; give it
    // the same treatment (it becomes X-Forwarded-Host).
    if !parts.headers.contains_key(header::HOST) {
        if let Some(host) = parts
            .uri
            .authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
        {
            parts.headers.insert(header::HOST, host);
        }
    }
    parts.uri = uri;
    parts.version = Version::HTTP_11;
    forward::upstream_request_headers(
        &mut parts.headers,
        &Identity {
            tenant: &allowed.grant.tenant.id_header(),
            token_id: &allowed.grant.token_id.header(),
            client_ip: allowed.client_ip,
            peer_trusted: allowed.peer_trusted,
            tls: conn.tls,
            request_id,
        },
    );
    let replay = (route.upstreams.len() > 1 && body.is_end_stream())
        .then(|| (parts.method.clone(), parts.headers.clone()));
    let mut upstream_req = Request::from_parts(parts, Either::Left(body));

    // Phase 3: the upstream call.
    let client = rt.client_for(route);
    let sent = Instant::now();
    let deadline = tokio::time::Instant::now() + rt.config.limits.upstream_timeout;
    let mut replay = replay;
    let result = loop {
        upstream_req
            .headers_mut()
            .insert(header::HOST, upstream.host.clone());
        let attempt = tokio::time::timeout_at(deadline, client.send(upstream, upstream_req)).await;
        match attempt {
            Ok(Err(SendError::Connect(e))) => {
                upstream.eject();
                count_upstream_error(gw, route, "connect");
                tracing::warn!(route = route.label, upstream = %upstream.authority, error = %ErrorChain(&*e), "upstream connect failed; ejected for 10s");
                let next = route.alternative(upstream);
                match (replay.take(), next) {
                    (Some((method, headers)), Some(next)) => {
                        let Some(uri) = upstream_uri(next, path, query.as_deref()) else {
                            break Err(ProxyError::UpstreamUnavailable);
                        };
                        let mut r = Request::new(Either::Right(http_body_util::Empty::new()));
                        *r.method_mut() = method;
                        *r.uri_mut() = uri;
                        *r.headers_mut() = headers;
                        upstream_req = r;
                        upstream = next;
                    }
                    _ => break Err(ProxyError::UpstreamUnavailable),
                }
            }
            Ok(Err(SendError::Request(e))) => {
                count_upstream_error(gw, route, "protocol");
                tracing::warn!(route = route.label, upstream = %upstream.authority, error = %ErrorChain(&e), "upstream request failed");
                break Err(ProxyError::UpstreamUnavailable);
            }
            Ok(Ok((resp, conn))) => break Ok((resp, conn, upstream)),
            Err(_) => {
                upstream.eject();
                count_upstream_error(gw, route, "timeout");
                tracing::warn!(route = route.label, upstream = %upstream.authority, "upstream timed out");
                break Err(ProxyError::UpstreamTimeout);
            }
        }
    };
    let upstream_s = sent.elapsed().as_secs_f64();
    gw.metrics.upstream_duration.observe(upstream_s);
    let upstream_ms = Some(upstream_s * 1000.0);
    let (resp, upstream_conn, upstream) = match result {
        Ok(r) => r,
        Err(e) => return (Err(e), upstream_ms),
    };

    // Phase 4: response_filter.
    let (mut parts, body) = resp.into_parts();
    forward::downstream_response_headers(&mut parts.headers, request_id);
    let body = PooledBody::new(body, upstream_conn, client, upstream);
    (
        Ok(Response::from_parts(
            parts,
            ProxyBody::new(Either::Left(body)),
        )),
        upstream_ms,
    )
}

/// Displays an error with its sources (`a: b: c`): hyper's top-level
/// messages ("client error (Connect)") say little on their own.
struct ErrorChain<'a>(&'a (dyn std::error::Error + 'static));

impl std::fmt::Display for ErrorChain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)?;
        let mut source = self.0.source();
        while let Some(s) = source {
            write!(f, ": {s}")?;
            source = s.source();
        }
        Ok(())
    }
}

fn count_upstream_error(gw: &Gateway, route: &Route, kind: &'static str) {
    gw.metrics
        .upstream_errors
        .get_or_create(&crate::metrics::UpstreamErrorLabels {
            route: route.label,
            kind,
        })
        .inc();
}

/// Phase 5: metrics and the access log. Never logs the token or headers.
fn logging(out: Logged) {
    let elapsed = out.start.elapsed().as_secs_f64();
    let metrics = &out.gw.metrics;
    metrics.count_request(RequestLabels {
        route: out.route.0,
        product: out.route.1,
        outcome: out.outcome,
        status: out.status,
    });
    metrics.request_duration.observe(elapsed);
    if crate::access_log::enabled() {
        let grant = out.grant.as_ref();
        let token_id = grant.map(|g| g.token_id.text());
        crate::access_log::write(&crate::access_log::Entry {
            request_id: out.request_id.to_str().unwrap_or(""),
            client_ip: out.client_ip,
            method: out.method.as_str(),
            path: &out.path,
            route: out.route.0,
            status: out.status,
            outcome: out.outcome,
            tenant: grant.map_or("", |g| g.tenant.id()),
            token_id: token_id.as_deref().unwrap_or(""),
            duration_ms: elapsed * 1000.0,
            upstream_ms: out.upstream_ms.unwrap_or(0.0),
        });
    }
}
