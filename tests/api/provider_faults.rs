//! What a payment becomes when the provider cannot be reached or answers 5xx.

use std::time::Duration;

use crate::helpers::*;

#[test]
fn an_unreachable_provider_is_a_fast_503_and_a_failed_payment() {
    let dead = dead_addr();
    let serve = Serve::start(&["--provider-url", &format!("http://{dead}")]);
    let r = pay(serve.url(), "down-1", &body(100));
    assert_eq!(r.status, 503, "{}", r.body);
    assert_eq!(r.body["code"], "provider-unavailable");
    assert!(r.header("Retry-After").is_some());
    assert_eq!(r.body["payment"]["status"], "failed");
    assert!(r.elapsed < Duration::from_millis(500), "{:?}", r.elapsed);
    let id = r.body["payment"]["id"].as_str().unwrap().to_string();
    assert_eq!(serve.rows(), vec![(id.clone(), "failed".to_string())]);

    // The key stays retryable: the retry reuses the same payment.
    let again = pay(serve.url(), "down-1", &body(100));
    assert_eq!(again.status, 503);
    assert!(again.header("Idempotent-Replayed").is_none());
    assert_eq!(again.body["payment"]["id"], id.as_str());
}

#[test]
fn a_provider_5xx_is_a_502_with_a_pending_payment_that_a_retry_completes() {
    let provider = provider(&["--fail-rate", "1"]);
    let serve = Serve::start(&["--provider-url", &provider.url]);
    let r = pay(serve.url(), "flaky-1", &body(100));
    assert_eq!(r.status, 502, "{}", r.body);
    assert_eq!(r.body["code"], "provider-error");
    assert_eq!(r.body["payment"]["status"], "pending");
    let id = r.body["payment"]["id"].as_str().unwrap().to_string();

    let faults = agent()
        .put(format!("{}/_control/faults", provider.url))
        .send(r#"{"fail_rate":0}"#.as_bytes())
        .unwrap();
    assert_eq!(faults.status().as_u16(), 200);
    let retry = pay(serve.url(), "flaky-1", &body(100));
    assert_eq!(retry.status, 201, "{}", retry.body);
    assert_eq!(retry.body["id"], id.as_str());
    assert_eq!(provider_stats(&provider.url)["charges"], 1);
}

/// The simulated provider runs inside `serve` by default: a request declaring an absurd body
/// must not take the process down with it.
#[test]
fn an_absurd_content_length_to_the_simulated_provider_does_not_kill_it() {
    let provider = provider(&[]);
    let addr: std::net::SocketAddr = provider.url.trim_start_matches("http://").parse().unwrap();
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    std::io::Write::write_all(
        &mut s,
        b"GET /nope HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999999999\r\n\r\n",
    )
    .unwrap();
    drop(s);
    // Its stats still answer, well after the request was dropped on the client's side.
    for _ in 0..5 {
        assert!(provider_stats(&provider.url)["requests"].is_u64());
    }
}
