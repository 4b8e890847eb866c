//! `GET /v1/audit?limit=N`: the audit log, newest first.

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use super::{ApiError, ApiResult, AppState};

#[derive(Deserialize)]
pub(crate) struct AuditQuery {
    limit: Option<String>,
}

pub(crate) async fn list(
    State(gw): State<AppState>,
    Query(q): Query<AuditQuery>,
) -> ApiResult<Json<Value>> {
    let limit = match q.limit.as_deref() {
        None => 100,
        Some(s) => match s.parse::<usize>() {
            Ok(n) if (1..=10_000).contains(&n) => n,
            _ => {
                return Err(ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "bad_request",
                    format!("limit {s:?} must be a number from 1 to 10000"),
                ))
            }
        },
    };
    let events = gw.store.list_audit(limit).await?;
    Ok(Json(json!({ "events": events })))
}
