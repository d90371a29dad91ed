//! Dependency injection: the long-lived collaborators, built once at start-up (by
//! `startup.rs`) and handed to every handler as one [`App`]. No globals: a test or another
//! server composes its own.
//!
//! Everything below the start-up code may import `App`; `App` imports only the parts it holds.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use crate::clock::Clock;
use crate::config::ServeConfig;
use crate::deadline::Timeouts;
use crate::edge::auth::ApiKeys;
use crate::edge::live::board::Board;
use crate::edge::ratelimit::RateLimiter;
use crate::lifecycle::inflight::InFlight;
use crate::metrics::Metrics;
use crate::provider::client::ProviderClient;
use crate::store::engine::Store;

/// Everything a handler may use, built once.
pub struct App {
    pub config: ServeConfig,
    /// The database: the r2d2 SQLite pool and its writer, or the r2d2 PostgreSQL pool.
    pub db: Store,
    /// The one shared provider client (ureq agent, pooled connections).
    pub provider: ProviderClient,
    pub keys: ApiKeys,
    /// Per-key token buckets (`--rate-limit`).
    pub limiter: RateLimiter,
    /// Where every component gets the time from.
    pub clock: Arc<dyn Clock>,
    /// The configured per-step timeouts the deadline divides.
    pub timeouts: Timeouts,
    /// An idempotency lock older than this belongs to a request that died: request timeout + 1 s.
    pub lock_ttl: Duration,
    /// Set when shutdown begins: readiness fails from then on.
    pub draining: AtomicBool,
    /// What the workers are doing, for the drain's report.
    pub inflight: InFlight,
    /// The Prometheus registry.
    pub metrics: Arc<Metrics>,
    /// What the live page shows that nothing else keeps: the last requests, the controls.
    pub board: Board,
}

impl App {
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }
}
