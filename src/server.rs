//! Wiring for `tollgate run`: open the store, load the table, bind both
//! listeners, follow store changes, reload on request, drain on shutdown.
//!
//! [`Gateway`] is the shared state every task holds (an `Arc`): the config
//! snapshot (`ArcSwap<Runtime>`, swapped whole on reload), the token table,
//! metrics and the store.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::Context;
use arc_swap::ArcSwap;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, ConfigError, StoreConfig};
use crate::metrics::{Metrics, ResultLabels};
use crate::proxy::pool::Upstreams;
use crate::store::{embedded::EmbeddedStore, redis::RedisStore, Store, SyncStatus};
use crate::table::TokenTable;
use crate::telemetry::LogHandle;

/// What a config snapshot brings with it: the config and the pieces built
/// from it (upstream clients, TLS acceptor, HTTP settings). Built whole at
/// start and at each reload; a reload that cannot build it changes nothing.
pub struct Runtime {
    pub config: Config,
    /// One client per route, indexed by `Route::index`; routes without a
    /// `ca_file` share the default client and its connection pool.
    clients: Vec<Upstreams>,
    default_client: Upstreams,
    pub tls: Option<tokio_rustls::TlsAcceptor>,
    pub http: hyper_util::server::conn::auto::Builder<hyper_util::rt::TokioExecutor>,
}

impl Runtime {
    /// Builds the runtime pieces; reads TLS and CA files, so errors name
    /// the key that points at the bad file.
    pub fn build(config: Config, previous: Option<&Runtime>) -> Result<Runtime, ConfigError> {
        let problem = |key: String, message: String| ConfigError {
            problems: vec![crate::config::ConfigProblem {
                key,
                line: None,
                message,
            }],
        };
        let timeout = config.limits.upstream_connect_timeout;
        // Keep the pool (and its warm connections) unless its settings changed.
        let default_client = match previous {
            Some(p) if p.config.limits.upstream_connect_timeout == timeout => {
                p.default_client.clone()
            }
            _ => Upstreams::new(
                timeout,
                crate::tls::client_config(None).map_err(|e| problem("route".into(), e))?,
            ),
        };
        let mut by_index: Vec<(usize, Upstreams)> = Vec::new();
        for r in config.routes.iter() {
            let client = match &r.ca_file {
                None => default_client.clone(),
                Some(ca) => Upstreams::new(
                    timeout,
                    crate::tls::client_config(Some(ca))
                        .map_err(|e| problem(format!("route[{}].ca_file", r.index), e))?,
                ),
            };
            by_index.push((r.index, client));
        }
        by_index.sort_by_key(|(i, _)| *i);
        let clients = by_index.into_iter().map(|(_, c)| c).collect();
        let tls = match &config.tls {
            None => None,
            Some(files) => {
                let cfg = crate::tls::server_config(&files.cert, &files.key)
                    .map_err(|e| problem("listen.tls".into(), e))?;
                Some(tokio_rustls::TlsAcceptor::from(cfg))
            }
        };
        let http = crate::proxy::listener::http_builder(&config.limits);
        Ok(Runtime {
            config,
            clients,
            default_client,
            tls,
            http,
        })
    }

    /// The client for a route's upstreams.
    pub fn client_for(&self, route: &crate::proxy::route::Route) -> &Upstreams {
        &self.clients[route.index]
    }
}

/// Shared state of a running gateway.
pub struct Gateway {
    pub runtime: ArcSwap<Runtime>,
    pub table: TokenTable,
    pub metrics: Metrics,
    pub store: Arc<dyn Store>,
    pub sync: Arc<SyncStatus>,
    /// Released once the table is loaded and both listeners accept.
    ready: AtomicBool,
    config_path: Option<PathBuf>,
    log: Option<LogHandle>,
    /// blake3 of `TOLLGATE_ADMIN_KEY`, read once at start.
    env_admin_key: Option<blake3::Hash>,
}

impl Gateway {
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    /// Hashes of every accepted operator key.
    pub fn admin_key_hashes(&self) -> Vec<blake3::Hash> {
        let rt = self.runtime.load();
        let mut v = rt.config.admin_key_hashes.clone();
        v.extend(self.env_admin_key);
        v
    }

    /// Re-reads the config file, validates it and swaps it in. Returns the
    /// changed keys that only take effect after a restart. On any error the
    /// running config stays; the error is logged and counted here.
    pub fn reload(&self) -> Result<Vec<&'static str>, ConfigError> {
        let result = self.try_reload();
        let label = ResultLabels {
            result: if result.is_ok() { "ok" } else { "error" },
        };
        self.metrics.reloads.get_or_create(&label).inc();
        match &result {
            Ok(_) => tracing::info!("config reloaded"),
            Err(e) => {
                for p in &e.problems {
                    tracing::error!(key = %p.key, line = p.line, problem = %p.message, "config reload refused; the running config stays");
                }
            }
        }
        result
    }

    fn try_reload(&self) -> Result<Vec<&'static str>, ConfigError> {
        let Some(path) = &self.config_path else {
            return Err(ConfigError {
                problems: vec![crate::config::ConfigProblem {
                    key: String::new(),
                    line: None,
                    message: "this gateway was not started from a config file".into(),
                }],
            });
        };
        let next = Config::load(path)?;
        let current = self.runtime.load_full();
        let restart = current.config.restart_needed(&next);
        if !restart.is_empty() {
            tracing::warn!(keys = ?restart, "config reloaded; these keys keep their old value until a restart");
        }
        // Keys that need a restart keep their running value, so the
        // snapshot never describes listeners that do not exist.
        let mut next = next;
        next.public_addr = current.config.public_addr;
        next.admin_addr = current.config.admin_addr;
        next.store = current.config.store.clone();
        if next.tls.is_some() != current.config.tls.is_some() {
            next.tls = current.config.tls.clone();
        }
        next.limits.max_connections = current.config.limits.max_connections;
        next.log_format = current.config.log_format;
        let level = next.log_level.clone();
        let runtime = Runtime::build(next, Some(&current))?;
        if let Some(log) = &self.log {
            log.set_level(&level);
        }
        self.runtime.store(Arc::new(runtime));
        Ok(restart)
    }
}

/// How to start: where the config came from (for reload) and the log handle.
#[derive(Default)]
pub struct StartOptions {
    pub config_path: Option<PathBuf>,
    pub log: Option<LogHandle>,
}

/// A running gateway.
pub struct Handle {
    pub public_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub gateway: Arc<Gateway>,
    shutdown: CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Handle {
    /// Starts draining (as SIGTERM does).
    pub fn shutdown(&self) {
        self.shutdown.cancel();
    }

    /// The token that stops this gateway when cancelled.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Waits until both listeners have stopped and drained.
    pub async fn wait(self) {
        for t in self.tasks {
            let _ = t.await;
        }
    }
}

/// Opens the store the config names.
pub async fn open_store(config: &Config) -> anyhow::Result<Arc<dyn Store>> {
    Ok(match &config.store {
        StoreConfig::Embedded { path } => Arc::new(
            EmbeddedStore::open(path)
                .with_context(|| format!("embedded store at {}", path.display()))?,
        ),
        // Does not connect: an instance may start while Redis is down.
        StoreConfig::Redis { url, key_prefix } => {
            Arc::new(RedisStore::open(url, key_prefix).context("redis store (store.url)")?)
        }
    })
}

/// Opens the store, loads the table, binds both listeners and serves until
/// the returned handle is shut down.
pub async fn start(config: Config, opts: StartOptions) -> anyhow::Result<Handle> {
    let runtime = Runtime::build(config.clone(), None).map_err(|e| anyhow::anyhow!("{e}"))?;
    let store = open_store(&config).await?;
    let public = TcpListener::bind(config.public_addr)
        .await
        .with_context(|| format!("cannot listen on {} (listen.public)", config.public_addr))?;
    let admin = TcpListener::bind(config.admin_addr)
        .await
        .with_context(|| format!("cannot listen on {} (listen.admin)", config.admin_addr))?;
    let public_addr = public.local_addr()?;
    let admin_addr = admin.local_addr()?;

    let env_admin_key = std::env::var("TOLLGATE_ADMIN_KEY")
        .ok()
        .filter(|k| !k.is_empty())
        .map(|k| blake3::hash(k.as_bytes()));
    if config.admin_key_hashes.is_empty() && env_admin_key.is_none() {
        tracing::warn!("no admin key configured (admin.key_hashes, TOLLGATE_ADMIN_KEY): the admin API refuses every /v1 call");
    }
    let gw = Arc::new(Gateway {
        runtime: ArcSwap::from_pointee(runtime),
        table: TokenTable::new(),
        metrics: Metrics::new(),
        store,
        sync: Arc::new(SyncStatus::default()),
        ready: AtomicBool::new(false),
        config_path: opts.config_path,
        log: opts.log,
        env_admin_key,
    });

    let shutdown = CancellationToken::new();
    // The admin listener outlives the public one's drain, so probes and
    // metrics stay reachable while in-flight requests finish.
    let admin_stop = CancellationToken::new();
    let mut tasks = Vec::new();
    tasks.push(tokio::spawn(crate::admin::serve(
        admin,
        Arc::clone(&gw),
        admin_stop.clone(),
    )));
    // Draining: `/readyz` turns 503 so load balancers stop sending traffic.
    let (gw2, stop) = (Arc::clone(&gw), shutdown.clone());
    tasks.push(tokio::spawn(async move {
        stop.cancelled().await;
        gw2.ready.store(false, Ordering::Release);
    }));

    // Load everything before taking traffic. A store that follows changes
    // (Redis) loads in its sync task and retries until it can: the
    // listeners are bound, `/readyz` answers 503, and the data plane starts
    // serving once the first load is in. The embedded store fails fast.
    let follower = Arc::clone(&gw.store).spawn_sync(gw.table.clone(), Arc::clone(&gw.sync));
    match follower {
        Some(t) => {
            let stop = shutdown.clone();
            tasks.push(tokio::spawn(async move {
                stop.cancelled().await;
                t.abort();
            }));
        }
        None => {
            let snapshot = gw
                .store
                .load_all()
                .await
                .context("loading tenants and tokens")?;
            gw.table.replace_all(snapshot.tenants, snapshot.tokens);
            gw.sync.set_connected(true);
            gw.sync.synced_now();
            gw.ready.store(true, Ordering::Release);
        }
    }
    let (gw2, stop) = (Arc::clone(&gw), shutdown.clone());
    tasks.push(tokio::spawn(async move {
        tokio::select! {
            _ = gw2.sync.wait_first_sync() => {}
            _ = stop.cancelled() => {
                admin_stop.cancel();
                return;
            }
        }
        if !gw2.ready.swap(true, Ordering::AcqRel) {
            tracing::info!("store loaded; ready");
        }
        crate::proxy::listener::serve(public, gw2, stop).await;
        admin_stop.cancel();
    }));
    tasks.push(tokio::spawn(crate::shutdown::on_hangup(
        Arc::clone(&gw),
        shutdown.clone(),
    )));
    tracing::info!(target: crate::telemetry::LISTENING, public = %public_addr, admin = %admin_addr, workers = crate::proxy::listener::workers(), "listening");
    Ok(Handle {
        public_addr,
        admin_addr,
        gateway: gw,
        shutdown,
        tasks,
    })
}
