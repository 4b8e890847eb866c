//! The data plane: the public listener and what it does with each request.
//!
//! Phases, in order (see [`service`]): `request_filter` (path, route, token,
//! client IP, decision), `upstream_request_filter` (header rewriting, in
//! [`forward`]), the upstream call (on a kept-alive connection from
//! [`pool`]), `response_filter`, and `logging`.
//! The data plane reads the token table and a config snapshot; it never
//! awaits the store.

pub mod client_ip;
pub mod forward;
pub mod listener;
pub mod pool;
pub mod route;
pub mod service;

pub use service::ProxyError;
