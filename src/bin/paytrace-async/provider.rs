//! The provider call, awaited: one shared hyper client behind the twin's own breaker.
//!
//! What stays the library's: the breaker and what is counted of each call ([`GuardedCalls`]),
//! the judgement of an answer ([`classify_answer`]) and the outcome type. What differs is the
//! wait: the call is a future, bounded by `tokio::time::timeout` with the request's provider
//! slice, and while it is in flight no thread is held — a slow provider costs the twin a few
//! hundred bytes per call instead of a worker.
//!
//! The sync server's breaker lives inside its ureq client; this one is the twin's, so the
//! reconciler (which asks the provider through the library's client) does not see it.

use std::time::Duration;

use axum::body::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use paytrace::app::App;
use paytrace::provider::breaker::{State, Window};
use paytrace::provider::client::{ChargeOutcome, ChargeRequest, GuardedCalls, classify_answer};
use serde_json::json;

/// The most of an answer that is read: a charge is a few hundred bytes.
const ANSWER_LIMIT: usize = 64 * 1024;

pub struct AsyncProvider {
    http: Client<HttpConnector, Full<Bytes>>,
    base: String,
    calls: GuardedCalls,
}

impl AsyncProvider {
    /// One connection per call (none kept idle, see below); connecting may take half the
    /// provider timeout; redirects are never followed (the Idempotency-Key and the card go to
    /// the configured provider only).
    pub fn new(base_url: &str, app: &App) -> Result<AsyncProvider, String> {
        let config = &app.config;
        if !base_url.starts_with("http://") {
            return Err(format!(
                "the async twin speaks plain HTTP to the provider; `{base_url}` is not an http:// URL"
            ));
        }
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(
            (config.provider_timeout / 2).max(Duration::from_millis(1)),
        ));
        connector.set_nodelay(true);
        // No idle connections kept, like the sync server's calls to the simulated provider
        // (which answers `Connection: close`), and each request says so: a burst of new
        // keep-alive connections to its tiny_http left some waiting behind the others (seen:
        // 3 s provider timeouts against a 1 s provider in the shutdown tests). tiny_http holds
        // a thread per connection until it knows no further request follows; told `close`, it
        // lets the thread go as soon as the request is read.
        let http = Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(0)
            .build(connector);
        Ok(AsyncProvider {
            http,
            base: base_url.trim_end_matches('/').to_string(),
            calls: GuardedCalls::new(config.breaker(), app.clock.clone(), app.metrics.clone()),
        })
    }

    pub fn breaker_state(&self) -> State {
        self.calls.breaker_state()
    }

    /// The breaker's state and the calls it is judging (the live page's unit 06).
    pub fn breaker_window(&self) -> Window {
        self.calls.breaker_window()
    }

    /// `POST /v1/charges` through the breaker, as `ProviderClient::charge` does it: rejected at
    /// once while open; otherwise awaited within `timeout`, and its outcome and duration
    /// recorded. Declines are successes.
    pub async fn charge(&self, request: &ChargeRequest<'_>, timeout: Duration) -> ChargeOutcome {
        let call = match self.calls.admit() {
            Ok(call) => call,
            Err(rejected) => return rejected,
        };
        let outcome = match tokio::time::timeout(timeout, self.send_charge(request)).await {
            Ok(outcome) => outcome,
            Err(_) => ChargeOutcome::Timeout,
        };
        call.finish(outcome)
    }

    async fn send_charge(&self, request: &ChargeRequest<'_>) -> ChargeOutcome {
        let body = json!({
            "amount": request.amount,
            "currency": request.currency,
            "source": request.source,
        });
        let built =
            axum::http::Request::post(format!("{}{}", self.base, paytrace::provider::CHARGES_PATH))
                .header("Idempotency-Key", request.idempotency_key)
                .header("Content-Type", "application/json")
                .header("User-Agent", "paytrace")
                .header("Connection", "close")
                .body(Full::new(Bytes::from(body.to_string())));
        let built = match built {
            Ok(b) => b,
            Err(e) => {
                return ChargeOutcome::Unreachable {
                    detail: format!("the charge request could not be built: {e}"),
                };
            }
        };
        let response = match self.http.request(built).await {
            Ok(r) => r,
            Err(e) => return classify_error(&e),
        };
        let status = response.status().as_u16();
        // Read to the end (up to the limit) so the connection goes back to the pool.
        match Limited::new(response.into_body(), ANSWER_LIMIT)
            .collect()
            .await
        {
            Ok(collected) => classify_answer(status, &collected.to_bytes(), request),
            Err(e) => ChargeOutcome::Ambiguous {
                status,
                detail: format!("reading the payment provider's answer failed ({e})"),
            },
        }
    }
}

/// A failed send: nothing was sent when the connection could not be made; otherwise the
/// provider may have acted on it.
fn classify_error(e: &hyper_util::client::legacy::Error) -> ChargeOutcome {
    if e.is_connect() {
        ChargeOutcome::Unreachable {
            detail: root_cause(e),
        }
    } else {
        ChargeOutcome::Ambiguous {
            status: 0,
            detail: format!(
                "the connection to the payment provider failed after sending ({})",
                root_cause(e)
            ),
        }
    }
}

/// The innermost cause of an error (reqwest's own message names only the URL).
fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cause = e;
    while let Some(next) = cause.source() {
        cause = next;
    }
    cause.to_string()
}
