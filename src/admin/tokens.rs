//! Token endpoints. A secret is returned by `create` and `rotate` only, once;
//! nothing else shows it or its hash.

use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use serde::{Deserialize, Deserializer};
use serde_json::{json, Value};

use super::auth::Actor;
use super::{audit, parse_json, parse_json_fields, ApiError, ApiResult, AppState};

/// A malformed `ip_allowlist` (not a list of strings) is `invalid_allowlist`,
/// as a bad entry in it is.
const ALLOWLIST_FIELD: &[(&str, &str)] = &[("ip_allowlist", "invalid_allowlist")];
use crate::auth::TokenHash;
use crate::model::{self, PreviousSecret, Token};
use crate::server::Gateway;
use crate::store::StoreError;
use crate::table::Change;

/// Distinguishes a missing field (`None`) from an explicit `null`
/// (`Some(None)`).
fn double_option<'de, D, T>(d: D) -> Result<Option<Option<T>>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<T>::deserialize(d).map(Some)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateToken {
    name: Option<String>,
    ip_allowlist: Option<Vec<String>>,
    products: Option<Vec<String>>,
    expires_at: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PatchToken {
    name: Option<String>,
    ip_allowlist: Option<Vec<String>>,
    #[serde(default, deserialize_with = "double_option")]
    products: Option<Option<Vec<String>>>,
    #[serde(default, deserialize_with = "double_option")]
    expires_at: Option<Option<String>>,
    disabled: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Rotate {
    grace: Option<String>,
}

fn invalid_allowlist(msg: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_allowlist", msg)
}

fn invalid(msg: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_request", msg)
}

/// Allowlist entries as shown: a single host without its `/32` or `/128`.
fn show_net(n: &ipnet::IpNet) -> String {
    if n.prefix_len() == n.max_prefix_len() {
        n.addr().to_string()
    } else {
        n.to_string()
    }
}

/// The token as the API shows it (never the secret or its hash).
pub(crate) fn view(gw: &Gateway, t: &Token, now: model::UnixTime) -> Value {
    let last_used = match (t.last_used_at, gw.table.last_used(&t.id)) {
        (Some(a), Some(b)) => Some(a.max(b)),
        (a, b) => a.or(b),
    };
    json!({
        "id": t.id,
        "tenant": t.tenant,
        "name": t.name,
        "ip_allowlist": t.ip_allowlist.iter().map(show_net).collect::<Vec<_>>(),
        "products": t.products,
        "status": t.status(now),
        "created_at": model::format_time(t.created_at),
        "expires_at": t.expires_at.map(model::format_time),
        "last_used_at": last_used.map(model::format_time),
    })
}

fn with_secret(mut v: Value, secret: &str) -> Value {
    v["token"] = Value::String(secret.to_string());
    v
}

fn parse_allowlist(gw: &Gateway, entries: &[String]) -> ApiResult<Vec<ipnet::IpNet>> {
    let rt = gw.runtime.load();
    model::parse_allowlist(
        entries,
        rt.config.max_allowlist_entries,
        rt.config.allow_any_ip,
    )
    .map_err(invalid_allowlist)
}

fn parse_expiry(s: &str, now: model::UnixTime) -> ApiResult<model::UnixTime> {
    let t = model::parse_time(s).map_err(|e| invalid(format!("expires_at: {e}")))?;
    if t <= now {
        return Err(invalid(format!("expires_at {s:?} is in the past")));
    }
    Ok(t)
}

pub(crate) async fn create(
    State(gw): State<AppState>,
    Extension(actor): Extension<Actor>,
    Path(tenant): Path<String>,
    body: Bytes,
) -> ApiResult<Response> {
    let tenant_rec = gw
        .store
        .get_tenant(&tenant)
        .await?
        .ok_or_else(|| StoreError::TenantNotFound(tenant.clone()))?;
    let req: CreateToken = parse_json_fields(&body, "invalid_request", ALLOWLIST_FIELD)?;
    let now = model::now();
    let name = req.name.unwrap_or_default();
    model::validate_label("name", &name).map_err(invalid)?;
    let allowlist = match &req.ip_allowlist {
        None => {
            return Err(invalid_allowlist(
                "ip_allowlist is required: the addresses this token may be used from",
            ))
        }
        Some(l) => parse_allowlist(&gw, l)?,
    };
    let products = match &req.products {
        None => None,
        Some(p) => Some(model::validate_products(p).map_err(|e| {
            ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "product_not_purchased", e)
        })?),
    };
    let expires_at = req
        .expires_at
        .as_deref()
        .map(|s| parse_expiry(s, now))
        .transpose()?;
    let format = gw.runtime.load().config.token_format.clone();
    let secret = format.generate();
    let token = Token {
        id: model::new_token_id(),
        tenant: tenant_rec.id.clone(),
        name,
        hash: TokenHash::of(&secret),
        ip_allowlist: allowlist,
        products,
        created_at: now,
        expires_at,
        disabled: false,
        revoked_at: None,
        previous: None,
        last_used_at: None,
        version: 0,
    };
    let token = gw.store.create_token(token, now).await?;
    gw.table.apply(Change::TokenUpserted(token.clone()));
    let v = view(&gw, &token, now);
    audit(&gw, &actor, "token.create", &token.id, v.clone()).await;
    Ok((StatusCode::CREATED, Json(with_secret(v, &secret))).into_response())
}

pub(crate) async fn list(
    State(gw): State<AppState>,
    Path(tenant): Path<String>,
) -> ApiResult<Json<Value>> {
    let tokens = gw.store.list_tokens(&tenant).await?;
    let now = model::now();
    let list: Vec<Value> = tokens.iter().map(|t| view(&gw, t, now)).collect();
    Ok(Json(json!({ "tokens": list })))
}

pub(crate) async fn show(
    State(gw): State<AppState>,
    Path(id): Path<String>,
) -> ApiResult<Json<Value>> {
    let t = gw
        .store
        .get_token(&id)
        .await?
        .ok_or_else(|| StoreError::TokenNotFound(id.clone()))?;
    Ok(Json(view(&gw, &t, model::now())))
}

pub(crate) async fn update(
    State(gw): State<AppState>,
    Extension(actor): Extension<Actor>,
    Path(id): Path<String>,
    body: Bytes,
) -> ApiResult<Json<Value>> {
    if gw.store.get_token(&id).await?.is_none() {
        return Err(StoreError::TokenNotFound(id).into());
    }
    let req: PatchToken = parse_json_fields(&body, "invalid_request", ALLOWLIST_FIELD)?;
    let now = model::now();
    if let Some(n) = &req.name {
        model::validate_label("name", n).map_err(invalid)?;
    }
    let allowlist = req
        .ip_allowlist
        .as_deref()
        .map(|l| parse_allowlist(&gw, l))
        .transpose()?;
    let products = match &req.products {
        Some(Some(p)) => Some(Some(model::validate_products(p).map_err(|e| {
            ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "product_not_purchased", e)
        })?)),
        Some(None) => Some(None),
        None => None,
    };
    let expires_at = match &req.expires_at {
        Some(Some(s)) => Some(Some(parse_expiry(s, now)?)),
        Some(None) => Some(None),
        None => None,
    };
    let edit = move |t: &mut Token, _tenant: &model::Tenant| {
        if let Some(n) = &req.name {
            t.name = n.clone();
        }
        if let Some(a) = &allowlist {
            t.ip_allowlist = a.clone();
        }
        if let Some(p) = &products {
            t.products = p.clone();
        }
        if let Some(e) = expires_at {
            t.expires_at = e;
        }
        if let Some(d) = req.disabled {
            t.disabled = d;
        }
        Ok(())
    };
    let token = gw.store.update_token(&id, &edit, now).await?;
    gw.table.apply(Change::TokenUpserted(token.clone()));
    let v = view(&gw, &token, now);
    audit(
        &gw,
        &actor,
        "token.update",
        &id,
        serde_json::from_slice(&body).unwrap_or(Value::Null),
    )
    .await;
    Ok(Json(v))
}

pub(crate) async fn revoke(
    State(gw): State<AppState>,
    Extension(actor): Extension<Actor>,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    let now = model::now();
    let edit = move |t: &mut Token, _: &model::Tenant| {
        t.revoked_at = Some(now);
        t.previous = None;
        Ok(())
    };
    match gw.store.update_token(&id, &edit, now).await {
        Ok(token) => {
            gw.table.apply(Change::TokenUpserted(token));
            audit(&gw, &actor, "token.revoke", &id, Value::Null).await;
            Ok(StatusCode::NO_CONTENT)
        }
        // Revoking twice is not an error: the token is revoked either way.
        Err(StoreError::TokenRevoked(_)) => Ok(StatusCode::NO_CONTENT),
        Err(e) => Err(e.into()),
    }
}

pub(crate) async fn rotate(
    State(gw): State<AppState>,
    Extension(actor): Extension<Actor>,
    Path(id): Path<String>,
    body: Bytes,
) -> ApiResult<Json<Value>> {
    if gw.store.get_token(&id).await?.is_none() {
        return Err(StoreError::TokenNotFound(id).into());
    }
    let req: Rotate = parse_json(&body, "invalid_request")?;
    let grace = match req.grace.as_deref() {
        None => Duration::ZERO,
        Some(s) => humantime::parse_duration(s)
            .map_err(|e| invalid(format!("grace {s:?} is not a duration such as \"5m\": {e}")))?,
    };
    if grace > Duration::from_secs(30 * 24 * 3600) {
        return Err(invalid("grace must be at most 30 days"));
    }
    let now = model::now();
    let secret = gw.runtime.load().config.token_format.generate();
    let new_hash = TokenHash::of(&secret);
    let edit = move |t: &mut Token, _: &model::Tenant| {
        t.previous = (!grace.is_zero()).then(|| PreviousSecret {
            hash: t.hash,
            until: now + grace.as_secs().max(1) as i64,
        });
        t.hash = new_hash;
        Ok(())
    };
    let token = gw.store.update_token(&id, &edit, now).await?;
    gw.table.apply(Change::TokenUpserted(token.clone()));
    let v = view(&gw, &token, now);
    audit(
        &gw,
        &actor,
        "token.rotate",
        &id,
        json!({ "grace": humantime::format_duration(grace).to_string() }),
    )
    .await;
    Ok(Json(with_secret(v, &secret)))
}
