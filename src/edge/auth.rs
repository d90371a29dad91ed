//! Who is calling: the accepted API keys and the scope a key stands for. Plain functions over
//! header values, so the middleware chain (`middleware.rs`) is the only place that knows where
//! the header came from.

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::error::ApiError;

/// Who is calling: derived from the API key, never the key itself (keys are never logged or
/// stored). Payments and idempotency keys are scoped to it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Principal {
    /// First 16 bytes of SHA-256(key), hex.
    pub scope: String,
}

/// The accepted API keys.
pub struct ApiKeys {
    keys: Vec<Vec<u8>>,
}

impl ApiKeys {
    pub fn new(keys: &[String]) -> ApiKeys {
        ApiKeys {
            keys: keys.iter().map(|k| k.as_bytes().to_vec()).collect(),
        }
    }

    /// Compares against every key in constant time, so timing does not reveal a prefix.
    fn check(&self, candidate: &[u8]) -> bool {
        let mut found = subtle::Choice::from(0);
        for k in &self.keys {
            found |= k.as_slice().ct_eq(candidate);
        }
        found.into()
    }
}

pub fn scope_of(key: &str) -> String {
    hex::encode(&Sha256::digest(key.as_bytes())[..16])
}

/// `Authorization: Bearer <key>` with a configured key is a principal; anything else is 401.
pub fn authenticate(keys: &ApiKeys, authorization: Option<&str>) -> Result<Principal, ApiError> {
    let header = authorization.ok_or(ApiError::Unauthorized)?;
    let (scheme, key) = header
        .trim()
        .split_once(' ')
        .ok_or(ApiError::Unauthorized)?;
    let key = key.trim();
    if !scheme.eq_ignore_ascii_case("bearer") || !keys.check(key.as_bytes()) {
        return Err(ApiError::Unauthorized);
    }
    Ok(Principal {
        scope: scope_of(key),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_match_exactly() {
        let keys = ApiKeys::new(&["sk_a".into(), "sk_bb".into()]);
        assert!(keys.check(b"sk_a"));
        assert!(keys.check(b"sk_bb"));
        assert!(!keys.check(b"sk_b"));
        assert!(!keys.check(b"sk_a "));
        assert!(!keys.check(b""));
    }

    #[test]
    fn scopes_do_not_reveal_the_key() {
        let s = scope_of("sk_test_paytrace");
        assert_eq!(s.len(), 32);
        assert!(!s.contains("sk_"));
        assert_ne!(s, scope_of("sk_other"));
    }

    #[test]
    fn auth_accepts_a_configured_bearer_key_and_nothing_else() {
        let keys = ApiKeys::new(&["sk_live_1".into()]);
        for (header, ok) in [
            ("Bearer sk_live_1", true),
            ("bearer sk_live_1", true),
            ("Bearer sk_live_2", false),
            ("Basic sk_live_1", false),
            ("sk_live_1", false),
        ] {
            let principal = authenticate(&keys, Some(header));
            assert_eq!(principal.is_ok(), ok, "{header}");
            if ok {
                assert_eq!(principal.unwrap().scope, scope_of("sk_live_1"));
            }
        }
        assert!(matches!(
            authenticate(&keys, None),
            Err(ApiError::Unauthorized)
        ));
    }
}
