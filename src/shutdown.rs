//! Unit 07, graceful shutdown: the request path read in reverse.
//!
//! A signal sets a flag; the dispatcher sees it, marks the app draining (readiness fails),
//! closes the listener (new connections are refused), hands out what tiny_http had already
//! queued, closes the worker channel and joins the workers once they finished every queued and
//! in-flight request; last, the pool's WAL is checkpointed. A second signal exits at once
//! with status 1.

use std::sync::Arc;
use std::sync::atomic::AtomicBool;

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
