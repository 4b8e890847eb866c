//! Test support for the Redis store: real `redis-server` processes on free
//! loopback ports (killed on drop), a TCP relay that can be cut to isolate
//! one gateway from Redis, and the gateway config that points at Redis.

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::net::{TcpListener, TcpStream};

use super::{Backends, ADMIN_KEY};

/// A `redis-server` child process on `127.0.0.1:port`.
pub struct RedisServer {
    pub port: u16,
    child: Option<Child>,
    dir: tempfile::TempDir,
    /// Append-only file with fsync on every write, so a `kill -9` and
    /// restart keeps the data (as a production Redis for tollgate should).
    persistent: bool,
}

impl RedisServer {
    /// A throwaway Redis (no persistence).
    pub fn start() -> RedisServer {
        Self::launch_anywhere(false)
    }

    /// A Redis that survives `kill -9` + [`RedisServer::restart`].
    pub fn start_persistent() -> RedisServer {
        Self::launch_anywhere(true)
    }

    /// A Redis on a chosen port (e.g. one a gateway is already retrying).
    pub fn start_on(port: u16) -> RedisServer {
        Self::launch(port, false)
    }

    fn launch(port: u16, persistent: bool) -> RedisServer {
        let mut r = RedisServer {
            port,
            child: None,
            dir: tempfile::tempdir().unwrap(),
            persistent,
        };
        r.spawn();
        r
    }

    /// A throwaway or persistent Redis on a port of its own choosing: if
    /// the port was taken between choosing and binding (redis-server then
    /// exits at once), another port is tried.
    fn launch_anywhere(persistent: bool) -> RedisServer {
        for _ in 0..5 {
            let mut r = RedisServer {
                port: super::free_port(),
                child: None,
                dir: tempfile::tempdir().unwrap(),
                persistent,
            };
            if r.try_spawn() {
                return r;
            }
        }
        panic!("redis-server could not bind any of 5 free ports");
    }

    /// Starts redis-server on `self.port` and waits for its PING; panics if
    /// it cannot.
    fn spawn(&mut self) {
        assert!(
            self.try_spawn(),
            "redis-server could not listen on port {}",
            self.port
        );
    }

    /// As [`RedisServer::spawn`], but false when redis-server exited at
    /// once (its port is taken).
    fn try_spawn(&mut self) -> bool {
        let mut cmd = Command::new(redis_server_path());
        cmd.arg("--port")
            .arg(self.port.to_string())
            .arg("--bind")
            .arg("127.0.0.1")
            .arg("--save")
            .arg("")
            .arg("--dir")
            .arg(self.dir.path());
        if self.persistent {
            cmd.args(["--appendonly", "yes", "--appendfsync", "always"]);
        } else {
            cmd.args(["--appendonly", "no"]);
        }
        let child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot start redis-server (install it: apt-get install redis-server): {e}")
            });
        self.child = Some(child);
        self.wait_ready()
    }

    /// True once our redis-server answers; false if it exited first.
    fn wait_ready(&mut self) -> bool {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(c) = self.child.as_mut() {
                if matches!(c.try_wait(), Ok(Some(_))) {
                    self.child = None;
                    return false;
                }
            }
            if let Ok(mut c) = ::redis::Client::open(self.url())
                .and_then(|c| c.get_connection_with_timeout(Duration::from_millis(200)))
            {
                // Ours, not another test's Redis that holds the port.
                let pid = self.child.as_ref().map(|c| c.id());
                if let Ok(info) = ::redis::cmd("INFO").arg("server").query::<String>(&mut c) {
                    let theirs = info
                        .lines()
                        .find_map(|l| l.strip_prefix("process_id:"))
                        .and_then(|p| p.trim().parse::<u32>().ok());
                    if theirs.is_some() && theirs == pid {
                        return true;
                    }
                }
            }
            assert!(
                Instant::now() < deadline,
                "redis-server on {} never answered PING",
                self.port
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    fn signal(&self, sig: &str) {
        let pid = self.child.as_ref().expect("redis running").id();
        let ok = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(pid.to_string())
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -{sig} {pid}");
    }

    /// SIGSTOP: Redis keeps its sockets but answers nothing.
    pub fn pause(&self) {
        self.signal("STOP");
    }

    /// SIGCONT.
    pub fn resume(&self) {
        self.signal("CONT");
    }

    /// `kill -9`.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts again on the same port and data directory.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    /// A plain (blocking) connection for inspecting what Redis holds.
    pub fn connection(&self) -> ::redis::Connection {
        ::redis::Client::open(self.url())
            .unwrap()
            .get_connection_with_timeout(Duration::from_secs(2))
            .unwrap()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        if let Some(c) = &self.child {
            // A paused process still dies of SIGKILL.
            let _ = Command::new("kill")
                .arg("-9")
                .arg(c.id().to_string())
                .status();
        }
        self.kill();
    }
}

/// `redis-server` from PATH, or the Debian location.
pub fn redis_server_path() -> String {
    for p in ["/usr/bin/redis-server", "/usr/local/bin/redis-server"] {
        if std::path::Path::new(p).exists() {
            return p.into();
        }
    }
    "redis-server".into()
}

/// A TCP relay in front of Redis. [`Relay::cut`] drops every relayed
/// connection and refuses new ones (as a network partition would);
/// [`Relay::restore`] lets connections through again.
pub struct Relay {
    pub addr: SocketAddr,
    open: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<tokio::task::AbortHandle>>>,
    accept: tokio::task::JoinHandle<()>,
}

impl Relay {
    pub async fn start(target: SocketAddr) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let open = Arc::new(AtomicBool::new(true));
        let conns: Arc<Mutex<Vec<tokio::task::AbortHandle>>> = Arc::default();
        let (open2, conns2) = (Arc::clone(&open), Arc::clone(&conns));
        let accept = tokio::spawn(async move {
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    continue;
                };
                if !open2.load(Ordering::SeqCst) {
                    drop(inbound);
                    continue;
                }
                let task = tokio::spawn(async move {
                    if let Ok(mut outbound) = TcpStream::connect(target).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
                conns2.lock().unwrap().push(task.abort_handle());
            }
        });
        Relay {
            addr,
            open,
            conns,
            accept,
        }
    }

    pub fn url(&self) -> String {
        format!("redis://{}/0", self.addr)
    }

    pub fn cut(&self) {
        self.open.store(false, Ordering::SeqCst);
        for c in self.conns.lock().unwrap().drain(..) {
            c.abort();
        }
    }

    pub fn restore(&self) {
        self.open.store(true, Ordering::SeqCst);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.cut();
        self.accept.abort();
    }
}

/// The standard three-route config with `[store] kind = "redis"`.
pub fn redis_config_text(b: &Backends, url: &str, prefix: &str) -> String {
    format!(
        r#"
[listen]
public = "127.0.0.1:0"
admin = "127.0.0.1:0"
[store]
kind = "redis"
url = "{url}"
key_prefix = "{prefix}"
[admin]
key_hashes = ["blake3:{hash}"]
[log]
level = "warn"
[[route]]
prefix = "/crm/"
product = "crm"
upstream = "{crm}"
[[route]]
prefix = "/messaging/"
product = "messaging"
upstream = "{messaging}"
strip_prefix = true
[[route]]
prefix = "/marketing/"
product = "marketing"
upstream = "{marketing}"
"#,
        hash = blake3::hash(ADMIN_KEY.as_bytes()).to_hex(),
        crm = b.crm.url(),
        messaging = b.messaging.url(),
        marketing = b.marketing.url(),
    )
}

/// Polls `check` every 20 ms until it is true or `within` passes; panics
/// with `what` on timeout. Tests assert outcomes, not durations: the limit
/// is generous and only stops a broken build from hanging.
pub async fn eventually<F, Fut>(within: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    loop {
        if check().await {
            return;
        }
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
