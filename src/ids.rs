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

#[cfg(test)]
mod tests {
    #[test]
    fn ids_are_prefixed_and_distinct() {
        let a = super::payment_id();
        assert!(a.starts_with("pay_") && a.len() == 36);
        assert_ne!(a, super::payment_id());
        assert!(super::charge_id().starts_with("ch_"));
        assert!(super::request_id().starts_with("req_"));
    }
}
