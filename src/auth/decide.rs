//! The authorization decision: a pure function of the grant, the tenant's
//! products, the client IP, the route's product and the time. Everything the
//! data plane enforces after the token lookup lives here.

use std::net::IpAddr;

use crate::model::UnixTime;
use crate::table::Grant;

/// Why a known token may not pass. The order of the checks is the
/// contract's: token state, then IP, then product.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Deny {
    /// Disabled or expired (unknown and revoked tokens never get here).
    InvalidToken,
    IpNotAllowed,
    ProductNotEnabled,
}

/// Decides whether `grant` may call a route of `product` from `client_ip`
/// at `now`. `client_ip` must already be unmapped (`::ffff:a.b.c.d` →
/// `a.b.c.d`); see [`crate::proxy::client_ip`].
pub fn decide(
    grant: &Grant,
    tenant_products: &[Box<str>],
    client_ip: IpAddr,
    product: &str,
    now: UnixTime,
) -> Result<(), Deny> {
    if grant.disabled || grant.expires_at.is_some_and(|e| e <= now) {
        return Err(Deny::InvalidToken);
    }
    if !grant.allowlist.iter().any(|net| net.contains(&client_ip)) {
        return Err(Deny::IpNotAllowed);
    }
    let bought = tenant_products.iter().any(|p| &**p == product);
    let granted = match &grant.products {
        None => true,
        Some(list) => list.iter().any(|p| &**p == product),
    };
    if !(bought && granted) {
        return Err(Deny::ProductNotEnabled);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::table::Grant;

    fn grant(allow: &[&str], products: Option<&[&str]>) -> Grant {
        Grant::for_test(
            allow
                .iter()
                .map(|s| crate::model::parse_allowlist_entry(s).unwrap())
                .collect(),
            products.map(|p| p.iter().map(|s| (*s).into()).collect()),
        )
    }

    fn bought(p: &[&str]) -> Vec<Box<str>> {
        p.iter().map(|s| (*s).into()).collect()
    }

    const NOW: UnixTime = 1_800_000_000;

    #[test]
    fn allowed_when_ip_and_product_match() {
        let g = grant(&["10.0.0.0/8"], None);
        let ip = "10.1.2.3".parse().unwrap();
        assert_eq!(decide(&g, &bought(&["crm"]), ip, "crm", NOW), Ok(()));
    }

    #[test]
    fn ip_outside_every_entry_is_refused() {
        let g = grant(&["10.0.0.0/8", "2001:db8::/32"], None);
        for ip in ["11.0.0.1", "2001:db9::1", "::ffff:10.0.0.1", "127.0.0.1"] {
            let ip = ip.parse().unwrap();
            assert_eq!(
                decide(&g, &bought(&["crm"]), ip, "crm", NOW),
                Err(Deny::IpNotAllowed),
                "{ip}"
            );
        }
        let v6 = "2001:db8::42".parse().unwrap();
        assert_eq!(decide(&g, &bought(&["crm"]), v6, "crm", NOW), Ok(()));
    }

    #[test]
    fn product_must_be_bought_by_tenant_and_granted_to_token() {
        let ip = "10.0.0.1".parse().unwrap();
        let all = grant(&["10.0.0.1"], None);
        assert_eq!(
            decide(&all, &bought(&["crm"]), ip, "marketing", NOW),
            Err(Deny::ProductNotEnabled)
        );
        let only_crm = grant(&["10.0.0.1"], Some(&["crm"]));
        assert_eq!(
            decide(
                &only_crm,
                &bought(&["crm", "messaging"]),
                ip,
                "messaging",
                NOW
            ),
            Err(Deny::ProductNotEnabled)
        );
        // Token lists a product the tenant no longer has.
        let msg = grant(&["10.0.0.1"], Some(&["messaging"]));
        assert_eq!(
            decide(&msg, &bought(&["crm"]), ip, "messaging", NOW),
            Err(Deny::ProductNotEnabled)
        );
        assert_eq!(decide(&only_crm, &bought(&["crm"]), ip, "crm", NOW), Ok(()));
    }

    #[test]
    fn disabled_and_expired_tokens_are_invalid_before_ip_is_checked() {
        let ip = "192.0.2.1".parse().unwrap();
        let mut g = grant(&["10.0.0.1"], None);
        g.disabled = true;
        assert_eq!(
            decide(&g, &bought(&["crm"]), ip, "crm", NOW),
            Err(Deny::InvalidToken)
        );
        let mut g = grant(&["10.0.0.1"], None);
        g.expires_at = Some(NOW);
        assert_eq!(
            decide(&g, &bought(&["crm"]), ip, "crm", NOW),
            Err(Deny::InvalidToken)
        );
        g.expires_at = Some(NOW + 1);
        assert_eq!(
            decide(&g, &bought(&["crm"]), ip, "crm", NOW),
            Err(Deny::IpNotAllowed)
        );
    }

    #[test]
    fn ip_is_checked_before_product() {
        let g = grant(&["10.0.0.1"], Some(&["crm"]));
        let ip = "10.0.0.2".parse().unwrap();
        assert_eq!(
            decide(&g, &bought(&[]), ip, "marketing", NOW),
            Err(Deny::IpNotAllowed)
        );
    }
}
