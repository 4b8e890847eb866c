//! The access log: one line per request, JSON or `key=value` text.
//!
//! Lines are formatted straight into a per-thread buffer (no `tracing`
//! field visitors, no `serde_json` map) and handed to the log writer
//! thread in batches: a data-plane worker sends its buffer when it passes
//! 16 KiB and every 100 ms ([`flush_thread`], driven by the worker), so the
//! writer thread is woken a few times a second instead of once per request.
//! Any other thread writes each line at once. A line can therefore reach
//! stdout up to 100 ms after its request ended (nginx's `access_log ...
//! flush=` trade-off); a graceful shutdown flushes everything.
//!
//! Whether lines are written at all is `tracing`'s decision, so `log.level`,
//! its reload and `RUST_LOG` (e.g. `RUST_LOG=access=off`) apply as to every
//! other log line: an access line is an `INFO` event of target `access`.
//!
//! Measured with `benches/e2e.sh` (access logs on, JSON to a file): CPU per
//! proxied request 22.2 µs through `tracing-subscriber`'s JSON formatter
//! against 16.5 µs with logs off.

use std::cell::{Cell, RefCell};
use std::fmt::Write as _;
use std::io::Write as _;
use std::net::IpAddr;
use std::sync::OnceLock;
use std::time::SystemTime;

use crate::config::LogFormat;

/// Where lines go: the process's non-blocking log writer.
struct Sink {
    format: LogFormat,
    writer: tracing_appender::non_blocking::NonBlocking,
}

static SINK: OnceLock<Sink> = OnceLock::new();

/// Sends access lines to `writer` in `format`. Called once, by
/// [`crate::telemetry::init`]; without it (a gateway embedded in tests)
/// access lines are not formatted at all.
pub fn install(format: LogFormat, writer: tracing_appender::non_blocking::NonBlocking) {
    let _ = SINK.set(Sink { format, writer });
}

/// Buffer size at which a batching thread sends its lines.
const BATCH_BYTES: usize = 16 * 1024;

thread_local! {
    static BUF: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
    static BATCHING: Cell<bool> = const { Cell::new(false) };
    static WRITER: RefCell<Option<tracing_appender::non_blocking::NonBlocking>> =
        const { RefCell::new(None) };
}

/// Makes this thread batch its lines; it must then call [`flush_thread`]
/// periodically and before it ends.
pub fn batch_on_this_thread() {
    BATCHING.with(|b| b.set(true));
}

/// Sends this thread's buffered lines to the writer.
pub fn flush_thread() {
    BUF.with_borrow_mut(|buf| {
        if buf.is_empty() {
            return;
        }
        if let Some(sink) = SINK.get() {
            WRITER.with_borrow_mut(|w| {
                let w = w.get_or_insert_with(|| sink.writer.clone());
                // The writer only fails once the log thread is gone.
                let _ = w.write_all(buf);
            });
        }
        buf.clear();
    });
}

/// One request, as the access log records it.
pub struct Entry<'a> {
    pub request_id: &'a str,
    pub client_ip: IpAddr,
    pub method: &'a str,
    pub path: &'a str,
    pub route: &'a str,
    pub status: u16,
    pub outcome: &'a str,
    pub tenant: &'a str,
    pub token_id: &'a str,
    pub duration_ms: f64,
    pub upstream_ms: f64,
}

/// Whether access lines are wanted (a sink is installed and the log filter
/// lets `INFO` events of target `access` through).
#[inline]
pub fn enabled() -> bool {
    SINK.get().is_some() && tracing::enabled!(target: "access", tracing::Level::INFO)
}

/// Writes one line; call only when [`enabled`].
pub fn write(e: &Entry<'_>) {
    let Some(sink) = SINK.get() else { return };
    let now = SystemTime::now();
    BUF.with_borrow_mut(|buf| {
        match sink.format {
            LogFormat::Json => json_line(buf, now, e),
            LogFormat::Text => text_line(buf, now, e),
        }
        buf.push(b'\n');
    });
    if !BATCHING.with(Cell::get) || BUF.with_borrow(|b| b.len() >= BATCH_BYTES) {
        flush_thread();
    }
}

/// `{"timestamp":…,"level":"INFO",<fields>,"target":"access"}`: the shape of
/// every other JSON log line (`tracing-subscriber`'s, flattened).
fn json_line(buf: &mut Vec<u8>, now: SystemTime, e: &Entry<'_>) {
    let mut s = Line(buf);
    let _ = write!(
        s,
        "{{\"timestamp\":\"{}\",\"level\":\"INFO\",\"ts\":\"{}\"",
        humantime::format_rfc3339_micros(now),
        humantime::format_rfc3339_millis(now)
    );
    s.json_str("request_id", e.request_id);
    let _ = write!(s, ",\"client_ip\":\"{}\"", e.client_ip);
    s.json_str("method", e.method);
    s.json_str("path", e.path);
    s.json_str("route", e.route);
    let _ = write!(s, ",\"status\":{}", e.status);
    s.json_str("outcome", e.outcome);
    s.json_str("tenant", e.tenant);
    s.json_str("token_id", e.token_id);
    let _ = write!(
        s,
        ",\"duration_ms\":{:.3},\"upstream_ms\":{:.3},\"target\":\"access\"}}",
        e.duration_ms, e.upstream_ms
    );
}

/// `<timestamp>  INFO access: key=value …`, strings quoted: the shape of
/// `tracing-subscriber`'s text lines.
fn text_line(buf: &mut Vec<u8>, now: SystemTime, e: &Entry<'_>) {
    let _ = write!(
        Line(buf),
        "{}  INFO access: ts={} request_id={:?} client_ip={} method={} path={:?} route={:?} \
         status={} outcome={:?} tenant={:?} token_id={:?} duration_ms={:.3} upstream_ms={:.3}",
        humantime::format_rfc3339_micros(now),
        humantime::format_rfc3339_millis(now),
        e.request_id,
        e.client_ip,
        e.method,
        e.path,
        e.route,
        e.status,
        e.outcome,
        e.tenant,
        e.token_id,
        e.duration_ms,
        e.upstream_ms,
    );
}

/// `fmt::Write` over the byte buffer, with JSON string escaping.
struct Line<'b>(&'b mut Vec<u8>);

impl std::fmt::Write for Line<'_> {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        self.0.extend_from_slice(s.as_bytes());
        Ok(())
    }
}

impl Line<'_> {
    /// `,"key":"value"` with the value escaped per RFC 8259.
    fn json_str(&mut self, key: &str, value: &str) {
        let b = &mut *self.0;
        b.extend_from_slice(b",\"");
        b.extend_from_slice(key.as_bytes());
        b.extend_from_slice(b"\":\"");
        for c in value.bytes() {
            match c {
                b'"' => b.extend_from_slice(b"\\\""),
                b'\\' => b.extend_from_slice(b"\\\\"),
                0x00..=0x1f | 0x7f => {
                    let _ = write!(b, "\\u{c:04x}");
                }
                _ => b.push(c),
            }
        }
        b.push(b'"');
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(path: &str) -> Entry<'_> {
        Entry {
            request_id: "01J0000000000000000000000Z",
            client_ip: "127.0.0.2".parse().unwrap(),
            method: "GET",
            path,
            route: "/crm/",
            status: 403,
            outcome: "ip_not_allowed",
            tenant: "acme",
            token_id: "tok_1",
            duration_ms: 1.25,
            upstream_ms: 0.0,
        }
    }

    #[test]
    fn json_line_parses_and_escapes_what_needs_it() {
        let mut buf = Vec::new();
        let path = "/crm/a\"b\\c\u{1}d é";
        json_line(&mut buf, SystemTime::UNIX_EPOCH, &entry(path));
        let v: serde_json::Value = serde_json::from_slice(&buf).unwrap();
        assert_eq!(v["path"], path);
        assert_eq!(v["target"], "access");
        assert_eq!(v["level"], "INFO");
        assert_eq!(v["ts"], "1970-01-01T00:00:00.000Z");
        assert_eq!(v["client_ip"], "127.0.0.2");
        assert_eq!(v["status"], 403);
        assert_eq!(v["outcome"], "ip_not_allowed");
        assert_eq!(v["tenant"], "acme");
        assert_eq!(v["token_id"], "tok_1");
        assert_eq!(v["duration_ms"], 1.25);
        assert_eq!(v["upstream_ms"], 0.0);
        assert_eq!(v["request_id"], "01J0000000000000000000000Z");
    }

    #[test]
    fn text_line_is_key_value() {
        let mut buf = Vec::new();
        text_line(&mut buf, SystemTime::UNIX_EPOCH, &entry("/crm/x"));
        let s = String::from_utf8(buf).unwrap();
        assert!(
            s.starts_with("1970-01-01T00:00:00.000000Z  INFO access: ts="),
            "{s}"
        );
        for f in [
            "client_ip=127.0.0.2",
            "method=GET",
            "path=\"/crm/x\"",
            "status=403",
            "outcome=\"ip_not_allowed\"",
            "tenant=\"acme\"",
            "duration_ms=1.250",
        ] {
            assert!(s.contains(f), "{f} missing in {s}");
        }
    }
}
