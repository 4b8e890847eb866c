//! `tollgate store export` / `import`: every tenant and token as JSON lines
//! (`{"type":"tenant",…}`, `{"type":"token",…}`), hashes only, so an operator
//! can move between the embedded store and Redis.

use std::io::{BufRead, Write};

use anyhow::Context;

use super::Record;
use crate::config::Config;

/// Writes every record of the configured store; returns how many.
pub async fn export(config: &Config, mut out: impl Write) -> anyhow::Result<usize> {
    let store = crate::server::open_store(config).await?;
    let snap = store.load_all().await?;
    let mut n = 0;
    for t in snap.tenants {
        serde_json::to_writer(&mut out, &Record::Tenant(t))?;
        out.write_all(b"\n")?;
        n += 1;
    }
    for t in snap.tokens {
        serde_json::to_writer(&mut out, &Record::Token(t))?;
        out.write_all(b"\n")?;
        n += 1;
    }
    out.flush()?;
    Ok(n)
}

/// Reads records (tenants before their tokens) into the configured store.
/// Every line is checked before anything is written, so a bad file changes
/// nothing.
pub async fn import(config: &Config, input: impl BufRead) -> anyhow::Result<usize> {
    let mut records = Vec::new();
    for (i, line) in input.lines().enumerate() {
        let line = line.context("reading stdin")?;
        if line.trim().is_empty() {
            continue;
        }
        let r: Record = serde_json::from_str(&line)
            .with_context(|| format!("line {}: not a tenant or token record", i + 1))?;
        records.push(r);
    }
    // Tenants first, whatever the file order.
    records.sort_by_key(|r| matches!(r, Record::Token(_)));
    let store = crate::server::open_store(config).await?;
    let n = records.len();
    for r in records {
        store.import(r).await?;
    }
    Ok(n)
}
