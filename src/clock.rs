//! Time as a collaborator: the server asks an injected [`Clock`], and hands the instant it got
//! to the pure parts (deadline, rate limiter, breaker), which take `now` as an argument. Their
//! unit tests are the fake clock: they pass instants they made up, to the millisecond.

use std::time::Instant;

pub trait Clock: Send + Sync {
    fn now(&self) -> Instant;
}

/// The real monotonic clock.
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Instant {
        Instant::now()
    }
}
