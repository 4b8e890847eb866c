//! The `tollgate` binary: parses the command line and hands over to the
//! library. Errors are printed in one place (`main`) and become exit code 1.

use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use http::Method;
use serde_json::{json, Map, Value};
use tollgate::client::AdminClient;
use tollgate::config::Config;

/// mimalloc instead of glibc malloc: less CPU per proxied request (the
/// request path allocates in hyper, http and tokio), measured side by side
/// in benches/RESULTS.md.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "tollgate",
    version,
    about = "API gateway: bearer token + per-token IP allowlist in front of CRM, Messaging and Marketing"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway.
    Run(ConfigArg),
    /// Validate a config file; prints `ok` or each problem.
    CheckConfig(ConfigArg),
    /// Self-contained demo: embedded store, demo backends, a tenant and a token.
    Demo,
    /// Read a secret on stdin and print its `blake3:<hex>` form for admin.key_hashes.
    HashKey,
    /// Manage tenants through the admin API.
    #[command(subcommand)]
    Tenant(TenantCmd),
    /// Manage tokens through the admin API.
    #[command(subcommand)]
    Token(TokenCmd),
    /// Move data between stores (JSON lines, hashes only).
    #[command(subcommand)]
    Store(StoreCmd),
}

#[derive(Args)]
struct ConfigArg {
    /// Config file.
    #[arg(long, default_value = "gateway.toml")]
    config: PathBuf,
}

#[derive(Subcommand)]
enum TenantCmd {
    /// Create a tenant.
    Create {
        id: String,
        #[arg(long)]
        name: Option<String>,
        /// A product the tenant bought (repeatable).
        #[arg(long = "product")]
        products: Vec<String>,
        #[arg(long)]
        quota: Option<u32>,
    },
    /// List tenants.
    List,
    /// Show one tenant.
    Show { id: String },
    /// Change a tenant.
    Update {
        id: String,
        #[arg(long)]
        name: Option<String>,
        /// The full product list (repeatable); replaces the current one.
        #[arg(long = "product")]
        products: Option<Vec<String>>,
        #[arg(long)]
        quota: Option<u32>,
    },
    /// Delete a tenant; its tokens stop working at once.
    Delete { id: String },
}

#[derive(Subcommand)]
enum TokenCmd {
    /// Create a token; prints its secret once.
    Create {
        tenant: String,
        /// An address or CIDR the token may be used from (repeatable, required).
        #[arg(long = "allow", required = true)]
        allow: Vec<String>,
        #[arg(long)]
        name: Option<String>,
        /// Limit the token to these products (repeatable).
        #[arg(long = "product")]
        products: Option<Vec<String>>,
        /// RFC 3339 expiry, such as 2027-01-31T00:00:00Z.
        #[arg(long)]
        expires_at: Option<String>,
    },
    /// List a tenant's tokens.
    List { tenant: String },
    /// Show one token.
    Show { id: String },
    /// Change a token.
    Update {
        id: String,
        #[arg(long = "allow")]
        allow: Option<Vec<String>>,
        #[arg(long)]
        name: Option<String>,
        #[arg(long = "product")]
        products: Option<Vec<String>>,
        #[arg(long)]
        expires_at: Option<String>,
        #[arg(long, conflicts_with = "enable")]
        disable: bool,
        #[arg(long)]
        enable: bool,
    },
    /// Revoke a token.
    Revoke { id: String },
    /// Give a token a new secret; the old one keeps working for --grace.
    Rotate {
        id: String,
        #[arg(long)]
        grace: Option<String>,
    },
}

#[derive(Subcommand)]
enum StoreCmd {
    /// Write every tenant and token of the configured store to stdout.
    Export(ConfigArg),
    /// Read records from stdin into the configured store.
    Import(ConfigArg),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match try_main(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("tollgate: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn try_main(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::CheckConfig(a) => match Config::load(&a.config)
            .and_then(|c| tollgate::server::Runtime::build(c, None).map(|_| ()))
        {
            Ok(()) => {
                println!("ok");
                Ok(ExitCode::SUCCESS)
            }
            Err(e) => {
                for p in &e.problems {
                    eprintln!("{}: {p}", a.config.display());
                }
                Ok(ExitCode::FAILURE)
            }
        },
        Command::HashKey => {
            let mut s = String::new();
            std::io::stdin()
                .read_to_string(&mut s)
                .context("reading the key from stdin")?;
            let key = s.trim_end_matches(['\n', '\r']);
            anyhow::ensure!(!key.is_empty(), "no key on stdin");
            println!("blake3:{}", blake3::hash(key.as_bytes()).to_hex());
            Ok(ExitCode::SUCCESS)
        }
        Command::Run(a) => runtime()?.block_on(run(a.config)),
        Command::Demo => runtime()?
            .block_on(tollgate::demo::run())
            .map(|_| ExitCode::SUCCESS),
        Command::Tenant(c) => runtime()?.block_on(tenant(c)),
        Command::Token(c) => runtime()?.block_on(token(c)),
        Command::Store(c) => runtime()?.block_on(store(c)),
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

async fn run(path: PathBuf) -> anyhow::Result<ExitCode> {
    let config = match Config::load(&path) {
        Ok(c) => c,
        Err(e) => {
            for p in &e.problems {
                eprintln!("{}: {p}", path.display());
            }
            return Ok(ExitCode::FAILURE);
        }
    };
    let (log, _guard) = tollgate::telemetry::init(config.log_format, &config.log_level);
    let handle = tollgate::server::start(
        config,
        tollgate::server::StartOptions {
            config_path: Some(path),
            log: Some(log),
        },
    )
    .await?;
    tollgate::shutdown::on_terminate(handle.shutdown_token()).await;
    handle.wait().await;
    tracing::info!("stopped");
    Ok(ExitCode::SUCCESS)
}

fn print(v: &Value) {
    println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
}

fn obj(pairs: Vec<(&str, Option<Value>)>) -> Value {
    let mut m = Map::new();
    for (k, v) in pairs {
        if let Some(v) = v {
            m.insert(k.to_string(), v);
        }
    }
    Value::Object(m)
}

async fn tenant(c: TenantCmd) -> anyhow::Result<ExitCode> {
    let api = AdminClient::from_env();
    let v = match c {
        TenantCmd::Create {
            id,
            name,
            products,
            quota,
        } => {
            let body = obj(vec![
                ("id", Some(json!(id))),
                ("name", name.map(|n| json!(n))),
                ("products", Some(json!(products))),
                ("token_quota", quota.map(|q| json!(q))),
            ]);
            api.expect_ok(Method::POST, "/v1/tenants", Some(body))
                .await?
        }
        TenantCmd::List => api.expect_ok(Method::GET, "/v1/tenants", None).await?,
        TenantCmd::Show { id } => {
            api.expect_ok(Method::GET, &format!("/v1/tenants/{id}"), None)
                .await?
        }
        TenantCmd::Update {
            id,
            name,
            products,
            quota,
        } => {
            let body = obj(vec![
                ("name", name.map(|n| json!(n))),
                ("products", products.map(|p| json!(p))),
                ("token_quota", quota.map(|q| json!(q))),
            ]);
            api.expect_ok(Method::PATCH, &format!("/v1/tenants/{id}"), Some(body))
                .await?
        }
        TenantCmd::Delete { id } => {
            api.expect_ok(Method::DELETE, &format!("/v1/tenants/{id}"), None)
                .await?;
            json!({"deleted": id})
        }
    };
    print(&v);
    Ok(ExitCode::SUCCESS)
}

async fn token(c: TokenCmd) -> anyhow::Result<ExitCode> {
    let api = AdminClient::from_env();
    let v = match c {
        TokenCmd::Create {
            tenant,
            allow,
            name,
            products,
            expires_at,
        } => {
            let body = obj(vec![
                ("ip_allowlist", Some(json!(allow))),
                ("name", name.map(|n| json!(n))),
                ("products", products.map(|p| json!(p))),
                ("expires_at", expires_at.map(|e| json!(e))),
            ]);
            api.expect_ok(
                Method::POST,
                &format!("/v1/tenants/{tenant}/tokens"),
                Some(body),
            )
            .await?
        }
        TokenCmd::List { tenant } => {
            api.expect_ok(Method::GET, &format!("/v1/tenants/{tenant}/tokens"), None)
                .await?
        }
        TokenCmd::Show { id } => {
            api.expect_ok(Method::GET, &format!("/v1/tokens/{id}"), None)
                .await?
        }
        TokenCmd::Update {
            id,
            allow,
            name,
            products,
            expires_at,
            disable,
            enable,
        } => {
            let disabled = match (disable, enable) {
                (true, _) => Some(json!(true)),
                (_, true) => Some(json!(false)),
                _ => None,
            };
            let body = obj(vec![
                ("ip_allowlist", allow.map(|a| json!(a))),
                ("name", name.map(|n| json!(n))),
                ("products", products.map(|p| json!(p))),
                ("expires_at", expires_at.map(|e| json!(e))),
                ("disabled", disabled),
            ]);
            api.expect_ok(Method::PATCH, &format!("/v1/tokens/{id}"), Some(body))
                .await?
        }
        TokenCmd::Revoke { id } => {
            api.expect_ok(Method::DELETE, &format!("/v1/tokens/{id}"), None)
                .await?;
            json!({"revoked": id})
        }
        TokenCmd::Rotate { id, grace } => {
            let body = obj(vec![("grace", grace.map(|g| json!(g)))]);
            api.expect_ok(Method::POST, &format!("/v1/tokens/{id}/rotate"), Some(body))
                .await?
        }
    };
    print(&v);
    Ok(ExitCode::SUCCESS)
}

async fn store(c: StoreCmd) -> anyhow::Result<ExitCode> {
    match c {
        StoreCmd::Export(a) => {
            let config = Config::load(&a.config).map_err(|e| anyhow::anyhow!("{e}"))?;
            let n = tollgate::store::transfer::export(&config, std::io::stdout().lock()).await?;
            eprintln!("exported {n} records");
        }
        StoreCmd::Import(a) => {
            let config = Config::load(&a.config).map_err(|e| anyhow::anyhow!("{e}"))?;
            let n = tollgate::store::transfer::import(&config, std::io::stdin().lock()).await?;
            eprintln!("imported {n} records");
        }
    }
    Ok(ExitCode::SUCCESS)
}
