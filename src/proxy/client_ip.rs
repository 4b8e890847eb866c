//! Client IP resolution: the TCP peer, or, when the peer is a trusted proxy,
//! the right-most `X-Forwarded-For` address that is not itself trusted
//! (nginx `real_ip_recursive on`). IPv4-mapped IPv6 becomes IPv4.

use std::net::IpAddr;

use http::header::HeaderMap;
use ipnet::IpNet;

/// `::ffff:a.b.c.d` → `a.b.c.d`; everything else unchanged.
#[inline]
pub fn unmap(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

fn trusted(ip: IpAddr, proxies: &[IpNet]) -> bool {
    proxies.iter().any(|n| n.contains(&ip))
}

/// Parses one `X-Forwarded-For` element: `1.2.3.4`, `2001:db8::1`,
/// `1.2.3.4:5678` or `[2001:db8::1]:5678`. Zones and garbage give `None`.
fn parse_element(s: &str) -> Option<IpAddr> {
    let s = s.trim();
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Some(ip);
    }
    if let Some(rest) = s.strip_prefix('[') {
        let (ip, tail) = rest.split_once(']')?;
        if !(tail.is_empty()
            || tail
                .strip_prefix(':')
                .is_some_and(|p| p.parse::<u16>().is_ok()))
        {
            return None;
        }
        return ip.parse().ok();
    }
    let (ip, port) = s.rsplit_once(':')?;
    port.parse::<u16>().ok()?;
    ip.parse::<std::net::Ipv4Addr>().ok().map(IpAddr::V4)
}

/// The client IP for a request from `peer` with `headers`.
pub fn resolve(peer: IpAddr, headers: &HeaderMap, proxies: &[IpNet]) -> IpAddr {
    let peer = unmap(peer);
    if proxies.is_empty() || !trusted(peer, proxies) {
        return peer;
    }
    let mut client = peer;
    for value in headers
        .get_all(http::header::HeaderName::from_static("x-forwarded-for"))
        .iter()
        .rev()
    {
        let Ok(text) = value.to_str() else {
            return client;
        };
        for element in text.rsplit(',') {
            match parse_element(element) {
                Some(ip) => {
                    let ip = unmap(ip);
                    client = ip;
                    if !trusted(ip, proxies) {
                        return ip;
                    }
                }
                // Garbage left of trusted hops: the last trusted hop is the
                // best we know.
                None => return client,
            }
        }
    }
    client
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn h(values: &[&str]) -> HeaderMap {
        let mut m = HeaderMap::new();
        for v in values {
            m.append("x-forwarded-for", HeaderValue::from_str(v).unwrap());
        }
        m
    }

    fn nets(v: &[&str]) -> Vec<IpNet> {
        v.iter().map(|s| s.parse().unwrap()).collect()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn untrusted_peer_is_the_client_whatever_the_header_says() {
        let r = resolve(ip("203.0.113.9"), &h(&["1.1.1.1"]), &nets(&["10.0.0.0/8"]));
        assert_eq!(r, ip("203.0.113.9"));
        let r = resolve(ip("10.0.0.1"), &h(&["1.1.1.1"]), &[]);
        assert_eq!(r, ip("10.0.0.1"));
    }

    #[test]
    fn right_most_untrusted_address_wins() {
        let p = nets(&["10.0.0.0/8"]);
        let r = resolve(ip("10.0.0.1"), &h(&["6.6.6.6, 203.0.113.9, 10.0.0.2"]), &p);
        assert_eq!(r, ip("203.0.113.9"));
        // Across several header lines, the last line is the nearest hop.
        let r = resolve(ip("10.0.0.1"), &h(&["6.6.6.6", "203.0.113.9,10.1.1.1"]), &p);
        assert_eq!(r, ip("203.0.113.9"));
    }

    #[test]
    fn all_trusted_gives_the_left_most() {
        let p = nets(&["10.0.0.0/8"]);
        let r = resolve(ip("10.0.0.1"), &h(&["10.9.9.9, 10.0.0.2"]), &p);
        assert_eq!(r, ip("10.9.9.9"));
        let r = resolve(ip("10.0.0.1"), &HeaderMap::new(), &p);
        assert_eq!(r, ip("10.0.0.1"));
    }

    #[test]
    fn garbage_stops_the_walk_at_the_last_good_hop() {
        let p = nets(&["10.0.0.0/8"]);
        for bad in [
            "nonsense",
            "fe80::1%eth0",
            "",
            "1.2.3.4.5",
            "[::1",
            "999.1.1.1",
        ] {
            let r = resolve(ip("10.0.0.1"), &h(&[&format!("{bad}, 10.0.0.7")]), &p);
            assert_eq!(r, ip("10.0.0.7"), "{bad:?}");
        }
        // Garbage left of an untrusted client is never reached.
        let r = resolve(ip("10.0.0.1"), &h(&["garbage, 198.51.100.1"]), &p);
        assert_eq!(r, ip("198.51.100.1"));
        // Non-ASCII bytes in the header.
        let mut m = HeaderMap::new();
        m.append(
            "x-forwarded-for",
            HeaderValue::from_bytes(b"\xff1.2.3.4").unwrap(),
        );
        assert_eq!(resolve(ip("10.0.0.1"), &m, &p), ip("10.0.0.1"));
    }

    #[test]
    fn ports_brackets_and_mapped_addresses() {
        let p = nets(&["10.0.0.0/8", "::1/128"]);
        let r = resolve(ip("::ffff:10.0.0.1"), &h(&["198.51.100.1:443"]), &p);
        assert_eq!(r, ip("198.51.100.1"));
        let r = resolve(ip("::1"), &h(&["[2001:db8::5]:80"]), &p);
        assert_eq!(r, ip("2001:db8::5"));
        let r = resolve(ip("::1"), &h(&["::ffff:198.51.100.2"]), &p);
        assert_eq!(r, ip("198.51.100.2"));
        assert_eq!(unmap(ip("::ffff:127.0.0.2")), ip("127.0.0.2"));
        assert_eq!(unmap(ip("::1")), ip("::1"));
    }

    #[test]
    fn a_huge_header_is_walked_without_trouble() {
        let p = nets(&["10.0.0.0/8"]);
        let long = vec!["10.0.0.3"; 5000].join(", ");
        let r = resolve(ip("10.0.0.1"), &h(&[&format!("198.51.100.1, {long}")]), &p);
        assert_eq!(r, ip("198.51.100.1"));
    }
}
