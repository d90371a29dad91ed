//! The Prometheus registry and its exposition (`GET /metrics`). Every name has the prefix
//! `paytrace_`. Counters and histograms move where the event happens; gauges that mirror
//! state (pool, breaker, draining) are read when scraped.

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

/// Buckets in seconds, from 0.5 ms to 5 s: the interesting range of a payment and its steps.
const BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];

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
    pub idempotency: IntCounterVec,
    pub payments: IntCounterVec,
    pub draining: IntGauge,
}

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
            "Times the write token or a pooled connection was not had within the acquire slice.",
        ))?;
        registry.register(Box::new(acquire_timeouts.clone()))?;
        Ok(Metrics {
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
        })
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
