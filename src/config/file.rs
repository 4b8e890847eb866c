//! The raw `gateway.toml` as serde reads it: every key of the contract, with
//! its default, and nothing else (`deny_unknown_fields`). No value is
//! interpreted here; [`super::Config::from_raw`] does that.

use serde::Deserialize;

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct RawConfig {
    pub listen: RawListen,
    pub store: RawStore,
    pub admin: RawAdmin,
    pub tenants: RawTenants,
    pub tokens: RawTokens,
    pub client_ip: RawClientIp,
    pub limits: RawLimits,
    pub log: RawLog,
    pub route: Vec<RawRoute>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawListen {
    pub public: String,
    pub admin: String,
    pub tls: Option<RawTls>,
}

impl Default for RawListen {
    fn default() -> Self {
        RawListen {
            public: "127.0.0.1:8080".into(),
            admin: "127.0.0.1:9090".into(),
            tls: None,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTls {
    pub cert: String,
    pub key: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawStore {
    pub kind: String,
    pub path: Option<String>,
    pub url: Option<String>,
    pub key_prefix: Option<String>,
}

impl Default for RawStore {
    fn default() -> Self {
        RawStore {
            kind: "embedded".into(),
            path: None,
            url: None,
            key_prefix: None,
        }
    }
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct RawAdmin {
    pub key_hashes: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawTenants {
    pub default_token_quota: i64,
}

impl Default for RawTenants {
    fn default() -> Self {
        RawTenants {
            default_token_quota: 1,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawTokens {
    pub prefix: String,
    pub max_allowlist_entries: i64,
    pub allow_any_ip: bool,
}

impl Default for RawTokens {
    fn default() -> Self {
        RawTokens {
            prefix: "tg_".into(),
            max_allowlist_entries: 64,
            allow_any_ip: false,
        }
    }
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct RawClientIp {
    pub trusted_proxies: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawLimits {
    pub max_header_bytes: i64,
    pub header_read_timeout: String,
    pub upstream_connect_timeout: String,
    pub upstream_timeout: String,
    pub idle_timeout: String,
    pub max_connections: i64,
    pub shutdown_timeout: String,
}

impl Default for RawLimits {
    fn default() -> Self {
        RawLimits {
            max_header_bytes: 65536,
            header_read_timeout: "10s".into(),
            upstream_connect_timeout: "2s".into(),
            upstream_timeout: "30s".into(),
            idle_timeout: "60s".into(),
            max_connections: 10000,
            shutdown_timeout: "30s".into(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawLog {
    pub format: String,
    pub level: String,
}

impl Default for RawLog {
    fn default() -> Self {
        RawLog {
            format: "json".into(),
            level: "info".into(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRoute {
    pub prefix: String,
    pub product: String,
    pub upstream: RawUpstreams,
    #[serde(default)]
    pub strip_prefix: bool,
    pub ca_file: Option<String>,
}

/// `upstream = "http://…"` or `upstream = ["http://…", …]`.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum RawUpstreams {
    One(String),
    Many(Vec<String>),
}

impl RawUpstreams {
    pub fn as_slice(&self) -> &[String] {
        match self {
            RawUpstreams::One(s) => std::slice::from_ref(s),
            RawUpstreams::Many(v) => v,
        }
    }
}
