//! `paytrace scenario`: each scenario runs with a short duration, its invariants hold, and it
//! shows the transition it exists to show. Timings are bounds with margin: the runs share two
//! cores with everything else.

use std::process::{Command, Output};
use std::time::Instant;

use serde_json::Value;

use crate::helpers::*;

fn scenario(args: &[&str]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_paytrace"));
    cmd.arg("scenario").args(args);
    for (k, _) in std::env::vars() {
        if k.starts_with("PAYTRACE_") {
            cmd.env_remove(k);
        }
    }
    cmd.output().expect("paytrace scenario runs")
}

/// Runs `name` for `duration` with `--json` and returns its report; every invariant must have
/// held and the exit code must say so.
fn run_json(name: &str, duration: &str) -> Value {
    let t = Instant::now();
    let out = scenario(&[name, "--duration", duration, "--seed", "7", "--json"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let report: Value = serde_json::from_str(&stdout).unwrap_or_else(|e| {
        panic!(
            "{name}: not JSON ({e}): {stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    for run in report["runs"].as_array().unwrap() {
        let invariants = run["invariants"].as_array().unwrap();
        assert_eq!(invariants.len(), 5, "{name}: {invariants:?}");
        for i in invariants {
            assert_eq!(i["held"], true, "{name} {}: {i}", run["label"]);
        }
        assert!(
            run["timeline"].as_array().unwrap().len() >= 20,
            "{name}: one row per 250 ms"
        );
        assert!(!run["story"].as_array().unwrap().is_empty());
    }
    assert_eq!(report["invariants_held"], true);
    assert_eq!(out.status.code(), Some(0), "{name}: {report}");
    eprintln!("{name} --duration {duration}: {:?}", t.elapsed());
    report
}

fn facts<'a>(report: &'a Value, label: &str) -> &'a Value {
    let run = report["runs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["label"] == label)
        .unwrap_or_else(|| panic!("no run {label}: {report}"));
    &run["facts"]
}

#[test]
fn list_names_each_scenario_that_exists_on_one_line() {
    let out = scenario(&["list"]);
    assert_eq!(out.status.code(), Some(0));
    let text = String::from_utf8_lossy(&out.stdout);
    let names: Vec<&str> = text
        .lines()
        .map(|l| l.split_whitespace().next().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "provider-outage",
            "provider-brownout",
            "unnested-budget",
            "retry-storm",
            "sigterm-under-load",
            "crash-and-restart",
            "slow-database",
            "slow-clients"
        ]
    );
    assert!(text.lines().all(|l| l.len() > 40), "{text}");
}

#[test]
fn an_unknown_scenario_is_a_usage_error() {
    let out = scenario(&["no-such-thing"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("paytrace scenario list"));
}

#[test]
fn provider_outage_opens_the_breaker_then_closes_it_after_recovery() {
    let _x = exclusive();
    let report = run_json("provider-outage", "6s");
    let f = facts(&report, "outage");
    let opened = f["breaker_opened"].as_f64().expect("the breaker opened");
    let closed = f["breaker_closed"].as_f64().expect("the breaker closed");
    let recovered = report["runs"][0]["recovered_at_s"].as_f64().unwrap();
    assert!(opened < recovered && closed > recovered, "{f}");
    assert!(f["breaker_half_opened"].as_f64().is_some(), "{f}");
    // While open, a refusal costs next to nothing: the provider is not called.
    assert!(f["rejected"].as_u64().unwrap() > 0, "{f}");
    assert!(f["rejected_median_ms"].as_f64().unwrap() < 100.0, "{f}");
    assert!(f["first_201_after_recovery"].as_f64().is_some(), "{f}");
}

#[test]
fn provider_brownout_makes_calls_slow_and_slow_calls_open_the_breaker() {
    let _x = exclusive();
    let report = run_json("provider-brownout", "6s");
    let f = facts(&report, "brownout");
    let slow = &f["first_slow_201"];
    assert!(slow[1].as_f64().unwrap() > 500.0, "{f}");
    let opened = f["breaker_opened"].as_f64().expect("the breaker opened");
    assert!(opened > slow[0].as_f64().unwrap(), "{f}");
    assert_eq!(f["near_deadline"], 0, "{f}");
}

#[test]
fn unnested_budget_answers_at_the_deadline_only_in_the_unnested_half() {
    let _x = exclusive();
    let report = run_json("unnested-budget", "6s");
    let nested = facts(&report, "nested");
    let unnested = facts(&report, "unnested");
    // Nested: the provider call gives up after its own 1 s, with the rest of the budget left
    // to answer; the failures open the breaker.
    assert_eq!(nested["near_deadline"], 0, "{nested}");
    assert!(nested["breaker_opened"].as_f64().is_some(), "{nested}");
    assert!(
        nested["fault_max_ms"].as_f64().unwrap() < 2000.0,
        "{nested}"
    );
    // Unnested: the provider call takes all that is left, so the answer comes at the
    // deadline (or after it), and the breaker hears about each failure 3 s late.
    assert!(
        unnested["near_deadline"].as_u64().unwrap() > 0,
        "{unnested}"
    );
    assert!(
        unnested["fault_max_ms"].as_f64().unwrap() >= 2900.0,
        "{unnested}"
    );
    let comparison = report["comparison"].as_array().unwrap();
    assert!(comparison.len() >= 4, "{report}");
}

#[test]
fn serve_refuses_an_unnested_budget_unless_the_scenario_switch_is_given() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("refused.db");
    let out = Command::new(env!("CARGO_BIN_EXE_paytrace"))
        .args([
            "serve",
            "--addr",
            "127.0.0.1:0",
            "--db",
            db.to_str().unwrap(),
            "--request-timeout",
            "3s",
            "--provider-timeout",
            "3s",
        ])
        .env_remove("PAYTRACE_UNNESTED_BUDGET")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("budgets do not nest"));
    let serve = Serve::start_in(
        dir,
        &[
            "--request-timeout",
            "3s",
            "--provider-timeout",
            "3s",
            "--unnested-budget",
        ],
    );
    assert_eq!(get(&format!("{}/healthz", serve.url())).status, 200);
}

#[test]
fn retry_storm_meets_the_rate_limit_and_every_retried_key_keeps_one_payment() {
    let _x = exclusive();
    let report = run_json("retry-storm", "6s");
    let f = facts(&report, "storm");
    assert!(f["breaker_opened"].as_f64().is_some(), "{f}");
    // The breaker's instant refusals come back at once, and the rate limit sheds them.
    let limited = f["rate_limited"][1].as_u64().expect("429s");
    assert!(limited > 50, "{f}");
    assert!(f["retries"].as_u64().unwrap() > limited, "{f}");
    // The keys that failed during the outage succeed on a retry, each with one payment (the
    // invariants checked that no key has two).
    assert!(f["retried_to_201"].as_u64().unwrap() > 0, "{f}");
}

#[test]
fn sigterm_under_load_finishes_the_payments_in_flight_and_exits_0() {
    let _x = exclusive();
    let report = run_json("sigterm-under-load", "5s");
    let f = facts(&report, "sigterm");
    let (in_flight, ok) = (
        f["answered_across"][0]
            .as_u64()
            .expect("payments in flight at the signal"),
        f["answered_across"][2].as_u64().unwrap(),
    );
    assert!(in_flight > 0 && ok == in_flight, "{f}");
    assert!(f["server_gone"].as_f64().is_some(), "{f}");
    assert_eq!(report["runs"][0]["server_exit"], 0);
}

#[test]
fn crash_and_restart_loses_nothing_and_charges_nothing_twice() {
    let _x = exclusive();
    let report = run_json("crash-and-restart", "6s");
    let f = facts(&report, "crash");
    assert!(f["server_gone"].as_f64().is_some(), "{f}");
    assert!(f["server_back"].as_f64().is_some(), "{f}");
    assert!(f["first_201_after_recovery"].as_f64().is_some(), "{f}");
    // What was in flight at the kill was resent with the same key and ended as one payment.
    assert!(f["retried_to_201"].as_u64().unwrap() > 0, "{f}");
}

#[test]
fn slow_clients_are_cut_off_by_the_front_and_the_payments_beside_them_do_not_wait() {
    let _x = exclusive();
    let report = run_json("slow-clients", "6s");
    let f = facts(&report, "direct");
    let slow = &f["slow_clients"];
    assert!(slow[0].as_u64().unwrap() >= 32, "{f}");
    // Cut off at --socket-timeout (2 s) with a 408, not served a byte at a time for 10 s.
    let median = slow[1].as_f64().unwrap();
    assert!((1500.0..5000.0).contains(&median), "{f}");
    assert!(
        slow[2]
            .as_array()
            .unwrap()
            .iter()
            .any(|l| l == "slow client: 408"),
        "{f}"
    );
    // The payments beside them: no 2 s waits (a generous bound for a busy machine).
    assert!(f["p99_during_ms"].as_f64().unwrap() < 1000.0, "{f}");

    // Through the shipped nginx config: nginx holds each slow request until its client gives
    // up at the end of the fault (its body timeout is per read, not per request), answers none
    // of them, and the payments beside them still do not wait.
    let f = facts(&report, "nginx");
    let slow = &f["slow_clients"];
    assert!(slow[0].as_u64().unwrap() >= 32, "{f}");
    assert_eq!(slow[2], serde_json::json!(["slow client: closed"]), "{f}");
    assert!(slow[1].as_f64().unwrap() > 2000.0, "held past 2 s: {f}");
    assert!(f["p99_during_ms"].as_f64().unwrap() < 1000.0, "{f}");
    assert!(
        f["busy_max_during"].as_f64().unwrap() <= 9.0,
        "8 clients and a scrape: {f}"
    );
}

#[test]
fn slow_database_refuses_what_cannot_be_written_in_time_and_keeps_recording_the_rest() {
    let _x = exclusive();
    let report = run_json("slow-database", "6s");
    let f = facts(&report, "slow-writes");
    // The writer fell behind: writes queued for it, and requests were refused with 503
    // overloaded (nothing written, nothing sent) instead of waiting past their slices.
    assert!(
        f["writer_queue_peak"][1].as_f64().unwrap_or(0.0) >= 2.0,
        "{f}"
    );
    assert!(f["overloaded"][1].as_u64().unwrap_or(0) > 0, "{f}");
    assert!(f["acquire_timeouts"].as_f64().unwrap() > 0.0, "{f}");
    // And it kept committing what could finish in time: payments still succeeded during the
    // fault (a writer whose batches outlast every caller's patience records none).
    assert!(f["ok_per_s_during"].as_f64().unwrap() > 0.0, "{f}");
    assert!(
        f["ok_per_s_before"].as_f64().unwrap() > f["ok_per_s_during"].as_f64().unwrap(),
        "{f}"
    );
}
