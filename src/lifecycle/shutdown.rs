//! Unit 07, graceful shutdown: the request path read in reverse.
//!
//! A request meets the units in this order: the listener (01), the queue and a worker (03), the
//! middleware (02), the pool (04), the provider (06), the idempotency table (05). Shutdown
//! undoes them the other way round, each step only once nothing above it can still need what
//! it takes away:
//!
//! 1. **Readiness fails** at once (`/readyz` → 503): load balancers stop sending new work.
//! 2. After `--shutdown-delay`, **the listener closes**: new connections are refused. Every
//!    connection accepted before is served, even if its request arrives after the close (it
//!    has one more second to send it).
//! 3. **The queue drains and the workers finish** their in-flight requests normally (the
//!    answerer thread, which writes refusals and liveness answers, finishes with them; every
//!    response carries `Connection: close`); then they are joined. If that takes longer than
//!    `--drain-timeout`, the unfinished requests are logged and the process exits 1 — their
//!    payments are recovered like after a crash, by idempotency and the reconciler.
//! 4. **Background threads stop**: the reconciler and sweeper use the pool, so they go first;
//!    then **the writer** commits what is still queued and stops.
//! 5. **The pool closes last**, after a WAL checkpoint: nothing is left that could borrow it.
//!
//! A second signal during any of this exits at once with status 1.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::app::App;

/// Registers SIGTERM and SIGINT: the first sets the returned flag, a second one while it is set
/// exits the process with status 1.
pub fn install_signal_handlers() -> Result<Arc<AtomicBool>, String> {
    let term = Arc::new(AtomicBool::new(false));
    for sig in signal_hook::consts::TERM_SIGNALS {
        // Order matters: the conditional exit is checked before the flag is set, so only a
        // second signal finds it set.
        signal_hook::flag::register_conditional_shutdown(*sig, 1, term.clone())
            .map_err(|e| format!("cannot register signal {sig}: {e}"))?;
        signal_hook::flag::register(*sig, term.clone())
            .map_err(|e| format!("cannot register signal {sig}: {e}"))?;
    }
    Ok(term)
}

/// Steps 4 and 5, once the workers are joined: stop the background threads that use the pool,
/// then the writer, then checkpoint the WAL; the pool closes when the last `App` reference goes.
pub fn teardown(app: &App, background_stop: &AtomicBool, housekeeping: JoinHandle<()>) {
    background_stop.store(true, Ordering::SeqCst);
    if housekeeping.join().is_err() {
        log::error!("the housekeeping thread panicked");
    }
    // Nothing can queue a write any more: the writer commits what it holds and stops.
    app.db.stop_writer();
    match app.db.checkpoint(Duration::from_secs(2)) {
        Ok(()) if app.db.is_postgres() => log::info!("the pool is closed last"),
        Ok(()) => log::info!("WAL checkpointed; the pool is closed last"),
        Err(e) => log::warn!("WAL checkpoint at shutdown failed: {e}"),
    }
}
