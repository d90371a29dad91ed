//! The deadline budget, divided down the stack (issue: middleware, DI and the budget).

use std::sync::{Arc, Barrier};
use std::thread;
use std::time::Duration;

use crate::helpers::*;

/// The `dur` of one `Server-Timing` entry, and its slice when it has one.
fn timing(r: &Resp, name: &str) -> (f64, Option<f64>) {
    let header = r.header("Server-Timing").unwrap();
    let entry = header
        .split(", ")
        .find(|e| e.starts_with(&format!("{name};")))
        .unwrap_or_else(|| panic!("no {name} in {header}"));
    let dur = entry
        .split(';')
        .find_map(|p| p.strip_prefix("dur="))
        .and_then(|v| v.parse().ok())
        .unwrap();
    let slice = entry
        .split("desc=\"slice ")
        .nth(1)
        .and_then(|v| v.trim_end_matches("ms\"").parse().ok());
    (dur, slice)
}

#[test]
fn a_hanging_provider_is_cut_off_inside_the_request_timeout_and_frees_everything() {
    let _serial = exclusive();
    let provider = provider(&["--hang-rate", "1"]);
    let serve = Serve::start(&[
        "--provider-url",
        &provider.url,
        "--request-timeout",
        "1s",
        "--provider-timeout",
        "500ms",
        "--acquire-timeout",
        "100ms",
        "--write-timeout",
        "100ms",
        "--workers",
        "1",
        "--pool-size",
        "1",
    ]);
    let r = pay(serve.url(), "hang-1", &body(100));
    assert_eq!(r.status, 504, "{}", r.body);
    assert_eq!(r.body["code"], "deadline-exceeded");
    assert_eq!(r.body["step"], "provider");
    assert_eq!(r.body["payment"]["status"], "pending");
    assert!(r.elapsed < Duration::from_millis(1200), "{:?}", r.elapsed);
    // The only worker and the only pooled connection are free again at once.
    set_faults(&provider, r#"{"hang_rate":0}"#);
    let next = pay(serve.url(), "hang-2", &body(100));
    assert_eq!(next.status, 201, "{}", next.body);
    assert!(
        next.elapsed < Duration::from_millis(500),
        "{:?}",
        next.elapsed
    );
}

#[test]
fn a_client_budget_of_300ms_ends_a_slow_payment_in_about_300ms() {
    let _serial = exclusive();
    let provider = provider(&["--latency", "500ms"]);
    let serve = Serve::start(&["--provider-url", &provider.url]);
    let r = pay_with(
        serve.url(),
        "short-1",
        &body(100),
        &[("Request-Timeout-Ms", "300")],
    );
    assert_eq!(r.status, 504, "{}", r.body);
    assert_eq!(r.body["step"], "provider");
    assert!(
        r.elapsed >= Duration::from_millis(200) && r.elapsed < Duration::from_millis(450),
        "{:?}",
        r.elapsed
    );
    let (_, slice) = timing(&r, "provider");
    let slice = slice.expect("the provider step names its slice");
    assert!(
        (200.0..=300.0).contains(&slice),
        "provider slice {slice} ms"
    );
    let bad = pay_with(
        serve.url(),
        "short-2",
        &body(100),
        &[("Request-Timeout-Ms", "soon")],
    );
    assert_eq!(bad.status, 400);
}

#[test]
fn time_spent_queued_shows_in_server_timing_and_shrinks_the_provider_slice() {
    let _serial = exclusive();
    let provider = provider(&["--latency", "400ms"]);
    let serve = Serve::start(&[
        "--provider-url",
        &provider.url,
        "--workers",
        "1",
        "--request-timeout",
        "1s",
        "--provider-timeout",
        "900ms",
        "--acquire-timeout",
        "20ms",
        "--write-timeout",
        "20ms",
    ]);
    let start = Arc::new(Barrier::new(2));
    let handles: Vec<_> = (0..2)
        .map(|i| {
            let url = serve.url().to_string();
            let start = start.clone();
            thread::spawn(move || {
                start.wait();
                if i == 1 {
                    // Arrive second.
                    thread::sleep(Duration::from_millis(50));
                }
                pay(&url, &format!("queued-{i}"), &body(100))
            })
        })
        .collect();
    let rs: Vec<Resp> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    for r in &rs {
        assert_eq!(r.status, 201, "{}", r.body);
    }
    let (q0, _) = timing(&rs[0], "queue");
    let (q1, _) = timing(&rs[1], "queue");
    let (_, s0) = timing(&rs[0], "provider");
    let (_, s1) = timing(&rs[1], "provider");
    let (s0, s1) = (s0.unwrap(), s1.unwrap());
    assert!(q0 < 50.0, "the first did not wait: {q0}");
    assert!(q1 > 300.0, "the second waited for the first: {q1}");
    assert_eq!(s0, 900.0, "the first gets the configured provider timeout");
    // The second's slice is what its budget had left: 1000 − queue − earlier steps − the
    // persist minimum (4 ms).
    assert!(
        s1 < 1000.0 - q1 && s1 > 1000.0 - q1 - 60.0,
        "slice {s1} after queueing {q1} ms"
    );
}
