//! The embedded store: a redb database file on local disk, the default for a
//! single gateway. Every write is one serializable redb transaction committed
//! with `Durability::Immediate` (fsync) before the admin API answers, so an
//! acknowledged write survives `kill -9` and power loss, and the quota check
//! cannot race with another create.
//!
//! Tables: `tenants` (id → JSON), `tokens` (id → JSON), `tenant_tokens`
//! (tenant id ↦ token ids), `audit` (sequence → JSON), `meta` (`version`).

use std::path::Path;
use std::sync::Arc;

use async_trait::async_trait;
use redb::{
    Database, MultimapTableDefinition, ReadableMultimapTable, ReadableTable, ReadableTableMetadata,
    TableDefinition, WriteTransaction,
};

use super::{
    check_token_change, AuditEvent, Record, Snapshot, Store, StoreError, TenantEdit, TokenEdit,
};
use crate::model::{Tenant, Token, UnixTime};

const TENANTS: TableDefinition<&str, &[u8]> = TableDefinition::new("tenants");
const TOKENS: TableDefinition<&str, &[u8]> = TableDefinition::new("tokens");
const TENANT_TOKENS: MultimapTableDefinition<&str, &str> =
    MultimapTableDefinition::new("tenant_tokens");
const AUDIT: TableDefinition<u64, &[u8]> = TableDefinition::new("audit");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

/// Audit events kept; older ones are dropped as new ones arrive.
const AUDIT_KEEP: u64 = 100_000;

/// Handle to the database; cheap to clone.
#[derive(Clone)]
pub struct EmbeddedStore {
    db: Arc<Database>,
}

fn err(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

fn decode<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt(e.to_string()))
}

fn encode<T: serde::Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).expect("records always serialize")
}

impl EmbeddedStore {
    /// Opens (or creates) the database at `path`, creating parent folders.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .map_err(|e| err(format!("cannot create {}: {e}", dir.display())))?;
        }
        let db = Database::create(path)
            .map_err(|e| err(format!("cannot open {}: {e}", path.display())))?;
        let tx = db.begin_write().map_err(err)?;
        {
            tx.open_table(TENANTS).map_err(err)?;
            tx.open_table(TOKENS).map_err(err)?;
            tx.open_multimap_table(TENANT_TOKENS).map_err(err)?;
            tx.open_table(AUDIT).map_err(err)?;
            tx.open_table(META).map_err(err)?;
        }
        tx.commit().map_err(err)?;
        Ok(EmbeddedStore { db: Arc::new(db) })
    }

    /// Runs blocking redb work off the async threads.
    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Database) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let db = Arc::clone(&self.db);
        tokio::task::spawn_blocking(move || f(&db))
            .await
            .map_err(|e| err(format!("store task failed: {e}")))?
    }

    /// Runs `f` in one write transaction and commits it.
    async fn write<T: Send + 'static>(
        &self,
        f: impl FnOnce(&WriteTransaction) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        self.blocking(move |db| {
            let tx = db.begin_write().map_err(err)?;
            let out = f(&tx)?;
            tx.commit().map_err(err)?;
            Ok(out)
        })
        .await
    }
}

/// Next value of the store-wide version counter.
fn next_version(tx: &WriteTransaction) -> Result<u64, StoreError> {
    let mut meta = tx.open_table(META).map_err(err)?;
    let v = meta
        .get("version")
        .map_err(err)?
        .map(|g| g.value())
        .unwrap_or(0)
        + 1;
    meta.insert("version", v).map_err(err)?;
    Ok(v)
}

fn read_tenant(tx: &WriteTransaction, id: &str) -> Result<Option<Tenant>, StoreError> {
    let t = tx.open_table(TENANTS).map_err(err)?;
    let got = t.get(id).map_err(err)?;
    got.map(|g| decode(g.value())).transpose()
}

fn read_token(tx: &WriteTransaction, id: &str) -> Result<Option<Token>, StoreError> {
    let t = tx.open_table(TOKENS).map_err(err)?;
    let got = t.get(id).map_err(err)?;
    got.map(|g| decode(g.value())).transpose()
}

fn put_tenant(tx: &WriteTransaction, t: &Tenant) -> Result<(), StoreError> {
    let mut table = tx.open_table(TENANTS).map_err(err)?;
    table
        .insert(t.id.as_str(), encode(t).as_slice())
        .map_err(err)?;
    Ok(())
}

fn put_token(tx: &WriteTransaction, t: &Token) -> Result<(), StoreError> {
    let mut table = tx.open_table(TOKENS).map_err(err)?;
    table
        .insert(t.id.as_str(), encode(t).as_slice())
        .map_err(err)?;
    let mut idx = tx.open_multimap_table(TENANT_TOKENS).map_err(err)?;
    idx.insert(t.tenant.as_str(), t.id.as_str()).map_err(err)?;
    Ok(())
}

/// The tenant's tokens, in id (creation) order.
fn tenant_tokens(tx: &WriteTransaction, tenant: &str) -> Result<Vec<Token>, StoreError> {
    let idx = tx.open_multimap_table(TENANT_TOKENS).map_err(err)?;
    let mut ids = Vec::new();
    for id in idx.get(tenant).map_err(err)? {
        ids.push(id.map_err(err)?.value().to_string());
    }
    drop(idx);
    let mut out = Vec::with_capacity(ids.len());
    for id in ids {
        if let Some(t) = read_token(tx, &id)? {
            out.push(t);
        }
    }
    Ok(out)
}

fn counted_except(tokens: &[Token], except: &str, now: UnixTime) -> usize {
    tokens
        .iter()
        .filter(|t| t.id != except && t.counts_against_quota(now))
        .count()
}

#[async_trait]
impl Store for EmbeddedStore {
    fn kind(&self) -> &'static str {
        "embedded"
    }

    async fn load_all(&self) -> Result<Snapshot, StoreError> {
        self.blocking(|db| {
            let tx = db.begin_read().map_err(err)?;
            let mut snap = Snapshot::default();
            for row in tx.open_table(TENANTS).map_err(err)?.iter().map_err(err)? {
                snap.tenants.push(decode(row.map_err(err)?.1.value())?);
            }
            let tokens = tx.open_table(TOKENS).map_err(err)?;
            snap.tokens.reserve(tokens.len().map_err(err)? as usize);
            for row in tokens.iter().map_err(err)? {
                snap.tokens.push(decode(row.map_err(err)?.1.value())?);
            }
            Ok(snap)
        })
        .await
    }

    async fn get_tenant(&self, id: &str) -> Result<Option<Tenant>, StoreError> {
        let id = id.to_string();
        self.blocking(move |db| {
            let tx = db.begin_read().map_err(err)?;
            let t = tx.open_table(TENANTS).map_err(err)?;
            let got = t.get(id.as_str()).map_err(err)?;
            got.map(|g| decode(g.value())).transpose()
        })
        .await
    }

    async fn list_tenants(&self) -> Result<Vec<Tenant>, StoreError> {
        Ok(self.load_all().await?.tenants)
    }

    async fn create_tenant(&self, mut tenant: Tenant) -> Result<Tenant, StoreError> {
        self.write(move |tx| {
            if read_tenant(tx, &tenant.id)?.is_some() {
                return Err(StoreError::TenantExists(tenant.id.clone()));
            }
            tenant.version = next_version(tx)?;
            put_tenant(tx, &tenant)?;
            Ok(tenant)
        })
        .await
    }

    async fn update_tenant(&self, id: &str, edit: TenantEdit<'_>) -> Result<Tenant, StoreError> {
        // The edit is a borrowed closure and cannot move into the blocking
        // task, so it runs here on a read copy; the write commits only if
        // the stored tenant is still that copy (otherwise: read again).
        loop {
            let current = self
                .get_tenant(id)
                .await?
                .ok_or_else(|| StoreError::TenantNotFound(id.to_string()))?;
            let mut next = current.clone();
            edit(&mut next)?;
            let done = self
                .write(move |tx| {
                    if read_tenant(tx, &current.id)?.as_ref() != Some(&current) {
                        return Ok(None);
                    }
                    next.version = next_version(tx)?;
                    put_tenant(tx, &next)?;
                    Ok(Some(next))
                })
                .await?;
            if let Some(t) = done {
                return Ok(t);
            }
        }
    }

    async fn delete_tenant(&self, id: &str) -> Result<Vec<String>, StoreError> {
        let id = id.to_string();
        self.write(move |tx| {
            let mut tenants = tx.open_table(TENANTS).map_err(err)?;
            if tenants.remove(id.as_str()).map_err(err)?.is_none() {
                return Err(StoreError::TenantNotFound(id.clone()));
            }
            drop(tenants);
            next_version(tx)?;
            let mut idx = tx.open_multimap_table(TENANT_TOKENS).map_err(err)?;
            let mut ids = Vec::new();
            for v in idx.remove_all(id.as_str()).map_err(err)? {
                ids.push(v.map_err(err)?.value().to_string());
            }
            drop(idx);
            let mut tokens = tx.open_table(TOKENS).map_err(err)?;
            for t in &ids {
                tokens.remove(t.as_str()).map_err(err)?;
            }
            Ok(ids)
        })
        .await
    }

    async fn get_token(&self, id: &str) -> Result<Option<Token>, StoreError> {
        let id = id.to_string();
        self.blocking(move |db| {
            let tx = db.begin_read().map_err(err)?;
            let t = tx.open_table(TOKENS).map_err(err)?;
            let got = t.get(id.as_str()).map_err(err)?;
            got.map(|g| decode(g.value())).transpose()
        })
        .await
    }

    async fn list_tokens(&self, tenant: &str) -> Result<Vec<Token>, StoreError> {
        // A read transaction: listing must not queue behind writers or
        // commit (fsync) anything.
        let tenant = tenant.to_string();
        self.blocking(move |db| {
            let tx = db.begin_read().map_err(err)?;
            if tx
                .open_table(TENANTS)
                .map_err(err)?
                .get(tenant.as_str())
                .map_err(err)?
                .is_none()
            {
                return Err(StoreError::TenantNotFound(tenant.clone()));
            }
            let idx = tx.open_multimap_table(TENANT_TOKENS).map_err(err)?;
            let tokens = tx.open_table(TOKENS).map_err(err)?;
            let mut out = Vec::new();
            for id in idx.get(tenant.as_str()).map_err(err)? {
                let id = id.map_err(err)?;
                if let Some(v) = tokens.get(id.value()).map_err(err)? {
                    out.push(decode(v.value())?);
                }
            }
            Ok(out)
        })
        .await
    }

    async fn create_token(&self, mut token: Token, now: UnixTime) -> Result<Token, StoreError> {
        self.write(move |tx| {
            let tenant = read_tenant(tx, &token.tenant)?
                .ok_or_else(|| StoreError::TenantNotFound(token.tenant.clone()))?;
            let others = counted_except(&tenant_tokens(tx, &tenant.id)?, &token.id, now);
            check_token_change(None, &token, &tenant, others, now)?;
            token.version = next_version(tx)?;
            put_token(tx, &token)?;
            Ok(token)
        })
        .await
    }

    async fn update_token(
        &self,
        id: &str,
        edit: TokenEdit<'_>,
        now: UnixTime,
    ) -> Result<Token, StoreError> {
        loop {
            let before = self
                .get_token(id)
                .await?
                .ok_or_else(|| StoreError::TokenNotFound(id.to_string()))?;
            let tenant = self
                .get_tenant(&before.tenant)
                .await?
                .ok_or_else(|| StoreError::TokenNotFound(id.to_string()))?;
            let mut after = before.clone();
            edit(&mut after, &tenant)?;
            let done = self
                .write(move |tx| {
                    // Optimistic: commit only if nothing changed since the read.
                    if read_token(tx, &before.id)?.as_ref() != Some(&before)
                        || read_tenant(tx, &tenant.id)?.as_ref() != Some(&tenant)
                    {
                        return Ok(None);
                    }
                    let others = counted_except(&tenant_tokens(tx, &tenant.id)?, &after.id, now);
                    check_token_change(Some(&before), &after, &tenant, others, now)?;
                    after.version = next_version(tx)?;
                    put_token(tx, &after)?;
                    Ok(Some(after))
                })
                .await?;
            if let Some(t) = done {
                return Ok(t);
            }
        }
    }

    async fn append_audit(&self, event: AuditEvent) -> Result<(), StoreError> {
        self.write(move |tx| {
            let mut t = tx.open_table(AUDIT).map_err(err)?;
            let seq = t
                .last()
                .map_err(err)?
                .map(|(k, _)| k.value() + 1)
                .unwrap_or(1);
            t.insert(seq, encode(&event).as_slice()).map_err(err)?;
            if seq > AUDIT_KEEP {
                t.remove(seq - AUDIT_KEEP).map_err(err)?;
            }
            Ok(())
        })
        .await
    }

    async fn list_audit(&self, limit: usize) -> Result<Vec<AuditEvent>, StoreError> {
        self.blocking(move |db| {
            let tx = db.begin_read().map_err(err)?;
            let t = tx.open_table(AUDIT).map_err(err)?;
            let mut out = Vec::new();
            for row in t.iter().map_err(err)?.rev().take(limit) {
                out.push(decode(row.map_err(err)?.1.value())?);
            }
            Ok(out)
        })
        .await
    }

    async fn import(&self, record: Record) -> Result<(), StoreError> {
        self.write(move |tx| {
            let v = next_version(tx)?;
            match record {
                Record::Tenant(mut t) => {
                    t.version = t.version.max(v);
                    put_tenant(tx, &t)
                }
                Record::Token(mut t) => {
                    t.version = t.version.max(v);
                    put_token(tx, &t)
                }
            }
        })
        .await
    }
}
