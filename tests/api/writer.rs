//! The single writer and its group commit: a crash in the middle of busy batches, a writer
//! that cannot get SQLite's lock, and a shutdown that drains the writer before the pool closes.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::helpers::*;

/// Clients sending payments in a loop, each with fresh keys, until told to stop.
struct Load {
    stop: Arc<AtomicBool>,
    /// Every key sent, answered or not (recorded before the request leaves).
    sent: Arc<Mutex<Vec<String>>>,
    /// (key, payment id, when the answer came) of every `201`.
    created: Arc<Mutex<Vec<(String, String, Instant)>>>,
    /// Every other answer: (key, status, problem code).
    refused: Arc<Mutex<Vec<(String, u16, String)>>>,
    threads: Vec<thread::JoinHandle<()>>,
}

/// What a [`Load`] saw, once its clients have stopped.
struct Seen {
    sent: Vec<String>,
    created: Vec<(String, String, Instant)>,
    refused: Vec<(String, u16, String)>,
}

impl Load {
    fn start(url: &str, clients: usize, prefix: &str) -> Load {
        let load = Load {
            stop: Arc::new(AtomicBool::new(false)),
            sent: Arc::default(),
            created: Arc::default(),
            refused: Arc::default(),
            threads: Vec::new(),
        };
        let threads = (0..clients)
            .map(|c| {
                let (url, prefix) = (url.to_string(), prefix.to_string());
                let (stop, sent) = (load.stop.clone(), load.sent.clone());
                let (created, refused) = (load.created.clone(), load.refused.clone());
                thread::spawn(move || {
                    let agent = agent();
                    let mut n = 0;
                    while !stop.load(Ordering::SeqCst) {
                        let key = format!("{prefix}-{c}-{n}");
                        n += 1;
                        sent.lock().unwrap().push(key.clone());
                        let answer = agent
                            .post(format!("{url}/payments"))
                            .header("Authorization", format!("Bearer {KEY}"))
                            .header("Idempotency-Key", &key)
                            .header("Content-Type", "application/json")
                            // As nginx sends upstream: tiny_http frees the connection's thread
                            // once the request is parsed.
                            .header("Connection", "close")
                            .send(body(100).as_bytes());
                        // No answer: the server is gone (the test stops the load first).
                        let Ok(mut r) = answer else { continue };
                        let status = r.status().as_u16();
                        let text = r.body_mut().read_to_string().unwrap_or_default();
                        let json: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
                        if status == 201 {
                            let id = json["id"].as_str().unwrap_or_default().to_string();
                            created.lock().unwrap().push((key, id, Instant::now()));
                        } else {
                            let code = json["code"].as_str().unwrap_or(&text).to_string();
                            refused.lock().unwrap().push((key, status, code));
                        }
                    }
                })
            })
            .collect();
        Load { threads, ..load }
    }

    fn created(&self) -> usize {
        self.created.lock().unwrap().len()
    }

    /// Tells the clients to stop: each finishes the request it has in flight (or fails it,
    /// if the server is gone) and sends no more.
    fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
    }

    fn join(self) -> Seen {
        self.stop();
        for t in self.threads {
            t.join().unwrap();
        }
        Seen {
            sent: std::mem::take(&mut *self.sent.lock().unwrap()),
            created: std::mem::take(&mut *self.created.lock().unwrap()),
            refused: std::mem::take(&mut *self.refused.lock().unwrap()),
        }
    }
}

/// `paytrace_db_batch_size` as `/metrics` shows it now.
#[derive(Clone, Copy, Debug)]
struct Batches {
    /// Writes committed in batches.
    sum: f64,
    /// Batches committed.
    count: f64,
    /// Batches of at most 8 writes.
    up_to_8: f64,
}

fn batches(url: &str) -> Batches {
    let r = get(&format!("{url}/metrics"));
    assert_eq!(r.status, 200);
    let text = r.body.as_str().unwrap_or_default().to_string();
    let value = |name: &str| -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
            .unwrap_or_else(|| panic!("no `{name}` in /metrics:\n{text}"))
    };
    Batches {
        sum: value("paytrace_db_batch_size_sum"),
        count: value("paytrace_db_batch_size_count"),
        up_to_8: value("paytrace_db_batch_size_bucket{le=\"8\"}"),
    }
}

fn count(db: &rusqlite::Connection, sql: &str) -> usize {
    db.query_row(sql, [], |r| r.get::<_, i64>(0)).unwrap() as usize
}

#[test]
fn a_kill_9_during_busy_batches_loses_no_answered_payment_and_no_key_gets_two_payments() {
    let _serial = exclusive();
    let provider = provider(&[]);
    let args = [
        "--sync",
        "full",
        "--provider-url",
        &provider.url,
        "--rate-limit",
        "100000/s",
        // One worker per client: every client has a payment inside the server.
        "--workers",
        "64",
    ];
    let serve = Serve::start(&args);
    let url = serve.url().to_string();
    let load = Load::start(&url, 64, "crash");
    eventually(Duration::from_secs(20), "the load is running", || {
        (load.created() >= 200).then_some(())
    });
    // Batches committed from here on, while all 64 clients are sending: the crash must come
    // while the writer commits batches of more than 8 writes. How large the batches get
    // depends on how the machine schedules the clients (a mean of 12–19 on a quiet 2-core
    // machine, under 4 with the load average at 40), so wait for such batches rather than
    // assert a mean.
    let from = batches(&url);
    let to = eventually(
        Duration::from_secs(30),
        "the writer commits batches of more than 8 writes under load",
        || {
            let now = batches(&url);
            let above_8 = (now.count - now.up_to_8) - (from.count - from.up_to_8);
            (above_8 >= 5.0).then_some(now)
        },
    );
    let (writes, n) = (to.sum - from.sum, to.count - from.count);
    let above_8 = (to.count - to.up_to_8) - (from.count - from.up_to_8);
    eprintln!(
        "batches under load: {n} batches, {writes} writes, mean {:.1}, {above_8} of more than 8",
        writes / n
    );

    // The crash, while every client has a payment in flight.
    load.stop();
    let dir = serve.kill9();
    let seen = load.join();
    eprintln!(
        "before the crash: {} keys sent, {} answered 201, {} refused ({:?})",
        seen.sent.len(),
        seen.created.len(),
        seen.refused.len(),
        seen.refused.iter().take(5).collect::<Vec<_>>()
    );

    let serve = Serve::start_in(dir, &args);
    // Every payment answered 201 is stored with the answered id, before any retry.
    {
        let db = serve.db();
        assert_eq!(serve.integrity(), "ok");
        let rows: HashMap<String, String> = serve.rows().into_iter().collect();
        for (key, id, _) in &seen.created {
            assert_eq!(
                rows.get(id).map(String::as_str),
                Some("succeeded"),
                "{key} was answered 201 as {id}"
            );
            let stored: String = db
                .query_row(
                    "SELECT payment_id FROM idempotency_keys WHERE key = ?1",
                    [key],
                    |r| r.get(0),
                )
                .unwrap();
            assert_eq!(&stored, id, "{key}");
        }
    }

    // A retry of every key sent, answered or not, ends 201 with the key's one payment.
    let keys = &seen.sent;
    let retried: Vec<(String, String)> = concurrently(8, |t| {
        keys.iter()
            .skip(t)
            .step_by(8)
            .map(|key| {
                let id = eventually(Duration::from_secs(20), "the retry is answered 201", || {
                    let r = pay(serve.url(), key, &body(100));
                    match r.status {
                        201 => Some(r.body["id"].as_str().unwrap().to_string()),
                        // The dead request's lock has not gone stale yet, this attempt ran
                        // out of time, or it was shed before anything was done: a client
                        // retries all three with the same key.
                        409 | 504 => None,
                        503 if r.body["code"] == "overloaded" => None,
                        other => panic!("{key}: {other}: {}", r.body),
                    }
                });
                (key.clone(), id)
            })
            .collect::<Vec<_>>()
    })
    .into_iter()
    .flatten()
    .collect();
    let answered: HashMap<&str, &str> = seen
        .created
        .iter()
        .map(|(k, id, _)| (k.as_str(), id.as_str()))
        .collect();
    for (key, id) in &retried {
        if let Some(first) = answered.get(key.as_str()) {
            assert_eq!(
                first, id,
                "{key}: the retry names the payment answered before"
            );
        }
    }
    let distinct: HashSet<&str> = retried.iter().map(|(_, id)| id.as_str()).collect();
    assert_eq!(distinct.len(), keys.len(), "one payment per key");

    let db = serve.db();
    assert_eq!(serve.integrity(), "ok");
    let rows = serve.rows();
    assert!(rows.iter().all(|(_, s)| s == "succeeded"), "{rows:?}");
    assert_eq!(rows.len(), keys.len(), "one payment per key sent");
    assert_eq!(
        count(&db, "SELECT COUNT(*) FROM idempotency_keys"),
        keys.len()
    );
    assert_eq!(
        count(
            &db,
            "SELECT COUNT(*) FROM payments p
             WHERE NOT EXISTS (SELECT 1 FROM idempotency_keys k WHERE k.payment_id = p.id)"
        ),
        0,
        "a payment that no key points at (a key that made a second payment)"
    );
    assert_eq!(
        count(
            &db,
            "SELECT COUNT(*) FROM (SELECT payment_id FROM idempotency_keys
                                   GROUP BY payment_id HAVING COUNT(*) > 1)"
        ),
        0,
        "a payment two keys point at"
    );
    assert_eq!(
        provider_stats(&provider.url)["charges"].as_u64(),
        Some(rows.len() as u64),
        "one charge per payment"
    );
}

#[test]
fn a_writer_that_cannot_get_the_database_lock_answers_within_the_acquire_slice() {
    let _serial = exclusive();
    let provider = provider(&[]);
    let serve = Serve::start(&[
        "--provider-url",
        &provider.url,
        "--acquire-timeout",
        "100ms",
        "--write-timeout",
        "300ms",
        "--request-timeout",
        "5s",
        "--rate-limit",
        "10000/s",
    ]);
    let url = serve.url().to_string();
    assert_eq!(pay(&url, "lock-before", &body(100)).status, 201);

    // Hold SQLite's write lock from outside: the writer's `BEGIN IMMEDIATE` waits its busy
    // timeout (the write slice) and fails.
    let blocker = serve.db();
    blocker.busy_timeout(Duration::from_secs(5)).unwrap();
    blocker.execute_batch("BEGIN IMMEDIATE").unwrap();
    let results = concurrently(6, |i| pay(&url, &format!("lock-{i}"), &body(100)));
    // A write the writer took into its blocked batch fails with it when the busy timeout runs
    // out: 504 at the claim. One still queued behind that batch is withdrawn when its acquire
    // slice (100 ms) ends: 503 overloaded. Neither waits for the 5 s budget.
    for r in &results {
        match r.status {
            503 => {
                assert_eq!(r.body["code"], "overloaded", "{}", r.body);
                assert!(
                    r.elapsed < Duration::from_secs(1),
                    "withdrawn after {:?}",
                    r.elapsed
                );
            }
            504 => {
                assert_eq!(r.body["code"], "deadline-exceeded", "{}", r.body);
                assert_eq!(r.body["step"], "claim", "{}", r.body);
            }
            other => panic!("{other}: {}", r.body),
        }
        assert!(
            r.body.get("payment").is_none(),
            "nothing claimed: {}",
            r.body
        );
        assert!(
            r.elapsed < Duration::from_secs(2),
            "answered after {:?}: {}",
            r.elapsed,
            r.body
        );
    }
    eprintln!(
        "while locked: {:?}",
        results
            .iter()
            .map(|r| (r.status, r.elapsed))
            .collect::<Vec<_>>()
    );
    // Nothing of the refused payments was claimed, so nothing was charged.
    assert_eq!(provider_stats(&provider.url)["charges"], 1);
    blocker.execute_batch("ROLLBACK").unwrap();
    let db = serve.db();
    assert_eq!(count(&db, "SELECT COUNT(*) FROM payments"), 1);
    assert_eq!(count(&db, "SELECT COUNT(*) FROM idempotency_keys"), 1);

    // The lock is back: payments go through again, the refused keys included.
    eventually(Duration::from_secs(10), "a payment succeeds again", || {
        (pay(&url, "lock-after", &body(100)).status == 201).then_some(())
    });
    for i in 0..6 {
        let r = pay(&url, &format!("lock-{i}"), &body(100));
        assert_eq!(r.status, 201, "{}", r.body);
    }
    assert_eq!(provider_stats(&provider.url)["charges"], 8);
    assert!(serve.rows().iter().all(|(_, s)| s == "succeeded"));
}

#[test]
fn sigterm_drains_the_writer_before_the_pool_closes() {
    let _serial = exclusive();
    let provider = provider(&[]);
    let mut serve = Serve::start(&[
        "--sync",
        "full",
        "--provider-url",
        &provider.url,
        "--rate-limit",
        "100000/s",
    ]);
    let load = Load::start(serve.url(), 16, "term");
    eventually(Duration::from_secs(20), "the load is running", || {
        (load.created() >= 200).then_some(())
    });
    let signalled = Instant::now();
    serve.proc.signal("TERM");
    // Each client finishes the payment it has in flight, then stops.
    load.stop();
    let seen = load.join();
    assert_eq!(
        serve.proc.wait_exit(Duration::from_secs(15)),
        Some(0),
        "{}",
        serve.proc.log_text()
    );
    let drained = seen
        .created
        .iter()
        .filter(|(_, _, at)| *at > signalled)
        .count();
    eprintln!(
        "{} answered 201 ({drained} after the signal), refused {:?}",
        seen.created.len(),
        seen.refused
    );
    assert!(drained > 0, "no payment was in flight at the signal");
    // In flight at the signal: finished and answered 201. Arriving after it: refused before
    // anything is written.
    for (key, status, code) in &seen.refused {
        assert_eq!(
            (*status, code.as_str()),
            (503, "shutting-down"),
            "{key}: only a request that wrote nothing may be refused"
        );
    }
    serve
        .proc
        .wait_for_log("WAL checkpointed", Duration::from_secs(2));
    assert!(
        serve.wal_is_checkpointed(),
        "the WAL is checkpointed after the writer's last commit"
    );
    assert_eq!(serve.integrity(), "ok");
    // Every 201 is stored as it was answered, and no claimed payment was left unfinished.
    let rows: HashMap<String, String> = serve.rows().into_iter().collect();
    for (key, id, _) in &seen.created {
        assert_eq!(
            rows.get(id).map(String::as_str),
            Some("succeeded"),
            "{key} was answered 201 as {id}"
        );
    }
    assert_eq!(rows.len(), seen.created.len(), "{rows:?}");
    assert_eq!(
        provider_stats(&provider.url)["charges"].as_u64(),
        Some(rows.len() as u64)
    );
}
