//! Unit 06, the circuit breaker around the payment provider, with resilience4j's semantics.
//! A pure state machine: no I/O, time is passed in.
//!
//! - **Closed**: every call goes through; the outcomes of the last `window` calls are kept.
//!   Once at least `min_calls` are recorded, the breaker opens when `failure_rate` or more of
//!   them failed (5xx, refused or reset connections, timeouts — declines are successes), or
//!   `slow_rate` or more were slower than `slow_call`.
//! - **Open**: every call is rejected at once, for `open_for`; the caller answers with its
//!   fallback (503 and `Retry-After`) and nothing is sent.
//! - **Half-open**: `half_open_calls` trial calls go through, the rest are rejected; when all
//!   trials are recorded the breaker closes if they pass the same thresholds, and opens again
//!   otherwise.
//!
//! Every call takes a [`Permit`] first and records through it; a permit from an earlier state
//! (the breaker moved on while the call was in flight) is ignored when it records, so a slow
//! call from before an opening cannot close the breaker.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The thresholds; every one is a `--breaker-*` flag.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BreakerConfig {
    pub window: usize,
    pub min_calls: usize,
    /// 0.0..=1.0
    pub failure_rate: f64,
    pub slow_call: Duration,
    /// 0.0..=1.0
    pub slow_rate: f64,
    pub open_for: Duration,
    pub half_open_calls: usize,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        BreakerConfig {
            window: 20,
            min_calls: 10,
            failure_rate: 0.5,
            slow_call: Duration::from_millis(500),
            slow_rate: 0.8,
            open_for: Duration::from_secs(5),
            half_open_calls: 3,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    Closed,
    Open,
    HalfOpen,
}

impl State {
    /// The `breaker_state` metric value: 0 closed, 1 open, 2 half-open.
    pub fn as_number(self) -> u8 {
        match self {
            State::Closed => 0,
            State::Open => 1,
            State::HalfOpen => 2,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            State::Closed => "closed",
            State::Open => "open",
            State::HalfOpen => "half-open",
        }
    }
}

/// How one call went, as the breaker counts it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Success,
    Failure,
}

/// Leave to make one call, from the state the breaker was in when it was given.
#[derive(Debug)]
#[must_use = "record the call's outcome through its permit"]
pub struct Permit {
    epoch: u64,
}

/// The breaker refused the call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rejected {
    /// Until the breaker lets a trial call through (zero in half-open: when a trial finishes).
    pub retry_after: Duration,
}

/// A change of state, for the log and the metrics.
#[derive(Clone, Debug, PartialEq)]
pub struct Transition {
    pub from: State,
    pub to: State,
    pub reason: String,
}

/// What the breaker is judging right now, read without changing it (the live page's unit 06):
/// the calls recorded in the current state's window, how many of them failed and how many were
/// slow. An open breaker has an empty window; half-open counts its trial calls.
#[derive(Clone, Debug, PartialEq)]
pub struct Window {
    pub state: State,
    /// How many calls the window holds when full: `window` closed, `half_open_calls` half-open.
    pub size: usize,
    pub recorded: usize,
    pub failed: usize,
    pub slow: usize,
    /// The last change of state, with the counts that caused it (an opening empties the window:
    /// this is where its reason stays visible).
    pub last_transition: Option<Transition>,
}

#[derive(Clone, Copy, Debug)]
struct Call {
    failed: bool,
    slow: bool,
}

struct Inner {
    state: State,
    /// Bumped at every transition; permits from another epoch are ignored.
    epoch: u64,
    opened_at: Instant,
    calls: VecDeque<Call>,
    /// Trial permits handed out in half-open.
    trials_started: usize,
    last_transition: Option<Transition>,
}

pub struct Breaker {
    config: BreakerConfig,
    inner: Mutex<Inner>,
}

impl Breaker {
    pub fn new(config: BreakerConfig, now: Instant) -> Breaker {
        Breaker {
            config,
            inner: Mutex::new(Inner {
                state: State::Closed,
                epoch: 0,
                opened_at: now,
                calls: VecDeque::with_capacity(config.window),
                trials_started: 0,
                last_transition: None,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The state as of `now` (an open breaker whose time is up reads as half-open).
    pub fn state(&self, now: Instant) -> State {
        let inner = self.lock();
        match inner.state {
            State::Open if now >= inner.opened_at + self.config.open_for => State::HalfOpen,
            s => s,
        }
    }

    /// The state as of `now` and the calls it is judging: a read-only snapshot.
    pub fn window(&self, now: Instant) -> Window {
        let inner = self.lock();
        let state = match inner.state {
            State::Open if now >= inner.opened_at + self.config.open_for => State::HalfOpen,
            s => s,
        };
        let (size, calls) = match (inner.state, state) {
            (State::Closed, _) => (self.config.window, Some(&inner.calls)),
            (State::HalfOpen, _) => (self.config.half_open_calls, Some(&inner.calls)),
            // Open, or open with its time up (nothing recorded yet in half-open).
            (State::Open, State::HalfOpen) => (self.config.half_open_calls, None),
            (State::Open, _) => (self.config.window, None),
        };
        let calls = calls.map(|c| c.iter()).into_iter().flatten();
        let (mut recorded, mut failed, mut slow) = (0, 0, 0);
        for c in calls {
            recorded += 1;
            failed += usize::from(c.failed);
            slow += usize::from(c.slow);
        }
        Window {
            state,
            size,
            recorded,
            failed,
            slow,
            last_transition: inner.last_transition.clone(),
        }
    }

    /// Asks to make one call at `now`.
    pub fn try_acquire(&self, now: Instant) -> (Result<Permit, Rejected>, Option<Transition>) {
        let mut inner = self.lock();
        let mut transition = None;
        if inner.state == State::Open {
            let reopens = inner.opened_at + self.config.open_for;
            if now < reopens {
                return (
                    Err(Rejected {
                        retry_after: reopens - now,
                    }),
                    None,
                );
            }
            transition = Some(self.move_to(
                &mut inner,
                State::HalfOpen,
                now,
                "the open period is over".into(),
            ));
        }
        if inner.state == State::HalfOpen {
            if inner.trials_started >= self.config.half_open_calls {
                return (
                    Err(Rejected {
                        retry_after: Duration::ZERO,
                    }),
                    transition,
                );
            }
            inner.trials_started += 1;
        }
        (Ok(Permit { epoch: inner.epoch }), transition)
    }

    /// Records how a permitted call went and how long it took.
    pub fn record(
        &self,
        permit: Permit,
        outcome: Outcome,
        took: Duration,
        now: Instant,
    ) -> Option<Transition> {
        let mut inner = self.lock();
        if permit.epoch != inner.epoch {
            return None;
        }
        let limit = match inner.state {
            State::Closed => self.config.window,
            State::HalfOpen => self.config.half_open_calls,
            State::Open => return None,
        };
        inner.calls.push_back(Call {
            failed: outcome == Outcome::Failure,
            slow: took > self.config.slow_call,
        });
        while inner.calls.len() > limit {
            inner.calls.pop_front();
        }
        let recorded = inner.calls.len();
        let judge_at = match inner.state {
            State::Closed => self.config.min_calls.max(1),
            _ => self.config.half_open_calls,
        };
        if recorded < judge_at {
            return None;
        }
        let failed = inner.calls.iter().filter(|c| c.failed).count();
        let slow = inner.calls.iter().filter(|c| c.slow).count();
        let failure_rate = failed as f64 / recorded as f64;
        let slow_rate = slow as f64 / recorded as f64;
        let counts = format!("{failed} failed and {slow} slow of the last {recorded} calls");
        let tripped =
            failure_rate >= self.config.failure_rate || slow_rate >= self.config.slow_rate;
        match (inner.state, tripped) {
            (State::Closed, true) | (State::HalfOpen, true) => {
                Some(self.move_to(&mut inner, State::Open, now, counts))
            }
            (State::HalfOpen, false) => Some(self.move_to(&mut inner, State::Closed, now, counts)),
            _ => None,
        }
    }

    fn move_to(&self, inner: &mut Inner, to: State, now: Instant, reason: String) -> Transition {
        let from = inner.state;
        inner.state = to;
        inner.epoch += 1;
        inner.calls.clear();
        inner.trials_started = 0;
        if to == State::Open {
            inner.opened_at = now;
        }
        let transition = Transition { from, to, reason };
        inner.last_transition = Some(transition.clone());
        transition
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    const MS: fn(u64) -> Duration = Duration::from_millis;

    fn breaker() -> (Breaker, Instant) {
        let t0 = Instant::now();
        (Breaker::new(BreakerConfig::default(), t0), t0)
    }

    fn call(b: &Breaker, now: Instant, outcome: Outcome, took: Duration) -> Option<Transition> {
        let (permit, _) = b.try_acquire(now);
        b.record(permit.expect("permitted"), outcome, took, now)
    }

    #[test]
    fn it_judges_only_after_the_minimum_number_of_calls() {
        let (b, t0) = breaker();
        for _ in 0..9 {
            assert_eq!(call(&b, t0, Outcome::Failure, MS(1)), None);
        }
        assert_eq!(
            b.state(t0),
            State::Closed,
            "9 failures are fewer than the minimum of 10"
        );
        let t = call(&b, t0, Outcome::Failure, MS(1)).expect("the 10th call opens it");
        assert_eq!((t.from, t.to), (State::Closed, State::Open));
        assert!(t.reason.contains("10 failed"), "{}", t.reason);
    }

    #[test]
    fn half_failures_open_it_fewer_do_not() {
        let (b, t0) = breaker();
        for i in 0..20 {
            let outcome = if i % 3 == 0 {
                Outcome::Failure
            } else {
                Outcome::Success
            };
            assert_eq!(call(&b, t0, outcome, MS(1)), None, "7 of 20 is below 50%");
        }
        let (b, t0) = breaker();
        for i in 0..10 {
            let outcome = if i % 2 == 0 {
                Outcome::Failure
            } else {
                Outcome::Success
            };
            let t = call(&b, t0, outcome, MS(1));
            assert_eq!(t.is_some(), i == 9, "5 of 10 is 50%: opens at the 10th");
        }
    }

    #[test]
    fn the_window_slides_over_the_last_calls_only() {
        let (b, t0) = breaker();
        for _ in 0..9 {
            call(&b, t0, Outcome::Failure, MS(1));
        }
        // Nine failures, then a success: the 10th call sees 9 of 10 failed and opens it.
        assert!(call(&b, t0, Outcome::Success, MS(1)).is_some());
        let (b, t0) = breaker();
        for _ in 0..20 {
            call(&b, t0, Outcome::Success, MS(1));
        }
        for i in 0..9 {
            assert_eq!(call(&b, t0, Outcome::Failure, MS(1)), None, "failure {i}");
        }
        assert!(
            call(&b, t0, Outcome::Failure, MS(1)).is_some(),
            "10 of the last 20 failed"
        );
    }

    #[test]
    fn slow_successes_open_it_at_the_slow_rate() {
        let (b, t0) = breaker();
        for i in 0..10 {
            let took = if i < 8 { MS(600) } else { MS(10) };
            let t = call(&b, t0, Outcome::Success, took);
            assert_eq!(t.is_some(), i == 9, "8 of 10 slow is 80%");
        }
        let (b, t0) = breaker();
        for i in 0..10 {
            let took = if i < 7 { MS(600) } else { MS(10) };
            assert_eq!(call(&b, t0, Outcome::Success, took), None, "call {i}");
        }
        // Exactly at the threshold is not slow.
        let (b, t0) = breaker();
        for _ in 0..10 {
            assert_eq!(call(&b, t0, Outcome::Success, MS(500)), None);
        }
    }

    #[test]
    fn open_rejects_until_its_time_is_up_then_allows_the_trial_calls_only() {
        let (b, t0) = breaker();
        for _ in 0..10 {
            call(&b, t0, Outcome::Failure, MS(1));
        }
        let (r, _) = b.try_acquire(t0 + MS(1000));
        assert_eq!(r.unwrap_err().retry_after, MS(4000));
        assert_eq!(b.state(t0 + MS(4999)), State::Open);
        let later = t0 + MS(5000);
        assert_eq!(b.state(later), State::HalfOpen);
        let (first, t) = b.try_acquire(later);
        assert_eq!(t.map(|t| t.to), Some(State::HalfOpen));
        let second = b.try_acquire(later).0.unwrap();
        let third = b.try_acquire(later).0.unwrap();
        assert!(b.try_acquire(later).0.is_err(), "only three trial calls");
        assert_eq!(
            b.record(first.unwrap(), Outcome::Success, MS(1), later),
            None
        );
        assert_eq!(b.record(second, Outcome::Success, MS(1), later), None);
        let t = b
            .record(third, Outcome::Success, MS(1), later)
            .expect("closes");
        assert_eq!((t.from, t.to), (State::HalfOpen, State::Closed));
        assert!(b.try_acquire(later).0.is_ok());
    }

    #[test]
    fn a_failing_trial_reopens_it() {
        let (b, t0) = breaker();
        for _ in 0..10 {
            call(&b, t0, Outcome::Failure, MS(1));
        }
        let later = t0 + MS(5000);
        let permits: Vec<Permit> = (0..3).map(|_| b.try_acquire(later).0.unwrap()).collect();
        let mut outcomes = vec![Outcome::Success, Outcome::Failure, Outcome::Failure].into_iter();
        let mut last = None;
        for p in permits {
            last = b.record(p, outcomes.next().unwrap(), MS(1), later);
        }
        let t = last.expect("2 of 3 trials failed");
        assert_eq!((t.from, t.to), (State::HalfOpen, State::Open));
        let (r, _) = b.try_acquire(later + MS(1));
        assert_eq!(r.unwrap_err().retry_after, MS(4999));
    }

    #[test]
    fn a_permit_from_before_a_transition_is_ignored() {
        let (b, t0) = breaker();
        let stale = b.try_acquire(t0).0.unwrap();
        for _ in 0..10 {
            call(&b, t0, Outcome::Failure, MS(1));
        }
        let later = t0 + MS(5000);
        for _ in 0..2 {
            let p = b.try_acquire(later).0.unwrap();
            assert_eq!(b.record(p, Outcome::Success, MS(1), later), None);
        }
        assert_eq!(b.record(stale, Outcome::Success, MS(1), later), None);
        assert_eq!(
            b.state(later),
            State::HalfOpen,
            "the stale success did not count as a trial"
        );
    }

    #[test]
    fn many_threads_recording_at_once_open_it_exactly_once() {
        let t0 = Instant::now();
        let b = Arc::new(Breaker::new(BreakerConfig::default(), t0));
        let opened = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        std::thread::scope(|s| {
            for _ in 0..8 {
                let b = b.clone();
                let opened = opened.clone();
                s.spawn(move || {
                    for _ in 0..100 {
                        if let (Ok(p), _) = b.try_acquire(t0)
                            && let Some(t) = b.record(p, Outcome::Failure, MS(1), t0)
                        {
                            assert_eq!(t.to, State::Open);
                            opened.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        }
                    }
                });
            }
        });
        assert_eq!(opened.load(std::sync::atomic::Ordering::SeqCst), 1);
        assert_eq!(b.state(t0), State::Open);
    }

    #[test]
    fn the_window_snapshot_counts_the_calls_being_judged_and_changes_nothing() {
        let (b, t0) = breaker();
        call(&b, t0, Outcome::Failure, MS(1));
        call(&b, t0, Outcome::Success, MS(600));
        call(&b, t0, Outcome::Success, MS(1));
        let w = b.window(t0);
        assert_eq!(
            (w.state, w.size, w.recorded, w.failed, w.slow),
            (State::Closed, 20, 3, 1, 1)
        );
        assert_eq!(w.last_transition, None);
        assert_eq!(b.window(t0), w, "reading it twice changes nothing");
        for _ in 0..7 {
            call(&b, t0, Outcome::Failure, MS(1));
        }
        let w = b.window(t0);
        assert_eq!(
            (w.state, w.recorded),
            (State::Open, 0),
            "an opening empties it"
        );
        let t = w.last_transition.expect("the opening is kept");
        assert!(
            t.reason.contains("8 failed and 1 slow of the last 10"),
            "{}",
            t.reason
        );
        let later = b.window(t0 + MS(5_000));
        assert_eq!((later.state, later.size), (State::HalfOpen, 3));
        assert_eq!(
            b.state(t0 + MS(1)),
            State::Open,
            "the snapshot moved nothing"
        );
    }
}
