//! Where tenants and tokens live: the [`Store`] trait, the rules every store
//! enforces the same way, and the two implementations: [`embedded`] (redb, one
//! machine, the default) and [`redis`] (several gateway instances).
//!
//! A store owns invariants that must hold under concurrency: a token's tenant
//! exists, its products are a subset of the tenant's, and the tenant's
//! counted tokens never exceed its quota. Each store checks them inside its
//! own transaction with [`check_token_change`], so the rules are written once.

pub mod embedded;
pub mod redis;
pub mod transfer;

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::model::{Tenant, Token, UnixTime};
use crate::table::TokenTable;

/// Errors a store reports; the admin API maps each to one HTTP answer.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum StoreError {
    #[error("tenant {0:?} not found")]
    TenantNotFound(String),
    #[error("tenant {0:?} already exists")]
    TenantExists(String),
    #[error("token {0:?} not found")]
    TokenNotFound(String),
    #[error("token {0:?} is revoked")]
    TokenRevoked(String),
    #[error("tenant {tenant:?} already holds {quota} token(s), its token_quota")]
    QuotaExceeded { tenant: String, quota: u32 },
    #[error("product {product:?} is not among tenant {tenant:?}'s products")]
    ProductNotPurchased { tenant: String, product: String },
    #[error("invalid request: {0}")]
    Invalid(String),
    #[error("store unavailable: {0}")]
    Unavailable(String),
    #[error("store data is corrupt: {0}")]
    Corrupt(String),
}

/// Edits a tenant in place (inside the store's transaction; may be retried).
pub type TenantEdit<'a> = &'a (dyn Fn(&mut Tenant) -> Result<(), StoreError> + Send + Sync);
/// Edits a token in place, seeing its tenant (may be retried).
pub type TokenEdit<'a> = &'a (dyn Fn(&mut Token, &Tenant) -> Result<(), StoreError> + Send + Sync);

/// One audit-log entry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEvent {
    /// RFC 3339.
    pub at: String,
    /// The admin key's id, never the key.
    pub actor: String,
    pub action: String,
    pub target: String,
    pub detail: serde_json::Value,
}

/// Everything a store holds, for start-up, resync and export.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    pub tenants: Vec<Tenant>,
    pub tokens: Vec<Token>,
}

/// One line of `tollgate store export` / `import` (JSON lines).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum Record {
    Tenant(Tenant),
    Token(Token),
}

/// Connection state and freshness, for `/readyz` and `/metrics`.
#[derive(Debug)]
pub struct SyncStatus {
    connected: AtomicBool,
    /// Unix milliseconds of the last successful load or feed read.
    last_sync_ms: AtomicI64,
    /// Becomes true at the first sync; start-up waits on it.
    synced: tokio::sync::watch::Sender<bool>,
}

impl Default for SyncStatus {
    fn default() -> Self {
        SyncStatus {
            connected: AtomicBool::new(false),
            last_sync_ms: AtomicI64::new(0),
            synced: tokio::sync::watch::Sender::new(false),
        }
    }
}

impl SyncStatus {
    pub fn set_connected(&self, up: bool) {
        self.connected.store(up, Ordering::Relaxed);
    }
    pub fn connected(&self) -> bool {
        self.connected.load(Ordering::Relaxed)
    }
    pub fn synced_now(&self) {
        self.last_sync_ms.store(now_ms(), Ordering::Relaxed);
        self.synced
            .send_if_modified(|s| !std::mem::replace(s, true));
    }
    /// Returns once the first full load has been applied.
    pub async fn wait_first_sync(&self) {
        let mut rx = self.synced.subscribe();
        // The sender lives in `self`, so this cannot fail while we wait.
        let _ = rx.wait_for(|s| *s).await;
    }
    /// Seconds since the last sync, or `None` before the first.
    pub fn last_sync_age(&self) -> Option<f64> {
        match self.last_sync_ms.load(Ordering::Relaxed) {
            0 => None,
            t => Some((now_ms() - t).max(0) as f64 / 1000.0),
        }
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// The storage behind the admin API. Implementations must be linearizable
/// per tenant: the quota check and the write are one atomic step.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// `"embedded"` or `"redis"`.
    fn kind(&self) -> &'static str;

    /// Everything, for start-up and resync.
    async fn load_all(&self) -> Result<Snapshot, StoreError>;

    async fn get_tenant(&self, id: &str) -> Result<Option<Tenant>, StoreError>;
    async fn list_tenants(&self) -> Result<Vec<Tenant>, StoreError>;
    /// Fails with `TenantExists` if the id is taken.
    async fn create_tenant(&self, tenant: Tenant) -> Result<Tenant, StoreError>;
    async fn update_tenant(&self, id: &str, edit: TenantEdit<'_>) -> Result<Tenant, StoreError>;
    /// Deletes the tenant and all its tokens; returns the deleted token ids.
    async fn delete_tenant(&self, id: &str) -> Result<Vec<String>, StoreError>;

    async fn get_token(&self, id: &str) -> Result<Option<Token>, StoreError>;
    /// All tokens of a tenant, oldest first (`TenantNotFound` if none).
    async fn list_tokens(&self, tenant: &str) -> Result<Vec<Token>, StoreError>;
    /// Creates a token after [`check_token_change`] passes atomically.
    async fn create_token(&self, token: Token, now: UnixTime) -> Result<Token, StoreError>;
    /// Edits a token; [`check_token_change`] runs on the result atomically.
    async fn update_token(
        &self,
        id: &str,
        edit: TokenEdit<'_>,
        now: UnixTime,
    ) -> Result<Token, StoreError>;

    async fn append_audit(&self, event: AuditEvent) -> Result<(), StoreError>;
    /// Newest first.
    async fn list_audit(&self, limit: usize) -> Result<Vec<AuditEvent>, StoreError>;

    /// Writes a record as is (used by `store import`); keeps its version.
    async fn import(&self, record: Record) -> Result<(), StoreError>;

    /// Starts following changes made elsewhere (other instances) into
    /// `table`. The embedded store has no other writers and does nothing.
    fn spawn_sync(
        self: Arc<Self>,
        _table: TokenTable,
        _status: Arc<SyncStatus>,
    ) -> Option<tokio::task::JoinHandle<()>> {
        None
    }
}

/// The rules for a token write, shared by every store. `before` is `None` for
/// a creation; `others_counted` is the number of the tenant's *other* tokens
/// that count against its quota.
pub fn check_token_change(
    before: Option<&Token>,
    after: &Token,
    tenant: &Tenant,
    others_counted: usize,
    now: UnixTime,
) -> Result<(), StoreError> {
    if before.is_some_and(|b| b.revoked_at.is_some()) {
        return Err(StoreError::TokenRevoked(after.id.clone()));
    }
    let products_changed = before.is_none_or(|b| b.products != after.products);
    if let (true, Some(products)) = (products_changed, &after.products) {
        if let Some(p) = products.iter().find(|p| !tenant.products.contains(p)) {
            return Err(StoreError::ProductNotPurchased {
                tenant: tenant.id.clone(),
                product: p.clone(),
            });
        }
    }
    let was_counted = before.is_some_and(|b| b.counts_against_quota(now));
    if !was_counted
        && after.counts_against_quota(now)
        && others_counted >= tenant.token_quota as usize
    {
        return Err(StoreError::QuotaExceeded {
            tenant: tenant.id.clone(),
            quota: tenant.token_quota,
        });
    }
    Ok(())
}
