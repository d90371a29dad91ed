//! Follow one request: `RUST_LOG=paytrace::trace=debug` logs one line per hop, and each line
//! says where the request was, when, with what slice and how much budget was left.

use std::process::Command;
use std::time::Duration;

use crate::helpers::*;

/// One parsed trace line.
#[derive(Debug)]
struct Hop {
    unit: u8,
    step: String,
    slice_ms: Option<u64>,
    left_ms: f64,
    what: String,
}

fn field<'a>(line: &'a str, name: &str) -> Option<&'a str> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(name)?.strip_prefix('='))
}

/// The hops of request `id`, in the order they were logged.
fn hops(serve: &Serve, id: &str) -> Vec<Hop> {
    let needle = format!("trace req={id} ");
    serve
        .proc
        .log_lines()
        .iter()
        .filter_map(|l| l.split_once(&needle).map(|(_, rest)| rest.to_string()))
        .map(|rest| {
            let line = format!("req={id} {rest}");
            let what = rest
                .split_once(" left_ms=")
                .and_then(|(_, r)| r.split_once(' '))
                .map_or("", |(_, w)| w)
                .to_string();
            Hop {
                unit: field(&line, "unit").unwrap().parse().unwrap(),
                step: field(&line, "step").unwrap().to_string(),
                slice_ms: field(&line, "slice_ms").unwrap().parse().ok(),
                left_ms: field(&line, "left_ms").unwrap().parse().unwrap(),
                what,
            }
        })
        .collect()
}

fn traced(args: &[&str]) -> Serve {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_paytrace"));
    cmd.env("RUST_LOG", "paytrace::trace=debug");
    Serve::start_cmd(cmd, tempfile::tempdir().unwrap(), args)
}

/// Waits until request `id`'s trace has a hop of `unit` (the worker logs the last hop after
/// the answer is written), and returns all its hops.
fn hops_until(serve: &Serve, id: &str, unit: u8) -> Vec<Hop> {
    eventually(Duration::from_secs(10), "the trace's last hop", || {
        let h = hops(serve, id);
        h.iter().any(|h| h.unit == unit).then_some(h)
    })
}

#[test]
fn one_payment_shows_all_seven_units_in_order_with_a_budget_that_only_shrinks() {
    let serve = traced(&[]);
    let r = pay_with(
        serve.url(),
        "trace-1",
        &body(500),
        &[("X-Request-Id", "trace-pay-1")],
    );
    assert_eq!(r.status, 201, "{}", r.body);
    let hops = hops_until(&serve, "trace-pay-1", 7);
    let lines = format!("{hops:#?}");

    let mut first_seen = Vec::new();
    for h in &hops {
        if !first_seen.contains(&h.unit) {
            first_seen.push(h.unit);
        }
    }
    assert_eq!(first_seen, [1, 2, 3, 4, 5, 6, 7], "{lines}");
    for pair in hops.windows(2) {
        assert!(
            pair[1].left_ms <= pair[0].left_ms,
            "the budget left never grows: {lines}"
        );
    }
    let provider = hops.iter().find(|h| h.unit == 6).expect("a provider hop");
    let slice = provider.slice_ms.expect("the provider hop names its slice");
    let timing = paytrace::server_timing::parse(r.header("Server-Timing").unwrap());
    let timed = timing.iter().find(|e| e.name == "provider").unwrap();
    assert_eq!(timed.slice_ms(), Some(slice), "{lines}");
    assert!(provider.what.starts_with("charged"), "{lines}");
    // The access line is still there: the trace adds to the default level.
    assert!(
        serve
            .proc
            .log_text()
            .contains("trace-pay-1 POST /payments 201"),
        "{}",
        serve.proc.log_text()
    );
}

/// The hops of the request that got `r`, once its answer's hop (unit 07) is logged, and the
/// last hop before it: where the request stopped.
fn stopped_at(serve: &Serve, r: &Resp) -> (Hop, Vec<Hop>) {
    let id = r
        .header("X-Request-Id")
        .expect("every answer names its request id");
    let mut hops = hops_until(serve, id, 7);
    let done = hops.pop().unwrap();
    assert!(
        done.what.contains(&format!("answered {}", r.status)),
        "{done:?}"
    );
    let stop = hops.pop().expect("a hop before the answer");
    (stop, hops)
}

#[test]
fn a_429_a_504_a_breaker_rejection_and_a_shed_each_show_where_they_stopped() {
    let _serial = exclusive();
    // A 429 stops in the chain (02), before anything is borrowed.
    let limited = traced(&["--rate-limit", "2/min"]);
    let answers: Vec<Resp> = (0..3)
        .map(|i| pay(limited.url(), &format!("rate-{i}"), &body(100)))
        .collect();
    assert_eq!(answers[2].status, 429, "{}", answers[2].body);
    let (stop, before) = stopped_at(&limited, &answers[2]);
    assert_eq!(
        (stop.unit, stop.step.as_str()),
        (2, "rate-limit"),
        "{stop:?}"
    );
    assert!(stop.what.contains("429"), "{stop:?}");
    assert!(before.iter().all(|h| h.unit < 4), "{before:#?}");
    drop(limited);

    let provider = provider(&[]);
    let serve = traced(&[
        "--provider-url",
        &provider.url,
        "--workers",
        "1",
        "--queue",
        "1",
        "--breaker-open",
        "30s",
    ]);

    // A 504 whose budget cannot pay for the first borrow stops at the pool (04).
    let r = pay_with(
        serve.url(),
        "deadline-1",
        &body(100),
        &[("Request-Timeout-Ms", "1")],
    );
    assert_eq!(r.status, 504, "{}", r.body);
    let (stop, _) = stopped_at(&serve, &r);
    assert_eq!(stop.unit, 4, "{stop:?}");
    assert!(stop.what.contains("no useful slice"), "{stop:?}");

    // A shed stops at the queue (03): one worker busy with a slow call, one queued, the rest
    // refused at once.
    set_faults(&provider, r#"{"latency_ms":1500}"#);
    let answers = concurrently(6, |i| pay(serve.url(), &format!("flood-{i}"), &body(100)));
    let shed = answers
        .iter()
        .find(|r| r.status == 503 && r.body["code"] == "overloaded")
        .unwrap_or_else(|| {
            panic!(
                "one of six is shed: {:?}",
                answers.iter().map(|r| r.status).collect::<Vec<_>>()
            )
        });
    let (stop, before) = stopped_at(&serve, shed);
    assert_eq!((stop.unit, stop.step.as_str()), (3, "shed"), "{stop:?}");
    assert!(stop.what.contains("queue_full"), "{stop:?}");
    assert!(before.iter().all(|h| h.unit < 3), "{before:#?}");

    // A breaker rejection stops at the breaker (06), without a call.
    set_faults(&provider, r#"{"latency_ms":0,"fail_rate":1}"#);
    let mut rejected = None;
    for i in 0..30 {
        let r = pay(serve.url(), &format!("fail-{i}"), &body(100));
        if r.status == 503 && r.body["code"] == "provider-unavailable" {
            rejected = Some(r);
            break;
        }
        assert_eq!(r.status, 502, "{}", r.body);
    }
    let r = rejected.expect("the breaker opens within 30 failing calls");
    let (stop, _) = stopped_at(&serve, &r);
    // After the rejection the outcome is still persisted (05): the stop is the breaker's hop.
    let hops = hops(&serve, r.header("X-Request-Id").unwrap());
    let breaker = hops.iter().find(|h| h.unit == 6).expect("a breaker hop");
    assert!(breaker.what.starts_with("rejected"), "{hops:#?}");
    assert_eq!(
        stop.unit, 5,
        "persist still records the failed payment: {stop:?}"
    );
}
