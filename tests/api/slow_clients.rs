//! Clients that stop sending are cut off by the front's total read deadline; the number of
//! connections is bounded by what the open-files limit can hold.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use crate::helpers::*;

#[test]
fn clients_that_stop_sending_do_not_hold_workers_or_connections() {
    let _serial = exclusive();
    let serve = Serve::start(&["--workers", "4", "--socket-timeout", "1s"]);
    let addr = serve.proc.addr;
    // Six clients declare a 100 KB body and never send it.
    let stalled: Vec<TcpStream> = (0..6)
        .map(|i| {
            let mut s = TcpStream::connect(addr).unwrap();
            s.write_all(
                format!(
                    "POST /payments HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\nIdempotency-Key: st-{i}\r\n\
                     Content-Type: application/json\r\nContent-Length: 100000\r\n\r\n"
                )
                .as_bytes(),
            )
            .unwrap();
            s
        })
        .collect();
    // One sends half a header line and stops.
    let mut half = TcpStream::connect(addr).unwrap();
    half.write_all(b"GET /heal").unwrap();
    let t = Instant::now();

    let ok = eventually(Duration::from_secs(6), "a normal payment succeeds", || {
        let r = pay(serve.url(), "normal-1", &body(100));
        (r.status == 201).then_some(r)
    });
    assert_eq!(ok.body["status"], "succeeded");

    // The half-header connection is closed by the server (EOF or reset) within a few seconds.
    half.set_read_timeout(Some(Duration::from_secs(6))).unwrap();
    let mut buf = Vec::new();
    let closed = match half.read_to_end(&mut buf) {
        Ok(_) => true,
        Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
    };
    assert!(closed, "the half-header connection was not closed");
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "closed only after {:?}",
        t.elapsed()
    );
    drop(stalled);
}

#[test]
fn the_server_keeps_accepting_after_idling_longer_than_the_socket_timeout() {
    let serve = Serve::start(&["--socket-timeout", "300ms"]);
    let pid = serve.proc.pid();
    let healthz = || {
        let t = Instant::now();
        let r = ureq::Agent::config_builder()
            .timeout_global(Some(Duration::from_secs(2)))
            .build()
            .new_agent()
            .get(format!("{}/healthz", serve.url()))
            .call();
        (r.map(|r| r.status().as_u16()).ok(), t.elapsed())
    };
    // Served once before the silence, so what follows compares like with like.
    assert_eq!(healthz().0, Some(200));
    // The stimulus is the silence itself: no client for three socket timeouts. There is no
    // event to wait for, so the silence is measured on the clock while the process is watched
    // (a dead accept thread makes it exit 1 after three missed probes).
    let silence = Instant::now();
    while silence.elapsed() < Duration::from_millis(900) {
        let (threads, _) = threads_and_fds(pid);
        assert!(threads > 0, "the process is gone during the silence");
        thread::sleep(Duration::from_millis(20));
    }
    // A dead accept() leaves connections unaccepted: the call would time out, not answer.
    let (status, took) = healthz();
    assert_eq!(status, Some(200), "no answer after the silence ({took:?})");
    assert!(
        took < Duration::from_secs(1),
        "answered only after {took:?}"
    );
}

#[test]
fn an_open_files_limit_too_small_for_one_connection_is_refused_at_start_up() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("p.db");
    let out = Command::new("prlimit")
        .args(["--nofile=48:48", env!("CARGO_BIN_EXE_paytrace")])
        .args(["serve", "--addr", "127.0.0.1:0", "--db"])
        .arg(&db)
        .output()
        .unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{log}");
    assert!(log.contains("open-files limit 48"), "{log}");
}

#[test]
fn connections_beyond_what_the_open_files_limit_holds_get_a_503_and_the_server_lives_on() {
    let _serial = exclusive();
    // 200 descriptors: 64 + 3 × pool 2 + 4 × workers 2 = 78 for the server, 4 per connection:
    // room for 30 connections.
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("p.db");
    let mut cmd = Command::new("prlimit");
    cmd.args(["--nofile=200:200", env!("CARGO_BIN_EXE_paytrace")]);
    let mut proc = Proc::start_with(
        cmd,
        &[
            "serve",
            "--addr",
            "127.0.0.1:0",
            "--db",
            db.to_str().unwrap(),
            "--pool-size",
            "2",
            "--workers",
            "2",
            "--socket-timeout",
            "3s",
        ],
    );
    proc.wait_for_log("holds 30 connections", Duration::from_secs(5));
    // 80 idle connections at once: 30 are held (each waits for its request), the other 50 are
    // answered 503 at once.
    let conns: Vec<TcpStream> = (0..80)
        .map(|_| {
            let s = TcpStream::connect(proc.addr).unwrap();
            s.set_nonblocking(true).unwrap();
            s
        })
        .collect();
    let answered = |conns: &[TcpStream]| {
        conns
            .iter()
            .filter(|s| {
                let mut head = [0u8; 12];
                matches!(s.peek(&mut head), Ok(12) if &head == b"HTTP/1.1 503")
            })
            .count()
    };
    eventually(
        Duration::from_secs(3),
        "50 connections answered 503",
        || (answered(&conns) >= 50).then_some(()),
    );
    assert_eq!(answered(&conns), 50, "{}", proc.log_text());
    let held = conns;
    drop(held);
    let url = format!("http://{}", proc.addr);
    let r = eventually(Duration::from_secs(5), "a payment after the flood", || {
        let r = pay(&url, "after-the-flood", &body(100));
        (r.status == 201).then_some(r)
    });
    assert_eq!(r.status, 201);
    assert_eq!(
        proc.wait_exit(Duration::from_millis(100)),
        None,
        "still running"
    );
}
