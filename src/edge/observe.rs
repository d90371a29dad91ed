//! Observation of every request, in one layer: the response headers that describe it
//! (`X-Request-Id`, `Server-Timing`, the rate-limit headers), the per-request metrics, and the
//! access-log line. It reads what a request's handler reported ([`Report`]); handlers never
//! log or count requests themselves.

use std::time::{Duration, Instant};

use serde_json::json;
use tiny_http::Request;

use super::http;
use super::live::board::Seen;
use super::middleware::RequestInfo;
use super::ratelimit::{Decision, RateLimiter};
use super::routes;
use crate::app::App;
use crate::config::LogFormat;
use crate::deadline::Step;
use crate::flow::Report;
use crate::provider::breaker::State;
use crate::reply::Reply;
use crate::server_timing::{self, Entry};

/// What is known of a request when its answer is written.
pub struct Observed<'a> {
    pub info: &'a RequestInfo,
    /// The handler's report, with the time the request waited in the queue under `queue`.
    pub report: &'a Report,
    /// The rate limiter's decision, advertised on the answer when the chain ran.
    pub rate: Option<Decision>,
}

/// Describes the answer in its headers, counts it, writes it, and logs the access line.
pub fn send(app: &App, request: Request, reply: Reply, seen: &Observed) {
    let total = seen.info.received.elapsed();
    let reply = describe(app, reply, seen, total);
    let status = reply.status;
    if let Err(e) = http::send(request, &reply) {
        log::debug!("{}: writing the response failed: {e}", seen.info.request_id);
    }
    access_log(
        app,
        seen.info,
        status,
        total,
        seen.report,
        app.provider.breaker_state(),
    );
}

/// The answer's describing headers, and the request's metrics, for a request that took `total`:
/// what [`send`] does before writing, for any HTTP server.
pub fn describe(app: &App, reply: Reply, seen: &Observed, total: Duration) -> Reply {
    let route = routes::label_for(&seen.info.method, &seen.info.path);
    let mut reply = reply
        .header("X-Request-Id", seen.info.request_id.clone())
        .header("Server-Timing", timing_header(route, seen.report, total));
    if let Some(decision) = &seen.rate {
        reply = reply
            .header("RateLimit-Policy", app.limiter.policy_header())
            .header("RateLimit", RateLimiter::state_header(decision));
    }
    record(app, route, reply.status, total, seen.report, true);
    board(app, seen.info, route, reply.status, total, seen.report);
    reply
}

/// Keeps the request for the live page's list of the last requests.
fn board(
    app: &App,
    info: &RequestInfo,
    route: &'static str,
    status: u16,
    total: Duration,
    report: &Report,
) {
    app.board.record(Seen {
        request_id: info.request_id.clone(),
        route,
        status,
        at: info.received,
        total,
        steps: Step::ALL.map(|step| report.timings.get(step)),
        budget: info.deadline.budget(),
        shed: report.shed,
    });
}

/// Counts and logs a request the front answered itself (malformed, too slow, too large, or one
/// connection too many): the same metrics and access-log line as every other request.
pub fn refusal(
    app: &App,
    request_id: &str,
    method: &str,
    target: &str,
    status: u16,
    total: Duration,
    shed: Option<&'static str>,
) {
    let info = RequestInfo::bare(
        request_id.to_string(),
        method,
        target,
        Instant::now(),
        app.config.request_timeout,
    );
    let report = Report {
        shed,
        ..Report::default()
    };
    let route = routes::label_for(&info.method, &info.path);
    record(app, route, status, total, &report, false);
    board(app, &info, route, status, total, &report);
    access_log(
        app,
        &info,
        status,
        total,
        &report,
        app.provider.breaker_state(),
    );
}

/// `steps`: whether the request went through the steps (the front's refusals did not).
fn record(app: &App, route: &str, status: u16, total: Duration, report: &Report, steps: bool) {
    let m = &app.metrics;
    m.http_requests
        .with_label_values(&[route, &status.to_string()])
        .inc();
    m.http_duration
        .with_label_values(&[route])
        .observe(total.as_secs_f64());
    if steps && route == "POST /payments" && report.shed.is_none() {
        for step in Step::ALL {
            m.step_duration
                .with_label_values(&[step.name()])
                .observe(report.timings.get(step).as_secs_f64());
        }
    }
    if let Some(outcome) = report.idempotency {
        m.idempotency.with_label_values(&[outcome]).inc();
    }
    if let Some(reason) = report.shed {
        m.shed.with_label_values(&[reason]).inc();
    }
}

/// `POST /payments`: `queue`, `acquire`, `claim`, `provider` (with the slice it was given),
/// `persist`, `total`; any other route: `queue`, `total`.
fn timing_header(route: &str, report: &Report, total: Duration) -> String {
    let steps: &[Step] = if route == "POST /payments" {
        &Step::ALL
    } else {
        &[Step::Queue]
    };
    let mut entries: Vec<Entry> = steps
        .iter()
        .map(|step| {
            let mut e = Entry::new(step.name(), report.timings.get(*step));
            if *step == Step::Provider {
                e.desc = report
                    .provider_slice
                    .map(|s| format!("slice {}ms", s.as_millis()));
            }
            e
        })
        .collect();
    entries.push(Entry::new("total", total));
    server_timing::format(&entries)
}

/// One line per request: id, method, path, status, total and each step's milliseconds, the
/// idempotency decision, the breaker's state (`breaker`: the state of the breaker the server's
/// payments go through). Never the API key.
pub fn access_log(
    app: &App,
    info: &RequestInfo,
    status: u16,
    total: Duration,
    report: &Report,
    breaker: State,
) {
    let ms = server_timing::round_ms;
    let mut fields = vec![
        ("request_id", json!(info.request_id)),
        ("method", json!(info.method)),
        ("path", json!(info.path)),
        ("status", json!(status)),
        ("total_ms", json!(ms(total))),
    ];
    for step in Step::ALL {
        fields.push((step.ms_field(), json!(ms(report.timings.get(step)))));
    }
    fields.push(("idempotency", json!(report.idempotency.unwrap_or("-"))));
    fields.push(("breaker", json!(breaker.name())));
    match app.config.log_format {
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
