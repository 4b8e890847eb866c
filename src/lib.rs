//! tollgate: an API gateway that lets a request through only when its bearer
//! token is known, the caller's IP is on that token's allowlist and the
//! token's tenant has bought the product the route belongs to.
//!
//! # Layout
//!
//! - [`config`]: the raw `gateway.toml` (serde) and the validated runtime
//!   config it becomes (parsed addresses, networks, durations, route table).
//! - [`auth`]: the token format (prefix, secret, checksum, blake3 hash) and
//!   the pure authorization decision.
//! - [`table`]: the in-memory [`table::TokenTable`] the data plane reads; it
//!   is changed only through [`table::TokenTable::apply`].
//! - [`store`]: the [`store::Store`] trait with the embedded (redb) and Redis
//!   implementations, and the change feed that keeps the table in sync.
//! - [`proxy`]: the data plane: listener, request phases, routing, client IP,
//!   forwarding, the upstream connection pool.
//! - [`admin`]: the admin listener (tenants, tokens, audit, health, metrics).
//! - [`server`]: wires everything together for `tollgate run`.
//! - [`demo`], [`client`]: the `demo` command and the admin client commands.
#![forbid(unsafe_code)]

pub mod access_log;
pub mod admin;
pub mod auth;
pub mod client;
pub mod config;
pub mod demo;
pub mod error;
pub mod metrics;
pub mod model;
pub mod proxy;
pub mod server;
pub mod shutdown;
pub mod store;
pub mod table;
pub mod telemetry;
pub mod tls;
