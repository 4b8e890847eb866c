//! The API token format.
//!
//! A token is `PREFIX` + 43 characters of `[A-Za-z0-9]` drawn from the OS
//! CSPRNG (43 × log2(62) ≈ 256.03 bits) + 6 characters of base62 CRC32 over
//! everything before it. The checksum lets the gateway refuse a mistyped or
//! truncated token without a table lookup, and lets secret scanners match
//! tollgate tokens with a regex plus checksum instead of guessing.
//!
//! Only [`TokenHash`] (blake3 of the whole token string) is ever stored.

use std::fmt;
use std::hash::{Hash, Hasher};

use rand::Rng;

/// Characters of randomness in a token.
pub const SECRET_LEN: usize = 43;
/// Characters of checksum at the end of a token.
pub const CHECKSUM_LEN: usize = 6;
/// Longest prefix (`tokens.prefix` is 1-16 of `[A-Za-z0-9_]`).
pub const MAX_PREFIX_LEN: usize = 16;
const BASE62: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

/// blake3 of a token secret: the only form in which a token is kept.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct TokenHash(pub [u8; 32]);

impl TokenHash {
    /// Hashes a token string.
    pub fn of(token: &str) -> Self {
        TokenHash(*blake3::hash(token.as_bytes()).as_bytes())
    }

    /// Lower-case hex, as stored and exported.
    pub fn to_hex(&self) -> String {
        blake3::Hash::from_bytes(self.0).to_hex().to_string()
    }

    /// Parses the 64-character hex form.
    pub fn from_hex(s: &str) -> Result<Self, String> {
        blake3::Hash::from_hex(s)
            .map(|h| TokenHash(*h.as_bytes()))
            .map_err(|_| "token hash must be 64 hex characters".to_string())
    }
}

impl Hash for TokenHash {
    // The value is already a uniform cryptographic hash: feeding 8 of its
    // bytes to the map's hasher is enough (see `table::PassThroughHasher`).
    fn hash<H: Hasher>(&self, state: &mut H) {
        let mut first = [0u8; 8];
        first.copy_from_slice(&self.0[..8]);
        state.write_u64(u64::from_le_bytes(first));
    }
}

impl fmt::Debug for TokenHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TokenHash({}…)", &self.to_hex()[..12])
    }
}

impl serde::Serialize for TokenHash {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_hex())
    }
}

impl<'de> serde::Deserialize<'de> for TokenHash {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        TokenHash::from_hex(&s).map_err(serde::de::Error::custom)
    }
}

/// Creates and checks tokens for one configured prefix.
#[derive(Clone, Debug)]
pub struct TokenFormat {
    prefix: String,
}

impl TokenFormat {
    /// `prefix` has been validated by the config (`[A-Za-z0-9_]{1,16}`).
    pub fn new(prefix: &str) -> Self {
        TokenFormat {
            prefix: prefix.to_string(),
        }
    }

    /// Total length of a token in characters.
    pub fn token_len(&self) -> usize {
        self.prefix.len() + SECRET_LEN + CHECKSUM_LEN
    }

    /// A fresh token from the OS CSPRNG.
    pub fn generate(&self) -> String {
        self.generate_with(&mut rand::rngs::OsRng)
    }

    /// A token drawn from `rng`. Real tokens come from [`Self::generate`];
    /// this exists so benches and tests can make millions of well-formed
    /// tokens quickly and reproducibly.
    pub fn generate_with<R: Rng + ?Sized>(&self, rng: &mut R) -> String {
        let mut s = String::with_capacity(self.token_len());
        s.push_str(&self.prefix);
        for _ in 0..SECRET_LEN {
            s.push(BASE62[rng.gen_range(0..62)] as char);
        }
        let sum = checksum(s.as_bytes());
        s.push_str(std::str::from_utf8(&sum).expect("base62 is ASCII"));
        s
    }

    /// True when `token` has the shape of a tollgate token: a prefix of
    /// 1-16 `[A-Za-z0-9_]`, 43 `[A-Za-z0-9]`, and a correct checksum over
    /// both. Does no lookup and allocates nothing.
    ///
    /// Any prefix passes, not only this format's: the checksum covers the
    /// prefix, so a token is self-describing, and changing `tokens.prefix`
    /// (at a reload, say) names new tokens without locking out every client
    /// that holds one issued under the old prefix.
    pub fn is_well_formed(&self, token: &str) -> bool {
        let b = token.as_bytes();
        let Some(prefix_len) = b.len().checked_sub(SECRET_LEN + CHECKSUM_LEN) else {
            return false;
        };
        if !(1..=MAX_PREFIX_LEN).contains(&prefix_len) {
            return false;
        }
        let (body, sum) = b.split_at(b.len() - CHECKSUM_LEN);
        let (prefix, secret) = body.split_at(prefix_len);
        prefix
            .iter()
            .all(|c| c.is_ascii_alphanumeric() || *c == b'_')
            && secret.iter().all(u8::is_ascii_alphanumeric)
            && checksum(body) == sum
    }
}

/// CRC32 of `data`, as 6 base62 digits (62^6 > 2^32).
fn checksum(data: &[u8]) -> [u8; CHECKSUM_LEN] {
    let mut n = crc32fast::hash(data) as u64;
    let mut out = [b'0'; CHECKSUM_LEN];
    for slot in out.iter_mut().rev() {
        *slot = BASE62[(n % 62) as usize];
        n /= 62;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_tokens_are_well_formed_and_distinct() {
        let f = TokenFormat::new("tg_");
        let a = f.generate();
        let b = f.generate();
        assert_ne!(a, b);
        assert_eq!(a.len(), 3 + 43 + 6);
        assert!(a.starts_with("tg_"));
        assert!(f.is_well_formed(&a));
        assert!(f.is_well_formed(&b));
    }

    #[test]
    fn a_changed_character_fails_the_checksum() {
        let f = TokenFormat::new("tg_");
        let t = f.generate();
        let mut bytes = t.clone().into_bytes();
        bytes[10] = if bytes[10] == b'a' { b'b' } else { b'a' };
        let bad = String::from_utf8(bytes).unwrap();
        assert!(!f.is_well_formed(&bad));
    }

    #[test]
    fn malformed_tokens_are_refused_without_lookup() {
        let f = TokenFormat::new("tg_");
        let t = f.generate();
        assert!(!f.is_well_formed(""));
        assert!(!f.is_well_formed("tg_"));
        assert!(!f.is_well_formed(&t[..t.len() - 1]));
        assert!(!f.is_well_formed(&format!("{t}x")));
        assert!(!f.is_well_formed(&t.replacen("tg_", "xx_", 1)));
        assert!(!f.is_well_formed(&t.replacen("tg_", "TG_", 1)));
        // Right length, wrong alphabet.
        let mut weird = t.clone();
        weird.replace_range(5..6, "-");
        assert!(!f.is_well_formed(&weird));
        // Multibyte characters never panic.
        assert!(!f.is_well_formed(&"é".repeat(26)));
        // A token issued under another prefix is still a token (the
        // checksum covers its prefix), so changing the prefix locks no one
        // out; a prefix swapped on an existing token fails the checksum.
        assert!(TokenFormat::new("acme_").is_well_formed(&t));
        assert!(!f.is_well_formed(&t.replacen("tg_", "acme_", 1)));
        // Prefixes outside 1-16 of [A-Za-z0-9_] are not tokens.
        let long = TokenFormat::new(&"p".repeat(17)).generate();
        assert!(!f.is_well_formed(&long));
        let dashed = TokenFormat::new("tg-").generate();
        assert!(!f.is_well_formed(&dashed));
        assert!(!f.is_well_formed(&t[3..]));
    }

    #[test]
    fn hash_round_trips_through_hex() {
        let h = TokenHash::of("tg_abc");
        assert_eq!(TokenHash::from_hex(&h.to_hex()).unwrap(), h);
        assert!(TokenHash::from_hex("zz").is_err());
        assert_eq!(h.to_hex().len(), 64);
    }

    #[test]
    fn checksum_is_six_base62_digits() {
        let s = checksum(b"tg_hello");
        assert!(s.iter().all(u8::is_ascii_alphanumeric));
        assert_eq!(checksum(&[]), *b"000000");
    }
}
