//! The in-memory token table the data plane reads on every request.
//!
//! Keys are blake3 hashes of token secrets; values are [`Grant`]s, the
//! pre-digested form of a token the decision needs. Tenants are shared
//! through [`TenantCell`]s so a tenant's product change reaches all its
//! grants with one swap.
//!
//! The table is written only by [`TokenTable::apply`], whatever the change's
//! source (start-up load, an admin write, the Redis feed, a full resync).
//! Records carry a version; an older version never overwrites a newer one,
//! so changes may arrive twice or out of order.
//!
//! Memory and cache footprint matter here (a million tokens is a normal
//! size): product lists are interned, so the thousands of tenants and tokens
//! that share one list share one allocation, which also stays in cache for
//! the decision; a token's id is one allocation shared by its table entries.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use dashmap::DashMap;
use http::HeaderValue;
use ipnet::IpNet;

use crate::auth::TokenHash;
use crate::model::{Tenant, Token, UnixTime};

/// A change to apply to the table.
#[derive(Clone, Debug)]
pub enum Change {
    TenantUpserted(Tenant),
    /// The tenant and all its tokens are gone.
    TenantRemoved(String),
    /// Created, updated, rotated or revoked (`revoked_at` set).
    TokenUpserted(Token),
    /// Deleted from the store entirely.
    TokenRemoved(String),
}

/// A list of product names, shared by every tenant and token that has the
/// same list.
pub type ProductList = Arc<Box<[Box<str>]>>;

/// What the data plane knows about one token secret.
#[derive(Debug)]
pub struct Grant {
    /// Shared with the table's per-id entry.
    pub token_id: Arc<str>,
    /// `token_id` as a header value, built once.
    pub token_id_header: HeaderValue,
    pub tenant: Arc<TenantCell>,
    pub allowlist: Allowlist,
    /// `None`: all the tenant's products.
    pub products: Option<ProductList>,
    /// The token's expiry, or for a rotated-out secret the end of its grace.
    pub expires_at: Option<UnixTime>,
    pub disabled: bool,
    /// Last time (unix seconds) this secret was let through, in memory only.
    pub last_used: AtomicI64,
}

impl Grant {
    /// Records a use; writes at most once a second per grant so hot tokens
    /// do not bounce a cache line between cores.
    #[inline]
    pub fn touch(&self, now: UnixTime) {
        if self.last_used.load(Ordering::Relaxed) < now {
            self.last_used.store(now, Ordering::Relaxed);
        }
    }

    #[doc(hidden)]
    pub fn for_test(allowlist: Vec<IpNet>, products: Option<Vec<Box<str>>>) -> Grant {
        Grant {
            token_id: "tok_test".into(),
            token_id_header: HeaderValue::from_static("tok_test"),
            tenant: Arc::new(TenantCell::new("t", Arc::new(Box::new([])))),
            allowlist: allowlist.into(),
            products: products.map(|p| Arc::new(p.into_boxed_slice())),
            expires_at: None,
            disabled: false,
            last_used: AtomicI64::new(0),
        }
    }
}

/// A token's allowlist. Most tokens have one entry; it lives inline in the
/// grant, which saves an allocation per token and a dependent cache miss
/// per decision (measured with `cargo bench --bench auth`).
#[derive(Debug, Clone)]
pub enum Allowlist {
    One(IpNet),
    Many(Box<[IpNet]>),
}

impl std::ops::Deref for Allowlist {
    type Target = [IpNet];
    fn deref(&self) -> &[IpNet] {
        match self {
            Allowlist::One(n) => std::slice::from_ref(n),
            Allowlist::Many(list) => list,
        }
    }
}

impl From<Vec<IpNet>> for Allowlist {
    fn from(v: Vec<IpNet>) -> Self {
        match v.as_slice() {
            [one] => Allowlist::One(*one),
            _ => Allowlist::Many(v.into_boxed_slice()),
        }
    }
}

/// A tenant as the data plane sees it.
#[derive(Debug)]
pub struct TenantCell {
    pub id: Box<str>,
    pub id_header: HeaderValue,
    /// Products bought; swapped as a whole when the tenant changes.
    pub products: ArcSwap<Box<[Box<str>]>>,
}

impl TenantCell {
    fn new(id: &str, products: ProductList) -> TenantCell {
        TenantCell {
            id: id.into(),
            // Tenant ids are validated to [a-z0-9_-], always a valid value.
            id_header: HeaderValue::from_str(id).unwrap_or(HeaderValue::from_static("invalid")),
            products: ArcSwap::new(products),
        }
    }
}

/// Interned product lists (control plane only; the data plane never locks).
#[derive(Default)]
struct ProductLists(Mutex<HashMap<Vec<String>, ProductList>>);

impl ProductLists {
    /// Distinct lists kept before unused ones are dropped.
    const PRUNE_AT: usize = 1024;

    fn intern(&self, list: Vec<String>) -> ProductList {
        let mut lists = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(shared) = lists.get(&list) {
            return Arc::clone(shared);
        }
        if lists.len() >= Self::PRUNE_AT {
            lists.retain(|_, shared| Arc::strong_count(shared) > 1);
        }
        let shared: ProductList = Arc::new(list.iter().map(|p| p.as_str().into()).collect());
        lists.insert(list, Arc::clone(&shared));
        shared
    }
}

/// Hasher for keys that are already uniform hashes: passes the u64 through.
#[derive(Default)]
pub struct PassThroughHasher(u64);

impl Hasher for PassThroughHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        // Only reached for keys other than TokenHash; fold them in.
        for &b in bytes {
            self.0 = (self.0.rotate_left(5) ^ b as u64).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

type ByHash = DashMap<TokenHash, Arc<Grant>, BuildHasherDefault<PassThroughHasher>>;

/// Per-token bookkeeping needed to apply changes (not read per request).
#[derive(Debug)]
struct IdEntry {
    version: u64,
    tenant: Arc<TenantCell>,
    /// The hashes this token currently owns in `by_hash` (current and, during
    /// a rotation grace, previous). Empty for a revoked token's tombstone.
    hashes: Vec<TokenHash>,
}

#[derive(Debug)]
struct TenantEntry {
    version: u64,
    cell: Arc<TenantCell>,
}

/// Shared handle to the table; cheap to clone.
#[derive(Clone, Default)]
pub struct TokenTable {
    inner: Arc<Inner>,
}

#[derive(Default)]
struct Inner {
    by_hash: ByHash,
    by_id: DashMap<Arc<str>, IdEntry>,
    tenants: DashMap<Box<str>, TenantEntry>,
    product_lists: ProductLists,
}

impl TokenTable {
    pub fn new() -> Self {
        Self::default()
    }

    /// The grant for a token hash, if any. The hot-path read.
    #[inline]
    pub fn get(&self, hash: &TokenHash) -> Option<Arc<Grant>> {
        self.inner.by_hash.get(hash).map(|g| Arc::clone(g.value()))
    }

    /// Number of tokens that are not revoked (the `tollgate_tokens` gauge).
    pub fn live_tokens(&self) -> usize {
        self.inner
            .by_id
            .iter()
            .filter(|e| !e.value().hashes.is_empty())
            .count()
    }

    /// Number of known tenants (the `tollgate_tenants` gauge).
    pub fn tenants(&self) -> usize {
        self.inner.tenants.len()
    }

    /// In-memory last use of a token (max over its secrets), if used since
    /// this process started.
    pub fn last_used(&self, token_id: &str) -> Option<UnixTime> {
        let entry = self.inner.by_id.get(token_id)?;
        entry
            .hashes
            .iter()
            .filter_map(|h| self.inner.by_hash.get(h))
            .map(|g| g.last_used.load(Ordering::Relaxed))
            .filter(|t| *t > 0)
            .max()
    }

    /// Applies one change. The single write path into the table.
    pub fn apply(&self, change: Change) {
        match change {
            Change::TenantUpserted(t) => self.upsert_tenant(t),
            Change::TenantRemoved(id) => self.remove_tenant(&id),
            Change::TokenUpserted(t) => self.upsert_token(t),
            Change::TokenRemoved(id) => self.remove_token(&id),
        }
    }

    /// Replaces the whole content with a full snapshot from the store.
    /// Records newer than the snapshot (applied meanwhile) are kept.
    pub fn replace_all(&self, tenants: Vec<Tenant>, tokens: Vec<Token>) {
        let tenant_ids: std::collections::HashSet<String> =
            tenants.iter().map(|t| t.id.clone()).collect();
        let token_ids: std::collections::HashSet<String> =
            tokens.iter().map(|t| t.id.clone()).collect();
        for t in tenants {
            self.upsert_tenant(t);
        }
        for t in tokens {
            self.upsert_token(t);
        }
        self.retain_only(&tenant_ids, &token_ids);
    }

    /// Removes every token and tenant whose id is not in these sets. With
    /// [`TokenTable::apply`] for each record, this is [`TokenTable::replace_all`]
    /// in batches: a store that streams a full resync upserts as it reads and
    /// calls this with every id it saw, never holding the whole snapshot.
    pub fn retain_only(
        &self,
        tenant_ids: &std::collections::HashSet<String>,
        token_ids: &std::collections::HashSet<String>,
    ) {
        let stale_tokens: Vec<Arc<str>> = self
            .inner
            .by_id
            .iter()
            .filter(|e| !token_ids.contains(&**e.key()))
            .map(|e| e.key().clone())
            .collect();
        for id in stale_tokens {
            self.remove_token(&id);
            self.inner.by_id.remove(&id);
        }
        let stale_tenants: Vec<Box<str>> = self
            .inner
            .tenants
            .iter()
            .filter(|e| !tenant_ids.contains(&**e.key()))
            .map(|e| e.key().clone())
            .collect();
        for id in stale_tenants {
            self.remove_tenant(&id);
        }
    }

    fn tenant_cell(&self, id: &str) -> Arc<TenantCell> {
        if let Some(e) = self.inner.tenants.get(id) {
            return Arc::clone(&e.cell);
        }
        // A token seen before its tenant: a placeholder with no products,
        // filled in when the tenant arrives.
        let entry = self
            .inner
            .tenants
            .entry(id.into())
            .or_insert_with(|| TenantEntry {
                version: 0,
                cell: Arc::new(TenantCell::new(
                    id,
                    self.inner.product_lists.intern(Vec::new()),
                )),
            });
        Arc::clone(&entry.cell)
    }

    fn upsert_tenant(&self, t: Tenant) {
        match self.inner.tenants.entry(t.id.as_str().into()) {
            dashmap::Entry::Occupied(mut e) => {
                if e.get().version > t.version {
                    return;
                }
                let products = self.inner.product_lists.intern(t.products);
                e.get().cell.products.store(products);
                e.get_mut().version = t.version;
            }
            dashmap::Entry::Vacant(e) => {
                let products = self.inner.product_lists.intern(t.products);
                e.insert(TenantEntry {
                    version: t.version,
                    cell: Arc::new(TenantCell::new(&t.id, products)),
                });
            }
        }
    }

    fn remove_tenant(&self, id: &str) {
        if let Some((_, e)) = self.inner.tenants.remove(id) {
            // Grants still held by in-flight requests now see no products.
            e.cell.products.store(Arc::new(Box::new([])));
        }
        let ids: Vec<Arc<str>> = self
            .inner
            .by_id
            .iter()
            .filter(|e| &*e.value().tenant.id == id)
            .map(|e| e.key().clone())
            .collect();
        for token_id in ids {
            self.remove_token(&token_id);
        }
    }

    fn remove_token(&self, id: &str) {
        if let Some(mut e) = self.inner.by_id.get_mut(id) {
            for h in e.hashes.drain(..) {
                self.inner.by_hash.remove(&h);
            }
            // A tombstone: no later replay of an older version revives it.
            e.version = u64::MAX;
        }
    }

    fn upsert_token(&self, t: Token) {
        let mut entry = self
            .inner
            .by_id
            .entry(t.id.as_str().into())
            .or_insert_with(|| IdEntry {
                version: 0,
                tenant: self.tenant_cell(&t.tenant),
                hashes: Vec::new(),
            });
        if entry.version > t.version || (entry.version == u64::MAX && t.version != u64::MAX) {
            return;
        }
        let old_hashes = std::mem::take(&mut entry.hashes);
        entry.version = t.version;
        if t.revoked_at.is_some() {
            for h in old_hashes {
                self.inner.by_hash.remove(&h);
            }
            return;
        }
        let tenant = self.tenant_cell(&t.tenant);
        let token_id = Arc::clone(entry.key());
        let products = t
            .products
            .clone()
            .map(|p| self.inner.product_lists.intern(p));
        let make = |expires_at: Option<UnixTime>, last_used: i64| Grant {
            token_id: Arc::clone(&token_id),
            token_id_header: HeaderValue::from_str(&t.id)
                .unwrap_or(HeaderValue::from_static("invalid")),
            tenant: Arc::clone(&tenant),
            allowlist: Allowlist::from(t.ip_allowlist.clone()),
            products: products.clone(),
            expires_at,
            disabled: t.disabled,
            last_used: AtomicI64::new(last_used),
        };
        let carried = |h: &TokenHash| {
            self.inner
                .by_hash
                .get(h)
                .map(|g| g.last_used.load(Ordering::Relaxed))
                .unwrap_or(0)
        };
        let mut new_hashes = vec![t.hash];
        let current = make(t.expires_at, carried(&t.hash));
        if let Some(prev) = &t.previous {
            let until = t.expires_at.map_or(prev.until, |e| e.min(prev.until));
            let grace = make(Some(until), carried(&prev.hash));
            self.inner.by_hash.insert(prev.hash, Arc::new(grace));
            new_hashes.push(prev.hash);
        }
        self.inner.by_hash.insert(t.hash, Arc::new(current));
        for h in old_hashes {
            if !new_hashes.contains(&h) {
                self.inner.by_hash.remove(&h);
            }
        }
        entry.hashes = new_hashes;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::PreviousSecret;

    fn tenant(id: &str, products: &[&str], version: u64) -> Tenant {
        Tenant {
            id: id.into(),
            name: id.into(),
            products: products.iter().map(|s| s.to_string()).collect(),
            token_quota: 1,
            created_at: 0,
            version,
        }
    }

    fn token(id: &str, secret: &str, version: u64) -> Token {
        Token {
            id: id.into(),
            tenant: "acme".into(),
            name: String::new(),
            hash: TokenHash::of(secret),
            ip_allowlist: vec!["10.0.0.1/32".parse().unwrap()],
            products: None,
            created_at: 0,
            expires_at: None,
            disabled: false,
            revoked_at: None,
            previous: None,
            last_used_at: None,
            version,
        }
    }

    #[test]
    fn upsert_then_revoke_removes_the_grant() {
        let t = TokenTable::new();
        t.apply(Change::TenantUpserted(tenant("acme", &["crm"], 1)));
        t.apply(Change::TokenUpserted(token("tok_1", "s1", 1)));
        assert!(t.get(&TokenHash::of("s1")).is_some());
        assert_eq!(t.live_tokens(), 1);
        let mut revoked = token("tok_1", "s1", 2);
        revoked.revoked_at = Some(5);
        t.apply(Change::TokenUpserted(revoked));
        assert!(t.get(&TokenHash::of("s1")).is_none());
        assert_eq!(t.live_tokens(), 0);
        // A late replay of the older version does not bring it back.
        t.apply(Change::TokenUpserted(token("tok_1", "s1", 1)));
        assert!(t.get(&TokenHash::of("s1")).is_none());
    }

    #[test]
    fn rotation_keeps_the_previous_secret_until_grace_ends() {
        let t = TokenTable::new();
        t.apply(Change::TokenUpserted(token("tok_1", "old", 1)));
        let mut rotated = token("tok_1", "new", 2);
        rotated.previous = Some(PreviousSecret {
            hash: TokenHash::of("old"),
            until: 100,
        });
        t.apply(Change::TokenUpserted(rotated));
        assert_eq!(t.get(&TokenHash::of("old")).unwrap().expires_at, Some(100));
        assert_eq!(t.get(&TokenHash::of("new")).unwrap().expires_at, None);
        // Next rotation without grace drops both older secrets.
        t.apply(Change::TokenUpserted(token("tok_1", "newer", 3)));
        assert!(t.get(&TokenHash::of("old")).is_none());
        assert!(t.get(&TokenHash::of("new")).is_none());
        assert!(t.get(&TokenHash::of("newer")).is_some());
    }

    #[test]
    fn tenant_product_change_reaches_existing_grants() {
        let t = TokenTable::new();
        t.apply(Change::TokenUpserted(token("tok_1", "s1", 1)));
        let g = t.get(&TokenHash::of("s1")).unwrap();
        assert!(g.tenant.products.load().is_empty());
        t.apply(Change::TenantUpserted(tenant("acme", &["crm"], 1)));
        assert_eq!(&*g.tenant.products.load()[0], "crm");
        // Older tenant versions are ignored.
        t.apply(Change::TenantUpserted(tenant("acme", &[], 0)));
        assert_eq!(g.tenant.products.load().len(), 1);
    }

    #[test]
    fn equal_product_lists_share_one_allocation() {
        let t = TokenTable::new();
        t.apply(Change::TenantUpserted(tenant(
            "acme",
            &["crm", "messaging"],
            1,
        )));
        t.apply(Change::TenantUpserted(tenant(
            "other",
            &["crm", "messaging"],
            1,
        )));
        let mut a = token("tok_1", "s1", 1);
        a.products = Some(vec!["crm".into()]);
        let mut b = token("tok_2", "s2", 1);
        b.products = Some(vec!["crm".into()]);
        b.tenant = "other".into();
        t.apply(Change::TokenUpserted(a));
        t.apply(Change::TokenUpserted(b));
        let (a, b) = (
            t.get(&TokenHash::of("s1")).unwrap(),
            t.get(&TokenHash::of("s2")).unwrap(),
        );
        assert!(Arc::ptr_eq(
            &a.tenant.products.load_full(),
            &b.tenant.products.load_full()
        ));
        assert!(Arc::ptr_eq(
            a.products.as_ref().unwrap(),
            b.products.as_ref().unwrap()
        ));
        assert_eq!(&*a.token_id, "tok_1");
        // A product change of one tenant leaves the other's list alone.
        t.apply(Change::TenantUpserted(tenant("acme", &["crm"], 2)));
        assert_eq!(a.tenant.products.load().len(), 1);
        assert_eq!(b.tenant.products.load().len(), 2);
    }

    #[test]
    fn tenant_removal_removes_its_tokens() {
        let t = TokenTable::new();
        t.apply(Change::TenantUpserted(tenant("acme", &["crm"], 1)));
        t.apply(Change::TokenUpserted(token("tok_1", "s1", 1)));
        let g = t.get(&TokenHash::of("s1")).unwrap();
        t.apply(Change::TenantRemoved("acme".into()));
        assert!(t.get(&TokenHash::of("s1")).is_none());
        assert!(g.tenant.products.load().is_empty());
        assert_eq!(t.tenants(), 0);
    }

    #[test]
    fn replace_all_drops_what_the_snapshot_lacks() {
        let t = TokenTable::new();
        t.apply(Change::TenantUpserted(tenant("acme", &["crm"], 1)));
        t.apply(Change::TokenUpserted(token("tok_1", "s1", 1)));
        t.apply(Change::TokenUpserted(token("tok_2", "s2", 1)));
        t.replace_all(
            vec![tenant("acme", &["crm"], 1)],
            vec![token("tok_2", "s2", 1)],
        );
        assert!(t.get(&TokenHash::of("s1")).is_none());
        assert!(t.get(&TokenHash::of("s2")).is_some());
    }

    #[test]
    fn last_use_survives_an_update() {
        let t = TokenTable::new();
        t.apply(Change::TokenUpserted(token("tok_1", "s1", 1)));
        t.get(&TokenHash::of("s1")).unwrap().touch(42);
        t.apply(Change::TokenUpserted(token("tok_1", "s1", 2)));
        assert_eq!(t.last_used("tok_1"), Some(42));
    }
}
