//! The admin listener. Endpoints:
//!
//! | method & path | what |
//! | --- | --- |
//! | `GET /healthz` | liveness, no key |
//! | `GET /readyz` | 200 once loaded and listening (503 before), store state in the body, no key |
//! | `GET /metrics` | Prometheus text, no key |
//! | `POST /v1/tenants`, `GET /v1/tenants` | create, list tenants |
//! | `GET/PATCH/DELETE /v1/tenants/{id}` | one tenant |
//! | `POST/GET /v1/tenants/{id}/tokens` | create, list a tenant's tokens |
//! | `GET/PATCH/DELETE /v1/tokens/{token_id}` | one token (DELETE revokes) |
//! | `POST /v1/tokens/{token_id}/rotate` | new secret, old one kept for `grace` |
//! | `GET /v1/audit?limit=N` | audit log, newest first |
//! | `POST /v1/reload` | reload `gateway.toml` (as SIGHUP) |
//!
//! Every `/v1` call needs `Authorization: Bearer <admin key>`; keys are
//! compared as blake3 hashes in constant time. Errors use the data plane's
//! JSON shape; [`ApiError`] is the one place they become HTTP answers.

mod audit;
mod auth;
mod ops;
mod tenants;
mod tokens;

use std::sync::Arc;

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use serde::de::DeserializeOwned;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::server::Gateway;
use crate::store::{AuditEvent, StoreError};

pub(crate) type AppState = Arc<Gateway>;

/// An admin API error: status, code and message.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        let msg = e.to_string();
        let (status, code) = match &e {
            StoreError::TenantNotFound(_) => (StatusCode::NOT_FOUND, "tenant_not_found"),
            StoreError::TenantExists(_) => (StatusCode::CONFLICT, "tenant_exists"),
            StoreError::TokenNotFound(_) => (StatusCode::NOT_FOUND, "token_not_found"),
            StoreError::TokenRevoked(_) => (StatusCode::CONFLICT, "token_revoked"),
            StoreError::QuotaExceeded { .. } => (StatusCode::CONFLICT, "token_quota_exceeded"),
            StoreError::ProductNotPurchased { .. } => {
                (StatusCode::UNPROCESSABLE_ENTITY, "product_not_purchased")
            }
            StoreError::Invalid(_) => (StatusCode::UNPROCESSABLE_ENTITY, "invalid_request"),
            StoreError::Unavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "store_unavailable"),
            StoreError::Corrupt(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        };
        if status.is_server_error() {
            tracing::error!(error = %e, "store error");
        }
        ApiError::new(status, code, msg)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = crate::error::error_body(self.code, &self.message);
        (
            self.status,
            [(axum::http::header::CONTENT_TYPE, "application/json")],
            body,
        )
            .into_response()
    }
}

pub type ApiResult<T> = Result<T, ApiError>;

/// Parses a JSON body: unparseable JSON is 400 `bad_request`; well-formed
/// JSON of the wrong shape is 422 with the resource's `code`.
pub(crate) fn parse_json<T: DeserializeOwned>(body: &[u8], code: &'static str) -> ApiResult<T> {
    let text = if body.iter().all(u8::is_ascii_whitespace) {
        &b"{}"[..]
    } else {
        body
    };
    // Parse the syntax first: a typed parse stops at the first field of the
    // wrong shape, so a truncated body such as `{"id": ` would otherwise be
    // reported as a 422 instead of unparseable JSON.
    let value: serde_json::Value = serde_json::from_slice(text).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_request",
            format!("request body is not valid JSON: {e}"),
        )
    })?;
    parse_value(value, code, &[])
}

/// As [`parse_json`], with the error code chosen by the field at fault:
/// `fields` maps a top-level field to its own code (a token body whose
/// `ip_allowlist` is not a list of strings is `invalid_allowlist`, as a bad
/// entry is), any other field gets `code`.
pub(crate) fn parse_json_fields<T: DeserializeOwned>(
    body: &[u8],
    code: &'static str,
    fields: &[(&str, &'static str)],
) -> ApiResult<T> {
    let value: serde_json::Value = parse_json(body, code)?;
    parse_value(value, code, fields)
}

fn parse_value<T: DeserializeOwned>(
    value: serde_json::Value,
    code: &'static str,
    fields: &[(&str, &'static str)],
) -> ApiResult<T> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let top = path.split(['.', '[']).next().unwrap_or("");
        let code = fields
            .iter()
            .find(|(f, _)| *f == top)
            .map_or(code, |(_, c)| *c);
        let message = if path == "." {
            e.inner().to_string()
        } else {
            format!("{path}: {}", e.inner())
        };
        ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, code, message)
    })
}

/// Appends to the audit log. The change is already committed: a failure is
/// logged, not returned.
pub(crate) async fn audit(
    gw: &Gateway,
    actor: &auth::Actor,
    action: &str,
    target: &str,
    detail: serde_json::Value,
) {
    let event = AuditEvent {
        at: crate::model::format_time(crate::model::now()),
        actor: actor.0.clone(),
        action: action.into(),
        target: target.into(),
        detail,
    };
    if let Err(e) = gw.store.append_audit(event).await {
        tracing::error!(error = %e, action, target, "audit event could not be written");
    }
}

/// The admin router.
pub fn router(gw: Arc<Gateway>) -> Router {
    let v1 = Router::new()
        .route("/tenants", post(tenants::create).get(tenants::list))
        .route(
            "/tenants/{id}",
            get(tenants::show)
                .patch(tenants::update)
                .delete(tenants::delete),
        )
        .route(
            "/tenants/{id}/tokens",
            post(tokens::create).get(tokens::list),
        )
        .route(
            "/tokens/{id}",
            get(tokens::show)
                .patch(tokens::update)
                .delete(tokens::revoke),
        )
        .route("/tokens/{id}/rotate", post(tokens::rotate))
        .route("/audit", get(audit::list))
        .route("/reload", post(ops::reload))
        .fallback(ops::not_found)
        .method_not_allowed_fallback(ops::method_not_allowed)
        // `layer`, not `route_layer`: the key is checked before anything
        // under /v1 answers, so an unknown /v1 path or a wrong method
        // without a key is 401 too and tells a caller nothing.
        .layer(axum::middleware::from_fn_with_state(
            Arc::clone(&gw),
            auth::require_admin_key,
        ));
    Router::new()
        .route("/healthz", get(ops::healthz))
        .route("/readyz", get(ops::readyz))
        .route("/metrics", get(ops::metrics))
        .nest("/v1", v1)
        .fallback(ops::not_found)
        .method_not_allowed_fallback(ops::method_not_allowed)
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY))
        .layer(axum::middleware::map_response(json_errors))
        .with_state(gw)
}

/// Largest admin request body.
const MAX_BODY: usize = 1 << 20;

/// Every error leaves the admin API in the JSON error shape. The handlers'
/// own errors already are ([`ApiError`]); what axum answers by itself (an
/// extractor rejection: a body over [`MAX_BODY`], an undecodable query
/// string or path parameter) is plain text, and is rewritten here with a
/// code that follows from its status and axum's text as the message.
async fn json_errors(resp: Response) -> Response {
    let status = resp.status();
    let is_json = resp
        .headers()
        .get(axum::http::header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if is_json || !(status.is_client_error() || status.is_server_error()) {
        return resp;
    }
    let code = match status {
        StatusCode::PAYLOAD_TOO_LARGE => "payload_too_large",
        StatusCode::UNSUPPORTED_MEDIA_TYPE => "unsupported_media_type",
        StatusCode::NOT_FOUND => "not_found",
        StatusCode::METHOD_NOT_ALLOWED => "method_not_allowed",
        s if s.is_server_error() => "internal",
        _ => "bad_request",
    };
    let (parts, body) = resp.into_parts();
    let text = axum::body::to_bytes(body, 4096).await.unwrap_or_default();
    let text = String::from_utf8_lossy(&text);
    let message = match text.trim() {
        "" => status.canonical_reason().unwrap_or("error").to_owned(),
        t => t.to_owned(),
    };
    let mut out = ApiError::new(status, code, message).into_response();
    // Keep what the rejection said about the connection or the method.
    for name in [axum::http::header::ALLOW, axum::http::header::CONNECTION] {
        if let Some(v) = parts.headers.get(&name) {
            out.headers_mut().insert(name, v.clone());
        }
    }
    out
}

/// Serves the admin API until `shutdown` is cancelled.
pub async fn serve(listener: TcpListener, gw: Arc<Gateway>, shutdown: CancellationToken) {
    let app = router(gw);
    if let Err(e) = axum::serve(listener, app)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
    {
        tracing::error!(error = %e, "admin listener failed");
    }
}
