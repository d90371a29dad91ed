//! The live page: `GET /` answers one self-contained HTML page ([`PAGE`]: inline CSS and
//! script, nothing fetched from elsewhere) that draws the seven units and the last requests,
//! refreshing about four times a second from `GET /debug/state` ([`state`]).
//!
//! Neither queues behind payments: both are answered by the dispatcher itself, like
//! `/healthz`, never through the worker queue (see `routes.rs`); the async twin answers them
//! before it takes any permit, from these same functions, with its own breaker and semaphores
//! as [`Serving`]. That is only sound because
//! answering them never waits: the page is a constant, and the state is read from atomics, the
//! metrics' gauges and counters, and a few short locks (the ring of recent requests, the
//! breaker's window, the pool's state) that are only ever held for a copy. No database query,
//! no provider call, no lock held across I/O.
//!
//! With the in-process simulated provider the page also has controls, behind the API key:
//! `PUT /debug/provider-faults` ([`set_provider_faults`]) and `POST /debug/burst`
//! ([`start_burst`]). They are answered on the dispatcher too — a lecture must be able to open
//! the breaker of an overloaded server — which is sound for the same reason: the front hands
//! tiny_http only complete requests, so reading their small body never waits for a client, and
//! what they do is a short lock (the faults) or spawning a thread (the burst). They read their
//! request through [`ControlRequest`], which both servers implement. Against a real provider
//! they answer 404 `not-found`, saying why.

pub mod board;

use std::sync::atomic::Ordering;
use std::thread;
use std::time::Duration;

use serde::Deserialize;
use serde_json::{Value, json};
use tiny_http::Request;

use self::board::{Burst, Controls, SHOWN, Seen};
use super::auth;
use super::http;
use super::middleware::RequestInfo;
use crate::app::App;
use crate::deadline::Step;
use crate::error::ApiError;
use crate::load::{self, LoadConfig};
use crate::provider::breaker::Window;
use crate::reply::Reply;
use crate::server_timing::round_ms;

/// The page, as served.
pub const PAGE: &str = include_str!("page.html");

/// The largest body a control accepts.
pub const CONTROL_BODY: u64 = 4 * 1024;
/// A burst's bounds: requests per second (open loop), and seconds.
const BURST_RATE: (f64, f64) = (1.0, 500.0);
const BURST_SECONDS: (f64, f64) = (0.1, 10.0);
/// A burst's defaults: under the default rate limit of 100/s per key.
const BURST_DEFAULT_RATE: f64 = 50.0;
const BURST_DEFAULT_SECONDS: f64 = 3.0;
/// Connections a burst may hold at once.
const BURST_CONCURRENCY: u32 = 32;

/// `GET /`: the page. It refuses to be framed, runs only its own inline script, and talks
/// only to this server.
pub fn page() -> Reply {
    Reply::text(200, "text/html; charset=utf-8", PAGE)
        .header("Cache-Control", "no-store")
        .header(
            "Content-Security-Policy",
            "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; \
             connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'; \
             frame-ancestors 'none'",
        )
        .header("X-Content-Type-Options", "nosniff")
        .header("Referrer-Policy", "no-referrer")
}

/// `GET /debug/state`: [`state_json`], never cached.
pub fn state(app: &App, serving: &Serving) -> Reply {
    Reply::json(200, &state_json(app, serving)).header("Cache-Control", "no-store")
}

/// What the page shows that each server keeps its own way: the breaker its payments go
/// through, and what stands for unit 03's workers and queue.
pub struct Serving {
    pub breaker: Window,
    pub workers: Workers,
}

/// Unit 03, as the server has it.
pub struct Workers {
    /// What `workers` and `queue` count: `threads` (the sync server's worker threads and the
    /// slots of its queue in front of them) or `permits` (the async twin's semaphores: a request
    /// runs its steps while it holds one of `workers` permits, and waits for one while it holds
    /// one of the `queue` admission permits beyond them).
    pub kind: &'static str,
    pub workers: u64,
    pub busy: i64,
    pub queue: u64,
    pub queue_depth: i64,
}

impl Serving {
    /// The sync server: its client's breaker, its worker threads and bounded queue (the gauges
    /// the pool keeps).
    pub fn threads(app: &App) -> Serving {
        Serving {
            breaker: app.provider.breaker_window(),
            workers: Workers {
                kind: "threads",
                workers: u64::from(app.config.workers),
                busy: app.metrics.workers_busy.get(),
                queue: u64::from(app.config.queue),
                queue_depth: app.metrics.queue_depth.get(),
            },
        }
    }
}

/// Everything the page draws, read now (the README documents each field). Counters are totals
/// since start; the page turns two readings into rates with `at_ms`.
pub fn state_json(app: &App, serving: &Serving) -> Value {
    let m = &app.metrics;
    let board = &app.board;
    let counts = &board.counts;
    let count = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
    let (open, idle) = app.db.state();
    let window = &serving.breaker;
    let outcomes: serde_json::Map<String, Value> = crate::metrics::PROVIDER_OUTCOMES
        .iter()
        .map(|o| {
            (
                (*o).to_string(),
                json!(m.provider_calls.with_label_values(&[o]).get()),
            )
        })
        .collect();
    let decided = |o: &str| m.idempotency.with_label_values(&[o]).get();
    let shed = |r: &str| m.shed.with_label_values(&[r]).get();
    let recent: Vec<Value> = board.recent(SHOWN).iter().map(seen_json).collect();
    let accept = json!({
        "unit": "01",
        "requests_total": count(&counts.requests),
        "body_too_large_total": count(&counts.body_too_large),
    });
    let middleware = json!({
        "unit": "02",
        "unauthorized_total": count(&counts.unauthorized),
        "rate_limited_total": count(&counts.rate_limited),
    });
    let w = &serving.workers;
    let workers = json!({
        "unit": "03",
        "kind": w.kind,
        "workers": w.workers,
        "busy": w.busy,
        "queue": w.queue,
        "queue_depth": w.queue_depth,
        "shed_total": shed("queue_full"),
    });
    let pool = json!({
        "unit": "04",
        "size": app.config.pool_size,
        "in_use": open.saturating_sub(idle),
        "writer_queue": app.db.writer_queue(),
        "acquire_p99_ms": board.acquire_p99_ms(),
        "acquire_timeouts_total": m.acquire_timeouts.get(),
    });
    let idempotency = json!({
        "unit": "05",
        "new_total": decided("new"),
        "resumed_total": decided("resumed"),
        "replayed_total": decided("replayed"),
        "in_use_total": decided("in-use"),
        "reused_total": decided("reused"),
    });
    let last_transition = window
        .last_transition
        .as_ref()
        .map(|t| json!({"from": t.from.name(), "to": t.to.name(), "reason": t.reason}));
    let breaker = json!({
        "unit": "06",
        "state": window.state.name(),
        "window": {
            "size": window.size,
            "recorded": window.recorded,
            "failed": window.failed,
            "slow": window.slow,
        },
        "last_transition": last_transition,
        "in_flight": m.provider_in_flight.get(),
        "rejected_total": shed("breaker_open"),
        "calls_total": outcomes,
    });
    let shutdown = json!({
        "unit": "07",
        "draining": app.is_draining(),
        "in_flight": app.inflight.running(),
    });
    json!({
        "at_ms": board.started.elapsed().as_millis() as u64,
        "units": {
            "accept": accept,
            "middleware": middleware,
            "workers": workers,
            "pool": pool,
            "idempotency": idempotency,
            "breaker": breaker,
            "shutdown": shutdown,
        },
        "recent": recent,
        "controls": board.controls.as_ref().map(controls_json),
    })
}

fn seen_json(s: &Seen) -> Value {
    let steps: serde_json::Map<String, Value> = Step::ALL
        .iter()
        .map(|step| (step.name().to_string(), json!(round_ms(s.step(*step)))))
        .collect();
    json!({
        "request_id": s.request_id,
        "route": s.route,
        "status": s.status,
        "ago_ms": s.at.elapsed().as_millis() as u64,
        "total_ms": round_ms(s.total),
        "steps": steps,
        "budget_ms": round_ms(s.budget),
        "budget_left_ms": round_ms(s.budget_left()),
        "shed": s.shed,
    })
}

fn controls_json(c: &Controls) -> Value {
    let last = c
        .burst
        .last
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    json!({
        "provider_faults": c.sim.faults(),
        "burst": {
            "available": c.target.is_some(),
            "running": c.burst.running.load(Ordering::SeqCst),
            "last": last,
        },
    })
}

/// A problem answer with its own detail (the shared `ApiError`s say nothing of the page).
fn problem(info: &RequestInfo, status: u16, code: &str, title: &str, detail: &str) -> Reply {
    Reply::problem(
        status,
        &json!({
            "type": format!("/problems/{code}"),
            "title": title,
            "status": status,
            "detail": detail,
            "code": code,
            "request_id": info.request_id,
        }),
    )
}

/// What a control reads of its request: a few headers and a small body. The sync server's
/// tiny_http request is one; the async twin passes what hyper parsed.
pub trait ControlRequest {
    /// The value of header `name` (any case), if there is one.
    fn header(&self, name: &str) -> Option<&str>;
    /// The whole body; 413 `body-too-large` over [`CONTROL_BODY`] bytes.
    fn body(&mut self) -> Result<Vec<u8>, ApiError>;
}

/// The sync server: the front has read the body whole, so this never waits for the client.
impl ControlRequest for Request {
    fn header(&self, name: &str) -> Option<&str> {
        http::header(self, name)
    }

    fn body(&mut self) -> Result<Vec<u8>, ApiError> {
        http::read_body(self, CONTROL_BODY)
    }
}

/// The API key (401 without one: an anonymous client does not learn whether there are
/// controls), then the controls, or 404 saying why there are none.
fn controls<'a>(
    app: &'a App,
    info: &RequestInfo,
    request: &dyn ControlRequest,
) -> Result<&'a Controls, Reply> {
    auth::authenticate(&app.keys, request.header("Authorization"))
        .map_err(|e| e.into_reply(&info.request_id))?;
    let Some(controls) = app.board.controls.as_ref() else {
        return Err(problem(
            info,
            404,
            "not-found",
            "Not Found",
            "the live page's controls exist only when serve runs its own simulated provider \
             (without --provider-url)",
        ));
    };
    Ok(controls)
}

fn invalid(detail: impl Into<String>) -> ApiError {
    ApiError::InvalidRequest {
        detail: detail.into(),
        errors: Vec::new(),
    }
}

/// `PUT /debug/provider-faults`: the simulated provider's faults, as its own
/// `PUT /_control/faults` takes them (any of `latency_ms`, `jitter_ms`, `fail_rate`,
/// `hang_rate`, `ambiguous_rate`); answers the settings now.
pub fn set_provider_faults(
    app: &App,
    info: &RequestInfo,
    request: &mut dyn ControlRequest,
) -> Result<Reply, ApiError> {
    let controls = match controls(app, info, request) {
        Ok(c) => c,
        Err(reply) => return Ok(reply),
    };
    http::require_json_type(request.header("Content-Type"))?;
    let body = request.body()?;
    let faults = controls
        .sim
        .update_faults(&body)
        .map_err(|e| invalid(format!("provider faults: {e}")))?;
    log::info!(
        "{}: the live page set the provider's faults to {faults:?}",
        info.request_id
    );
    Ok(Reply::json(200, &faults))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BurstRequest {
    rate: Option<f64>,
    seconds: Option<f64>,
}

/// `POST /debug/burst` `{"rate": 50, "seconds": 3}`: starts `paytrace load` against this
/// server's own loopback address, in this process, with the caller's API key — open loop at
/// `rate` payments per second (1–500) for `seconds` (0.1–10), at most 32 at once. 202 when
/// started; 409 while one is still running.
pub fn start_burst(
    app: &App,
    info: &RequestInfo,
    request: &mut dyn ControlRequest,
) -> Result<Reply, ApiError> {
    let controls = match controls(app, info, request) {
        Ok(c) => c,
        Err(reply) => return Ok(reply),
    };
    let Some(target) = controls.target else {
        return Ok(problem(
            info,
            404,
            "not-found",
            "Not Found",
            "a burst goes only to this server's loopback address, and it listens on another",
        ));
    };
    http::require_json_type(request.header("Content-Type"))?;
    let body = request.body()?;
    let asked: BurstRequest =
        serde_json::from_slice(&body).map_err(|e| invalid(format!("burst: {e}")))?;
    let rate = asked.rate.unwrap_or(BURST_DEFAULT_RATE);
    let seconds = asked.seconds.unwrap_or(BURST_DEFAULT_SECONDS);
    if !(BURST_RATE.0..=BURST_RATE.1).contains(&rate) {
        return Err(invalid(format!(
            "burst: rate is between {} and {} requests per second",
            BURST_RATE.0, BURST_RATE.1
        )));
    }
    if !(BURST_SECONDS.0..=BURST_SECONDS.1).contains(&seconds) {
        return Err(invalid(format!(
            "burst: seconds is between {} and {}",
            BURST_SECONDS.0, BURST_SECONDS.1
        )));
    }
    if controls.burst.running.swap(true, Ordering::SeqCst) {
        return Ok(problem(
            info,
            409,
            "burst-running",
            "Conflict",
            "a burst is still running; wait for it to end",
        )
        .header("Retry-After", "1"));
    }
    // The caller's own key: the burst is theirs, under their rate limit.
    let key = request
        .header("Authorization")
        .and_then(|h| h.trim().split_once(' '))
        .map(|(_, k)| k.trim().to_string())
        .unwrap_or_default();
    let url = format!("http://{target}");
    let config = LoadConfig {
        url: url.clone(),
        api_key: key,
        concurrency: BURST_CONCURRENCY,
        duration: Some(Duration::from_secs_f64(seconds)),
        requests: None,
        rate: Some(rate),
        replay_fraction: 0.0,
        path: "/payments".into(),
        timeout: app.config.request_timeout + Duration::from_secs(2),
        json: true,
    };
    let burst = controls.burst.clone();
    let spawned = thread::Builder::new()
        .name("live-burst".into())
        .spawn(move || run_burst(&burst, &config));
    if let Err(e) = spawned {
        controls.burst.running.store(false, Ordering::SeqCst);
        return Err(ApiError::Internal(format!("cannot start the burst: {e}")));
    }
    log::info!(
        "{}: the live page started a burst of {rate}/s for {seconds}s against {url}",
        info.request_id
    );
    Ok(Reply::json(
        202,
        &json!({"burst": {"rate": rate, "seconds": seconds, "target": url}}),
    ))
}

/// Runs one burst and keeps its summary; the burst is over when this returns or unwinds.
fn run_burst(burst: &Burst, config: &LoadConfig) {
    struct Over<'a>(&'a Burst);
    impl Drop for Over<'_> {
        fn drop(&mut self) {
            self.0.running.store(false, Ordering::SeqCst);
        }
    }
    let _over = Over(burst);
    let summary = match load::execute(config, false) {
        Ok(s) => json!({
            "requests": s["requests"],
            "duration_s": s["duration_s"],
            "throughput": s["throughput"],
            "status": s["status"],
            "codes": s["codes"],
        }),
        Err(e) => json!({"error": e.to_string()}),
    };
    log::info!("the live page's burst ended: {summary}");
    *burst.last.lock().unwrap_or_else(|e| e.into_inner()) = Some(summary);
}
