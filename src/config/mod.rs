//! Configuration: [`file`] is `gateway.toml` as written; [`Config`] is the
//! validated form the gateway runs on (parsed addresses, networks, durations,
//! the compiled route table). Parsing never acts: reload is parse + validate
//! + swap, and `check-config` is parse + validate.

pub mod file;

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;

use crate::auth::TokenFormat;
use crate::proxy::route::{Route, RouteTable, Upstream};
use file::RawConfig;

/// One thing wrong with a config file, with the key it is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigProblem {
    /// Dotted key path (`limits.idle_timeout`, `route[2].upstream`), or empty
    /// when the file itself is unreadable.
    pub key: String,
    pub line: Option<usize>,
    pub message: String,
}

impl fmt::Display for ConfigProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.key.is_empty(), self.line) {
            (true, Some(l)) => write!(f, "line {l}: {}", self.message),
            (true, None) => write!(f, "{}", self.message),
            (false, Some(l)) => write!(f, "{} (line {l}): {}", self.key, self.message),
            (false, None) => write!(f, "{}: {}", self.key, self.message),
        }
    }
}

/// All problems found in a file.
#[derive(Debug, Clone, thiserror::Error)]
pub struct ConfigError {
    pub problems: Vec<ConfigProblem>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.problems.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{p}")?;
        }
        Ok(())
    }
}

impl ConfigError {
    fn one(key: &str, message: impl Into<String>) -> Self {
        ConfigError {
            problems: vec![ConfigProblem {
                key: key.into(),
                line: None,
                message: message.into(),
            }],
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreConfig {
    Embedded { path: PathBuf },
    Redis { url: String, key_prefix: String },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Json,
    Text,
}

#[derive(Debug, Clone)]
pub struct Limits {
    pub max_header_bytes: usize,
    pub header_read_timeout: Duration,
    pub upstream_connect_timeout: Duration,
    pub upstream_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_connections: usize,
    pub shutdown_timeout: Duration,
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub public_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub tls: Option<TlsFiles>,
    pub store: StoreConfig,
    /// blake3 hashes of operator keys from `admin.key_hashes`.
    pub admin_key_hashes: Vec<blake3::Hash>,
    pub default_token_quota: u32,
    pub token_format: TokenFormat,
    pub max_allowlist_entries: usize,
    pub allow_any_ip: bool,
    pub trusted_proxies: Vec<IpNet>,
    pub limits: Limits,
    pub log_format: LogFormat,
    pub log_level: String,
    pub routes: RouteTable,
}

impl Config {
    /// Reads and validates a file. Relative paths inside it (store path, TLS
    /// files) are taken relative to the working directory, like nginx -p.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError::one("", format!("cannot read {}: {e}", path.display())))?;
        Config::parse(&text)
    }

    /// Parses and validates the text of a config file. Every problem is
    /// reported, not only the first (see `every_problem`).
    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        match serde_path_to_error::deserialize(toml::Deserializer::new(text)) {
            Ok(raw) => Config::from_raw(raw, text),
            Err(first) => Err(every_problem(text, first)),
        }
    }

    fn from_raw(raw: RawConfig, text: &str) -> Result<Config, ConfigError> {
        let mut p = Problems {
            list: Vec::new(),
            text,
        };

        let public_addr = p.addr("listen.public", &raw.listen.public);
        let admin_addr = p.addr("listen.admin", &raw.listen.admin);
        if let (Some(a), Some(b)) = (public_addr, admin_addr) {
            if a == b && a.port() != 0 {
                p.add("listen.admin", "must differ from listen.public");
            }
        }
        let tls = raw.listen.tls.as_ref().map(|t| TlsFiles {
            cert: PathBuf::from(&t.cert),
            key: PathBuf::from(&t.key),
        });

        let store = match raw.store.kind.as_str() {
            "embedded" => {
                for k in ["url", "key_prefix"] {
                    let set = if k == "url" {
                        raw.store.url.is_some()
                    } else {
                        raw.store.key_prefix.is_some()
                    };
                    if set {
                        p.add(
                            &format!("store.{k}"),
                            "only used with store.kind = \"redis\"",
                        );
                    }
                }
                Some(StoreConfig::Embedded {
                    path: PathBuf::from(raw.store.path.as_deref().unwrap_or("data/tollgate.db")),
                })
            }
            "redis" => {
                if raw.store.path.is_some() {
                    p.add("store.path", "only used with store.kind = \"embedded\"");
                }
                let url = raw
                    .store
                    .url
                    .clone()
                    .unwrap_or_else(|| "redis://127.0.0.1:6379/0".into());
                if !(url.starts_with("redis://") || url.starts_with("rediss://")) {
                    p.add(
                        "store.url",
                        format!("{url:?} must start with redis:// or rediss://"),
                    );
                }
                let key_prefix = raw
                    .store
                    .key_prefix
                    .clone()
                    .unwrap_or_else(|| "tollgate:".into());
                if key_prefix.contains(['{', '}']) || key_prefix.chars().any(char::is_whitespace) {
                    p.add("store.key_prefix", "must not contain braces or whitespace");
                }
                Some(StoreConfig::Redis { url, key_prefix })
            }
            other => {
                p.add(
                    "store.kind",
                    format!("{other:?} is not a store kind; use \"embedded\" or \"redis\""),
                );
                None
            }
        };

        let mut admin_key_hashes = Vec::new();
        for (i, h) in raw.admin.key_hashes.iter().enumerate() {
            match h.strip_prefix("blake3:").map(blake3::Hash::from_hex) {
                Some(Ok(hash)) => admin_key_hashes.push(hash),
                _ => p.add(
                    &format!("admin.key_hashes[{i}]"),
                    "must be \"blake3:\" followed by 64 hex characters, as printed by `tollgate hash-key`",
                ),
            }
        }

        let default_token_quota = p.int_in(
            "tenants.default_token_quota",
            raw.tenants.default_token_quota,
            0,
            1_000_000,
        );

        let prefix = &raw.tokens.prefix;
        if prefix.is_empty()
            || prefix.len() > 16
            || !prefix
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_')
        {
            p.add(
                "tokens.prefix",
                "must be 1 to 16 characters of [A-Za-z0-9_]",
            );
        }
        let max_allowlist_entries = p.int_in(
            "tokens.max_allowlist_entries",
            raw.tokens.max_allowlist_entries,
            1,
            100_000,
        );

        let mut trusted_proxies = Vec::new();
        for (i, s) in raw.client_ip.trusted_proxies.iter().enumerate() {
            match crate::model::parse_allowlist_entry(s) {
                Ok(n) => trusted_proxies.push(n),
                Err(e) => p.add(&format!("client_ip.trusted_proxies[{i}]"), e),
            }
        }

        let l = &raw.limits;
        let limits = Limits {
            max_header_bytes: p.int_in(
                "limits.max_header_bytes",
                l.max_header_bytes,
                8192,
                16 << 20,
            ),
            header_read_timeout: p.duration("limits.header_read_timeout", &l.header_read_timeout),
            upstream_connect_timeout: p.duration(
                "limits.upstream_connect_timeout",
                &l.upstream_connect_timeout,
            ),
            upstream_timeout: p.duration("limits.upstream_timeout", &l.upstream_timeout),
            idle_timeout: p.duration("limits.idle_timeout", &l.idle_timeout),
            max_connections: p.int_in("limits.max_connections", l.max_connections, 1, 10_000_000),
            shutdown_timeout: p.duration("limits.shutdown_timeout", &l.shutdown_timeout),
        };

        let log_format = match raw.log.format.as_str() {
            "json" => LogFormat::Json,
            "text" => LogFormat::Text,
            other => {
                p.add(
                    "log.format",
                    format!("{other:?} is not \"json\" or \"text\""),
                );
                LogFormat::Json
            }
        };
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&raw.log.level) {
            p.add(
                "log.level",
                format!("{:?} is not a log level or filter: {e}", raw.log.level),
            );
        }

        let mut routes = Vec::new();
        if raw.route.is_empty() {
            p.add("route", "at least one [[route]] is needed");
        }
        for (i, r) in raw.route.iter().enumerate() {
            let key = format!("route[{i}]");
            if !r.prefix.starts_with('/') {
                p.add(
                    &format!("{key}.prefix"),
                    format!("{:?} must start with /", r.prefix),
                );
            } else if r.prefix.contains(['?', '#', '%', '\\'])
                || r.prefix.split('/').any(|s| s == "." || s == "..")
            {
                p.add(
                    &format!("{key}.prefix"),
                    format!(
                        "{:?} must be a plain path without ?, #, %, \\ or dot segments",
                        r.prefix
                    ),
                );
            }
            if routes.iter().any(|x: &Route| *x.prefix == *r.prefix) {
                p.add(
                    &format!("{key}.prefix"),
                    format!("{:?} is used by an earlier route", r.prefix),
                );
            }
            if let Err(e) = crate::model::validate_name("product", &r.product) {
                p.add(&format!("{key}.product"), e);
            }
            let any_https = r
                .upstream
                .as_slice()
                .iter()
                .any(|u| u.starts_with("https://"));
            if r.ca_file.is_some() && !any_https {
                p.add(
                    &format!("{key}.ca_file"),
                    "only used with https:// upstreams",
                );
            }
            let mut upstreams = Vec::new();
            if r.upstream.as_slice().is_empty() {
                p.add(&format!("{key}.upstream"), "needs at least one URL");
            }
            for (j, u) in r.upstream.as_slice().iter().enumerate() {
                let ukey = match r.upstream {
                    file::RawUpstreams::One(_) => format!("{key}.upstream"),
                    file::RawUpstreams::Many(_) => format!("{key}.upstream[{j}]"),
                };
                match Upstream::parse(u) {
                    Ok(up) => upstreams.push(up),
                    Err(e) => p.add(&ukey, e),
                }
            }
            let mut route = Route::new(i, &r.prefix, &r.product, upstreams, r.strip_prefix);
            route.ca_file = r.ca_file.as_ref().map(PathBuf::from);
            routes.push(route);
        }

        if !p.list.is_empty() {
            return Err(ConfigError { problems: p.list });
        }
        Ok(Config {
            public_addr: public_addr.expect("checked"),
            admin_addr: admin_addr.expect("checked"),
            tls,
            store: store.expect("checked"),
            admin_key_hashes,
            default_token_quota: default_token_quota as u32,
            token_format: TokenFormat::new(&raw.tokens.prefix),
            max_allowlist_entries,
            allow_any_ip: raw.tokens.allow_any_ip,
            trusted_proxies,
            limits,
            log_format,
            log_level: raw.log.level.clone(),
            routes: RouteTable::new(routes),
        })
    }

    /// Keys whose change needs a restart; a reload reports them.
    pub fn restart_needed(&self, next: &Config) -> Vec<&'static str> {
        let mut v = Vec::new();
        if self.public_addr != next.public_addr {
            v.push("listen.public");
        }
        if self.admin_addr != next.admin_addr {
            v.push("listen.admin");
        }
        if self.store != next.store {
            v.push("store");
        }
        if self.tls.is_some() != next.tls.is_some() {
            v.push("listen.tls");
        }
        if self.limits.max_connections != next.limits.max_connections {
            v.push("limits.max_connections");
        }
        if self.log_format != next.log_format {
            v.push("log.format");
        }
        v
    }
}

/// Collects problems while validating, so one run reports all of them.
struct Problems<'a> {
    list: Vec<ConfigProblem>,
    text: &'a str,
}

impl Problems<'_> {
    fn add(&mut self, key: &str, message: impl Into<String>) {
        let line = line_of_key(self.text, key);
        self.list.push(ConfigProblem {
            key: key.into(),
            line,
            message: message.into(),
        });
    }

    fn addr(&mut self, key: &str, s: &str) -> Option<SocketAddr> {
        match s.parse::<SocketAddr>() {
            Ok(a) => Some(a),
            Err(_) => {
                self.add(key, format!("{s:?} is not an IP:port address such as \"127.0.0.1:8080\" or \"[::]:8080\""));
                None
            }
        }
    }

    fn duration(&mut self, key: &str, s: &str) -> Duration {
        match humantime::parse_duration(s) {
            Ok(d) if !d.is_zero() => d,
            Ok(_) => {
                self.add(key, "must be greater than zero");
                Duration::from_secs(1)
            }
            Err(e) => {
                self.add(
                    key,
                    format!("{s:?} is not a duration such as \"250ms\" or \"30s\": {e}"),
                );
                Duration::from_secs(1)
            }
        }
    }

    fn int_in(&mut self, key: &str, v: i64, min: i64, max: i64) -> usize {
        if v < min || v > max {
            self.add(key, format!("{v} is out of range {min}..={max}"));
            return min.max(0) as usize;
        }
        v as usize
    }
}

/// Best-effort line of a key (`limits.idle_timeout` → the line that sets
/// `idle_timeout` inside `[limits]`); `None` when the key is a default.
fn line_of_key(text: &str, key: &str) -> Option<usize> {
    let (section, leaf) = match key.rsplit_once('.') {
        Some((s, l)) => (s, l),
        None => ("", key),
    };
    let leaf = leaf.split('[').next().unwrap_or(leaf);
    // route[2].upstream → the third [[route]] table.
    let (section_name, index) = match section.split_once('[') {
        Some((name, rest)) => (name, rest.trim_end_matches(']').parse::<usize>().ok()),
        None => (section, None),
    };
    let mut in_section = section_name.is_empty();
    let mut seen = 0usize;
    for (n, line) in text.lines().enumerate() {
        let t = line.trim();
        if t.starts_with('[') {
            let name = t.trim_matches(|c| c == '[' || c == ']').trim();
            in_section = name == section_name
                && match index {
                    Some(i) => {
                        seen += 1;
                        seen == i + 1
                    }
                    None => true,
                };
            continue;
        }
        if in_section {
            if let Some((k, _)) = t.split_once('=') {
                if k.trim() == leaf {
                    return Some(n + 1);
                }
            }
        }
    }
    None
}

/// serde stops at the first unknown key or value of the wrong type. To
/// report them all, the file is read again as a plain TOML table, the key
/// at fault is taken out, and the typed read is retried until it passes;
/// then what remains is validated like any file. A TOML syntax error stops
/// this at once (nothing after it can be trusted), and so does a problem
/// that is not one key's (a `[[route]]` missing a required key).
fn every_problem(text: &str, first: serde_path_to_error::Error<toml::de::Error>) -> ConfigError {
    let mut problems = toml_problem(text, first).problems;
    let Ok(mut table) = text.parse::<toml::Table>() else {
        return ConfigError { problems };
    };
    // Bounded: each round takes a key out of a finite table.
    for _ in 0..256 {
        let last = &problems[problems.len() - 1];
        let Some(removed) = remove_key(&mut table, &last.key) else {
            break;
        };
        match serde_path_to_error::deserialize::<_, RawConfig>(toml::Value::Table(table.clone())) {
            Ok(raw) => {
                if let Err(e) = Config::from_raw(raw, text) {
                    problems.extend(e.problems);
                }
                break;
            }
            Err(e) => {
                let next = toml_problem(text, e).problems;
                // A required key taken out comes back as "missing": that is
                // the problem already reported, not a new one.
                if next[0]
                    .message
                    .starts_with(&format!("missing field `{removed}`"))
                {
                    break;
                }
                problems.extend(next);
            }
        }
    }
    ConfigError { problems }
}

/// Takes `key` (`limits.idle_timeout`, `route[1].upstream`) out of a TOML
/// table; returns the name of the key removed, or `None` when `key` does
/// not name one table entry.
fn remove_key(table: &mut toml::Table, key: &str) -> Option<String> {
    let mut segments: Vec<&str> = key.split('.').collect();
    let leaf = segments.pop()?;
    if leaf.is_empty() || leaf.contains('[') {
        return None;
    }
    let mut at = table;
    for seg in segments {
        let (name, index) = match seg.split_once('[') {
            Some((n, rest)) => (n, Some(rest.strip_suffix(']')?.parse::<usize>().ok()?)),
            None => (seg, None),
        };
        let value = at.get_mut(name)?;
        let value = match index {
            Some(i) => value.as_array_mut()?.get_mut(i)?,
            None => value,
        };
        at = value.as_table_mut()?;
    }
    at.remove(leaf).map(|_| leaf.to_string())
}

/// A TOML or type error, with the key path serde was at (`limits.idle_timeout`,
/// `route[1].upstream`) and the key's line when it can be found.
fn toml_problem(text: &str, e: serde_path_to_error::Error<toml::de::Error>) -> ConfigError {
    let mut key = e.path().to_string();
    if key == "." {
        key.clear();
    }
    let inner = e.into_inner();
    let message = inner.message().trim().to_string();
    // For an unknown key serde stops at the enclosing table; name the key.
    if let Some(rest) = message.strip_prefix("unknown field `") {
        if let Some((field, _)) = rest.split_once('`') {
            if !key.ends_with(field) {
                key = if key.is_empty() {
                    field.to_string()
                } else {
                    format!("{key}.{field}")
                };
            }
        }
    }
    let line = line_of_key(text, &key).or_else(|| {
        inner
            .span()
            .map(|s| text[..s.start.min(text.len())].matches('\n').count() + 1)
    });
    ConfigError {
        problems: vec![ConfigProblem { key, line, message }],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
[[route]]
prefix = "/crm/"
product = "crm"
upstream = "http://127.0.0.1:7001"
"#;

    #[test]
    fn every_structural_and_value_problem_is_reported_not_only_the_first() {
        let text = format!(
            "{MINIMAL}\n[limits]\nidle_timout = \"5s\"\nupstream_timeout = 30\nshutdown_timeout = \"soon\"\n[log]\nlevle = \"info\"\n"
        );
        let e = Config::parse(&text).unwrap_err();
        let keys: Vec<&str> = e.problems.iter().map(|p| p.key.as_str()).collect();
        for k in [
            "limits.idle_timout",
            "limits.upstream_timeout",
            "limits.shutdown_timeout",
            "log.levle",
        ] {
            assert!(keys.contains(&k), "{k} missing from {e}");
        }
        assert!(e.problems.iter().all(|p| p.line.is_some()), "{e}");
        // A required key of the wrong type is one problem, not two.
        let e = Config::parse(&MINIMAL.replace("\"/crm/\"", "7")).unwrap_err();
        assert_eq!(e.problems.len(), 1, "{e}");
        assert_eq!(e.problems[0].key, "route[0].prefix");
        // A syntax error stops the reading.
        let e = Config::parse("[limits\nidle_timeout = 1").unwrap_err();
        assert_eq!(e.problems.len(), 1, "{e}");
    }

    #[test]
    fn defaults_follow_the_contract() {
        let c = Config::parse(MINIMAL).unwrap();
        assert_eq!(c.public_addr.to_string(), "127.0.0.1:8080");
        assert_eq!(c.admin_addr.to_string(), "127.0.0.1:9090");
        assert_eq!(c.default_token_quota, 1);
        assert_eq!(c.max_allowlist_entries, 64);
        assert!(!c.allow_any_ip);
        assert_eq!(c.limits.max_header_bytes, 65536);
        assert_eq!(c.limits.header_read_timeout, Duration::from_secs(10));
        assert_eq!(c.limits.upstream_connect_timeout, Duration::from_secs(2));
        assert_eq!(c.limits.upstream_timeout, Duration::from_secs(30));
        assert_eq!(c.limits.idle_timeout, Duration::from_secs(60));
        assert_eq!(c.limits.max_connections, 10000);
        assert_eq!(c.limits.shutdown_timeout, Duration::from_secs(30));
        assert_eq!(c.log_format, LogFormat::Json);
        assert_eq!(
            c.store,
            StoreConfig::Embedded {
                path: "data/tollgate.db".into()
            }
        );
    }

    #[test]
    fn unknown_keys_are_errors_that_name_the_key() {
        let e = Config::parse(&format!("{MINIMAL}\n[limits]\nidle_timeot = \"5s\"\n")).unwrap_err();
        assert_eq!(e.problems[0].key, "limits.idle_timeot");
        assert_eq!(e.problems[0].line, Some(8));
        let e = Config::parse(&format!("{MINIMAL}\n[limits]\nidle_timeout = 30\n")).unwrap_err();
        assert_eq!(e.problems[0].key, "limits.idle_timeout");
        assert_eq!(e.problems[0].line, Some(8));
        let e = Config::parse("[[route]]\nprefix = \"/a/\"\nproduct = \"a\"\nupstream = 5\n")
            .unwrap_err();
        assert!(e.problems[0].key.starts_with("route"), "{e}");
    }

    #[test]
    fn bad_values_name_key_and_line() {
        let text = format!("[limits]\nidle_timeout = \"soon\"\n{MINIMAL}");
        let e = Config::parse(&text).unwrap_err();
        assert_eq!(e.problems[0].key, "limits.idle_timeout");
        assert_eq!(e.problems[0].line, Some(2));
        let e = Config::parse("[listen]\npublic = \"localhost\"\n").unwrap_err();
        let keys: Vec<_> = e.problems.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(keys, ["listen.public", "route"]);
    }

    #[test]
    fn route_problems_name_the_route() {
        let text = r#"
[[route]]
prefix = "/crm/"
product = "crm"
upstream = "http://127.0.0.1:7001"

[[route]]
prefix = "msg"
product = "Messaging"
upstream = ["http://127.0.0.1:7002", "ftp://x"]
"#;
        let e = Config::parse(text).unwrap_err();
        let keys: Vec<_> = e.problems.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(
            keys,
            [
                "route[1].prefix",
                "route[1].product",
                "route[1].upstream[1]"
            ]
        );
        assert_eq!(e.problems[0].line, Some(8));
    }

    #[test]
    fn ca_file_without_https_upstream_is_refused() {
        let text = format!("{MINIMAL}ca_file = \"x.pem\"\n");
        let e = Config::parse(&text).unwrap_err();
        assert_eq!(e.problems[0].key, "route[0].ca_file");
    }

    #[test]
    fn admin_key_hashes_must_be_blake3() {
        let good = format!(
            "[admin]\nkey_hashes = [\"blake3:{}\"]\n{MINIMAL}",
            blake3::hash(b"k").to_hex()
        );
        assert_eq!(Config::parse(&good).unwrap().admin_key_hashes.len(), 1);
        let e =
            Config::parse(&format!("[admin]\nkey_hashes = [\"md5:00\"]\n{MINIMAL}")).unwrap_err();
        assert_eq!(e.problems[0].key, "admin.key_hashes[0]");
    }
}
