//! Tenant endpoints.

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use serde::Deserialize;
use serde_json::{json, Value};

use super::auth::Actor;
use super::{audit, parse_json, ApiError, ApiResult, AppState};
use crate::model::{self, Tenant, Token};
use crate::table::Change;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateTenant {
    id: String,
    name: Option<String>,
    products: Option<Vec<String>>,
    token_quota: Option<u32>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PatchTenant {
    name: Option<String>,
    products: Option<Vec<String>>,
    token_quota: Option<u32>,
}

fn invalid(msg: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_tenant", msg)
}

/// The tenant as the API shows it.
pub(crate) fn view(t: &Tenant, tokens: &[Token], now: model::UnixTime) -> Value {
    let active = tokens
        .iter()
        .filter(|k| k.counts_against_quota(now))
        .count();
    json!({
        "id": t.id,
        "name": t.name,
        "products": t.products,
        "token_quota": t.token_quota,
        "active_tokens": active,
        "created_at": model::format_time(t.created_at),
    })
}

pub(crate) async fn create(
    State(gw): State<AppState>,
    Extension(actor): Extension<Actor>,
    body: Bytes,
) -> ApiResult<Response> {
    let req: CreateTenant = parse_json(&body, "invalid_tenant")?;
    model::validate_name("tenant id", &req.id).map_err(invalid)?;
    let name = req.name.unwrap_or_else(|| req.id.clone());
    model::validate_label("name", &name).map_err(invalid)?;
    let products = model::validate_products(&req.products.unwrap_or_default()).map_err(invalid)?;
    let quota = req
        .token_quota
        .unwrap_or(gw.runtime.load().config.default_token_quota);
    let tenant = Tenant {
        id: req.id,
        name,
        products,
        token_quota: quota,
        created_at: model::now(),
        version: 0,
    };
    let tenant = gw.store.create_tenant(tenant).await?;
    gw.table.apply(Change::TenantUpserted(tenant.clone()));
    let v = view(&tenant, &[], model::now());
    audit(&gw, &actor, "tenant.create", &tenant.id, v.clone()).await;
    Ok((StatusCode::CREATED, Json(v)).into_response())
}

pub(crate) async fn list(State(gw): State<AppState>) -> ApiResult<Json<Value>> {
    let snap = gw.store.load_all().await?;
    let now = model::now();
    let mut by_tenant: std::collections::HashMap<&str, Vec<Token>> = Default::default();
    for t in &snap.tokens {
        by_tenant
            .entry(t.tenant.as_str())
            .or_default()
            .push(t.clone());
    }
    let mut tenants = snap.tenants.clone();
    tenants.sort_by(|a, b| a.id.cmp(&b.id));
    let list: Vec<Value> = tenants
        .iter()
        .map(|t| view(t, by_tenant.get(t.id.as_str()).map_or(&[][..], |v| v), now))
        .collect();
    Ok(Json(json!({ "tenants": list })))
}

pub(crate) async fn show(
    State(gw): State<AppState>,
    Path(id): Path<String>,
) -> ApiResult<Json<Value>> {
    let tenant = gw
        .store
        .get_tenant(&id)
        .await?
        .ok_or_else(|| crate::store::StoreError::TenantNotFound(id.clone()))?;
    let tokens = gw.store.list_tokens(&id).await?;
    Ok(Json(view(&tenant, &tokens, model::now())))
}

pub(crate) async fn update(
    State(gw): State<AppState>,
    Extension(actor): Extension<Actor>,
    Path(id): Path<String>,
    body: Bytes,
) -> ApiResult<Json<Value>> {
    if gw.store.get_tenant(&id).await?.is_none() {
        return Err(crate::store::StoreError::TenantNotFound(id).into());
    }
    let req: PatchTenant = parse_json(&body, "invalid_tenant")?;
    if let Some(n) = &req.name {
        model::validate_label("name", n).map_err(invalid)?;
    }
    let products = req
        .products
        .as_deref()
        .map(model::validate_products)
        .transpose()
        .map_err(invalid)?;
    let edit = move |t: &mut Tenant| {
        if let Some(n) = &req.name {
            t.name = n.clone();
        }
        if let Some(p) = &products {
            t.products = p.clone();
        }
        if let Some(q) = req.token_quota {
            t.token_quota = q;
        }
        Ok(())
    };
    let tenant = gw.store.update_tenant(&id, &edit).await?;
    gw.table.apply(Change::TenantUpserted(tenant.clone()));
    let tokens = gw.store.list_tokens(&id).await?;
    let v = view(&tenant, &tokens, model::now());
    audit(
        &gw,
        &actor,
        "tenant.update",
        &id,
        serde_json::from_slice(&body).unwrap_or(Value::Null),
    )
    .await;
    Ok(Json(v))
}

pub(crate) async fn delete(
    State(gw): State<AppState>,
    Extension(actor): Extension<Actor>,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    let removed = gw.store.delete_tenant(&id).await?;
    gw.table.apply(Change::TenantRemoved(id.clone()));
    audit(
        &gw,
        &actor,
        "tenant.delete",
        &id,
        json!({ "tokens_removed": removed }),
    )
    .await;
    Ok(StatusCode::NO_CONTENT)
}
