//! The records the stores keep (tenants and tokens) and the validation rules
//! every store and the admin API share: ids, product names, allowlists,
//! timestamps.

use std::net::IpAddr;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::auth::TokenHash;

/// Unix time in seconds.
pub type UnixTime = i64;

/// A customer of the Open API.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tenant {
    pub id: String,
    pub name: String,
    /// Products bought, by name (`crm`, `messaging`, `marketing`, …).
    pub products: Vec<String>,
    /// Most tokens (active + disabled) the tenant may hold.
    pub token_quota: u32,
    pub created_at: UnixTime,
    /// Bumped by the store on every write; the table ignores older versions.
    #[serde(default)]
    pub version: u64,
}

/// The secret a rotated token replaced, accepted until `until`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PreviousSecret {
    pub hash: TokenHash,
    pub until: UnixTime,
}

/// An API token. The secret itself is never part of it: only its hash.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Token {
    pub id: String,
    pub tenant: String,
    pub name: String,
    pub hash: TokenHash,
    pub ip_allowlist: Vec<IpNet>,
    /// `None`: every product the tenant has bought.
    pub products: Option<Vec<String>>,
    pub created_at: UnixTime,
    pub expires_at: Option<UnixTime>,
    #[serde(default)]
    pub disabled: bool,
    #[serde(default)]
    pub revoked_at: Option<UnixTime>,
    #[serde(default)]
    pub previous: Option<PreviousSecret>,
    #[serde(default)]
    pub last_used_at: Option<UnixTime>,
    #[serde(default)]
    pub version: u64,
}

/// What the admin API shows as `status`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TokenStatus {
    Active,
    Disabled,
    Expired,
    Revoked,
}

impl Token {
    pub fn status(&self, now: UnixTime) -> TokenStatus {
        if self.revoked_at.is_some() {
            TokenStatus::Revoked
        } else if self.expires_at.is_some_and(|e| e <= now) {
            TokenStatus::Expired
        } else if self.disabled {
            TokenStatus::Disabled
        } else {
            TokenStatus::Active
        }
    }

    /// Active and disabled tokens count against the tenant's quota; revoked
    /// and expired ones do not.
    pub fn counts_against_quota(&self, now: UnixTime) -> bool {
        matches!(
            self.status(now),
            TokenStatus::Active | TokenStatus::Disabled
        )
    }
}

/// A new token id: `tok_` + ULID, so ids sort by creation time.
pub fn new_token_id() -> String {
    format!("tok_{}", ulid::Ulid::new())
}

/// Tenant ids and product names: `[a-z0-9][a-z0-9_-]{0,62}`.
pub fn validate_name(kind: &str, s: &str) -> Result<(), String> {
    let b = s.as_bytes();
    let ok = !b.is_empty()
        && b.len() <= 63
        && (b[0].is_ascii_lowercase() || b[0].is_ascii_digit())
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'_' || *c == b'-');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{kind} {s:?} must match [a-z0-9][a-z0-9_-]{{0,62}}"
        ))
    }
}

/// Validates a product list; duplicates are removed, order kept.
pub fn validate_products(list: &[String]) -> Result<Vec<String>, String> {
    let mut out: Vec<String> = Vec::with_capacity(list.len());
    for p in list {
        validate_name("product", p)?;
        if !out.contains(p) {
            out.push(p.clone());
        }
    }
    Ok(out)
}

/// Free-text names (tenant and token `name`): at most 200 characters, no
/// control characters.
pub fn validate_label(kind: &str, s: &str) -> Result<(), String> {
    if s.chars().count() > 200 {
        return Err(format!("{kind} is longer than 200 characters"));
    }
    if s.chars().any(char::is_control) {
        return Err(format!("{kind} contains a control character"));
    }
    Ok(())
}

/// Parses one allowlist entry: an IPv4/IPv6 address (one host) or a CIDR.
/// IPv4-mapped IPv6 entries become IPv4, as mapped peers are matched as IPv4.
/// Host bits in a CIDR are cleared (`10.0.0.1/24` → `10.0.0.0/24`).
pub fn parse_allowlist_entry(entry: &str) -> Result<IpNet, String> {
    let s = entry.trim();
    if s.contains('%') {
        return Err(format!(
            "allowlist entry {entry:?} has an IPv6 zone id; zones are not allowed"
        ));
    }
    let net = if s.contains('/') {
        s.parse::<IpNet>()
            .map_err(|_| format!("allowlist entry {entry:?} is not an IP address or CIDR"))?
    } else {
        let ip = s
            .parse::<IpAddr>()
            .map_err(|_| format!("allowlist entry {entry:?} is not an IP address or CIDR"))?;
        IpNet::from(ip)
    };
    Ok(unmap_net(net).trunc())
}

/// `::ffff:a.b.c.d/(96+n)` → `a.b.c.d/n`.
fn unmap_net(net: IpNet) -> IpNet {
    if let IpNet::V6(v6) = net {
        if let Some(v4) = v6.addr().to_ipv4_mapped() {
            if v6.prefix_len() >= 96 {
                if let Ok(n) = ipnet::Ipv4Net::new(v4, v6.prefix_len() - 96) {
                    return IpNet::V4(n);
                }
            }
        }
    }
    net
}

/// Validates a whole allowlist against the configured limits. Every error
/// names the offending entry.
pub fn parse_allowlist(
    entries: &[String],
    max_entries: usize,
    allow_any_ip: bool,
) -> Result<Vec<IpNet>, String> {
    if entries.is_empty() {
        return Err("ip_allowlist must name at least one address or CIDR".into());
    }
    if entries.len() > max_entries {
        return Err(format!(
            "ip_allowlist has {} entries; at most {max_entries} are allowed (entry {:?} is over the limit)",
            entries.len(),
            entries[max_entries]
        ));
    }
    let mut out = Vec::with_capacity(entries.len());
    for e in entries {
        let net = parse_allowlist_entry(e)?;
        if net.prefix_len() == 0 && !allow_any_ip {
            return Err(format!(
                "allowlist entry {e:?} allows every address; tokens.allow_any_ip is false"
            ));
        }
        if !out.contains(&net) {
            out.push(net);
        }
    }
    Ok(out)
}

/// Current unix time in seconds.
pub fn now() -> UnixTime {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// RFC 3339 (`2026-01-02T03:04:05Z`) for the API.
pub fn format_time(t: UnixTime) -> String {
    time::OffsetDateTime::from_unix_timestamp(t)
        .ok()
        .and_then(|d| {
            d.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| t.to_string())
}

/// Parses an RFC 3339 timestamp with any offset.
pub fn parse_time(s: &str) -> Result<UnixTime, String> {
    time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
        .map(|d| d.unix_timestamp())
        .map_err(|_| format!("{s:?} is not an RFC 3339 timestamp such as 2027-01-31T00:00:00Z"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn allowlist_accepts_hosts_and_cidrs() {
        let l = parse_allowlist(
            &list(&["203.0.113.7", "198.51.100.0/24", "2001:db8::/48", "::1"]),
            64,
            false,
        )
        .unwrap();
        assert_eq!(l[0].to_string(), "203.0.113.7/32");
        assert_eq!(l[1].to_string(), "198.51.100.0/24");
        assert_eq!(l[2].to_string(), "2001:db8::/48");
        assert_eq!(l[3].to_string(), "::1/128");
    }

    #[test]
    fn allowlist_refuses_garbage_and_names_the_entry() {
        for bad in [
            "",
            "1.2.3",
            "1.2.3.4/33",
            "example.com",
            "fe80::1%eth0",
            "1.2.3.4/",
            "::/129",
            " /8",
        ] {
            let err = parse_allowlist(&list(&["10.0.0.1", bad]), 64, false).unwrap_err();
            assert!(err.contains(&format!("{bad:?}")), "{err}");
        }
    }

    #[test]
    fn allowlist_refuses_empty_too_long_and_any() {
        assert!(parse_allowlist(&[], 64, false).is_err());
        let many: Vec<String> = (0..5).map(|i| format!("10.0.0.{i}")).collect();
        let err = parse_allowlist(&many, 4, false).unwrap_err();
        assert!(err.contains("\"10.0.0.4\""), "{err}");
        for any in ["0.0.0.0/0", "::/0", "::ffff:0.0.0.0/96"] {
            let err = parse_allowlist(&list(&[any]), 64, false).unwrap_err();
            assert!(err.contains(any), "{err}");
            assert!(parse_allowlist(&list(&[any]), 64, true).is_ok());
        }
    }

    #[test]
    fn allowlist_unmaps_ipv4_mapped_and_clears_host_bits() {
        let l = parse_allowlist(&list(&["::ffff:10.1.2.3", "10.1.2.3/8"]), 64, false).unwrap();
        assert_eq!(l[0].to_string(), "10.1.2.3/32");
        assert_eq!(l[1].to_string(), "10.0.0.0/8");
    }

    #[test]
    fn names_follow_the_contract_pattern() {
        assert!(validate_name("tenant id", "acme").is_ok());
        assert!(validate_name("tenant id", "0-a_b").is_ok());
        assert!(validate_name("tenant id", &"a".repeat(63)).is_ok());
        for bad in ["", "-a", "_a", "Acme", "a b", "a.b", "é"] {
            assert!(validate_name("tenant id", bad).is_err(), "{bad}");
        }
        assert!(validate_name("tenant id", &"a".repeat(64)).is_err());
    }

    #[test]
    fn times_round_trip() {
        let t = parse_time("2027-01-31T00:00:00Z").unwrap();
        assert_eq!(format_time(t), "2027-01-31T00:00:00Z");
        assert_eq!(parse_time("2027-01-31T02:00:00+02:00").unwrap(), t);
        assert!(parse_time("tomorrow").is_err());
    }
}
