//! Health, readiness, metrics, reload and the fallbacks.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use serde_json::json;

use super::auth::Actor;
use super::{ApiError, AppState};

pub(crate) async fn healthz() -> Response {
    Json(json!({"status": "ok"})).into_response()
}

pub(crate) async fn readyz(State(gw): State<AppState>) -> Response {
    let ready = gw.is_ready();
    let body = json!({
        "ready": ready,
        "store": {
            "kind": gw.store.kind(),
            "connected": gw.sync.connected(),
            "last_sync_age_seconds": gw.sync.last_sync_age(),
        }
    });
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(body)).into_response()
}

pub(crate) async fn metrics(State(gw): State<AppState>) -> Response {
    let m = &gw.metrics;
    m.tokens
        .set(gw.table.active_tokens(crate::model::now()) as i64);
    m.tenants.set(gw.table.tenants() as i64);
    m.store_connected.set(gw.sync.connected() as i64);
    m.store_last_sync_age
        .set(gw.sync.last_sync_age().unwrap_or(-1.0));
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        m.encode(),
    )
        .into_response()
}

pub(crate) async fn reload(
    State(gw): State<AppState>,
    Extension(actor): Extension<Actor>,
) -> Result<Response, ApiError> {
    let gw2 = gw.clone();
    let result = tokio::task::spawn_blocking(move || gw2.reload())
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))?;
    match result {
        Ok(restart) => {
            super::audit(
                &gw,
                &actor,
                "config.reload",
                "gateway.toml",
                json!({"restart_needed": restart}),
            )
            .await;
            Ok(Json(json!({"reloaded": true, "restart_needed": restart})).into_response())
        }
        Err(e) => {
            let problems: Vec<_> = e
                .problems
                .iter()
                .map(|p| json!({"key": p.key, "line": p.line, "message": p.message}))
                .collect();
            let body = json!({"error": {"code": "invalid_config", "message": e.to_string(), "problems": problems}});
            Ok((StatusCode::UNPROCESSABLE_ENTITY, Json(body)).into_response())
        }
    }
}

pub(crate) async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such admin endpoint")
}

pub(crate) async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "this endpoint does not take that method",
    )
}
