//! The dispatcher: the request path, top to bottom.
//!
//! ```text
//! socket → front (limits, total read deadline) → tiny_http (parse) → dispatcher
//!            └─ refuses malformed or slow requests        ──try_submit──▶ [bounded queue] ──▶ N workers
//!                                       full: 503 overloaded at once ─┘      └─ handle(): middleware, handler
//! ```
//!
//! The queue and the workers are a [`WorkerPool`] (unit 03, `workers.rs`); this file decides
//! how a request the pool hands back is answered (503 `overloaded`), and what each worker does
//! with one it takes (`handle`).
//!
//! The front (`front.rs`) owns the client sockets and hands tiny_http complete requests over a
//! unix socket in a private directory. If tiny_http's accept thread dies anyway — by an error
//! `recv()` reports, or by a panic it never reports, which a prober sending requests through
//! that unix socket notices — or the front's accept loop stops, the process exits 1: a server
//! that cannot accept must not look alive.

use std::os::unix::fs::DirBuilderExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::panic::{self, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::json;
use tiny_http::{Method, Request};

use crate::app::App;
use crate::breaker::State;
use crate::config::LogFormat;
use crate::deadline::Step;
use crate::error::ApiError;
use crate::front::{self, Front, Limits};
use crate::http::{self, Reply};
use crate::middleware::{self, Ctx};
use crate::payments;
use crate::ratelimit::RateLimiter;
use crate::workers::{Rejected, WorkerPool};

/// A request read off the socket, waiting for a worker.
struct Job {
    request: Request,
    /// When the front finished reading it off the socket: the deadline starts here.
    received: Instant,
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

    let background_stop = Arc::new(AtomicBool::new(false));
    let accept_dead = Arc::new(AtomicBool::new(false));
    let probe_token = crate::ids::request_id();
    let prober = spawn_accept_prober(
        socket,
        probe_token.clone(),
        background_stop.clone(),
        accept_dead.clone(),
    )?;
    let liveness = Liveness {
        probe_token: &probe_token,
        accept_dead: &accept_dead,
        front: &front,
    };

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

    let result = dispatch(&app, &server, pool, &stop, &liveness);
    background_stop.store(true, Ordering::SeqCst);
    front.close_listener();
    let _ = accept.join();
    let _ = prober.join();
    result
}

/// What the dispatcher needs besides the app: the front, how to recognise the liveness probe,
/// and the flag the prober raises when probes stop coming through.
struct Liveness<'a> {
    probe_token: &'a str,
    accept_dead: &'a AtomicBool,
    front: &'a Front,
}

/// The path of the liveness probe; answered by the dispatcher only with the right token.
const PROBE_PATH: &str = "/__paytrace/accept-probe";
const PROBE_HEADER: &str = "X-Paytrace-Probe";

/// Takes requests from tiny_http and `try_submit`s them to the worker pool, until a signal has
/// been followed through shutdown steps 1–3 (src/shutdown.rs): readiness fails; after the delay
/// the front stops accepting; every connection it had accepted is served (its request may
/// arrive after the listener closed: it is in flight all the same); then the pool shuts down:
/// its queue closes, the workers finish, and they are joined by the drain deadline.
fn dispatch(
    app: &App,
    server: &tiny_http::Server,
    pool: WorkerPool<Job>,
    stop: &AtomicBool,
    liveness: &Liveness,
) -> Result<(), String> {
    let mut pool = Some(pool);
    // When the listener is to close (set at the signal), and when it did.
    let mut close_at: Option<Instant> = None;
    let mut closed_at: Option<Instant> = None;
    let mut finished_before = 0;
    loop {
        if closed_at.is_none() && liveness.accept_dead.load(Ordering::SeqCst) {
            return Err(
                "the accept thread stopped (liveness probes are no longer answered); exiting rather than looking alive"
                    .into(),
            );
        }
        if let Some(why) = liveness.front.death() {
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
            liveness.front.close_listener();
            closed_at = Some(Instant::now());
            log::info!(
                "listener closed; draining {} open connections",
                liveness.front.open_connections()
            );
        }
        if let Some(closed) = closed_at {
            // Step 3: once no accepted connection can bring another request, the pool shuts
            // down: its queue closes, the workers finish what it holds and are joined.
            if !liveness.front.accepting()
                && liveness.front.open_connections() == 0
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
                return Err(drain_overran(app, liveness));
            }
            if closed.elapsed() > app.config.drain_timeout() {
                return Err(drain_overran(app, liveness));
            }
        }
        match server.recv_timeout(POLL) {
            Ok(Some(request))
                if request.url() == PROBE_PATH
                    && http::header(&request, PROBE_HEADER) == Some(liveness.probe_token) =>
            {
                let _ = http::send(request, &Reply::text(204, "text/plain", ""));
            }
            Ok(Some(request)) => {
                let received = http::header(&request, front::RECEIVED_HEADER)
                    .and_then(front::received_at)
                    .map_or_else(|| app.clock.now(), |t| t.min(app.clock.now()));
                let job = Job { request, received };
                let Some(pool) = &pool else {
                    refuse(app, job, ApiError::ShuttingDown, "shutting_down");
                    continue;
                };
                match pool.try_submit(job) {
                    Ok(()) => {}
                    Err(Rejected::Full(job)) => refuse(
                        app,
                        job,
                        ApiError::Overloaded {
                            detail: format!(
                                "all {} workers are busy and the queue of {} is full; retry shortly",
                                pool.size(),
                                pool.capacity()
                            ),
                            retry_after_s: 1,
                        },
                        "queue_full",
                    ),
                    Err(Rejected::Closed(job)) => {
                        refuse(app, job, ApiError::ShuttingDown, "shutting_down");
                    }
                }
                app.metrics.queue_depth.set(pool.queue_len() as i64);
            }
            Ok(None) => {}
            Err(e) => {
                return Err(format!(
                    "the accept thread stopped ({e}); exiting rather than looking alive"
                ));
            }
        }
    }
}

/// Logs each request still running when the drain deadline passed, and says so in the error
/// the process exits with.
fn drain_overran(app: &App, liveness: &Liveness) -> String {
    let unfinished = app.inflight.describe();
    for line in &unfinished {
        log::error!("drain: unfinished: {line}");
    }
    format!(
        "the drain took longer than --drain-timeout {} ms; {} requests unfinished, {} connections open",
        app.config.drain_timeout().as_millis(),
        unfinished.len(),
        liveness.front.open_connections()
    )
}

/// Sends a request through tiny_http's unix socket every second; the dispatcher answers it at
/// once. If three in a row get no answer, tiny_http's accept thread is gone (it can also die by
/// panic, which `recv()` never reports) and the process must exit rather than look alive.
fn spawn_accept_prober(
    socket: PathBuf,
    token: String,
    stop: Arc<AtomicBool>,
    dead: Arc<AtomicBool>,
) -> Result<thread::JoinHandle<()>, String> {
    let wait = Duration::from_secs(2);
    thread::Builder::new()
        .name("accept-prober".into())
        .spawn(move || {
            let mut failures = 0;
            while !stop.load(Ordering::SeqCst) {
                if probe(&socket, &token, wait) {
                    failures = 0;
                } else if !stop.load(Ordering::SeqCst) {
                    failures += 1;
                    log::warn!("accept probe {failures}/3 got no answer within {wait:?}");
                    if failures >= 3 {
                        dead.store(true, Ordering::SeqCst);
                        return;
                    }
                }
                let next = Instant::now() + Duration::from_secs(1);
                while Instant::now() < next && !stop.load(Ordering::SeqCst) {
                    thread::sleep(Duration::from_millis(50));
                }
            }
        })
        .map_err(|e| e.to_string())
}

fn probe(socket: &Path, token: &str, wait: Duration) -> bool {
    use std::io::{Read, Write};
    let Ok(mut s) = UnixStream::connect(socket) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(wait));
    let _ = s.set_write_timeout(Some(wait));
    let request = format!(
        "GET {PROBE_PATH} HTTP/1.1\r\nHost: probe\r\n{PROBE_HEADER}: {token}\r\nConnection: close\r\n\r\n"
    );
    if s.write_all(request.as_bytes()).is_err() {
        return false;
    }
    let mut head = [0u8; 12];
    s.read_exact(&mut head).is_ok() && head.starts_with(b"HTTP/1.1 204")
}

/// Answers from the dispatcher, without touching a worker: 503 `overloaded` when the queue is
/// full, 503 `shutting-down` once the pool takes no more work.
fn refuse(app: &App, job: Job, error: ApiError, reason: &'static str) {
    let mut ctx = Ctx::new(&job.request, job.received, app.config.request_timeout);
    ctx.shed = Some(reason);
    let reply = error.into_reply(&ctx.request_id);
    finish_and_send(app, &ctx, job.request, reply);
}

/// One request on a worker: the panic boundary around the middleware chain and the handler.
fn handle(app: &App, job: Job) {
    let Job {
        mut request,
        received,
    } = job;
    // request id → access log: the context is created first and logged last, whatever happens.
    let mut ctx = Ctx::new(&request, received, app.config.request_timeout);
    let _running = app.inflight.enter(&ctx.request_id, &ctx.method, &ctx.path);
    let reply = guarded(&ctx.request_id.clone(), || {
        route(app, &mut ctx, &mut request)
    });
    finish_and_send(app, &ctx, request, reply);
}

/// Runs `f`; an error becomes its problem response and a panic a 500, so the worker lives on.
pub fn guarded(request_id: &str, f: impl FnOnce() -> Result<Reply, ApiError>) -> Reply {
    match panic::catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(reply)) => reply,
        Ok(Err(e)) => e.into_reply(request_id),
        Err(panic) => {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            log::error!("{request_id}: handler panicked: {what}");
            ApiError::Internal(what).into_reply(request_id)
        }
    }
}

fn route(app: &App, ctx: &mut Ctx, request: &mut Request) -> Result<Reply, ApiError> {
    let (path, query) = http::split_target(request.url());
    let (path, query) = (path.to_string(), query.to_string());
    let method = request.method().clone();
    let is_get = matches!(method, Method::Get | Method::Head);
    match path.as_str() {
        "/healthz" if is_get => Ok(Reply::json(200, &json!({"status": "ok"}))),
        "/readyz" if is_get => Ok(readiness(app)),
        "/metrics" if is_get => Ok(metrics(app)),
        "/healthz" | "/readyz" | "/metrics" => {
            Err(ApiError::MethodNotAllowed { allow: "GET, HEAD" })
        }
        "/payments" => {
            if !matches!(method, Method::Post) && !is_get {
                return Err(ApiError::MethodNotAllowed { allow: "GET, POST" });
            }
            middleware::protect(app, ctx, request)?;
            if is_get {
                payments::list(app, ctx, &query)
            } else {
                payments::create(app, ctx, request)
            }
        }
        p => match p.strip_prefix("/payments/") {
            Some(id) if !id.is_empty() && !id.contains('/') => {
                if !is_get {
                    return Err(ApiError::MethodNotAllowed { allow: "GET, HEAD" });
                }
                middleware::protect(app, ctx, request)?;
                payments::get(app, ctx, id)
            }
            _ => Err(ApiError::NotFound),
        },
    }
}

/// `GET /metrics`: the gauges that mirror state are read now, then everything is rendered.
fn metrics(app: &App) -> Reply {
    let m = &app.metrics;
    let (open, idle) = app.db.state();
    m.pool_connections
        .with_label_values(&["idle"])
        .set(i64::from(idle));
    m.pool_connections
        .with_label_values(&["in_use"])
        .set(i64::from(open.saturating_sub(idle)));
    m.breaker_state
        .set(i64::from(app.provider.breaker_state().as_number()));
    m.draining.set(i64::from(app.is_draining()));
    Reply::text(200, "text/plain; version=0.0.4; charset=utf-8", m.render())
}

fn readiness(app: &App) -> Reply {
    if app.is_draining() {
        Reply::json(503, &json!({"status": "draining"}))
    } else if !app.db.storage_healthy() {
        Reply::json(503, &json!({"status": "storage unavailable"}))
    } else if !app.db.ping(app.config.acquire_timeout) {
        Reply::json(503, &json!({"status": "database unavailable"}))
    } else {
        Reply::json(200, &json!({"status": "ready"}))
    }
}

/// Adds `X-Request-Id`, `Server-Timing` and the rate-limit headers, writes the response, then
/// the access-log line.
fn finish_and_send(app: &App, ctx: &Ctx, request: Request, mut reply: Reply) {
    let total = ctx.received.elapsed();
    reply = reply
        .header("X-Request-Id", ctx.request_id.clone())
        .header("Server-Timing", server_timing(ctx, total));
    if let Some(decision) = &ctx.rate {
        reply = reply
            .header("RateLimit-Policy", app.limiter.policy_header())
            .header("RateLimit", RateLimiter::state_header(decision));
    }
    let status = reply.status;
    record_metrics(app, ctx, status, total, true);
    if let Err(e) = http::send(request, &reply) {
        log::debug!("{}: writing the response failed: {e}", ctx.request_id);
    }
    access_log(
        app.config.log_format,
        ctx,
        status,
        total,
        app.provider.breaker_state(),
    );
}

/// Counts and logs a request the front answered itself (malformed, too slow, too large, or one
/// connection too many): the same metrics and access-log line as every other request.
pub fn observe_refusal(
    app: &App,
    request_id: &str,
    method: &str,
    target: &str,
    status: u16,
    total: Duration,
    shed: Option<&'static str>,
) {
    let mut ctx = Ctx::bare(
        request_id.to_string(),
        method,
        target,
        Instant::now(),
        app.config.request_timeout,
    );
    ctx.shed = shed;
    record_metrics(app, &ctx, status, total, false);
    access_log(
        app.config.log_format,
        &ctx,
        status,
        total,
        app.provider.breaker_state(),
    );
}

/// The route label: method and path template.
fn route_label(ctx: &Ctx) -> &'static str {
    match (ctx.method.as_str(), ctx.path.as_str()) {
        ("POST", "/payments") => "POST /payments",
        ("GET" | "HEAD", "/payments") => "GET /payments",
        ("GET" | "HEAD", p) if p.starts_with("/payments/") => "GET /payments/{id}",
        ("GET" | "HEAD", "/healthz") => "GET /healthz",
        ("GET" | "HEAD", "/readyz") => "GET /readyz",
        ("GET" | "HEAD", "/metrics") => "GET /metrics",
        _ => "other",
    }
}

/// `steps`: whether the request went through the steps (the front's refusals did not).
fn record_metrics(app: &App, ctx: &Ctx, status: u16, total: Duration, steps: bool) {
    let m = &app.metrics;
    let route = route_label(ctx);
    m.http_requests
        .with_label_values(&[route, &status.to_string()])
        .inc();
    m.http_duration
        .with_label_values(&[route])
        .observe(total.as_secs_f64());
    if steps && route == "POST /payments" && ctx.shed.is_none() {
        for step in Step::ALL {
            m.step_duration
                .with_label_values(&[step.name()])
                .observe(ctx.timing(step).as_secs_f64());
        }
    }
    if let Some(outcome) = ctx.idempotency {
        m.idempotency.with_label_values(&[outcome]).inc();
    }
    if let Some(reason) = ctx.shed {
        m.shed.with_label_values(&[reason]).inc();
    }
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 10_000.0).round() / 10.0
}

/// `queue`, `acquire`, `claim`, `provider` (with the slice it was given), `persist`, `total`.
fn server_timing(ctx: &Ctx, total: Duration) -> String {
    let mut parts: Vec<String> = if ctx.path == "/payments" && ctx.method == "POST" {
        Step::ALL
            .iter()
            .map(|s| match (s, ctx.provider_slice) {
                (Step::Provider, Some(slice)) => format!(
                    "provider;dur={};desc=\"slice {}ms\"",
                    ms(ctx.timing(*s)),
                    slice.as_millis()
                ),
                _ => format!("{};dur={}", s.name(), ms(ctx.timing(*s))),
            })
            .collect()
    } else {
        vec![format!("queue;dur={}", ms(ctx.timing(Step::Queue)))]
    };
    parts.push(format!("total;dur={}", ms(total)));
    parts.join(", ")
}

/// One line per request: id, method, path, status, total and each step's milliseconds, the
/// idempotency decision. Never the API key.
fn access_log(format: LogFormat, ctx: &Ctx, status: u16, total: Duration, breaker: State) {
    let mut fields = vec![
        ("request_id", json!(ctx.request_id)),
        ("method", json!(ctx.method)),
        ("path", json!(ctx.path)),
        ("status", json!(status)),
        ("total_ms", json!(ms(total))),
    ];
    for step in Step::ALL {
        fields.push((step.ms_field(), json!(ms(ctx.timing(step)))));
    }
    fields.push(("idempotency", json!(ctx.idempotency.unwrap_or("-"))));
    fields.push(("breaker", json!(breaker.name())));
    match format {
        LogFormat::Json => {
            let object: serde_json::Map<String, serde_json::Value> = fields
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect();
            log::info!(target: "access", "{}", serde_json::Value::Object(object));
        }
        LogFormat::Text => {
            let line: Vec<String> = fields
                .into_iter()
                .map(|(k, v)| match v {
                    serde_json::Value::String(s)
                        if k != "request_id" && k != "method" && k != "path" =>
                    {
                        format!("{k}={s}")
                    }
                    serde_json::Value::String(s) => s,
                    v if k == "status" => v.to_string(),
                    v => format!("{k}={v}"),
                })
                .collect();
            log::info!(target: "access", "{}", line.join(" "));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panicking_handler_becomes_a_500_and_the_caller_continues() {
        let reply = guarded("req_x", || panic!("boom"));
        assert_eq!(reply.status, 500);
        let body: serde_json::Value = serde_json::from_slice(&reply.body).unwrap();
        assert_eq!(body["code"], "internal-error");
        assert_eq!(body["request_id"], "req_x");
        // The same thread keeps working after the panic.
        assert_eq!(
            guarded("req_y", || Ok(Reply::json(200, &json!({})))).status,
            200
        );
    }

    #[test]
    fn errors_become_their_problem_responses() {
        let reply = guarded("r", || Err(ApiError::NotFound));
        assert_eq!(reply.status, 404);
    }
}
