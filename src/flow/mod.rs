//! The payment flow, without an HTTP server: plain functions over plain inputs (the parsed
//! payment, the caller's scope, the key, the deadline) returning plain results — the answer, and
//! in the request's [`Report`] what happened on the way. The tiny_http adapter (`edge::routes`)
//! reads a request and calls them; the async twin calls the same steps.
//!
//! - [`validate`]: the body and the key, checked before anything is borrowed.
//! - [`payment::create`]: claim → charge → settle → persist → answer, each step with its slice;
//!   it is [`payment::begin`] (validate, claim), the provider call, and [`payment::finish`]
//!   (settle, persist, answer), which the async twin (`src/bin/paytrace-async/`) composes
//!   around its awaited call.
//! - [`outcome::settle`]: the one mapping from a provider outcome to a status and an answer.
//! - [`read`]: `GET /payments/{id}` and `GET /payments`.
//! - [`reconciler`]: settles, later, what a request could not.

pub mod outcome;
pub mod payment;
pub mod read;
pub mod reconciler;
pub mod validate;

use std::time::{Duration, Instant};

use crate::app::App;
use crate::deadline::{Deadline, Exhausted, Op, Step};
use crate::error::ApiError;
use crate::store::db::{DbError, Payment};
use crate::store::engine::{Reader, Store};
use crate::store::writer::Written;
use crate::trace::{self, Unit};

/// Who is asking, and by when: what every step is handed.
#[derive(Clone, Copy, Debug)]
pub struct Caller<'a> {
    /// For logs and problem bodies.
    pub request_id: &'a str,
    /// The caller's scope (from its API key): payments and keys belong to it.
    pub scope: &'a str,
    /// The request's budget as the middleware left it (shortened by `Request-Timeout-Ms` if
    /// the client asked), started when the request was read off the socket.
    pub deadline: Deadline,
}

/// How long each step took; the two acquisitions of a payment add up under `acquire`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Timings([Duration; 5]);

impl Timings {
    pub fn add(&mut self, step: Step, d: Duration) {
        self.0[step as usize] += d;
    }

    pub fn get(&self, step: Step) -> Duration {
        self.0[step as usize]
    }
}

/// What happened to one request besides its answer, for the observation layer to log and
/// count. The worker owns one per request and lends it to the handler, so that what was
/// recorded survives even a panic; nothing else reads or writes it.
#[derive(Clone, Debug, Default)]
pub struct Report {
    pub timings: Timings,
    /// The timeout the provider call was given (its slice of the budget), if it was made.
    pub provider_slice: Option<Duration>,
    /// What the idempotency table decided.
    pub idempotency: Option<&'static str>,
    /// Why the request was refused to protect the server, if it was (`requests_shed_total`).
    pub shed: Option<&'static str>,
}

/// The slice of `caller`'s deadline that `op` may take, starting now; a step that cannot get a
/// useful one does not start (and the trace says where the request stopped).
fn slice(app: &App, caller: &Caller, op: Op) -> Result<Duration, ApiError> {
    caller
        .deadline
        .slice(app.clock.now(), &app.timeouts, op)
        .map_err(|Exhausted { step }| {
            let unit = match op {
                Op::ClaimAcquire | Op::PersistAcquire => Unit::Pool,
                Op::ClaimWrite | Op::PersistWrite => Unit::Idempotency,
                Op::ProviderCall => Unit::Breaker,
            };
            trace::hop(
                caller.request_id,
                &caller.deadline,
                unit,
                step.name(),
                None,
                format_args!("not started: the budget left no useful slice (504)"),
            );
            ApiError::DeadlineExceeded {
                step,
                payment: None,
            }
        })
}

/// Borrows a connection to read with from the pool (unit 04) within the slice `op` may take. A
/// timeout is 503 `overloaded`: nothing was done, the client may retry.
fn borrow(app: &App, caller: &Caller, op: Op, report: &mut Report) -> Result<Reader, ApiError> {
    let timeout = slice(app, caller, op)?;
    let t = Instant::now();
    let taken = app.db.acquire(timeout);
    report.timings.add(Step::Acquire, t.elapsed());
    trace::hop(
        caller.request_id,
        &caller.deadline,
        Unit::Pool,
        "acquire",
        Some(timeout),
        format_args!(
            "{} in {:.1} ms",
            if taken.is_ok() {
                "borrowed"
            } else {
                "timed out"
            },
            t.elapsed().as_secs_f64() * 1000.0
        ),
    );
    taken.map_err(|e| match e {
        DbError::AcquireTimeout => pool_timeout(app, report, timeout),
        other => ApiError::Internal(other.to_string()),
    })
}

/// Runs `work` on the store (unit 04) with two slices: `ops.0`'s (the `acquire` step: the wait
/// for the SQLite writer, or for a pooled PostgreSQL connection) and `ops.1`'s (the write and
/// its commit, counted under that operation's step). A write not taken in time was not done:
/// 503 `overloaded`, like a saturated pool.
fn write<T>(
    app: &App,
    caller: &Caller,
    ops: (Op, Op),
    report: &mut Report,
    work: impl FnOnce(&Store, Duration, Duration) -> Written<T>,
) -> Result<Result<T, DbError>, ApiError> {
    let acquire = slice(app, caller, ops.0)?;
    let wait = slice(app, caller, ops.1)?;
    let written = work(&app.db, acquire, wait);
    report.timings.add(Step::Acquire, written.waited);
    report.timings.add(ops.1.step(), written.ran);
    let taken = !matches!(written.result, Err(DbError::AcquireTimeout));
    trace::hop(
        caller.request_id,
        &caller.deadline,
        Unit::Pool,
        "acquire",
        Some(acquire),
        format_args!(
            "{} after {:.1} ms",
            if taken {
                "taken by the writer"
            } else {
                "not taken by the writer"
            },
            written.waited.as_secs_f64() * 1000.0
        ),
    );
    if taken {
        Ok(written.result)
    } else {
        Err(pool_timeout(app, report, acquire))
    }
}

/// 503 `overloaded` for a pool or writer that did not become available within `timeout`.
fn pool_timeout(app: &App, report: &mut Report, timeout: Duration) -> ApiError {
    app.metrics.acquire_timeouts.inc();
    report.shed = Some("pool_timeout");
    ApiError::Overloaded {
        detail: format!(
            "the database did not become available within {} ms (pool size {}); retry shortly",
            timeout.as_millis(),
            app.config.pool_size
        ),
        retry_after_s: 1,
    }
}

/// A failed write as the client sees it; a storage incident's cause is logged here, once per
/// incident, with the request id of the write that found it.
fn db_error(e: DbError, step: Step, payment: Option<&Payment>, request_id: &str) -> ApiError {
    match e {
        DbError::Busy => ApiError::DeadlineExceeded {
            step,
            payment: payment.map(outcome::as_pending),
        },
        DbError::Unavailable {
            cause,
            new_incident,
        } => {
            if new_incident {
                log::error!(
                    "{request_id}: storage unavailable at step {}: {cause}; payments answer 503 and readiness fails until a write succeeds",
                    step.name()
                );
            }
            ApiError::StorageUnavailable {
                payment: payment.map(outcome::as_pending),
            }
        }
        other => ApiError::Internal(other.to_string()),
    }
}
