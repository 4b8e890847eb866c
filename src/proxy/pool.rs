//! Upstream connections: HTTP/1.1 over TCP or TLS, kept alive and reused,
//! one idle pool per data-plane worker thread, each connection driven by the
//! request that is using it.
//!
//! hyper-util's pooled client runs every upstream connection as a task of
//! its own and hands each request to it through a channel, behind a pool
//! with a `Mutex`. Here a connection's [`Connection`](hyper::client::conn::http1::Connection) future is polled by
//! the request's own task: while the request is sent and its response head
//! awaited ([`Upstreams::send`]), then while the response body is read
//! ([`PooledBody`]). A proxied request is therefore one task on one thread,
//! the pool is a thread-local list (no lock), and no future is moved into a
//! `Box` per request. When the body has been read to its end the connection
//! goes back to the pool; a body dropped half-read closes its connection.
//!
//! An idle connection is not polled, so a close by the upstream is noticed
//! when the connection is next taken: it is polled once then, and one that
//! has ended is dropped. A request that a connection closed before writing
//! it (hyper gives it back, see `try_send_request`) is sent on a fresh
//! connection; a request that was written is never sent twice.

use std::cell::RefCell;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Weak};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::client::conn::http1;
use hyper_rustls::{HttpsConnector, MaybeHttpsStream};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioIo;
use tower::{Service, ServiceExt};

use super::forward::UpstreamBody;
use super::route::Upstream;

type Io = MaybeHttpsStream<TokioIo<tokio::net::TcpStream>>;

/// How long an idle connection is kept (hyper-util's default, and longer
/// than most servers keep theirs: nginx 75 s).
const IDLE_FOR: Duration = Duration::from_secs(90);
/// Idle connections kept per upstream and worker.
const MAX_IDLE: usize = 256;

/// Why a request did not get a response head.
#[derive(Debug)]
pub enum SendError {
    /// No connection could be made (refused, unreachable, TLS handshake,
    /// connect timeout): the request was not sent, a retry elsewhere is safe.
    Connect(Box<dyn std::error::Error + Send + Sync>),
    /// The exchange failed after the request was (maybe partly) written.
    Request(hyper::Error),
}

impl std::fmt::Display for SendError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SendError::Connect(e) => write!(f, "connect: {e}"),
            SendError::Request(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for SendError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            SendError::Connect(e) => Some(&**e),
            SendError::Request(e) => Some(e),
        }
    }
}

/// A client for upstreams with one set of connect settings (timeout, TLS
/// roots). Cheap to clone; clones share their pools.
#[derive(Clone)]
pub struct Upstreams {
    connector: HttpsConnector<HttpConnector>,
    /// Identifies this client's idle connections in the thread-local
    /// pools; when the last clone goes (a reload changed the settings),
    /// its idle connections are dropped at the next release.
    id: Arc<()>,
}

/// One upstream connection.
pub struct Conn {
    send: http1::SendRequest<UpstreamBody>,
    io: Pin<Box<http1::Connection<Io, UpstreamBody>>>,
}

impl Conn {
    /// Polls the connection once: false when it has ended (closed by the
    /// peer, or failed), after which it must not be polled again.
    fn poll_alive(&mut self, cx: &mut Context<'_>) -> bool {
        self.io.as_mut().poll(cx).is_pending()
    }
}

/// Where an idle connection belongs: its client's settings and upstream.
struct PoolKey {
    /// The owning [`Upstreams`]' id; dead once every clone of it is gone.
    owner: Weak<()>,
    scheme: http::uri::Scheme,
    authority: http::uri::Authority,
}

impl PoolKey {
    fn is(
        &self,
        owner: *const (),
        scheme: &http::uri::Scheme,
        authority: &http::uri::Authority,
    ) -> bool {
        std::ptr::eq(self.owner.as_ptr(), owner)
            && self.authority == *authority
            && self.scheme == *scheme
    }
}

struct Idle {
    key: PoolKey,
    conns: Vec<(Conn, Instant)>,
}

thread_local! {
    /// Idle connections of this worker thread, by client and upstream.
    static IDLE: RefCell<Vec<Idle>> = const { RefCell::new(Vec::new()) };
}

impl Upstreams {
    pub fn new(connect_timeout: Duration, tls: rustls::ClientConfig) -> Upstreams {
        let mut http = HttpConnector::new();
        http.set_connect_timeout(Some(connect_timeout));
        http.set_nodelay(true);
        http.enforce_http(false);
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        Upstreams {
            connector,
            id: Arc::new(()),
        }
    }

    /// Sends `req` (origin-form URI, `Host` set) to `upstream` and returns
    /// the response head with the connection its body is read from.
    pub async fn send(
        &self,
        upstream: &Upstream,
        mut req: Request<UpstreamBody>,
    ) -> Result<(Response<Incoming>, Option<Conn>), SendError> {
        loop {
            // A request a fresh connection gave back is not tried again:
            // an upstream that closes every connection must fail it.
            let (mut conn, fresh) = match self.take_idle(upstream).await {
                Some(c) => (c, false),
                None => (self.connect(upstream).await?, true),
            };
            let sent = conn.send.try_send_request(req);
            tokio::pin!(sent);
            let mut io_done = false;
            let result = std::future::poll_fn(|cx| {
                if !io_done && !conn.poll_alive(cx) {
                    // Ended: the request future resolves with an error now.
                    io_done = true;
                }
                sent.as_mut().poll(cx)
            })
            .await;
            match result {
                Ok(resp) if !io_done => return Ok((resp, Some(conn))),
                // The connection already ended (`Connection: close`, the
                // body already in hyper's channel): still a response.
                Ok(resp) => return Ok((resp, None)),
                Err(mut e) => match e.take_message() {
                    // Never written: safe on another connection.
                    Some(back) if !fresh => req = back,
                    _ => return Err(SendError::Request(e.into_error())),
                },
            }
        }
    }

    async fn connect(&self, upstream: &Upstream) -> Result<Conn, SendError> {
        let uri = http::Uri::builder()
            .scheme(upstream.scheme.clone())
            .authority(upstream.authority.clone())
            .path_and_query("/")
            .build()
            .map_err(|e| SendError::Connect(e.into()))?;
        let mut connector = self.connector.clone();
        let io = connector
            .ready()
            .await
            .map_err(SendError::Connect)?
            .call(uri)
            .await
            .map_err(SendError::Connect)?;
        let (send, io) = http1::Builder::new()
            .handshake(io)
            .await
            .map_err(|e| SendError::Connect(e.into()))?;
        Ok(Conn {
            send,
            io: Box::pin(io),
        })
    }

    /// An idle connection to `upstream` that is still open, if any.
    async fn take_idle(&self, upstream: &Upstream) -> Option<Conn> {
        loop {
            let (mut conn, since) = IDLE.with_borrow_mut(|idle| {
                let owner = Arc::as_ptr(&self.id);
                let i = idle
                    .iter()
                    .position(|e| e.key.is(owner, &upstream.scheme, &upstream.authority))?;
                idle[i].conns.pop()
            })?;
            if since.elapsed() > IDLE_FOR {
                continue;
            }
            // One poll notices a close that has arrived meanwhile.
            let alive = std::future::poll_fn(|cx| Poll::Ready(conn.poll_alive(cx))).await;
            if alive && conn.send.is_ready() {
                return Some(conn);
            }
        }
    }
}

/// Puts a connection whose exchange is complete back in this thread's pool
/// (dropping it, and closing it, when it cannot be reused).
fn release(key: PoolKey, mut conn: Conn) {
    // Lets the connection reach its idle state (and see a close).
    if !conn.poll_alive(&mut Context::from_waker(Waker::noop())) || !conn.send.is_ready() {
        return;
    }
    IDLE.with_borrow_mut(|idle| {
        idle.retain(|e| e.key.owner.strong_count() > 0);
        let found = idle
            .iter()
            .position(|e| e.key.is(key.owner.as_ptr(), &key.scheme, &key.authority));
        let i = found.unwrap_or_else(|| {
            idle.push(Idle {
                key,
                conns: Vec::new(),
            });
            idle.len() - 1
        });
        let conns = &mut idle[i].conns;
        if conns.len() < MAX_IDLE {
            conns.push((conn, Instant::now()));
        }
    });
}

/// A response body read from an upstream connection that this body drives;
/// the connection returns to the pool once the body has been read to its end.
pub struct PooledBody {
    body: Incoming,
    /// The connection and where it goes back to; `None` once it has ended
    /// (or when it was never reusable).
    conn: Option<(Conn, PoolKey)>,
    done: bool,
}

impl PooledBody {
    pub fn new(
        body: Incoming,
        conn: Option<Conn>,
        client: &Upstreams,
        upstream: &Upstream,
    ) -> PooledBody {
        let conn = conn.map(|c| {
            let key = PoolKey {
                owner: Arc::downgrade(&client.id),
                scheme: upstream.scheme.clone(),
                authority: upstream.authority.clone(),
            };
            (c, key)
        });
        PooledBody {
            body,
            conn,
            done: false,
        }
    }
}

impl Body for PooledBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        // Drive the connection: it reads the body into `body`'s channel.
        if let Some((c, _)) = this.conn.as_mut() {
            if !c.poll_alive(cx) {
                this.conn = None;
            }
        }
        let frame = Pin::new(&mut this.body).poll_frame(cx);
        if let Poll::Ready(None) = frame {
            this.done = true;
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        self.done || self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

impl Drop for PooledBody {
    fn drop(&mut self) {
        if self.is_end_stream() {
            if let Some((conn, key)) = self.conn.take() {
                release(key, conn);
            }
        }
    }
}
