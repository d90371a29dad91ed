//! The story: the moments a run is made of ([`Facts`], measured on the answers and the
//! samples), told as a chain of reactions in the order they happened, and for a scenario with
//! two runs, the two side by side.

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;
use serde_json::{Value, json};

use super::model::{Answer, RunResult, Sample};
use super::timeline::{quantile, sorted_latencies};

/// The moments the story is made of, measured on the run.
#[derive(Clone, Debug, Default, Serialize)]
pub(crate) struct Facts {
    /// The first answer received after the fault that was not a 201.
    pub first_failure: Option<(f64, String, f64)>,
    /// The breaker's first opening after the fault (first sample that saw it), s.
    pub breaker_opened: Option<f64>,
    pub breaker_half_opened: Option<f64>,
    /// Closed again after having opened, s.
    pub breaker_closed: Option<f64>,
    pub openings: f64,
    /// What the clients got before the breaker opened (the answers that made it open):
    /// (label, median ms).
    pub before_open: Option<(String, f64)>,
    /// Median ms of the 503 provider-unavailable answers while it was open.
    pub rejected_median_ms: Option<f64>,
    pub rejected: usize,
    /// Answers that came within 100 ms of the request's deadline, or after it.
    pub near_deadline: usize,
    /// Answers that came after the request's deadline.
    pub after_deadline: usize,
    /// The slowest answer to a request sent between the fault and the recovery, ms: how long
    /// one request could be held.
    pub fault_max_ms: Option<f64>,
    pub first_201_after_recovery: Option<f64>,
    pub shed_queue_full: f64,
    /// Answers 429 rate-limited after the fault: (the first one's time, how many).
    pub rate_limited: Option<(f64, usize)>,
    /// Requests that were retries of an earlier one with the same key, and the most
    /// attempts one key took.
    pub retries: usize,
    pub most_attempts: u32,
    /// Keys that were answered 201 only after at least one retry.
    pub retried_to_201: usize,
    /// Requests sent before the fault and answered after it (a drain's work): (how many,
    /// the last answer's time, how many of them were 201).
    pub answered_across: Option<(usize, f64, usize)>,
    /// The first request after the fault that got no HTTP answer at all.
    pub first_no_answer: Option<f64>,
    /// The first sample after the fault that the server did not answer.
    pub server_gone: Option<f64>,
    /// The first sample after that which it answered again (a restarted server).
    pub server_back: Option<f64>,
    /// 409 idempotency-key-in-use after the fault: (first, last, how many).
    pub in_use: Option<(f64, f64, usize)>,
    /// The slow clients' requests: (how many, median ms until the server answered or closed,
    /// the statuses they got).
    pub slow_clients: Option<(usize, f64, Vec<String>)>,
    /// p99 of the closed-loop clients' payments sent before the fault and during it, ms.
    pub p99_before_ms: Option<f64>,
    pub p99_during_ms: Option<f64>,
    /// The first 201 sent during the fault that took over three times the median 201 before it:
    /// (when, ms, the median before).
    pub first_slow_201: Option<(f64, f64, f64)>,
    /// The most writes waiting for the writer in a sample during the fault: (when, how many).
    pub writer_queue_peak: Option<(f64, f64)>,
    /// Answers 503 overloaded after the fault: (the first one's time, how many, median ms).
    pub overloaded: Option<(f64, usize, f64)>,
    /// Writes or connections not had within their slice, during the whole run.
    pub acquire_timeouts: f64,
    /// 201s per second among the answers before the fault, and during it.
    pub ok_per_s_before: f64,
    pub ok_per_s_during: f64,
    /// The most workers busy in a sample during the fault.
    pub busy_max_during: f64,
}

fn most_common<'a>(answers: impl Iterator<Item = &'a Answer>) -> Option<(String, f64)> {
    let mut by: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    for a in answers {
        by.entry(a.label()).or_default().push(a.latency_ms());
    }
    let (label, mut v) = by.into_iter().max_by_key(|(_, v)| v.len())?;
    v.sort_by(f64::total_cmp);
    Some((label, quantile(&v, 0.5)?))
}

pub(crate) fn facts(r: &RunResult) -> Facts {
    let after_fault = |t: f64| t >= r.fault_t;
    let first_sample = |p: &dyn Fn(&Sample) -> bool| {
        r.samples
            .iter()
            .find(|s| after_fault(s.t) && p(s))
            .map(|s| s.t)
    };
    let base = r.samples.first().cloned().unwrap_or_default();
    // The samples are 250 ms apart; the clients see the opening first: their first
    // 503 provider-unavailable (nothing sent) once the samples confirm an opening.
    let breaker_opened =
        first_sample(&|s| s.breaker_state == 1.0 || s.to_open > base.to_open).map(|sampled| {
            r.answers
                .iter()
                .find(|a| after_fault(a.sent) && a.code.as_deref() == Some("provider-unavailable"))
                .map_or(sampled, |a| a.done.min(sampled))
        });
    let breaker_half_opened =
        first_sample(&|s| s.breaker_state == 2.0 || s.to_half_open > base.to_half_open);
    let breaker_closed = breaker_opened.and_then(|opened| {
        r.samples
            .iter()
            .find(|s| s.t > opened && s.breaker_state == 0.0 && s.to_closed > base.to_closed)
            .map(|s| s.t)
    });
    let last = r
        .samples
        .iter()
        .rfind(|s| s.up)
        .cloned()
        .unwrap_or_default();
    let limited: Vec<&Answer> = r
        .answers
        .iter()
        .filter(|a| after_fault(a.sent) && a.status == 429)
        .collect();
    let across: Vec<&Answer> = r
        .answers
        .iter()
        .filter(|a| a.sent < r.fault_t && a.done >= r.fault_t)
        .collect();
    let first_failure = r
        .answers
        .iter()
        .find(|a| after_fault(a.sent) && a.status != 201 && !a.slow_client)
        .map(|a| (a.done, a.label(), a.latency_ms()));
    let before_open = breaker_opened.and_then(|opened| {
        most_common(
            r.answers
                .iter()
                .filter(|a| after_fault(a.sent) && a.done < opened),
        )
    });
    let rejected: Vec<&Answer> = r
        .answers
        .iter()
        .filter(|a| a.code.as_deref() == Some("provider-unavailable"))
        .collect();
    let deadline_ms = r.request_timeout.as_secs_f64() * 1000.0;
    let overloaded: Vec<&Answer> = r
        .answers
        .iter()
        .filter(|a| after_fault(a.sent) && a.code.as_deref() == Some("overloaded"))
        .collect();
    let ok_per_s = |from: f64, to: f64| {
        let n = r
            .answers
            .iter()
            .filter(|a| a.status == 201 && a.done >= from && a.done < to)
            .count();
        if to > from {
            n as f64 / (to - from)
        } else {
            0.0
        }
    };
    Facts {
        writer_queue_peak: r
            .samples
            .iter()
            .filter(|s| after_fault(s.t) && s.t <= r.recover_t && s.writer_queue > 0.0)
            .max_by(|a, b| a.writer_queue.total_cmp(&b.writer_queue))
            .map(|s| (s.t, s.writer_queue)),
        overloaded: quantile(&sorted_latencies(overloaded.iter().copied()), 0.5)
            .map(|median| (overloaded[0].done, overloaded.len(), median)),
        acquire_timeouts: last.acquire_timeouts - base.acquire_timeouts,
        ok_per_s_before: ok_per_s(0.0, r.fault_t),
        ok_per_s_during: ok_per_s(r.fault_t, r.recover_t),
        busy_max_during: r
            .samples
            .iter()
            .filter(|s| after_fault(s.t) && s.t <= r.recover_t)
            .map(|s| s.workers_busy)
            .fold(0.0, f64::max),
        first_failure,
        breaker_opened,
        breaker_half_opened,
        breaker_closed,
        openings: last.to_open - base.to_open,
        before_open,
        rejected_median_ms: quantile(&sorted_latencies(rejected.iter().copied()), 0.5),
        rejected: rejected.len(),
        // The slow clients' requests are never answered by the budget: they are not counted
        // among the answers to requests that were read.
        near_deadline: r
            .answers
            .iter()
            .filter(|a| !a.slow_client && a.latency_ms() >= deadline_ms - 100.0)
            .count(),
        after_deadline: r
            .answers
            .iter()
            .filter(|a| !a.slow_client && a.latency_ms() > deadline_ms)
            .count(),
        fault_max_ms: quantile(
            &sorted_latencies(
                r.answers
                    .iter()
                    .filter(|a| !a.slow_client && a.sent >= r.fault_t && a.sent < r.recover_t),
            ),
            1.0,
        ),
        first_201_after_recovery: r
            .answers
            .iter()
            .find(|a| a.sent >= r.recover_t && a.status == 201)
            .map(|a| a.done),
        shed_queue_full: last.shed_queue_full - base.shed_queue_full,
        slow_clients: {
            let slow: Vec<&Answer> = r.answers.iter().filter(|a| a.slow_client).collect();
            let labels: BTreeSet<String> = slow.iter().map(|a| a.label()).collect();
            quantile(&sorted_latencies(slow.iter().copied()), 0.5)
                .map(|median| (slow.len(), median, labels.into_iter().collect()))
        },
        p99_before_ms: quantile(
            &sorted_latencies(
                r.answers
                    .iter()
                    .filter(|a| !a.slow_client && a.sent < r.fault_t),
            ),
            0.99,
        ),
        p99_during_ms: quantile(
            &sorted_latencies(
                r.answers
                    .iter()
                    .filter(|a| !a.slow_client && a.sent >= r.fault_t && a.sent < r.recover_t),
            ),
            0.99,
        ),
        rate_limited: limited.first().map(|a| (a.done, limited.len())),
        retries: r.answers.iter().filter(|a| a.attempt > 1).count(),
        most_attempts: r.answers.iter().map(|a| a.attempt).max().unwrap_or(0),
        retried_to_201: r
            .answers
            .iter()
            .filter(|a| a.status == 201 && a.attempt > 1)
            .count(),
        answered_across: across.iter().map(|a| a.done).reduce(f64::max).map(|t| {
            (
                across.len(),
                t,
                across.iter().filter(|a| a.status == 201).count(),
            )
        }),
        first_no_answer: r
            .answers
            .iter()
            .find(|a| after_fault(a.sent) && a.status == 0 && !a.slow_client)
            .map(|a| a.done),
        server_back: r
            .samples
            .iter()
            .skip_while(|s| !after_fault(s.t) || s.up)
            .find(|s| s.up)
            .map(|s| s.t),
        in_use: {
            let in_use: Vec<f64> = r
                .answers
                .iter()
                .filter(|a| after_fault(a.sent) && a.status == 409)
                .map(|a| a.done)
                .collect();
            in_use
                .first()
                .zip(in_use.last())
                .map(|(first, last)| (*first, *last, in_use.len()))
        },
        server_gone: r
            .samples
            .iter()
            .find(|s| after_fault(s.t) && !s.up)
            .map(|s| s.t),
        first_slow_201: quantile(
            &sorted_latencies(
                r.answers
                    .iter()
                    .filter(|a| a.done < r.fault_t && a.status == 201),
            ),
            0.5,
        )
        .and_then(|before| {
            r.answers
                .iter()
                .find(|a| {
                    after_fault(a.sent)
                        && a.sent < r.recover_t
                        && a.status == 201
                        && a.latency_ms() > 3.0 * before
                })
                .map(|a| (a.done, a.latency_ms(), before))
        }),
    }
}

/// The chain of reactions, in the order they happened, each link one unit's reaction.
pub(crate) fn story(r: &RunResult) -> Vec<String> {
    let f = facts(r);
    let mut links: Vec<(f64, String)> =
        vec![(r.fault_t, format!("{} at {:.2} s", r.fault_text, r.fault_t))];
    if let Some((t, ms, before)) = f.first_slow_201 {
        links.push((
            t,
            format!("first slow 201 at {t:.2} s ({ms:.0} ms, was {before:.0} ms)"),
        ));
    }
    if let Some((t, label, ms)) = f.first_failure.as_ref().filter(|x| x.1 != "no answer") {
        links.push((*t, format!("first {label} at {t:.2} s (after {ms:.0} ms)")));
    }
    match f.breaker_opened {
        Some(t) => {
            let mut link = format!("breaker open at {t:.2} s");
            if let Some(ms) = f.rejected_median_ms {
                link.push_str(&format!(
                    " → 503 provider-unavailable in ~{ms:.0} ms ({} answers, nothing sent)",
                    f.rejected
                ));
                if let Some((label, before)) = &f.before_open {
                    link.push_str(&format!(" instead of {label} after ~{before:.0} ms"));
                }
            }
            links.push((t, link));
            if t > r.recover_t {
                links.push((
                    t,
                    format!(
                        "it opened {:.2} s after the provider had recovered: the evidence (timeouts) arrived late, and healthy calls are refused",
                        t - r.recover_t
                    ),
                ));
            }
        }
        None if f.first_failure.is_some() && f.first_no_answer.is_none() => {
            links.push((r.duration, "the breaker never opened".into()))
        }
        None => {}
    }
    if let Some(t) = f.breaker_half_opened {
        links.push((
            t,
            format!("half-open at {t:.2} s (opened {}x in all)", f.openings),
        ));
    }
    if let Some((t, n)) = f.writer_queue_peak.filter(|_| f.acquire_timeouts > 0.0) {
        links.push((
            t,
            format!("the writer falls behind: {n} writes waiting for it at {t:.2} s (unit 04)"),
        ));
    }
    if let Some((t, n, ms)) = f.overloaded {
        links.push((
            t,
            format!(
                "{n} answers 503 overloaded from {t:.2} s (median {ms:.0} ms; {} writes or connections not had in time): writes that could not be committed before their callers stopped waiting were refused, nothing written, nothing sent",
                f.acquire_timeouts
            ),
        ));
        links.push((
            r.recover_t,
            format!(
                "meanwhile {:.1} payments/s still succeeded ({:.1}/s before): the writer commits what can finish in time, recording sent charges first",
                f.ok_per_s_during, f.ok_per_s_before
            ),
        ));
    }
    if f.shed_queue_full > 0.0 {
        links.push((
            r.duration,
            format!(
                "{} requests shed with the worker queue full (unit 03)",
                f.shed_queue_full
            ),
        ));
    }
    if let Some((n, median, labels)) = &f.slow_clients {
        let text = if r.via_nginx {
            format!(
                "{n} slow requests, held by nginx until their clients gave up (~{median:.0} ms; {}): nginx forwards a request only once its body is whole, and its client_body_timeout (5 s) is the longest pause between two reads, so a byte every 200 ms is never cut off; paytrace never saw them, its workers at most {} busy",
                labels.join(", "),
                f.busy_max_during
            )
        } else {
            format!(
                "{n} slow requests, each cut off after ~{median:.0} ms ({}): the front reads a request whole within --socket-timeout before a worker sees it; workers at most {} busy",
                labels.join(", "),
                f.busy_max_during
            )
        };
        links.push((r.fault_t, text));
        if let (Some(before), Some(during)) = (f.p99_before_ms, f.p99_during_ms) {
            links.push((
                r.recover_t,
                format!("meanwhile the other clients' payments: p99 {during:.0} ms during, {before:.0} ms before"),
            ));
        }
    }
    if let Some((t, n)) = f.rate_limited {
        links.push((
            t,
            format!(
                "the retries hit the rate limit: first 429 rate-limited at {t:.2} s ({n} in all; {} retries, up to {} attempts for one key)",
                f.retries, f.most_attempts
            ),
        ));
    }
    if let Some((n, t, ok)) = f.answered_across.filter(|_| f.server_gone.is_some()) {
        links.push((
            t,
            format!("{n} requests in flight at the fault: {ok} of them answered 201, the last answer at {t:.2} s"),
        ));
    }
    if let Some(t) = f.first_no_answer {
        links.push((
            t,
            format!("first request with no answer (no server listening) at {t:.2} s"),
        ));
    }
    if let Some(t) = f.server_gone {
        links.push((t, format!("server gone by {t:.2} s")));
        if let Some(t) = f.server_back {
            links.push((
                t,
                format!("a server on the same database answers again at {t:.2} s"),
            ));
        }
    } else {
        links.push((
            r.recover_t,
            format!("fault removed at {:.2} s", r.recover_t),
        ));
    }
    if let Some((first, last, n)) = f.in_use {
        links.push((
            first,
            format!(
                "{n} answers 409 idempotency-key-in-use from {first:.2} s to {last:.2} s: keys still locked by an attempt that never finished, until the lock's TTL (request timeout + 1 s) lets a retry take them over"
            ),
        ));
    }
    if f.retried_to_201 > 0 {
        let first = r
            .answers
            .iter()
            .find(|a| a.status == 201 && a.attempt > 1)
            .map_or(r.recover_t, |a| a.done);
        links.push((
            first,
            format!(
                "{} keys answered 201 only after retries: each resumed its one payment (idempotency, unit 05)",
                f.retried_to_201
            ),
        ));
    }
    if let Some(t) = f.breaker_closed {
        links.push((t, format!("breaker closed at {t:.2} s")));
    }
    if let Some(t) = f
        .first_201_after_recovery
        .filter(|_| f.first_failure.is_some() || f.server_gone.is_some())
    {
        links.push((t, format!("201s again from {t:.2} s")));
    }
    if f.near_deadline > 0 {
        links.push((
            r.duration,
            format!(
                "{} answers came within 100 ms of the {} ms deadline or after it ({} after it)",
                f.near_deadline,
                r.request_timeout.as_millis(),
                f.after_deadline
            ),
        ));
    }
    links.sort_by(|a, b| a.0.total_cmp(&b.0));
    links.into_iter().map(|(_, text)| text).collect()
}

/// For a scenario with two runs: one line per measure, both runs side by side.
pub(crate) fn comparison(results: &[RunResult]) -> Value {
    if results.len() < 2 {
        return json!([]);
    }
    let facts: Vec<(&str, Facts)> = results.iter().map(|r| (r.label, facts(r))).collect();
    let line = |what: &str, f: &dyn Fn(&Facts) -> String| {
        let parts: Vec<String> = facts
            .iter()
            .map(|(label, x)| format!("{label} {}", f(x)))
            .collect();
        json!(format!("{what}: {}", parts.join(" | ")))
    };
    let secs = |t: Option<f64>| t.map_or("never".into(), |t| format!("at {t:.2} s"));
    json!([
        line("answers within 100 ms of the deadline or after it", &|x| x
            .near_deadline
            .to_string()),
        line("answers after the deadline", &|x| x
            .after_deadline
            .to_string()),
        line("slowest answer to a request sent during the fault", &|x| x
            .fault_max_ms
            .map_or("-".into(), |v| format!("{v:.0} ms"))),
        line("breaker opened", &|x| secs(x.breaker_opened)),
        line("503 provider-unavailable answers", &|x| x
            .rejected
            .to_string()),
    ])
}
