//! The dispatcher: where a parsed request becomes a job for the worker pool.
//!
//! ```text
//! socket → front (limits, total read deadline) → tiny_http (parse) → dispatcher
//!            └─ refuses malformed or slow requests        ──try_submit──▶ [bounded queue] ──▶ N workers
//!            full: 503 overloaded; /healthz: 200 — both written by the answerer ─┘   └─ handle(): route, observe
//! ```
//!
//! The queue and the workers are a [`WorkerPool`] (unit 03, `workers.rs`). The dispatcher only
//! decides: it gives each request its identity (request id, received time), offers it to the
//! pool, and hands a refused one to the answerer thread, which writes the 503, counts and logs
//! it. Admission never waits for a refusal to be written, so a flood of refusals costs the
//! requests that do get in nothing but the dispatcher's few microseconds per refusal. Liveness
//! (`/healthz`) goes the same way, never through the queue: a server whose workers are all
//! busy is overloaded, not dead, and must not be restarted for it. So do the live page's
//! routes (`live/`), which must show an overloaded server, not wait behind its payments.
//!
//! The front (`front.rs`) owns the client sockets and hands tiny_http complete requests over a
//! unix socket in a private directory; the prober (`liveness.rs`) checks that tiny_http still
//! accepts. If it does not, or the front's accept loop stops, the process exits 1.

use std::os::unix::fs::DirBuilderExt;
use std::os::unix::net::UnixListener;
use std::panic::{self, AssertUnwindSafe};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crossbeam::channel::{self, Sender, TrySendError};
use tiny_http::Request;

use super::front::{self, Front, Limits};
use super::http;
use super::liveness::Prober;
use super::middleware::RequestInfo;
use super::observe::{self, Observed};
use super::routes;
use crate::app::App;
use crate::deadline::Step;
use crate::error::ApiError;
use crate::flow::Report;
use crate::reply::Reply;
use crate::trace::Unit;
use crate::workers::{self, Rejected, WorkerPool};

/// A request read off the socket, with its identity, waiting for a worker.
struct Job {
    request: Request,
    info: RequestInfo,
}

/// A request answered without a worker, on its way to the answerer: one the pool would not
/// take, a liveness probe, or one of the live page's routes.
struct Direct {
    job: Job,
    answer: Result<Reply, ApiError>,
    /// Why it was refused (the `requests_shed_total{reason}` label), if it was.
    shed: Option<&'static str>,
    /// When the dispatcher decided: the end of its `queue` time.
    at: Instant,
}

/// How often the dispatcher looks at the stop flag while no request arrives.
const POLL: Duration = Duration::from_millis(50);

/// A directory only this user can enter, holding the unix socket between the front and
/// tiny_http; removed when dropped.
struct PrivateDir(PathBuf);

impl PrivateDir {
    fn create() -> Result<PrivateDir, String> {
        let path = std::env::temp_dir().join(format!(
            "paytrace-{}-{}",
            std::process::id(),
            crate::ids::request_id()
        ));
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&path)
            .map_err(|e| format!("cannot create {}: {e}", path.display()))?;
        Ok(PrivateDir(path))
    }
}

impl Drop for PrivateDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Serves on `listener` until `stop` is set, then drains and returns.
pub fn run(
    app: Arc<App>,
    listener: std::net::TcpListener,
    stop: Arc<AtomicBool>,
) -> Result<(), String> {
    let dir = PrivateDir::create()?;
    let socket = dir.0.join("tiny_http.sock");
    let inner = UnixListener::bind(&socket)
        .map_err(|e| format!("cannot bind {}: {e}", socket.display()))?;
    let server = tiny_http::Server::from_listener(inner, None).map_err(|e| e.to_string())?;
    let max_connections = app.config.max_connections as usize;
    let limits = Limits {
        socket_timeout: app.config.socket_timeout,
        max_body: app.config.max_body,
        max_connections,
        answer_timeout: app.config.drain_timeout() + app.config.request_timeout,
    };
    if let Ok(addr) = listener.local_addr()
        && !addr.ip().is_loopback()
    {
        log::warn!(
            "listening on {addr}, beyond this machine: each client may hold one of {max_connections} \
             connections for up to --socket-timeout {} ms and about 2 × {} KiB of memory; there is no per-client \
             connection limit or TLS here — put nginx in front (data/nginx/paytrace.conf)",
            app.config.socket_timeout.as_millis(),
            limits.max_request_bytes() / 1024
        );
    }
    let (front, accept) = front::start(app.clone(), listener, socket.clone(), limits)
        .map_err(|e| format!("cannot start the accept loop: {e}"))?;
    let prober = Prober::start(socket)?;
    // Every request in the process holds one of the front's connections, so an answerer
    // channel that size never fills; if it somehow did, the dispatcher would write that answer
    // itself.
    let (direct, answerer) = start_answerer(app.clone(), max_connections.max(1))?;

    let pool = {
        let app = app.clone();
        WorkerPool::new(
            app.config.workers as usize,
            app.config.queue as usize,
            "worker-",
            move |job: Job, waiting| {
                app.metrics.queue_depth.set(waiting as i64);
                app.metrics.workers_busy.inc();
                handle(&app, job);
                app.metrics.workers_busy.dec();
            },
        )?
    };

    let result = dispatch(&app, &server, pool, &stop, &front, &prober, &direct);
    drop(direct);
    front.close_listener();
    let _ = accept.join();
    prober.stop();
    let _ = answerer.join();
    result
}

/// Takes requests from tiny_http and `try_submit`s them to the worker pool, until a signal has
/// been followed through shutdown steps 1–3 (`lifecycle/shutdown.rs`): readiness fails; after
/// the delay the front stops accepting; every connection it had accepted is served (its request
/// may arrive after the listener closed: it is in flight all the same); then the pool shuts
/// down: its queue closes, the workers finish, and they are joined by the drain deadline.
fn dispatch(
    app: &App,
    server: &tiny_http::Server,
    pool: WorkerPool<Job>,
    stop: &AtomicBool,
    front: &Front,
    prober: &Prober,
    direct: &Sender<Direct>,
) -> Result<(), String> {
    let mut pool = Some(pool);
    // When the listener is to close (set at the signal), and when it did.
    let mut close_at: Option<Instant> = None;
    let mut closed_at: Option<Instant> = None;
    let mut finished_before = 0;
    loop {
        if closed_at.is_none() && prober.accept_dead() {
            return Err(
                "the accept thread stopped (liveness probes are no longer answered); exiting rather than looking alive"
                    .into(),
            );
        }
        if let Some(why) = front.death() {
            return Err(format!(
                "the accept thread stopped ({why}); exiting rather than looking alive"
            ));
        }
        if close_at.is_none() && stop.load(Ordering::SeqCst) {
            // Step 1: readiness fails at once.
            app.draining.store(true, Ordering::SeqCst);
            close_at = Some(Instant::now() + app.config.shutdown_delay);
            finished_before = app.inflight.finished();
            log::info!(
                "signal received: readiness fails now, the listener closes in {} ms",
                app.config.shutdown_delay.as_millis()
            );
        }
        if closed_at.is_none() && close_at.is_some_and(|t| Instant::now() >= t) {
            // Step 2: new connections are refused from now on; the ones accepted are served.
            front.close_listener();
            closed_at = Some(Instant::now());
            log::info!(
                "listener closed; draining {} open connections",
                front.open_connections()
            );
        }
        if let Some(closed) = closed_at {
            // Step 3: once no accepted connection can bring another request, the pool shuts
            // down: its queue closes, the workers finish what it holds and are joined.
            if !front.accepting()
                && front.open_connections() == 0
                && let Some(pool) = pool.take()
            {
                let report = pool.shutdown(closed + app.config.drain_timeout());
                if report.still_running == 0 {
                    log::info!(
                        "drained {} requests in {} ms; {} workers joined",
                        app.inflight.finished() - finished_before,
                        closed.elapsed().as_millis(),
                        report.joined
                    );
                    return Ok(());
                }
                log::error!(
                    "drain: {} workers joined, {} still running at the deadline",
                    report.joined,
                    report.still_running
                );
                return Err(drain_overran(app, front));
            }
            if closed.elapsed() > app.config.drain_timeout() {
                return Err(drain_overran(app, front));
            }
        }
        match server.recv_timeout(POLL) {
            Ok(Some(request)) if prober.is_probe(&request) => {
                let _ = http::send(request, &Reply::text(204, "text/plain", ""));
            }
            Ok(Some(request)) => admit(app, request, pool.as_ref(), direct),
            Ok(None) => {}
            Err(e) => {
                return Err(format!(
                    "the accept thread stopped ({e}); exiting rather than looking alive"
                ));
            }
        }
    }
}

/// Gives the request its identity and offers it to the pool; a refusal, or a route that needs
/// no worker, goes to the answerer.
fn admit(app: &App, request: Request, pool: Option<&WorkerPool<Job>>, direct: &Sender<Direct>) {
    let received = http::header(&request, front::RECEIVED_HEADER)
        .and_then(front::received_at)
        .map_or_else(|| app.clock.now(), |t| t.min(app.clock.now()));
    let info = RequestInfo::new(&request, received, app.config.request_timeout);
    info.hop(
        Unit::Middleware,
        "request-id",
        format_args!("{} {}", info.method, info.path),
    );
    let mut request = request;
    let immediate = routes::immediate(app, &info, &mut request);
    let job = Job { request, info };
    if let Some(answer) = immediate {
        return answer_directly(app, direct, job, answer, None);
    }
    let Some(pool) = pool else {
        return refuse(app, direct, job, ApiError::ShuttingDown, "shutting_down");
    };
    match pool.try_submit(job) {
        Ok(()) => {}
        Err(Rejected::Full(job)) => {
            let error = ApiError::Overloaded {
                detail: format!(
                    "all {} workers are busy and the queue of {} is full; retry shortly",
                    pool.size(),
                    pool.capacity()
                ),
                retry_after_s: 1,
            };
            refuse(app, direct, job, error, "queue_full");
        }
        Err(Rejected::Closed(job)) => {
            refuse(app, direct, job, ApiError::ShuttingDown, "shutting_down");
        }
    }
    app.metrics.queue_depth.set(pool.queue_len() as i64);
}

/// Refuses a request: the trace says where it stopped, the answerer writes the 503.
fn refuse(app: &App, direct: &Sender<Direct>, job: Job, error: ApiError, reason: &'static str) {
    job.info.hop(
        Unit::Workers,
        "shed",
        format_args!("refused: {} {} ({reason})", error.status(), error.code()),
    );
    answer_directly(app, direct, job, Err(error), Some(reason));
}

/// Hands an answer that needs no worker to the answerer; writes it here only if the answerer
/// cannot take it.
fn answer_directly(
    app: &App,
    direct: &Sender<Direct>,
    job: Job,
    answer: Result<Reply, ApiError>,
    shed: Option<&'static str>,
) {
    let d = Direct {
        job,
        answer,
        shed,
        at: Instant::now(),
    };
    match direct.try_send(d) {
        Ok(()) => {}
        Err(TrySendError::Full(d) | TrySendError::Disconnected(d)) => write_direct(app, d),
    }
}

/// The answerer: writes, counts and logs every answer that needs no worker, off the
/// dispatcher's thread.
fn start_answerer(
    app: Arc<App>,
    capacity: usize,
) -> Result<(Sender<Direct>, JoinHandle<()>), String> {
    let (tx, rx) = channel::bounded::<Direct>(capacity);
    let thread = thread::Builder::new()
        .name("answerer".into())
        .spawn(move || {
            for d in rx {
                write_direct(&app, d);
            }
        })
        .map_err(|e| format!("cannot start the answerer: {e}"))?;
    Ok((tx, thread))
}

/// 503 `overloaded` when the queue was full, 503 `shutting-down` once the pool took no more,
/// 200 for liveness.
fn write_direct(app: &App, d: Direct) {
    let Direct {
        job: Job { request, info },
        answer,
        shed,
        at,
    } = d;
    // Counted among the requests the drain reports, like every answer written during it.
    let _running = app
        .inflight
        .enter(&info.request_id, &info.method, &info.path);
    let mut report = Report {
        shed,
        ..Report::default()
    };
    report
        .timings
        .add(Step::Queue, at.saturating_duration_since(info.received));
    let reply = answer.unwrap_or_else(|e| e.into_reply(&info.request_id));
    let status = reply.status;
    let seen = Observed {
        info: &info,
        report: &report,
        rate: None,
    };
    observe::send(app, request, reply, &seen);
    info.hop(
        Unit::Shutdown,
        "done",
        format_args!("answered {status}; it never held a worker"),
    );
}

/// One request on a worker: the panic boundary around routing (the chain and the handler),
/// then the observation layer writes the answer.
fn handle(app: &App, job: Job) {
    let Job { mut request, info } = job;
    let picked_up = Instant::now();
    let queued = picked_up.saturating_duration_since(info.received);
    info.hop(
        Unit::Workers,
        "picked-up",
        format_args!("after {:.1} ms in the queue", queued.as_secs_f64() * 1000.0),
    );
    let _running = app
        .inflight
        .enter(&info.request_id, &info.method, &info.path);
    // Owned here, outside the panic boundary: what the handler recorded survives a panic.
    let mut report = Report::default();
    report.timings.add(Step::Queue, queued);
    let mut rate = None;
    let answer = guarded(&info.request_id, || {
        routes::route(app, &info, &mut request, &mut report, &mut rate)
    });
    let reply = answer.unwrap_or_else(|e| e.into_reply(&info.request_id));
    let status = reply.status;
    let seen = Observed {
        info: &info,
        report: &report,
        rate,
    };
    observe::send(app, request, reply, &seen);
    info.hop(
        Unit::Shutdown,
        "done",
        format_args!("answered {status}; the drain no longer waits for it"),
    );
}

/// Runs `f`; a panic becomes a 500, so the worker lives on.
fn guarded(
    request_id: &str,
    f: impl FnOnce() -> Result<Reply, ApiError>,
) -> Result<Reply, ApiError> {
    panic::catch_unwind(AssertUnwindSafe(f)).unwrap_or_else(|panic| {
        let what = workers::panic_message(panic.as_ref());
        log::error!("{request_id}: handler panicked: {what}");
        Err(ApiError::Internal(what))
    })
}

/// Logs each request still running when the drain deadline passed, and says so in the error
/// the process exits with.
fn drain_overran(app: &App, front: &Front) -> String {
    let unfinished = app.inflight.describe();
    for line in &unfinished {
        log::error!("drain: unfinished: {line}");
    }
    format!(
        "the drain took longer than --drain-timeout {} ms; {} requests unfinished, {} connections open",
        app.config.drain_timeout().as_millis(),
        unfinished.len(),
        front.open_connections()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panicking_handler_becomes_a_500_and_the_caller_continues() {
        let mut recorded = Report::default();
        let answer = guarded("req_x", || {
            recorded.idempotency = Some("new");
            panic!("boom")
        });
        let reply = answer.unwrap_err().into_reply("req_x");
        assert_eq!(reply.status, 500);
        let body: serde_json::Value = serde_json::from_slice(&reply.body).unwrap();
        assert_eq!(body["code"], "internal-error");
        assert_eq!(body["request_id"], "req_x");
        assert_eq!(
            recorded.idempotency,
            Some("new"),
            "what was recorded survives"
        );
        // The same thread keeps working after the panic.
        let again = guarded("req_y", || Ok(Reply::text(200, "text/plain", "")));
        assert_eq!(again.unwrap().status, 200);
    }
}
