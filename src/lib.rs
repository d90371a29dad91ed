//! # paytrace
//!
//! A synchronous, thread-per-request payments server. One request, `POST /payments`, travels
//! through seven mechanisms on one code path, and one deadline budget is divided among them:
//!
//! | unit | mechanism | where |
//! |---|---|---|
//! | 01 | accept and parse: a total read deadline, size and framing limits, backpressure | [`front`] (`read_request`), [`server::run`], [`http::read_body`] |
//! | 02 | middleware and dependency injection | [`middleware`], [`app::App`] |
//! | 03 | a bounded worker pool instead of an event loop | [`workers::WorkerPool::try_submit`], [`workers::WorkerPool::shutdown`]; fed by `server::dispatch` |
//! | 04 | the connection pool with an acquisition timeout | [`db::Db::acquire`], [`db::Db::writer`] |
//! | 05 | the idempotency table, and the reconciler | [`idempotency::claim`], [`idempotency::persist`], [`reconciler::reconcile`] |
//! | 06 | the circuit breaker around the provider call | [`breaker::Breaker`], [`provider::client::ProviderClient::charge`] |
//! | 07 | graceful shutdown in reverse dependency order | [`shutdown`] (the order and why), [`shutdown::teardown`] |
//!
//! The budget itself is [`deadline::Deadline::slice`]; the handler that walks the steps in
//! order is [`payments::create`]. Around them: [`metrics`] (`GET /metrics`), [`provider::sim`]
//! (`paytrace provider`), [`load`] (`paytrace load`) and [`bench`](mod@bench) (`paytrace bench`).
//!
//! Suggested reading order for one request: [`front`] → [`server::run`] → [`middleware::protect`] →
//! [`payments::create`] → [`db::Db::writer`] → [`idempotency::claim`] →
//! [`provider::client::ProviderClient::charge`] → [`idempotency::persist`] → [`shutdown`].

pub mod app;
pub mod bench;
pub mod breaker;
pub mod clock;
pub mod config;
pub mod db;
pub mod deadline;
pub mod error;
pub mod front;
pub mod http;
pub mod idempotency;
pub mod ids;
pub mod load;
pub mod metrics;
pub mod middleware;
pub mod payments;
pub mod provider;
pub mod ratelimit;
pub mod reconciler;
pub mod server;
pub mod shutdown;
pub mod workers;
