//! The public listener: accepts connections (at most
//! `limits.max_connections` at once; further ones wait in the accept queue),
//! terminates TLS when configured, serves HTTP/1.1 and HTTP/2 on each with
//! hyper, closes connections idle for `limits.idle_timeout`, and drains
//! gracefully on shutdown.
//!
//! Each connection takes the config snapshot current when it was accepted
//! (HTTP limits, TLS certificate); each request takes the snapshot current
//! when it arrives (routes, upstreams, trusted proxies).

use std::cell::Cell;
use std::convert::Infallible;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

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

/// Number of data-plane workers: `TOKIO_WORKER_THREADS` when set to a
/// positive number, else the CPUs this process may run on (which honours
/// `taskset` and cgroup CPU limits).
pub fn workers() -> usize {
    static N: OnceLock<usize> = OnceLock::new();
    *N.get_or_init(|| {
        std::env::var("TOKIO_WORKER_THREADS")
            .ok()
            .and_then(|v| v.trim().parse().ok())
            .filter(|n| *n > 0)
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
    })
}

thread_local! {
    static WORKER: Cell<usize> = const { Cell::new(0) };
}

/// The index of the data-plane worker running this code (0 elsewhere).
#[inline]
pub fn current_worker() -> usize {
    WORKER.with(Cell::get)
}

/// Accepts and serves until `shutdown` is cancelled, then waits up to
/// `limits.shutdown_timeout` for in-flight requests to finish.
///
/// The work is spread over [`workers`] threads, each running its own
/// single-threaded tokio runtime and accepting from the same listening
/// socket (a duplicated descriptor, so no `SO_REUSEPORT` and no chance of
/// sharing the port with another process). A connection lives on the
/// worker that accepted it, and its requests use that worker's idle
/// upstream connections (see [`super::pool`]): a request is served start to
/// end by one task on one thread, without cross-thread wake-ups or
/// work-stealing queues. Measured
/// against one multi-threaded runtime on one core: 17 vs 19 µs of CPU per
/// proxied request, +12 % throughput (`benches/e2e.sh`'s workload).
pub async fn serve(listener: TcpListener, gw: Arc<Gateway>, shutdown: CancellationToken) {
    let listener = match listener.into_std() {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(error = %e, "public listener unusable");
            return;
        }
    };
    let max = gw.runtime.load().config.limits.max_connections;
    // The workers live no longer than this future: if it is dropped (its
    // runtime shut down, as at the end of a test), they stop at once.
    let abandoned = CancellationToken::new();
    let _abandon_on_drop = abandoned.clone().drop_guard();
    let shared = Shared {
        permits: Arc::new(Semaphore::new(max)),
        conns: TaskTracker::new(),
        abandoned,
    };
    let mut done = Vec::new();
    for index in 0..workers() {
        let listener = match listener.try_clone() {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(error = %e, "cannot share the public listener with a worker");
                break;
            }
        };
        let (tx, rx) = tokio::sync::oneshot::channel::<bool>();
        let (gw, shutdown, shared) = (Arc::clone(&gw), shutdown.clone(), shared.clone());
        let spawned = std::thread::Builder::new()
            .name(format!("tollgate-worker-{index}"))
            .spawn(move || {
                WORKER.with(|w| w.set(index));
                let drained = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt.block_on(worker(listener, gw, shutdown, shared)),
                    Err(e) => {
                        tracing::error!(error = %e, "cannot start a worker runtime");
                        true
                    }
                };
                let _ = tx.send(drained);
            });
        match spawned {
            Ok(_) => done.push(rx),
            Err(e) => tracing::error!(error = %e, "cannot start a worker thread"),
        }
    }
    drop(listener);
    let mut drained = true;
    for rx in done {
        drained &= rx.await.unwrap_or(false);
    }
    if drained {
        tracing::info!("public listener drained");
    }
}

/// What the workers share: the `max_connections` permits, the set of
/// open connections (to wait for them at shutdown), and the signal that
/// [`serve`] is gone.
#[derive(Clone)]
struct Shared {
    permits: Arc<Semaphore>,
    conns: TaskTracker,
    abandoned: CancellationToken,
}

/// One worker: accepts until shutdown, then waits (bounded by
/// `shutdown_timeout`) for every connection to finish; its runtime, and
/// any connection still on it, ends when this returns. Returns whether
/// every connection finished in time.
async fn worker(
    listener: std::net::TcpListener,
    gw: Arc<Gateway>,
    shutdown: CancellationToken,
    shared: Shared,
) -> bool {
    let listener = match TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(error = %e, "worker cannot use the public listener");
            return true;
        }
    };
    // Access lines are sent in batches: at 16 KiB, on this tick, and at
    // the end (see `access_log`).
    crate::access_log::batch_on_this_thread();
    tokio::spawn(async {
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            crate::access_log::flush_thread();
        }
    });
    let drained = accept_and_drain(listener, gw, shutdown, shared).await;
    crate::access_log::flush_thread();
    drained
}

/// [`worker`]'s accept loop and drain.
async fn accept_and_drain(
    listener: TcpListener,
    gw: Arc<Gateway>,
    shutdown: CancellationToken,
    shared: Shared,
) -> bool {
    loop {
        let permit = tokio::select! {
            _ = shared.abandoned.cancelled() => return false,
            _ = shutdown.cancelled() => break,
            p = Arc::clone(&shared.permits).acquire_owned() => p.expect("semaphore never closed"),
        };
        let (stream, peer) = tokio::select! {
            _ = shared.abandoned.cancelled() => return false,
            _ = shutdown.cancelled() => break,
            r = listener.accept() => match r {
                Ok(c) => c,
                // Another worker took it first.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
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
        shared.conns.spawn(async move {
            serve_connection(stream, peer, gw, shutdown).await;
            drop(permit);
        });
    }
    drop(listener);
    shared.conns.close();
    let timeout = gw.runtime.load().config.limits.shutdown_timeout;
    if tokio::time::timeout(timeout, shared.conns.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            open = shared.conns.len(),
            "shutdown_timeout reached; closing the remaining connections"
        );
        return false;
    }
    true
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
            let resp = service::handle(gw, req, info).await;
            drop(busy);
            Ok::<_, Infallible>(resp)
        }
    });
    let conn = rt.http.serve_connection(TokioIo::new(io), svc);
    tokio::pin!(conn);
    let tick = (idle_timeout / 4).clamp(Duration::from_millis(10), Duration::from_secs(5));
    let mut closing = false;
    let mut clock = IdleClock {
        seen_ops: activity.ops.load(Ordering::Relaxed),
        idle: Duration::ZERO,
    };
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
                if clock.tick(&activity, tick) >= idle_timeout {
                    tracing::debug!(peer = %info.peer, "closing idle connection");
                    conn.as_mut().graceful_shutdown();
                    closing = true;
                }
            }
        }
    }
}

/// Whether a connection is moving bytes or serving a request. Counts I/O
/// completions rather than reading the clock on each: the idle check in
/// [`drive`] compares the count between its ticks.
#[derive(Default)]
struct Activity {
    ops: AtomicU64,
    busy: AtomicUsize,
}

impl Activity {
    #[inline]
    fn touch(&self) {
        self.ops.fetch_add(1, Ordering::Relaxed);
    }
}

/// Idle time of one connection, advanced by [`drive`]'s periodic tick: a
/// tick with no I/O and no request in progress (a slow upstream is not
/// idleness) adds its length; anything else resets it. A connection is
/// closed between `idle_timeout` and `idle_timeout` + one tick after its
/// last activity.
struct IdleClock {
    seen_ops: u64,
    idle: Duration,
}

impl IdleClock {
    fn tick(&mut self, activity: &Activity, tick: Duration) -> Duration {
        let ops = activity.ops.load(Ordering::Relaxed);
        if ops != self.seen_ops || activity.busy.load(Ordering::Relaxed) > 0 {
            self.seen_ops = ops;
            self.idle = Duration::ZERO;
        } else {
            self.idle += tick;
        }
        self.idle
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
