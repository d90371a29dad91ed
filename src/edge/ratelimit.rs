//! The rate limit, per API key: a token bucket holding one second's worth of requests, refilled
//! continuously at `--rate-limit`. Pure: time is passed in.
//!
//! Its state is advertised on every authenticated response with the headers of
//! draft-ietf-httpapi-ratelimit-headers: `RateLimit-Policy: "default";q=<quota>;w=<window>` and
//! `RateLimit: "default";r=<remaining>;t=<seconds until full>`.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant;

use crate::config::Rate;

/// What the limiter decided for one request.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Decision {
    pub allowed: bool,
    /// Whole requests left in the bucket after this one.
    pub remaining: u64,
    /// Seconds until the bucket is full again.
    pub reset_s: u64,
    /// When refused: seconds until one request fits.
    pub retry_after_s: u64,
}

struct Bucket {
    tokens: f64,
    at: Instant,
}

pub struct RateLimiter {
    rate: Rate,
    per_second: f64,
    capacity: f64,
    /// One bucket per caller scope; bounded by the configured keys, since auth runs first.
    buckets: Mutex<HashMap<String, Bucket>>,
}

impl RateLimiter {
    pub fn new(rate: Rate) -> RateLimiter {
        let per_second = rate.per_second();
        RateLimiter {
            rate,
            per_second,
            capacity: per_second.max(1.0),
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Takes one token for `scope` at `now`, if there is one.
    pub fn check(&self, scope: &str, now: Instant) -> Decision {
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        let bucket = buckets.entry(scope.to_string()).or_insert(Bucket {
            tokens: self.capacity,
            at: now,
        });
        let elapsed = now.saturating_duration_since(bucket.at).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * self.per_second).min(self.capacity);
        bucket.at = now;
        let allowed = bucket.tokens >= 1.0;
        if allowed {
            bucket.tokens -= 1.0;
        }
        let to_full = (self.capacity - bucket.tokens) / self.per_second;
        let to_one = ((1.0 - bucket.tokens) / self.per_second).max(0.0);
        Decision {
            allowed,
            remaining: bucket.tokens.floor() as u64,
            reset_s: to_full.ceil() as u64,
            retry_after_s: (to_one.ceil() as u64).max(1),
        }
    }

    /// `RateLimit-Policy` value.
    pub fn policy_header(&self) -> String {
        format!(
            "\"default\";q={};w={}",
            self.rate.quota,
            self.rate.window.as_secs()
        )
    }

    /// `RateLimit` value for a decision.
    pub fn state_header(d: &Decision) -> String {
        format!("\"default\";r={};t={}", d.remaining, d.reset_s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse_rate;
    use std::time::Duration;

    #[test]
    fn a_burst_of_one_seconds_worth_then_refusal_then_refill() {
        let rl = RateLimiter::new(parse_rate("10/s").unwrap());
        let t0 = Instant::now();
        for i in 0..10 {
            let d = rl.check("a", t0);
            assert!(d.allowed, "request {i}");
            assert_eq!(d.remaining, 9 - i);
        }
        let refused = rl.check("a", t0);
        assert!(!refused.allowed);
        assert_eq!(refused.retry_after_s, 1);
        assert_eq!(refused.reset_s, 1);
        // Another key has its own bucket.
        assert!(rl.check("b", t0).allowed);
        // 100 ms later one token has come back.
        assert!(rl.check("a", t0 + Duration::from_millis(100)).allowed);
        assert!(!rl.check("a", t0 + Duration::from_millis(100)).allowed);
        // After a second the bucket is full again, never fuller.
        let d = rl.check("a", t0 + Duration::from_secs(5));
        assert!(d.allowed);
        assert_eq!(d.remaining, 9);
    }

    #[test]
    fn slow_rates_wait_whole_seconds() {
        let rl = RateLimiter::new(parse_rate("30/m").unwrap());
        let t0 = Instant::now();
        assert!(rl.check("a", t0).allowed);
        let d = rl.check("a", t0);
        assert!(!d.allowed);
        assert_eq!(d.retry_after_s, 2);
        assert_eq!(rl.policy_header(), "\"default\";q=30;w=60");
        assert_eq!(RateLimiter::state_header(&d), "\"default\";r=0;t=2");
    }
}
