use crate::helpers::*;

#[test]
fn a_payment_is_charged_once_and_its_retry_replays_the_same_payment() {
    let serve = Serve::start(&[]);
    let first = pay(serve.url(), "order-1", &body(1999));
    assert_eq!(first.status, 201, "{:?}", first.body);
    let p = &first.body;
    let id = p["id"].as_str().unwrap().to_string();
    assert!(id.starts_with("pay_") && id.len() >= 4 + 24, "{id}");
    assert_eq!(p["object"], "payment");
    assert_eq!(p["status"], "succeeded");
    assert_eq!(p["amount"], 1999);
    assert_eq!(p["currency"], "usd");
    assert!(p["provider_charge_id"].as_str().unwrap().starts_with("ch_"));
    assert_eq!(
        first.header("Location"),
        Some(format!("/payments/{id}").as_str())
    );
    assert!(first.header("Idempotent-Replayed").is_none());
    assert!(first.header("X-Request-Id").is_some());
    let timing = first.header("Server-Timing").unwrap();
    for step in ["queue", "acquire", "claim", "provider", "persist", "total"] {
        assert!(timing.contains(&format!("{step};dur=")), "{timing}");
    }

    let fetched = get(&format!("{}/payments/{id}", serve.url()));
    assert_eq!(fetched.status, 200);
    assert_eq!(fetched.body, first.body);
    assert_eq!(provider_stats(&serve.provider_url)["charges"], 1);

    let again = pay(serve.url(), "order-1", &body(1999));
    assert_eq!(again.status, 201);
    assert_eq!(again.body, first.body);
    assert_eq!(again.header("Idempotent-Replayed"), Some("true"));
    assert_eq!(again.header("Location"), first.header("Location"));
    assert_ne!(again.header("X-Request-Id"), first.header("X-Request-Id"));
    assert_eq!(provider_stats(&serve.provider_url)["charges"], 1);
    assert_eq!(serve.rows(), vec![(id, "succeeded".to_string())]);
}

#[test]
fn a_declined_card_is_a_stored_402_with_the_payment() {
    let serve = Serve::start(&[]);
    let b = r#"{"amount":500,"currency":"eur","source":"tok_chargeDeclined"}"#;
    let r = pay(serve.url(), "declined-1", b);
    assert_eq!(r.status, 402);
    assert_eq!(r.body["code"], "card-declined");
    assert_eq!(r.body["payment"]["status"], "declined");
    assert_eq!(r.body["payment"]["failure_code"], "card_declined");
    let again = pay(serve.url(), "declined-1", b);
    assert_eq!(again.status, 402);
    assert_eq!(again.header("Idempotent-Replayed"), Some("true"));
    assert_eq!(again.body, r.body);
    let stats = provider_stats(&serve.provider_url);
    assert_eq!(
        (stats["charges"].as_u64(), stats["declined"].as_u64()),
        (Some(1), Some(1))
    );
}

#[test]
fn payments_list_newest_first_in_pages_and_only_for_their_owner() {
    let serve = Serve::start(&["--api-key", "sk_a", "--api-key", "sk_b"]);
    let pay_as = |api: &str, key: &str| {
        let r = agent()
            .post(format!("{}/payments", serve.url()))
            .header("Authorization", format!("Bearer {api}"))
            .header("Idempotency-Key", key)
            .header("Content-Type", "application/json")
            .send(body(100).as_bytes())
            .unwrap();
        assert_eq!(r.status().as_u16(), 201);
    };
    for i in 0..3 {
        pay_as("sk_a", &format!("k{i}"));
    }
    pay_as("sk_b", "k0");
    let list = |api: &str, q: &str| -> serde_json::Value {
        agent()
            .get(format!("{}/payments{q}", serve.url()))
            .header("Authorization", format!("Bearer {api}"))
            .call()
            .unwrap()
            .body_mut()
            .read_json()
            .unwrap()
    };
    let page = list("sk_a", "?limit=2");
    assert_eq!(page["object"], "list");
    assert_eq!(page["data"].as_array().unwrap().len(), 2);
    assert_eq!(page["has_more"], true);
    let last = page["data"][1]["id"].as_str().unwrap();
    let rest = list("sk_a", &format!("?limit=2&starting_after={last}"));
    assert_eq!(rest["data"].as_array().unwrap().len(), 1);
    assert_eq!(rest["has_more"], false);
    assert_eq!(list("sk_b", "")["data"].as_array().unwrap().len(), 1);

    // B cannot read A's payment: 404, as if it did not exist.
    let status = agent()
        .get(format!("{}/payments/{last}", serve.url()))
        .header("Authorization", "Bearer sk_b")
        .call()
        .unwrap()
        .status()
        .as_u16();
    assert_eq!(status, 404);
    let dev = get(&format!("{}/payments", serve.url()));
    assert_eq!(
        dev.status, 401,
        "the dev key is not accepted when keys are configured"
    );
}

#[test]
fn the_list_limit_is_1_to_100_and_anything_else_is_a_400_naming_limit() {
    let serve = Serve::start(&[]);
    // Twelve payments: more than the default page of 10, so `limit=100` shows it is applied.
    for i in 0..12 {
        assert_eq!(
            pay(serve.url(), &format!("lim-{i}"), &body(100)).status,
            201
        );
    }
    let list = |q: &str| get(&format!("{}/payments?{q}", serve.url()));
    for q in ["limit=0", "limit=101", "limit=abc", "limit=-1", "limit="] {
        let r = list(q);
        assert_eq!(r.status, 400, "{q}: {}", r.body);
        assert_eq!(r.body["code"], "invalid-request", "{q}");
        assert_eq!(r.body["errors"][0]["field"], "limit", "{q}: {}", r.body);
    }
    let page = |q: &str| {
        let r = list(q);
        assert_eq!(r.status, 200, "{q}: {}", r.body);
        (
            r.body["data"].as_array().unwrap().len(),
            r.body["has_more"].clone(),
        )
    };
    assert_eq!(page("limit=1"), (1, serde_json::json!(true)));
    assert_eq!(page("limit=100"), (12, serde_json::json!(false)));
    assert_eq!(page(""), (10, serde_json::json!(true)), "the default is 10");
}

#[test]
fn health_and_readiness_answer_without_auth() {
    let serve = Serve::start(&[]);
    let h = agent()
        .get(format!("{}/healthz", serve.url()))
        .call()
        .unwrap();
    assert_eq!(h.status().as_u16(), 200);
    let r = agent()
        .get(format!("{}/readyz", serve.url()))
        .call()
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
}

#[test]
fn a_request_id_from_the_client_is_echoed_and_an_insane_one_replaced() {
    let serve = Serve::start(&[]);
    let r = agent()
        .get(format!("{}/healthz", serve.url()))
        .header("X-Request-Id", "trace-abc-123")
        .call()
        .unwrap();
    assert_eq!(r.headers().get("X-Request-Id").unwrap(), "trace-abc-123");
    let long = "x".repeat(200);
    let r = agent()
        .get(format!("{}/healthz", serve.url()))
        .header("X-Request-Id", long.as_str())
        .call()
        .unwrap();
    let id = r.headers().get("X-Request-Id").unwrap().to_str().unwrap();
    assert!(id.starts_with("req_"), "{id}");
    assert!(
        r.headers()
            .get("Server-Timing")
            .unwrap()
            .to_str()
            .unwrap()
            .contains("total;dur=")
    );
}

#[test]
fn a_bad_configuration_exits_2_naming_the_numbers() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_paytrace"))
        .args([
            "serve",
            "--addr",
            "127.0.0.1:0",
            "--request-timeout",
            "1s",
            "--provider-timeout",
            "1s",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("request-timeout 1000ms") && err.contains("provider-timeout 1000ms"),
        "{err}"
    );
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_paytrace"))
        .args(["serve", "--workers", "lots"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}
