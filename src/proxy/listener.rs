//! The public listener: accepts connections (at most
//! `limits.max_connections` at once; further ones wait in the accept queue),
//! terminates TLS when configured, serves HTTP/1.1 and HTTP/2 on each with
//! hyper, closes connections idle for `limits.idle_timeout`, and drains
//! gracefully on shutdown.
//!
//! Each connection takes the config snapshot current when it was accepted
//! (HTTP limits, TLS certificate); each request takes the snapshot current
//! when it arrives (routes, upstreams, trusted proxies).

use std::convert::Infallible;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use hyper::body::Incoming;
use hyper::Request;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::service::{self, ConnInfo};
use crate::config::Limits;
use crate::server::{Gateway, Runtime};

/// The hyper connection settings for the given limits.
pub fn http_builder(limits: &Limits) -> auto::Builder<TokioExecutor> {
    let mut b = auto::Builder::new(TokioExecutor::new());
    b.http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(limits.max_header_bytes)
        .keep_alive(true);
    b.http2()
        .timer(TokioTimer::new())
        .max_header_list_size(limits.max_header_bytes.min(u32::MAX as usize) as u32)
        .keep_alive_interval(Some(limits.idle_timeout.min(Duration::from_secs(30))))
        .keep_alive_timeout(Duration::from_secs(20));
    b
}

/// Accepts and serves until `shutdown` is cancelled, then waits up to
/// `limits.shutdown_timeout` for in-flight requests to finish.
pub async fn serve(listener: TcpListener, gw: Arc<Gateway>, shutdown: CancellationToken) {
    let max = gw.runtime.load().config.limits.max_connections;
    let permits = Arc::new(Semaphore::new(max));
    let conns = TaskTracker::new();
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
        let gw = Arc::clone(&gw);
        let shutdown = shutdown.clone();
        conns.spawn(async move {
            serve_connection(stream, peer, gw, shutdown).await;
            drop(permit);
        });
    }
    drop(listener);
    conns.close();
    let timeout = gw.runtime.load().config.limits.shutdown_timeout;
    if tokio::time::timeout(timeout, conns.wait()).await.is_err() {
        tracing::warn!(
            open = conns.len(),
            "shutdown_timeout reached; closing the remaining connections"
        );
    } else {
        tracing::info!("public listener drained");
    }
}

async fn serve_connection(
    stream: TcpStream,
    peer: std::net::SocketAddr,
    gw: Arc<Gateway>,
    shutdown: CancellationToken,
) {
    let rt = gw.runtime.load_full();
    let activity = Arc::new(Activity::default());
    match &rt.tls {
        None => {
            let io = Tracked::new(stream, Arc::clone(&activity));
            drive(
                io,
                ConnInfo { peer, tls: false },
                &rt,
                gw,
                activity,
                shutdown,
            )
            .await
        }
        Some(acceptor) => {
            let handshake = acceptor.accept(stream);
            let stream =
                match tokio::time::timeout(rt.config.limits.header_read_timeout, handshake).await {
                    Ok(Ok(s)) => s,
                    Ok(Err(e)) => {
                        tracing::debug!(peer = %peer, error = %e, "TLS handshake failed");
                        return;
                    }
                    Err(_) => {
                        tracing::debug!(peer = %peer, "TLS handshake timed out");
                        return;
                    }
                };
            let io = Tracked::new(stream, Arc::clone(&activity));
            drive(
                io,
                ConnInfo { peer, tls: true },
                &rt,
                gw,
                activity,
                shutdown,
            )
            .await
        }
    }
}

/// Serves one connection to its end; closes it when idle too long or when
/// the listener shuts down (after the request in flight, if any).
async fn drive<IO>(
    io: IO,
    info: ConnInfo,
    rt: &Runtime,
    gw: Arc<Gateway>,
    activity: Arc<Activity>,
    shutdown: CancellationToken,
) where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let idle_timeout = rt.config.limits.idle_timeout;
    let act = Arc::clone(&activity);
    let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
        let gw = Arc::clone(&gw);
        let busy = BusyGuard::new(Arc::clone(&act));
        async move {
            let resp = service::handle(&gw, req, info).await;
            drop(busy);
            Ok::<_, Infallible>(resp)
        }
    });
    let conn = rt.http.serve_connection(TokioIo::new(io), svc);
    tokio::pin!(conn);
    let tick = (idle_timeout / 4).clamp(Duration::from_millis(10), Duration::from_secs(5));
    let mut closing = false;
    loop {
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r {
                    tracing::debug!(peer = %info.peer, error = %e, "connection ended with an error");
                }
                return;
            }
            _ = shutdown.cancelled(), if !closing => {
                conn.as_mut().graceful_shutdown();
                closing = true;
            }
            _ = tokio::time::sleep(tick), if !closing => {
                if activity.idle_for() >= idle_timeout {
                    tracing::debug!(peer = %info.peer, "closing idle connection");
                    conn.as_mut().graceful_shutdown();
                    closing = true;
                }
            }
        }
    }
}

/// When a connection last moved bytes, and how many requests it is serving.
#[derive(Default)]
struct Activity {
    /// Milliseconds since `EPOCH` of the last read or write.
    last_ms: AtomicU64,
    busy: AtomicUsize,
}

fn now_ms() -> u64 {
    static EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    EPOCH.get_or_init(Instant::now).elapsed().as_millis() as u64
}

impl Activity {
    fn touch(&self) {
        let now = now_ms();
        if self.last_ms.load(Ordering::Relaxed) != now {
            self.last_ms.store(now, Ordering::Relaxed);
        }
    }

    /// How long the connection has been idle: no bytes and no request in
    /// progress (a slow upstream is not idleness).
    fn idle_for(&self) -> Duration {
        if self.busy.load(Ordering::Relaxed) > 0 {
            return Duration::ZERO;
        }
        Duration::from_millis(now_ms().saturating_sub(self.last_ms.load(Ordering::Relaxed)))
    }
}

/// Marks a request in progress for its lifetime.
struct BusyGuard(Arc<Activity>);

impl BusyGuard {
    fn new(a: Arc<Activity>) -> Self {
        a.busy.fetch_add(1, Ordering::Relaxed);
        BusyGuard(a)
    }
}

impl Drop for BusyGuard {
    fn drop(&mut self) {
        self.0.busy.fetch_sub(1, Ordering::Relaxed);
        self.0.touch();
    }
}

/// An IO stream that records activity on every read and write.
struct Tracked<S> {
    inner: S,
    activity: Arc<Activity>,
}

impl<S> Tracked<S> {
    fn new(inner: S, activity: Arc<Activity>) -> Self {
        activity.touch();
        Tracked { inner, activity }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Tracked<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_read(cx, buf);
        if r.is_ready() {
            this.activity.touch();
        }
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Tracked<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_write(cx, buf);
        if r.is_ready() {
            this.activity.touch();
        }
        r
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        if r.is_ready() {
            this.activity.touch();
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}
