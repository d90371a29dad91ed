//! The request's budget: one deadline, divided down the stack.
//!
//! A request gets one budget (`--request-timeout`, or less if the client asks with
//! `Request-Timeout-Ms`) that starts when it is read off the socket, so time spent queued
//! counts. Every later step takes a slice of what is left:
//!
//! `slice = min(step's configured timeout, remaining − what the later steps need)`
//!
//! where each later step keeps back a tenth of its configured timeout, and the provider call
//! also leaves [`TIMER_OVERRUN`] unused: a ureq timeout fires 10–25 ms late on a busy machine,
//! and that lateness must come out of the call's own slice, not out of the persist after it.
//! The start-up check (`2 × (acquire + write) + provider < request`) guarantees that a request
//! which has not waited gets every step's full timeout. A request that has waited, or whose
//! client asked for less, sees its later steps squeezed, and a step whose slice would be smaller
//! than its useful minimum (half of what it keeps back) fails fast without starting: the
//! innermost slow thing fails first.
//!
//! One exception: persist — recording what became of a payment the claim created, above all
//! of a charge that was sent — is never refused for lack of budget. Its two operations always
//! get their configured timeouts, and at least [`PERSIST_FLOOR`], however late the earlier
//! steps ran: answering a little late (only when something overran or the database is
//! contended) beats leaving a charge the database does not know about.
//!
//! Pure: no I/O, time comes from the caller (`now`), so it is unit-tested to the millisecond.

use std::time::{Duration, Instant};

/// How late a provider call's timeout may fire: its slice leaves this much of the budget
/// unused. Measured: a call given 295 ms returned after 306–319 ms on a busy 2-core machine.
pub const TIMER_OVERRUN: Duration = Duration::from_millis(30);

/// The least each persist operation may wait (for the writer to take it, then for
/// SQLite's lock), even when `--acquire-timeout` or `--write-timeout` is shorter. A short
/// acquire timeout sheds load before work starts; once the charge was sent there is no work
/// left to shed, only a record to lose. (Measured with 20 ms timeouts on a busy 2-core machine:
/// one persist in ten missed 20 ms behind the housekeeping thread's writes.)
pub const PERSIST_FLOOR: Duration = Duration::from_millis(250);

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

    /// Whether this operation records the outcome of a claimed payment: it has a floor that
    /// no earlier overrun can take.
    pub fn records_outcome(self) -> bool {
        matches!(self, Op::PersistAcquire | Op::PersistWrite)
    }

    /// What `op` leaves unused at the end of its own slice (timers fire late).
    fn overrun_allowance(self) -> Duration {
        match self {
            Op::ProviderCall => TIMER_OVERRUN,
            _ => Duration::ZERO,
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
    /// earlier step finishing a few milliseconds late (timers are not exact) does not stop the
    /// next one from starting.
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
    /// or [`Exhausted`] when that is less than the operation's useful minimum. The persist
    /// operations always get their configured timeout, at least [`PERSIST_FLOOR`] (see the
    /// module docs).
    pub fn slice(&self, now: Instant, timeouts: &Timeouts, op: Op) -> Result<Duration, Exhausted> {
        if op.records_outcome() {
            return Ok(timeouts.configured(op).max(PERSIST_FLOOR));
        }
        let available = self
            .remaining(now)
            .saturating_sub(timeouts.reserve_after(op))
            .saturating_sub(op.overrun_allowance());
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
        // Persist keeps 10 + 10 ms back and the call leaves 30 ms for its timer's overrun,
        // so 950 ms are available at t0.
        assert_eq!(d.slice(t0, &t, Op::ProviderCall), Ok(MS(500)));
        assert_eq!(d.slice(t0 + MS(600), &t, Op::ProviderCall), Ok(MS(350)));
        assert_eq!(d.slice(t0 + MS(700), &t, Op::ProviderCall), Ok(MS(250)));
    }

    #[test]
    fn a_step_without_a_useful_slice_does_not_start_and_names_itself() {
        let t0 = Instant::now();
        let d = Deadline::new(t0, MS(3000));
        let t = defaults();
        // 2900 ms gone: 100 ms left, persist keeps 50 back and the call leaves 30 for its
        // timer's overrun: the provider would get 20 < 50.
        assert_eq!(
            d.slice(t0 + MS(2900), &t, Op::ProviderCall),
            Err(Exhausted {
                step: Step::Provider
            })
        );
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
        // 300 ms − what persist keeps back (50 ms) − the timer allowance (30 ms).
        assert_eq!(short.slice(t0, &defaults(), Op::ProviderCall), Ok(MS(220)));
    }

    #[test]
    fn persist_is_never_refused_however_late_the_provider_call_returned() {
        // The reproduction of the bug: a 300 ms client budget, 20 ms acquire and write
        // timeouts, and a provider call that overran its slice by more than the allowance.
        let t0 = Instant::now();
        let t = Timeouts {
            acquire: MS(20),
            write: MS(20),
            provider: MS(1000),
        };
        let d = Deadline::new(t0, MS(3000)).shortened_to(MS(300));
        let slice = d.slice(t0, &t, Op::ProviderCall).unwrap();
        assert_eq!(
            slice,
            MS(300 - 4 - 30),
            "the call leaves room for its timer"
        );
        let returned = t0 + slice + MS(40);
        assert_eq!(
            d.remaining(returned),
            Duration::ZERO,
            "the overrun ate it all"
        );
        // Persist gets its floor, not the configured 20 ms: nothing is left to shed.
        assert_eq!(d.slice(returned, &t, Op::PersistAcquire), Ok(PERSIST_FLOOR));
        assert_eq!(d.slice(returned, &t, Op::PersistWrite), Ok(PERSIST_FLOOR));
        // Even far past the deadline the outcome is still recorded.
        assert_eq!(
            d.slice(t0 + MS(900), &t, Op::PersistWrite),
            Ok(PERSIST_FLOOR)
        );
        // A longer configured timeout is kept.
        let long = Timeouts {
            write: MS(400),
            ..t
        };
        assert_eq!(d.slice(returned, &long, Op::PersistWrite), Ok(MS(400)));
        // Nothing else starts once the budget is gone.
        assert!(d.slice(returned, &t, Op::ClaimAcquire).is_err());
        assert!(d.slice(returned, &t, Op::ProviderCall).is_err());
    }

    #[test]
    fn without_overrun_the_timer_allowance_leaves_persist_its_reserve_inside_the_budget() {
        let t0 = Instant::now();
        let t = defaults();
        let d = Deadline::new(t0, MS(500));
        let slice = d.slice(t0, &t, Op::ProviderCall).unwrap();
        // A call that used its whole slice and fired exactly late by the allowance still
        // leaves persist's 50 ms inside the budget.
        let returned = t0 + slice + TIMER_OVERRUN;
        assert_eq!(d.remaining(returned), MS(50));
    }

    #[test]
    fn remaining_never_underflows() {
        let t0 = Instant::now();
        let d = Deadline::new(t0, MS(10));
        assert_eq!(d.remaining(t0 + MS(50)), Duration::ZERO);
        assert_eq!(d.elapsed(t0 + MS(50)), MS(50));
    }
}
