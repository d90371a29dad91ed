//! The provider client: one shared ureq agent, every call bounded by the slice of the request's
//! budget it was given.
//!
//! Classifying the outcome is the part that matters for money: a refused connection means
//! nothing was sent (the payment can be `failed`), while a timeout or a 5xx after the request
//! went out means the charge may exist (`pending`, resolved later by asking the provider).

use std::io::Read;
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use serde_json::json;

use crate::breaker::{Breaker, BreakerConfig, Outcome, State, Transition};
use crate::clock::Clock;
use crate::metrics::Metrics;

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
    /// 200: charged.
    Charged { charge_id: String },
    /// 402: the card was declined.
    Declined {
        charge_id: Option<String>,
        code: String,
    },
    /// 5xx, or an answer we cannot read: the charge may or may not exist.
    Ambiguous { status: u16, detail: String },
    /// No answer within the slice after the request may have gone out.
    Timeout,
    /// Nothing was sent: the connection could not be made.
    Unreachable { detail: String },
    /// Nothing was sent: the breaker is open (or its half-open trials are taken).
    Rejected { retry_after: Duration },
}

#[derive(Deserialize)]
struct ChargeBody {
    id: Option<String>,
    error: Option<ErrorBody>,
}

#[derive(Deserialize)]
struct ErrorBody {
    code: Option<String>,
}

/// A charge as the provider reports it on lookup.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
pub struct Charge {
    pub id: String,
    pub status: String,
}

#[derive(Deserialize)]
struct ChargeList {
    data: Vec<Charge>,
}

/// The shared client: one agent (and its connection pool) behind one breaker.
pub struct ProviderClient {
    agent: ureq::Agent,
    base: String,
    connect_timeout: Duration,
    breaker: Breaker,
    clock: Arc<dyn Clock>,
    metrics: Arc<Metrics>,
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
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .max_idle_connections(pool)
            .max_idle_connections_per_host(pool)
            .timeout_connect(Some(connect_timeout))
            .user_agent("paytrace")
            .build()
            .new_agent();
        ProviderClient {
            agent,
            base: base_url.trim_end_matches('/').to_string(),
            connect_timeout,
            breaker: Breaker::new(breaker, clock.now()),
            clock,
            metrics,
        }
    }

    pub fn breaker_state(&self) -> State {
        self.breaker.state(self.clock.now())
    }

    /// `POST /v1/charges` through the breaker: rejected at once while it is open; otherwise the
    /// call is made and its outcome (and duration) recorded. Declines are successes.
    pub fn charge(&self, request: &ChargeRequest, timeout: Duration) -> ChargeOutcome {
        let started = self.clock.now();
        let (permit, transition) = self.breaker.try_acquire(started);
        self.log_transition(transition);
        let permit = match permit {
            Ok(p) => p,
            Err(rejected) => {
                self.count(&ChargeOutcome::Rejected {
                    retry_after: rejected.retry_after,
                });
                return ChargeOutcome::Rejected {
                    retry_after: rejected.retry_after,
                };
            }
        };
        let outcome = self.send_charge(request, timeout);
        let counted = match outcome {
            ChargeOutcome::Charged { .. } | ChargeOutcome::Declined { .. } => Outcome::Success,
            _ => Outcome::Failure,
        };
        let now = self.clock.now();
        self.log_transition(self.breaker.record(permit, counted, now - started, now));
        self.count(&outcome);
        outcome
    }

    fn count(&self, outcome: &ChargeOutcome) {
        let label = match outcome {
            ChargeOutcome::Charged { .. } => "charged",
            ChargeOutcome::Declined { .. } => "declined",
            ChargeOutcome::Ambiguous { .. } => "ambiguous",
            ChargeOutcome::Timeout => "timeout",
            ChargeOutcome::Unreachable { .. } => "unreachable",
            ChargeOutcome::Rejected { .. } => "rejected",
        };
        self.metrics
            .provider_calls
            .with_label_values(&[label])
            .inc();
    }

    fn log_transition(&self, t: Option<Transition>) {
        if let Some(t) = t {
            log::warn!("breaker {} → {}: {}", t.from.name(), t.to.name(), t.reason);
            self.metrics
                .breaker_transitions
                .with_label_values(&[t.to.name()])
                .inc();
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
        let sent = self
            .agent
            .post(format!("{}/v1/charges", self.base))
            .config()
            .timeout_global(Some(timeout))
            .timeout_connect(Some(self.connect_timeout.min(timeout)))
            .build()
            .header("Idempotency-Key", idempotency_key)
            .send_json(json!({"amount": amount, "currency": currency, "source": source}));
        let mut response = match sent {
            Ok(r) => r,
            Err(e) => return classify_error(e),
        };
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
                    detail: format!("reading the answer: {e}"),
                }
            };
        }
        let parsed: Option<ChargeBody> = serde_json::from_slice(&raw).ok();
        match (status, parsed) {
            (200..=299, Some(ChargeBody { id: Some(id), .. })) => {
                ChargeOutcome::Charged { charge_id: id }
            }
            (402, body) => ChargeOutcome::Declined {
                charge_id: body.as_ref().and_then(|b| b.id.clone()),
                code: body
                    .and_then(|b| b.error)
                    .and_then(|e| e.code)
                    .unwrap_or_else(|| "card_declined".into()),
            },
            (status, _) => ChargeOutcome::Ambiguous {
                status,
                detail: format!("provider answered {status}"),
            },
        }
    }

    /// `GET /v1/charges?idempotency_key=K`: the charges the provider holds under `key`.
    pub fn lookup(&self, key: &str, timeout: Duration) -> Result<Vec<Charge>, String> {
        let mut response = self
            .agent
            .get(format!("{}/v1/charges", self.base))
            .query("idempotency_key", key)
            .config()
            .timeout_global(Some(timeout))
            .build()
            .call()
            .map_err(|e| e.to_string())?;
        if response.status().as_u16() != 200 {
            return Err(format!("provider answered {}", response.status()));
        }
        response
            .body_mut()
            .read_json::<ChargeList>()
            .map(|l| l.data)
            .map_err(|e| e.to_string())
    }
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
            detail: other.to_string(),
        },
    }
}
