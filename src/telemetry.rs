//! Logging: tracing to stdout, JSON or text, with the level from the config
//! unless `RUST_LOG` is set. The level can be changed at reload. Writes go
//! through a non-blocking writer so a slow stdout never stalls a request.
//!
//! The start-up line `listening public=… admin=…` is promised by the
//! command-line contract and scripts wait for it, so it is logged under its
//! own target, [`LISTENING`], which every filter lets through at `info`
//! unless the filter names that target itself.

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{reload, EnvFilter, Registry};

use crate::config::LogFormat;

/// Lets a config reload change the log filter.
#[derive(Clone)]
pub struct LogHandle {
    handle: reload::Handle<EnvFilter, Registry>,
    /// `RUST_LOG` wins over the config and is never replaced.
    from_env: bool,
}

impl LogHandle {
    pub fn set_level(&self, level: &str) {
        if self.from_env {
            return;
        }
        if let Some(f) = filter(level) {
            let _ = self.handle.reload(f);
        }
    }
}

/// The target of the start-up `listening` line.
pub const LISTENING: &str = "tollgate::listening";

/// A filter from a `RUST_LOG`-style spec that also admits the
/// [`LISTENING`] line, unless the spec says what to do with it.
fn filter(spec: &str) -> Option<EnvFilter> {
    if spec.contains(LISTENING) {
        EnvFilter::try_new(spec).ok()
    } else {
        EnvFilter::try_new(spec).ok()?;
        EnvFilter::try_new(format!("{spec},{LISTENING}=info")).ok()
    }
}

/// Installs the global subscriber. Returns the reload handle and the guard
/// that flushes the writer when dropped (keep it alive in `main`).
pub fn init(
    format: LogFormat,
    level: &str,
) -> (LogHandle, tracing_appender::non_blocking::WorkerGuard) {
    let env = std::env::var("RUST_LOG").ok().filter(|s| !s.is_empty());
    let filter = env
        .as_deref()
        .and_then(filter)
        .or_else(|| filter(level))
        .unwrap_or_else(|| EnvFilter::new("info"));
    let (filter, handle) = reload::Layer::new(filter);
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .lossy(false)
        .finish(std::io::stdout());
    crate::access_log::install(format, writer.clone());
    let registry = tracing_subscriber::registry().with(filter);
    let result = match format {
        LogFormat::Json => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .flatten_event(true)
                    .with_current_span(false)
                    .with_span_list(false)
                    .with_writer(writer),
            )
            .try_init(),
        LogFormat::Text => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .with_writer(writer)
                    .with_ansi(false),
            )
            .try_init(),
    };
    if result.is_err() {
        eprintln!("tollgate: a log subscriber was already installed");
    }
    (
        LogHandle {
            handle,
            from_env: env.is_some(),
        },
        guard,
    )
}
