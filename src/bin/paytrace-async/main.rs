//! `paytrace-async`: the async twin of `paytrace serve`, built only with the `async-twin`
//! feature. The same flags, routes, answers, headers and metrics, from the same library steps,
//! on tokio + axum: the steps that block (SQLite, the single writer) run on tokio's blocking
//! pool, the provider call is awaited, and semaphores stand where the sync server has its
//! bounded queue and workers.
//!
//! - [`accept`]: the accept loop, one hyper connection per task, and their part of the drain.
//! - [`server`]: admission, routing, the payment's steps around the awaited charge.
//! - [`provider`]: the awaited provider call behind the twin's breaker.
//! - [`shutdown`]: signals → cancellation tokens → drain.

mod accept;
mod provider;
mod server;
mod shutdown;

use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use axum::extract::DefaultBodyLimit;
use clap::{Parser, Subcommand};
use paytrace::config::ServeConfig;
use paytrace::flow::reconciler;
use paytrace::lifecycle;
use paytrace::startup::{self, Built, ServeError};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::provider::AsyncProvider;
use crate::server::Twin;

#[derive(Parser)]
#[command(
    name = "paytrace-async",
    version,
    about = "The async twin of paytrace: the same payments API on tokio + axum"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the payments server (the same flags as `paytrace serve`).
    Serve(Box<ServeConfig>),
}

fn main() -> ExitCode {
    let Command::Serve(config) = Cli::parse().command;
    startup::init_logging(config.log_format);
    match run(*config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(ServeError::Config(reason)) => {
            eprintln!("paytrace-async: invalid configuration: {reason}");
            ExitCode::from(2)
        }
        Err(ServeError::Runtime(reason)) => {
            log::error!("{reason}");
            ExitCode::from(1)
        }
    }
}

/// Builds the same collaborators as `paytrace serve`, serves on tokio until a signal has been
/// followed through the drain, then tears down in the library's order (pool last).
fn run(config: ServeConfig) -> Result<(), ServeError> {
    let Built {
        app,
        listener,
        provider_url,
    } = startup::build(config)?;
    let runtime_error = |e: std::io::Error| ServeError::Runtime(e.to_string());
    let addr = listener.local_addr().map_err(runtime_error)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("tokio")
        // The steps that block are bounded by the worker permits; a few more for readiness.
        .max_blocking_threads(app.config.workers as usize + 4)
        .build()
        .map_err(runtime_error)?;
    let provider = Arc::new(AsyncProvider::new(&provider_url, &app).map_err(ServeError::Runtime)?);
    let background_stop = Arc::new(AtomicBool::new(false));
    // The reconciler asks the provider nothing while the twin's breaker is open.
    let breaker = provider.clone();
    let housekeeping = reconciler::spawn_watching(
        app.clone(),
        background_stop.clone(),
        Box::new(move || breaker.breaker_state()),
    )
    .map_err(ServeError::Runtime)?;
    startup::announce(&app, addr, &provider_url);
    let twin = Arc::new(Twin::new(app.clone(), provider));
    runtime
        .block_on(serve(twin, listener))
        .map_err(ServeError::Runtime)?;
    // Every request's task has finished: stop the runtime's threads, then steps 4 and 5.
    runtime.shutdown_timeout(Duration::from_secs(1));
    lifecycle::shutdown::teardown(&app, &background_stop, housekeeping);
    Ok(())
}

/// Serves until the first signal, then performs shutdown steps 1–3 (see `shutdown.rs`).
async fn serve(twin: Arc<Twin>, listener: std::net::TcpListener) -> Result<(), String> {
    let app = twin.app.clone();
    listener
        .set_nonblocking(true)
        .map_err(|e| format!("cannot set the listener non-blocking: {e}"))?;
    let listener = tokio::net::TcpListener::from_std(listener)
        .map_err(|e| format!("cannot hand the listener to tokio: {e}"))?;
    let stop = CancellationToken::new();
    let close = CancellationToken::new();
    shutdown::watch_signals(stop.clone())?;
    let router = axum::Router::new()
        .fallback(server::handle)
        .with_state(twin.clone())
        // The library's --max-body check reads the body; axum's own 2 MB default must not
        // answer first.
        .layer(DefaultBodyLimit::disable());
    let connections = TaskTracker::new();
    let mut accepting = tokio::spawn(accept::run(
        app.clone(),
        listener,
        router,
        close.clone(),
        connections.clone(),
        twin.open_connections.clone(),
    ));

    tokio::select! {
        _ = stop.cancelled() => {}
        ended = &mut accepting => {
            return Err(format!("the accept loop stopped before any signal: {ended:?}"));
        }
    }
    // Step 1.
    shutdown::begin(&app);
    let finished_before = app.inflight.finished();
    tokio::time::sleep(app.config.shutdown_delay).await;
    // Step 2.
    twin.closing.store(true, Ordering::SeqCst);
    close.cancel();
    let _ = accepting.await;
    let closed = Instant::now();
    log::info!(
        "listener closed; draining {} open connections",
        connections.len()
    );
    // Step 3: every connection accepted is served, and every request's task finishes.
    let deadline = tokio::time::Instant::from_std(closed + app.config.drain_timeout());
    connections.close();
    twin.tracker.close();
    let drained = tokio::time::timeout_at(deadline, async {
        connections.wait().await;
        twin.tracker.wait().await;
    })
    .await;
    if drained.is_err() {
        return Err(shutdown::overran(&app, closed));
    }
    log::info!(
        "drained {} requests in {} ms; every request's task finished",
        app.inflight.finished() - finished_before,
        closed.elapsed().as_millis()
    );
    Ok(())
}
