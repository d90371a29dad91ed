//! The timeline: one row per 250 ms of a run, what the clients were answered and what
//! `/metrics` said at that moment.

use std::collections::BTreeMap;

use serde::Serialize;

use super::model::{Answer, RunResult, TICK};

/// One 250 ms slice of the run.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct Row {
    /// The end of the slice, seconds since the load started.
    pub t: f64,
    /// Requests sent in the slice.
    pub offered: usize,
    /// Answers received in the slice, by status (and problem code).
    pub answered: BTreeMap<String, usize>,
    /// Median latency of the slice's answers, ms.
    pub median_ms: Option<f64>,
    /// p99 of every answer received so far, ms.
    pub p99_so_far_ms: Option<f64>,
    pub queue_depth: f64,
    pub workers_busy: f64,
    /// 0 closed, 1 open, 2 half-open (`paytrace_breaker_state`).
    pub breaker: f64,
    pub writer_queue: f64,
    /// Charge calls sent to the provider and not yet answered (`paytrace_provider_calls_in_flight`).
    pub provider_in_flight: f64,
    /// Whether the server answered `/metrics` at the end of the slice.
    pub server_up: bool,
    /// Requests shed in the slice (`paytrace_requests_shed_total`, all reasons).
    pub shed: f64,
    /// Pool acquisitions that timed out so far (`paytrace_db_acquire_timeouts_total`).
    pub acquire_timeouts: f64,
}

pub(crate) fn quantile(sorted: &[f64], q: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let i = ((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len()) - 1;
    Some((sorted[i] * 10.0).round() / 10.0)
}

pub(crate) fn sorted_latencies<'a>(answers: impl Iterator<Item = &'a Answer>) -> Vec<f64> {
    let mut v: Vec<f64> = answers.map(Answer::latency_ms).collect();
    v.sort_by(f64::total_cmp);
    v
}

pub(crate) fn timeline(r: &RunResult) -> Vec<Row> {
    let tick = TICK.as_secs_f64();
    let slices = (r.duration / tick).ceil() as usize;
    let mut rows = Vec::with_capacity(slices);
    let mut previous_shed = 0.0;
    for i in 0..slices {
        let (from, to) = (i as f64 * tick, (i + 1) as f64 * tick);
        let within: Vec<&Answer> = r
            .answers
            .iter()
            .filter(|a| a.done >= from && a.done < to)
            .collect();
        let mut answered = BTreeMap::new();
        for a in &within {
            *answered.entry(a.label()).or_insert(0) += 1;
        }
        let so_far = sorted_latencies(r.answers.iter().filter(|a| a.done < to && !a.slow_client));
        let sample = r
            .samples
            .iter()
            .rfind(|s| s.t <= to + 0.01)
            .cloned()
            .unwrap_or_default();
        rows.push(Row {
            t: to,
            offered: r
                .answers
                .iter()
                .filter(|a| a.sent >= from && a.sent < to)
                .count(),
            answered,
            median_ms: quantile(
                &sorted_latencies(within.iter().copied().filter(|a| !a.slow_client)),
                0.5,
            ),
            p99_so_far_ms: quantile(&so_far, 0.99),
            queue_depth: sample.queue_depth,
            workers_busy: sample.workers_busy,
            breaker: sample.breaker_state,
            writer_queue: sample.writer_queue,
            provider_in_flight: sample.provider_in_flight,
            server_up: sample.up,
            shed: if sample.up {
                (sample.shed - previous_shed).max(0.0)
            } else {
                0.0
            },
            acquire_timeouts: sample.acquire_timeouts,
        });
        if sample.up {
            previous_shed = sample.shed;
        }
    }
    rows
}
