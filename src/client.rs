//! The admin client behind `tollgate tenant …` and `tollgate token …`: one
//! HTTP call to the admin API per command, answer printed as JSON.
//! Reads `TOLLGATE_ADMIN_URL` (default `http://127.0.0.1:9090`) and
//! `TOLLGATE_ADMIN_KEY`.

use anyhow::{bail, Context};
use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;

/// Where and how to reach the admin API.
pub struct AdminClient {
    base: String,
    key: Option<String>,
}

impl AdminClient {
    pub fn from_env() -> AdminClient {
        AdminClient {
            base: std::env::var("TOLLGATE_ADMIN_URL")
                .ok()
                .filter(|s| !s.is_empty())
                .unwrap_or_else(|| "http://127.0.0.1:9090".into())
                .trim_end_matches('/')
                .to_string(),
            key: std::env::var("TOLLGATE_ADMIN_KEY")
                .ok()
                .filter(|s| !s.is_empty()),
        }
    }

    pub fn new(base: &str, key: &str) -> AdminClient {
        AdminClient {
            base: base.trim_end_matches('/').to_string(),
            key: Some(key.to_string()),
        }
    }

    /// Makes one call; returns the status and the JSON body (`null` when empty).
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> anyhow::Result<(StatusCode, Value)> {
        let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
        let uri = format!("{}{}", self.base, path);
        let mut req = Request::builder().method(method).uri(&uri);
        if let Some(k) = &self.key {
            req = req.header("authorization", format!("Bearer {k}"));
        }
        let bytes = match body {
            Some(v) => {
                req = req.header("content-type", "application/json");
                Bytes::from(serde_json::to_vec(&v)?)
            }
            None => Bytes::new(),
        };
        let req = req
            .body(Full::new(bytes))
            .with_context(|| format!("bad admin URL {uri}"))?;
        let resp = client.request(req).await.with_context(|| {
            format!(
                "cannot reach the admin API at {} (TOLLGATE_ADMIN_URL)",
                self.base
            )
        })?;
        let status = resp.status();
        let body = resp.into_body().collect().await?.to_bytes();
        let json = if body.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&body)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&body).into()))
        };
        Ok((status, json))
    }

    /// Makes a call and fails with the API's error message on a non-2xx.
    pub async fn expect_ok(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> anyhow::Result<Value> {
        if self.key.is_none() {
            bail!("set TOLLGATE_ADMIN_KEY to an admin key");
        }
        let (status, json) = self.call(method, path, body).await?;
        if !status.is_success() {
            let code = json["error"]["code"].as_str().unwrap_or("error");
            let msg = json["error"]["message"].as_str().unwrap_or("");
            bail!("{} {code}: {msg}", status.as_u16());
        }
        Ok(json)
    }
}
