//! Unit 02, middleware and dependency injection.
//!
//! The chain runs in this order for every request: request id → access log → auth → rate limit
//! → deadline. `server::handle` creates the [`Ctx`] (request id) and writes the access-log line
//! last, whatever happened; [`protect`] runs the other three, in order, in front of every
//! `/payments` handler. The per-request [`Ctx`] carries what they produce (id, principal,
//! deadline, step timings) to the handler. `tests/api/middleware.rs` asserts the order from
//! outside. The long-lived
//! collaborators (pool, provider client, config) live in `app::App`, built once at start-up and
//! handed to every handler: no globals.

use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tiny_http::Request;

use crate::app::App;
use crate::deadline::{Deadline, Step};
use crate::error::ApiError;
use crate::http;
use crate::ratelimit::{Decision, RateLimiter};

/// Who is calling: derived from the API key, never the key itself (keys are never logged or
/// stored). Payments and idempotency keys are scoped to it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Principal {
    /// First 16 bytes of SHA-256(key), hex.
    pub scope: String,
}

/// The per-request context every link and the handler share.
#[derive(Debug)]
pub struct Ctx {
    pub request_id: String,
    pub method: String,
    pub path: String,
    /// When the request was read off the socket (the dispatcher's stamp).
    pub received: Instant,
    /// When a worker picked it up.
    pub started: Instant,
    pub deadline: Deadline,
    pub principal: Option<Principal>,
    timings: [Duration; 5],
    /// What the idempotency layer decided, for the access log.
    pub idempotency: Option<&'static str>,
    /// The rate limiter's decision, advertised on the response.
    pub rate: Option<Decision>,
    /// The timeout the provider call was given (its slice of the budget).
    pub provider_slice: Option<Duration>,
    /// Why the request was refused to protect the server, if it was (`requests_shed_total`).
    pub shed: Option<&'static str>,
}

impl Ctx {
    pub fn new(request: &Request, received: Instant, budget: Duration) -> Ctx {
        Ctx::bare(
            http::request_id(request),
            request.method().as_str(),
            request.url(),
            received,
            budget,
        )
    }

    /// A context from plain parts, for requests the front answers before tiny_http sees them.
    pub fn bare(
        request_id: String,
        method: &str,
        target: &str,
        received: Instant,
        budget: Duration,
    ) -> Ctx {
        let started = Instant::now();
        let mut ctx = Ctx {
            request_id,
            method: method.to_string(),
            path: http::split_target(target).0.chars().take(200).collect(),
            received,
            started,
            deadline: Deadline::new(received, budget),
            principal: None,
            timings: [Duration::ZERO; 5],
            idempotency: None,
            rate: None,
            provider_slice: None,
            shed: None,
        };
        ctx.add(Step::Queue, started.saturating_duration_since(received));
        ctx
    }

    /// Adds `d` to `step`'s time (the two acquisitions of a payment add up under `acquire`).
    pub fn add(&mut self, step: Step, d: Duration) {
        self.timings[step as usize] += d;
    }

    pub fn timing(&self, step: Step) -> Duration {
        self.timings[step as usize]
    }

    /// Runs `f`, counting its time under `step`.
    pub fn timed<T>(&mut self, step: Step, f: impl FnOnce() -> T) -> T {
        let t = Instant::now();
        let v = f();
        self.add(step, t.elapsed());
        v
    }

    /// The caller's scope; handlers behind [`authenticate`] always have one.
    pub fn scope(&self) -> Result<&str, ApiError> {
        self.principal
            .as_ref()
            .map(|p| p.scope.as_str())
            .ok_or(ApiError::Unauthorized)
    }
}

/// The accepted API keys.
pub struct ApiKeys {
    keys: Vec<Vec<u8>>,
}

impl ApiKeys {
    pub fn new(keys: &[String]) -> ApiKeys {
        ApiKeys {
            keys: keys.iter().map(|k| k.as_bytes().to_vec()).collect(),
        }
    }

    /// Compares against every key in constant time, so timing does not reveal a prefix.
    fn check(&self, candidate: &[u8]) -> bool {
        let mut found = subtle::Choice::from(0);
        for k in &self.keys {
            found |= k.as_slice().ct_eq(candidate);
        }
        found.into()
    }
}

pub fn scope_of(key: &str) -> String {
    hex::encode(&Sha256::digest(key.as_bytes())[..16])
}

/// Auth: `Authorization: Bearer <key>` with a configured key, else 401.
pub fn authenticate(keys: &ApiKeys, ctx: &mut Ctx, request: &Request) -> Result<(), ApiError> {
    let header = http::header(request, "Authorization").ok_or(ApiError::Unauthorized)?;
    let (scheme, key) = header
        .trim()
        .split_once(' ')
        .ok_or(ApiError::Unauthorized)?;
    let key = key.trim();
    if !scheme.eq_ignore_ascii_case("bearer") || !keys.check(key.as_bytes()) {
        return Err(ApiError::Unauthorized);
    }
    ctx.principal = Some(Principal {
        scope: scope_of(key),
    });
    Ok(())
}

/// The links in front of every `/payments` handler, in order: auth → rate limit → deadline.
/// (Request id and access log wrap every request in `server::handle`.)
pub fn protect(app: &App, ctx: &mut Ctx, request: &Request) -> Result<(), ApiError> {
    authenticate(&app.keys, ctx, request)?;
    rate_limit(&app.limiter, app.clock.now(), ctx)?;
    apply_deadline(ctx, request)
}

/// Rate limit: one token from the caller's bucket, or 429 with `Retry-After`.
pub fn rate_limit(limiter: &RateLimiter, now: Instant, ctx: &mut Ctx) -> Result<(), ApiError> {
    let decision = limiter.check(ctx.scope()?, now);
    ctx.rate = Some(decision);
    if decision.allowed {
        Ok(())
    } else {
        ctx.shed = Some("rate_limited");
        Err(ApiError::RateLimited {
            retry_after_s: decision.retry_after_s,
        })
    }
}

/// Deadline: a client may shorten (never lengthen) its budget with `Request-Timeout-Ms`.
pub fn apply_deadline(ctx: &mut Ctx, request: &Request) -> Result<(), ApiError> {
    if let Some(raw) = http::header(request, "Request-Timeout-Ms") {
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
        ctx.deadline = ctx.deadline.shortened_to(Duration::from_millis(ms));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_match_exactly() {
        let keys = ApiKeys::new(&["sk_a".into(), "sk_bb".into()]);
        assert!(keys.check(b"sk_a"));
        assert!(keys.check(b"sk_bb"));
        assert!(!keys.check(b"sk_b"));
        assert!(!keys.check(b"sk_a "));
        assert!(!keys.check(b""));
    }

    #[test]
    fn scopes_do_not_reveal_the_key() {
        let s = scope_of("sk_test_paytrace");
        assert_eq!(s.len(), 32);
        assert!(!s.contains("sk_"));
        assert_ne!(s, scope_of("sk_other"));
    }

    fn request(headers: &[(&str, &str)]) -> Request {
        let mut t = tiny_http::TestRequest::new().with_path("/payments");
        for (k, v) in headers {
            t = t.with_header(tiny_http::Header::from_bytes(k.as_bytes(), v.as_bytes()).unwrap());
        }
        t.into()
    }

    fn ctx_for(r: &Request) -> Ctx {
        Ctx::new(r, Instant::now(), Duration::from_secs(3))
    }

    #[test]
    fn auth_accepts_a_configured_bearer_key_and_nothing_else() {
        let keys = ApiKeys::new(&["sk_live_1".into()]);
        for (header, ok) in [
            ("Bearer sk_live_1", true),
            ("bearer sk_live_1", true),
            ("Bearer sk_live_2", false),
            ("Basic sk_live_1", false),
            ("sk_live_1", false),
        ] {
            let r = request(&[("Authorization", header)]);
            let mut ctx = ctx_for(&r);
            assert_eq!(authenticate(&keys, &mut ctx, &r).is_ok(), ok, "{header}");
            assert_eq!(ctx.principal.is_some(), ok);
        }
        let r = request(&[]);
        assert!(matches!(
            authenticate(&keys, &mut ctx_for(&r), &r),
            Err(ApiError::Unauthorized)
        ));
    }

    #[test]
    fn rate_limit_needs_a_principal_and_records_its_decision() {
        let limiter = RateLimiter::new(crate::config::parse_rate("1/s").unwrap());
        let r = request(&[]);
        let mut ctx = ctx_for(&r);
        assert!(
            rate_limit(&limiter, Instant::now(), &mut ctx).is_err(),
            "no principal, no bucket"
        );
        ctx.principal = Some(Principal { scope: "s".into() });
        let now = Instant::now();
        assert!(rate_limit(&limiter, now, &mut ctx).is_ok());
        assert!(matches!(
            rate_limit(&limiter, now, &mut ctx),
            Err(ApiError::RateLimited { retry_after_s: 1 })
        ));
        assert_eq!(ctx.rate.map(|d| d.allowed), Some(false));
    }

    #[test]
    fn the_deadline_can_be_shortened_never_lengthened_and_bad_values_are_400() {
        for (value, budget_ms) in [
            ("300", Some(300)),
            ("9000", Some(3000)),
            ("0", None),
            ("abc", None),
            ("-5", None),
        ] {
            let r = request(&[("Request-Timeout-Ms", value)]);
            let mut ctx = ctx_for(&r);
            match (apply_deadline(&mut ctx, &r), budget_ms) {
                (Ok(()), Some(ms)) => assert_eq!(ctx.deadline.budget(), Duration::from_millis(ms)),
                (Err(ApiError::InvalidRequest { .. }), None) => {}
                (other, _) => panic!("{value}: {other:?}"),
            }
        }
    }

    #[test]
    fn the_request_id_is_the_clients_when_sane() {
        let r = request(&[("X-Request-Id", "abc-1")]);
        assert_eq!(ctx_for(&r).request_id, "abc-1");
        let r = request(&[("X-Request-Id", "has space")]);
        assert!(ctx_for(&r).request_id.starts_with("req_"));
    }
}
