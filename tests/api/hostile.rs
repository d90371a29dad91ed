//! The hostile corpus: what one client can do to a directly exposed `paytrace serve` (trickled
//! bodies, HTTP/2 and unknown HTTP versions, malformed `Content-Length`, a header line without
//! end, ambiguous framing, pipelining after `Connection: close`), and the same corpus through
//! the shipped nginx config in front of it.
//!
//! Every case records what the clients saw (a status, or `closed`, or `open` when the
//! connection was neither answered nor closed when the test stopped watching), the longest time
//! to the answer and to the close, and the server's threads, file descriptors and resident
//! memory before, at the peak and after. Each test prints its table before it asserts, so a
//! failing run shows what it measured. To see both tables:
//!
//! ```text
//! cargo test --test api hostile:: -- --nocapture --test-threads 1
//! ```
//!
//! `serve` runs with `--socket-timeout 2s`, its total deadline for reading one request: no
//! connection may stay open and unanswered longer than that plus a margin ([`DEADLINE`]).

use std::io::{ErrorKind, Write};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use crate::helpers::*;

mod measure;
use measure::*;

const SOCKET_TIMEOUT: &str = "2s";
/// The socket timeout plus a margin: the longest a connection may stay open without being
/// answered and closed.
const DEADLINE: Duration = Duration::from_secs(4);
/// A refusal that needs no more bytes from the client must not wait for a read timeout.
const PROMPT: Duration = Duration::from_millis(1500);
/// How long threads and fds get to come back after a case: the socket timeout, tiny_http's pool
/// threads ending after 5 s idle, and a margin.
const SETTLE: Duration = Duration::from_secs(10);
/// "Back to baseline": the liveness prober opens short connections of its own, and
/// tiny_http's pool keeps threads it grew for a burst while the prober's connections keep them
/// from idling 5 s. A leak is one thread and two fds per connection, and every leaking case
/// here opens 40 connections or more, so these margins still catch it.
const THREAD_MARGIN: usize = 16;
const FD_MARGIN: usize = 8;
/// A valid payment sent while hostile clients are connected is answered within this.
const PAYMENT_BOUND: Duration = Duration::from_secs(2);
/// The header line without end stops here (or when the server answers or closes).
const ENDLESS_CAP: usize = 64 << 20;
/// The most the server's resident memory may grow while header lines without end arrive.
const RSS_GROWTH_BOUND_KIB: u64 = 32 << 10;

#[test]
fn a_directly_exposed_serve_contains_every_hostile_client() {
    let _serial = exclusive();
    run_corpus(Target::direct());
}

#[test]
fn through_nginx_the_corpus_is_refused_or_forwarded_and_paytrace_stays_healthy() {
    let _serial = exclusive();
    run_corpus(Target::through_nginx());
}

fn run_corpus(t: Target) {
    // Warm up (workers, pool, provider connection), then take the baseline.
    let warm = pay_within(&t, "warm-up");
    assert_eq!(warm.0, Some(201), "the warm-up payment");
    let baseline = t.usage();
    let mut table = Vec::new();
    trickled_bodies(&t, &mut table);
    prefaces(&t, &mut table);
    bad_content_lengths(&t, &mut table);
    endless_header_lines(&t, 1, &mut table);
    endless_header_lines(&t, 4, &mut table);
    framing(&t, &mut table);
    after_all(&t, baseline, &mut table);

    eprintln!("\n{}", render(t.name, &table));
    let failures: Vec<String> = table
        .iter()
        .flat_map(|r| r.failures.iter().map(move |f| format!("{}: {f}", r.case)))
        .collect();
    assert!(
        failures.is_empty(),
        "{} failed:\n  {}",
        t.name,
        failures.join("\n  ")
    );
}

// ---------------------------------------------------------------------------------------------
// The cases

/// 40 unauthenticated uploads declaring 100 000 bytes and 40 authenticated ones declaring 2000,
/// each sending one byte a second, while valid payments are sent one after another.
fn trickled_bodies(t: &Target, table: &mut Vec<Row>) {
    let mut g = Group::start(t);
    let mut conns = Vec::new();
    for i in 0..80 {
        let auth = i >= 40;
        let head = if auth {
            format!(
                "POST /payments HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n\
                 Idempotency-Key: trickle-{i}\r\nContent-Type: application/json\r\n\
                 Content-Length: 2000\r\n\r\n"
            )
        } else {
            format!(
                "POST /payments HTTP/1.1\r\nHost: x\r\nIdempotency-Key: trickle-{i}\r\n\
                 Content-Type: application/json\r\nContent-Length: 100000\r\n\r\n"
            )
        };
        conns.push(Conn::open(t.addr(), head.as_bytes()));
    }
    let until = Instant::now() + DEADLINE;
    let trickler = thread::spawn(move || {
        let mut next_byte = Instant::now();
        loop {
            if Instant::now() >= next_byte {
                for c in conns.iter_mut() {
                    c.send_some(b" ");
                }
                next_byte += Duration::from_secs(1);
            }
            if poll_all(&mut conns) || Instant::now() >= until {
                return conns;
            }
            thread::sleep(Duration::from_millis(5));
        }
    });
    // One payment every 200 ms at most (the rate limit is per key), one after another.
    let mut payments = Vec::new();
    let mut next = Instant::now();
    while !trickler.is_finished() || payments.len() < 3 {
        while Instant::now() < next {
            thread::sleep(Duration::from_millis(5));
        }
        next += Duration::from_millis(200);
        payments.push(pay_within(t, &format!("during-trickle-{}", payments.len())));
    }
    let conns = trickler.join().unwrap();
    let forwarded = g.forwarded_since_last();
    let (unauth, auth) = conns.split_at(40);
    let seen = |cs: &[Conn]| cs.iter().map(|c| c.seen.clone()).collect::<Vec<_>>();
    let (unauth, auth) = (seen(unauth), seen(auth));

    let mut fails = Vec::new();
    if t.nginx() {
        // nginx refuses the declared 100 000 bytes (client_max_body_size) and buffers the
        // authenticated bodies itself: neither reaches paytrace.
        expect_status(&unauth, &[413], false, &mut fails);
        expect_answered_within(&unauth, PROMPT, &mut fails);
    } else {
        // The front refuses the declared length before reading a byte of it.
        expect_status(&unauth, &[413], false, &mut fails);
        expect_answered_within(&unauth, PROMPT, &mut fails);
        expect_closed(&unauth, &mut fails);
    }
    g.row(
        "trickle: 40 unauthenticated, Content-Length 100000, 1 B/s",
        &unauth,
        forwarded,
        fails,
    );

    let mut fails = Vec::new();
    if !t.nginx() {
        // A valid-sized body that does not arrive within the socket timeout, in total.
        expect_status(&auth, &[408], false, &mut fails);
        expect_closed(&auth, &mut fails);
    }
    if let Some(n) = forwarded
        && n != payments.len()
    {
        fails.push(format!(
            "nginx forwarded {n} connections for {} payments: tricklers reached paytrace",
            payments.len()
        ));
    }
    g.row(
        "trickle: 40 authenticated, Content-Length 2000, 1 B/s",
        &auth,
        None,
        fails,
    );

    let mut fails = Vec::new();
    for (i, (status, took)) in payments.iter().enumerate() {
        if *status != Some(201) || *took >= PAYMENT_BOUND {
            fails.push(format!("payment {i}: {status:?} after {took:?}"));
        }
    }
    let seen: Vec<Seen> = payments
        .iter()
        // A payment that got no answer within 5 s shows as `open`.
        .map(|(s, took)| Seen {
            status: *s,
            answered: s.map(|_| *took),
            closed: s.map(|_| *took),
            head: String::new(),
        })
        .collect();
    g.row(
        "valid payments meanwhile, one after another",
        &seen,
        None,
        fails,
    );
    g.finish(table);
}

/// 300 connections that open with `PRI * HTTP/2.0` (the HTTP/2 preface), `HTTP/1.2` or
/// `HTTP/3.0`, opened in batches of 50.
fn prefaces(t: &Target, table: &mut Vec<Row>) {
    // (name, request, what nginx answers: measured with nginx 1.22, which reads HTTP/1.2 as
    // HTTP/1.1 and forwards it, so paytrace answers 404 for a path no route knows and nginx
    // keeps the connection; `/` would be the live page)
    const KINDS: [(&str, &str, u16); 3] = [
        (
            "HTTP/2 preface `PRI * HTTP/2.0`",
            "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
            400,
        ),
        (
            "`GET /nowhere HTTP/1.2`",
            "GET /nowhere HTTP/1.2\r\nHost: x\r\n\r\n",
            404,
        ),
        ("`GET / HTTP/3.0`", "GET / HTTP/3.0\r\nHost: x\r\n\r\n", 505),
    ];
    let mut g = Group::start(t);
    let mut conns: Vec<(usize, Conn)> = Vec::new();
    for batch in 0..6 {
        let first = conns.len();
        for i in 0..50 {
            let kind = (batch * 50 + i) % KINDS.len();
            conns.push((kind, Conn::open(t.addr(), KINDS[kind].1.as_bytes())));
        }
        // Let the batch be taken before the next (the listen backlog is finite).
        let pause = Instant::now() + Duration::from_millis(500);
        while !poll_all_pairs(&mut conns[first..]) && Instant::now() < pause {
            thread::sleep(Duration::from_millis(5));
        }
    }
    let until = Instant::now() + DEADLINE;
    while !poll_all_pairs(&mut conns) && Instant::now() < until {
        thread::sleep(Duration::from_millis(5));
    }
    let forwarded = g.forwarded_since_last();
    if let Some(n) = forwarded
        && n != 100
    {
        g.fail_next(format!(
            "nginx forwarded {n} connections; only the 100 HTTP/1.2 requests should reach paytrace"
        ));
    }
    for (kind, (name, _, via_nginx)) in KINDS.iter().enumerate() {
        let seen: Vec<Seen> = conns
            .iter()
            .filter(|(k, _)| *k == kind)
            .map(|(_, c)| c.seen.clone())
            .collect();
        let mut fails = Vec::new();
        if t.nginx() {
            expect_status(&seen, &[*via_nginx], false, &mut fails);
            expect_answered_within(&seen, PROMPT, &mut fails);
            if *via_nginx != 404 {
                expect_closed_within(&seen, PROMPT, &mut fails);
            }
        } else {
            expect_status(&seen, &[505], false, &mut fails);
            expect_answered_within(&seen, PROMPT, &mut fails);
            expect_closed(&seen, &mut fails);
        }
        let fwd = if kind == 0 { forwarded } else { None };
        g.row(&format!("100 × {name}"), &seen, fwd, fails);
    }
    g.finish(table);
}

/// `Content-Length: abc`, `-1`, `99999999999999999999` and `+52`, five times each on
/// `GET /healthz` and on `POST /payments`, all at once.
fn bad_content_lengths(t: &Target, table: &mut Vec<Row>) {
    let signed_body = body(1000);
    assert_eq!(signed_body.len(), 52);
    let values = ["abc", "-1", "99999999999999999999", "+52"];
    let mut g = Group::start(t);
    let keys_before = idempotency_keys(t);
    let mut sets = Vec::new();
    for value in values {
        for post in [false, true] {
            let conns: Vec<Conn> = (0..5)
                .map(|i| {
                    let mut req = if post {
                        format!(
                            "POST /payments HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n\
                             Idempotency-Key: cl-{value}-{i}\r\nContent-Type: application/json\r\n"
                        )
                    } else {
                        "GET /healthz HTTP/1.1\r\nHost: x\r\n".to_string()
                    };
                    req.push_str(&format!("Content-Length: {value}\r\n\r\n"));
                    if value == "+52" {
                        req.push_str(&signed_body);
                    }
                    Conn::open(t.addr(), req.as_bytes())
                })
                .collect();
            let path = if post {
                "POST /payments"
            } else {
                "GET /healthz"
            };
            sets.push((format!("Content-Length: {value} on {path}"), conns));
        }
    }
    let until = Instant::now() + DEADLINE;
    while !sets.iter_mut().fold(true, |all, (_, c)| poll_all(c) && all) && Instant::now() < until {
        thread::sleep(Duration::from_millis(5));
    }
    let forwarded = g.forwarded_since_last();
    for (i, (name, conns)) in sets.iter().enumerate() {
        let seen: Vec<Seen> = conns.iter().map(|c| c.seen.clone()).collect();
        let mut fails = Vec::new();
        // nginx refuses every one of these itself (400), `+52` included.
        expect_status(&seen, &[400], false, &mut fails);
        expect_closed_within(&seen, PROMPT, &mut fails);
        if i == 0 {
            expect_not_forwarded(forwarded, &mut fails);
        }
        g.row(name, &seen, (i == 0).then_some(forwarded).flatten(), fails);
    }
    let created = idempotency_keys(t) - keys_before;
    if created != 0 {
        g.fail_last(format!("{created} of these payments were processed"));
    }
    g.finish(table);
}

/// `conns` connections at once, each streaming one header line that never ends, as fast as the
/// server reads it, up to 64 MiB; the server's resident memory is sampled meanwhile.
fn endless_header_lines(t: &Target, conns: usize, table: &mut Vec<Row>) {
    let mut g = Group::start(t);
    let rss_before = rss_kib(t.pid());
    let over = AtomicBool::new(false);
    let done = AtomicBool::new(false);
    let (addr, rss_now) = (t.addr(), g.sampler.rss_now.clone());
    let streams: Vec<(Conn, usize)> = thread::scope(|s| {
        // Stops the streams once the bound is crossed: the point is made, spare the machine.
        s.spawn(|| {
            while !done.load(Ordering::SeqCst) {
                if rss_now.load(Ordering::SeqCst) > rss_before + RSS_GROWTH_BOUND_KIB {
                    over.store(true, Ordering::SeqCst);
                }
                thread::sleep(Duration::from_millis(5));
            }
        });
        let handles: Vec<_> = (0..conns)
            .map(|_| s.spawn(|| stream_endless_line(addr, &over)))
            .collect();
        let streams = handles.into_iter().map(|h| h.join().unwrap()).collect();
        done.store(true, Ordering::SeqCst);
        streams
    });
    let forwarded = g.forwarded_since_last();
    let seen: Vec<Seen> = streams.iter().map(|(c, _)| c.seen.clone()).collect();
    let sent_mib = streams.iter().map(|(_, n)| *n).max().unwrap_or(0) as f64 / (1 << 20) as f64;
    let mut fails = Vec::new();
    if t.nginx() {
        // A header line over large_client_header_buffers (8k): nginx's own 400.
        expect_status(&seen, &[400], true, &mut fails);
        expect_closed_within(&seen, PROMPT, &mut fails);
        expect_not_forwarded(forwarded, &mut fails);
    } else {
        expect_status(&seen, &[431], false, &mut fails);
        expect_closed(&seen, &mut fails);
    }
    let peak = g.sampler.peak.lock().unwrap().rss_kib;
    if peak > rss_before + RSS_GROWTH_BOUND_KIB || over.load(Ordering::SeqCst) {
        fails.push(format!(
            "VmRSS grew from {} to {} MiB (bound: +{} MiB)",
            rss_before >> 10,
            peak >> 10,
            RSS_GROWTH_BOUND_KIB >> 10
        ));
    }
    let name = format!(
        "{conns} × header line without end (stopped at {sent_mib:.1} MiB sent), VmRSS before {} MiB",
        rss_before >> 10
    );
    g.row(&name, &seen, forwarded, fails);
    g.finish(table);
}

/// Streams `X-A: aaaa…` without a line end until the server answers or closes, 64 MiB are sent,
/// `over` is raised, or ten seconds passed; then watches for the close. What was seen, and how
/// many bytes were sent.
fn stream_endless_line(addr: SocketAddr, over: &AtomicBool) -> (Conn, usize) {
    let mut c = Conn::open(addr, b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-A: ");
    let chunk = vec![b'a'; 64 << 10];
    let started = Instant::now();
    let mut sent = 0;
    while sent < ENDLESS_CAP
        && !over.load(Ordering::SeqCst)
        && started.elapsed() < Duration::from_secs(10)
    {
        if c.poll() || c.seen.status.is_some() {
            break;
        }
        match c.s.write(&chunk) {
            Ok(n) => sent += n,
            Err(e) if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::Interrupted => {
                thread::sleep(Duration::from_millis(1));
            }
            Err(_) => break,
        }
    }
    let until = Instant::now() + DEADLINE;
    while !c.poll() && Instant::now() < until {
        thread::sleep(Duration::from_millis(5));
    }
    (c, sent)
}

/// Ambiguous framing, each followed on the same connection by a pipelined payment with a fresh
/// key: the refusal closes the connection, and neither payment is processed. Last, a valid
/// `GET /healthz` with a payment pipelined behind it: its answer says `Connection: close`, so
/// the payment must never be processed.
fn framing(t: &Target, table: &mut Vec<Row>) {
    let payment = |key: &str, framing: &str, body: &str| {
        format!(
            "POST /payments HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n\
             Idempotency-Key: {key}\r\nContent-Type: application/json\r\n{framing}\r\n{body}"
        )
    };
    let b = body(100);
    let n = b.len();
    let chunked = format!("{:x}\r\n{b}\r\n0\r\n\r\n", b.len());
    let cases = [
        (
            "Content-Length with Transfer-Encoding: chunked",
            payment(
                "fr-te",
                &format!("Content-Length: {n}\r\nTransfer-Encoding: chunked\r\n"),
                &chunked,
            ),
            &[400][..],
        ),
        (
            "two Content-Length headers, equal",
            payment(
                "fr-cl-same",
                &format!("Content-Length: {n}\r\nContent-Length: {n}\r\n"),
                &b,
            ),
            &[400][..],
        ),
        (
            "two Content-Length headers, different",
            payment(
                "fr-cl-diff",
                &format!("Content-Length: {n}\r\nContent-Length: 7\r\n"),
                &b,
            ),
            &[400][..],
        ),
        (
            "NUL in a header value",
            "GET /healthz HTTP/1.1\r\nHost: x\r\nX-A: a\0b\r\n\r\n".to_string(),
            &[400][..],
        ),
        (
            "a payment pipelined behind a valid GET /healthz",
            "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n".to_string(),
            &[200][..],
        ),
    ];
    let mut g = Group::start(t);
    for (i, (name, first, statuses)) in cases.iter().enumerate() {
        let keys_before = idempotency_keys(t);
        let pipelined = payment(
            &format!("fr-pipelined-{i}"),
            &format!("Content-Length: {n}\r\n"),
            &b,
        );
        let mut c = Conn::open(t.addr(), format!("{first}{pipelined}").as_bytes());
        let until = Instant::now() + DEADLINE;
        while !c.poll() && Instant::now() < until {
            thread::sleep(Duration::from_millis(5));
        }
        let forwarded = g.forwarded_since_last();
        let seen = [c.seen.clone()];
        let processed = idempotency_keys(t) - keys_before;
        let says_close = c
            .seen
            .head
            .to_ascii_lowercase()
            .contains("connection: close");
        let mut fails = Vec::new();
        expect_status(&seen, statuses, false, &mut fails);
        if t.nginx() {
            // nginx refuses the four ambiguous requests itself (400, closed) and keeps a
            // client connection alive after a valid request, answering what follows on it:
            // that is correct, since its answer does not say `Connection: close`. Whatever it
            // does, nothing may follow an answer that says `Connection: close`.
            if statuses[0] == 400 {
                expect_closed_within(&seen, PROMPT, &mut fails);
                expect_not_forwarded(forwarded, &mut fails);
            }
            if says_close && processed > 0 {
                fails.push(format!(
                    "{processed} payment(s) processed after `Connection: close`"
                ));
            }
        } else {
            if !says_close {
                fails.push(format!(
                    "the answer lacks `Connection: close`: {:?}",
                    c.seen.head
                ));
            }
            expect_closed_within(&seen, PROMPT, &mut fails);
            if processed > 0 {
                fails.push(format!(
                    "{processed} payment(s) processed on this connection"
                ));
            }
        }
        let label = format!(
            "{name} (+ pipelined payment: {})",
            if processed > 0 {
                format!("{processed} processed")
            } else {
                "not processed".to_string()
            }
        );
        g.row(&label, &seen, forwarded, fails);
    }
    g.finish(table);
}

/// After all of it: a valid payment is answered 201, and threads and fds are back near the
/// baseline taken before the first case.
fn after_all(t: &Target, baseline: Usage, table: &mut Vec<Row>) {
    let mut g = Group::start(t);
    g.before = baseline;
    let (status, took) = pay_within(t, "after-all");
    let mut fails = Vec::new();
    if status != Some(201) || took >= PAYMENT_BOUND {
        fails.push(format!("a valid payment: {status:?} after {took:?}"));
    }
    let seen = [Seen {
        status,
        answered: status.map(|_| took),
        closed: status.map(|_| took),
        head: String::new(),
    }];
    let forwarded = g.forwarded_since_last();
    g.row(
        "after all: a valid payment; usage vs the first baseline",
        &seen,
        forwarded,
        fails,
    );
    g.finish(table);
}

// ---------------------------------------------------------------------------------------------
// Helpers of the cases

/// Idempotency keys stored: one per payment request that got past the guards.
fn idempotency_keys(t: &Target) -> i64 {
    t.serve
        .db()
        .query_row("SELECT count(*) FROM idempotency_keys", [], |r| r.get(0))
        .unwrap()
}

/// A valid payment with a fresh key through `t`, giving up after 5 s: (status, time).
fn pay_within(t: &Target, key: &str) -> (Option<u16>, Duration) {
    let started = Instant::now();
    let r = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(5)))
        .build()
        .new_agent()
        .post(format!("{}/payments", t.url()))
        .header("Authorization", format!("Bearer {KEY}"))
        .header(
            "Idempotency-Key",
            format!("{}-{key}", t.name.replace(' ', "-")),
        )
        .header("Content-Type", "application/json")
        .send(body(100).as_bytes());
    (r.ok().map(|r| r.status().as_u16()), started.elapsed())
}
