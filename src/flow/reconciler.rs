//! The housekeeping thread: the reconciler, which settles payments whose requests are gone
//! before their outcome was known; the sweeper, which deletes expired idempotency keys; the
//! WAL checkpoint, every 100 ms, off the writers' path; and, while storage writes fail, a small
//! probe write every 100 ms that notices the recovery.
//!
//! The reconciler only ever *asks* the provider (`GET /v1/charges?idempotency_key=<payment id>`);
//! it never creates a charge. A charge the provider holds under that key and reports as
//! `succeeded` or `declined` settles the payment and stores the response a retry will replay; a
//! well-formed answer with no charge, once the last attempt is older than the provider timeout
//! plus [`NO_CHARGE_MARGIN`], makes the payment `failed` with its key retryable. Any other answer
//! (a charge still `pending`, another key's charge, an error) settles nothing: the payment is
//! asked about again next round. It runs at start-up too, so after a crash the same mechanism picks up what the
//! dead process left behind.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant, SystemTime};

use super::outcome;
use crate::app::App;
use crate::provider::breaker::State;
use crate::provider::client::{ChargeOutcome, LookupAnswer};
use crate::store::db::{self, DbError, PaymentStatus};
use crate::store::idempotency::Unsettled;

/// How often unsettled payments are looked for.
const RECONCILE_EVERY: Duration = Duration::from_secs(1);
/// How often the WAL is checkpointed (and the stop flag looked at).
const CHECKPOINT_EVERY: Duration = Duration::from_millis(100);
/// How often expired keys are deleted, at most: a short TTL is swept every half TTL.
const SWEEP_EVERY: Duration = Duration::from_secs(60);
/// How long after its last attempt a payment the provider never saw is declared `failed`, on top
/// of the provider timeout: a request may still be on its way to the provider.
pub const NO_CHARGE_MARGIN: Duration = Duration::from_secs(2);
/// Payments looked at per round.
const BATCH: usize = 100;

/// The state of the breaker the server's payments go through: the reconciler asks the provider
/// nothing while it is open.
pub type BreakerView = Box<dyn Fn() -> State + Send>;

/// Starts the thread; it stops within ~100 ms of `stop` being set.
pub fn spawn(app: Arc<App>, stop: Arc<AtomicBool>) -> Result<JoinHandle<()>, String> {
    let view = app.clone();
    spawn_watching(app, stop, Box::new(move || view.provider.breaker_state()))
}

/// [`spawn`], for a server whose payments go through another breaker than the library
/// client's (the async twin's): `breaker` says its state.
pub fn spawn_watching(
    app: Arc<App>,
    stop: Arc<AtomicBool>,
    breaker: BreakerView,
) -> Result<JoinHandle<()>, String> {
    thread::Builder::new()
        .name("housekeeping".into())
        .spawn(move || {
            let mut next_sweep = Instant::now();
            let mut next_reconcile = Instant::now();
            while !stop.load(Ordering::SeqCst) {
                match app.db.checkpoint_passive(Duration::from_secs(1)) {
                    Err(e) if app.db.storage_healthy() => log::warn!("WAL checkpoint: {e}"),
                    // During a storage incident its cause is logged once, by the write that
                    // found it.
                    Err(e) => log::debug!("WAL checkpoint: {e}"),
                    Ok(()) => {}
                }
                // While writes fail, readiness fails and traffic may stop: probe, so that the
                // recovery is noticed without waiting for a payment to try.
                if !app.db.storage_healthy() {
                    let _ = app.db.probe_write(app.config.write_timeout);
                }
                if Instant::now() >= next_reconcile {
                    if breaker() != State::Open {
                        reconcile(&app);
                    }
                    next_reconcile = Instant::now() + RECONCILE_EVERY;
                }
                if Instant::now() >= next_sweep {
                    sweep(&app);
                    next_sweep = Instant::now()
                        + SWEEP_EVERY
                            .min(app.config.idempotency_ttl / 2)
                            .max(CHECKPOINT_EVERY);
                }
                thread::sleep(CHECKPOINT_EVERY);
            }
        })
        .map_err(|e| format!("cannot start the housekeeping thread: {e}"))
}

fn stale_before_ms(app: &App, now: SystemTime) -> i64 {
    db::unix_ms(now) - app.lock_ttl.as_millis() as i64
}

/// One round; returns how many payments it settled.
pub fn reconcile(app: &App) -> usize {
    if app.provider.breaker_state() == State::Open {
        return 0;
    }
    let now = SystemTime::now();
    let stale = stale_before_ms(app, now);
    let found = match app.db.unsettled(Duration::from_secs(1), stale, BATCH) {
        Ok(found) => found,
        Err(e) => {
            log::warn!("reconciler: cannot read unsettled payments: {e}");
            return 0;
        }
    };
    let started = Instant::now();
    found
        .iter()
        .filter(|u| {
            // On PostgreSQL each key is leased to this round, and a lease as old as the lock
            // TTL may be taken by another instance: past half of it, what is left is given
            // back for a later round instead of asked about.
            let settled = started.elapsed() < app.lock_ttl / 2 && settle_one(app, u, stale);
            // Not settled: give the lease back at once.
            if !settled && let Err(e) = app.db.release(Duration::from_secs(1), u) {
                log::debug!("reconciler: {} not released: {e}", u.payment.id);
            }
            settled
        })
        .count()
}

fn settle_one(app: &App, u: &Unsettled, stale: i64) -> bool {
    let answer = app
        .provider
        .lookup(&u.payment.id, app.config.provider_timeout);
    let now = SystemTime::now();
    let mut payment = u.payment.clone();
    let stored = match answer {
        LookupAnswer::Final(
            charged @ (ChargeOutcome::Charged { .. } | ChargeOutcome::Declined { .. }),
        ) => {
            // The same mapping the handler uses: the stored answer a retry replays is the one
            // the request would have got.
            outcome::settle(&mut payment, Some(charged), true, "reconciler", now).stored
        }
        LookupAnswer::Final(other) => {
            log::warn!(
                "reconciler: {}: unexpected lookup outcome {other:?}",
                u.payment.id
            );
            return false;
        }
        LookupAnswer::Unknown(why) => {
            log::debug!("reconciler: {} not settled: {why}", u.payment.id);
            return false;
        }
        LookupAnswer::NoCharge => {
            let last_attempt = humantime::parse_rfc3339(&payment.updated_at).unwrap_or(now);
            let age = now.duration_since(last_attempt).unwrap_or_default();
            if age < app.config.provider_timeout + NO_CHARGE_MARGIN {
                return false;
            }
            payment.status = PaymentStatus::Failed;
            payment.failure_code = Some("provider_no_charge".into());
            payment.updated_at = db::timestamp(now);
            None
        }
    };
    let written = app
        .db
        .settle(
            Duration::from_secs(1),
            app.config.write_timeout,
            u,
            &payment,
            stored.as_ref(),
            stale,
        )
        .result;
    match written {
        Ok(true) => {
            app.metrics
                .payments
                .with_label_values(&[payment.status.as_str()])
                .inc();
            log::info!(
                "reconciler: {} {} → {}",
                payment.id,
                u.payment.status.as_str(),
                payment.status.as_str()
            );
            true
        }
        Ok(false) => false,
        Err(DbError::Unavailable {
            new_incident: false,
            ..
        }) => false,
        Err(e) => {
            log::warn!("reconciler: cannot settle {}: {e}", payment.id);
            false
        }
    }
}

fn sweep(app: &App) {
    let cutoff = db::unix_ms(SystemTime::now()) - app.config.idempotency_ttl.as_millis() as i64;
    let swept = app
        .db
        .sweep(Duration::from_secs(1), app.config.write_timeout, cutoff)
        .result;
    match swept {
        Ok(0) => {}
        Ok(n) => log::info!("sweeper: deleted {n} idempotency keys older than the TTL"),
        Err(e) => log::warn!("sweeper: {e}"),
    }
}
