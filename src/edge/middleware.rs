//! Unit 02, middleware and dependency injection.
//!
//! The chain runs in this order for every request: request id → access log → auth → rate limit
//! → deadline. The dispatcher gives each request its identity ([`RequestInfo`]: the request id)
//! before it queues, so even a request refused at the queue is logged under its id; the
//! observation layer (`observe.rs`) writes the access-log line last, whatever happened.
//! [`protect`] runs the other three, in order, in front of every `/payments` handler, and
//! returns what it decided ([`Verdict`]): who is calling and the budget they get, or why not.
//! `tests/api/middleware.rs` asserts the order from outside. The long-lived collaborators (pool,
//! provider client, config) live in `app::App`, built once at start-up and handed to every
//! handler: no globals.

use std::time::{Duration, Instant};

use tiny_http::Request;

use super::auth::{self, Principal};
use super::http;
use super::ratelimit::Decision;
use crate::app::App;
use crate::deadline::Deadline;
use crate::error::ApiError;
use crate::flow::Report;
use crate::trace::{self, Unit};

/// A request's identity and timing, set once when the dispatcher takes it and never written
/// after: what every link and the observation layer read.
#[derive(Clone, Debug)]
pub struct RequestInfo {
    pub request_id: String,
    pub method: String,
    /// The path without its query, at most 200 characters (for logs and route labels).
    pub path: String,
    /// When the front finished reading it off the socket: the budget starts here.
    pub received: Instant,
    /// The budget it starts with (`--request-timeout`), from `received`. The chain may shorten
    /// it (`Request-Timeout-Ms`); the handler gets that one, in [`Admitted`].
    pub deadline: Deadline,
}

impl RequestInfo {
    pub fn new(request: &Request, received: Instant, budget: Duration) -> RequestInfo {
        RequestInfo::bare(
            http::request_id(request),
            request.method().as_str(),
            request.url(),
            received,
            budget,
        )
    }

    /// From plain parts, for requests the front answers before tiny_http sees them.
    pub fn bare(
        request_id: String,
        method: &str,
        target: &str,
        received: Instant,
        budget: Duration,
    ) -> RequestInfo {
        RequestInfo {
            request_id,
            method: method.to_string(),
            path: http::split_target(target).0.chars().take(200).collect(),
            received,
            deadline: Deadline::new(received, budget),
        }
    }

    /// Logs one hop of this request to the trace.
    pub fn hop(&self, unit: Unit, step: &str, what: std::fmt::Arguments) {
        trace::hop(&self.request_id, &self.deadline, unit, step, None, what);
    }
}

/// What the chain let through: who is calling, and the budget the handler gets.
#[derive(Clone, Debug)]
pub struct Admitted {
    pub principal: Principal,
    pub deadline: Deadline,
}

/// The chain's decision, and the rate limiter's, which the answer advertises either way.
#[derive(Debug)]
pub struct Verdict {
    pub admitted: Result<Admitted, ApiError>,
    pub rate: Option<Decision>,
}

/// The links in front of every `/payments` handler, in order: auth → rate limit → deadline. A
/// request the rate limit refuses is recorded in `report` as shed.
pub fn protect(app: &App, info: &RequestInfo, request: &Request, report: &mut Report) -> Verdict {
    let headers = ChainHeaders {
        authorization: http::header(request, "Authorization"),
        request_timeout_ms: http::header(request, "Request-Timeout-Ms"),
    };
    chain(app, info, headers, report)
}

/// The request headers the chain reads, whichever HTTP server parsed them.
#[derive(Clone, Copy, Debug, Default)]
pub struct ChainHeaders<'a> {
    pub authorization: Option<&'a str>,
    pub request_timeout_ms: Option<&'a str>,
}

/// The chain itself, over the headers it reads: what [`protect`] runs for tiny_http, and what
/// any other server runs for its own requests.
pub fn chain(app: &App, info: &RequestInfo, headers: ChainHeaders, report: &mut Report) -> Verdict {
    let principal = match auth::authenticate(&app.keys, headers.authorization) {
        Ok(p) => p,
        Err(e) => {
            info.hop(Unit::Middleware, "auth", format_args!("refused: 401"));
            return Verdict {
                admitted: Err(e),
                rate: None,
            };
        }
    };
    info.hop(Unit::Middleware, "auth", format_args!("ok"));
    let decision = app.limiter.check(&principal.scope, app.clock.now());
    if !decision.allowed {
        report.shed = Some("rate_limited");
    }
    let admitted = rate_limit(decision).and_then(|()| {
        info.hop(
            Unit::Middleware,
            "rate-limit",
            format_args!("ok, {} left", decision.remaining),
        );
        apply_deadline(info.deadline, headers.request_timeout_ms)
    });
    let admitted = admitted.map(|deadline| {
        trace::hop(
            &info.request_id,
            &deadline,
            Unit::Middleware,
            "deadline",
            None,
            format_args!("budget {} ms", deadline.budget().as_millis()),
        );
        Admitted {
            principal,
            deadline,
        }
    });
    if let Err(e) = &admitted {
        info.hop(
            Unit::Middleware,
            if matches!(e, ApiError::RateLimited { .. }) {
                "rate-limit"
            } else {
                "deadline"
            },
            format_args!("refused: {} {}", e.status(), e.code()),
        );
    }
    Verdict {
        admitted,
        rate: Some(decision),
    }
}

/// Rate limit: the caller's bucket had a token, or 429 with `Retry-After`.
pub fn rate_limit(decision: Decision) -> Result<(), ApiError> {
    if decision.allowed {
        Ok(())
    } else {
        Err(ApiError::RateLimited {
            retry_after_s: decision.retry_after_s,
        })
    }
}

/// Deadline: a client may shorten (never lengthen) its budget with `Request-Timeout-Ms`.
pub fn apply_deadline(deadline: Deadline, header: Option<&str>) -> Result<Deadline, ApiError> {
    let Some(raw) = header else {
        return Ok(deadline);
    };
    let ms: u64 = raw
        .trim()
        .parse()
        .ok()
        .filter(|ms| *ms > 0)
        .ok_or_else(|| {
            ApiError::invalid(format!(
                "Request-Timeout-Ms must be a positive whole number of milliseconds, not `{raw}`"
            ))
        })?;
    Ok(deadline.shortened_to(Duration::from_millis(ms)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::edge::ratelimit::RateLimiter;

    /// The limiter's decision for `scope` now, as [`protect`] takes it.
    fn check(limiter: &RateLimiter, scope: &str, now: Instant) -> Result<(), ApiError> {
        rate_limit(limiter.check(scope, now))
    }

    #[test]
    fn the_rate_limit_refuses_once_the_bucket_is_empty() {
        let limiter = RateLimiter::new(crate::config::parse_rate("1/s").unwrap());
        let now = Instant::now();
        assert!(check(&limiter, "s", now).is_ok());
        assert!(matches!(
            check(&limiter, "s", now),
            Err(ApiError::RateLimited { retry_after_s: 1 })
        ));
        assert!(check(&limiter, "another scope", now).is_ok());
    }

    #[test]
    fn the_deadline_can_be_shortened_never_lengthened_and_bad_values_are_400() {
        let base = Deadline::new(Instant::now(), Duration::from_secs(3));
        for (value, budget_ms) in [
            ("300", Some(300)),
            ("9000", Some(3000)),
            ("0", None),
            ("abc", None),
            ("-5", None),
        ] {
            match (apply_deadline(base, Some(value)), budget_ms) {
                (Ok(d), Some(ms)) => assert_eq!(d.budget(), Duration::from_millis(ms)),
                (Err(ApiError::InvalidRequest { .. }), None) => {}
                (other, _) => panic!("{value}: {other:?}"),
            }
        }
        assert_eq!(
            apply_deadline(base, None).unwrap().budget(),
            Duration::from_secs(3)
        );
    }

    fn request(headers: &[(&str, &str)]) -> Request {
        let mut t = tiny_http::TestRequest::new().with_path("/payments");
        for (k, v) in headers {
            t = t.with_header(tiny_http::Header::from_bytes(k.as_bytes(), v.as_bytes()).unwrap());
        }
        t.into()
    }

    #[test]
    fn the_request_id_is_the_clients_when_sane() {
        let info = |r: &Request| RequestInfo::new(r, Instant::now(), Duration::from_secs(3));
        let r = request(&[("X-Request-Id", "abc-1")]);
        assert_eq!(info(&r).request_id, "abc-1");
        let r = request(&[("X-Request-Id", "has space")]);
        assert!(info(&r).request_id.starts_with("req_"));
    }
}
