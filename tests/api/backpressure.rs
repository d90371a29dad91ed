//! Unit 03 and unit 04: a bounded queue in front of a fixed number of workers, a pool that
//! fails fast, and a connection policy under which no client waits behind another.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

use crate::helpers::*;

#[test]
fn a_full_queue_is_answered_503_at_once_and_only_201s_are_stored() {
    let _serial = exclusive();
    let provider = provider(&["--latency", "500ms"]);
    let serve = Serve::start(&[
        "--workers",
        "2",
        "--queue",
        "2",
        "--provider-url",
        &provider.url,
    ]);
    let url = serve.url().to_string();
    let results = concurrently(20, |i| {
        (format!("bp-{i}"), pay(&url, &format!("bp-{i}"), &body(100)))
    });
    let mut created = Vec::new();
    let mut shed = 0;
    for (key, r) in &results {
        match r.status {
            201 => created.push(r.body["id"].as_str().unwrap().to_string()),
            503 => {
                shed += 1;
                assert_eq!(r.body["code"], "overloaded", "{key}: {}", r.body);
                assert!(r.header("Retry-After").is_some());
                assert!(
                    r.elapsed < Duration::from_millis(100),
                    "{key}: shed after {:?}",
                    r.elapsed
                );
            }
            other => panic!("{key}: unexpected {other}: {}", r.body),
        }
    }
    assert!(
        shed >= 10,
        "only {shed} of 20 were shed with 2 workers and a queue of 2"
    );
    assert!(created.len() >= 2, "{} created", created.len());
    let mut stored: Vec<String> = serve.rows().into_iter().map(|(id, _)| id).collect();
    stored.sort();
    created.sort();
    assert_eq!(
        stored, created,
        "the database holds exactly the payments answered 201"
    );
}

#[test]
fn a_saturated_pool_answers_503_within_the_acquire_timeout() {
    let _serial = exclusive();
    let serve = Serve::start(&[
        "--pool-size",
        "1",
        "--acquire-timeout",
        "100ms",
        "--write-timeout",
        "600ms",
    ]);
    let url = serve.url().to_string();
    let created = pay(&url, "pool-0", &body(100));
    assert_eq!(created.status, 201);
    let id = created.body["id"].as_str().unwrap().to_string();
    // Hold SQLite's write lock from outside: the next payment waits in its busy timeout while
    // holding the pool's only connection, so everyone else waits for the pool.
    let blocker = serve.db();
    blocker.execute_batch("BEGIN IMMEDIATE").unwrap();
    let holder = {
        let url = url.clone();
        thread::spawn(move || pay(&url, "pool-holder", &body(100)))
    };
    // Wait until the holder is inside its transaction (its claim is in progress).
    let poll_url = format!("{url}/payments/{id}");
    eventually(Duration::from_secs(5), "the pool is saturated", || {
        let r = get(&poll_url);
        (r.status == 503).then_some(())
    });
    let results = concurrently(4, |i| {
        if i % 2 == 0 {
            get(&format!("{url}/payments/{id}"))
        } else {
            pay(&url, &format!("pool-{i}"), &body(100))
        }
    });
    for r in &results {
        assert_eq!(r.status, 503, "{}", r.body);
        assert_eq!(r.body["code"], "overloaded");
        assert!(r.header("Retry-After").is_some());
        assert!(
            r.elapsed < Duration::from_millis(100 + 250),
            "answered after {:?}",
            r.elapsed
        );
    }
    blocker.execute_batch("ROLLBACK").unwrap();
    // The holder was waiting inside its write slice (600 ms); the lock came back in time.
    let held = holder.join().unwrap();
    assert_eq!(held.status, 201, "{}", held.body);
    // Once the lock is gone, payments go through again.
    assert_eq!(pay(&url, "pool-after", &body(100)).status, 201);
}

/// A client that keeps its connection open unless the server says `Connection: close`.
struct Client {
    addr: SocketAddr,
    stream: Option<TcpStream>,
}

impl Client {
    fn connect(addr: SocketAddr) -> Client {
        let s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        Client {
            addr,
            stream: Some(s),
        }
    }

    fn send(&mut self, bytes: &[u8]) -> u16 {
        let addr = self.addr;
        let s = self.stream.get_or_insert_with(|| {
            let s = TcpStream::connect(addr).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            s
        });
        s.write_all(bytes).unwrap();
        let (status, text) = read_response(s);
        if text.to_ascii_lowercase().contains("connection: close") || status == 0 {
            self.stream = None;
        }
        status
    }
}

fn payment_bytes(key: &str) -> Vec<u8> {
    let b = body(100);
    format!(
        "POST /payments HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\nIdempotency-Key: {key}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{b}",
        b.len()
    )
    .into_bytes()
}

/// Room for every request of a burst in the queue, no rate limit, and generous database slices:
/// the burst tests are about connections, not about SQLite on a busy CI box.
fn burst_server() -> Serve {
    burst_server_with(&[])
}

fn burst_server_with(extra: &[&str]) -> Serve {
    let mut args = vec![
        "--queue",
        "512",
        "--rate-limit",
        "100000/s",
        "--sync",
        "normal",
        "--request-timeout",
        "5s",
        "--acquire-timeout",
        "1s",
    ];
    args.extend_from_slice(extra);
    Serve::start(&args)
}

#[test]
fn a_hundred_connections_opened_at_once_get_every_answer_within_the_request_timeout() {
    let _serial = exclusive();
    let serve = burst_server();
    let addr = serve.proc.addr;
    let clients: Vec<Client> = (0..100).map(|_| Client::connect(addr)).collect();
    let start = Arc::new(Barrier::new(100));
    let handles: Vec<_> = clients
        .into_iter()
        .enumerate()
        .map(|(c, mut client)| {
            let start = start.clone();
            thread::spawn(move || {
                start.wait();
                (0..5)
                    .map(|i| {
                        let t = Instant::now();
                        let status = client.send(&payment_bytes(&format!("burst-{c}-{i}")));
                        (status, t.elapsed())
                    })
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let mut answered = 0;
    for h in handles {
        for (status, took) in h.join().unwrap() {
            assert_eq!(status, 201);
            assert!(took < Duration::from_secs(5), "a request took {took:?}");
            answered += 1;
        }
    }
    assert_eq!(answered, 500);
    assert_eq!(provider_stats(&serve.provider_url)["charges"], 500);
}

#[test]
fn two_hundred_payments_right_after_start_up_all_succeed() {
    let _serial = exclusive();
    let serve = burst_server();
    let url = serve.url().to_string();
    for r in concurrently(200, |i| pay(&url, &format!("cold-{i}"), &body(100))) {
        assert_eq!(r.status, 201, "{}", r.body);
    }
    assert_eq!(provider_stats(&serve.provider_url)["charges"], 200);
    assert_eq!(serve.rows().len(), 200);
}

/// Sends `GET /healthz` on `s` and says whether the answer kept the connection alive.
fn healthz_kept_alive(s: &mut TcpStream) -> bool {
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let (status, text) = read_response(s);
    assert_eq!(status, 200, "{text}");
    let text = text.to_ascii_lowercase();
    assert!(
        text.contains("connection: keep-alive") != text.contains("connection: close"),
        "one Connection header, keep-alive or close: {text}"
    );
    text.contains("connection: keep-alive")
}

/// No connection is kept forever: its 1,000th answer says `close`, and it is closed.
#[test]
fn a_connection_is_closed_after_its_thousandth_request() {
    let serve = burst_server();
    let mut s = TcpStream::connect(serve.proc.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    for i in 1..1000 {
        assert!(healthz_kept_alive(&mut s), "request {i} is kept alive");
    }
    assert!(!healthz_kept_alive(&mut s), "the 1,000th says close");
    let mut rest = Vec::new();
    assert_eq!(
        s.read_to_end(&mut rest).unwrap(),
        0,
        "and the connection ends"
    );
}

#[test]
fn one_connection_carries_many_requests_and_payments() {
    let serve = burst_server();
    let mut s = TcpStream::connect(serve.proc.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    for _ in 0..20 {
        assert!(healthz_kept_alive(&mut s));
    }
    for i in 0..10 {
        s.write_all(&payment_bytes(&format!("ka-{i}"))).unwrap();
        let (status, text) = read_response(&mut s);
        assert_eq!(status, 201, "{text}");
        assert!(text.contains("Connection: keep-alive"), "{text}");
    }
    assert_eq!(serve.rows().len(), 10);
    // HTTP/1.0 is answered and closed.
    let mut old = TcpStream::connect(serve.proc.addr).unwrap();
    old.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    old.write_all(b"GET /healthz HTTP/1.0\r\n\r\n").unwrap();
    let (status, text) = read_response(&mut old);
    assert_eq!(status, 200);
    assert!(text.contains("Connection: close"), "{text}");
    // `Connection: close` from the client is honoured: answered, then closed.
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let (status, text) = read_response(&mut s);
    assert_eq!(status, 200);
    assert!(text.contains("Connection: close"), "{text}");
    let mut rest = Vec::new();
    assert_eq!(
        s.read_to_end(&mut rest).unwrap(),
        0,
        "closed after the answer"
    );
}

/// The connection policy: idle kept-alive connections hold at most half of `--max-connections`
/// (past half, every answer closes its connection), and when every slot is taken a new client
/// takes the slot of the longest-idle kept connection: idle connections never cost a new client
/// its turn.
#[test]
fn idle_kept_alive_connections_never_take_the_slots_new_clients_need() {
    let _serial = exclusive();
    let serve = burst_server_with(&["--max-connections", "16", "--socket-timeout", "60s"]);
    let addr = serve.proc.addr;
    // Twelve clients, one after another, each keeping its socket open and idle.
    let mut idle = Vec::new();
    let mut kept = 0;
    for _ in 0..12 {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        if healthz_kept_alive(&mut s) {
            kept += 1;
            idle.push(s);
        }
    }
    assert!((1..=8).contains(&kept), "{kept} connections kept alive");
    // Twelve new clients at once, more than the slots the kept ones left free: each is served,
    // none is refused for want of a connection slot.
    let start = Arc::new(Barrier::new(12));
    let burst: Vec<_> = (0..12)
        .map(|i| {
            let start = start.clone();
            thread::spawn(move || {
                let mut s = TcpStream::connect(addr).unwrap();
                s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                start.wait();
                let t = Instant::now();
                s.write_all(&payment_bytes(&format!("slot-{i}"))).unwrap();
                let (status, text) = read_response(&mut s);
                (status, text, t.elapsed())
            })
        })
        .collect();
    for h in burst {
        let (status, text, took) = h.join().unwrap();
        assert_eq!(status, 201, "{text}");
        assert!(took < Duration::from_secs(5), "answered after {took:?}");
    }
    assert_eq!(serve.rows().len(), 12);
    // Each idle one was either closed for a new client or is still kept and answers.
    for s in &mut idle {
        if s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            .is_ok()
        {
            let status = read_response(s).0;
            assert!(status == 200 || status == 0, "{status}");
        }
    }
    // The server still serves new clients (the helper asserts the 200).
    healthz_kept_alive(&mut TcpStream::connect(addr).unwrap());
}
