//! Idempotency under retries, races, ambiguous provider answers and kill -9.

use std::thread;
use std::time::Duration;

use crate::helpers::*;

#[test]
fn fifty_concurrent_requests_with_one_key_make_one_charge() {
    let _serial = exclusive();
    let provider = provider(&["--latency", "200ms"]);
    let serve = Serve::start(&[
        "--provider-url",
        &provider.url,
        "--rate-limit",
        "10000/s",
        "--queue",
        "128",
    ]);
    let mut ids = Vec::new();
    for r in concurrently(50, |_| pay(serve.url(), "one-key", &body(4200))) {
        match r.status {
            201 => ids.push(r.body["id"].as_str().unwrap().to_string()),
            409 => {
                assert_eq!(r.body["code"], "idempotency-key-in-use");
                assert_eq!(r.header("Retry-After"), Some("1"));
            }
            other => panic!("{other}: {}", r.body),
        }
    }
    assert!(!ids.is_empty());
    ids.dedup();
    assert_eq!(ids.len(), 1, "every 201 is the same payment");
    assert_eq!(provider_stats(&provider.url)["charges"], 1);
    assert_eq!(serve.rows().len(), 1);
}

#[test]
fn a_reused_key_is_422_and_keys_are_scoped_to_their_api_key() {
    let serve = Serve::start(&["--api-key", "sk_a", "--api-key", "sk_b"]);
    let first = pay_as(serve.url(), "sk_a", "shared", &body(100));
    assert_eq!(first.status, 201);
    let changed = pay_as(serve.url(), "sk_a", "shared", &body(200));
    assert_eq!(changed.status, 422);
    assert_eq!(changed.body["code"], "idempotency-key-reused");
    let id = first.body["id"].as_str().unwrap();
    let original = agent()
        .get(format!("{}/payments/{id}", serve.url()))
        .header("Authorization", "Bearer sk_a")
        .call()
        .unwrap()
        .body_mut()
        .read_json::<serde_json::Value>()
        .unwrap();
    assert_eq!(original["amount"], 100, "the original is unchanged");

    let other = pay_as(serve.url(), "sk_b", "shared", &body(200));
    assert_eq!(other.status, 201, "B's key of the same name is its own");
    assert!(other.header("Idempotent-Replayed").is_none());
    assert_ne!(other.body["id"], first.body["id"]);
    let peek = agent()
        .get(format!("{}/payments/{id}", serve.url()))
        .header("Authorization", "Bearer sk_b")
        .call()
        .unwrap();
    assert_eq!(peek.status().as_u16(), 404);
}

#[test]
fn an_ambiguous_answer_is_pending_and_settles_by_retry_or_by_the_reconciler() {
    let provider = provider(&["--ambiguous-rate", "1", "--seed", "3"]);
    let serve = Serve::start(&[
        "--provider-url",
        &provider.url,
        "--provider-timeout",
        "300ms",
    ]);
    let a = pay(serve.url(), "amb-1", &body(100));
    let b = pay(serve.url(), "amb-2", &body(100));
    for r in [&a, &b] {
        assert!(
            r.status == 502 || r.status == 504,
            "{}: {}",
            r.status,
            r.body
        );
        assert_eq!(r.body["payment"]["status"], "pending");
    }
    assert_eq!(
        provider_stats(&provider.url)["charges"],
        2,
        "the provider charged both"
    );
    set_faults(&provider, r#"{"ambiguous_rate":0}"#);

    // The retry resumes the same payment; the provider deduplicates.
    let retry = pay(serve.url(), "amb-1", &body(100));
    assert_eq!(retry.status, 201, "{}", retry.body);
    assert_eq!(retry.body["id"], a.body["payment"]["id"]);

    // Without a retry, the reconciler asks the provider and settles it.
    let id = b.body["payment"]["id"].as_str().unwrap().to_string();
    let settled = eventually(
        Duration::from_secs(8),
        "the reconciler settles amb-2",
        || {
            let p = get(&format!("{}/payments/{id}", serve.url()));
            (p.body["status"] == "succeeded").then_some(p)
        },
    );
    assert!(
        settled.body["provider_charge_id"]
            .as_str()
            .unwrap()
            .starts_with("ch_")
    );
    // A later retry replays what the reconciler stored.
    let replay = pay(serve.url(), "amb-2", &body(100));
    assert_eq!(replay.status, 201);
    assert_eq!(replay.header("Idempotent-Replayed"), Some("true"));
    assert_eq!(replay.body["id"], id.as_str());
    assert_eq!(
        provider_stats(&provider.url)["charges"],
        2,
        "no charge was made twice"
    );
}

#[test]
fn kill_9_during_twenty_provider_calls_loses_nothing_and_charges_nothing_twice() {
    let _serial = exclusive();
    let provider = provider(&["--latency", "1s"]);
    let args = [
        "--provider-url",
        &provider.url,
        "--rate-limit",
        "10000/s",
        "--provider-timeout",
        "2s",
        "--request-timeout",
        "4s",
        // The provider is slow on purpose here: slow calls must not open the breaker.
        "--breaker-slow-call",
        "5s",
    ];
    let serve = Serve::start(&args);
    let url = serve.url().to_string();
    // Two payments answered before the crash.
    let before: Vec<Resp> = (0..2)
        .map(|i| pay(&url, &format!("pre-{i}"), &body(100)))
        .collect();
    for r in &before {
        assert_eq!(r.status, 201);
    }
    let inflight: Vec<_> = (0..20)
        .map(|i| {
            let url = url.clone();
            thread::spawn(move || {
                // The server dies under this request; the error is expected.
                let _ = agent()
                    .post(format!("{url}/payments"))
                    .header("Authorization", format!("Bearer {KEY}"))
                    .header("Idempotency-Key", format!("crash-{i}"))
                    .header("Content-Type", "application/json")
                    // As nginx sends upstream: tiny_http frees the connection's thread at
                    // parse time, so the 20 do not queue behind each other (README limits).
                    .header("Connection", "close")
                    .send(body(100).as_bytes());
            })
        })
        .collect();
    // Most of the 20 are inside the provider's one-second call (on a loaded machine a few may
    // have been shed before claiming: their retries below simply make them).
    eventually(
        Duration::from_secs(10),
        "calls are inside the provider",
        || (provider_stats(&provider.url)["requests"].as_u64() >= Some(14)).then_some(()),
    );
    let dir = serve.kill9();
    for h in inflight {
        h.join().unwrap();
    }

    // Restarted as it ran: on the defaults (a 1 s provider timeout, 500 ms slow calls) the
    // retries' one-second calls would time out and open the breaker.
    let serve = Serve::start_in(dir, &args);
    for i in 0..20 {
        let key = format!("crash-{i}");
        let r = eventually(Duration::from_secs(15), "the retry is answered 201", || {
            let r = pay(serve.url(), &key, &body(100));
            match r.status {
                201 => Some(r),
                // The dead request's lock has not gone stale yet, or this attempt ran out of
                // time: a client retries both with the same key.
                409 | 502 | 504 => None,
                other => panic!("{key}: {other}: {}", r.body),
            }
        });
        assert_eq!(r.body["status"], "succeeded");
    }
    for r in &before {
        let id = r.body["id"].as_str().unwrap();
        assert_eq!(
            get(&format!("{}/payments/{id}", serve.url())).body["status"],
            "succeeded"
        );
    }
    assert_eq!(provider_stats(&provider.url)["charges"], 22);
    let rows = serve.rows();
    assert_eq!(rows.len(), 22);
    assert!(rows.iter().all(|(_, s)| s == "succeeded"), "{rows:?}");
    assert_eq!(serve.integrity(), "ok");
}

#[test]
fn a_thousand_random_requests_with_reuse_and_faults_keep_the_invariants() {
    let _serial = exclusive();
    let provider = provider(&[
        "--fail-rate",
        "0.05",
        "--ambiguous-rate",
        "0.05",
        "--hang-rate",
        "0.02",
        "--seed",
        "42",
    ]);
    let serve = Serve::start(&[
        "--provider-url",
        &provider.url,
        "--provider-timeout",
        "200ms",
        "--sync",
        "normal",
        "--rate-limit",
        "100000/s",
        "--breaker-min-calls",
        "20",
        "--breaker-failure-rate",
        "100%",
    ]);
    let (first_amount, all) = random_payments(&[serve.url().to_string()], 8, 125, 1000);
    assert_eq!(all.len(), 1000);
    let created = check_random_answers(&first_amount, &all);
    // Let the reconciler settle what the faults left pending.
    let rows = eventually(
        Duration::from_secs(20),
        "no payment is left unsettled",
        || {
            let rows = serve.rows();
            rows.iter()
                .all(|(_, s)| s != "pending" && s != "processing")
                .then_some(rows)
        },
    );
    let succeeded = assert_created_are_stored(&rows, &created) as u64;
    let stats = provider_stats(&provider.url);
    assert_eq!(
        stats["charges"].as_u64(),
        Some(succeeded),
        "provider charges == succeeded payments"
    );
    assert!(stats["charges"].as_u64().unwrap() > 700, "{stats}");
}

#[test]
fn a_finished_key_expires_after_the_ttl_but_its_payment_stays() {
    let serve = Serve::start(&["--idempotency-ttl", "1s"]);
    let first = pay(serve.url(), "ttl-1", &body(100));
    assert_eq!(first.status, 201);
    assert_eq!(
        pay(serve.url(), "ttl-1", &body(100)).header("Idempotent-Replayed"),
        Some("true")
    );
    // Once swept, the same key is a new payment (a new charge), and the old payment remains.
    // A 503 `overloaded` is retried as a client would: on a busy machine the writer can be
    // held past the acquire slice (a sweep's commit waiting on the disk), and a shed write did
    // nothing.
    let again = eventually(Duration::from_secs(10), "the key is swept", || {
        let r = pay(serve.url(), "ttl-1", &body(100));
        (r.header("Idempotent-Replayed").is_none() && r.status != 503).then_some(r)
    });
    assert_eq!(again.status, 201);
    assert_ne!(again.body["id"], first.body["id"]);
    assert_eq!(serve.rows().len(), 2, "payments are never deleted");
    assert_eq!(provider_stats(&serve.provider_url)["charges"], 2);
}

#[test]
fn the_lock_belongs_to_the_attempt_not_to_the_clients_request_id() {
    let provider = provider(&["--latency", "500ms"]);
    let serve = Serve::start(&["--provider-url", &provider.url]);
    let same_id = [("X-Request-Id", "client-chosen-id")];

    // Two requests with one key and one X-Request-Id, at once: one charges, one waits its turn.
    let rs = concurrently(2, |_| {
        pay_with(serve.url(), "same-id", &body(100), &same_id)
    });
    let mut statuses: Vec<u16> = rs.iter().map(|r| r.status).collect();
    statuses.sort();
    assert_eq!(statuses, [201, 409], "{rs:?}");
    for r in &rs {
        assert_eq!(r.header("X-Request-Id"), Some("client-chosen-id"));
    }
    assert_eq!(provider_stats(&provider.url)["charges"], 1);

    // While a request holds a key, its lock token is the server's, not the client's id.
    thread::scope(|s| {
        let first = s.spawn(|| pay_with(serve.url(), "token-key", &body(100), &same_id));
        let token = eventually(Duration::from_secs(5), "the key is claimed", || {
            serve
                .db()
                .query_row(
                    "SELECT lock_token FROM idempotency_keys WHERE key = 'token-key'",
                    [],
                    |r| r.get::<_, Option<String>>(0),
                )
                .ok()
                .flatten()
        });
        assert_ne!(token, "client-chosen-id");
        assert!(token.len() >= 32, "{token}");
        assert_eq!(first.join().unwrap().status, 201);
    });
}
