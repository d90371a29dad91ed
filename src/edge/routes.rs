//! The routes, in one table read top to bottom, and the adapters between tiny_http and the
//! payment flow: each reads what its handler needs from the request (headers, body, query),
//! calls the flow's plain functions, and returns their answer; what happened on the way is in
//! the request's [`Report`].
//!
//! | method | path | behind the chain | handler |
//! |---|---|---|---|
//! | GET, HEAD | `/healthz` | no, and no worker | liveness: 200 while the process runs, also when every worker is busy |
//! | GET, HEAD | `/readyz` | no | readiness: 503 while draining or storage fails |
//! | GET, HEAD | `/metrics` | no | Prometheus text |
//! | POST | `/payments` | yes | [`crate::flow::payment::create`] |
//! | GET, HEAD | `/payments` | yes | [`crate::flow::read::list`] |
//! | GET, HEAD | `/payments/{id}` | yes | [`crate::flow::read::get`] |
//! | GET, HEAD | `/openapi.json` | no | this API's OpenAPI document (`data/openapi.json`), compiled in |
//! | GET, HEAD | `/` | no, and no worker | the live page ([`super::live`]) |
//! | GET, HEAD | `/debug/state` | no, and no worker | the JSON the live page refreshes from |
//! | PUT | `/debug/provider-faults` | API key only, no worker | the simulated provider's faults |
//! | POST | `/debug/burst` | API key only, no worker | a short load burst against this server |
//!
//! The live page's routes never queue behind payments: a lecture watches an overloaded server
//! on it, and must be able to steer it. Like liveness, they are answered by the dispatcher
//! (see [`immediate`]), which they never hold for more than a copy of some counters.

use serde_json::json;
use tiny_http::{Method, Request};

use super::http;
use super::live;
use super::middleware::{self, RequestInfo};
use super::ratelimit::Decision;
use crate::app::App;
use crate::error::ApiError;
use crate::flow::{self, Caller, Report, validate};
use crate::provider::breaker::State;
use crate::reply::Reply;

/// Which methods a route answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Methods {
    /// GET, and HEAD (the same answer without its body).
    Read,
    Post,
    Put,
}

impl Methods {
    fn accepts(self, method: &Method) -> bool {
        match self {
            Methods::Read => matches!(method, Method::Get | Method::Head),
            Methods::Post => matches!(method, Method::Post),
            Methods::Put => matches!(method, Method::Put),
        }
    }
}

/// Answered on the dispatcher: the request's identity and the request itself (a control reads
/// its headers and small body, which the front has already read whole).
type Direct = fn(&App, &RequestInfo, &mut Request) -> Result<Reply, ApiError>;

/// Reads a request for the flow and calls it: the caller, the request, the `{id}` of the path
/// (empty when the template has none), and the report to record what happened in.
type Adapter = fn(&App, &Caller, &mut Request, &str, &mut Report) -> Result<Reply, ApiError>;

/// What answers a route.
#[derive(Clone, Copy)]
enum Handler {
    /// Answered by the dispatcher without a worker (see [`immediate`]): it needs nothing that
    /// can wait, and must not wait for a worker itself.
    Immediate(Direct),
    /// Answered at once by a worker, without the middleware chain.
    Open(fn(&App) -> Reply),
    /// Behind the chain (auth → rate limit → deadline).
    Protected(Adapter),
}

pub struct Route {
    pub methods: Methods,
    /// The path; `{id}` stands for one non-empty segment.
    pub template: &'static str,
    /// The `route` label of the request metrics.
    pub label: &'static str,
    handler: Handler,
}

impl Route {
    /// Whether the dispatcher answers it itself, never behind a worker (liveness and the live
    /// page); the async twin answers the same routes before any permit.
    pub fn is_immediate(&self) -> bool {
        matches!(self.handler, Handler::Immediate(_))
    }
}

pub const ROUTES: &[Route] = &[
    Route {
        methods: Methods::Read,
        template: "/healthz",
        label: "GET /healthz",
        handler: Handler::Immediate(|_, _, _| Ok(healthz())),
    },
    Route {
        methods: Methods::Read,
        template: "/readyz",
        label: "GET /readyz",
        handler: Handler::Open(readyz),
    },
    Route {
        methods: Methods::Read,
        template: "/metrics",
        label: "GET /metrics",
        handler: Handler::Open(metrics),
    },
    Route {
        methods: Methods::Post,
        template: "/payments",
        label: "POST /payments",
        handler: Handler::Protected(create_payment),
    },
    Route {
        methods: Methods::Read,
        template: "/payments",
        label: "GET /payments",
        handler: Handler::Protected(list_payments),
    },
    Route {
        methods: Methods::Read,
        template: "/payments/{id}",
        label: "GET /payments/{id}",
        handler: Handler::Protected(get_payment),
    },
    Route {
        methods: Methods::Read,
        template: "/",
        label: "GET /",
        handler: Handler::Immediate(|_, _, _| Ok(live::page())),
    },
    Route {
        methods: Methods::Read,
        template: "/debug/state",
        label: "GET /debug/state",
        handler: Handler::Immediate(|app, _, _| Ok(live::state(app, &live::Serving::threads(app)))),
    },
    Route {
        methods: Methods::Put,
        template: "/debug/provider-faults",
        label: "PUT /debug/provider-faults",
        handler: Handler::Immediate(|app, info, request| {
            live::set_provider_faults(app, info, request)
        }),
    },
    Route {
        methods: Methods::Post,
        template: "/debug/burst",
        label: "POST /debug/burst",
        handler: Handler::Immediate(|app, info, request| live::start_burst(app, info, request)),
    },
    Route {
        methods: Methods::Read,
        template: "/openapi.json",
        label: "GET /openapi.json",
        handler: Handler::Open(openapi),
    },
];

/// The label of requests that match no route.
pub const OTHER: &str = "other";

impl Route {
    /// The `{id}` segment (or `""`) when `path` fits the template.
    fn matches<'p>(&self, path: &'p str) -> Option<&'p str> {
        match self.template.strip_suffix("{id}") {
            Some(prefix) => path
                .strip_prefix(prefix)
                .filter(|id| !id.is_empty() && !id.contains('/')),
            None => (path == self.template).then_some(""),
        }
    }
}

/// The route label for metrics: the matching route's, or [`OTHER`].
pub fn label_for(method: &str, path: &str) -> &'static str {
    let Ok(method) = method.parse::<Method>() else {
        return OTHER;
    };
    ROUTES
        .iter()
        .find(|r| r.methods.accepts(&method) && r.matches(path).is_some())
        .map_or(OTHER, |r| r.label)
}

/// The answer of a route that needs no worker, if the request names one: liveness must say the
/// process runs, and the live page must show why, even while every worker is busy and the
/// queue is full.
pub fn immediate(
    app: &App,
    info: &RequestInfo,
    request: &mut Request,
) -> Option<Result<Reply, ApiError>> {
    let method = request.method().clone();
    let answer = ROUTES.iter().find_map(|r| match r.handler {
        Handler::Immediate(answer)
            if r.methods.accepts(&method) && r.matches(&info.path).is_some() =>
        {
            Some(answer)
        }
        _ => None,
    })?;
    Some(answer(app, info, request))
}

/// Finds the route, runs the chain in front of a protected one, and calls its handler. A path
/// no route knows is 404; a known path with another method is 405 with `Allow`. What happened
/// goes into `report`, and the rate limiter's decision, which the answer advertises, into
/// `rate`.
pub fn route(
    app: &App,
    info: &RequestInfo,
    request: &mut Request,
    report: &mut Report,
    rate: &mut Option<Decision>,
) -> Result<Reply, ApiError> {
    let path = http::split_target(request.url()).0.to_string();
    let (r, id) = find(request.method().as_str(), &path)?;
    match r.handler {
        Handler::Immediate(answer) => answer(app, info, request),
        Handler::Open(handler) => Ok(handler(app)),
        Handler::Protected(adapter) => {
            let verdict = middleware::protect(app, info, request, report);
            *rate = verdict.rate;
            let admitted = verdict.admitted?;
            let caller = Caller {
                request_id: &info.request_id,
                scope: &admitted.principal.scope,
                deadline: admitted.deadline,
            };
            let id = id.to_string();
            adapter(app, &caller, request, &id, report)
        }
    }
}

/// The route `method` and `path` name, with the `{id}` segment (or `""`): a path no route knows
/// is 404; a known path with another method is 405 with `Allow`.
pub fn find<'p>(method: &str, path: &'p str) -> Result<(&'static Route, &'p str), ApiError> {
    let method = method.parse::<Method>().map_err(|()| ApiError::NotFound)?;
    let method = &method;
    let (mut read_allowed, mut post_allowed, mut put_allowed) = (false, false, false);
    for r in ROUTES {
        let Some(id) = r.matches(path) else {
            continue;
        };
        if !r.methods.accepts(method) {
            read_allowed |= r.methods == Methods::Read;
            post_allowed |= r.methods == Methods::Post;
            put_allowed |= r.methods == Methods::Put;
            continue;
        }
        return Ok((r, id));
    }
    let allow = match (read_allowed, post_allowed, put_allowed) {
        (false, false, false) => return Err(ApiError::NotFound),
        (true, false, false) => "GET, HEAD",
        (false, true, false) => "POST",
        (false, false, true) => "PUT",
        (true, true, false) => "GET, POST",
        (true, true, true) => "GET, POST, PUT",
        (true, false, true) => "GET, PUT",
        (false, true, true) => "POST, PUT",
    };
    Err(ApiError::MethodNotAllowed { allow })
}

/// Reads the key, the media type and the body, in that order, then runs the flow.
fn create_payment(
    app: &App,
    caller: &Caller,
    request: &mut Request,
    _: &str,
    report: &mut Report,
) -> Result<Reply, ApiError> {
    let key = validate::idempotency_key(http::header(request, "Idempotency-Key"))?;
    http::require_json(request)?;
    let body = http::read_body(request, app.config.max_body)?;
    flow::payment::create(app, caller, &key, &body, report)
}

fn list_payments(
    app: &App,
    caller: &Caller,
    request: &mut Request,
    _: &str,
    report: &mut Report,
) -> Result<Reply, ApiError> {
    let query = http::query_pairs(http::split_target(request.url()).1);
    flow::read::list(app, caller, &query, report)
}

fn get_payment(
    app: &App,
    caller: &Caller,
    _: &mut Request,
    id: &str,
    report: &mut Report,
) -> Result<Reply, ApiError> {
    flow::read::get(app, caller, id, report)
}

/// `GET /healthz`: the process runs.
pub fn healthz() -> Reply {
    Reply::json(200, &json!({"status": "ok"}))
}

/// The OpenAPI document of this API (`data/openapi.json`), compiled in.
pub const OPENAPI: &str = include_str!("../../data/openapi.json");

/// `GET /openapi.json`: the document, as `application/json` so that every client and tool reads
/// it as JSON without knowing a vendor media type.
pub fn openapi(_: &App) -> Reply {
    Reply::text(200, "application/json", OPENAPI)
}

/// `GET /readyz`: 503 while draining, or while storage cannot be written or read.
pub fn readyz(app: &App) -> Reply {
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

/// `GET /metrics`: the gauges that mirror state are read now, then everything is rendered.
fn metrics(app: &App) -> Reply {
    render_metrics(app, app.provider.breaker_state())
}

/// The Prometheus text, with `breaker` as the state of the breaker payments go through.
pub fn render_metrics(app: &App, breaker: State) -> Reply {
    let m = &app.metrics;
    let (open, idle) = app.db.state();
    m.pool_connections
        .with_label_values(&["idle"])
        .set(i64::from(idle));
    m.pool_connections
        .with_label_values(&["in_use"])
        .set(i64::from(open.saturating_sub(idle)));
    m.breaker_state.set(i64::from(breaker.as_number()));
    m.draining.set(i64::from(app.is_draining()));
    m.db_writer_queue.set(app.db.writer_queue() as i64);
    Reply::text(200, "text/plain; version=0.0.4; charset=utf-8", m.render())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_match_exact_paths_and_one_id_segment() {
        let by_id = &ROUTES[5];
        assert_eq!(by_id.matches("/payments/pay_1"), Some("pay_1"));
        assert_eq!(by_id.matches("/payments/"), None);
        assert_eq!(by_id.matches("/payments/a/b"), None);
        assert_eq!(ROUTES[3].matches("/payments"), Some(""));
        assert_eq!(ROUTES[3].matches("/payments/x"), None);
    }

    #[test]
    fn labels_come_from_the_table() {
        assert_eq!(label_for("POST", "/payments"), "POST /payments");
        assert_eq!(label_for("HEAD", "/payments"), "GET /payments");
        assert_eq!(label_for("GET", "/payments/pay_1"), "GET /payments/{id}");
        assert_eq!(label_for("DELETE", "/payments"), OTHER);
        assert_eq!(label_for("GET", "/nope"), OTHER);
        assert_eq!(label_for("-", ""), OTHER);
    }
}
