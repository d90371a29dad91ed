//! Auth, rate limit and the access log, as a client and an operator see them.

use std::time::Duration;

use crate::helpers::*;

#[test]
fn over_the_rate_is_429_with_retry_after_and_the_ratelimit_headers() {
    let serve = Serve::start(&["--rate-limit", "5/s"]);
    let url = format!("{}/payments", serve.url());
    let mut statuses = Vec::new();
    let mut last = None;
    for _ in 0..8 {
        let r = get(&url);
        statuses.push(r.status);
        last = Some(r);
    }
    assert_eq!(statuses[..5], [200; 5], "{statuses:?}");
    assert!(statuses[5..].iter().all(|s| *s == 429), "{statuses:?}");
    let r = last.unwrap();
    assert_eq!(r.body["code"], "rate-limited");
    assert_eq!(r.header("Retry-After"), Some("1"));
    assert_eq!(r.header("RateLimit-Policy"), Some("\"default\";q=5;w=1"));
    assert_eq!(r.header("RateLimit"), Some("\"default\";r=0;t=1"));
    // The bucket refills: a request a little later goes through and says what is left.
    let ok = eventually(Duration::from_secs(3), "a token comes back", || {
        let r = get(&url);
        (r.status == 200).then_some(r)
    });
    assert!(
        ok.header("RateLimit")
            .unwrap()
            .starts_with("\"default\";r=")
    );
    // Unauthenticated endpoints carry no rate-limit headers.
    let h = agent()
        .get(format!("{}/healthz", serve.url()))
        .call()
        .unwrap();
    assert!(h.headers().get("RateLimit").is_none());
}

#[test]
fn wrong_keys_are_401_and_no_key_ever_reaches_the_log() {
    let mut serve = Serve::start(&["--api-key", "sk_live_secret_1", "--log-format", "json"]);
    for key in ["sk_live_secret_1", "sk_wrong_guess_9"] {
        let _ = agent()
            .post(format!("{}/payments", serve.url()))
            .header("Authorization", format!("Bearer {key}"))
            .header("Idempotency-Key", "log-1")
            .header("Content-Type", "application/json")
            .send(body(100).as_bytes())
            .unwrap();
    }
    let wrong = agent()
        .get(format!("{}/payments", serve.url()))
        .header("Authorization", "Bearer sk_wrong_guess_9")
        .call()
        .unwrap();
    assert_eq!(wrong.status().as_u16(), 401);
    assert_eq!(wrong.headers().get("WWW-Authenticate").unwrap(), "Bearer");
    // The access-log line is written after the response: wait for both lines.
    serve
        .proc
        .wait_for_log("\"status\":401", Duration::from_secs(5));
    serve
        .proc
        .wait_for_log("\"status\":201", Duration::from_secs(5));
    let log = serve.proc.log_text();
    assert!(
        !log.contains("sk_live_secret_1") && !log.contains("sk_wrong_guess_9"),
        "{log}"
    );
    // The JSON access log is one object a line with every step.
    let line = log
        .lines()
        .find(|l| l.contains("\"target\":\"access\"") && l.contains("\"status\":201"))
        .unwrap_or_else(|| panic!("no JSON access line for the payment:\n{log}"));
    let v: serde_json::Value = serde_json::from_str(line).unwrap();
    for field in [
        "request_id",
        "total_ms",
        "queue_ms",
        "acquire_ms",
        "claim_ms",
        "provider_ms",
        "persist_ms",
    ] {
        assert!(v.get(field).is_some(), "{field} missing in {line}");
    }
    assert_eq!(v["idempotency"], "new");
}

#[test]
fn the_chain_runs_request_id_access_log_auth_rate_limit_deadline_in_that_order() {
    let mut serve = Serve::start(&["--rate-limit", "1/m", "--api-key", "sk_order"]);
    let call = |key: &str, id: &str| {
        let mut r = agent()
            .get(format!("{}/payments", serve.url()))
            .header("Authorization", format!("Bearer {key}"))
            .header("Request-Timeout-Ms", "not-a-number")
            .header("X-Request-Id", id)
            .call()
            .unwrap();
        let echoed = r
            .headers()
            .get("X-Request-Id")
            .unwrap()
            .to_str()
            .unwrap()
            .to_string();
        let body: serde_json::Value = r.body_mut().read_json().unwrap();
        (r.status().as_u16(), echoed, body)
    };
    // Auth before rate limit and deadline: a wrong key is 401 and spends no token.
    let (status, echoed, _) = call("sk_wrong", "order-1");
    assert_eq!(
        (status, echoed.as_str()),
        (401, "order-1"),
        "request id first, then auth"
    );
    // Rate limit before deadline: the one token of the minute is spent on the bad header (400)…
    let (status, _, body) = call("sk_order", "order-2");
    assert_eq!(status, 400, "{body}");
    assert!(
        body["detail"]
            .as_str()
            .unwrap()
            .contains("Request-Timeout-Ms")
    );
    // …and the next request is refused by the rate limit before its header is looked at.
    let (status, _, body) = call("sk_order", "order-3");
    assert_eq!(status, 429, "{body}");
    // The access log wraps them all, with the request id.
    for id in ["order-1", "order-2", "order-3"] {
        serve
            .proc
            .wait_for_log(&format!("{id} GET /payments"), Duration::from_secs(5));
    }
}
