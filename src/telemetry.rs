//! Logging: tracing to stdout, JSON or text, with the level from the config
//! unless `RUST_LOG` is set. The level can be changed at reload. Writes go
//! through a non-blocking writer so a slow stdout never stalls a request.

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
        if let Ok(f) = EnvFilter::try_new(level) {
            let _ = self.handle.reload(f);
        }
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
        .and_then(|s| EnvFilter::try_new(s).ok())
        .unwrap_or_else(|| EnvFilter::try_new(level).unwrap_or_else(|_| EnvFilter::new("info")));
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
