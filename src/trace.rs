//! Follow one request: with `RUST_LOG=paytrace::trace=debug`, every hop a request makes logs one
//! line — its request id, the unit (01–07) and its name, the step, the milliseconds since it was
//! read off the socket, the slice of the budget the step was given, and the budget left:
//!
//! ```text
//! trace req=req_5d1c… unit=04 name=pool step=acquire since_ms=0.9 slice_ms=250 left_ms=2999.1 borrowed in 0.1 ms
//! ```
//!
//! Off by default, and then each hop costs one check of the log level.

use std::fmt;
use std::time::{Duration, Instant};

use crate::deadline::Deadline;

/// The log target: `RUST_LOG=paytrace::trace=debug` turns the trace on.
pub const TARGET: &str = "paytrace::trace";

/// The seven units a request passes through, numbered as the README and `lib.rs` number them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unit {
    Accept = 1,
    Middleware = 2,
    Workers = 3,
    Pool = 4,
    Idempotency = 5,
    Breaker = 6,
    Shutdown = 7,
}

impl Unit {
    pub fn number(self) -> u8 {
        self as u8
    }

    pub fn name(self) -> &'static str {
        match self {
            Unit::Accept => "accept",
            Unit::Middleware => "middleware",
            Unit::Workers => "workers",
            Unit::Pool => "pool",
            Unit::Idempotency => "idempotency",
            Unit::Breaker => "breaker",
            Unit::Shutdown => "shutdown",
        }
    }
}

/// Whether hops are logged at all. `format_args!` evaluates its arguments before [`hop`] can
/// look at the level, so a caller whose arguments cost something (a lock, an allocation) asks
/// first.
pub fn enabled() -> bool {
    log::log_enabled!(target: TARGET, log::Level::Debug)
}

/// Logs one hop of `request_id`'s request against its `deadline`, now.
pub fn hop(
    request_id: &str,
    deadline: &Deadline,
    unit: Unit,
    step: &str,
    slice: Option<Duration>,
    what: fmt::Arguments,
) {
    if enabled() {
        log::debug!(
            target: TARGET,
            "{}",
            line(request_id, deadline, Instant::now(), unit, step, slice, what)
        );
    }
}

fn ms(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64() * 1000.0)
}

/// The text of one hop (pure, for the unit tests).
fn line(
    request_id: &str,
    deadline: &Deadline,
    now: Instant,
    unit: Unit,
    step: &str,
    slice: Option<Duration>,
    what: fmt::Arguments,
) -> String {
    format!(
        "trace req={request_id} unit={:02} name={} step={step} since_ms={} slice_ms={} left_ms={} {what}",
        unit.number(),
        unit.name(),
        ms(deadline.elapsed(now)),
        slice.map_or_else(|| "-".to_string(), |s| s.as_millis().to_string()),
        ms(deadline.remaining(now)),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hop_names_request_unit_step_time_slice_and_budget_left() {
        let t0 = Instant::now();
        let d = Deadline::new(t0, Duration::from_millis(3000));
        let l = line(
            "req_1",
            &d,
            t0 + Duration::from_millis(12),
            Unit::Breaker,
            "call",
            Some(Duration::from_millis(950)),
            format_args!("charged"),
        );
        assert_eq!(
            l,
            "trace req=req_1 unit=06 name=breaker step=call since_ms=12.0 slice_ms=950 left_ms=2988.0 charged"
        );
        let l = line(
            "r",
            &d,
            t0 + Duration::from_secs(4),
            Unit::Accept,
            "read",
            None,
            format_args!(""),
        );
        assert!(l.contains("unit=01 name=accept"), "{l}");
        assert!(l.contains("slice_ms=- left_ms=0.0"), "{l}");
    }
}
