//! The provider client: one shared ureq agent, every call bounded by the slice of the request's
//! budget it was given.
//!
//! Classifying the outcome is the part that matters for money: a refused connection means
//! nothing was sent (the payment can be `failed`), while a timeout or a 5xx after the request
//! went out means the charge may exist (`pending`, resolved later by asking the provider).
//! Only an answer that says in full that *this* charge succeeded (200, a charge with our
//! idempotency key, amount and currency, `status: "succeeded"`) or was declined (402, the same
//! with `status: "declined"`) is final; anything else — `200 {"status":"failed"}`, a 202, a
//! charge for another key, a redirect, a body we cannot read — is ambiguous. Redirects are
//! never followed: the Idempotency-Key and the card go to the configured provider only.

use std::io::Read;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde::Deserialize;
use serde_json::json;

use crate::clock::Clock;
use crate::metrics::Metrics;
use crate::provider::CHARGES_PATH;
use crate::provider::breaker::{
    Breaker, BreakerConfig, Outcome, Permit, State, Transition, Window,
};

/// The largest answer head accepted from the provider (nginx's default for an upstream's is
/// 4 or 8 KiB).
const ANSWER_HEAD_MAX: usize = 16 * 1024;
/// The size of ureq's write buffer per provider connection.
const REQUEST_BUFFER: usize = 16 * 1024;

/// Resolves a provider URL whose host is an IP address in place. ureq's own resolver runs every
/// lookup that has a timeout on a new thread — for a literal address too, once per new
/// connection — so only host names go to it.
#[derive(Debug)]
struct LiteralResolver;

impl ureq::unversioned::resolver::Resolver for LiteralResolver {
    fn resolve(
        &self,
        uri: &ureq::http::Uri,
        config: &ureq::config::Config,
        timeout: ureq::unversioned::transport::NextTimeout,
    ) -> Result<ureq::unversioned::resolver::ResolvedSocketAddrs, ureq::Error> {
        let literal = uri.host().and_then(|h| {
            h.trim_start_matches('[')
                .trim_end_matches(']')
                .parse::<std::net::IpAddr>()
                .ok()
        });
        let port = uri.port_u16().unwrap_or(match uri.scheme_str() {
            Some("https") => 443,
            _ => 80,
        });
        match literal {
            Some(ip) => {
                let mut addrs = self.empty();
                addrs.push(std::net::SocketAddr::new(ip, port));
                Ok(addrs)
            }
            None => ureq::unversioned::resolver::DefaultResolver::default()
                .resolve(uri, config, timeout),
        }
    }
}

/// One charge to ask for. `idempotency_key` is the payment id: the provider makes at most one
/// charge per key, which is what makes every retry and resume safe.
#[derive(Clone, Copy, Debug)]
pub struct ChargeRequest<'a> {
    pub idempotency_key: &'a str,
    pub amount: i64,
    pub currency: &'a str,
    pub source: &'a str,
}

/// What one charge attempt came to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ChargeOutcome {
    /// 200 with this charge, `succeeded`: charged.
    Charged { charge_id: String },
    /// 402 with this charge, `declined`: the card was declined.
    Declined {
        charge_id: Option<String>,
        code: String,
    },
    /// Any other answer (5xx, 3xx, a charge that is not ours or not final, a body we cannot
    /// read): the charge may or may not exist. `detail` says what was wrong, for the client.
    Ambiguous { status: u16, detail: String },
    /// No answer within the slice after the request may have gone out.
    Timeout,
    /// Nothing was sent: the connection could not be made.
    Unreachable { detail: String },
    /// Nothing was sent: the breaker is open (or its half-open trials are taken).
    Rejected { retry_after: Duration },
}

impl ChargeOutcome {
    /// The `provider_calls_total{outcome}` label.
    pub fn name(&self) -> &'static str {
        match self {
            ChargeOutcome::Charged { .. } => "charged",
            ChargeOutcome::Declined { .. } => "declined",
            ChargeOutcome::Ambiguous { .. } => "ambiguous",
            ChargeOutcome::Timeout => "timeout",
            ChargeOutcome::Unreachable { .. } => "unreachable",
            ChargeOutcome::Rejected { .. } => "rejected",
        }
    }
}

/// A charge as the provider writes it (`POST /v1/charges` answers and lookups). Every field is
/// optional here so that a partial answer is read, judged, and found wanting — not an error.
#[derive(Deserialize)]
struct ChargeBody {
    id: Option<String>,
    status: Option<String>,
    idempotency_key: Option<String>,
    amount: Option<i64>,
    currency: Option<String>,
    error: Option<ErrorBody>,
}

#[derive(Deserialize)]
struct ErrorBody {
    code: Option<String>,
}

#[derive(Deserialize)]
struct ChargeList {
    data: Vec<ChargeBody>,
}

/// What a lookup (`GET /v1/charges?idempotency_key=K`) says about the charge under `K`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LookupAnswer {
    /// The provider holds this charge and says how it ended: `Charged` or `Declined`.
    Final(ChargeOutcome),
    /// A well-formed answer listing no charge under the key.
    NoCharge,
    /// Anything else — a charge still `pending`, a status we do not know, another key's
    /// charge, an error or an unreadable answer: nothing can be settled from it.
    Unknown(String),
}

/// The breaker around every charge call, and what is counted of each: both servers' clients
/// charge through one — the sync client blocking on the call, the async twin awaiting it.
pub struct GuardedCalls {
    breaker: Breaker,
    clock: Arc<dyn Clock>,
    metrics: Arc<Metrics>,
}

/// A call the breaker let through: counted in flight until it is finished or dropped.
pub struct Call<'g> {
    calls: &'g GuardedCalls,
    permit: Permit,
    started: Instant,
    _in_flight: InFlight<'g>,
}

/// One charge call in `paytrace_provider_calls_in_flight` for as long as it lives: from just
/// before the request is sent until its answer is read or the call is given up on — also when
/// the caller unwinds, or (in the async twin) when the call's future is dropped.
struct InFlight<'m>(&'m Metrics);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.provider_in_flight.dec();
    }
}

impl GuardedCalls {
    pub fn new(config: BreakerConfig, clock: Arc<dyn Clock>, metrics: Arc<Metrics>) -> Self {
        GuardedCalls {
            breaker: Breaker::new(config, clock.now()),
            clock,
            metrics,
        }
    }

    pub fn breaker_state(&self) -> State {
        self.breaker.state(self.clock.now())
    }

    /// The breaker's state and the calls it is judging, read without changing anything.
    pub fn breaker_window(&self) -> Window {
        self.breaker.window(self.clock.now())
    }

    /// Asks the breaker for a call: the call, or — while it is open — the `Rejected` outcome,
    /// already counted.
    pub fn admit(&self) -> Result<Call<'_>, ChargeOutcome> {
        let started = self.clock.now();
        let (permit, transition) = self.breaker.try_acquire(started);
        self.record_transition(transition);
        match permit {
            Ok(permit) => {
                self.metrics.provider_in_flight.inc();
                Ok(Call {
                    calls: self,
                    permit,
                    started,
                    _in_flight: InFlight(&self.metrics),
                })
            }
            Err(rejected) => {
                let outcome = ChargeOutcome::Rejected {
                    retry_after: rejected.retry_after,
                };
                self.count(&outcome);
                Err(outcome)
            }
        }
    }

    /// Counts one provider call by its outcome (`paytrace_provider_calls_total`).
    fn count(&self, outcome: &ChargeOutcome) {
        self.metrics
            .provider_calls
            .with_label_values(&[outcome.name()])
            .inc();
    }

    /// Logs and counts a breaker transition, if there was one.
    fn record_transition(&self, t: Option<Transition>) {
        if let Some(t) = t {
            log::warn!("breaker {} → {}: {}", t.from.name(), t.to.name(), t.reason);
            self.metrics
                .breaker_transitions
                .with_label_values(&[t.to.name()])
                .inc();
        }
    }
}

impl Call<'_> {
    /// Records how the call ended (and how long it took) with the breaker, counts it, and
    /// returns it. Declines are successes.
    pub fn finish(self, outcome: ChargeOutcome) -> ChargeOutcome {
        let counted = match outcome {
            ChargeOutcome::Charged { .. } | ChargeOutcome::Declined { .. } => Outcome::Success,
            _ => Outcome::Failure,
        };
        let calls = self.calls;
        let now = calls.clock.now();
        let transition = calls
            .breaker
            .record(self.permit, counted, now - self.started, now);
        calls.record_transition(transition);
        calls.count(&outcome);
        outcome
    }
}

/// While the provider closes its connections, one call in this many still offers to keep its
/// connection, to learn whether the provider still closes them.
const CLOSE_PROBE: u64 = 64;

/// Whether `Connection` header values (a comma-separated list each) name `close`.
fn says_connection_close<'a>(values: impl Iterator<Item = &'a str>) -> bool {
    values
        .flat_map(|v| v.split(','))
        .any(|token| token.trim().eq_ignore_ascii_case("close"))
}

/// The shared client: one agent (and its connection pool) behind one breaker.
pub struct ProviderClient {
    agent: ureq::Agent,
    base: String,
    connect_timeout: Duration,
    calls: GuardedCalls,
    /// Whether the provider closes its connections after an answer (the simulated one always
    /// does): while it does, calls say `Connection: close` up front. A provider that closes
    /// anyway loses nothing, and one with a thread per connection (tiny_http) frees that thread
    /// as soon as the request is read instead of holding it through the whole call — with
    /// hundreds of calls in flight, new connections queued behind held threads and calls
    /// timed out. Learned from answers to calls that did not say `close` — every
    /// [`CLOSE_PROBE`]th call does not — so a keep-alive provider that closed one connection
    /// (nginx does on a connection's 1,000th request) gets its pool back.
    provider_closes: AtomicBool,
    calls_sent: AtomicU64,
}

impl ProviderClient {
    /// `pool` idle connections are kept (size it to the workers, so a busy server does not
    /// re-open connections per call).
    pub fn new(
        base_url: &str,
        pool: usize,
        connect_timeout: Duration,
        breaker: BreakerConfig,
        clock: Arc<dyn Clock>,
        metrics: Arc<Metrics>,
    ) -> ProviderClient {
        let config = ureq::Agent::config_builder()
            .http_status_as_error(false)
            // A redirect is an answer like any other (and not a final one): following it would
            // send the Idempotency-Key and the card to whatever host it names.
            .max_redirects(0)
            .max_idle_connections(pool)
            .max_idle_connections_per_host(pool)
            .timeout_connect(Some(connect_timeout))
            // ureq's default buffers are 128 KiB each, allocated and zeroed for every new
            // connection: with hundreds of calls in flight that was most of the server's
            // memory. Its read buffer must hold a whole answer head (ureq never grows it); one
            // a little larger than the head accepted makes an over-long head the error that
            // says so, instead of a "disconnected". Requests are small and written in pieces.
            .input_buffer_size(ANSWER_HEAD_MAX + 1024)
            .max_response_header_size(ANSWER_HEAD_MAX)
            .output_buffer_size(REQUEST_BUFFER)
            .user_agent("paytrace")
            .build();
        let agent = ureq::Agent::with_parts(
            config,
            ureq::unversioned::transport::DefaultConnector::default(),
            LiteralResolver,
        );
        ProviderClient {
            agent,
            base: base_url.trim_end_matches('/').to_string(),
            connect_timeout,
            calls: GuardedCalls::new(breaker, clock, metrics),
            provider_closes: AtomicBool::new(false),
            calls_sent: AtomicU64::new(0),
        }
    }

    pub fn breaker_state(&self) -> State {
        self.calls.breaker_state()
    }

    /// The breaker's state and the calls it is judging (the live page's unit 06).
    pub fn breaker_window(&self) -> Window {
        self.calls.breaker_window()
    }

    /// `POST /v1/charges` through the breaker: rejected at once while it is open; otherwise the
    /// call is made and its outcome (and duration) recorded.
    pub fn charge(&self, request: &ChargeRequest, timeout: Duration) -> ChargeOutcome {
        match self.calls.admit() {
            Ok(call) => call.finish(self.send_charge(request, timeout)),
            Err(rejected) => rejected,
        }
    }

    /// `POST /v1/charges` with `idempotency_key` (the payment id), waiting at most `timeout`.
    fn send_charge(&self, request: &ChargeRequest, timeout: Duration) -> ChargeOutcome {
        let ChargeRequest {
            idempotency_key,
            amount,
            currency,
            source,
        } = *request;
        let mut call = self
            .agent
            .post(format!("{}{CHARGES_PATH}", self.base))
            .config()
            .timeout_global(Some(timeout))
            .timeout_connect(Some(self.connect_timeout.min(timeout)))
            .build()
            .header("Idempotency-Key", idempotency_key);
        let nth = self.calls_sent.fetch_add(1, Ordering::Relaxed);
        let says_close =
            self.provider_closes.load(Ordering::Relaxed) && !nth.is_multiple_of(CLOSE_PROBE);
        if says_close {
            call = call.header("Connection", "close");
        }
        let sent =
            call.send_json(json!({"amount": amount, "currency": currency, "source": source}));
        let mut response = match sent {
            Ok(r) => r,
            Err(e) => return classify_error(e),
        };
        if !says_close {
            let values = response.headers().get_all("Connection");
            let closes = says_connection_close(values.iter().filter_map(|v| v.to_str().ok()));
            self.provider_closes.store(closes, Ordering::Relaxed);
        }
        let status = response.status().as_u16();
        // Read to the end even when ignored: ureq pools a connection only after its body is read.
        let mut raw = Vec::new();
        let read = response
            .body_mut()
            .as_reader()
            .take(64 * 1024)
            .read_to_end(&mut raw);
        if let Err(e) = read {
            return if e.kind() == std::io::ErrorKind::TimedOut {
                ChargeOutcome::Timeout
            } else {
                ChargeOutcome::Ambiguous {
                    status,
                    detail: format!("reading the payment provider's answer failed ({e})"),
                }
            };
        }
        classify_answer(status, &raw, request)
    }

    /// `GET /v1/charges?idempotency_key=K`: what the provider holds under `key`.
    pub fn lookup(&self, key: &str, timeout: Duration) -> LookupAnswer {
        let sent = self
            .agent
            .get(format!("{}{CHARGES_PATH}", self.base))
            .query("idempotency_key", key)
            .config()
            .timeout_global(Some(timeout))
            .build()
            .call();
        let mut response = match sent {
            Ok(r) => r,
            Err(e) => return LookupAnswer::Unknown(e.to_string()),
        };
        let status = response.status().as_u16();
        let mut raw = Vec::new();
        if let Err(e) = response
            .body_mut()
            .as_reader()
            .take(1024 * 1024)
            .read_to_end(&mut raw)
        {
            return LookupAnswer::Unknown(format!("reading the answer: {e}"));
        }
        classify_lookup(status, &raw, key)
    }
}

/// Judges a `POST /v1/charges` answer to `request`: final only when it says, in full, that
/// this charge succeeded (200) or was declined (402).
pub fn classify_answer(status: u16, raw: &[u8], request: &ChargeRequest) -> ChargeOutcome {
    let ambiguous = |detail: String| ChargeOutcome::Ambiguous { status, detail };
    let expected = match status {
        200 => "succeeded",
        402 => "declined",
        300..=399 => {
            return ambiguous(format!(
                "the payment provider answered {status} (a redirect, not followed)"
            ));
        }
        _ => return ambiguous(format!("the payment provider answered {status}")),
    };
    let Ok(body) = serde_json::from_slice::<ChargeBody>(raw) else {
        return ambiguous(format!(
            "the payment provider answered {status} with a body that is not a charge"
        ));
    };
    if let Err(what) = is_this_charge(&body, request.idempotency_key, expected) {
        return ambiguous(format!("the payment provider answered {status} {what}"));
    }
    if body.amount != Some(request.amount) || body.currency.as_deref() != Some(request.currency) {
        return ambiguous(format!(
            "the payment provider answered {status} with a different amount or currency"
        ));
    }
    let charge_id = body.id.unwrap_or_default();
    if status == 200 {
        ChargeOutcome::Charged { charge_id }
    } else {
        ChargeOutcome::Declined {
            charge_id: Some(charge_id),
            code: body
                .error
                .and_then(|e| e.code)
                .unwrap_or_else(|| "card_declined".into()),
        }
    }
}

/// Whether `body` is a charge with an id, made under `key`, whose status is `expected`;
/// otherwise what is wrong with it, as the end of a sentence.
fn is_this_charge(body: &ChargeBody, key: &str, expected: &str) -> Result<(), String> {
    if body.idempotency_key.as_deref() != Some(key) {
        return Err("for another idempotency key, or without one".into());
    }
    if body.id.as_deref().is_none_or(str::is_empty) {
        return Err("without a charge id".into());
    }
    match body.status.as_deref() {
        Some(s) if s == expected => Ok(()),
        Some(s) => Err(format!("with status `{s}`")),
        None => Err("without a status".into()),
    }
}

/// Judges a lookup answer for `key`: a final outcome only for exactly one charge under `key`
/// whose status is `succeeded` or `declined`; `NoCharge` only for a well-formed empty list.
pub fn classify_lookup(status: u16, raw: &[u8], key: &str) -> LookupAnswer {
    if status != 200 {
        return LookupAnswer::Unknown(format!("the lookup answered {status}"));
    }
    let list = match serde_json::from_slice::<ChargeList>(raw) {
        Ok(l) => l,
        Err(e) => return LookupAnswer::Unknown(format!("the lookup's answer is unreadable: {e}")),
    };
    let charge = match list.data.as_slice() {
        [] => return LookupAnswer::NoCharge,
        [one] => one,
        more => {
            return LookupAnswer::Unknown(format!("the lookup listed {} charges", more.len()));
        }
    };
    let outcome = match charge.status.as_deref() {
        Some("succeeded") => "succeeded",
        Some("declined") => "declined",
        other => {
            return LookupAnswer::Unknown(format!(
                "the charge is `{}`, not final",
                other.unwrap_or("without a status")
            ));
        }
    };
    if let Err(what) = is_this_charge(charge, key, outcome) {
        return LookupAnswer::Unknown(format!("the lookup listed a charge {what}"));
    }
    let charge_id = charge.id.clone().unwrap_or_default();
    LookupAnswer::Final(if outcome == "succeeded" {
        ChargeOutcome::Charged { charge_id }
    } else {
        ChargeOutcome::Declined {
            charge_id: Some(charge_id),
            code: charge
                .error
                .as_ref()
                .and_then(|e| e.code.clone())
                .unwrap_or_else(|| "card_declined".into()),
        }
    })
}

fn classify_error(e: ureq::Error) -> ChargeOutcome {
    use ureq::Timeout;
    match e {
        // Before a byte of the request could have left: nothing was charged.
        ureq::Error::Timeout(Timeout::Connect | Timeout::Resolve) => ChargeOutcome::Unreachable {
            detail: "connecting to the provider timed out".into(),
        },
        ureq::Error::Timeout(_) => ChargeOutcome::Timeout,
        ureq::Error::HostNotFound | ureq::Error::ConnectionFailed => ChargeOutcome::Unreachable {
            detail: e.to_string(),
        },
        ureq::Error::Io(io)
            if matches!(
                io.kind(),
                std::io::ErrorKind::ConnectionRefused
                    | std::io::ErrorKind::AddrNotAvailable
                    | std::io::ErrorKind::NetworkUnreachable
                    | std::io::ErrorKind::HostUnreachable
            ) =>
        {
            ChargeOutcome::Unreachable {
                detail: io.to_string(),
            }
        }
        ureq::Error::Io(io) if io.kind() == std::io::ErrorKind::TimedOut => ChargeOutcome::Timeout,
        // A reset or a protocol error after sending: the provider may have acted on it.
        other => ChargeOutcome::Ambiguous {
            status: 0,
            detail: format!(
                "the connection to the payment provider failed after sending ({other})"
            ),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_close_is_found_in_any_value_and_any_case() {
        assert!(says_connection_close(["close"].into_iter()));
        assert!(says_connection_close(["Close"].into_iter()));
        assert!(says_connection_close(["TE, close"].into_iter()));
        assert!(says_connection_close(["keep-alive", " close "].into_iter()));
        assert!(!says_connection_close(["keep-alive"].into_iter()));
        assert!(!says_connection_close(["closed"].into_iter()));
        assert!(!says_connection_close(std::iter::empty()));
    }

    const REQ: ChargeRequest = ChargeRequest {
        idempotency_key: "pay_1",
        amount: 500,
        currency: "usd",
        source: "tok_visa",
    };

    fn charge(status: &str, key: &str) -> String {
        format!(
            r#"{{"id":"ch_1","object":"charge","status":"{status}","amount":500,"currency":"usd","source":"tok_visa","idempotency_key":"{key}"}}"#
        )
    }

    fn is_ambiguous(o: &ChargeOutcome) -> bool {
        matches!(o, ChargeOutcome::Ambiguous { .. })
    }

    #[test]
    fn only_a_full_answer_for_this_charge_is_final() {
        assert_eq!(
            classify_answer(200, charge("succeeded", "pay_1").as_bytes(), &REQ),
            ChargeOutcome::Charged {
                charge_id: "ch_1".into()
            }
        );
        let declined = r#"{"id":"ch_2","status":"declined","amount":500,"currency":"usd","idempotency_key":"pay_1","error":{"code":"card_declined"}}"#;
        assert_eq!(
            classify_answer(402, declined.as_bytes(), &REQ),
            ChargeOutcome::Declined {
                charge_id: Some("ch_2".into()),
                code: "card_declined".into()
            }
        );
    }

    #[test]
    fn answers_that_do_not_say_this_charge_is_final_are_ambiguous() {
        let cases: &[(u16, String)] = &[
            (200, charge("failed", "pay_1")),
            (200, charge("pending", "pay_1")),
            (202, charge("pending", "pay_1")),
            (201, charge("succeeded", "pay_1")),
            (200, charge("succeeded", "pay_other")),
            (200, r#"{"id":"ch_1","status":"succeeded"}"#.into()),
            (200, charge("succeeded", "pay_1").replace("500", "777")),
            (
                200,
                charge("succeeded", "pay_1").replace("\"ch_1\"", "\"\""),
            ),
            (200, "not json".into()),
            (200, "[]".into()),
            (200, String::new()),
            (302, charge("succeeded", "pay_1")),
            (402, r#"{"error":{"code":"card_declined"}}"#.into()),
            (402, charge("succeeded", "pay_1")),
            (500, charge("succeeded", "pay_1")),
            (400, r#"{"error":{"code":"invalid_request"}}"#.into()),
        ];
        for (status, body) in cases {
            let o = classify_answer(*status, body.as_bytes(), &REQ);
            assert!(is_ambiguous(&o), "{status} {body} → {o:?}");
        }
        match classify_answer(302, b"", &REQ) {
            ChargeOutcome::Ambiguous { detail, .. } => assert!(detail.contains("redirect")),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_lookup_settles_only_a_final_charge_under_this_key() {
        let list = |c: &str| format!(r#"{{"data":[{c}]}}"#);
        assert_eq!(
            classify_lookup(200, list(&charge("succeeded", "pay_1")).as_bytes(), "pay_1"),
            LookupAnswer::Final(ChargeOutcome::Charged {
                charge_id: "ch_1".into()
            })
        );
        assert!(matches!(
            classify_lookup(200, list(&charge("declined", "pay_1")).as_bytes(), "pay_1"),
            LookupAnswer::Final(ChargeOutcome::Declined { .. })
        ));
        assert_eq!(
            classify_lookup(200, br#"{"data":[]}"#, "pay_1"),
            LookupAnswer::NoCharge
        );
        for (status, body) in [
            (200, list(&charge("pending", "pay_1"))),
            (200, list(&charge("failed", "pay_1"))),
            (200, list(&charge("succeeded", "pay_other"))),
            (
                200,
                list(&format!(
                    "{},{}",
                    charge("succeeded", "pay_1"),
                    charge("succeeded", "pay_1")
                )),
            ),
            (200, "{}".to_string()),
            (200, "nope".to_string()),
            (500, r#"{"data":[]}"#.to_string()),
            (302, r#"{"data":[]}"#.to_string()),
        ] {
            let a = classify_lookup(status, body.as_bytes(), "pay_1");
            assert!(
                matches!(a, LookupAnswer::Unknown(_)),
                "{status} {body} → {a:?}"
            );
        }
    }
}
