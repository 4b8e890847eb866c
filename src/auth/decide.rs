//! The authorization decision: a pure function of the grant (with its
//! tenant's products), the client IP, the route's product and the time. Everything the
//! data plane enforces after the token lookup lives here.

use std::net::IpAddr;

use crate::model::UnixTime;
use crate::table::{Grant, Product};

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
/// The product must be bought by the tenant (now: read from the shared
/// tenant) and granted to the token.
#[inline]
pub fn decide(
    grant: &Grant,
    client_ip: IpAddr,
    product: &Product,
    now: UnixTime,
) -> Result<(), Deny> {
    if grant.disabled || grant.expires_at.is_some_and(|e| e <= now) {
        return Err(Deny::InvalidToken);
    }
    if !grant.allowlist.contains(&client_ip) {
        return Err(Deny::IpNotAllowed);
    }
    let bought = grant.tenant.has(product);
    let granted = grant.products.contains(product);
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
        grant_of(allow, products, &[])
    }

    fn grant_of(allow: &[&str], products: Option<&[&str]>, bought: &[&str]) -> Grant {
        Grant::for_test(
            allow
                .iter()
                .map(|s| crate::model::parse_allowlist_entry(s).unwrap())
                .collect(),
            products.map(|p| p.to_vec()),
            bought,
        )
    }

    /// `decide` for `g` with its tenant having bought `bought`.
    fn check(
        g: &Grant,
        bought: &[&str],
        ip: IpAddr,
        product: &str,
        now: UnixTime,
    ) -> Result<(), Deny> {
        let allow = g.allowlist.to_vec();
        let mut with = grant_of(&[], None, bought);
        with.allowlist = allow.into();
        with.products = g.products.clone();
        with.expires_at = g.expires_at;
        with.disabled = g.disabled;
        decide(&with, ip, &Product::new(product), now)
    }

    const NOW: UnixTime = 1_800_000_000;

    #[test]
    fn allowed_when_ip_and_product_match() {
        let g = grant(&["10.0.0.0/8"], None);
        let ip = "10.1.2.3".parse().unwrap();
        assert_eq!(check(&g, &["crm"], ip, "crm", NOW), Ok(()));
    }

    #[test]
    fn ip_outside_every_entry_is_refused() {
        let g = grant(&["10.0.0.0/8", "2001:db8::/32"], None);
        for ip in ["11.0.0.1", "2001:db9::1", "::ffff:10.0.0.1", "127.0.0.1"] {
            let ip = ip.parse().unwrap();
            assert_eq!(
                check(&g, &["crm"], ip, "crm", NOW),
                Err(Deny::IpNotAllowed),
                "{ip}"
            );
        }
        let v6 = "2001:db8::42".parse().unwrap();
        assert_eq!(check(&g, &["crm"], v6, "crm", NOW), Ok(()));
    }

    #[test]
    fn product_must_be_bought_by_tenant_and_granted_to_token() {
        let ip = "10.0.0.1".parse().unwrap();
        let all = grant(&["10.0.0.1"], None);
        assert_eq!(
            check(&all, &["crm"], ip, "marketing", NOW),
            Err(Deny::ProductNotEnabled)
        );
        let only_crm = grant(&["10.0.0.1"], Some(&["crm"]));
        assert_eq!(
            check(&only_crm, &["crm", "messaging"], ip, "messaging", NOW),
            Err(Deny::ProductNotEnabled)
        );
        // Token lists a product the tenant no longer has.
        let msg = grant(&["10.0.0.1"], Some(&["messaging"]));
        assert_eq!(
            check(&msg, &["crm"], ip, "messaging", NOW),
            Err(Deny::ProductNotEnabled)
        );
        assert_eq!(check(&only_crm, &["crm"], ip, "crm", NOW), Ok(()));
    }

    #[test]
    fn disabled_and_expired_tokens_are_invalid_before_ip_is_checked() {
        let ip = "192.0.2.1".parse().unwrap();
        let mut g = grant(&["10.0.0.1"], None);
        g.disabled = true;
        assert_eq!(check(&g, &["crm"], ip, "crm", NOW), Err(Deny::InvalidToken));
        let mut g = grant(&["10.0.0.1"], None);
        g.expires_at = Some(NOW);
        assert_eq!(check(&g, &["crm"], ip, "crm", NOW), Err(Deny::InvalidToken));
        g.expires_at = Some(NOW + 1);
        assert_eq!(check(&g, &["crm"], ip, "crm", NOW), Err(Deny::IpNotAllowed));
    }

    #[test]
    fn ip_is_checked_before_product() {
        let g = grant(&["10.0.0.1"], Some(&["crm"]));
        let ip = "10.0.0.2".parse().unwrap();
        assert_eq!(
            check(&g, &[], ip, "marketing", NOW),
            Err(Deny::IpNotAllowed)
        );
    }
}
