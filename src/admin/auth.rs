//! Operator authentication for `/v1`: `Authorization: Bearer <admin key>`,
//! checked against blake3 hashes in constant time.

use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::{ApiError, AppState};

/// Who made an admin call: `key:` + the first 8 hex digits of the key's
/// blake3 hash (an id, never the key).
#[derive(Clone, Debug)]
pub struct Actor(pub String);

pub(crate) async fn require_admin_key(
    State(gw): State<AppState>,
    mut req: Request,
    next: Next,
) -> Response {
    let presented = req
        .headers()
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, key)| key.trim())
        .filter(|k| !k.is_empty());
    let Some(key) = presented else {
        return unauthorized("send an admin key as 'Authorization: Bearer <key>'");
    };
    let hash = blake3::hash(key.as_bytes());
    // blake3::Hash equality is constant-time; check every key, no early exit.
    let mut ok = false;
    for known in gw.admin_key_hashes() {
        ok |= known == hash;
    }
    if !ok {
        return unauthorized("the admin key is not valid");
    }
    req.extensions_mut()
        .insert(Actor(format!("key:{}", &hash.to_hex()[..8])));
    next.run(req).await
}

fn unauthorized(message: &str) -> Response {
    let mut r = ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", message).into_response();
    r.headers_mut().insert(
        axum::http::header::WWW_AUTHENTICATE,
        axum::http::HeaderValue::from_static("Bearer realm=\"tollgate-admin\""),
    );
    r
}
