//! Unguessable identifiers: 128 random bits from the OS-seeded thread RNG, hex-encoded.

/// `pay_` + 128 random bits.
pub fn payment_id() -> String {
    format!("pay_{:032x}", rand::random::<u128>())
}

/// `ch_` + 128 random bits (the simulated provider's charge ids).
pub fn charge_id() -> String {
    format!("ch_{:032x}", rand::random::<u128>())
}

/// `req_` + 64 random bits: enough to tell requests apart in logs, not a secret.
pub fn request_id() -> String {
    format!("req_{:016x}", rand::random::<u64>())
}

/// 1..=max characters, each visible ASCII (0x21..=0x7E): what a request id or an
/// idempotency key may be.
pub fn is_visible_ascii(s: &str, max: usize) -> bool {
    !s.is_empty() && s.len() <= max && s.bytes().all(|b| (0x21..=0x7e).contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_prefixed_and_distinct() {
        let a = super::payment_id();
        assert!(a.starts_with("pay_") && a.len() == 36);
        assert_ne!(a, super::payment_id());
        assert!(super::charge_id().starts_with("ch_"));
        assert!(super::request_id().starts_with("req_"));
    }

    #[test]
    fn request_ids_must_be_visible_ascii() {
        assert!(is_visible_ascii("abc-123", 128));
        assert!(!is_visible_ascii("", 128));
        assert!(!is_visible_ascii("has space", 128));
        assert!(!is_visible_ascii(&"a".repeat(129), 128));
    }
}
