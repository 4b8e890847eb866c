//! Process signals: SIGTERM/SIGINT cancel the shutdown token; SIGHUP asks
//! for a config reload.

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::server::Gateway;

/// Waits for SIGTERM or SIGINT, then cancels `token`.
pub async fn on_terminate(token: CancellationToken) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let (Ok(mut term), Ok(mut int)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) else {
            tracing::error!("cannot install signal handlers");
            return;
        };
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: draining"),
            _ = int.recv() => tracing::info!("SIGINT: draining"),
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
    token.cancel();
}

/// Reloads the config on every SIGHUP until `token` is cancelled.
pub async fn on_hangup(gw: Arc<Gateway>, token: CancellationToken) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let Ok(mut hup) = signal(SignalKind::hangup()) else {
            tracing::error!("cannot install SIGHUP handler");
            return;
        };
        loop {
            tokio::select! {
                _ = token.cancelled() => return,
                _ = hup.recv() => {
                    tracing::info!("SIGHUP: reloading config");
                    let _ = gw.reload();
                }
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = (gw, token);
    }
}
