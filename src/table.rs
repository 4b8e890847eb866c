//! The in-memory token table the data plane reads on every request.
//!
//! Keys are blake3 hashes of token secrets; a lookup returns a [`Grant`], a
//! small owned copy of what the decision needs. Tenants are shared through
//! [`TenantCell`]s, so a tenant's product change reaches every one of its
//! tokens with one store (the next lookup of any of them sees it).
//!
//! The table is written only by [`TokenTable::apply`], whatever the change's
//! source (start-up load, an admin write, the Redis feed, a full resync).
//! Records carry a version; an older version never overwrites a newer one,
//! so changes may arrive twice or out of order. Writers are serialized by one
//! control-plane mutex; the data plane never takes it.
//!
//! # Layout, and why
//!
//! A million tokens is a normal size, so memory per token and cache misses
//! per lookup are what this module is designed around. The previous layout
//! (a dashmap of `Arc<Grant>`, a dashmap by id with a `Vec` of hashes per
//! token, a dashmap of tenants; each grant with its own id string, a
//! header-value copy of it, a tenant `Arc` and an `ArcSwap`'d product list)
//! measured **737 bytes/token**. Now, per token (one secret, one tenant):
//!
//! - **Records** (128 bytes each, aligned to a 128-byte line pair, which the
//!   L2 spatial prefetcher fetches together) live in 64 shards chosen by hash
//!   bits. A shard is an `RwLock` over fixed chunks of 256 records (no
//!   `Vec`-doubling slack, no big reallocation copies) and an index. A
//!   record holds the 32-byte hash, the tenant `Arc`, the token's interned
//!   product set, expiry, flags, last use, the allowlist, the token id, and
//!   for a token's current secret its version and where its previous
//!   secret's record is during a rotation grace. 128 B.
//! - **The index** is open addressing with linear probing over 8-byte words
//!   `(32-bit hash tag, position)`, at most 3/4 full, deleting by shifting
//!   back (no tombstones). At 1M it sits at 48% load: 16 B/token. A hashbrown
//!   map holding the record inline would cost the record's size again in
//!   empty buckets at that load, which is why records are not in the map.
//! - **Ids** are found through a second index of the same kind (control
//!   plane only) pointing at the token's current record, which holds the id:
//!   16 B/token, and no second copy of the id or per-token `Vec`.
//! - **Token ids** are a [`TokenId`]: `tok_` + canonical ULID (what the
//!   gateway issues) as 16 bytes, other ids up to 22 bytes inline, longer
//!   ones in an `Arc<str>`. Header values and strings are built when a
//!   request is forwarded or logged, not kept.
//! - **Tenants** are one 64-byte allocation each (mask, id inline up to 22
//!   bytes, interned product set, version) in a set keyed by the id the cell
//!   holds (~19 B/tenant at 48% load): no id copy, no header copy.
//! - **Products** are bits: names get a process-wide bit on first sight (63
//!   of them; a set holding any other name sets bit 63 and keeps its names
//!   for an exact comparison, so more products still work, only slower).
//!   Lists are interned as [`ProductSet`]s and a tenant keeps its mask in an
//!   `AtomicU64`, so the decision is two mask tests and no `ArcSwap` load.
//!   Routes resolve their product once ([`Product`]).
//! - **Allowlists** of one entry, or two IPv4 entries, are inline.
//!
//! That adds up to ~243 B/token; `cargo bench --bench auth` measures
//! **246 bytes/token** (tenant included).
//!
//! A hit reads the shard's lock word (hot), one index line, the record and
//! the tenant's line; [`TokenTable::get`] copies what the decision and the
//! access log need into an owned [`Grant`] with plain loads (cloning the
//! tenant `Arc` instead, a locked increment on a line that just missed, was
//! half the lookup's cost at 1M), so no lock or guard is held across an
//! `.await`. Measured on the shared 2-core VM (medians of 3 interleaved
//! runs, old layout → this one):
//!
//! - `auth/full_hit/10` 147 → 147 ns;
//! - `auth/full_hit/1M` 826-849 → 835-855 ns: unchanged. Three dependent
//!   misses now against about six before, but that bench's sample follows
//!   token creation order, and the old grants and tenant cells sat in
//!   allocation order, so it read them nearly sequentially; records here
//!   are placed by hash;
//! - `piece/full_hit_1M_shuffled` (the same hits in random order) 1277 →
//!   1006 ns, -21%;
//! - `auth/full_unknown/1M` 152 → 159-200 ns: the 16 MB index misses where
//!   hashbrown's 2 MB of control bytes mostly hit.
//!
//! Taking the tenant line out of hits too (a copy of the tenant's mask and
//! short id in the record, checked against a table-wide tenant generation,
//! with control-plane fields moved to a parallel array) was tried: +25
//! B/token for 1-2% on `auth/full_hit/1M`, where tenant cells are read in
//! allocation order; not kept.

use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasher, Hash, Hasher};
use std::net::IpAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock};

use arc_swap::ArcSwap;
use http::HeaderValue;
use ipnet::{IpNet, Ipv4Net};

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

// ---------------------------------------------------------------- products

/// Set in a mask when the set holds a name that has no bit.
const OVERFLOW: u64 = 1 << 63;

/// Product names that have a bit, process-wide: bit `i` is `NAMES[i]`.
/// Append-only and at most 63 long, so it never grows without bound.
static PRODUCT_BITS: Mutex<Vec<Box<str>>> = Mutex::new(Vec::new());

/// The bit of a product name, given one if there is room; 0 when none.
fn product_bit(name: &str) -> u64 {
    let mut names = PRODUCT_BITS.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some(i) = names.iter().position(|n| &**n == name) {
        return 1 << i;
    }
    if names.len() < 63 {
        names.push(name.into());
        1 << (names.len() - 1)
    } else {
        0
    }
}

/// True when a set with `mask` (and, past the bits, `names`) holds `p`.
///
/// A bit in the mask always means the name is in the set. A name that got
/// its bit after the set was made is in it as an overflow name, which the
/// second test finds.
#[inline]
fn mask_holds(mask: u64, p: &Product, names: impl FnOnce() -> bool) -> bool {
    mask & p.bit != 0 || (mask & OVERFLOW != 0 && names())
}

/// A product as routes name it, resolved once to its bit.
#[derive(Clone, Debug)]
pub struct Product {
    name: Box<str>,
    bit: u64,
}

impl Product {
    pub fn new(name: &str) -> Product {
        Product {
            name: name.into(),
            bit: product_bit(name),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }
}

/// A list of product names as a bit mask, interned: every tenant and token
/// with the same list shares one.
#[derive(Debug)]
pub struct ProductSet {
    mask: u64,
    names: Box<[Box<str>]>,
}

impl ProductSet {
    fn new(list: &[String]) -> ProductSet {
        let mask = list.iter().fold(0, |m, p| match product_bit(p) {
            0 => m | OVERFLOW,
            bit => m | bit,
        });
        ProductSet {
            mask,
            names: list.iter().map(|p| p.as_str().into()).collect(),
        }
    }

    #[inline]
    pub fn contains(&self, p: &Product) -> bool {
        mask_holds(self.mask, p, || self.names.iter().any(|n| **n == *p.name))
    }

    /// The names, in the order given.
    pub fn names(&self) -> &[Box<str>] {
        &self.names
    }

    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }
}

/// The products a token may use.
#[derive(Clone, Debug)]
pub enum TokenProducts {
    /// All the tenant's products.
    All,
    /// Exactly the products of this mask (no overflow names).
    Mask(u64),
    /// A set with overflow names.
    Set(Arc<ProductSet>),
}

impl TokenProducts {
    #[inline]
    pub fn contains(&self, p: &Product) -> bool {
        match self {
            TokenProducts::All => true,
            TokenProducts::Mask(m) => m & p.bit != 0,
            TokenProducts::Set(s) => s.contains(p),
        }
    }

    fn of(set: &Option<Arc<ProductSet>>) -> TokenProducts {
        match set {
            None => TokenProducts::All,
            Some(s) if s.mask & OVERFLOW == 0 => TokenProducts::Mask(s.mask),
            Some(s) => TokenProducts::Set(Arc::clone(s)),
        }
    }
}

// ------------------------------------------------------------------ tenants

/// A short string inline (up to 22 bytes), a longer one shared.
#[derive(Clone, PartialEq, Eq)]
pub enum CompactStr {
    Inline { len: u8, bytes: [u8; 22] },
    Shared(Arc<str>),
}

impl CompactStr {
    pub fn new(s: &str) -> CompactStr {
        if s.len() <= 22 {
            let mut bytes = [0u8; 22];
            bytes[..s.len()].copy_from_slice(s.as_bytes());
            CompactStr::Inline {
                len: s.len() as u8,
                bytes,
            }
        } else {
            CompactStr::Shared(s.into())
        }
    }

    pub fn as_str(&self) -> &str {
        match self {
            // Copied from a `str` whole.
            CompactStr::Inline { len, bytes } => {
                std::str::from_utf8(&bytes[..*len as usize]).unwrap_or("")
            }
            CompactStr::Shared(s) => s,
        }
    }
}

impl std::fmt::Debug for CompactStr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self.as_str(), f)
    }
}

/// A tenant as the table keeps it: one allocation, shared by the records of
/// all its tokens.
#[derive(Debug)]
pub struct TenantCell {
    /// `products`' mask, so a lookup reads one word, not the `ArcSwap`.
    mask: AtomicU64,
    /// Inline for ids up to 22 bytes: read from the same line as `mask`.
    id: CompactStr,
    /// Products bought; swapped as a whole when the tenant changes.
    products: ArcSwap<ProductSet>,
    /// Written under the table's control mutex only.
    version: AtomicU64,
}

impl TenantCell {
    fn new(id: &str, products: Arc<ProductSet>, version: u64) -> TenantCell {
        TenantCell {
            id: CompactStr::new(id),
            mask: AtomicU64::new(products.mask),
            products: ArcSwap::new(products),
            version: AtomicU64::new(version),
        }
    }

    pub fn id(&self) -> &str {
        self.id.as_str()
    }

    /// The products bought, now.
    pub fn products(&self) -> Arc<ProductSet> {
        self.products.load_full()
    }

    fn set_products(&self, set: Arc<ProductSet>) {
        let mask = set.mask;
        self.products.store(set);
        self.mask.store(mask, Ordering::Release);
    }
}

/// A tenant in the control plane's set, found by its id.
#[derive(Debug)]
struct TenantKey(Arc<TenantCell>);

impl Hash for TenantKey {
    fn hash<H: Hasher>(&self, h: &mut H) {
        self.0.id().hash(h)
    }
}
impl PartialEq for TenantKey {
    fn eq(&self, other: &Self) -> bool {
        self.0.id == other.0.id
    }
}
impl Eq for TenantKey {}
impl std::borrow::Borrow<str> for TenantKey {
    fn borrow(&self) -> &str {
        self.0.id()
    }
}

/// A tenant as a lookup saw it: its id and products, copied with plain
/// loads from the tenant's one cache line (no reference count is touched,
/// which at 1M tokens was half the cost of a lookup: a locked increment on
/// a line that missed). Product changes reach the next lookup.
#[derive(Clone, Debug)]
pub struct TenantSnapshot {
    id: CompactStr,
    mask: u64,
    /// The whole set, only when it has names past the bits.
    overflow: Option<Arc<ProductSet>>,
}

impl TenantSnapshot {
    #[inline]
    fn of(cell: &TenantCell) -> TenantSnapshot {
        let mask = cell.mask.load(Ordering::Acquire);
        TenantSnapshot {
            id: cell.id.clone(),
            mask,
            overflow: (mask & OVERFLOW != 0).then(|| cell.products.load_full()),
        }
    }

    pub fn id(&self) -> &str {
        self.id.as_str()
    }

    /// The id as a header value (tenant ids are validated to `[a-z0-9_-]`).
    pub fn id_header(&self) -> HeaderValue {
        HeaderValue::from_str(self.id()).unwrap_or(HeaderValue::from_static("invalid"))
    }

    /// Whether the tenant had bought `p`.
    #[inline]
    pub fn has(&self, p: &Product) -> bool {
        mask_holds(self.mask, p, || {
            self.overflow.as_ref().is_some_and(|s| s.contains(p))
        })
    }
}

// ---------------------------------------------------------------- token ids

/// A token id, compact: the gateway's own ids (`tok_` + canonical ULID) as
/// 16 bytes, other ids of up to 22 bytes inline, longer ones shared.
#[derive(Clone, PartialEq, Eq, Hash)]
pub enum TokenId {
    Ulid([u8; 16]),
    Short { len: u8, bytes: [u8; 22] },
    Long(Arc<str>),
}

/// The text of a [`TokenId`], without allocating for short ids.
pub enum TokenIdText {
    Inline { len: u8, bytes: [u8; 30] },
    Long(Arc<str>),
}

impl std::ops::Deref for TokenIdText {
    type Target = str;
    fn deref(&self) -> &str {
        match self {
            TokenIdText::Inline { len, bytes } => {
                // Built from a `str` or from ASCII (`tok_` + base32).
                std::str::from_utf8(&bytes[..*len as usize]).unwrap_or("")
            }
            TokenIdText::Long(s) => s,
        }
    }
}

impl TokenId {
    pub fn new(id: &str) -> TokenId {
        if let Some(rest) = id.strip_prefix("tok_") {
            if let Ok(u) = ulid::Ulid::from_string(rest) {
                let mut buf = [0u8; ulid::ULID_LEN];
                // Only the canonical spelling, so the text round-trips.
                if u.array_to_str(&mut buf) == rest {
                    return TokenId::Ulid(u.0.to_be_bytes());
                }
            }
        }
        if id.len() <= 22 {
            let mut bytes = [0u8; 22];
            bytes[..id.len()].copy_from_slice(id.as_bytes());
            TokenId::Short {
                len: id.len() as u8,
                bytes,
            }
        } else {
            TokenId::Long(id.into())
        }
    }

    pub fn text(&self) -> TokenIdText {
        match self {
            TokenId::Ulid(b) => {
                let mut bytes = [0u8; 30];
                bytes[..4].copy_from_slice(b"tok_");
                let mut buf = [0u8; ulid::ULID_LEN];
                let s = ulid::Ulid(u128::from_be_bytes(*b)).array_to_str(&mut buf);
                bytes[4..].copy_from_slice(s.as_bytes());
                TokenIdText::Inline { len: 30, bytes }
            }
            TokenId::Short { len, bytes: b } => {
                let mut bytes = [0u8; 30];
                bytes[..22].copy_from_slice(b);
                TokenIdText::Inline { len: *len, bytes }
            }
            TokenId::Long(s) => TokenIdText::Long(Arc::clone(s)),
        }
    }

    /// The id as a header value.
    pub fn header(&self) -> HeaderValue {
        HeaderValue::from_str(&self.text()).unwrap_or(HeaderValue::from_static("invalid"))
    }
}

impl std::fmt::Debug for TokenId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.text())
    }
}

impl std::fmt::Display for TokenId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.text())
    }
}

// --------------------------------------------------------------- allowlist

/// A token's allowlist. Most tokens have one entry, or an office range and
/// one host; those live inline, which saves an allocation per token and a
/// dependent cache miss per decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Allowlist {
    One(IpNet),
    V4Pair(Ipv4Net, Ipv4Net),
    Many(Arc<[IpNet]>),
}

impl Allowlist {
    #[inline]
    pub fn contains(&self, ip: &IpAddr) -> bool {
        match self {
            Allowlist::One(n) => n.contains(ip),
            Allowlist::V4Pair(a, b) => match ip {
                IpAddr::V4(v4) => a.contains(v4) || b.contains(v4),
                IpAddr::V6(_) => false,
            },
            Allowlist::Many(list) => list.iter().any(|n| n.contains(ip)),
        }
    }

    pub fn to_vec(&self) -> Vec<IpNet> {
        match self {
            Allowlist::One(n) => vec![*n],
            Allowlist::V4Pair(a, b) => vec![IpNet::V4(*a), IpNet::V4(*b)],
            Allowlist::Many(list) => list.to_vec(),
        }
    }
}

impl From<Vec<IpNet>> for Allowlist {
    fn from(v: Vec<IpNet>) -> Self {
        match v.as_slice() {
            [one] => Allowlist::One(*one),
            [IpNet::V4(a), IpNet::V4(b)] => Allowlist::V4Pair(*a, *b),
            _ => Allowlist::Many(v.into()),
        }
    }
}

// ------------------------------------------------------------------- grants

/// What the data plane knows about one token secret: an owned copy made by
/// [`TokenTable::get`], so no lock is held while a request is in flight.
#[derive(Clone, Debug)]
pub struct Grant {
    pub token_id: TokenId,
    pub tenant: TenantSnapshot,
    pub allowlist: Allowlist,
    pub products: TokenProducts,
    /// The token's expiry, or for a rotated-out secret the end of its grace.
    pub expires_at: Option<UnixTime>,
    pub disabled: bool,
}

impl Grant {
    fn of(r: &Record) -> Grant {
        Grant {
            token_id: r.token_id.clone(),
            tenant: TenantSnapshot::of(&r.tenant),
            allowlist: r.allowlist.clone(),
            products: TokenProducts::of(&r.products),
            expires_at: (r.expires_at != NO_EXPIRY).then_some(r.expires_at),
            disabled: r.disabled,
        }
    }

    #[doc(hidden)]
    pub fn for_test(
        allowlist: Vec<IpNet>,
        products: Option<Vec<&str>>,
        tenant_products: &[&str],
    ) -> Grant {
        let list = |p: &[&str]| {
            Arc::new(ProductSet::new(
                &p.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
            ))
        };
        Grant {
            token_id: TokenId::new("tok_test"),
            tenant: TenantSnapshot::of(&TenantCell::new("t", list(tenant_products), 0)),
            allowlist: allowlist.into(),
            products: TokenProducts::of(&products.map(|p| list(&p))),
            expires_at: None,
            disabled: false,
        }
    }
}

/// `expires_at` of a record that does not expire.
const NO_EXPIRY: UnixTime = UnixTime::MAX;

/// One token secret, as stored: 128 bytes, aligned so that it is one
/// 128-byte pair of cache lines, which the L2 spatial prefetcher fetches
/// together.
#[derive(Debug)]
#[repr(align(128))]
struct Record {
    hash: TokenHash,
    tenant: Arc<TenantCell>,
    products: Option<Arc<ProductSet>>,
    expires_at: UnixTime,
    /// Last time (unix seconds) this secret was let through, in memory only.
    last_used: AtomicU32,
    disabled: bool,
    /// In its shard's index. False for a revoked token's tombstone.
    indexed: bool,
    /// The token's current secret, which the id index points at (else a
    /// previous secret in its grace period).
    head: bool,
    allowlist: Allowlist,
    token_id: TokenId,
    /// Heads only.
    version: u64,
    /// Heads only: where the previous secret's record is, or `NONE`.
    prev: u32,
}

// -------------------------------------------------------------------- index

/// An open-addressing index of `(tag, value)` pairs in 8-byte words, with
/// linear probing and no tombstones (deletion shifts entries back). The tag
/// is 32 bits of the key's hash and its low bits are the home slot; callers
/// confirm a match with `eq` on the value.
#[derive(Default)]
struct Index {
    slots: Box<[u64]>,
    len: usize,
}

const EMPTY: u64 = u64::MAX;

impl Index {
    #[inline]
    fn entry(tag: u32, value: u32) -> u64 {
        (tag as u64) << 32 | value as u64
    }

    #[inline]
    fn find(&self, tag: u32, mut eq: impl FnMut(u32) -> bool) -> Option<u32> {
        if self.slots.is_empty() {
            return None;
        }
        let mask = self.slots.len() - 1;
        let mut i = tag as usize & mask;
        loop {
            let e = self.slots[i];
            if e == EMPTY {
                return None;
            }
            if (e >> 32) as u32 == tag && eq(e as u32) {
                return Some(e as u32);
            }
            i = (i + 1) & mask;
        }
    }

    fn insert(&mut self, tag: u32, value: u32) {
        if (self.len + 1) * 4 > self.slots.len() * 3 {
            let cap = (self.slots.len() * 2).max(16);
            let old = std::mem::replace(&mut self.slots, vec![EMPTY; cap].into_boxed_slice());
            for e in old.iter().filter(|e| **e != EMPTY) {
                self.place(*e);
            }
        }
        self.place(Self::entry(tag, value));
        self.len += 1;
    }

    fn place(&mut self, e: u64) {
        let mask = self.slots.len() - 1;
        let mut i = (e >> 32) as usize & mask;
        while self.slots[i] != EMPTY {
            i = (i + 1) & mask;
        }
        self.slots[i] = e;
    }

    fn position(&self, e: u64) -> Option<usize> {
        if self.slots.is_empty() {
            return None;
        }
        let mask = self.slots.len() - 1;
        let mut i = (e >> 32) as usize & mask;
        loop {
            match self.slots[i] {
                EMPTY => return None,
                x if x == e => return Some(i),
                _ => i = (i + 1) & mask,
            }
        }
    }

    /// Removes exactly `(tag, value)`; false when absent.
    fn remove(&mut self, tag: u32, value: u32) -> bool {
        let Some(mut hole) = self.position(Self::entry(tag, value)) else {
            return false;
        };
        let mask = self.slots.len() - 1;
        let mut j = hole;
        loop {
            j = (j + 1) & mask;
            let e = self.slots[j];
            if e == EMPTY {
                break;
            }
            let home = (e >> 32) as usize & mask;
            // `e` may fill the hole unless its home lies after the hole.
            if j.wrapping_sub(home) & mask >= j.wrapping_sub(hole) & mask {
                self.slots[hole] = e;
                hole = j;
            }
        }
        self.slots[hole] = EMPTY;
        self.len -= 1;
        true
    }

    /// Points `(tag, old)` at `new`.
    fn repoint(&mut self, tag: u32, old: u32, new: u32) {
        if let Some(i) = self.position(Self::entry(tag, old)) {
            self.slots[i] = Self::entry(tag, new);
        }
    }

    #[cfg(test)]
    fn values(&self) -> impl Iterator<Item = u32> + '_ {
        self.slots
            .iter()
            .filter(|e| **e != EMPTY)
            .map(|e| *e as u32)
    }
}

// ------------------------------------------------------------------- shards

const SHARD_BITS: u32 = 6;
const SHARDS: usize = 1 << SHARD_BITS;
/// Records per shard: positions stay below this, so a location (shard and
/// position in 32 bits) is never `u32::MAX` and an index word never `EMPTY`.
const MAX_POS: u32 = (1 << (32 - SHARD_BITS)) - 1;
/// No record.
const NONE: u32 = u32::MAX;

#[inline]
fn shard_of(hash: &TokenHash) -> usize {
    hash.0[12] as usize & (SHARDS - 1)
}

#[inline]
fn tag_of(hash: &TokenHash) -> u32 {
    u32::from_le_bytes([hash.0[8], hash.0[9], hash.0[10], hash.0[11]])
}

#[inline]
fn loc(shard: usize, pos: u32) -> u32 {
    (shard as u32) << (32 - SHARD_BITS) | pos
}

#[inline]
fn split(loc: u32) -> (usize, u32) {
    ((loc >> (32 - SHARD_BITS)) as usize, loc & MAX_POS)
}

/// Records in fixed chunks of 256 (32 KiB): growing never copies or leaves
/// capacity idle beyond the last chunk (a `Vec` doubling would leave up to
/// half), and a position stays put.
#[derive(Default)]
struct Records {
    chunks: Vec<Vec<Option<Record>>>,
    len: u32,
}

const CHUNK: usize = 256;

impl Records {
    #[inline]
    fn at(&self, pos: u32) -> &Option<Record> {
        &self.chunks[pos as usize / CHUNK][pos as usize % CHUNK]
    }

    #[inline]
    fn get(&self, pos: u32) -> Option<&Option<Record>> {
        self.chunks
            .get(pos as usize / CHUNK)?
            .get(pos as usize % CHUNK)
    }

    #[inline]
    fn get_mut(&mut self, pos: u32) -> Option<&mut Option<Record>> {
        self.chunks
            .get_mut(pos as usize / CHUNK)?
            .get_mut(pos as usize % CHUNK)
    }

    fn push(&mut self, r: Record) -> u32 {
        let pos = self.len;
        if (pos as usize).is_multiple_of(CHUNK) {
            self.chunks.push(Vec::with_capacity(CHUNK));
        }
        if let Some(chunk) = self.chunks.last_mut() {
            chunk.push(Some(r));
        }
        self.len += 1;
        pos
    }

    fn iter(&self) -> impl Iterator<Item = &Option<Record>> {
        self.chunks.iter().flatten()
    }
}

#[derive(Default)]
struct Shard {
    index: Index,
    records: Records,
    free: Vec<u32>,
}

impl Shard {
    #[inline]
    fn find(&self, hash: &TokenHash) -> Option<u32> {
        self.index.find(
            tag_of(hash),
            |pos| matches!(self.records.at(pos), Some(r) if r.hash == *hash),
        )
    }

    fn alloc(&mut self, r: Record) -> u32 {
        if let Some(pos) = self.free.pop() {
            if let Some(slot) = self.records.get_mut(pos) {
                *slot = Some(r);
                return pos;
            }
        }
        assert!(self.records.len < MAX_POS, "token table shard full");
        self.records.push(r)
    }

    fn release(&mut self, pos: u32) -> Option<Record> {
        let r = self.records.get_mut(pos)?.take()?;
        if r.indexed {
            self.index.remove(tag_of(&r.hash), pos);
        }
        self.free.push(pos);
        Some(r)
    }
}

/// A shard on its own cache lines, so readers of neighbouring shards do not
/// contend on one line for their lock words.
#[derive(Default)]
#[repr(align(128))]
struct Padded(RwLock<Shard>);

// ------------------------------------------------------------------ control

/// Control-plane state; one mutex serializes all writers.
#[derive(Default)]
struct Control {
    /// Token id → location of the token's head record.
    ids: Index,
    id_hasher: std::collections::hash_map::RandomState,
    tenants: HashSet<TenantKey>,
    product_sets: HashMap<Vec<String>, Arc<ProductSet>>,
}

impl Control {
    /// Distinct product lists kept before unused ones are dropped.
    const PRUNE_AT: usize = 1024;

    fn intern(&mut self, list: Vec<String>) -> Arc<ProductSet> {
        if let Some(shared) = self.product_sets.get(&list) {
            return Arc::clone(shared);
        }
        if self.product_sets.len() >= Self::PRUNE_AT {
            self.product_sets
                .retain(|_, shared| Arc::strong_count(shared) > 1);
        }
        let shared = Arc::new(ProductSet::new(&list));
        self.product_sets.insert(list, Arc::clone(&shared));
        shared
    }

    fn id_tag(&self, id: &TokenId) -> u32 {
        self.id_hasher.hash_one(id) as u32
    }
}

/// Shared handle to the table; cheap to clone.
#[derive(Clone, Default)]
pub struct TokenTable {
    inner: Arc<Inner>,
}

struct Inner {
    shards: Box<[Padded]>,
    ctl: Mutex<Control>,
}

impl Default for Inner {
    fn default() -> Self {
        Inner {
            shards: (0..SHARDS).map(|_| Padded::default()).collect(),
            ctl: Mutex::default(),
        }
    }
}

impl TokenTable {
    pub fn new() -> Self {
        Self::default()
    }

    /// The grant for a token hash, if any. The hot-path read.
    #[inline]
    pub fn get(&self, hash: &TokenHash) -> Option<Grant> {
        let shard = self.inner.shards[shard_of(hash)]
            .0
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        let pos = shard.find(hash)?;
        shard.records.at(pos).as_ref().map(Grant::of)
    }

    /// Records a use of this secret; writes at most once a second so hot
    /// tokens do not bounce a cache line between cores.
    #[inline]
    pub fn touch(&self, hash: &TokenHash, now: UnixTime) {
        let now = now.clamp(0, u32::MAX as UnixTime) as u32;
        let shard = self.inner.shards[shard_of(hash)]
            .0
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(r) = shard.find(hash).and_then(|p| shard.records.at(p).as_ref()) {
            if r.last_used.load(Ordering::Relaxed) < now {
                r.last_used.store(now, Ordering::Relaxed);
            }
        }
    }

    /// Number of tokens that are not revoked.
    pub fn live_tokens(&self) -> usize {
        self.count_heads(|_| true)
    }

    /// Number of tokens whose status is `active` at `now`: not revoked,
    /// disabled or expired (the `tollgate_tokens` gauge). Walks the table:
    /// about 10 ms at 1M tokens, paid by a metrics scrape, not a request.
    pub fn active_tokens(&self, now: UnixTime) -> usize {
        self.count_heads(|r| !r.disabled && r.expires_at > now)
    }

    fn count_heads(&self, keep: impl Fn(&Record) -> bool) -> usize {
        self.inner
            .shards
            .iter()
            .map(|s| {
                let s = s.0.read().unwrap_or_else(PoisonError::into_inner);
                s.records
                    .iter()
                    .flatten()
                    .filter(|r| r.head && r.indexed && keep(r))
                    .count()
            })
            .sum()
    }

    /// A tenant's products, as the table has them now.
    pub fn tenant_products(&self, id: &str) -> Option<Arc<ProductSet>> {
        self.ctl().tenants.get(id).map(|k| k.0.products())
    }

    /// Number of known tenants (the `tollgate_tenants` gauge).
    pub fn tenants(&self) -> usize {
        self.ctl().tenants.len()
    }

    /// In-memory last use of a token (max over its secrets), if used since
    /// this process started.
    pub fn last_used(&self, token_id: &str) -> Option<UnixTime> {
        let ctl = self.ctl();
        let head = self.find_head(&ctl, &TokenId::new(token_id))?;
        let (used, prev) = self.read(head, |r| {
            let used = r.indexed.then(|| r.last_used.load(Ordering::Relaxed));
            (used, r.prev)
        })?;
        let prev = (prev != NONE)
            .then(|| self.read(prev, |r| r.last_used.load(Ordering::Relaxed)))
            .flatten();
        used.into_iter()
            .chain(prev)
            .filter(|t| *t > 0)
            .max()
            .map(UnixTime::from)
    }

    /// Applies one change. The single write path into the table.
    pub fn apply(&self, change: Change) {
        let mut ctl = self.ctl();
        match change {
            Change::TenantUpserted(t) => self.upsert_tenant(&mut ctl, t),
            Change::TenantRemoved(id) => self.remove_tenant(&mut ctl, &id),
            Change::TokenUpserted(t) => self.upsert_token(&mut ctl, t),
            Change::TokenRemoved(id) => self.remove_token(&mut ctl, &TokenId::new(&id)),
        }
    }

    /// Replaces the whole content with a full snapshot from the store.
    /// Records newer than the snapshot (applied meanwhile) are kept.
    pub fn replace_all(&self, tenants: Vec<Tenant>, tokens: Vec<Token>) {
        let tenant_ids: HashSet<String> = tenants.iter().map(|t| t.id.clone()).collect();
        let token_ids: HashSet<String> = tokens.iter().map(|t| t.id.clone()).collect();
        for t in tenants {
            self.apply(Change::TenantUpserted(t));
        }
        for t in tokens {
            self.apply(Change::TokenUpserted(t));
        }
        self.retain_only(&tenant_ids, &token_ids);
    }

    /// Removes every token and tenant whose id is not in these sets. With
    /// [`TokenTable::apply`] for each record, this is [`TokenTable::replace_all`]
    /// in batches: a store that streams a full resync upserts as it reads and
    /// calls this with every id it saw, never holding the whole snapshot.
    pub fn retain_only(&self, tenant_ids: &HashSet<String>, token_ids: &HashSet<String>) {
        let mut ctl = self.ctl();
        let mut stale = Vec::new();
        for s in self.inner.shards.iter() {
            let s = s.0.read().unwrap_or_else(PoisonError::into_inner);
            stale.extend(
                s.records
                    .iter()
                    .flatten()
                    .filter(|r| r.head && !token_ids.contains(&*r.token_id.text()))
                    .map(|r| r.token_id.clone()),
            );
        }
        for id in stale {
            self.remove_token(&mut ctl, &id);
            // Forget it entirely, tombstone included.
            if let Some(head) = self.find_head(&ctl, &id) {
                let tag = ctl.id_tag(&id);
                ctl.ids.remove(tag, head);
                self.release(head);
            }
        }
        let stale_tenants: Vec<Box<str>> = ctl
            .tenants
            .iter()
            .filter(|k| !tenant_ids.contains(k.0.id()))
            .map(|k| k.0.id().into())
            .collect();
        for id in stale_tenants {
            self.remove_tenant(&mut ctl, &id);
        }
    }

    fn ctl(&self) -> MutexGuard<'_, Control> {
        self.inner
            .ctl
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn read<R>(&self, loc: u32, f: impl FnOnce(&Record) -> R) -> Option<R> {
        let (shard, pos) = split(loc);
        let s = self.inner.shards[shard]
            .0
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        s.records.get(pos)?.as_ref().map(f)
    }

    fn write<R>(&self, loc: u32, f: impl FnOnce(&mut Record) -> R) -> Option<R> {
        let (shard, pos) = split(loc);
        let mut s = self.inner.shards[shard]
            .0
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        s.records.get_mut(pos)?.as_mut().map(f)
    }

    /// Frees a record (and its index entry).
    fn release(&self, loc: u32) {
        let (shard, pos) = split(loc);
        let r = self.inner.shards[shard]
            .0
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .release(pos);
        // Dropped outside the lock.
        drop(r);
    }

    /// Takes a record out of its shard's index: lookups no longer find it.
    fn unindex(&self, loc: u32) {
        let (shard, pos) = split(loc);
        let mut s = self.inner.shards[shard]
            .0
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        let Shard { index, records, .. } = &mut *s;
        if let Some(Some(r)) = records.get_mut(pos) {
            if r.indexed {
                index.remove(tag_of(&r.hash), pos);
                r.indexed = false;
            }
        }
    }

    /// Stores a secret's record: in place when its hash is already indexed
    /// (readers see the old or the new record, never none), else new. Keeps
    /// the last use. Returns its location.
    fn put(&self, r: Record) -> u32 {
        let shard = shard_of(&r.hash);
        let mut s = self.inner.shards[shard]
            .0
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        // A tombstone is never indexed, so never replaces a live secret.
        if let Some(pos) = s.find(&r.hash).filter(|_| r.indexed) {
            if let Some(slot) = s.records.get_mut(pos).and_then(Option::as_mut) {
                r.last_used
                    .store(slot.last_used.load(Ordering::Relaxed), Ordering::Relaxed);
                let old = std::mem::replace(slot, r);
                drop(s);
                drop(old);
                return loc(shard, pos);
            }
        }
        let hash = r.hash;
        let indexed = r.indexed;
        let pos = s.alloc(r);
        if indexed {
            s.index.insert(tag_of(&hash), pos);
        }
        loc(shard, pos)
    }

    fn find_head(&self, ctl: &Control, id: &TokenId) -> Option<u32> {
        ctl.ids.find(ctl.id_tag(id), |l| {
            self.read(l, |r| r.head && r.token_id == *id)
                .unwrap_or(false)
        })
    }

    fn tenant_cell(&self, ctl: &mut Control, id: &str) -> Arc<TenantCell> {
        if let Some(k) = ctl.tenants.get(id) {
            return Arc::clone(&k.0);
        }
        // A token seen before its tenant: a placeholder with no products,
        // filled in when the tenant arrives.
        let cell = Arc::new(TenantCell::new(id, ctl.intern(Vec::new()), 0));
        ctl.tenants.insert(TenantKey(Arc::clone(&cell)));
        cell
    }

    fn upsert_tenant(&self, ctl: &mut Control, t: Tenant) {
        if let Some(k) = ctl.tenants.get(t.id.as_str()) {
            let cell = Arc::clone(&k.0);
            if cell.version.load(Ordering::Relaxed) > t.version {
                return;
            }
            cell.set_products(ctl.intern(t.products));
            cell.version.store(t.version, Ordering::Relaxed);
        } else {
            let products = ctl.intern(t.products);
            let cell = TenantCell::new(&t.id, products, t.version);
            ctl.tenants.insert(TenantKey(Arc::new(cell)));
        }
    }

    fn remove_tenant(&self, ctl: &mut Control, id: &str) {
        if let Some(k) = ctl.tenants.take(id) {
            // Grants still held by in-flight requests now see no products.
            k.0.set_products(ctl.intern(Vec::new()));
        }
        let mut ids = Vec::new();
        for s in self.inner.shards.iter() {
            let s = s.0.read().unwrap_or_else(PoisonError::into_inner);
            ids.extend(
                s.records
                    .iter()
                    .flatten()
                    .filter(|r| r.head && r.tenant.id() == id)
                    .map(|r| r.token_id.clone()),
            );
        }
        for token_id in ids {
            self.remove_token(ctl, &token_id);
        }
    }

    /// Drops a token's secrets; its head stays as a tombstone so that no
    /// later replay of an older version revives it.
    fn remove_token(&self, ctl: &mut Control, id: &TokenId) {
        let Some(head) = self.find_head(ctl, id) else {
            return;
        };
        let prev = self.write(head, |r| std::mem::replace(&mut r.prev, NONE));
        if let Some(prev) = prev.filter(|p| *p != NONE) {
            self.release(prev);
        }
        self.unindex(head);
        self.write(head, |r| r.version = u64::MAX);
    }

    fn upsert_token(&self, ctl: &mut Control, t: Token) {
        let id = TokenId::new(&t.id);
        let head = self.find_head(ctl, &id);
        let mut old: Vec<u32> = Vec::with_capacity(2);
        if let Some(head) = head {
            let Some((version, indexed, prev)) =
                self.read(head, |r| (r.version, r.indexed, r.prev))
            else {
                return;
            };
            if version > t.version || (version == u64::MAX && t.version != u64::MAX) {
                return;
            }
            if indexed {
                old.push(head);
            }
            if prev != NONE {
                old.push(prev);
            }
        }
        let tenant = self.tenant_cell(ctl, &t.tenant);
        let products = t.products.clone().map(|p| ctl.intern(p));
        let allowlist = Allowlist::from(t.ip_allowlist.clone());
        let make = |hash: TokenHash, expires_at: Option<UnixTime>, indexed: bool| Record {
            hash,
            tenant: Arc::clone(&tenant),
            products: products.clone(),
            expires_at: expires_at.unwrap_or(NO_EXPIRY),
            last_used: AtomicU32::new(0),
            disabled: t.disabled,
            indexed,
            head: false,
            allowlist: allowlist.clone(),
            token_id: id.clone(),
            version: 0,
            prev: NONE,
        };

        let (new_head, new_prev) = if t.revoked_at.is_some() {
            // A tombstone: the head record, out of the index.
            let at = match head {
                Some(h) => h,
                None => self.put(make(t.hash, t.expires_at, false)),
            };
            (at, NONE)
        } else {
            let prev = t.previous.as_ref().filter(|p| p.hash != t.hash).map(|p| {
                let until = t.expires_at.map_or(p.until, |e| e.min(p.until));
                self.put(make(p.hash, Some(until), true))
            });
            let cur = self.put(make(t.hash, t.expires_at, true));
            (cur, prev.unwrap_or(NONE))
        };
        // Secrets the token no longer has.
        for &l in &old {
            if l != new_head && l != new_prev {
                self.release(l);
            } else if l == new_head && t.revoked_at.is_some() {
                self.unindex(l);
            }
        }
        if let Some(p) = head.filter(|h| *h != new_head && *h != new_prev) {
            // A tombstone head that was not among the secrets.
            if !old.contains(&p) {
                self.release(p);
            }
        }
        self.write(new_head, |r| {
            r.head = true;
            r.version = t.version;
            r.prev = new_prev;
        });
        if new_prev != NONE {
            self.write(new_prev, |r| r.head = false);
        }
        let tag = ctl.id_tag(&id);
        match head {
            Some(h) if h != new_head => ctl.ids.repoint(tag, h, new_head),
            Some(_) => {}
            None => ctl.ids.insert(tag, new_head),
        }
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
    fn active_tokens_leave_out_disabled_and_expired_ones() {
        let t = TokenTable::new();
        t.apply(Change::TenantUpserted(tenant("acme", &["crm"], 1)));
        t.apply(Change::TokenUpserted(token("tok_1", "s1", 1)));
        let mut disabled = token("tok_2", "s2", 1);
        disabled.disabled = true;
        t.apply(Change::TokenUpserted(disabled));
        let mut expiring = token("tok_3", "s3", 1);
        expiring.expires_at = Some(100);
        t.apply(Change::TokenUpserted(expiring));
        assert_eq!(t.live_tokens(), 3);
        assert_eq!(t.active_tokens(99), 2);
        assert_eq!(t.active_tokens(100), 1);
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
    fn tenant_product_change_reaches_its_tokens() {
        let t = TokenTable::new();
        let crm = Product::new("crm");
        t.apply(Change::TokenUpserted(token("tok_1", "s1", 1)));
        let g = || t.get(&TokenHash::of("s1")).unwrap();
        assert!(!g().tenant.has(&crm));
        assert!(t.tenant_products("acme").unwrap().is_empty());
        t.apply(Change::TenantUpserted(tenant("acme", &["crm"], 1)));
        assert!(g().tenant.has(&crm));
        assert_eq!(&*t.tenant_products("acme").unwrap().names()[0], "crm");
        // Older tenant versions are ignored.
        t.apply(Change::TenantUpserted(tenant("acme", &[], 0)));
        assert!(g().tenant.has(&crm));
        t.apply(Change::TenantUpserted(tenant("acme", &["messaging"], 2)));
        assert!(!g().tenant.has(&crm));
        assert!(g().tenant.has(&Product::new("messaging")));
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
        let products = |id: &str| t.tenant_products(id).unwrap();
        assert!(Arc::ptr_eq(&products("acme"), &products("other")));
        assert!(matches!(
            (&a.products, &b.products),
            (TokenProducts::Mask(x), TokenProducts::Mask(y)) if x == y
        ));
        {
            let ctl = t.ctl();
            assert_eq!(ctl.product_sets.len(), 2, "equal lists share one set");
        }
        assert_eq!(&*a.token_id.text(), "tok_1");
        // A product change of one tenant leaves the other's list alone.
        t.apply(Change::TenantUpserted(tenant("acme", &["crm"], 2)));
        assert_eq!(products("acme").names().len(), 1);
        assert_eq!(products("other").names().len(), 2);
        assert_eq!((a.tenant.id(), b.tenant.id()), ("acme", "other"));
    }

    #[test]
    fn tenant_removal_removes_its_tokens() {
        let t = TokenTable::new();
        t.apply(Change::TenantUpserted(tenant("acme", &["crm"], 1)));
        t.apply(Change::TokenUpserted(token("tok_1", "s1", 1)));
        t.apply(Change::TenantRemoved("acme".into()));
        assert!(t.get(&TokenHash::of("s1")).is_none());
        assert!(t.tenant_products("acme").is_none());
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
        t.touch(&TokenHash::of("s1"), 42);
        t.apply(Change::TokenUpserted(token("tok_1", "s1", 2)));
        assert_eq!(t.last_used("tok_1"), Some(42));
    }

    #[test]
    fn records_and_grants_stay_small() {
        assert!(std::mem::size_of::<Record>() <= 128);
        assert!(std::mem::size_of::<Option<Record>>() <= 128);
        assert_eq!(std::mem::size_of::<Allowlist>(), 24);
        assert_eq!(std::mem::size_of::<TokenId>(), 24);
        assert_eq!(std::mem::size_of::<CompactStr>(), 24);
        let long = "a-tenant-id-longer-than-22-bytes";
        assert_eq!(CompactStr::new(long).as_str(), long);
        assert_eq!(CompactStr::new("acme").as_str(), "acme");
    }

    #[test]
    fn index_finds_what_was_inserted_and_not_what_was_removed() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let mut idx = Index::default();
        let mut model: HashSet<(u32, u32)> = HashSet::new();
        for step in 0..20_000u32 {
            // Few tags so probes collide and wrap a lot.
            let tag = rng.gen_range(0..64u32) * 0x0101_0101;
            if rng.gen_bool(0.6) || model.is_empty() {
                if model.insert((tag, step)) {
                    idx.insert(tag, step);
                }
            } else {
                let &(t, v) = model.iter().next().unwrap();
                model.remove(&(t, v));
                assert!(idx.remove(t, v));
                assert!(!idx.remove(t, v));
            }
            if step % 997 == 0 {
                for &(t, v) in &model {
                    assert_eq!(idx.find(t, |x| x == v), Some(v));
                }
                assert_eq!(idx.len, model.len());
                assert_eq!(idx.values().count(), model.len());
            }
        }
        assert_eq!(idx.find(12345, |_| true), None);
    }

    #[test]
    fn token_ids_round_trip() {
        for id in [
            "tok_01JDQ3YJ9ZK8V6B5X4W3T2S1R0",
            "tok_1",
            "tok_01jdq3yj9zk8v6b5x4w3t2s1r0",
            "a-rather-long-imported-token-identifier-42",
            "",
        ] {
            let t = TokenId::new(id);
            assert_eq!(&*t.text(), id);
            assert_eq!(t.header().to_str().unwrap(), id);
            assert_eq!(t, TokenId::new(id));
        }
        assert!(matches!(
            TokenId::new(&crate::model::new_token_id()),
            TokenId::Ulid(_)
        ));
        // A lower-case ULID is another id than its upper-case spelling.
        assert_ne!(
            TokenId::new("tok_01JDQ3YJ9ZK8V6B5X4W3T2S1R0"),
            TokenId::new("tok_01jdq3yj9zk8v6b5x4w3t2s1r0")
        );
    }

    #[test]
    fn allowlist_forms_match_the_list_they_came_from() {
        let nets = |l: &[&str]| -> Vec<IpNet> {
            l.iter()
                .map(|s| crate::model::parse_allowlist_entry(s).unwrap())
                .collect()
        };
        let cases: [&[&str]; 5] = [
            &["10.0.0.0/24"],
            &["10.0.0.0/24", "127.0.0.1"],
            &["2001:db8::/32"],
            &["10.0.0.0/24", "2001:db8::/32"],
            &[],
        ];
        let ips = ["10.0.0.9", "10.0.1.1", "127.0.0.1", "2001:db8::1", "::1"];
        for c in cases {
            let list = nets(c);
            let a = Allowlist::from(list.clone());
            assert_eq!(a.to_vec(), list);
            for ip in ips {
                let ip: IpAddr = ip.parse().unwrap();
                assert_eq!(
                    a.contains(&ip),
                    list.iter().any(|n| n.contains(&ip)),
                    "{c:?} {ip}"
                );
            }
        }
    }

    #[test]
    fn products_past_the_bits_still_match_by_name() {
        // Fill the process-wide bits; every name after that overflows.
        let many: Vec<String> = (0..70).map(|i| format!("p{i:02}-overflow-test")).collect();
        let set = ProductSet::new(&many);
        for name in &many {
            assert!(set.contains(&Product::new(name)), "{name}");
        }
        assert!(!set.contains(&Product::new("not-there-overflow-test")));
        let t = TokenTable::new();
        let mut ten = tenant("acme", &[], 1);
        ten.products = many.clone();
        t.apply(Change::TenantUpserted(ten));
        let mut tok = token("tok_1", "s1", 1);
        tok.products = Some(vec![many[69].clone(), "crm".into()]);
        t.apply(Change::TokenUpserted(tok));
        let g = t.get(&TokenHash::of("s1")).unwrap();
        let last = Product::new(&many[69]);
        assert!(g.tenant.has(&last) && g.products.contains(&last));
        assert!(!g.products.contains(&Product::new(&many[68])));
        assert!(!g.tenant.has(&Product::new("crm")) && g.products.contains(&Product::new("crm")));
    }

    #[test]
    fn rotations_revocations_and_removals_keep_the_index_consistent() {
        let t = TokenTable::new();
        let mut v = 0;
        let mut up = |secret: &str, prev: Option<&str>, revoked: bool| {
            v += 1;
            let mut tok = token("tok_r", secret, v);
            tok.previous = prev.map(|p| PreviousSecret {
                hash: TokenHash::of(p),
                until: 100,
            });
            tok.revoked_at = revoked.then_some(1);
            t.apply(Change::TokenUpserted(tok));
        };
        up("a", None, false);
        up("b", Some("a"), false);
        up("c", Some("b"), false);
        up("a", None, false);
        let live = |s: &str| t.get(&TokenHash::of(s)).is_some();
        assert!(live("a") && !live("b") && !live("c"));
        assert_eq!(t.live_tokens(), 1);
        up("d", Some("a"), true);
        assert!(!live("a") && !live("d"));
        assert_eq!(t.live_tokens(), 0);
        up("e", Some("d"), false);
        assert!(live("e") && live("d") && !live("a"));
        t.touch(&TokenHash::of("d"), 7);
        assert_eq!(t.last_used("tok_r"), Some(7));
        t.apply(Change::TokenRemoved("tok_r".into()));
        assert!(!live("e") && !live("d"));
        // Removed is final, whatever the version.
        up("f", None, false);
        assert!(!live("f"));
        // Many tokens in one table, then all gone.
        let ids: Vec<String> = (0..3000).map(|i| format!("tok_m{i}")).collect();
        for (i, id) in ids.iter().enumerate() {
            t.apply(Change::TokenUpserted(token(id, &format!("m{i}"), 1)));
        }
        assert_eq!(t.live_tokens(), 3000);
        for (i, id) in ids.iter().enumerate().filter(|(i, _)| i % 2 == 0) {
            let mut r = token(id, &format!("m{i}x"), 2);
            r.previous = Some(PreviousSecret {
                hash: TokenHash::of(&format!("m{i}")),
                until: 100,
            });
            t.apply(Change::TokenUpserted(r));
        }
        for i in 0..3000 {
            assert!(t.get(&TokenHash::of(&format!("m{i}"))).is_some());
            assert_eq!(
                t.get(&TokenHash::of(&format!("m{i}x"))).is_some(),
                i % 2 == 0
            );
        }
        t.replace_all(vec![], vec![]);
        assert_eq!(t.live_tokens(), 0);
        assert!(t.get(&TokenHash::of("m1")).is_none() && t.get(&TokenHash::of("m0x")).is_none());
        assert_eq!(t.ctl().ids.len, 0);
        let records: usize = t
            .inner
            .shards
            .iter()
            .map(|s| s.0.read().unwrap().records.iter().flatten().count())
            .sum();
        assert_eq!(records, 0);
    }
}
