//! Prometheus metrics (prometheus-client). Names are the contract's:
//! `tollgate_requests_total{route,product,outcome,status}`,
//! `tollgate_request_duration_seconds`, `tollgate_upstream_duration_seconds`,
//! `tollgate_tokens`, `tollgate_tenants`, `tollgate_config_reloads_total`,
//! `tollgate_store_connected`, `tollgate_store_last_sync_age_seconds`,
//! plus `tollgate_upstream_errors_total{route,kind}`.
//!
//! Label values on the hot path are `&'static str` (route prefixes are
//! interned once), so counting a request allocates nothing once its label
//! set has been seen.

use std::collections::HashSet;
use std::sync::atomic::AtomicU64;
use std::sync::{Mutex, OnceLock};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub route: &'static str,
    pub product: &'static str,
    pub outcome: &'static str,
    pub status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UpstreamErrorLabels {
    pub route: &'static str,
    pub kind: &'static str,
}

/// All metrics of one gateway process.
pub struct Metrics {
    registry: Registry,
    pub requests: Family<RequestLabels, Counter>,
    pub request_duration: Histogram,
    pub upstream_duration: Histogram,
    pub upstream_errors: Family<UpstreamErrorLabels, Counter>,
    pub tokens: Gauge,
    pub tenants: Gauge,
    pub reloads: Family<ResultLabels, Counter>,
    pub store_connected: Gauge,
    pub store_last_sync_age: Gauge<f64, AtomicU64>,
}

fn latency_buckets() -> impl Iterator<Item = f64> {
    [
        0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    ]
    .into_iter()
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::default();
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "tollgate_requests",
            "Requests on the public listener by route, outcome and status",
            requests.clone(),
        );
        let request_duration = Histogram::new(latency_buckets());
        registry.register(
            "tollgate_request_duration_seconds",
            "Whole request time on the public listener, to the response head",
            request_duration.clone(),
        );
        let upstream_duration = Histogram::new(latency_buckets());
        registry.register(
            "tollgate_upstream_duration_seconds",
            "Time from sending a request upstream to its response head",
            upstream_duration.clone(),
        );
        let upstream_errors = Family::<UpstreamErrorLabels, Counter>::default();
        registry.register(
            "tollgate_upstream_errors",
            "Upstream failures by route and kind (connect, timeout, protocol)",
            upstream_errors.clone(),
        );
        let tokens = Gauge::default();
        registry.register("tollgate_tokens", "Tokens not revoked", tokens.clone());
        let tenants = Gauge::default();
        registry.register("tollgate_tenants", "Tenants", tenants.clone());
        let reloads = Family::<ResultLabels, Counter>::default();
        registry.register(
            "tollgate_config_reloads",
            "Config reloads by result (ok, error)",
            reloads.clone(),
        );
        let store_connected = Gauge::default();
        registry.register(
            "tollgate_store_connected",
            "1 when the store answers, 0 when it does not",
            store_connected.clone(),
        );
        let store_last_sync_age = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "tollgate_store_last_sync_age_seconds",
            "Seconds since the in-memory table last synced with the store",
            store_last_sync_age.clone(),
        );
        // Make both results visible from the start.
        let _ = reloads.get_or_create(&ResultLabels { result: "ok" });
        let _ = reloads.get_or_create(&ResultLabels { result: "error" });
        Metrics {
            registry,
            requests,
            request_duration,
            upstream_duration,
            upstream_errors,
            tokens,
            tenants,
            reloads,
            store_connected,
            store_last_sync_age,
        }
    }

    /// Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}

/// Interns a label value so the hot path can use `&'static str`. Each
/// distinct string is leaked once; route prefixes are few.
pub fn intern(s: &str) -> &'static str {
    static SEEN: OnceLock<Mutex<HashSet<&'static str>>> = OnceLock::new();
    let mut seen = SEEN
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    if let Some(v) = seen.get(s) {
        return v;
    }
    let v: &'static str = Box::leak(s.to_string().into_boxed_str());
    seen.insert(v);
    v
}
