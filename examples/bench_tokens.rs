//! Token set for `benches/e2e.sh`: writes, into DIR,
//!
//! - `records.jsonl`: tenants and tokens in the `tollgate store import`
//!   format (blake3 hashes only), every token allowed from 127.0.0.1;
//! - `nginx_map.conf`: the same tokens as an nginx `map` from
//!   `$http_authorization` to the tenant id (empty = refused);
//! - `token.txt`: one of the tokens, for the load generator.
//!
//! Usage: `bench_tokens DIR [COUNT]` (COUNT defaults to 1000; 10 tokens per
//! tenant, tenants bought crm and messaging).

use std::io::Write;

use tollgate::auth::{TokenFormat, TokenHash};
use tollgate::model::{parse_allowlist_entry, Tenant, Token};
use tollgate::store::Record;

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let dir = std::path::PathBuf::from(args.next().expect("usage: bench_tokens DIR [COUNT]"));
    let count: usize = args.next().map_or(Ok(1000), |s| s.parse())?;
    let fmt = TokenFormat::new("tg_");
    let now = tollgate::model::now();
    let mut records = std::io::BufWriter::new(std::fs::File::create(dir.join("records.jsonl"))?);
    let mut map = std::io::BufWriter::new(std::fs::File::create(dir.join("nginx_map.conf"))?);
    writeln!(map, "map $http_authorization $tollgate_tenant {{")?;
    writeln!(map, "    default \"\";")?;
    let mut pick = None;
    for i in 0..count {
        let tenant = format!("tenant-{:04}", i / 10);
        if i % 10 == 0 {
            let t = Tenant {
                id: tenant.clone(),
                name: tenant.clone(),
                products: vec!["crm".into(), "messaging".into()],
                token_quota: 10,
                created_at: now,
                version: 0,
            };
            serde_json::to_writer(&mut records, &Record::Tenant(t))?;
            writeln!(records)?;
        }
        let secret = fmt.generate();
        let token = Token {
            id: tollgate::model::new_token_id(),
            tenant: tenant.clone(),
            name: format!("bench {i}"),
            hash: TokenHash::of(&secret),
            ip_allowlist: vec![
                parse_allowlist_entry("10.20.30.0/24").map_err(anyhow::Error::msg)?,
                parse_allowlist_entry("127.0.0.1").map_err(anyhow::Error::msg)?,
            ],
            products: None,
            created_at: now,
            expires_at: None,
            disabled: false,
            revoked_at: None,
            previous: None,
            last_used_at: None,
            version: 0,
        };
        serde_json::to_writer(&mut records, &Record::Token(token))?;
        writeln!(records)?;
        writeln!(map, "    \"Bearer {secret}\" \"{tenant}\";")?;
        if i == count / 2 {
            pick = Some(secret);
        }
    }
    writeln!(map, "}}")?;
    records.flush()?;
    map.flush()?;
    std::fs::write(dir.join("token.txt"), pick.unwrap_or_default())?;
    Ok(())
}
