//! Unit 07, graceful shutdown: the request path read in reverse.
//!
//! A signal sets a flag; the dispatcher sees it, marks the app draining (readiness fails),
//! closes the listener (new connections are refused), hands out what tiny_http had already
//! queued, closes the worker channel and joins the workers once they finished every queued and
//! in-flight request; last, the pool's WAL is checkpointed. A second signal exits at once
//! with status 1.

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
        signal_hook::flag::register_conditional_shutdown(*sig, 1, term.clone())
            .map_err(|e| format!("cannot register signal {sig}: {e}"))?;
        signal_hook::flag::register(*sig, term.clone())
            .map_err(|e| format!("cannot register signal {sig}: {e}"))?;
    }
    Ok(term)
}

/// After the workers are joined (nothing can start a request any more): stop the background
/// threads that use the pool, then — last — checkpoint the WAL and let the pool close.
pub fn teardown(app: &App, background_stop: &AtomicBool, housekeeping: JoinHandle<()>) {
    background_stop.store(true, Ordering::SeqCst);
    if housekeeping.join().is_err() {
        log::error!("the housekeeping thread panicked");
    }
    match app.db.checkpoint(Duration::from_secs(2)) {
        Ok(()) => log::info!("WAL checkpointed; shutdown complete"),
        Err(e) => log::warn!("WAL checkpoint at shutdown failed: {e}"),
    }
}
