//! The Redis store: one source of truth shared by several gateway instances.
//!
//! # Keys (all under `store.key_prefix`, `P` below)
//!
//! | key | type | what |
//! | --- | --- | --- |
//! | `P tenant:{<id>}` | hash | field `tenant` = tenant JSON, `rev` = version of the last write to this hash, `tok:<token id>` = token JSON |
//! | `P token-tenant` | hash | token id → tenant id (for `GET /v1/tokens/{id}`) |
//! | `P version` | string | the store-wide version counter (`INCR`) |
//! | `P changes` | stream | the change feed: `k` (`tenant`/`token`), `id`, `t` (tenant), `v` |
//! | `P audit` | list | audit events, newest first, capped |
//!
//! A tenant and all its tokens live in one hash, so the hash tag `{<id>}`
//! keeps everything a quota decision reads in one key (one Cluster slot).
//! Records are the same JSON as the embedded store's; tokens carry only the
//! blake3 hash of their secret, never the secret.
//!
//! # Writes
//!
//! Every write is an optimistic compare-and-set: read the tenant's hash
//! (tenant, tokens and `rev`) in one `HGETALL`, run the shared rule
//! ([`check_token_change`]) in Rust, then commit with a Lua script that
//! writes only if `rev` is unchanged; otherwise read again and retry. The
//! script is atomic in Redis, so the quota holds across any number of
//! instances. The same script `INCR`s the version counter, stamps it into
//! the record, and `XADD`s a change event, so a write and its event are never
//! separated.
//!
//! Each script also carries a deadline (server clock): a command that reaches
//! a paused Redis after the caller has been answered 503 is refused when
//! Redis resumes instead of applying a change the caller believes failed.
//!
//! # Following changes
//!
//! [`Store::spawn_sync`] loads everything (`SCAN` + pipelined `HGETALL`,
//! each batch applied to the table as it arrives, so the whole store is
//! never held twice in memory), remembering the stream position taken
//! *before* the scan, then reads the
//! stream with `XREAD BLOCK` on its own connection. For each event it
//! re-reads the record and applies it; the table ignores older versions, so
//! replays and duplicates are harmless. After a dropped connection it
//! resumes from the stored position if the stream still holds it, and
//! reloads everything if entries after it were trimmed (or Redis lost its
//! data). A full reconciliation runs periodically as a safety net, beside the
//! feed, and rewinds the feed to its start position so nothing applied in
//! between is lost.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, Value};
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::{
    check_token_change, AuditEvent, Record, Snapshot, Store, StoreError, SyncStatus, TenantEdit,
    TokenEdit,
};
use crate::model::{Tenant, Token, UnixTime};
use crate::table::{Change, TokenTable};

/// Longest any single Redis command may take before the store reports
/// `Unavailable` (a paused Redis must not hang admin calls).
const COMMAND_TIMEOUT: Duration = Duration::from_secs(2);
/// A write script that starts later than this after it was sent refuses to
/// run: the caller has (nearly) given up on it.
const WRITE_DEADLINE: Duration = Duration::from_millis(1500);
/// How long one `XREAD` waits for new events.
const FEED_BLOCK: Duration = Duration::from_millis(500);
/// Events read per `XREAD`.
const FEED_BATCH: usize = 1000;
/// Approximate length the change stream is trimmed to.
const FEED_MAXLEN: usize = 100_000;
/// Full reconciliation interval (at least; stretched for large stores).
const RECONCILE_EVERY: Duration = Duration::from_secs(30);
/// Reconnect backoff bounds for the follower.
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(1);
/// Keys per `SCAN` step (and per `HGETALL` pipeline) when loading.
const SCAN_BATCH: usize = 1000;
/// `HGETALL` pipelines in flight at once while loading.
const LOAD_DEPTH: usize = 3;
/// Optimistic write attempts before giving up under contention.
const MAX_ATTEMPTS: usize = 200;
/// Audit events kept.
const AUDIT_KEEP: usize = 100_000;

/// Writes one record (tenant or token) if the tenant hash is as expected.
///
/// KEYS: 1 tenant hash, 2 version counter, 3 token index, 4 change stream.
/// ARGV: 1 expectation (`-` absent, `+` present, `*` anything, else the
/// `rev` read), 2 deadline in server ms (0: none), 3 field, 4 record JSON
/// without its version and opening brace, 5 token id for the index (empty:
/// none), 6 tenant id, 7 event kind, 8 event id, 9 minimum version, 10 stream
/// max length.
///
/// Returns the new version, -1 if the expectation failed, -2 if late.
const COMMIT: &str = r#"
if ARGV[2] ~= '0' then
  local t = redis.call('TIME')
  if tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) > tonumber(ARGV[2]) then
    return -2
  end
end
local rev = redis.call('HGET', KEYS[1], 'rev')
local want = ARGV[1]
if want == '-' then
  if rev then return -1 end
elseif want == '+' then
  if not rev then return -1 end
elseif want ~= '*' then
  if rev ~= want then return -1 end
end
local v = redis.call('INCR', KEYS[2])
local floor = tonumber(ARGV[9])
if floor > v then
  redis.call('SET', KEYS[2], ARGV[9])
  v = floor
end
local vs = string.format('%d', v)
redis.call('HSET', KEYS[1], 'rev', vs, ARGV[3], '{"version":' .. vs .. ',' .. ARGV[4])
if ARGV[5] ~= '' then
  redis.call('HSET', KEYS[3], ARGV[5], ARGV[6])
end
redis.call('XADD', KEYS[4], 'MAXLEN', '~', ARGV[10], '*', 'k', ARGV[7], 'id', ARGV[8], 't', ARGV[6], 'v', vs)
return v
"#;

/// Deletes a tenant hash and its index entries.
///
/// KEYS: as [`COMMIT`]. ARGV: 1 deadline, 2 tenant id, 3 stream max length.
/// Returns `{'ok', token ids…}`, `{'gone'}` or `{'late'}`.
const DELETE_TENANT: &str = r#"
if ARGV[1] ~= '0' then
  local t = redis.call('TIME')
  if tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) > tonumber(ARGV[1]) then
    return {'late'}
  end
end
if redis.call('EXISTS', KEYS[1]) == 0 then return {'gone'} end
local out = {'ok'}
for _, f in ipairs(redis.call('HKEYS', KEYS[1])) do
  if string.sub(f, 1, 4) == 'tok:' then
    local id = string.sub(f, 5)
    out[#out + 1] = id
    redis.call('HDEL', KEYS[3], id)
  end
end
redis.call('DEL', KEYS[1])
local vs = string.format('%d', redis.call('INCR', KEYS[2]))
redis.call('XADD', KEYS[4], 'MAXLEN', '~', ARGV[3], '*', 'k', 'tenant', 'id', ARGV[2], 't', ARGV[2], 'v', vs)
return out
"#;

/// The store-wide key names.
#[derive(Clone, Debug)]
struct Keys {
    prefix: String,
}

impl Keys {
    fn tenant(&self, id: &str) -> String {
        format!("{}tenant:{{{id}}}", self.prefix)
    }
    /// `SCAN MATCH` pattern for every tenant hash (the prefix glob-escaped).
    fn tenant_pattern(&self) -> String {
        let mut p = String::with_capacity(self.prefix.len() + 10);
        for c in self.prefix.chars() {
            if matches!(c, '*' | '?' | '[' | ']' | '\\') {
                p.push('\\');
            }
            p.push(c);
        }
        p.push_str("tenant:{*");
        p
    }
    fn index(&self) -> String {
        format!("{}token-tenant", self.prefix)
    }
    fn version(&self) -> String {
        format!("{}version", self.prefix)
    }
    fn changes(&self) -> String {
        format!("{}changes", self.prefix)
    }
    fn audit(&self) -> String {
        format!("{}audit", self.prefix)
    }
}

const TENANT_FIELD: &str = "tenant";
const REV_FIELD: &str = "rev";
const TOKEN_FIELD: &str = "tok:";

fn token_field(id: &str) -> String {
    format!("{TOKEN_FIELD}{id}")
}

/// What a write expects of the tenant hash.
#[derive(Clone, Debug)]
enum Expect {
    /// The tenant must not exist (create).
    Absent,
    /// The tenant must exist (token import).
    Present,
    /// Whatever is there (tenant import).
    Any,
    /// Nothing changed since this `rev` was read (optimistic write).
    Rev(String),
}

impl Expect {
    fn arg(&self) -> &str {
        match self {
            Expect::Absent => "-",
            Expect::Present => "+",
            Expect::Any => "*",
            Expect::Rev(r) => r,
        }
    }
}

/// One tenant hash as read.
struct TenantHash {
    tenant: Tenant,
    rev: String,
    tokens: Vec<Token>,
}

/// The command connection: one multiplexed connection shared by every
/// admin call, replaced after any connection-level failure (and whenever
/// the follower reconnects), so a restarted or resumed Redis is used again
/// by the very next call.
struct Shared {
    client: redis::Client,
    current: tokio::sync::Mutex<Option<(MultiplexedConnection, u64)>>,
    /// Bumped to retire the current connection.
    epoch: AtomicU64,
}

impl Shared {
    fn config(response: Duration) -> AsyncConnectionConfig {
        AsyncConnectionConfig::new()
            .set_connection_timeout(Some(COMMAND_TIMEOUT))
            .set_response_timeout(Some(response))
    }

    async fn get(&self) -> Result<MultiplexedConnection, StoreError> {
        let mut cur = self.current.lock().await;
        let epoch = self.epoch.load(Ordering::Acquire);
        if let Some((c, e)) = &*cur {
            if *e == epoch {
                return Ok(c.clone());
            }
        }
        *cur = None;
        let c = self.connect(COMMAND_TIMEOUT).await?;
        *cur = Some((c.clone(), epoch));
        Ok(c)
    }

    async fn connect(&self, response: Duration) -> Result<MultiplexedConnection, StoreError> {
        let cfg = Self::config(response);
        match tokio::time::timeout(
            COMMAND_TIMEOUT + Duration::from_millis(250),
            self.client
                .get_multiplexed_async_connection_with_config(&cfg),
        )
        .await
        {
            Ok(Ok(c)) => Ok(c),
            Ok(Err(e)) => Err(unavailable(format!("redis: {e}"))),
            Err(_) => Err(unavailable("redis did not accept a connection in time")),
        }
    }

    fn retire(&self) {
        self.epoch.fetch_add(1, Ordering::AcqRel);
    }
}

/// Handle to a Redis store; cheap to share (`Arc`).
pub struct RedisStore {
    shared: Shared,
    keys: Keys,
    commit: redis::Script,
    delete_tenant: redis::Script,
    /// Server clock minus local clock (ms), for write deadlines.
    clock_offset_ms: AtomicI64,
    clock_known: AtomicBool,
}

fn unavailable(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt(e.to_string()))
}

/// The record's JSON without `version` and without its opening brace; the
/// commit script prepends `{"version":N,`.
fn body_without_version<T: Serialize>(record: &T) -> Result<String, StoreError> {
    let mut v = serde_json::to_value(record).map_err(|e| StoreError::Corrupt(e.to_string()))?;
    let obj = v
        .as_object_mut()
        .ok_or_else(|| StoreError::Corrupt("record is not a JSON object".into()))?;
    obj.remove("version");
    if obj.is_empty() {
        return Err(StoreError::Corrupt("record has no fields".into()));
    }
    let s = v.to_string();
    Ok(s[1..].to_string())
}

fn local_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Runs one Redis call with the command timeout; every failure (timeout,
/// connection, server error) becomes `Unavailable`.
async fn call<T>(
    fut: impl std::future::Future<Output = redis::RedisResult<T>>,
) -> Result<T, StoreError> {
    match tokio::time::timeout(COMMAND_TIMEOUT + Duration::from_millis(250), fut).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(unavailable(format!("redis: {e}"))),
        Err(_) => Err(unavailable("redis did not answer in time")),
    }
}

fn bytes_of(v: &Value) -> Option<&[u8]> {
    match v {
        Value::BulkString(b) => Some(b),
        Value::SimpleString(s) => Some(s.as_bytes()),
        Value::VerbatimString { text, .. } => Some(text.as_bytes()),
        _ => None,
    }
}

fn string_of(v: &Value) -> Option<String> {
    bytes_of(v).map(|b| String::from_utf8_lossy(b).into_owned())
}

/// Field/value pairs of a hash reply (RESP2 flat array or RESP3 map).
fn hash_pairs(v: Value) -> Vec<(Value, Value)> {
    match v {
        Value::Map(m) => m,
        Value::Array(a) => {
            let mut out = Vec::with_capacity(a.len() / 2);
            let mut it = a.into_iter();
            while let (Some(k), Some(v)) = (it.next(), it.next()) {
                out.push((k, v));
            }
            out
        }
        _ => Vec::new(),
    }
}

/// Parses an `HGETALL` of a tenant hash; `None` if the key is absent.
fn parse_tenant_hash(v: Value) -> Result<Option<TenantHash>, StoreError> {
    let mut tenant = None;
    let mut rev = String::new();
    let mut tokens = Vec::new();
    for (k, v) in hash_pairs(v) {
        let (Some(k), Some(bytes)) = (bytes_of(&k), bytes_of(&v)) else {
            continue;
        };
        if k == TENANT_FIELD.as_bytes() {
            tenant = Some(decode::<Tenant>(bytes)?);
        } else if k == REV_FIELD.as_bytes() {
            rev = String::from_utf8_lossy(bytes).into_owned();
        } else if k.starts_with(TOKEN_FIELD.as_bytes()) {
            tokens.push(decode::<Token>(bytes)?);
        }
    }
    match tenant {
        Some(tenant) => {
            tokens.sort_by(|a, b| a.id.cmp(&b.id));
            Ok(Some(TenantHash {
                tenant,
                rev,
                tokens,
            }))
        }
        None if tokens.is_empty() => Ok(None),
        None => Err(StoreError::Corrupt(
            "tokens stored without their tenant".into(),
        )),
    }
}

/// A stream entry id (`ms-seq`), ordered.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct StreamId(u64, u64);

impl StreamId {
    const ZERO: StreamId = StreamId(0, 0);

    fn parse(s: &str) -> Option<StreamId> {
        let (a, b) = s.split_once('-')?;
        Some(StreamId(a.parse().ok()?, b.parse().ok()?))
    }
}

impl std::fmt::Display for StreamId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-{}", self.0, self.1)
    }
}

/// One change event from the stream.
#[derive(Debug)]
struct Event {
    id: StreamId,
    kind: String,
    record: String,
    tenant: String,
}

/// Parses the entries of an `XRANGE`/`XREVRANGE` reply, or of one stream of
/// an `XREAD` reply.
fn parse_entries(v: Value) -> Vec<Event> {
    let Value::Array(entries) = v else {
        return Vec::new();
    };
    let mut out = Vec::with_capacity(entries.len());
    for e in entries {
        let Value::Array(mut parts) = e else { continue };
        if parts.len() != 2 {
            continue;
        }
        let fields = parts.pop().unwrap_or(Value::Nil);
        let Some(id) = parts
            .first()
            .and_then(string_of)
            .and_then(|s| StreamId::parse(&s))
        else {
            continue;
        };
        let mut ev = Event {
            id,
            kind: String::new(),
            record: String::new(),
            tenant: String::new(),
        };
        for (k, v) in hash_pairs(fields) {
            let (Some(k), Some(v)) = (string_of(&k), string_of(&v)) else {
                continue;
            };
            match k.as_str() {
                "k" => ev.kind = v,
                "id" => ev.record = v,
                "t" => ev.tenant = v,
                _ => {}
            }
        }
        out.push(ev);
    }
    out
}

/// Parses an `XREAD` reply for one stream (nil on timeout).
fn parse_xread(v: Value) -> Vec<Event> {
    let streams = match v {
        Value::Array(a) => a.into_iter().filter_map(|s| match s {
            Value::Array(mut kv) if kv.len() == 2 => kv.pop(),
            _ => None,
        }),
        Value::Map(m) => {
            return m
                .into_iter()
                .flat_map(|(_, entries)| parse_entries(entries))
                .collect()
        }
        _ => return Vec::new(),
    };
    streams.flat_map(parse_entries).collect()
}

impl RedisStore {
    /// Builds the store for `url` without connecting: the first command
    /// connects, and every later one reconnects if needed. Fails only on a
    /// malformed URL.
    pub fn open(url: &str, key_prefix: &str) -> Result<RedisStore, StoreError> {
        // The URL may carry a password: never echo it.
        let client = redis::Client::open(url).map_err(|e| {
            StoreError::Invalid(format!(
                "store.url is not a usable redis URL ({:?})",
                e.kind()
            ))
        })?;
        Ok(RedisStore {
            shared: Shared {
                client,
                current: tokio::sync::Mutex::new(None),
                epoch: AtomicU64::new(0),
            },
            keys: Keys {
                prefix: key_prefix.to_string(),
            },
            commit: redis::Script::new(COMMIT),
            delete_tenant: redis::Script::new(DELETE_TENANT),
            clock_offset_ms: AtomicI64::new(0),
            clock_known: AtomicBool::new(false),
        })
    }

    /// The shared command connection.
    async fn conn(&self) -> Result<MultiplexedConnection, StoreError> {
        self.shared.get().await
    }

    /// Runs one command on the shared connection with the command timeout.
    /// Every failure becomes `Unavailable`; a connection-level one (not an
    /// error reply from Redis) retires the connection.
    async fn run<T: redis::FromRedisValue>(&self, cmd: &redis::Cmd) -> Result<T, StoreError> {
        let mut con = self.conn().await?;
        self.guard(cmd.query_async(&mut con)).await
    }

    async fn guard<T>(
        &self,
        fut: impl std::future::Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, StoreError> {
        let out = call(fut).await;
        if let Err(StoreError::Unavailable(_)) = &out {
            self.shared.retire();
        }
        out
    }

    /// A dedicated connection for the blocking feed reads.
    async fn feed_connection(&self) -> Result<MultiplexedConnection, StoreError> {
        self.shared.connect(COMMAND_TIMEOUT + FEED_BLOCK).await
    }

    /// Measures the server clock against ours (`TIME`), for deadlines.
    async fn measure_clock(
        &self,
        con: &mut impl redis::aio::ConnectionLike,
    ) -> Result<(), StoreError> {
        let before = local_ms();
        let (secs, micros): (i64, i64) = call(redis::cmd("TIME").query_async(con)).await?;
        let after = local_ms();
        let server = secs * 1000 + micros / 1000;
        self.clock_offset_ms
            .store(server - (before + after) / 2, Ordering::Relaxed);
        self.clock_known.store(true, Ordering::Relaxed);
        Ok(())
    }

    /// The server-clock instant after which a write sent now must not run.
    async fn deadline(&self) -> Result<i64, StoreError> {
        if !self.clock_known.load(Ordering::Relaxed) {
            let mut con = self.conn().await?;
            if let Err(e) = self.measure_clock(&mut con).await {
                self.shared.retire();
                return Err(e);
            }
        }
        Ok(local_ms()
            + self.clock_offset_ms.load(Ordering::Relaxed)
            + WRITE_DEADLINE.as_millis() as i64)
    }

    async fn read_tenant_hash(&self, id: &str) -> Result<Option<TenantHash>, StoreError> {
        let v: Value = self
            .run(redis::cmd("HGETALL").arg(self.keys.tenant(id)))
            .await?;
        parse_tenant_hash(v)
    }

    /// Runs the commit script; `Ok(None)` when the expectation failed.
    #[allow(clippy::too_many_arguments)]
    async fn commit<T: Serialize>(
        &self,
        tenant: &str,
        expect: &Expect,
        field: &str,
        record: &T,
        index_token: Option<&str>,
        event: (&str, &str),
        min_version: u64,
    ) -> Result<Option<u64>, StoreError> {
        let body = body_without_version(record)?;
        let deadline = self.deadline().await?;
        let mut inv = self.commit.prepare_invoke();
        inv.key(self.keys.tenant(tenant))
            .key(self.keys.version())
            .key(self.keys.index())
            .key(self.keys.changes())
            .arg(expect.arg())
            .arg(deadline)
            .arg(field)
            .arg(body)
            .arg(index_token.unwrap_or(""))
            .arg(tenant)
            .arg(event.0)
            .arg(event.1)
            .arg(min_version)
            .arg(FEED_MAXLEN);
        let mut con = self.conn().await?;
        let v: i64 = self.guard(inv.invoke_async(&mut con)).await?;
        match v {
            -1 => Ok(None),
            -2 => Err(unavailable(
                "redis answered too late; the write was not applied",
            )),
            v if v > 0 => Ok(Some(v as u64)),
            v => Err(StoreError::Corrupt(format!("unexpected commit answer {v}"))),
        }
    }

    /// The stream's newest entry id (`0-0` if empty), taken before a load.
    async fn feed_head(
        &self,
        con: &mut impl redis::aio::ConnectionLike,
    ) -> Result<StreamId, StoreError> {
        let v: Value = call(
            redis::cmd("XREVRANGE")
                .arg(self.keys.changes())
                .arg("+")
                .arg("-")
                .arg("COUNT")
                .arg(1)
                .query_async(con),
        )
        .await?;
        Ok(parse_entries(v)
            .first()
            .map(|e| e.id)
            .unwrap_or(StreamId::ZERO))
    }

    /// Whether every event after `pos` is still in the stream.
    async fn feed_covers(
        &self,
        con: &mut impl redis::aio::ConnectionLike,
        pos: StreamId,
    ) -> Result<bool, StoreError> {
        let v: Value = call(
            redis::cmd("XRANGE")
                .arg(self.keys.changes())
                .arg("-")
                .arg("+")
                .arg("COUNT")
                .arg(1)
                .query_async(con),
        )
        .await?;
        Ok(match parse_entries(v).first() {
            // Trimming removes the oldest entries: if the oldest kept one is
            // not newer than `pos`, nothing after `pos` is gone.
            Some(first) => first.id <= pos,
            // No stream at all: fine only if we never saw one.
            None => pos == StreamId::ZERO,
        })
    }

    /// Reads every tenant hash with `SCAN` and pipelined `HGETALL`s, handing
    /// each to `each` as it arrives (so a million tokens are never held as
    /// one snapshot).
    ///
    /// Three stages overlap: a task walks the `SCAN` cursor and queues key
    /// batches; up to [`LOAD_DEPTH`] pipelines of one batch's `HGETALL`s are
    /// in flight at once; this task decodes and applies the oldest reply.
    /// Redis therefore always has the next batch to answer while the gateway
    /// decodes, and neither waits on the other's round trip (with one batch
    /// in flight, both sat idle about a third of the time).
    ///
    /// `strict` (export, admin listings) fails on an undecodable record; the
    /// follower skips it with an error log instead, so one bad record cannot
    /// keep an instance from ever becoming ready.
    async fn scan_each(
        &self,
        con: &MultiplexedConnection,
        strict: bool,
        each: &mut (dyn FnMut(TenantHash) + Send),
    ) -> Result<(), StoreError> {
        let (tx, mut batches) = tokio::sync::mpsc::channel::<Vec<String>>(LOAD_DEPTH);
        let scanner = {
            let pattern = self.keys.tenant_pattern();
            let mut con = con.clone();
            AbortOnDrop(tokio::spawn(async move {
                let mut cursor = 0u64;
                loop {
                    let v: Value = call(
                        redis::cmd("SCAN")
                            .arg(cursor)
                            .arg("MATCH")
                            .arg(&pattern)
                            .arg("COUNT")
                            .arg(SCAN_BATCH)
                            .query_async(&mut con),
                    )
                    .await?;
                    let (next, keys): (u64, Vec<String>) = redis::from_redis_value(v)
                        .map_err(|e| unavailable(format!("redis: bad SCAN reply: {e}")))?;
                    // A send fails only when the reader has given up.
                    if !keys.is_empty() && tx.send(keys).await.is_err() {
                        return Ok(());
                    }
                    // A returned cursor of 0 means the walk is complete.
                    if next == 0 {
                        return Ok::<(), StoreError>(());
                    }
                    cursor = next;
                }
            }))
        };
        let fetch = |keys: &[String]| {
            let mut pipe = redis::pipe();
            for k in keys {
                pipe.cmd("HGETALL").arg(k);
            }
            let mut con = con.clone();
            AbortOnDrop(tokio::spawn(async move {
                call(pipe.query_async::<Vec<Value>>(&mut con)).await
            }))
        };
        let mut inflight = std::collections::VecDeque::with_capacity(LOAD_DEPTH);
        let mut scanning = true;
        loop {
            while scanning && inflight.len() < LOAD_DEPTH {
                match batches.recv().await {
                    Some(keys) => {
                        let h = fetch(&keys);
                        inflight.push_back((h, keys));
                    }
                    None => scanning = false,
                }
            }
            let Some((mut h, keys)) = inflight.pop_front() else {
                break;
            };
            let replies = (&mut h.0)
                .await
                .map_err(|e| unavailable(format!("redis load task: {e}")))??;
            for (h, key) in replies.into_iter().zip(&keys) {
                match parse_tenant_hash(h) {
                    Ok(Some(h)) => each(h),
                    Ok(None) => {}
                    Err(e) if strict => return Err(e),
                    Err(e) => {
                        tracing::error!(key = %key, error = %e, "skipping an undecodable tenant hash")
                    }
                }
            }
        }
        // The scan ended: it must have ended by reaching cursor 0, not by
        // failing part-way (which would make this a partial load).
        let mut scanner = scanner;
        (&mut scanner.0)
            .await
            .map_err(|e| unavailable(format!("redis scan task: {e}")))?
    }

    /// Everything as one snapshot (export, admin listings).
    async fn scan_all(&self, con: &MultiplexedConnection) -> Result<Snapshot, StoreError> {
        let mut snap = Snapshot::default();
        self.scan_each(con, true, &mut |h| {
            snap.tenants.push(h.tenant);
            snap.tokens.extend(h.tokens);
        })
        .await?;
        Ok(snap)
    }

    /// Reads the current state of the records `events` name and applies it.
    async fn apply_events(
        &self,
        con: &mut MultiplexedConnection,
        table: &TokenTable,
        events: &[Event],
    ) -> Result<(), StoreError> {
        let mut pipe = redis::pipe();
        for e in events {
            if e.kind == "token" {
                pipe.cmd("HGET")
                    .arg(self.keys.tenant(&e.tenant))
                    .arg(token_field(&e.record));
            } else {
                pipe.cmd("HGET")
                    .arg(self.keys.tenant(&e.record))
                    .arg(TENANT_FIELD);
            }
        }
        let values: Vec<Value> = call(pipe.query_async(con)).await?;
        for (e, v) in events.iter().zip(values) {
            let change = match (e.kind.as_str(), bytes_of(&v)) {
                ("token", Some(b)) => decode(b).map(Change::TokenUpserted),
                ("token", None) => Ok(Change::TokenRemoved(e.record.clone())),
                (_, Some(b)) => decode(b).map(Change::TenantUpserted),
                (_, None) => Ok(Change::TenantRemoved(e.record.clone())),
            };
            match change {
                Ok(c) => table.apply(c),
                // Skipped, not retried forever: the next reconciliation
                // logs it again.
                Err(err) => {
                    tracing::error!(record = %e.record, error = %err, "skipping an undecodable record from the change feed")
                }
            }
        }
        Ok(())
    }

    /// Loads everything into `table` as it is read, then (if `prune`)
    /// removes what Redis no longer has. Returns the stream position the
    /// load is current from, and, unpruned, the ids it saw.
    async fn load_into(
        &self,
        con: &mut MultiplexedConnection,
        table: &TokenTable,
        prune: bool,
    ) -> Result<StreamId, StoreError> {
        let (head, seen) = self.load_streaming(con, table, prune).await?;
        if let Some((tenants, tokens)) = seen {
            retain_only(table, tenants, tokens).await;
        }
        Ok(head)
    }

    /// The streaming part of [`RedisStore::load_into`]: upserts every record
    /// and, if `collect`, returns the ids seen (for pruning later).
    async fn load_streaming(
        &self,
        con: &mut MultiplexedConnection,
        table: &TokenTable,
        collect: bool,
    ) -> Result<(StreamId, Option<SeenIds>), StoreError> {
        let started = Instant::now();
        let head = self.feed_head(con).await?;
        let mut seen: SeenIds = Default::default();
        let (mut tenants, mut tokens) = (0usize, 0usize);
        self.scan_each(&*con, false, &mut |h| {
            tenants += 1;
            tokens += h.tokens.len();
            if collect {
                seen.0.insert(h.tenant.id.clone());
                seen.1.extend(h.tokens.iter().map(|t| t.id.clone()));
            }
            table.apply(Change::TenantUpserted(h.tenant));
            for t in h.tokens {
                table.apply(Change::TokenUpserted(t));
            }
        })
        .await?;
        tracing::info!(
            tenants,
            tokens,
            ms = started.elapsed().as_millis() as u64,
            "loaded tenants and tokens from redis"
        );
        Ok((head, collect.then_some(seen)))
    }

    /// Connects, loads or resumes, and follows the feed until a connection
    /// error (returned). `pos` survives across calls.
    async fn follow_once(
        self: &Arc<Self>,
        table: &TokenTable,
        status: &SyncStatus,
        pos: &mut Option<StreamId>,
        backoff: &mut Duration,
    ) -> Result<(), StoreError> {
        let status_was_down = !status.connected();
        let mut feed = self.feed_connection().await?;
        self.measure_clock(&mut feed).await?;
        let resume = match *pos {
            Some(p) => self.feed_covers(&mut feed, p).await?,
            None => false,
        };
        if !resume {
            if pos.is_some() {
                tracing::warn!("change feed no longer holds our position; reloading everything");
            }
            let prune = table.tenants() > 0;
            *pos = Some(self.load_into(&mut feed, table, prune).await?);
        } else {
            tracing::info!("reconnected to redis; resuming the change feed");
        }
        status.set_connected(true);
        status.synced_now();
        *backoff = BACKOFF_MIN;
        if status_was_down {
            // Whatever broke our feed connection broke the shared one too.
            self.shared.retire();
        }

        let mut every = RECONCILE_EVERY;
        let mut next_reconcile = Instant::now() + every;
        // Aborted if we leave (connection lost) while it runs.
        let mut reconcile: Option<AbortOnDrop<Result<Reconciled, StoreError>>> = None;
        let changes = self.keys.changes();
        loop {
            let at = pos.unwrap_or(StreamId::ZERO);
            if reconcile.is_none() && Instant::now() >= next_reconcile {
                let me = Arc::clone(self);
                reconcile = Some(AbortOnDrop(tokio::spawn({
                    let table = table.clone();
                    async move {
                        let started = Instant::now();
                        let mut con = me.feed_connection().await?;
                        me.measure_clock(&mut con).await?;
                        let (head, seen) = me.load_streaming(&mut con, &table, true).await?;
                        Ok((head, seen.unwrap_or_default(), started.elapsed()))
                    }
                })));
            }
            if reconcile.as_ref().is_some_and(|h| h.0.is_finished()) {
                if let Some(mut h) = reconcile.take() {
                    match (&mut h.0).await {
                        Ok(Ok((head, (tenants, tokens), took))) => {
                            retain_only(table, tenants, tokens).await;
                            // Replay what happened since the scan began, in
                            // case the snapshot missed it.
                            *pos = Some(head.min(at));
                            every = RECONCILE_EVERY.max(took * 10);
                            tracing::debug!(ms = took.as_millis() as u64, "reconciled with redis");
                        }
                        Ok(Err(e)) => tracing::warn!(error = %e, "reconciliation failed"),
                        Err(e) => tracing::warn!(error = %e, "reconciliation task failed"),
                    }
                    next_reconcile = Instant::now() + every;
                    continue;
                }
            }
            let v: Value = call(
                redis::cmd("XREAD")
                    .arg("COUNT")
                    .arg(FEED_BATCH)
                    .arg("BLOCK")
                    .arg(FEED_BLOCK.as_millis() as u64)
                    .arg("STREAMS")
                    .arg(&changes)
                    .arg(at.to_string())
                    .query_async(&mut feed),
            )
            .await?;
            let events = parse_xread(v);
            if let Some(last) = events.last() {
                let last = last.id;
                self.apply_events(&mut feed, table, &events).await?;
                *pos = Some(last);
                if events.len() == FEED_BATCH && !self.feed_covers(&mut feed, last).await? {
                    tracing::warn!("fell behind the change feed; reloading everything");
                    *pos = Some(self.load_into(&mut feed, table, true).await?);
                }
            }
            status.set_connected(true);
            status.synced_now();
        }
    }
}

/// A task handle that aborts its task when dropped.
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A finished background reconciliation: the stream position it is current
/// from, the ids it saw, and how long it took.
type Reconciled = (StreamId, SeenIds, Duration);

/// Tenant and token ids seen by a full load.
type SeenIds = (HashSet<String>, HashSet<String>);

/// `table.retain_only` off the async threads (it walks the whole table).
async fn retain_only(table: &TokenTable, tenants: HashSet<String>, tokens: HashSet<String>) {
    let t = table.clone();
    let done = tokio::task::spawn_blocking(move || t.retain_only(&tenants, &tokens)).await;
    if let Err(e) = done {
        tracing::error!(error = %e, "pruning the token table failed");
    }
}

fn counted_except(tokens: &[Token], except: &str, now: UnixTime) -> usize {
    tokens
        .iter()
        .filter(|t| t.id != except && t.counts_against_quota(now))
        .count()
}

fn contended(what: &str) -> StoreError {
    StoreError::Unavailable(format!(
        "{what}: too many concurrent writes to this tenant; try again"
    ))
}

#[async_trait]
impl Store for RedisStore {
    fn kind(&self) -> &'static str {
        "redis"
    }

    async fn load_all(&self) -> Result<Snapshot, StoreError> {
        let con = self.conn().await?;
        let out = self.scan_all(&con).await;
        if out.is_err() {
            self.shared.retire();
        }
        out
    }

    async fn get_tenant(&self, id: &str) -> Result<Option<Tenant>, StoreError> {
        let v: Option<Vec<u8>> = self
            .run(
                redis::cmd("HGET")
                    .arg(self.keys.tenant(id))
                    .arg(TENANT_FIELD),
            )
            .await?;
        v.map(|b| decode(&b)).transpose()
    }

    async fn list_tenants(&self) -> Result<Vec<Tenant>, StoreError> {
        Ok(self.load_all().await?.tenants)
    }

    async fn create_tenant(&self, mut tenant: Tenant) -> Result<Tenant, StoreError> {
        let id = tenant.id.clone();
        match self
            .commit(
                &id,
                &Expect::Absent,
                TENANT_FIELD,
                &tenant,
                None,
                ("tenant", &id),
                0,
            )
            .await?
        {
            Some(v) => {
                tenant.version = v;
                Ok(tenant)
            }
            None => Err(StoreError::TenantExists(id)),
        }
    }

    async fn update_tenant(&self, id: &str, edit: TenantEdit<'_>) -> Result<Tenant, StoreError> {
        for _ in 0..MAX_ATTEMPTS {
            let h = self
                .read_tenant_hash(id)
                .await?
                .ok_or_else(|| StoreError::TenantNotFound(id.to_string()))?;
            let mut next = h.tenant.clone();
            edit(&mut next)?;
            // The id is the key; an edit cannot move the tenant.
            next.id = h.tenant.id.clone();
            if let Some(v) = self
                .commit(
                    id,
                    &Expect::Rev(h.rev),
                    TENANT_FIELD,
                    &next,
                    None,
                    ("tenant", id),
                    0,
                )
                .await?
            {
                next.version = v;
                return Ok(next);
            }
        }
        Err(contended("update tenant"))
    }

    async fn delete_tenant(&self, id: &str) -> Result<Vec<String>, StoreError> {
        let deadline = self.deadline().await?;
        let mut inv = self.delete_tenant.prepare_invoke();
        inv.key(self.keys.tenant(id))
            .key(self.keys.version())
            .key(self.keys.index())
            .key(self.keys.changes())
            .arg(deadline)
            .arg(id)
            .arg(FEED_MAXLEN);
        let mut con = self.conn().await?;
        let mut out: Vec<String> = self.guard(inv.invoke_async(&mut con)).await?;
        match out.first().map(String::as_str) {
            Some("ok") => {
                out.remove(0);
                out.sort();
                Ok(out)
            }
            Some("gone") => Err(StoreError::TenantNotFound(id.to_string())),
            Some("late") => Err(unavailable(
                "redis answered too late; the tenant was not deleted",
            )),
            _ => Err(StoreError::Corrupt("unexpected delete answer".into())),
        }
    }

    async fn get_token(&self, id: &str) -> Result<Option<Token>, StoreError> {
        let tenant: Option<String> = self
            .run(redis::cmd("HGET").arg(self.keys.index()).arg(id))
            .await?;
        let Some(tenant) = tenant else {
            return Ok(None);
        };
        let v: Option<Vec<u8>> = self
            .run(
                redis::cmd("HGET")
                    .arg(self.keys.tenant(&tenant))
                    .arg(token_field(id)),
            )
            .await?;
        v.map(|b| decode(&b)).transpose()
    }

    async fn list_tokens(&self, tenant: &str) -> Result<Vec<Token>, StoreError> {
        Ok(self
            .read_tenant_hash(tenant)
            .await?
            .ok_or_else(|| StoreError::TenantNotFound(tenant.to_string()))?
            .tokens)
    }

    async fn create_token(&self, mut token: Token, now: UnixTime) -> Result<Token, StoreError> {
        let field = token_field(&token.id);
        for _ in 0..MAX_ATTEMPTS {
            let h = self
                .read_tenant_hash(&token.tenant)
                .await?
                .ok_or_else(|| StoreError::TenantNotFound(token.tenant.clone()))?;
            let others = counted_except(&h.tokens, &token.id, now);
            check_token_change(None, &token, &h.tenant, others, now)?;
            if let Some(v) = self
                .commit(
                    &h.tenant.id,
                    &Expect::Rev(h.rev),
                    &field,
                    &token,
                    Some(&token.id),
                    ("token", &token.id),
                    0,
                )
                .await?
            {
                token.version = v;
                return Ok(token);
            }
        }
        Err(contended("create token"))
    }

    async fn update_token(
        &self,
        id: &str,
        edit: TokenEdit<'_>,
        now: UnixTime,
    ) -> Result<Token, StoreError> {
        let not_found = || StoreError::TokenNotFound(id.to_string());
        let tenant: Option<String> = self
            .run(redis::cmd("HGET").arg(self.keys.index()).arg(id))
            .await?;
        let tenant = tenant.ok_or_else(not_found)?;
        let field = token_field(id);
        for _ in 0..MAX_ATTEMPTS {
            let h = self
                .read_tenant_hash(&tenant)
                .await?
                .ok_or_else(not_found)?;
            let before = h
                .tokens
                .iter()
                .find(|t| t.id == id)
                .cloned()
                .ok_or_else(not_found)?;
            let mut after = before.clone();
            edit(&mut after, &h.tenant)?;
            // Identity is not editable: it is what the keys are made of.
            after.id = before.id.clone();
            after.tenant = before.tenant.clone();
            let others = counted_except(&h.tokens, id, now);
            check_token_change(Some(&before), &after, &h.tenant, others, now)?;
            if let Some(v) = self
                .commit(
                    &tenant,
                    &Expect::Rev(h.rev),
                    &field,
                    &after,
                    None,
                    ("token", id),
                    0,
                )
                .await?
            {
                after.version = v;
                return Ok(after);
            }
        }
        Err(contended("update token"))
    }

    async fn append_audit(&self, event: AuditEvent) -> Result<(), StoreError> {
        let json = serde_json::to_string(&event).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let key = self.keys.audit();
        let mut pipe = redis::pipe();
        pipe.atomic()
            .cmd("LPUSH")
            .arg(&key)
            .arg(json)
            .ignore()
            .cmd("LTRIM")
            .arg(&key)
            .arg(0)
            .arg(AUDIT_KEEP - 1)
            .ignore();
        let mut con = self.conn().await?;
        self.guard(pipe.query_async::<()>(&mut con)).await
    }

    async fn list_audit(&self, limit: usize) -> Result<Vec<AuditEvent>, StoreError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let rows: Vec<Vec<u8>> = self
            .run(
                redis::cmd("LRANGE")
                    .arg(self.keys.audit())
                    .arg(0)
                    .arg(limit.min(AUDIT_KEEP) - 1),
            )
            .await?;
        rows.iter().map(|r| decode(r)).collect()
    }

    async fn import(&self, record: Record) -> Result<(), StoreError> {
        let done = match &record {
            Record::Tenant(t) => {
                crate::model::validate_name("tenant id", &t.id).map_err(StoreError::Invalid)?;
                self.commit(
                    &t.id,
                    &Expect::Any,
                    TENANT_FIELD,
                    t,
                    None,
                    ("tenant", &t.id),
                    t.version,
                )
                .await?
            }
            Record::Token(t) => {
                self.commit(
                    &t.tenant,
                    &Expect::Present,
                    &token_field(&t.id),
                    t,
                    Some(&t.id),
                    ("token", &t.id),
                    t.version,
                )
                .await?
            }
        };
        match (done, record) {
            (Some(_), _) => Ok(()),
            (None, Record::Token(t)) => Err(StoreError::TenantNotFound(t.tenant)),
            (None, Record::Tenant(t)) => Err(StoreError::Corrupt(format!(
                "tenant {:?} could not be imported",
                t.id
            ))),
        }
    }

    fn spawn_sync(
        self: Arc<Self>,
        table: TokenTable,
        status: Arc<SyncStatus>,
    ) -> Option<tokio::task::JoinHandle<()>> {
        Some(tokio::spawn(async move {
            let mut pos = None;
            let mut backoff = BACKOFF_MIN;
            loop {
                if let Err(e) = self
                    .follow_once(&table, &status, &mut pos, &mut backoff)
                    .await
                {
                    if status.connected() || pos.is_none() {
                        tracing::warn!(error = %e, "redis store unreachable; serving from memory and retrying");
                    }
                    status.set_connected(false);
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
        }))
    }
}
