//! Printing a run: its timeline as a table, its story and its invariants as lines; or all of
//! it as JSON.

use serde_json::{Value, json};

use super::model::RunResult;
use super::story::{facts, story};
use super::timeline::timeline;

fn breaker_name(state: f64) -> &'static str {
    match state as i64 {
        0 => "closed",
        1 => "open",
        2 => "half-open",
        _ => "?",
    }
}

pub(crate) fn print(scenario: &str, r: &RunResult) {
    println!("== {scenario} ({}) ==", r.label);
    println!(
        "{:>6} {:>7} {:>5}  {:<44} {:>8} {:>8} {:>4} {:>5} {:<9} {:>5} {:>6} {:>5}",
        "t s",
        "offered",
        "201",
        "other answers",
        "median",
        "p99 sofar",
        "busy",
        "queue",
        "breaker",
        "calls",
        "writer",
        "shed"
    );
    for row in timeline(r) {
        let others: Vec<String> = row
            .answered
            .iter()
            .filter(|(k, _)| k.as_str() != "201")
            .map(|(k, v)| format!("{k}:{v}"))
            .collect();
        let ms = |v: Option<f64>| v.map_or("-".into(), |v| format!("{v:.0}ms"));
        println!(
            "{:>6.2} {:>7} {:>5}  {:<44} {:>8} {:>9} {:>4} {:>5} {:<9} {:>5} {:>6} {:>5}",
            row.t,
            row.offered,
            row.answered.get("201").copied().unwrap_or(0),
            others.join(" "),
            ms(row.median_ms),
            ms(row.p99_so_far_ms),
            row.workers_busy as i64,
            row.queue_depth as i64,
            if row.server_up {
                breaker_name(row.breaker)
            } else {
                "down"
            },
            row.provider_in_flight as i64,
            row.writer_queue as i64,
            row.shed as i64
        );
    }
    println!("story: {}", story(r).join(" → "));
    for i in &r.invariants {
        println!(
            "invariant {}: {} — {}",
            if i.held { "held" } else { "FAILED" },
            i.name,
            i.detail
        );
    }
}

pub(crate) fn to_json(r: &RunResult) -> Value {
    json!({
        "label": r.label,
        "fault": r.fault_text,
        "fault_at_s": r.fault_t,
        "recovered_at_s": r.recover_t,
        "server_exit": r.server_exit,
        "timeline": timeline(r),
        "facts": facts(r),
        "story": story(r),
        "invariants": r.invariants,
    })
}
