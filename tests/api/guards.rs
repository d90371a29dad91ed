//! Unit 01's guards: every bad request gets a clear problem+json answer and costs nothing.

use std::io::Write;
use std::net::TcpStream;
use std::time::{Duration, Instant};

use crate::helpers::*;

fn payment_head(content_length: usize) -> String {
    format!(
        "POST /payments HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\nIdempotency-Key: g1\r\n\
         Content-Type: application/json\r\nContent-Length: {content_length}\r\n\r\n"
    )
}

#[test]
fn a_body_over_the_limit_is_refused_from_its_content_length_without_reading_it() {
    let serve = Serve::start(&[]);
    // The 17 KiB body is declared and never sent: a server that read it would wait.
    let t = Instant::now();
    let mut s = TcpStream::connect(serve.proc.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(payment_head(17 * 1024).as_bytes()).unwrap();
    let (status, text) = read_response(&mut s);
    assert_eq!(status, 413, "{text}");
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    assert!(
        text.contains("application/problem+json") && text.contains("body-too-large"),
        "{text}"
    );
    assert!(serve.rows().is_empty());
}

/// The declared length is the first thing judged: no key, a wrong key, no Idempotency-Key or
/// a wrong media type do not change a 413 into a 401, 400 or 415.
#[test]
fn a_declared_body_over_the_limit_is_413_before_any_other_check() {
    let serve = Serve::start(&[]);
    let heads = [
        "POST /payments HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n".to_string(),
        "POST /payments HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer wrong\r\n".to_string(),
        format!("POST /payments HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"),
        format!(
            "POST /payments HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n\
             Idempotency-Key: g2\r\nContent-Type: text/plain\r\n"
        ),
    ];
    for head in heads {
        let mut s = TcpStream::connect(serve.proc.addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(format!("{head}Content-Length: {}\r\n\r\n", 17 * 1024).as_bytes())
            .unwrap();
        let (status, text) = read_response(&mut s);
        assert_eq!(status, 413, "{head}: {text}");
        assert!(text.contains("body-too-large"), "{text}");
    }
    assert!(serve.rows().is_empty());
}

#[test]
fn a_chunked_body_over_the_limit_is_refused_by_counting() {
    let serve = Serve::start(&["--max-body", "1KiB"]);
    let mut req = "POST /payments HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer sk_test_paytrace\r\n\
                   Idempotency-Key: c1\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
        .to_string();
    for _ in 0..3 {
        req.push_str(&format!("200\r\n{}\r\n", "a".repeat(0x200)));
    }
    req.push_str("0\r\n\r\n");
    let (status, text) = raw(serve.proc.addr, req.as_bytes(), Duration::from_secs(10));
    assert_eq!(status, 413, "{text}");
}

#[test]
fn malformed_json_is_a_400_that_says_so() {
    let serve = Serve::start(&[]);
    let r = pay(serve.url(), "m1", r#"{"amount": 12,"#);
    assert_eq!(r.status, 400);
    assert_eq!(r.header("Content-Type"), Some("application/problem+json"));
    assert_eq!(r.body["code"], "invalid-request");
    assert_eq!(r.body["type"], "/problems/invalid-request");
    assert!(
        r.body["detail"]
            .as_str()
            .unwrap()
            .contains("not valid JSON"),
        "{}",
        r.body
    );
    assert!(r.body["request_id"].as_str().is_some());
}

#[test]
fn a_field_out_of_range_is_a_400_naming_the_field() {
    let serve = Serve::start(&[]);
    let r = pay(
        serve.url(),
        "f1",
        r#"{"amount":0,"currency":"usd","source":"tok_visa"}"#,
    );
    assert_eq!(r.status, 400);
    assert_eq!(r.body["errors"][0]["field"], "amount");
    let r = pay(
        serve.url(),
        "f2",
        r#"{"amount":5,"currency":"usd","source":"tok_visa","extra":1}"#,
    );
    assert_eq!(r.status, 400);
    assert_eq!(r.body["errors"][0]["field"], "extra");
    // Nothing reached the provider or the database.
    assert_eq!(provider_stats(&serve.provider_url)["requests"], 0);
    assert!(serve.rows().is_empty());
}

#[test]
fn a_non_json_body_is_415() {
    let serve = Serve::start(&[]);
    let r = pay_with(
        serve.url(),
        "t1",
        "amount=5",
        &[("Content-Type", "text/plain")],
    );
    assert_eq!(r.status, 415);
    assert_eq!(r.body["code"], "unsupported-media-type");
}

#[test]
fn unknown_routes_are_404_and_wrong_methods_405_with_allow() {
    let serve = Serve::start(&[]);
    let r = get(&format!("{}/nowhere", serve.url()));
    assert_eq!(r.status, 404);
    assert_eq!(r.body["code"], "not-found");
    let r = agent()
        .delete(format!("{}/payments", serve.url()))
        .call()
        .unwrap();
    assert_eq!(r.status().as_u16(), 405);
    assert_eq!(r.headers().get("Allow").unwrap(), "GET, POST");
    let r = agent()
        .post(format!("{}/healthz", serve.url()))
        .send_empty()
        .unwrap();
    assert_eq!(r.status().as_u16(), 405);
}

#[test]
fn auth_and_idempotency_key_are_required() {
    let serve = Serve::start(&[]);
    let r = agent()
        .post(format!("{}/payments", serve.url()))
        .header("Authorization", "Bearer sk_wrong")
        .header("Idempotency-Key", "a1")
        .header("Content-Type", "application/json")
        .send(body(5).as_bytes())
        .unwrap();
    assert_eq!(r.status().as_u16(), 401);
    assert_eq!(r.headers().get("WWW-Authenticate").unwrap(), "Bearer");
    let r = agent()
        .post(format!("{}/payments", serve.url()))
        .header("Authorization", format!("Bearer {KEY}"))
        .header("Content-Type", "application/json")
        .send(body(5).as_bytes())
        .unwrap();
    assert_eq!(r.status().as_u16(), 400);
    let text = r.into_body().read_to_string().unwrap();
    assert!(text.contains("idempotency-key-missing"), "{text}");
    let r = pay(serve.url(), &"k".repeat(256), &body(5));
    assert_eq!(r.body["code"], "idempotency-key-invalid");
    // The RFC 8941 quoted form is the same key.
    let a = pay(serve.url(), "\"quoted-1\"", &body(5));
    let b = pay(serve.url(), "quoted-1", &body(5));
    assert_eq!(a.status, 201);
    assert_eq!(b.header("Idempotent-Replayed"), Some("true"));
}

#[test]
fn oversized_request_lines_and_header_blocks_are_refused() {
    let serve = Serve::start(&[]);
    let long = format!("GET /{} HTTP/1.1\r\nHost: x\r\n\r\n", "a".repeat(9000));
    let (status, text) = raw(serve.proc.addr, long.as_bytes(), Duration::from_secs(10));
    assert_eq!(status, 414, "{text}");
    assert!(text.contains("uri-too-long"));
    let mut many = "GET /healthz HTTP/1.1\r\nHost: x\r\n".to_string();
    for i in 0..101 {
        many.push_str(&format!("X-H{i}: v\r\n"));
    }
    many.push_str("\r\n");
    let (status, text) = raw(serve.proc.addr, many.as_bytes(), Duration::from_secs(10));
    assert_eq!(status, 431, "{text}");
    let big = format!(
        "GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
        "b".repeat(17 * 1024)
    );
    let (status, _) = raw(serve.proc.addr, big.as_bytes(), Duration::from_secs(10));
    assert_eq!(status, 431);
}

#[test]
fn a_request_target_that_is_not_ascii_gets_a_400_not_silence() {
    let serve = Serve::start(&[]);
    let (status, text) = raw(
        serve.proc.addr,
        "GET /payments/é HTTP/1.1\r\nHost: x\r\n\r\n".as_bytes(),
        Duration::from_secs(5),
    );
    assert_eq!(status, 400, "{text}");
    assert!(text.contains("visible ASCII"), "{text}");
}

#[test]
fn a_refused_head_request_gets_headers_only() {
    let serve = Serve::start(&[]);
    let mut s = TcpStream::connect(serve.proc.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(b"HEAD /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n")
        .unwrap();
    let mut all = Vec::new();
    let _ = std::io::Read::read_to_end(&mut s, &mut all);
    let text = String::from_utf8_lossy(&all);
    assert!(text.starts_with("HTTP/1.1 400"), "{text}");
    assert!(text.ends_with("\r\n\r\n"), "no body after the head: {text}");
}

/// `--socket-timeout` is the whole head's deadline: a client that stops half-way through it is
/// answered 408 and closed; one that never sent a byte is closed without an answer.
#[test]
fn a_head_that_stops_half_way_gets_a_408_at_the_socket_timeout_and_silence_gets_nothing() {
    let serve = Serve::start(&["--socket-timeout", "500ms"]);
    let mut half = TcpStream::connect(serve.proc.addr).unwrap();
    let mut silent = TcpStream::connect(serve.proc.addr).unwrap();
    let t = Instant::now();
    half.write_all(b"GET /heal").unwrap();
    for s in [&half, &silent] {
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    }
    let (status, text) = read_response(&mut half);
    let waited = t.elapsed();
    assert_eq!(status, 408, "{text}");
    assert!(text.contains("request-timeout"), "{text}");
    assert!(
        waited >= Duration::from_millis(300) && waited < Duration::from_secs(4),
        "answered after {waited:?}"
    );
    assert_eq!(read_until_closed(&mut half), Some(vec![]), "after the 408");
    assert_eq!(
        read_until_closed(&mut silent),
        Some(vec![]),
        "the silent connection, after {:?}",
        t.elapsed()
    );
}

/// What the server still sends before it closes the connection (EOF or reset); `None` if it is
/// still open when the read times out.
fn read_until_closed(s: &mut TcpStream) -> Option<Vec<u8>> {
    let mut rest = Vec::new();
    match std::io::Read::read_to_end(s, &mut rest) {
        Ok(_) => Some(rest),
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => Some(rest),
        Err(_) => None,
    }
}
