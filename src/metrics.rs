//! The Prometheus registry and its exposition (`GET /metrics`). Every name has the prefix
//! `paytrace_`. Counters and histograms move where the event happens; gauges that mirror
//! state (pool, breaker, draining) are read when scraped.
//!
//! Every series whose label values are known in advance exists from start-up at 0 (the lists
//! below), so a dashboard or an alert on `rate(...)` sees a 0 before the first event instead
//! of no series at all. A label value not listed (a status no route was expected to answer)
//! still appears on its first use.

use prometheus::{
    Encoder, Gauge, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

/// Buckets in seconds, from 0.5 ms to 5 s: the interesting range of a payment and its steps.
const BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];

/// The route labels, each with the statuses it is known to answer. Every route can also be
/// refused by the guards and the dispatcher ([`COMMON_STATUSES`]).
pub const ROUTE_STATUSES: &[(&str, &[u16])] = &[
    (
        "POST /payments",
        &[201, 400, 401, 402, 408, 409, 413, 415, 422, 429, 502, 504],
    ),
    ("GET /payments", &[200, 400, 401, 429, 504]),
    ("GET /payments/{id}", &[200, 401, 404, 429, 504]),
    ("GET /healthz", &[200]),
    ("GET /readyz", &[200]),
    ("GET /metrics", &[200]),
    ("GET /openapi.json", &[200]),
    ("GET /", &[200]),
    ("GET /debug/state", &[200]),
    ("PUT /debug/provider-faults", &[200, 400, 401, 404, 415]),
    ("POST /debug/burst", &[202, 400, 401, 404, 409, 415]),
    ("other", &[404, 405]),
];
/// What any route can answer: 414/431 from the guards, 500 from a panic, 503 when shed.
pub const COMMON_STATUSES: &[u16] = &[414, 431, 500, 503];
/// `requests_shed_total{reason}`.
pub const SHED_REASONS: &[&str] = &[
    "queue_full",
    "pool_timeout",
    "rate_limited",
    "breaker_open",
    "shutting_down",
];
/// `provider_calls_total{outcome}`.
pub const PROVIDER_OUTCOMES: &[&str] = &[
    "charged",
    "declined",
    "ambiguous",
    "timeout",
    "unreachable",
    "rejected",
];
/// `idempotency_total{outcome}`.
pub const IDEMPOTENCY_OUTCOMES: &[&str] = &["new", "resumed", "replayed", "in-use", "reused"];
/// `db_pool_connections{state}`.
pub const POOL_STATES: &[&str] = &["idle", "in_use"];

pub struct Metrics {
    registry: Registry,
    pub http_requests: IntCounterVec,
    pub http_duration: HistogramVec,
    pub step_duration: HistogramVec,
    pub workers_busy: IntGauge,
    pub queue_depth: IntGauge,
    pub shed: IntCounterVec,
    pub pool_connections: IntGaugeVec,
    pub acquire_timeouts: IntCounter,
    pub breaker_state: IntGauge,
    pub breaker_transitions: IntCounterVec,
    pub provider_calls: IntCounterVec,
    /// Charge calls sent and not yet answered (or given up on).
    pub provider_in_flight: IntGauge,
    pub idempotency: IntCounterVec,
    pub payments: IntCounterVec,
    pub draining: IntGauge,
    /// Writes per transaction of the single writer.
    pub db_batch_size: Histogram,
    /// From `BEGIN` to the end of `COMMIT` of each batch.
    pub db_commit_seconds: Histogram,
    /// Writes waiting for the writer.
    pub db_writer_queue: IntGauge,
    /// The write-delay fault in force (`serve --write-delay`), 0 while off.
    pub db_write_delay: Gauge,
}

/// `db_batch_size` buckets: writes per transaction.
const BATCH_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0];

fn opts(name: &str, help: &str) -> Opts {
    Opts::new(name, help).namespace("paytrace")
}

impl Metrics {
    pub fn new() -> Result<Metrics, prometheus::Error> {
        let registry = Registry::new();
        let counter_vec =
            |name: &str, help: &str, labels: &[&str]| -> Result<IntCounterVec, prometheus::Error> {
                let c = IntCounterVec::new(opts(name, help), labels)?;
                registry.register(Box::new(c.clone()))?;
                Ok(c)
            };
        let gauge = |name: &str, help: &str| -> Result<IntGauge, prometheus::Error> {
            let g = IntGauge::with_opts(opts(name, help))?;
            registry.register(Box::new(g.clone()))?;
            Ok(g)
        };
        let histogram =
            |name: &str, help: &str, label: &str| -> Result<HistogramVec, prometheus::Error> {
                let h = HistogramVec::new(
                    HistogramOpts::new(name, help)
                        .namespace("paytrace")
                        .buckets(BUCKETS.to_vec()),
                    &[label],
                )?;
                registry.register(Box::new(h.clone()))?;
                Ok(h)
            };
        let pool_connections = IntGaugeVec::new(
            opts(
                "db_pool_connections",
                "Pooled SQLite connections by state (idle, in_use).",
            ),
            &["state"],
        )?;
        registry.register(Box::new(pool_connections.clone()))?;
        let acquire_timeouts = IntCounter::with_opts(opts(
            "db_acquire_timeouts_total",
            "Times the writer or a pooled connection was not had within the acquire slice.",
        ))?;
        registry.register(Box::new(acquire_timeouts.clone()))?;
        let plain_histogram =
            |name: &str, help: &str, buckets: &[f64]| -> Result<Histogram, prometheus::Error> {
                let h = Histogram::with_opts(
                    HistogramOpts::new(name, help)
                        .namespace("paytrace")
                        .buckets(buckets.to_vec()),
                )?;
                registry.register(Box::new(h.clone()))?;
                Ok(h)
            };
        let metrics = Metrics {
            db_batch_size: plain_histogram(
                "db_batch_size",
                "Writes committed together in one transaction by the single writer.",
                BATCH_BUCKETS,
            )?,
            db_commit_seconds: plain_histogram(
                "db_commit_seconds",
                "Time of one writer transaction, BEGIN to the end of COMMIT (fsync included).",
                BUCKETS,
            )?,
            db_writer_queue: gauge("db_writer_queue", "Writes waiting for the single writer.")?,
            db_write_delay: {
                let g = Gauge::with_opts(opts(
                    "db_write_delay_seconds",
                    "The injected write delay in force (serve --write-delay; 0 while off).",
                ))?;
                registry.register(Box::new(g.clone()))?;
                g
            },
            http_requests: counter_vec(
                "http_requests_total",
                "Requests answered, by route and status.",
                &["route", "status"],
            )?,
            http_duration: histogram(
                "http_request_duration_seconds",
                "Time from being read off the socket to the answer, by route.",
                "route",
            )?,
            step_duration: histogram(
                "step_duration_seconds",
                "Time in each step of POST /payments.",
                "step",
            )?,
            workers_busy: gauge("workers_busy", "Workers handling a request right now.")?,
            queue_depth: gauge("queue_depth", "Requests waiting in the bounded queue.")?,
            shed: counter_vec(
                "requests_shed_total",
                "Requests refused to protect the server, by reason.",
                &["reason"],
            )?,
            pool_connections,
            acquire_timeouts,
            breaker_state: gauge(
                "breaker_state",
                "The provider breaker: 0 closed, 1 open, 2 half-open.",
            )?,
            breaker_transitions: counter_vec(
                "breaker_transitions_total",
                "Breaker state changes, by new state.",
                &["to"],
            )?,
            provider_calls: counter_vec(
                "provider_calls_total",
                "Charge attempts by outcome (rejected: by the open breaker).",
                &["outcome"],
            )?,
            provider_in_flight: gauge(
                "provider_calls_in_flight",
                "Charge calls sent to the provider and not yet answered or given up on.",
            )?,
            idempotency: counter_vec(
                "idempotency_total",
                "Idempotency decisions: new, resumed, replayed, in-use, reused.",
                &["outcome"],
            )?,
            payments: counter_vec(
                "payments_total",
                "Payment states recorded, by status.",
                &["status"],
            )?,
            draining: gauge("draining", "1 while shutting down.")?,
            registry,
        };
        metrics.expose_known_series();
        Ok(metrics)
    }

    /// Creates every series whose label values are known, at 0.
    fn expose_known_series(&self) {
        use crate::deadline::Step;
        use crate::provider::breaker::State;
        use crate::store::db::PaymentStatus;
        for (route, statuses) in ROUTE_STATUSES {
            for status in statuses.iter().chain(COMMON_STATUSES) {
                self.http_requests
                    .with_label_values(&[*route, status.to_string().as_str()]);
            }
            self.http_duration.with_label_values(&[route]);
        }
        for step in Step::ALL {
            self.step_duration.with_label_values(&[step.name()]);
        }
        for reason in SHED_REASONS {
            self.shed.with_label_values(&[reason]);
        }
        for state in POOL_STATES {
            self.pool_connections.with_label_values(&[state]);
        }
        for to in [State::Closed, State::Open, State::HalfOpen] {
            self.breaker_transitions.with_label_values(&[to.name()]);
        }
        for outcome in PROVIDER_OUTCOMES {
            self.provider_calls.with_label_values(&[outcome]);
        }
        for outcome in IDEMPOTENCY_OUTCOMES {
            self.idempotency.with_label_values(&[outcome]);
        }
        for status in [
            PaymentStatus::Processing,
            PaymentStatus::Pending,
            PaymentStatus::Succeeded,
            PaymentStatus::Declined,
            PaymentStatus::Failed,
        ] {
            self.payments.with_label_values(&[status.as_str()]);
        }
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut out) {
            log::warn!("encoding metrics failed: {e}");
        }
        String::from_utf8(out).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_series_exist_at_zero_before_any_event() {
        let text = Metrics::new().unwrap().render();
        for name in [
            "paytrace_http_requests_total{route=\"POST /payments\",status=\"201\"} 0",
            "paytrace_http_requests_total{route=\"GET /healthz\",status=\"503\"} 0",
            "paytrace_http_request_duration_seconds_count{route=\"GET /payments/{id}\"} 0",
            "paytrace_step_duration_seconds_count{step=\"persist\"} 0",
            "paytrace_requests_shed_total{reason=\"shutting_down\"} 0",
            "paytrace_db_pool_connections{state=\"in_use\"} 0",
            "paytrace_breaker_transitions_total{to=\"half-open\"} 0",
            "paytrace_provider_calls_total{outcome=\"unreachable\"} 0",
            "paytrace_idempotency_total{outcome=\"in-use\"} 0",
            "paytrace_payments_total{status=\"processing\"} 0",
        ] {
            assert!(text.contains(name), "{name} missing from\n{text}");
        }
    }

    #[test]
    fn every_metric_is_exposed_with_the_prefix() {
        let m = Metrics::new().unwrap();
        m.http_requests
            .with_label_values(&["GET /healthz", "200"])
            .inc();
        m.step_duration.with_label_values(&["queue"]).observe(0.001);
        m.shed.with_label_values(&["queue_full"]).inc();
        m.breaker_transitions.with_label_values(&["open"]).inc();
        m.provider_calls.with_label_values(&["charged"]).inc();
        m.idempotency.with_label_values(&["new"]).inc();
        m.payments.with_label_values(&["succeeded"]).inc();
        m.pool_connections.with_label_values(&["idle"]).set(8);
        m.http_duration
            .with_label_values(&["GET /healthz"])
            .observe(0.002);
        let text = m.render();
        for name in [
            "paytrace_http_requests_total{route=\"GET /healthz\",status=\"200\"} 1",
            "paytrace_http_request_duration_seconds_bucket",
            "paytrace_step_duration_seconds_count{step=\"queue\"} 1",
            "paytrace_workers_busy 0",
            "paytrace_queue_depth 0",
            "paytrace_requests_shed_total{reason=\"queue_full\"} 1",
            "paytrace_db_pool_connections{state=\"idle\"} 8",
            "paytrace_db_acquire_timeouts_total 0",
            "paytrace_breaker_state 0",
            "paytrace_provider_calls_in_flight 0",
            "paytrace_breaker_transitions_total{to=\"open\"} 1",
            "paytrace_provider_calls_total{outcome=\"charged\"} 1",
            "paytrace_idempotency_total{outcome=\"new\"} 1",
            "paytrace_payments_total{status=\"succeeded\"} 1",
            "paytrace_draining 0",
        ] {
            assert!(text.contains(name), "{name} missing from\n{text}");
        }
    }
}
