//! The request's budget: one deadline, divided down the stack.
//!
//! A request gets one budget (`--request-timeout`, or less if the client asks with
//! `Request-Timeout-Ms`) that starts when it is read off the socket, so time spent queued
//! counts. Every later step takes a slice of what is left:
//!
//! `slice = min(step's configured timeout, remaining − what the later steps need)`
//!
//! where each later step keeps back a tenth of its configured timeout.
//! The start-up check (`2 × (acquire + write) + provider < request`) guarantees that a request
//! which has not waited gets every step's full timeout. A request that has waited, or whose
//! client asked for less, sees its later steps squeezed, and a step whose slice would be smaller
//! than its useful minimum (half of what it keeps back) fails fast without starting: the innermost slow thing fails first,
//! and there is always time left to record the outcome and answer.
//!
//! Pure: no I/O, time comes from the caller (`now`), so it is unit-tested to the millisecond.

use std::time::{Duration, Instant};

/// The steps of `POST /payments`, in the order they run. Their names are the `Server-Timing`
/// metric names.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Step {
    /// Waiting in the bounded queue for a worker.
    Queue,
    /// Borrowing a pooled SQLite connection (before claim and before persist).
    Acquire,
    /// The claim transaction: idempotency key + `processing` payment.
    Claim,
    /// The call to the payment provider.
    Provider,
    /// The persist transaction: final status and stored response.
    Persist,
}

impl Step {
    pub const ALL: [Step; 5] = [
        Step::Queue,
        Step::Acquire,
        Step::Claim,
        Step::Provider,
        Step::Persist,
    ];

    /// The access-log field for this step's milliseconds.
    pub fn ms_field(self) -> &'static str {
        match self {
            Step::Queue => "queue_ms",
            Step::Acquire => "acquire_ms",
            Step::Claim => "claim_ms",
            Step::Provider => "provider_ms",
            Step::Persist => "persist_ms",
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Step::Queue => "queue",
            Step::Acquire => "acquire",
            Step::Claim => "claim",
            Step::Provider => "provider",
            Step::Persist => "persist",
        }
    }
}

/// Which of the bounded operations of a payment is about to start; each has its own configured
/// timeout and knows which operations still follow it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    ClaimAcquire,
    ClaimWrite,
    ProviderCall,
    PersistAcquire,
    PersistWrite,
}

impl Op {
    const ORDER: [Op; 5] = [
        Op::ClaimAcquire,
        Op::ClaimWrite,
        Op::ProviderCall,
        Op::PersistAcquire,
        Op::PersistWrite,
    ];

    /// The `Server-Timing` step this operation's time is counted under.
    pub fn step(self) -> Step {
        match self {
            Op::ClaimAcquire | Op::PersistAcquire => Step::Acquire,
            Op::ClaimWrite => Step::Claim,
            Op::ProviderCall => Step::Provider,
            Op::PersistWrite => Step::Persist,
        }
    }
}

/// The configured per-operation timeouts (`--acquire-timeout`, `--write-timeout`,
/// `--provider-timeout`).
#[derive(Clone, Copy, Debug)]
pub struct Timeouts {
    pub acquire: Duration,
    pub write: Duration,
    pub provider: Duration,
}

impl Timeouts {
    fn configured(&self, op: Op) -> Duration {
        match op {
            Op::ClaimAcquire | Op::PersistAcquire => self.acquire,
            Op::ClaimWrite | Op::PersistWrite => self.write,
            Op::ProviderCall => self.provider,
        }
    }

    /// What is kept back for an operation while earlier ones run: a tenth of its timeout.
    fn reserve(&self, op: Op) -> Duration {
        (self.configured(op) / 10).max(Duration::from_millis(1))
    }

    /// The smallest slice worth starting an operation with: half its reserve, so that an
    /// earlier step finishing a few milliseconds late (timers are not exact) cannot leave the
    /// next one, persisting an outcome say, without a useful slice.
    pub fn useful_minimum(&self, op: Op) -> Duration {
        (self.reserve(op) / 2).max(Duration::from_millis(1))
    }

    /// What the operations after `op` have kept back.
    fn reserve_after(&self, op: Op) -> Duration {
        Op::ORDER
            .iter()
            .skip_while(|o| **o != op)
            .skip(1)
            .map(|o| self.reserve(*o))
            .sum()
    }
}

/// One request's deadline.
#[derive(Clone, Copy, Debug)]
pub struct Deadline {
    started: Instant,
    budget: Duration,
}

/// A step could not get a useful slice of what is left: it must not start.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Exhausted {
    pub step: Step,
}

impl Deadline {
    /// A deadline of `budget` starting at `started` (when the request was read off the socket).
    pub fn new(started: Instant, budget: Duration) -> Deadline {
        Deadline { started, budget }
    }

    /// Shortens (never lengthens) the budget, as a client may with `Request-Timeout-Ms`.
    pub fn shortened_to(self, client_budget: Duration) -> Deadline {
        Deadline {
            budget: self.budget.min(client_budget),
            ..self
        }
    }

    pub fn budget(&self) -> Duration {
        self.budget
    }

    pub fn expires_at(&self) -> Instant {
        self.started + self.budget
    }

    pub fn elapsed(&self, now: Instant) -> Duration {
        now.saturating_duration_since(self.started)
    }

    pub fn remaining(&self, now: Instant) -> Duration {
        self.expires_at().saturating_duration_since(now)
    }

    /// The timeout `op` may use, starting `now`: `min(configured, remaining − later needs)`,
    /// or [`Exhausted`] when that is less than the operation's useful minimum.
    pub fn slice(&self, now: Instant, timeouts: &Timeouts, op: Op) -> Result<Duration, Exhausted> {
        let available = self
            .remaining(now)
            .saturating_sub(timeouts.reserve_after(op));
        let slice = timeouts.configured(op).min(available);
        if slice < timeouts.useful_minimum(op) {
            Err(Exhausted { step: op.step() })
        } else {
            Ok(slice)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: fn(u64) -> Duration = Duration::from_millis;

    fn defaults() -> Timeouts {
        Timeouts {
            acquire: MS(250),
            write: MS(250),
            provider: MS(1000),
        }
    }

    #[test]
    fn a_request_that_has_not_waited_gets_every_full_timeout() {
        let t0 = Instant::now();
        let d = Deadline::new(t0, MS(3000));
        let t = defaults();
        assert_eq!(d.slice(t0, &t, Op::ClaimAcquire), Ok(MS(250)));
        assert_eq!(d.slice(t0, &t, Op::ClaimWrite), Ok(MS(250)));
        assert_eq!(d.slice(t0, &t, Op::ProviderCall), Ok(MS(1000)));
        assert_eq!(d.slice(t0, &t, Op::PersistWrite), Ok(MS(250)));
    }

    #[test]
    fn time_spent_queued_squeezes_the_provider_slice_by_that_much() {
        let t0 = Instant::now();
        let d = Deadline::new(t0, MS(1000));
        let t = Timeouts {
            acquire: MS(100),
            write: MS(100),
            provider: MS(500),
        };
        // Persist needs 10 + 10 ms at least, so 980 ms are available at t0.
        assert_eq!(d.slice(t0, &t, Op::ProviderCall), Ok(MS(500)));
        assert_eq!(d.slice(t0 + MS(600), &t, Op::ProviderCall), Ok(MS(380)));
        assert_eq!(d.slice(t0 + MS(700), &t, Op::ProviderCall), Ok(MS(280)));
    }

    #[test]
    fn a_step_without_a_useful_slice_does_not_start_and_names_itself() {
        let t0 = Instant::now();
        let d = Deadline::new(t0, MS(3000));
        let t = defaults();
        // 2930 ms gone: 70 ms left, persist keeps 50 back, provider would get 20 < 50.
        assert_eq!(
            d.slice(t0 + MS(2930), &t, Op::ProviderCall),
            Err(Exhausted {
                step: Step::Provider
            })
        );
        // The persist write, last, may use everything that is left.
        assert_eq!(d.slice(t0 + MS(2930), &t, Op::PersistWrite), Ok(MS(70)));
        assert!(d.slice(t0 + MS(3000), &t, Op::PersistWrite).is_err());
        assert_eq!(
            d.slice(t0 + MS(2990), &t, Op::ClaimAcquire),
            Err(Exhausted {
                step: Step::Acquire
            })
        );
    }

    #[test]
    fn a_client_may_shorten_but_never_lengthen_the_budget() {
        let t0 = Instant::now();
        let d = Deadline::new(t0, MS(3000));
        assert_eq!(d.shortened_to(MS(300)).budget(), MS(300));
        assert_eq!(d.shortened_to(MS(9000)).budget(), MS(3000));
        let short = d.shortened_to(MS(300));
        // 300 ms − the persist minimum (50 ms) leaves 250 ms for the provider.
        assert_eq!(short.slice(t0, &defaults(), Op::ProviderCall), Ok(MS(250)));
    }

    #[test]
    fn remaining_never_underflows() {
        let t0 = Instant::now();
        let d = Deadline::new(t0, MS(10));
        assert_eq!(d.remaining(t0 + MS(50)), Duration::ZERO);
        assert_eq!(d.elapsed(t0 + MS(50)), MS(50));
    }
}
