//! Unit 07 in the twin: the same order as the sync server (`lifecycle/shutdown.rs`), driven by
//! cancellation tokens instead of a flag a dispatcher polls.
//!
//! 1. The first SIGTERM/SIGINT cancels `stop`: readiness fails at once.
//! 2. After `--shutdown-delay`, `close` is cancelled: axum stops accepting, and hyper closes
//!    each connection once its request is answered (idle keep-alive ones at once).
//! 3. The drain waits, until `--drain-timeout`, for the connections and for every request's
//!    task (the tracker: a task whose client hung up is waited for too).
//! 4. and 5. are the library's `teardown`, called by `main` once the runtime's work is done.
//!
//! A second signal exits at once with status 1 (signal-hook's conditional exit, registered by
//! the library before tokio's own handler).

use std::sync::atomic::Ordering;
use std::time::Instant;

use paytrace::app::App;
use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;

/// Cancels `stop` at the first SIGTERM or SIGINT. A second one exits the process with 1 at
/// once, from the signal handler itself (the library's registration, as in the sync server),
/// so it works at any moment: during the drain, and during the teardown after the runtime.
pub fn watch_signals(stop: CancellationToken) -> Result<(), String> {
    paytrace::lifecycle::shutdown::install_signal_handlers()?;
    let mut term = signal(SignalKind::terminate()).map_err(|e| format!("SIGTERM: {e}"))?;
    let mut int = signal(SignalKind::interrupt()).map_err(|e| format!("SIGINT: {e}"))?;
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        stop.cancel();
    });
    Ok(())
}

/// Step 1: readiness fails; says when the listener closes.
pub fn begin(app: &App) {
    app.draining.store(true, Ordering::SeqCst);
    log::info!(
        "signal received: readiness fails now, the listener closes in {} ms",
        app.config.shutdown_delay.as_millis()
    );
}

/// The drain ran out of time: each unfinished request is logged, and the error says how many.
pub fn overran(app: &App, closed: Instant) -> String {
    let unfinished = app.inflight.describe();
    for line in &unfinished {
        log::error!("drain: unfinished: {line}");
    }
    format!(
        "the drain took longer than --drain-timeout {} ms ({} ms since the listener closed); {} requests unfinished",
        app.config.drain_timeout().as_millis(),
        closed.elapsed().as_millis(),
        unfinished.len()
    )
}
