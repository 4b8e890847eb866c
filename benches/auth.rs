//! Criterion benches of the per-request work that does not touch the
//! network:
//!
//! - `auth/*`: the whole authorization cost of one request, as the data
//!   plane pays it: `TokenFormat::is_well_formed` (checksum) +
//!   `TokenHash::of` (blake3) + `TokenTable::get` (dashmap lookup) +
//!   `decide` (state, allowlist, products), with 10 and 1,000,000 tokens in
//!   the table, for a known token ("hit") and a well-formed unknown one.
//!   At 1M the hit case cycles over 65,536 distinct tokens so lookups land
//!   all over the table, as many clients would make them.
//! - `route/*`: `RouteTable::find` with the contract's 3 routes and with 50.
//! - `path/*`: `normalize_path` on a plain path and a dot-segment path.
//!
//! It also prints the token table's memory per token at 1M (resident set
//! before and after building it, from /proc/self/statm).
//!
//! `piece/full_hit_1M_shuffled` is `full_hit/1M` over the same sample in a
//! shuffled order: the sample follows token creation order, which favours a
//! layout in allocation order.
//!
//! Run: `cargo bench --bench auth` (add `-- --quick` for a fast pass).

use std::hint::black_box;
use std::net::IpAddr;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use tollgate::auth::{decide, TokenFormat, TokenHash};
use tollgate::model::{parse_allowlist_entry, Tenant, Token};
use tollgate::proxy::route::{normalize_path, Route, RouteTable, Upstream};
use tollgate::table::{Change, Product, TokenTable};

// The allocator the `tollgate` binary uses, so memory per token and
// allocation costs here are the binary's.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const NOW: i64 = 1_800_000_000;
/// Distinct tokens the 1M hit case cycles over.
const SAMPLE: usize = 65_536;

/// A table of `n` tokens built the way the gateway builds it (through
/// `apply`): one tenant per token (the default quota is 1) with 2 products,
/// each token with 1 or 2 allowlist entries, half of them limited to one
/// product. Returns the table and up to `SAMPLE` of the token secrets.
fn build_table(n: usize, fmt: &TokenFormat, rng: &mut StdRng) -> (TokenTable, Vec<String>) {
    let table = TokenTable::new();
    let mut sample = Vec::with_capacity(n.min(SAMPLE));
    let every = (n / SAMPLE).max(1);
    for i in 0..n {
        let tenant = format!("tenant-{i:07}");
        table.apply(Change::TenantUpserted(Tenant {
            id: tenant.clone(),
            name: String::new(),
            products: vec!["crm".into(), "messaging".into()],
            token_quota: 1,
            created_at: NOW,
            version: 1,
        }));
        let secret = fmt.generate_with(rng);
        // 127.0.0.1 plus, for every other token, an office /24.
        let mut allow = vec![parse_allowlist_entry("127.0.0.1").unwrap()];
        if i % 2 == 0 {
            let net = format!("10.{}.{}.0/24", (i >> 8) & 0xff, i & 0xff);
            allow.insert(0, parse_allowlist_entry(&net).unwrap());
        }
        table.apply(Change::TokenUpserted(Token {
            id: tollgate::model::new_token_id(),
            tenant,
            name: String::new(),
            hash: TokenHash::of(&secret),
            ip_allowlist: allow,
            products: (i % 2 == 1).then(|| vec!["crm".into()]),
            created_at: NOW,
            expires_at: None,
            disabled: false,
            revoked_at: None,
            previous: None,
            last_used_at: None,
            version: 1,
        }));
        if i % every == 0 && sample.len() < SAMPLE {
            sample.push(secret);
        }
    }
    (table, sample)
}

/// The whole per-request authorization, as `request_filter` does it.
#[inline(always)]
/// `product` is resolved once, as a route does.
fn authorize(
    fmt: &TokenFormat,
    table: &TokenTable,
    token: &str,
    ip: IpAddr,
    product: &Product,
) -> bool {
    if !fmt.is_well_formed(token) {
        return false;
    }
    let Some(grant) = table.get(&TokenHash::of(token)) else {
        return false;
    };
    decide(&grant, ip, product, NOW).is_ok()
}

fn resident_bytes() -> usize {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: usize = statm
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    pages * 4096
}

fn bench_auth(c: &mut Criterion) {
    let fmt = TokenFormat::new("tg_");
    let mut rng = StdRng::seed_from_u64(7);
    let ip: IpAddr = "127.0.0.1".parse().unwrap();
    let crm = Product::new("crm");
    let mut group = c.benchmark_group("auth");
    group.throughput(Throughput::Elements(1));

    for (label, n) in [("10", 10usize), ("1M", 1_000_000)] {
        let before = resident_bytes();
        let (table, sample) = build_table(n, &fmt, &mut rng);
        let after = resident_bytes();
        if n >= 1_000_000 {
            let per = after.saturating_sub(before) as f64 / n as f64;
            eprintln!(
                "token table memory: {n} tokens (+{n} tenants), RSS {:.1} MB -> {:.1} MB, {per:.0} bytes/token (tenant included)",
                before as f64 / 1e6,
                after as f64 / 1e6,
            );
        }
        assert!(sample.iter().all(|t| authorize(&fmt, &table, t, ip, &crm)));
        let unknown: Vec<String> = (0..sample.len().min(1024))
            .map(|_| fmt.generate_with(&mut rng))
            .collect();
        assert!(unknown
            .iter()
            .all(|t| !authorize(&fmt, &table, t, ip, &crm)));

        let mut i = 0usize;
        group.bench_function(BenchmarkId::new("full_hit", label), |b| {
            b.iter(|| {
                i = (i + 1) % sample.len();
                black_box(authorize(&fmt, &table, black_box(&sample[i]), ip, &crm))
            })
        });
        let mut i = 0usize;
        group.bench_function(BenchmarkId::new("full_unknown", label), |b| {
            b.iter(|| {
                i = (i + 1) % unknown.len();
                black_box(authorize(&fmt, &table, black_box(&unknown[i]), ip, &crm))
            })
        });
        if n >= 1_000_000 {
            // The pieces, to show where the time goes.
            let t = &sample[1];
            group.bench_function("piece/is_well_formed", |b| {
                b.iter(|| black_box(fmt.is_well_formed(black_box(t))))
            });
            group.bench_function("piece/blake3", |b| {
                b.iter(|| black_box(TokenHash::of(black_box(t))))
            });
            let hashes: Vec<TokenHash> = sample.iter().map(|t| TokenHash::of(t)).collect();
            let mut i = 0usize;
            group.bench_function("piece/table_get_1M", |b| {
                b.iter(|| {
                    i = (i + 1) % hashes.len();
                    black_box(table.get(black_box(&hashes[i])).is_some())
                })
            });
            // The same hits in a shuffled order. The sample above follows
            // the order tokens were created in, so a layout in allocation
            // order reads memory nearly sequentially there; real clients
            // arrive in no such order.
            let mut shuffled = sample.clone();
            shuffled.shuffle(&mut StdRng::seed_from_u64(11));
            let mut i = 0usize;
            group.bench_function("piece/full_hit_1M_shuffled", |b| {
                b.iter(|| {
                    i = (i + 1) % shuffled.len();
                    black_box(authorize(&fmt, &table, black_box(&shuffled[i]), ip, &crm))
                })
            });
            let grant = table.get(&hashes[1]).unwrap();
            group.bench_function("piece/decide", |b| {
                b.iter(|| black_box(decide(&grant, black_box(ip), &crm, NOW)))
            });
        }
        drop(table);
    }
    group.finish();
    // Keep the generator honest: tokens from it are well formed.
    assert!(fmt.is_well_formed(&fmt.generate_with(&mut rng)));
    let _ = rng.gen::<u8>();
}

fn routes(n: usize) -> RouteTable {
    let up = || vec![Upstream::parse("http://127.0.0.1:7001").unwrap()];
    let mut v = vec![
        Route::new(0, "/crm/", "crm", up(), false),
        Route::new(1, "/messaging/", "messaging", up(), false),
        Route::new(2, "/marketing/", "marketing", up(), false),
    ];
    for i in 3..n {
        let prefix = format!("/svc{i:02}/v{}/", i % 3 + 1);
        v.push(Route::new(i, &prefix, "crm", up(), false));
    }
    RouteTable::new(v)
}

fn bench_routes(c: &mut Criterion) {
    let mut group = c.benchmark_group("route");
    for n in [3usize, 50] {
        let t = routes(n);
        group.bench_function(BenchmarkId::new("find_marketing", n), |b| {
            b.iter(|| black_box(t.find(black_box("/marketing/v1/campaigns/42")).is_some()))
        });
        group.bench_function(BenchmarkId::new("find_miss", n), |b| {
            b.iter(|| black_box(t.find(black_box("/nothing/here")).is_some()))
        });
    }
    group.finish();

    let mut group = c.benchmark_group("path");
    group.bench_function("normalize_plain", |b| {
        b.iter(|| black_box(normalize_path(black_box("/crm/v1/contacts/12345")).is_ok()))
    });
    group.bench_function("normalize_dot_segments", |b| {
        b.iter(|| black_box(normalize_path(black_box("/crm/./v1/../v1/contacts/12345")).is_ok()))
    });
    group.finish();
}

criterion_group!(benches, bench_auth, bench_routes);
criterion_main!(benches);
