//! The public listener: accepts connections (at most
//! `limits.max_connections` at once; further ones wait in the accept queue),
//! serves HTTP/1.1 and HTTP/2 (prior knowledge) on each with hyper, and
//! drains gracefully on shutdown.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use hyper::body::Incoming;
use hyper::Request;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use super::service::{self, ConnInfo};
use crate::server::Gateway;

/// The hyper connection settings from the config.
pub fn http_builder(gw: &Gateway) -> auto::Builder<TokioExecutor> {
    let rt = gw.runtime.load();
    let limits = &rt.config.limits;
    let mut b = auto::Builder::new(TokioExecutor::new());
    b.http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(limits.max_header_bytes)
        .keep_alive(true);
    b.http2()
        .timer(TokioTimer::new())
        .max_header_list_size(limits.max_header_bytes as u32)
        .keep_alive_interval(Some(limits.idle_timeout / 2))
        .keep_alive_timeout(Duration::from_secs(20));
    b
}

/// Accepts and serves until `shutdown` is cancelled, then waits up to
/// `limits.shutdown_timeout` for in-flight requests.
pub async fn serve(listener: TcpListener, gw: Arc<Gateway>, shutdown: CancellationToken) {
    let builder = Arc::new(http_builder(&gw));
    let max = gw.runtime.load().config.limits.max_connections;
    let permits = Arc::new(Semaphore::new(max));
    let graceful = GracefulShutdown::new();
    loop {
        let permit = tokio::select! {
            _ = shutdown.cancelled() => break,
            p = Arc::clone(&permits).acquire_owned() => p.expect("semaphore never closed"),
        };
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let info = ConnInfo { peer, tls: false };
        let gw2 = Arc::clone(&gw);
        let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
            let gw = Arc::clone(&gw2);
            async move { Ok::<_, Infallible>(service::handle(&gw, req, info).await) }
        });
        let conn = builder
            .serve_connection(TokioIo::new(stream), svc)
            .into_owned();
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, peer = %peer, "connection ended with an error");
            }
            drop(permit);
        });
    }
    drop(listener);
    let timeout = gw.runtime.load().config.limits.shutdown_timeout;
    tokio::select! {
        _ = graceful.shutdown() => tracing::info!("public listener drained"),
        _ = tokio::time::sleep(timeout) => tracing::warn!("shutdown_timeout reached; closing remaining connections"),
    }
}
