//! # paytrace
//!
//! A synchronous, thread-per-request payments server. One request, `POST /payments`, travels
//! through seven mechanisms on one code path, and one deadline budget is divided among them:
//!
//! | unit | mechanism | where |
//! |---|---|---|
//! | 01 | accept and parse: a total read deadline, size and framing limits, backpressure | [`edge::front`], [`edge::front::request`] (`read_request`), [`edge::http::read_body`] |
//! | 02 | middleware and dependency injection | [`edge::middleware::protect`], [`app::App`] (built by [`startup`]) |
//! | 03 | a bounded worker pool instead of an event loop | [`workers::WorkerPool::try_submit`], [`workers::WorkerPool::shutdown`]; fed by [`edge::dispatch`] |
//! | 04 | the connection pool with an acquisition timeout | [`store::db::Db::acquire`], [`store::db::Db::write`], [`store::writer`] (one writer thread, group commit); on PostgreSQL [`store::pg`] |
//! | 05 | the idempotency table, and the reconciler | [`store::idempotency::claim`], [`store::idempotency::persist`], [`flow::reconciler::reconcile`] |
//! | 06 | the circuit breaker around the provider call | [`provider::breaker::Breaker`], [`provider::client::ProviderClient::charge`] |
//! | 07 | graceful shutdown in reverse dependency order | [`lifecycle::shutdown`] (the order and why), [`lifecycle::shutdown::teardown`] |
//!
//! The budget itself is [`deadline::Deadline::slice`]; the steps of one payment, in order, are
//! [`flow::payment::create`], and [`flow::outcome::settle`] is the one mapping from a provider
//! outcome to a status and an answer. Around them: [`trace`] (one log line per hop),
//! [`metrics`] (`GET /metrics`), [`provider::sim`] (`paytrace provider`), [`load`]
//! (`paytrace load`) and [`bench`](mod@bench) (`paytrace bench`).
//!
//! The folders:
//!
//! | folder | what it holds | knows about |
//! |---|---|---|
//! | `edge/` | sockets, tiny_http, routes, middleware, observation | HTTP |
//! | `flow/` | the payment's steps, the outcome mapping, the reconciler | plain values; no HTTP server |
//! | `store/` | the SQLite pool and schema, the idempotency table; the same on PostgreSQL, and the [`store::engine::Store`] that picks one | SQLite, PostgreSQL; no HTTP |
//! | `provider/` | the breaker, the client, the simulated provider | the provider's wire format |
//! | `lifecycle/` | what is in flight, graceful shutdown | every unit, read in reverse |
//!
//! The async twin, `paytrace-async` (`src/bin/paytrace-async/`, built only with the
//! `async-twin` feature), serves the same API on tokio + axum from these same steps: the
//! chain ([`edge::middleware::chain`]), [`flow::payment::begin`] and [`flow::payment::finish`]
//! on tokio's blocking pool, the provider call awaited, [`edge::observe::describe`] for the
//! answer. The default build compiles no async runtime.
//!
//! Suggested reading order for one request: [`edge::front`] → [`edge::dispatch`] →
//! [`workers`] → [`edge::routes`] → [`edge::middleware::protect`] → [`flow::payment::create`] →
//! [`store::writer`] → [`store::idempotency::claim`] →
//! [`provider::client::ProviderClient::charge`] → [`store::idempotency::persist`] →
//! [`edge::observe`] → [`lifecycle::shutdown`].

pub mod app;
pub mod bench;
pub mod clock;
pub mod config;
pub mod deadline;
pub mod edge;
pub mod error;
pub mod flow;
pub mod ids;
pub mod lifecycle;
pub mod listener;
pub mod load;
pub mod metrics;
pub mod provider;
pub mod reply;
pub mod scenario;
pub mod server_timing;
pub mod startup;
pub mod store;
pub mod trace;
pub mod workers;
