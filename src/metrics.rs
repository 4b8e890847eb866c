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
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::encoding::{EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::{MetricType, TypedMetric};
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
    /// Tells this instance's entries apart in the per-thread counter cache.
    id: u64,
    requests: Family<RequestLabels, Counter>,
    pub request_duration: LatencyHistogram,
    pub upstream_duration: LatencyHistogram,
    pub upstream_errors: Family<UpstreamErrorLabels, Counter>,
    pub tokens: Gauge,
    pub tenants: Gauge,
    pub reloads: Family<ResultLabels, Counter>,
    pub store_connected: Gauge,
    pub store_last_sync_age: Gauge<f64, AtomicU64>,
}

/// Upper bounds (seconds) of the latency histograms' buckets.
const LATENCY_BOUNDS: [f64; 15] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// A latency histogram that every request observes twice: `observe` is two
/// relaxed atomic adds, where prometheus-client's `Histogram` takes a
/// write lock that every worker thread would contend for. The sum is kept
/// in nanoseconds; the count is the sum of the buckets, so a scrape is
/// always self-consistent (`_count` equals the `+Inf` bucket).
#[derive(Clone, Debug, Default)]
pub struct LatencyHistogram(Arc<HistogramCells>);

#[derive(Debug, Default)]
struct HistogramCells {
    /// One per bound, then `+Inf`.
    buckets: [AtomicU64; LATENCY_BOUNDS.len() + 1],
    sum_nanos: AtomicU64,
}

impl LatencyHistogram {
    pub fn observe(&self, seconds: f64) {
        let i = LATENCY_BOUNDS
            .iter()
            .position(|b| seconds <= *b)
            .unwrap_or(LATENCY_BOUNDS.len());
        self.0.buckets[i].fetch_add(1, Ordering::Relaxed);
        // `as` saturates: negative or NaN count as 0.
        let nanos = (seconds * 1e9) as u64;
        self.0.sum_nanos.fetch_add(nanos, Ordering::Relaxed);
    }
}

impl TypedMetric for LatencyHistogram {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for LatencyHistogram {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let buckets: Vec<(f64, u64)> = LATENCY_BOUNDS
            .iter()
            .copied()
            .chain([f64::MAX])
            .zip(self.0.buckets.iter().map(|c| c.load(Ordering::Relaxed)))
            .collect();
        let count = buckets.iter().map(|(_, n)| n).sum();
        let sum = self.0.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9;
        encoder.encode_histogram::<NoLabelSet>(sum, count, &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
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
        let request_duration = LatencyHistogram::default();
        registry.register(
            "tollgate_request_duration_seconds",
            "Whole request time on the public listener, to the response head",
            request_duration.clone(),
        );
        let upstream_duration = LatencyHistogram::default();
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
        registry.register(
            "tollgate_tokens",
            "Active tokens (not revoked, disabled or expired)",
            tokens.clone(),
        );
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
        static NEXT_ID: AtomicU64 = AtomicU64::new(0);
        Metrics {
            registry,
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
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

    /// Counts one request in `tollgate_requests_total`.
    ///
    /// The family's map sits behind one `RwLock`; every worker taking its
    /// read side per request would bounce the lock word between cores. So
    /// each thread keeps the counters it has used (a `Counter` is a shared
    /// atomic) and finds them again with a short linear scan; the family is
    /// only consulted the first time a thread sees a label set.
    pub fn count_request(&self, labels: RequestLabels) {
        thread_local! {
            static SEEN: std::cell::RefCell<Vec<(u64, RequestLabels, Counter)>> =
                const { std::cell::RefCell::new(Vec::new()) };
        }
        SEEN.with_borrow_mut(|seen| {
            if let Some((_, _, c)) = seen
                .iter()
                .find(|(id, l, _)| *id == self.id && *l == labels)
            {
                c.inc();
                return;
            }
            let counter = self.requests.get_or_create(&labels).clone();
            counter.inc();
            // Label sets are few (routes x outcomes x statuses); the bound
            // only guards against a pathological mix of statuses.
            if seen.len() < 256 {
                seen.push((self.id, labels, counter));
            }
        });
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latency_histogram_encodes_cumulative_buckets_count_and_sum() {
        let m = Metrics::new();
        for s in [0.0001, 0.0007, 0.002, 45.0] {
            m.request_duration.observe(s);
        }
        m.request_duration.observe(f64::NAN);
        let text = m.encode();
        let line = |needle: &str| {
            text.lines()
                .find(|l| l.starts_with(needle))
                .unwrap_or_else(|| panic!("{needle} missing in:\n{text}"))
                .rsplit(' ')
                .next()
                .unwrap()
                .to_string()
        };
        assert_eq!(
            line("tollgate_request_duration_seconds_bucket{le=\"0.0005\"}"),
            "1"
        );
        assert_eq!(
            line("tollgate_request_duration_seconds_bucket{le=\"0.001\"}"),
            "2"
        );
        assert_eq!(
            line("tollgate_request_duration_seconds_bucket{le=\"0.0025\"}"),
            "3"
        );
        assert_eq!(
            line("tollgate_request_duration_seconds_bucket{le=\"30.0\"}"),
            "3"
        );
        // 45 s and NaN land in +Inf only.
        assert_eq!(
            line("tollgate_request_duration_seconds_bucket{le=\"+Inf\"}"),
            "5"
        );
        assert_eq!(line("tollgate_request_duration_seconds_count"), "5");
        let sum: f64 = line("tollgate_request_duration_seconds_sum")
            .parse()
            .unwrap();
        assert!((sum - 45.0028).abs() < 1e-6, "{sum}");
        assert!(text.contains("# TYPE tollgate_upstream_duration_seconds histogram"));
    }

    #[test]
    fn request_counts_add_up_across_threads_and_instances() {
        let (a, b) = (Metrics::new(), Metrics::new());
        let labels = |status| RequestLabels {
            route: "/crm/",
            product: "crm",
            outcome: "forwarded",
            status,
        };
        std::thread::scope(|s| {
            for _ in 0..2 {
                s.spawn(|| {
                    for _ in 0..1000 {
                        a.count_request(labels(200));
                    }
                    a.count_request(labels(502));
                    b.count_request(labels(200));
                });
            }
        });
        let a = a.encode();
        assert!(a.contains("tollgate_requests_total{route=\"/crm/\",product=\"crm\",outcome=\"forwarded\",status=\"200\"} 2000"), "{a}");
        assert!(a.contains("status=\"502\"} 2"), "{a}");
        assert!(b.encode().contains("status=\"200\"} 2\n"));
    }
}
