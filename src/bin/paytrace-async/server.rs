//! The request path of the twin, top to bottom: admission (two semaphores where the sync server
//! has its bounded queue and workers), routing by the library's table, the library's chain, and
//! the payment's library steps — the blocking ones (SQLite, the writer) on `spawn_blocking`,
//! the provider call awaited.
//!
//! ```text
//! hyper (parse) → handle ─ /healthz: answered at once, no permit
//!                   ├─ the live page, its state and controls: answered at once, no permit
//!                   │
//!                   ├─ admission.try_acquire: none left → 503 overloaded (queue_full)
//!                   └─ task (tracked, so a client that hangs up cancels nothing):
//!                        workers.acquire (the queue wait) → route → chain → steps → observe
//! ```
//!
//! Each request's work runs in its own task: when a client disconnects, hyper drops the
//! handler's future, but the payment already claimed still goes through charge → persist, as
//! on a sync worker (the tracker lets the drain wait for it).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::request::Parts;
use axum::response::Response;
use http_body_util::{BodyExt, LengthLimitError, Limited};
use paytrace::app::App;
use paytrace::deadline::{Deadline, Step};
use paytrace::edge::front::request::{MAX_HEADER_BYTES, MAX_HEADER_FIELDS, MAX_REQUEST_LINE};
use paytrace::edge::live::{self, ControlRequest, Serving};
use paytrace::edge::middleware::{self, ChainHeaders, RequestInfo};
use paytrace::edge::observe::{self, Observed};
use paytrace::edge::ratelimit::Decision;
use paytrace::edge::routes;
use paytrace::edge::{front, http};
use paytrace::error::ApiError;
use paytrace::flow::payment::{self, Begun};
use paytrace::flow::{self, Caller, Report, validate};
use paytrace::reply::Reply;
use paytrace::trace::Unit;
use tokio::sync::Semaphore;
use tokio_util::task::TaskTracker;

use crate::accept::NthOnConnection;
use crate::provider::AsyncProvider;

/// What every request of the twin shares.
pub struct Twin {
    pub app: Arc<App>,
    pub provider: Arc<AsyncProvider>,
    /// `--workers` + `--queue` permits: a request that finds none is refused at once with 503,
    /// like a full queue in front of the sync server's workers.
    pub admission: Arc<Semaphore>,
    /// `--workers` permits: at most this many requests run their steps at once; the wait for
    /// one is the request's `queue` time.
    pub workers: Arc<Semaphore>,
    /// Every request's task, so the drain can wait for each one, including those whose client
    /// went away.
    pub tracker: TaskTracker,
    /// Set when the listener closes (shutdown step 2): answers say `Connection: close`, and a
    /// further request on a kept-alive connection is refused with 503 `shutting-down`.
    pub closing: AtomicBool,
    /// Client connections open now (the accept loop counts them): answers keep a connection
    /// alive only while at most half of `--max-connections` are open, as on the sync server.
    pub open_connections: Arc<AtomicUsize>,
}

impl Twin {
    pub fn new(app: Arc<App>, provider: Arc<AsyncProvider>) -> Twin {
        let workers = app.config.workers as usize;
        let queue = app.config.queue as usize;
        Twin {
            admission: Arc::new(Semaphore::new(workers + queue)),
            workers: Arc::new(Semaphore::new(workers)),
            tracker: TaskTracker::new(),
            closing: AtomicBool::new(false),
            open_connections: Arc::new(AtomicUsize::new(0)),
            app,
            provider,
        }
    }

    /// Requests holding a worker permit now.
    fn running(&self) -> usize {
        (self.app.config.workers as usize).saturating_sub(self.workers.available_permits())
    }

    /// What the live page shows of the twin's own: its breaker, and its semaphores' permits as
    /// unit 03 (`kind: permits`).
    fn serving(&self) -> Serving {
        let c = &self.app.config;
        Serving {
            breaker: self.provider.breaker_window(),
            workers: live::Workers {
                kind: "permits",
                workers: u64::from(c.workers),
                busy: self.running() as i64,
                queue: u64::from(c.queue),
                queue_depth: self.waiting(),
            },
        }
    }

    fn waiting(&self) -> i64 {
        let c = &self.app.config;
        let admitted = (c.workers + c.queue) as usize - self.admission.available_permits();
        admitted.saturating_sub(self.running()) as i64
    }
}

/// The one handler: every request comes here (the library's route table decides).
pub async fn handle(State(twin): State<Arc<Twin>>, request: Request) -> Response {
    let app = &twin.app;
    let received = app.clock.now();
    let (parts, body) = request.into_parts();
    let info = RequestInfo::bare(
        http::request_id_from(header(&parts, "X-Request-Id")),
        parts.method.as_str(),
        parts.uri.path_and_query().map_or("/", |p| p.as_str()),
        received,
        app.config.request_timeout,
    );
    info.hop(
        Unit::Middleware,
        "request-id",
        format_args!("{} {}", info.method, info.path),
    );
    let nth = parts.extensions.get::<NthOnConnection>().map_or(1, |n| n.0);
    // The last request a connection may carry says `close`, as on the sync front. (Pipelined
    // requests need no check here: hyper reads and answers them one after another.)
    let wants_keep_alive =
        wants_keep_alive(&parts) && nth < front::MAX_REQUESTS_PER_CONNECTION as u64;
    if nth > 1 && twin.closing.load(Ordering::SeqCst) {
        // Not in flight when the listener closed: this connection's earlier request was.
        info.hop(
            Unit::Workers,
            "shed",
            format_args!("refused: 503 shutting-down (shutting_down)"),
        );
        let report = Report {
            shed: Some("shutting_down"),
            ..Report::default()
        };
        // Like the sync front's refusal, it is not counted among the requests drained.
        return respond(
            &twin,
            Err(ApiError::ShuttingDown),
            &info,
            &report,
            None,
            false,
        );
    }
    if let Err(refused) = head_limits(&parts, app.config.max_body) {
        // What the sync server's front refuses before any worker sees it.
        return respond(&twin, Err(refused), &info, &Report::default(), None, false);
    }
    let found = routes::find(parts.method.as_str(), parts.uri.path()).map(|(r, _)| r);
    if let Ok(route) = found
        && route.is_immediate()
    {
        // Never behind a permit, as the sync dispatcher answers these itself: liveness (a
        // server whose workers are all busy is overloaded, not dead) and the live page (it must
        // show an overloaded server, and its controls steer one).
        let answer = match route.label {
            "GET /healthz" => Ok(routes::healthz()),
            label => answer_live(&twin, &info, label, &parts, body).await,
        };
        // Entered once the answer is ready, as the sync answerer does: a state reading does
        // not count itself among the requests in flight.
        let _running = app
            .inflight
            .enter(&info.request_id, &info.method, &info.path);
        return respond(
            &twin,
            answer,
            &info,
            &Report::default(),
            None,
            wants_keep_alive,
        );
    }
    let Ok(admitted) = twin.admission.clone().try_acquire_owned() else {
        let error = ApiError::Overloaded {
            detail: format!(
                "all {} workers are busy and the queue of {} is full; retry shortly",
                app.config.workers, app.config.queue
            ),
            retry_after_s: 1,
        };
        info.hop(
            Unit::Workers,
            "shed",
            format_args!("refused: {} {} (queue_full)", error.status(), error.code()),
        );
        let report = Report {
            shed: Some("queue_full"),
            ..Report::default()
        };
        let _running = app
            .inflight
            .enter(&info.request_id, &info.method, &info.path);
        return respond(&twin, Err(error), &info, &report, None, wants_keep_alive);
    };
    let task = {
        let (twin, info) = (twin.clone(), info.clone());
        twin.tracker.clone().spawn(async move {
            let _admitted = admitted;
            work(&twin, &info, parts, body, wants_keep_alive).await
        })
    };
    match task.await {
        Ok(response) => response,
        Err(e) => {
            log::error!("{}: handler panicked: {e}", info.request_id);
            respond(
                &twin,
                Err(ApiError::Internal(e.to_string())),
                &info,
                &Report::default(),
                None,
                wants_keep_alive,
            )
        }
    }
}

/// One admitted request: waits for a worker permit (its queue time), routes, observes.
async fn work(
    twin: &Twin,
    info: &RequestInfo,
    parts: Parts,
    body: Body,
    wants_keep_alive: bool,
) -> Response {
    let app = &twin.app;
    // The queue's depth as the sync server's gauge tells it: set when a request joins the
    // wait for a worker permit and again when one leaves it.
    twin.app.metrics.queue_depth.set(twin.waiting());
    let permit = twin.workers.clone().acquire_owned().await;
    twin.app.metrics.queue_depth.set(twin.waiting());
    let picked_up = Instant::now();
    let queued = picked_up.saturating_duration_since(info.received);
    info.hop(
        Unit::Workers,
        "picked-up",
        format_args!("after {:.1} ms in the queue", queued.as_secs_f64() * 1000.0),
    );
    let busy = Busy::new(&app.metrics);
    let _running = app
        .inflight
        .enter(&info.request_id, &info.method, &info.path);
    let mut report = Report::default();
    report.timings.add(Step::Queue, queued);
    let mut rate = None;
    let answer = match permit {
        Ok(_) => route(twin, info, &parts, body, &mut report, &mut rate).await,
        Err(_) => Err(ApiError::ShuttingDown),
    };
    drop(busy);
    respond(twin, answer, info, &report, rate, wants_keep_alive)
}

/// `workers_busy` counts a request while it holds a worker permit, until it is answered or
/// its task panics.
struct Busy<'a>(&'a paytrace::metrics::Metrics);

impl<'a> Busy<'a> {
    fn new(metrics: &'a paytrace::metrics::Metrics) -> Busy<'a> {
        metrics.workers_busy.inc();
        Busy(metrics)
    }
}

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        self.0.workers_busy.dec();
    }
}

/// The library's route table; a protected route runs the library's chain first.
async fn route(
    twin: &Twin,
    info: &RequestInfo,
    parts: &Parts,
    body: Body,
    report: &mut Report,
    rate: &mut Option<Decision>,
) -> Result<Reply, ApiError> {
    let app = &twin.app;
    let (r, id) = routes::find(parts.method.as_str(), parts.uri.path())?;
    match r.label {
        // Liveness and the live page are answered before admission (see `handle`): never
        // here, and never by the payment routes below.
        _ if r.is_immediate() => return Err(ApiError::NotFound),
        "GET /readyz" => {
            let app = app.clone();
            return blocking(move || routes::readyz(&app)).await;
        }
        "GET /metrics" => return Ok(routes::render_metrics(app, twin.provider.breaker_state())),
        "GET /openapi.json" => return Ok(routes::openapi(app)),
        _ => {}
    }
    let headers = ChainHeaders {
        authorization: header(parts, "Authorization"),
        request_timeout_ms: header(parts, "Request-Timeout-Ms"),
    };
    let verdict = middleware::chain(app, info, headers, report);
    *rate = verdict.rate;
    let admitted = verdict.admitted?;
    let caller = Owned {
        request_id: info.request_id.clone(),
        scope: admitted.principal.scope,
        deadline: admitted.deadline,
    };
    match r.label {
        "POST /payments" => create(twin, caller, parts, body, report).await,
        "GET /payments" => {
            let query = http::query_pairs(parts.uri.query().unwrap_or(""));
            on_blocking(app, caller, report, move |app, c, report| {
                flow::read::list(app, c, &query, report)
            })
            .await
        }
        _ => {
            let id = id.to_string();
            on_blocking(app, caller, report, move |app, c, report| {
                flow::read::get(app, c, &id, report)
            })
            .await
        }
    }
}

/// `POST /payments`: the key, the media type and the body, then the library's steps — begin
/// (validate, claim) and finish (settle, persist) on the blocking pool, the charge awaited.
async fn create(
    twin: &Twin,
    caller: Owned,
    parts: &Parts,
    body: Body,
    report: &mut Report,
) -> Result<Reply, ApiError> {
    let app = &twin.app;
    let key = validate::idempotency_key(header(parts, "Idempotency-Key"))?;
    http::require_json_type(header(parts, "Content-Type"))?;
    let body = read_body(parts, body, app.config.max_body, app.config.socket_timeout).await?;

    let begun = on_blocking(app, caller.clone(), report, move |app, c, report| {
        payment::begin(app, c, &key, &body, report)
    })
    .await?;
    let claimed = match begun {
        Begun::Answered(answer) => return answer,
        Begun::Claimed(claimed) => claimed,
    };

    // The provider call: no thread waits for it.
    let charged = match payment::charge_slice(app, &caller.as_caller(), report) {
        None => None,
        Some(timeout) => {
            let t = Instant::now();
            let request = payment::charge_request(&claimed.payment);
            let charged = twin.provider.charge(&request, timeout).await;
            payment::charged_in(
                &caller.as_caller(),
                &charged,
                t.elapsed(),
                timeout,
                twin.provider.breaker_state(),
                report,
            );
            Some(charged)
        }
    };

    on_blocking(app, caller, report, move |app, c, report| {
        payment::finish(app, c, claimed, charged, report)
    })
    .await
}

/// The live page, its state and its controls, from the library's `live` module. A control's
/// body is read first, as the sync front reads every body before dispatch (refused over
/// `--max-body`, or when it stalls past `--socket-timeout`); the control then checks the key, the
/// media type and its own 4 KiB bound in the sync server's order.
async fn answer_live(
    twin: &Twin,
    info: &RequestInfo,
    label: &str,
    parts: &Parts,
    body: Body,
) -> Result<Reply, ApiError> {
    let app = &twin.app;
    match label {
        "GET /" => Ok(live::page()),
        "GET /debug/state" => Ok(live::state(app, &twin.serving())),
        _ => {
            let body =
                read_body(parts, body, app.config.max_body, app.config.socket_timeout).await?;
            let mut request = Control { parts, body };
            if label == "POST /debug/burst" {
                live::start_burst(app, info, &mut request)
            } else {
                live::set_provider_faults(app, info, &mut request)
            }
        }
    }
}

/// A control's request as hyper parsed it, its body already read.
struct Control<'a> {
    parts: &'a Parts,
    body: Vec<u8>,
}

impl ControlRequest for Control<'_> {
    fn header(&self, name: &str) -> Option<&str> {
        header(self.parts, name)
    }

    fn body(&mut self) -> Result<Vec<u8>, ApiError> {
        if self.body.len() as u64 > live::CONTROL_BODY {
            return Err(ApiError::BodyTooLarge {
                limit: live::CONTROL_BODY,
            });
        }
        Ok(std::mem::take(&mut self.body))
    }
}

/// A [`Caller`] that can move to the blocking pool.
#[derive(Clone)]
struct Owned {
    request_id: String,
    scope: String,
    deadline: Deadline,
}

impl Owned {
    fn as_caller(&self) -> Caller<'_> {
        Caller {
            request_id: &self.request_id,
            scope: &self.scope,
            deadline: self.deadline,
        }
    }
}

/// Runs a blocking library step on tokio's blocking pool with its own report, then adds what it
/// recorded to `report`.
async fn on_blocking<T: Send + 'static>(
    app: &Arc<App>,
    caller: Owned,
    report: &mut Report,
    step: impl FnOnce(&App, &Caller, &mut Report) -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    let app = app.clone();
    let mut lent = std::mem::take(report);
    let (result, back) = blocking(move || {
        let result = step(&app, &caller.as_caller(), &mut lent);
        (result, lent)
    })
    .await?;
    *report = back;
    result
}

/// `spawn_blocking`, with a panic as a 500.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::Internal(format!("a blocking step panicked: {e}")))
}

/// Reads the whole body within `--socket-timeout`, refusing more than `limit` bytes: from
/// `Content-Length` before reading anything, by counting otherwise.
async fn read_body(
    parts: &Parts,
    body: Body,
    limit: u64,
    within: Duration,
) -> Result<Vec<u8>, ApiError> {
    if let Some(raw) = header(parts, "Content-Length")
        && raw.trim().parse::<u64>().map_or(true, |n| n > limit)
    {
        return Err(ApiError::BodyTooLarge { limit });
    }
    let limited = Limited::new(body, usize::try_from(limit).unwrap_or(usize::MAX));
    match tokio::time::timeout(within, limited.collect()).await {
        Err(_) => Err(ApiError::RequestTimeout),
        Ok(Ok(collected)) => Ok(collected.to_bytes().to_vec()),
        Ok(Err(e)) if e.downcast_ref::<LengthLimitError>().is_some() => {
            Err(ApiError::BodyTooLarge { limit })
        }
        Ok(Err(e)) => Err(ApiError::invalid(format!(
            "the request body could not be read: {e}"
        ))),
    }
}

/// Describes, counts and logs the answer with the library's observation layer, and turns it
/// into axum's response.
fn respond(
    twin: &Twin,
    answer: Result<Reply, ApiError>,
    info: &RequestInfo,
    report: &Report,
    rate: Option<Decision>,
    wants_keep_alive: bool,
) -> Response {
    let app = &twin.app;
    let reply = answer.unwrap_or_else(|e| e.into_reply(&info.request_id));
    let total = info.received.elapsed();
    let seen = Observed { info, report, rate };
    // Kept alive only while that cannot starve anyone: the client wants it, the listener is
    // open, and at most half of --max-connections are open.
    let keep_alive = wants_keep_alive
        && !twin.closing.load(Ordering::SeqCst)
        && !app.is_draining()
        && twin.open_connections.load(Ordering::SeqCst) <= app.config.max_connections as usize / 2;
    let reply = observe::describe(app, reply, &seen, total).header(
        "Connection",
        if keep_alive { "keep-alive" } else { "close" },
    );
    let status = reply.status;
    observe::access_log(
        app,
        info,
        status,
        total,
        report,
        twin.provider.breaker_state(),
    );
    info.hop(
        Unit::Shutdown,
        "done",
        format_args!("answered {status}; the drain no longer waits for it"),
    );
    to_response(reply)
}

/// hyper leaves out the body of an answer to HEAD itself, and keeps its Content-Length.
fn to_response(reply: Reply) -> Response {
    let mut builder = Response::builder()
        .status(reply.status)
        .header("Content-Type", reply.content_type.as_str());
    for (name, value) in &reply.headers {
        builder = builder.header(name.as_str(), value.as_str());
    }
    builder.body(Body::from(reply.body)).unwrap_or_else(|e| {
        log::error!("cannot build a response: {e}");
        let mut r = Response::new(Body::empty());
        *r.status_mut() = axum::http::StatusCode::INTERNAL_SERVER_ERROR;
        r
    })
}

/// The sync front's limits on a request head, checked on what hyper parsed: 414 for a request
/// line over 8 KiB, 431 for a header block over 16 KiB (hyper itself answers 431 to more than
/// 100 fields).
fn head_limits(parts: &Parts, max_body: u64) -> Result<(), ApiError> {
    let line = parts.method.as_str().len() + parts.uri.to_string().len() + " HTTP/1.1".len() + 1;
    if line > MAX_REQUEST_LINE {
        return Err(ApiError::UriTooLong);
    }
    let block: usize = parts
        .headers
        .iter()
        .map(|(name, value)| name.as_str().len() + 2 + value.len() + 2)
        .sum();
    if block > MAX_HEADER_BYTES || parts.headers.len() > MAX_HEADER_FIELDS {
        return Err(ApiError::HeadersTooLarge(format!(
            "the header block is over {MAX_HEADER_BYTES} bytes or {MAX_HEADER_FIELDS} fields"
        )));
    }
    // A declared body over `--max-body` is refused from its length, before the key, the rate
    // limit or the route's own checks, as the sync front refuses it. (One sent chunked is
    // counted as it is read, by the route that reads it: on the twin that is after those
    // checks.)
    if let Some(declared) =
        header(parts, "Content-Length").and_then(|v| v.trim().parse::<u64>().ok())
        && declared > max_body
    {
        return Err(ApiError::BodyTooLarge { limit: max_body });
    }
    Ok(())
}

/// Whether the client asked to keep its connection: HTTP/1.1 unless it said `close`, HTTP/1.0
/// only when it said `keep-alive`.
fn wants_keep_alive(parts: &Parts) -> bool {
    let tokens = header(parts, "Connection")
        .unwrap_or("")
        .to_ascii_lowercase();
    let has = |t: &str| tokens.split(',').any(|x| x.trim() == t);
    match parts.version {
        axum::http::Version::HTTP_11 => !has("close"),
        axum::http::Version::HTTP_10 => has("keep-alive"),
        _ => false,
    }
}

fn header<'a>(parts: &'a Parts, name: &str) -> Option<&'a str> {
    parts.headers.get(name).and_then(|v| v.to_str().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(request: axum::http::request::Builder) -> Parts {
        request.body(()).unwrap().into_parts().0
    }

    #[test]
    fn the_sync_fronts_head_limits_hold_on_what_hyper_parsed() {
        let ok = parts(Request::get("/payments").header("X-A", "b"));
        assert!(head_limits(&ok, 16).is_ok());
        let long = parts(Request::get(format!("/{}", "a".repeat(MAX_REQUEST_LINE))));
        assert!(matches!(head_limits(&long, 16), Err(ApiError::UriTooLong)));
        let big = parts(Request::get("/healthz").header("X-Big", "b".repeat(MAX_HEADER_BYTES)));
        assert!(matches!(
            head_limits(&big, 16),
            Err(ApiError::HeadersTooLarge(_))
        ));
        let at_limit = parts(Request::post("/payments").header("Content-Length", "16"));
        assert!(head_limits(&at_limit, 16).is_ok());
        let over = parts(Request::post("/payments").header("Content-Length", "17"));
        assert!(matches!(
            head_limits(&over, 16),
            Err(ApiError::BodyTooLarge { limit: 16 })
        ));
    }

    #[test]
    fn a_control_reads_its_headers_and_at_most_4_kib_of_body_like_on_the_sync_server() {
        let head = parts(
            Request::put("/debug/provider-faults").header("content-type", "application/json"),
        );
        let at_most = vec![b' '; live::CONTROL_BODY as usize];
        let mut fits = Control {
            parts: &head,
            body: at_most.clone(),
        };
        assert_eq!(fits.header("Content-Type"), Some("application/json"));
        assert_eq!(fits.header("Authorization"), None);
        assert_eq!(fits.body().unwrap(), at_most);
        let mut over = Control {
            parts: &head,
            body: vec![b' '; live::CONTROL_BODY as usize + 1],
        };
        assert!(matches!(
            over.body(),
            Err(ApiError::BodyTooLarge { limit }) if limit == live::CONTROL_BODY
        ));
    }

    #[test]
    fn keep_alive_is_what_the_client_asked_for_by_its_version() {
        use axum::http::Version;
        let ask = |version: Version, connection: Option<&str>| {
            let mut b = Request::get("/").version(version);
            if let Some(c) = connection {
                b = b.header("Connection", c);
            }
            wants_keep_alive(&parts(b))
        };
        assert!(ask(Version::HTTP_11, None));
        assert!(!ask(Version::HTTP_11, Some("close")));
        assert!(!ask(Version::HTTP_11, Some("Upgrade, Close")));
        assert!(!ask(Version::HTTP_10, None));
        assert!(ask(Version::HTTP_10, Some("keep-alive")));
    }
}
