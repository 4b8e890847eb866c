//! Routes: the compiled route table (longest prefix wins), upstream URLs,
//! and the one path normalization both routing and forwarding use.

use std::borrow::Cow;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use http::uri::{Authority, Scheme};

/// One `[[route]]`.
#[derive(Debug)]
pub struct Route {
    /// Position in the config file.
    pub index: usize,
    pub prefix: Box<str>,
    pub product: Box<str>,
    /// `product`, resolved once for the decision.
    pub product_id: crate::table::Product,
    pub upstreams: Box<[Upstream]>,
    pub strip_prefix: bool,
    /// Extra trust root for https upstreams.
    pub ca_file: Option<std::path::PathBuf>,
    /// Metrics label (the prefix, interned).
    pub label: &'static str,
    /// Metrics label (the product, interned).
    pub product_label: &'static str,
    /// Round-robin cursor over `upstreams`.
    next: AtomicUsize,
}

impl Route {
    pub fn new(
        index: usize,
        prefix: &str,
        product: &str,
        upstreams: Vec<Upstream>,
        strip_prefix: bool,
    ) -> Route {
        Route {
            index,
            prefix: prefix.into(),
            product: product.into(),
            product_id: crate::table::Product::new(product),
            upstreams: upstreams.into_boxed_slice(),
            strip_prefix,
            ca_file: None,
            label: crate::metrics::intern(prefix),
            product_label: crate::metrics::intern(product),
            next: AtomicUsize::new(0),
        }
    }

    /// The next upstream in round-robin order, skipping ejected ones; when
    /// every upstream is ejected, plain round-robin (a pool never fails
    /// closed on the gateway's own guess).
    pub fn pick_upstream(&self) -> &Upstream {
        let n = self.upstreams.len();
        if n == 1 {
            return &self.upstreams[0];
        }
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let now = Upstream::clock_ms();
        (0..n)
            .map(|k| &self.upstreams[(start + k) % n])
            .find(|u| !u.is_ejected(now))
            .unwrap_or(&self.upstreams[start % n])
    }

    /// Another upstream than `failed` that is not ejected, for a retry.
    pub fn alternative(&self, failed: &Upstream) -> Option<&Upstream> {
        let now = Upstream::clock_ms();
        self.upstreams
            .iter()
            .find(|u| !std::ptr::eq(*u, failed) && !u.is_ejected(now))
    }

    /// The path to send upstream for a normalized request path.
    pub fn upstream_path<'a>(&self, path: &'a str) -> &'a str {
        if !self.strip_prefix {
            return path;
        }
        // "/crm/v1/x" with prefix "/crm/" → "/v1/x"; keep the slash.
        let keep = self.prefix.trim_end_matches('/').len();
        match &path[keep..] {
            "" => "/",
            rest => rest,
        }
    }
}

/// How long an upstream that failed to connect or timed out is skipped
/// (nginx's `max_fails=1 fail_timeout=10s`).
pub const EJECT_FOR_MS: u64 = 10_000;

/// An upstream base URL: `http://host:port[/base]`.
#[derive(Debug)]
pub struct Upstream {
    pub scheme: Scheme,
    pub authority: Authority,
    /// Path prepended to the forwarded path, without a trailing slash.
    pub base_path: Box<str>,
    /// The `Host` header requests to it carry.
    pub host: http::HeaderValue,
    /// Passive health: skipped until this time (`clock_ms`), 0 when healthy.
    ejected_until: AtomicU64,
}

impl Upstream {
    /// Milliseconds on a process-wide monotonic clock.
    fn clock_ms() -> u64 {
        static EPOCH: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
        EPOCH
            .get_or_init(std::time::Instant::now)
            .elapsed()
            .as_millis() as u64
            + 1
    }

    fn is_ejected(&self, now: u64) -> bool {
        self.ejected_until.load(Ordering::Relaxed) > now
    }

    /// Marks the upstream as failing: skipped for [`EJECT_FOR_MS`].
    pub fn eject(&self) {
        self.ejected_until
            .store(Self::clock_ms() + EJECT_FOR_MS, Ordering::Relaxed);
    }

    pub fn parse(s: &str) -> Result<Upstream, String> {
        let uri: http::Uri = s.parse().map_err(|e| format!("{s:?} is not a URL: {e}"))?;
        let scheme = match uri.scheme_str() {
            Some("http") => Scheme::HTTP,
            Some("https") => Scheme::HTTPS,
            _ => return Err(format!("{s:?} must start with http:// or https://")),
        };
        let authority = uri
            .authority()
            .cloned()
            .ok_or_else(|| format!("{s:?} has no host"))?;
        if authority.as_str().contains('@') {
            return Err(format!("{s:?} must not contain credentials"));
        }
        if uri.query().is_some() {
            return Err(format!("{s:?} must not have a query"));
        }
        let host = http::HeaderValue::from_str(authority.as_str())
            .map_err(|_| format!("{s:?} has a host that cannot be a Host header"))?;
        Ok(Upstream {
            scheme,
            authority,
            host,
            base_path: uri.path().trim_end_matches('/').into(),
            ejected_until: AtomicU64::new(0),
        })
    }
}

/// The routes, longest prefix first. Cheap to clone (shared).
#[derive(Debug, Clone)]
pub struct RouteTable {
    routes: Arc<[Route]>,
}

impl RouteTable {
    pub fn new(mut routes: Vec<Route>) -> RouteTable {
        routes.sort_by_key(|r| std::cmp::Reverse(r.prefix.len()));
        RouteTable {
            routes: routes.into(),
        }
    }

    /// The route whose prefix is the longest match for a normalized path.
    #[inline]
    pub fn find(&self, path: &str) -> Option<&Route> {
        self.routes.iter().find(|r| path.starts_with(&*r.prefix))
    }

    pub fn iter(&self) -> impl Iterator<Item = &Route> {
        self.routes.iter()
    }
}

/// Why a path is refused (400 `bad_request`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BadPath {
    NotOrigin,
    BadPercentEncoding,
    EncodedSeparator,
    EncodedDotSegment,
    Backslash,
}

impl BadPath {
    pub fn message(self) -> &'static str {
        match self {
            BadPath::NotOrigin => "the request path must start with /",
            BadPath::BadPercentEncoding => "the request path has a malformed percent-encoding",
            BadPath::EncodedSeparator => {
                "the request path percent-encodes a separator (%2F, %5C) or a NUL byte"
            }
            BadPath::EncodedDotSegment => "the request path percent-encodes a dot segment",
            BadPath::Backslash => "the request path contains a backslash",
        }
    }
}

/// Normalizes a request path: refuses encodings that could hide a separator
/// or a dot segment, then resolves `.` and `..` (RFC 3986 §5.2.4). Borrows
/// when there is nothing to change, the common case.
pub fn normalize_path(path: &str) -> Result<Cow<'_, str>, BadPath> {
    let b = path.as_bytes();
    if b.first() != Some(&b'/') {
        return Err(BadPath::NotOrigin);
    }
    let mut has_dot_segment = false;
    if b.contains(&b'\\') {
        return Err(BadPath::Backslash);
    }
    for seg in path[1..].split('/') {
        if seg == "." || seg == ".." {
            has_dot_segment = true;
        } else if seg.contains('%') {
            check_encoded_segment(seg)?;
        }
    }
    if !has_dot_segment {
        return Ok(Cow::Borrowed(path));
    }
    Ok(Cow::Owned(remove_dot_segments(path)))
}

fn check_encoded_segment(seg: &str) -> Result<(), BadPath> {
    let b = seg.as_bytes();
    let mut decoded_dots = 0usize;
    let mut decoded_len = 0usize;
    let mut i = 0;
    while i < b.len() {
        let c = if b[i] == b'%' {
            let hex = b.get(i + 1..i + 3).ok_or(BadPath::BadPercentEncoding)?;
            let hi = (hex[0] as char)
                .to_digit(16)
                .ok_or(BadPath::BadPercentEncoding)?;
            let lo = (hex[1] as char)
                .to_digit(16)
                .ok_or(BadPath::BadPercentEncoding)?;
            i += 3;
            (hi * 16 + lo) as u8
        } else {
            i += 1;
            b[i - 1]
        };
        if matches!(c, b'/' | b'\\' | 0) {
            return Err(BadPath::EncodedSeparator);
        }
        decoded_len += 1;
        if c == b'.' {
            decoded_dots += 1;
        }
    }
    if decoded_len == decoded_dots && (1..=2).contains(&decoded_len) {
        return Err(BadPath::EncodedDotSegment);
    }
    Ok(())
}

fn remove_dot_segments(path: &str) -> String {
    let mut out: Vec<&str> = Vec::new();
    let segs: Vec<&str> = path[1..].split('/').collect();
    let last = segs.len() - 1;
    for (i, seg) in segs.iter().enumerate() {
        match *seg {
            "." => {
                if i == last {
                    out.push("");
                }
            }
            ".." => {
                out.pop();
                if i == last {
                    out.push("");
                }
            }
            s => out.push(s),
        }
    }
    let mut s = String::with_capacity(path.len());
    for seg in out {
        s.push('/');
        s.push_str(seg);
    }
    if s.is_empty() {
        s.push('/');
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn norm(p: &str) -> Result<String, BadPath> {
        normalize_path(p).map(|c| c.into_owned())
    }

    #[test]
    fn dot_segments_are_resolved() {
        assert_eq!(norm("/crm/../marketing/x").unwrap(), "/marketing/x");
        assert_eq!(norm("/crm/./a/./b").unwrap(), "/crm/a/b");
        assert_eq!(norm("/crm/a/..").unwrap(), "/crm/");
        assert_eq!(norm("/crm/a/.").unwrap(), "/crm/a/");
        assert_eq!(norm("/../../etc/passwd").unwrap(), "/etc/passwd");
        assert_eq!(norm("/..").unwrap(), "/");
        assert_eq!(norm("/a/b/../../..").unwrap(), "/");
        assert_eq!(norm("/crm/a..b/.x").unwrap(), "/crm/a..b/.x");
    }

    #[test]
    fn plain_paths_are_borrowed() {
        assert!(matches!(
            normalize_path("/crm/v1/contacts"),
            Ok(Cow::Borrowed(_))
        ));
        assert!(matches!(normalize_path("/crm/a%20b"), Ok(Cow::Borrowed(_))));
    }

    #[test]
    fn encoded_separators_and_dot_segments_are_refused() {
        for p in ["/crm/..%2Fmarketing", "/crm/%2f", "/crm/a%5Cb", "/crm/%00"] {
            assert_eq!(norm(p), Err(BadPath::EncodedSeparator), "{p}");
        }
        for p in [
            "/crm/%2E%2E/marketing",
            "/crm/%2e/x",
            "/crm/.%2e/x",
            "/crm/%2E.",
        ] {
            assert_eq!(norm(p), Err(BadPath::EncodedDotSegment), "{p}");
        }
        assert_eq!(norm("/crm/a%2Eb").unwrap(), "/crm/a%2Eb");
        assert_eq!(norm("/crm/%zz"), Err(BadPath::BadPercentEncoding));
        assert_eq!(norm("/crm/%2"), Err(BadPath::BadPercentEncoding));
        assert_eq!(norm("/crm/a\\b"), Err(BadPath::Backslash));
        assert_eq!(norm("*"), Err(BadPath::NotOrigin));
        assert_eq!(norm(""), Err(BadPath::NotOrigin));
    }

    fn table() -> RouteTable {
        let up = || vec![Upstream::parse("http://127.0.0.1:1").unwrap()];
        RouteTable::new(vec![
            Route::new(0, "/crm/", "crm", up(), false),
            Route::new(1, "/crm/admin/", "crmadmin", up(), true),
            Route::new(2, "/", "root", up(), false),
        ])
    }

    #[test]
    fn longest_prefix_wins() {
        let t = table();
        assert_eq!(&*t.find("/crm/admin/x").unwrap().product, "crmadmin");
        assert_eq!(&*t.find("/crm/x").unwrap().product, "crm");
        assert_eq!(&*t.find("/crm").unwrap().product, "root");
        let t = RouteTable::new(vec![Route::new(0, "/crm/", "crm", vec![], false)]);
        assert!(t.find("/crm").is_none());
        assert!(t.find("/marketing/").is_none());
    }

    #[test]
    fn ejected_upstreams_are_skipped_until_all_are() {
        let ups = ["http://a:1", "http://b:1", "http://c:1"]
            .iter()
            .map(|u| Upstream::parse(u).unwrap())
            .collect();
        let r = Route::new(0, "/x/", "x", ups, false);
        r.upstreams[1].eject();
        for _ in 0..10 {
            assert_ne!(r.pick_upstream().authority.as_str(), "b:1");
        }
        assert_eq!(
            r.alternative(&r.upstreams[0]).unwrap().authority.as_str(),
            "c:1"
        );
        r.upstreams[0].eject();
        r.upstreams[2].eject();
        // All ejected: round-robin over all of them again.
        let picked: std::collections::HashSet<_> = (0..6)
            .map(|_| r.pick_upstream().authority.as_str())
            .collect();
        assert_eq!(picked.len(), 3);
        assert!(r.alternative(&r.upstreams[0]).is_none());
    }

    #[test]
    fn strip_prefix_keeps_a_leading_slash() {
        let r = Route::new(0, "/crm/", "crm", vec![], true);
        assert_eq!(r.upstream_path("/crm/v1/x"), "/v1/x");
        assert_eq!(r.upstream_path("/crm/"), "/");
        let r = Route::new(0, "/crm/", "crm", vec![], false);
        assert_eq!(r.upstream_path("/crm/v1/x"), "/crm/v1/x");
    }

    #[test]
    fn upstream_urls_are_checked() {
        let u = Upstream::parse("http://backend:7001/api/").unwrap();
        assert_eq!(u.authority.as_str(), "backend:7001");
        assert_eq!(&*u.base_path, "/api");
        assert!(Upstream::parse("https://x").is_ok());
        assert!(Upstream::parse("ftp://x").is_err());
        assert!(Upstream::parse("http://u:p@x").is_err());
        assert!(Upstream::parse("127.0.0.1:7001").is_err());
        assert!(Upstream::parse("http://x/?a=b").is_err());
    }
}
