//! `POST /payments`, top to bottom: validate, claim (pool + idempotency), charge (breaker +
//! budget), settle, persist, answer. Each step takes its slice of the deadline, counts its time
//! in the report, and logs its hop to the trace.

use std::time::{Duration, Instant, SystemTime};

use super::{Caller, Report, db_error, outcome, slice, validate, write};
use crate::app::App;
use crate::deadline::{Op, Step};
use crate::error::ApiError;
use crate::provider::breaker::State;
use crate::provider::client::{ChargeOutcome, ChargeRequest};
use crate::reply::Reply;
use crate::store::db::Payment;
use crate::store::idempotency::{self, Attempt, NewPayment, NextAction, Persisted, StoredResponse};
use crate::trace::{self, Unit};

/// Creates the payment `body` describes, once per `key`, for `caller`'s scope: [`begin`], the
/// provider call, [`finish`]. Another server composes the same three steps around its own call.
pub fn create(
    app: &App,
    caller: &Caller,
    key: &str,
    body: &[u8],
    report: &mut Report,
) -> Result<Reply, ApiError> {
    let claimed = match begin(app, caller, key, body, report)? {
        Begun::Answered(answer) => return answer,
        Begun::Claimed(claimed) => claimed,
    };

    // 2. Charge: no connection is held; the payment id is the provider's idempotency key.
    let charged = charge(app, caller, &claimed.payment, report);

    // 3–5. Settle, persist, answer.
    finish(app, caller, claimed, charged, report)
}

/// What [`begin`] came to: an answer already (a replay, a key in use or reused), or a payment
/// this attempt now holds the key of and must charge.
#[derive(Debug)]
pub enum Begun {
    Answered(Result<Reply, ApiError>),
    Claimed(Claimed),
}

/// A claimed payment on its way to the provider: the payment, whether an earlier attempt may
/// have charged it, and the attempt's key and lock token (owned, so it can cross threads).
#[derive(Debug)]
pub struct Claimed {
    pub payment: Payment,
    pub resumed: bool,
    key: String,
    token: String,
}

/// Steps 0 and 1: validate the body, then claim the key (pool + idempotency table).
pub fn begin(
    app: &App,
    caller: &Caller,
    key: &str,
    body: &[u8],
    report: &mut Report,
) -> Result<Begun, ApiError> {
    let input = validate::parse_new_payment(body)?;
    // The lock is this attempt's own: a client's X-Request-Id may repeat, and a lock token
    // shared by two attempts would let one finish (or release) the other's key.
    let token = idempotency::new_lock_token();
    let attempt = Attempt {
        scope: caller.scope,
        key,
        token: &token,
    };

    // 1. Claim: borrow a connection, decide in one short transaction, give it back.
    Ok(match claim(app, caller, attempt, &input, report)? {
        NextAction::Replay(stored) => Begun::Answered(Ok(outcome::replay(stored))),
        NextAction::InUse => Begun::Answered(Err(ApiError::KeyInUse)),
        NextAction::Reused => Begun::Answered(Err(ApiError::KeyReused)),
        NextAction::Charge { payment, resumed } => Begun::Claimed(Claimed {
            payment,
            resumed,
            key: key.to_string(),
            token,
        }),
    })
}

/// Steps 3–5, after the provider call (`None`: it was not made, the budget left no slice):
/// settle, persist, answer.
pub fn finish(
    app: &App,
    caller: &Caller,
    claimed: Claimed,
    charged: Option<ChargeOutcome>,
    report: &mut Report,
) -> Result<Reply, ApiError> {
    let Claimed {
        mut payment,
        resumed,
        key,
        token,
    } = claimed;
    if matches!(charged, Some(ChargeOutcome::Rejected { .. })) {
        report.shed = Some("breaker_open");
    }
    let attempt = Attempt {
        scope: caller.scope,
        key: &key,
        token: &token,
    };

    // 3. Settle: what the provider's answer means for the payment and for the client.
    let settled = outcome::settle(
        &mut payment,
        charged,
        resumed,
        caller.request_id,
        SystemTime::now(),
    );

    // 4. Persist: the final status, and the answer to replay when the outcome is final.
    persist(
        app,
        caller,
        attempt,
        &payment,
        settled.stored.as_ref(),
        report,
    )?;

    // 5. Answer.
    settled.answer
}

/// Step 1: hands the claim to the writer, and lets the idempotency table decide.
fn claim(
    app: &App,
    caller: &Caller,
    attempt: Attempt,
    input: &NewPayment,
    report: &mut Report,
) -> Result<NextAction, ApiError> {
    let fingerprint = idempotency::fingerprint("POST", "/payments", input);
    let lock_ttl = app.lock_ttl;
    let decided = write(
        app,
        caller,
        (Op::ClaimAcquire, Op::ClaimWrite),
        report,
        |db, acquire, wait| db.claim(acquire, wait, attempt, &fingerprint, input, lock_ttl),
    )?;
    let action = decided.map_err(|e| db_error(e, Step::Claim, None, caller.request_id))?;
    let decision = match &action {
        NextAction::Replay(_) => "replayed",
        NextAction::InUse => "in-use",
        NextAction::Reused => "reused",
        NextAction::Charge { resumed: true, .. } => "resumed",
        NextAction::Charge { .. } => "new",
    };
    report.idempotency = Some(decision);
    trace::hop(
        caller.request_id,
        &caller.deadline,
        Unit::Idempotency,
        "claim",
        None,
        format_args!(
            "key {decision}, committed in {:.1} ms",
            report.timings.get(Step::Claim).as_secs_f64() * 1000.0
        ),
    );
    Ok(action)
}

/// Step 2: the provider call behind the breaker, within its slice; `None` when the budget left
/// no useful slice, so nothing was sent.
fn charge(
    app: &App,
    caller: &Caller,
    payment: &Payment,
    report: &mut Report,
) -> Option<ChargeOutcome> {
    let timeout = charge_slice(app, caller, report)?;
    let t = Instant::now();
    let charged = app.provider.charge(&charge_request(payment), timeout);
    charged_in(
        caller,
        &charged,
        t.elapsed(),
        timeout,
        app.provider.breaker_state(),
        report,
    );
    Some(charged)
}

/// The provider call's slice of the budget, starting now (and in the report); `None` when the
/// budget left no useful one: the call is not made.
pub fn charge_slice(app: &App, caller: &Caller, report: &mut Report) -> Option<Duration> {
    let timeout = slice(app, caller, Op::ProviderCall).ok()?;
    report.provider_slice = Some(timeout);
    Some(timeout)
}

/// What is sent to the provider for `payment`: its id is the provider's idempotency key.
pub fn charge_request(payment: &Payment) -> ChargeRequest<'_> {
    ChargeRequest {
        idempotency_key: &payment.id,
        amount: payment.amount,
        currency: &payment.currency,
        source: &payment.source,
    }
}

/// Records a provider call that took `took` of its `timeout`: its time in the report, its hop
/// in the trace, with the breaker's state after it.
pub fn charged_in(
    caller: &Caller,
    charged: &ChargeOutcome,
    took: Duration,
    timeout: Duration,
    breaker: State,
    report: &mut Report,
) {
    report.timings.add(Step::Provider, took);
    trace::hop(
        caller.request_id,
        &caller.deadline,
        Unit::Breaker,
        "call",
        Some(timeout),
        format_args!("{} (breaker {})", charged.name(), breaker.name()),
    );
}

/// Step 4: records the outcome while this attempt still holds its key's lock. Persist's slices
/// have a floor no earlier overrun can take (see `deadline.rs`): the charge may have been sent.
fn persist(
    app: &App,
    caller: &Caller,
    attempt: Attempt,
    payment: &Payment,
    stored: Option<&StoredResponse>,
    report: &mut Report,
) -> Result<(), ApiError> {
    let persisted = write(
        app,
        caller,
        (Op::PersistAcquire, Op::PersistWrite),
        report,
        |db, acquire, wait| db.persist(acquire, wait, attempt, payment, stored),
    )
    .and_then(|written| {
        trace::hop(
            caller.request_id,
            &caller.deadline,
            Unit::Idempotency,
            "persist",
            None,
            format_args!(
                "{} {}",
                payment.status.as_str(),
                match &written {
                    Ok(Persisted::Recorded) => "recorded",
                    Ok(Persisted::LockLost) => "not recorded: the lock was lost",
                    Err(_) => "not recorded: the write failed",
                }
            ),
        );
        written.map_err(|e| db_error(e, Step::Persist, Some(payment), caller.request_id))
    });
    match persisted {
        Ok(Persisted::Recorded) => {
            app.metrics
                .payments
                .with_label_values(&[payment.status.as_str()])
                .inc();
            Ok(())
        }
        Ok(Persisted::LockLost) => {
            // This attempt took too long and another took the key over: what it would have
            // written is not written, and the key's current state is the answer a retry gets.
            log::warn!(
                "{}: lost the lock on {} before recording it; a retry gets the recorded outcome",
                caller.request_id,
                payment.id
            );
            Err(ApiError::KeyInUse)
        }
        // The outcome could not be recorded: the key stays locked until its lock goes stale,
        // and a retry then resumes the same payment (the provider deduplicates the charge).
        Err(e) => Err(unrecorded(e, payment, caller.request_id)),
    }
}

/// The answer when the outcome could not be recorded: it always carries the payment as
/// `pending`, since its charge may exist. A storage incident is logged once, by `db_error`.
fn unrecorded(e: ApiError, payment: &Payment, request_id: &str) -> ApiError {
    if !matches!(e, ApiError::StorageUnavailable { .. }) {
        log::warn!(
            "{request_id}: could not persist {} ({e}); a retry will resume it",
            payment.id
        );
    }
    match e {
        ApiError::Overloaded { .. } => ApiError::DeadlineExceeded {
            step: Step::Acquire,
            payment: Some(outcome::as_pending(payment)),
        },
        ApiError::Internal(cause) => {
            log::error!("{request_id}: recording {} failed: {cause}", payment.id);
            ApiError::StorageUnavailable {
                payment: Some(outcome::as_pending(payment)),
            }
        }
        other => other,
    }
}
