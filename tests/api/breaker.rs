//! The circuit breaker around the provider, against a provider that fails on command.

use std::time::{Duration, Instant};

use crate::helpers::*;

fn server_total_ms(r: &Resp) -> f64 {
    let timing = r.header("Server-Timing").unwrap();
    paytrace::server_timing::dur_of(timing, "total")
        .unwrap_or_else(|| panic!("no total in {timing}"))
}

fn requests(provider: &Proc) -> u64 {
    provider_stats(&provider.url)["requests"].as_u64().unwrap()
}

#[test]
fn a_failing_provider_opens_the_breaker_then_trial_calls_close_it() {
    let _serial = exclusive();
    let provider = provider(&["--fail-rate", "1", "--seed", "7"]);
    let mut serve = Serve::start(&[
        "--provider-url",
        &provider.url,
        "--breaker-open",
        "1s",
        "--rate-limit",
        "10000/s",
        // Room for a machine busy enough that ten payments at once wait a while for the
        // database: only the breaker may refuse them here, not the pool.
        "--acquire-timeout",
        "1s",
        // The ten failed calls leave pending payments, which the reconciler asks the provider
        // about once their locks are stale (request timeout + 1 s); on a slow machine that
        // happened inside this test and its lookups were counted as provider requests.
        "--request-timeout",
        "10s",
        // The breaker is under test, not the disk: a short-circuited payment's two fsync'd
        // commits once took 382 ms together on this project's VM.
        "--sync",
        "normal",
    ]);
    for i in 0..10 {
        let r = pay(serve.url(), &format!("f-{i}"), &body(100));
        assert_eq!(
            r.status, 502,
            "call {i} reaches the failing provider: {}",
            r.body
        );
    }
    serve
        .proc
        .wait_for_log("breaker closed → open", Duration::from_secs(2));
    let opened = Instant::now();
    let before = requests(&provider);
    assert_eq!(before, 10);
    // Up to 50 payments while the breaker is surely still open: on a machine busy enough
    // that 50 payments take longer than the 1 s open period, the rest would be trials.
    let mut sent = 0;
    while sent < 50 && opened.elapsed() < Duration::from_millis(500) {
        let i = sent;
        sent += 1;
        let r = pay(serve.url(), &format!("o-{i}"), &body(100));
        assert_eq!(r.status, 503, "{}", r.body);
        assert_eq!(r.body["code"], "provider-unavailable");
        assert_eq!(r.body["payment"]["status"], "failed");
        let retry: u64 = r.header("Retry-After").unwrap().parse().unwrap();
        assert_eq!(
            retry, 1,
            "the breaker reopens within a second (--breaker-open 1s)"
        );
        // No provider call (the provider's request count below says so): answered within
        // 250 ms of being read off the socket — two commits, on a busy machine — and well
        // within a client's patience including connecting.
        let total = server_total_ms(&r);
        assert!(total < 250.0, "short-circuited in {total} ms");
        assert!(
            r.elapsed < Duration::from_millis(600),
            "client saw {:?}",
            r.elapsed
        );
    }
    assert!(sent > 0, "no payment was sent while the breaker was open");
    assert_eq!(requests(&provider), before, "nothing was sent while open");

    // Faults cleared, slow enough that the trials are in flight together: of 10 payments
    // arriving at once after the open period, only the 3 trial calls reach the provider.
    set_faults(&provider, r#"{"fail_rate":0,"latency_ms":300}"#);
    // The open period is a known timer (1 s from the opening): wait it out, no longer.
    let reopens = opened + Duration::from_millis(1100);
    eventually(Duration::from_secs(3), "the open period is over", || {
        (Instant::now() >= reopens).then_some(())
    });
    let answers: Vec<(u16, String)> = concurrently(10, |i| {
        let r = pay(serve.url(), &format!("trial-{i}"), &body(100));
        (r.status, r.body["code"].as_str().unwrap_or("").to_string())
    });
    let statuses: Vec<u16> = answers.iter().map(|(s, _)| *s).collect();
    let statuses_and_codes = format!("{answers:?}");
    assert_eq!(
        statuses.iter().filter(|s| **s == 201).count(),
        3,
        "{statuses_and_codes}"
    );
    assert_eq!(
        statuses.iter().filter(|s| **s == 503).count(),
        7,
        "{statuses_and_codes}"
    );
    assert_eq!(requests(&provider), before + 3);
    serve
        .proc
        .wait_for_log("breaker half-open → closed", Duration::from_secs(2));
    let r = pay(serve.url(), "after", &body(100));
    assert_eq!(r.status, 201);
}

#[test]
fn a_hanging_provider_times_out_counts_as_failing_and_no_request_outlives_its_budget() {
    let _serial = exclusive();
    let provider = provider(&["--hang-rate", "1"]);
    let mut serve = Serve::start(&[
        "--provider-url",
        &provider.url,
        "--provider-timeout",
        "300ms",
        "--breaker-min-calls",
        "4",
        "--rate-limit",
        "10000/s",
    ]);
    let mut timed_out = 0;
    for r in concurrently(8, |i| pay(serve.url(), &format!("h-{i}"), &body(100))) {
        match r.status {
            504 => {
                assert_eq!(r.body["step"], "provider");
                timed_out += 1;
            }
            // A call that started after four had failed finds the breaker open.
            503 => assert_eq!(r.body["code"], "provider-unavailable"),
            other => panic!("{other}: {}", r.body),
        }
        assert!(r.elapsed < Duration::from_millis(3000), "{:?}", r.elapsed);
    }
    assert!(timed_out >= 4, "{timed_out} calls timed out");
    serve
        .proc
        .wait_for_log("breaker closed → open", Duration::from_secs(2));
    let r = pay(serve.url(), "h-after", &body(100));
    assert_eq!(r.status, 503);
    assert!(
        server_total_ms(&r) < 20.0,
        "{:?}",
        r.header("Server-Timing")
    );
    assert!(r.elapsed < Duration::from_millis(100), "{:?}", r.elapsed);
}
