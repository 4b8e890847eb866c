//! Property tests for the parsers that see untrusted input: request paths,
//! X-Forwarded-For, tokens, allowlists, config text. Whatever the input, they
//! answer (never panic), and what they accept has the promised shape.

use proptest::prelude::*;
use tollgate::auth::TokenFormat;
use tollgate::proxy::client_ip;
use tollgate::proxy::route::normalize_path;

fn path_like() -> impl Strategy<Value = String> {
    // Mostly path characters, dots, slashes and percent-escapes.
    prop::collection::vec(
        prop_oneof![
            Just("/".to_string()),
            Just(".".to_string()),
            Just("..".to_string()),
            Just("%2e".to_string()),
            Just("%2F".to_string()),
            Just("%".to_string()),
            "[a-z0-9%._~-]{0,4}",
            any::<char>().prop_map(|c| c.to_string()),
        ],
        0..24,
    )
    .prop_map(|v| v.concat())
}

proptest! {
    #[test]
    fn normalized_paths_have_no_dot_segments_and_are_stable(p in path_like()) {
        if let Ok(n) = normalize_path(&p) {
            prop_assert!(n.starts_with('/'));
            for seg in n[1..].split('/') {
                prop_assert!(seg != "." && seg != "..", "{} -> {}", p, n);
            }
            // Normalizing again changes nothing.
            let again = normalize_path(&n).unwrap();
            prop_assert_eq!(again.as_ref(), n.as_ref());
        }
    }

    #[test]
    fn a_path_under_a_prefix_after_normalization_never_came_from_dots(
        tail in "[a-z]{1,8}",
        ups in 1usize..4,
    ) {
        // /crm/ followed by enough ../ always leaves /crm/.
        let p = format!("/crm/{}{tail}", "../".repeat(ups));
        let n = normalize_path(&p).unwrap();
        prop_assert!(!n.starts_with("/crm/"), "{}", n);
    }

    #[test]
    fn client_ip_resolution_never_panics_and_returns_a_seen_address(xff in ".{0,200}") {
        let mut h = http::HeaderMap::new();
        if let Ok(v) = http::HeaderValue::from_str(&xff) {
            h.insert("x-forwarded-for", v);
        }
        let peer: std::net::IpAddr = "10.0.0.1".parse().unwrap();
        let trusted = vec!["10.0.0.0/8".parse().unwrap()];
        let ip = client_ip::resolve(peer, &h, &trusted);
        prop_assert!(ip == peer || xff.contains(&ip.to_string()) || xff.contains("::ffff:") || xff.contains('['));
    }

    #[test]
    fn arbitrary_strings_are_never_well_formed_tokens(s in ".{0,80}") {
        let f = TokenFormat::new("tg_");
        // A random string passing prefix, length, alphabet and CRC32 is a
        // 1 in 2^32 event; treat a pass as a failure of the checker.
        prop_assert!(!f.is_well_formed(&s));
    }

    #[test]
    fn allowlist_entries_parse_or_say_which_entry_is_bad(e in ".{0,60}") {
        match tollgate::model::parse_allowlist(std::slice::from_ref(&e), 64, false) {
            Ok(list) => prop_assert_eq!(list.len(), 1),
            Err(msg) => prop_assert!(msg.contains(&format!("{e:?}")) || msg.contains("ip_allowlist"), "{}", msg),
        }
    }

    #[test]
    fn config_parser_answers_any_text(t in ".{0,300}") {
        let _ = tollgate::config::Config::parse(&t);
    }
}
