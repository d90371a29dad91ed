//! Several instances on one PostgreSQL database: `serve --db postgres://…` end to end, the
//! idempotency promise across instances, the reconcilers sharing the work, and three instances
//! behind the shipped `data/nginx/paytrace-cluster.conf`.
//!
//! The server: `PAYTRACE_TEST_POSTGRES=postgres://USER@HOST:PORT/DB` names one (`.ci/run`
//! starts a throwaway cluster and sets it); without it, these tests start their own throwaway
//! cluster (initdb + postgres, as the `postgres` user when run as root, on a free loopback
//! port, trust authentication, stopped and deleted when the test process is gone). With
//! neither, they fail, naming what is missing: they are never skipped. Each test works in its
//! own database, so they run in parallel.

use std::collections::BTreeMap;
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use diesel::sql_types::{BigInt, Text};

use crate::helpers::*;
use crate::nginx::Nginx;

// ---- The PostgreSQL server ------------------------------------------------------------------

/// `postgres://USER@HOST:PORT` of the server the tests use (no database), started once.
fn server() -> &'static str {
    static SERVER: OnceLock<String> = OnceLock::new();
    SERVER.get_or_init(|| match std::env::var("PAYTRACE_TEST_POSTGRES") {
        Ok(url) if !url.is_empty() => {
            let (base, _db) = url
                .rsplit_once('/')
                .filter(|(base, _)| base.contains("://") && base.len() > "postgres://".len())
                .expect("PAYTRACE_TEST_POSTGRES is postgres://USER@HOST:PORT/DB");
            base.to_string()
        }
        _ => start_throwaway_cluster(),
    })
}

/// A new, empty database of its own for one test: its URL.
fn fresh_db() -> String {
    let name = format!("paytrace_t{:016x}", rand::random::<u64>());
    let mut admin = PgConnection::establish(&format!("{}/postgres", server()))
        .expect("the test PostgreSQL server accepts connections");
    admin
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .unwrap();
    format!("{}/{name}", server())
}

/// The directory of PostgreSQL's server programs (`initdb`, `postgres`), if installed.
fn server_programs() -> Option<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path().join("bin"))
        .filter(|bin| bin.join("initdb").exists() && bin.join("postgres").exists())
        .collect();
    // The newest version's directory sorts last (numeric names of equal length).
    found.sort_by_key(|p| (p.as_os_str().len(), p.clone()));
    found.pop().or_else(|| {
        std::env::var_os("PATH")
            .and_then(|path| std::env::split_paths(&path).find(|d| d.join("initdb").exists()))
    })
}

fn running_as_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

/// `program args…` as the user PostgreSQL runs as: `postgres` when the tests run as root
/// (initdb refuses root), the current user otherwise.
fn as_server_user(program: &Path, args: &[&str]) -> Command {
    if running_as_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(program).args(args);
        c
    } else {
        let mut c = Command::new(program);
        c.args(args);
        c
    }
}

/// initdb in a temporary directory, then `postgres` on a free loopback port, watched by a
/// shell that stops it (fast shutdown) and deletes the directory once this process is gone.
fn start_throwaway_cluster() -> String {
    let bin = server_programs().unwrap_or_else(|| {
        panic!(
            "the PostgreSQL tests need a server: set PAYTRACE_TEST_POSTGRES=postgres://USER@HOST:PORT/DB, \
             or install PostgreSQL's server programs (Debian: apt-get install postgresql) so the tests \
             start a throwaway one; .ci/run does the latter"
        )
    });
    let dir = std::env::temp_dir().join(format!(
        "paytrace-pg-{}-{:08x}",
        std::process::id(),
        rand::random::<u32>()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    if running_as_root() {
        let ok = Command::new("chown")
            .arg("postgres")
            .arg(&dir)
            .status()
            .is_ok_and(|s| s.success());
        assert!(
            ok,
            "chown postgres {} (is there a postgres user?)",
            dir.display()
        );
    }
    let data = dir.join("data");
    let init = as_server_user(
        &bin.join("initdb"),
        &[
            "-D",
            data.to_str().unwrap(),
            "-A",
            "trust",
            "-U",
            "postgres",
            "-E",
            "UTF8",
            "--no-locale",
            "--no-sync",
        ],
    )
    .output()
    .expect("initdb runs");
    assert!(
        init.status.success(),
        "initdb failed: {}",
        String::from_utf8_lossy(&init.stderr)
    );
    // A port below the ephemeral range (which the tests' own connections use), tried until
    // one is free: a port taken meanwhile makes the server exit at once, logging why.
    for attempt in 0.. {
        let port = 20_000 + rand::random::<u16>() % 10_000;
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            continue;
        }
        let log = dir.join(format!("server-{port}.log"));
        // fsync off: a throwaway cluster for tests, which kill paytrace, never the server.
        let script = format!(
            r#"'{postgres}' -D '{data}' -p {port} -k '{dir}' -c listen_addresses=127.0.0.1 \
                 -c fsync=off -c max_connections=400 -c shared_buffers=64MB >'{log}' 2>&1 &
               pg=$!
               while [ -d /proc/{me} ] && kill -0 $pg 2>/dev/null; do sleep 1; done
               kill -INT $pg 2>/dev/null; wait $pg
               while [ -d /proc/{me} ]; do sleep 1; done
               rm -rf '{dir}'"#,
            postgres = bin.join("postgres").display(),
            data = data.display(),
            dir = dir.display(),
            log = log.display(),
            me = std::process::id(),
        );
        let mut watchdog = as_server_user(Path::new("/bin/sh"), &["-c", &script])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("the PostgreSQL server starts");
        // It outlives this process by design; reaped here if it ends first.
        std::thread::spawn(move || watchdog.wait());
        let base = format!("postgres://postgres@127.0.0.1:{port}");
        let admin = format!("{base}/postgres");
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if PgConnection::establish(&admin).is_ok() {
                return base;
            }
            // (Not any FATAL: "the database system is starting up" answers an early connection.)
            let said = std::fs::read_to_string(&log).unwrap_or_default();
            let port_taken = said.contains("could not create any TCP/IP sockets");
            if port_taken && attempt < 5 {
                break;
            }
            assert!(
                Instant::now() < deadline && !port_taken,
                "the throwaway PostgreSQL did not accept connections; its log: {said}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    unreachable!("the loop returns or panics")
}

// ---- Looking at the database --------------------------------------------------------------

#[derive(QueryableByName)]
struct Count {
    #[diesel(sql_type = BigInt)]
    n: i64,
}

#[derive(QueryableByName)]
struct Status {
    #[diesel(sql_type = Text)]
    status: String,
}

fn count(db: &str, sql: &str) -> i64 {
    let mut c = PgConnection::establish(db).unwrap();
    diesel::sql_query(sql)
        .get_result::<Count>(&mut c)
        .unwrap()
        .n
}

/// How many payments have each status.
fn statuses(db: &str) -> BTreeMap<String, usize> {
    let mut c = PgConnection::establish(db).unwrap();
    let rows: Vec<Status> = diesel::sql_query("SELECT status FROM payments")
        .load(&mut c)
        .unwrap();
    let mut by = BTreeMap::new();
    for r in rows {
        *by.entry(r.status).or_insert(0) += 1;
    }
    by
}

// ---- Instances and their front ------------------------------------------------------------

/// `paytrace serve` on `db`, charging `provider`, on a free port.
fn instance(db: &str, provider: &str, extra: &[&str]) -> Proc {
    let mut args = vec![
        "serve",
        "--addr",
        "127.0.0.1:0",
        "--db",
        db,
        "--provider-url",
        provider,
    ];
    args.extend_from_slice(extra);
    Proc::start(&args)
}

/// The shipped cluster config in a real nginx, in front of `upstreams` (at most three).
fn cluster_nginx(upstreams: &[SocketAddr]) -> Nginx {
    Nginx::with("paytrace-cluster.conf", |shipped, port| {
        let mut conf = shipped.replace(
            "listen 127.0.0.1:8000;",
            &format!("listen 127.0.0.1:{port};"),
        );
        for (i, a) in upstreams.iter().enumerate() {
            conf = conf.replace(
                &format!("server 127.0.0.1:808{}", i + 1),
                &format!("server {a}"),
            );
        }
        assert!(
            conf.contains(&format!(":{port};")) && !conf.contains("server 127.0.0.1:808"),
            "the cluster config's shape changed"
        );
        conf
    })
}

/// Pays with `key` until an answer is final (201 or 402), retrying what a client retries
/// (409, 502, 503, 504, no answer) for up to `within`: the final status, and every status seen.
fn pay_until_final(base: &str, key: &str, body: &str, within: Duration) -> (u16, Vec<u16>) {
    let deadline = Instant::now() + within;
    let mut seen = Vec::new();
    loop {
        let r = pay(base, key, body);
        seen.push(r.status);
        if matches!(r.status, 201 | 402) || Instant::now() > deadline {
            return (r.status, seen);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn charges(provider: &Proc) -> i64 {
    provider_stats(&provider.url)["charges"].as_i64().unwrap()
}

// ---- The tests ------------------------------------------------------------------------------

#[test]
fn one_instance_on_postgres_charges_once_replays_and_reads_back_and_migrates_once() {
    let db = fresh_db();
    let provider = provider(&[]);
    let mut server = instance(&db, &provider.url, &[]);
    let first = pay(&server.url, "pg-one", &body(1999));
    assert_eq!(first.status, 201, "{:?}", first.body);
    let id = first.body["id"].as_str().unwrap().to_string();
    let again = pay(&server.url, "pg-one", &body(1999));
    assert_eq!(again.status, 201);
    assert_eq!(again.header("Idempotent-Replayed"), Some("true"));
    assert_eq!(again.body["id"], first.body["id"]);
    assert_eq!(pay(&server.url, "pg-one", &body(5)).status, 422);

    let read = agent()
        .get(format!("{}/payments/{id}", server.url))
        .header("Authorization", format!("Bearer {KEY}"))
        .call()
        .unwrap()
        .into_body()
        .read_json::<serde_json::Value>()
        .unwrap();
    assert_eq!(read["status"], "succeeded");
    let list = agent()
        .get(format!("{}/payments?limit=5", server.url))
        .header("Authorization", format!("Bearer {KEY}"))
        .call()
        .unwrap()
        .into_body()
        .read_json::<serde_json::Value>()
        .unwrap();
    assert_eq!(list["data"][0]["id"], first.body["id"]);
    assert_eq!(get(&format!("{}/readyz", server.url)).status, 200);
    assert_eq!(charges(&provider), 1);

    // Each migration is recorded once; a restart on the same database runs none again.
    let versions = "SELECT count(*) AS n FROM schema_version";
    assert_eq!(count(&db, versions), 3);
    server.signal("TERM");
    assert_eq!(server.wait_exit(Duration::from_secs(10)), Some(0));
    let log = server.log_text();
    assert!(
        log.contains("the pool is closed last") && !log.contains("WAL"),
        "no SQLite WAL on PostgreSQL: {log}"
    );
    let server = instance(&db, &provider.url, &[]);
    assert_eq!(count(&db, versions), 3);
    let replay = pay(&server.url, "pg-one", &body(1999));
    assert_eq!(replay.header("Idempotent-Replayed"), Some("true"));
    assert_eq!(charges(&provider), 1);
}

#[test]
fn a_postgres_that_cannot_be_reached_is_refused_at_start_naming_it() {
    let url = format!("postgres://postgres@{}/nowhere", dead_addr());
    let out = Command::new(env!("CARGO_BIN_EXE_paytrace"))
        .args(["serve", "--addr", "127.0.0.1:0", "--db", &url])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains(&url), "{stderr}");
}

#[test]
fn fifty_requests_with_one_key_across_three_instances_make_one_payment_and_one_charge() {
    let db = fresh_db();
    // Slow enough that the first charge is still in flight while the others arrive.
    let provider = provider(&["--latency", "400ms"]);
    let servers: Vec<Proc> = (0..3).map(|_| instance(&db, &provider.url, &[])).collect();
    let statuses_seen = concurrently(50, |i| {
        pay(&servers[i % 3].url, "one-key", &body(700)).status
    });
    let mut by: BTreeMap<u16, usize> = BTreeMap::new();
    for s in &statuses_seen {
        *by.entry(*s).or_insert(0) += 1;
    }
    assert!(
        by.keys().all(|s| matches!(s, 201 | 409)),
        "only 201 and 409: {by:?}"
    );
    assert!(by.contains_key(&201), "{by:?}");
    assert!(
        by.contains_key(&409),
        "the key was in use on another instance: {by:?}"
    );
    assert_eq!(count(&db, "SELECT count(*) AS n FROM payments"), 1);
    assert_eq!(charges(&provider), 1, "{by:?}");
    // Every instance answers the retry with the one stored payment.
    for s in &servers {
        let r = pay(&s.url, "one-key", &body(700));
        assert_eq!(r.status, 201);
        assert_eq!(r.header("Idempotent-Replayed"), Some("true"));
    }
}

#[test]
fn reconcilers_on_three_instances_settle_each_abandoned_payment_once() {
    let _x = exclusive();
    let db = fresh_db();
    // Every charge is made, then its answer is lost (a 500 or a hang): the requests end 502
    // or 504 with the payment `pending`, and only the reconcilers can settle them.
    let provider = provider(&["--ambiguous-rate", "1", "--seed", "16"]);
    let servers: Vec<Proc> = (0..3).map(|_| instance(&db, &provider.url, &[])).collect();
    let n = 12;
    let answers = concurrently(n, |i| {
        pay(
            &servers[i % 3].url,
            &format!("lost-{i}"),
            &body(100 + i as u32),
        )
        .status
    });
    assert!(
        answers.iter().all(|s| matches!(s, 502 | 504)),
        "{answers:?}"
    );
    assert_eq!(charges(&provider), n as i64);
    let settled = eventually(Duration::from_secs(20), "every payment settled", || {
        let by = statuses(&db);
        (by.get("succeeded") == Some(&n)).then_some(by)
    });
    assert_eq!(settled.len(), 1, "{settled:?}");
    // Each payment was looked up by one instance only: the provider saw n charges and n
    // lookups (its `requests` counts both).
    let requests = provider_stats(&provider.url)["requests"].as_i64().unwrap();
    assert_eq!(requests, 2 * n as i64, "one lookup per payment");
    // The keys replay what the reconciler stored, from any instance.
    for i in 0..n {
        let r = pay(
            &servers[(i + 1) % 3].url,
            &format!("lost-{i}"),
            &body(100 + i as u32),
        );
        assert_eq!(r.status, 201, "{:?}", r.body);
        assert_eq!(r.header("Idempotent-Replayed"), Some("true"));
    }
    assert_eq!(charges(&provider), n as i64, "no charge was made twice");
}

#[test]
fn behind_the_cluster_nginx_one_key_from_fifty_clients_is_one_payment() {
    let _x = exclusive();
    let db = fresh_db();
    let provider = provider(&["--latency", "400ms"]);
    let servers: Vec<Proc> = (0..3).map(|_| instance(&db, &provider.url, &[])).collect();
    let addrs: Vec<SocketAddr> = servers.iter().map(|s| s.addr).collect();
    let nginx = cluster_nginx(&addrs);
    let base = nginx.url();
    let seen = concurrently(50, |_| pay(&base, "front-key", &body(4242)).status);
    assert!(seen.iter().all(|s| matches!(s, 201 | 409)), "{seen:?}");
    assert!(seen.contains(&201), "{seen:?}");
    assert_eq!(count(&db, "SELECT count(*) AS n FROM payments"), 1);
    assert_eq!(charges(&provider), 1);
    // least_conn spread them: every instance answered some of them.
    for s in &servers {
        let served = s
            .log_lines()
            .iter()
            .filter(|l| l.contains("POST /payments"))
            .count();
        assert!(served > 0, "an instance got no request:\n{}", s.log_text());
    }
}

#[test]
fn behind_the_cluster_nginx_a_killed_instance_loses_and_doubles_nothing_after_retries() {
    let _x = exclusive();
    let db = fresh_db();
    let provider = provider(&["--latency", "50ms"]);
    let mut servers: Vec<Option<Proc>> = (0..3)
        .map(|_| Some(instance(&db, &provider.url, &[])))
        .collect();
    let addrs: Vec<SocketAddr> = servers.iter().flatten().map(|s| s.addr).collect();
    let nginx = cluster_nginx(&addrs);
    let base = nginx.url();
    let clients = 12;
    let per_client = 10;
    let outcome = std::thread::scope(|s| {
        let workers: Vec<_> = (0..clients)
            .map(|c| {
                let base = base.clone();
                s.spawn(move || {
                    (0..per_client)
                        .map(|i| {
                            let key = format!("k9-{c}-{i}");
                            pay_until_final(&base, &key, &body(10 + i), Duration::from_secs(30))
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        // Under load, one instance dies without a chance to clean up.
        eventually(Duration::from_secs(10), "load is flowing", || {
            (count(&db, "SELECT count(*) AS n FROM payments") >= 20).then_some(())
        });
        if let Some(victim) = servers[1].take() {
            let _ = Command::new("kill")
                .args(["-9", &victim.pid().to_string()])
                .status();
            drop(victim);
        }
        workers
            .into_iter()
            .flat_map(|w| w.join().unwrap())
            .collect::<Vec<_>>()
    });
    let mut retried: BTreeMap<u16, usize> = BTreeMap::new();
    for (_, seen) in &outcome {
        for s in &seen[..seen.len() - 1] {
            *retried.entry(*s).or_insert(0) += 1;
        }
    }
    eprintln!("answers that were retried: {retried:?}");
    // Keys are never repeated here: a 502 or a 409 can only come from the killed instance (a
    // request cut off, then its key still locked by the dead attempt until the lock is stale).
    assert!(
        retried.contains_key(&502) || retried.contains_key(&409),
        "the kill hit requests in flight: {retried:?}"
    );
    let finals: Vec<u16> = outcome.iter().map(|(f, _)| *f).collect();
    assert!(
        finals.iter().all(|s| *s == 201),
        "every payment ends 201 after retries: {:?}",
        outcome
            .iter()
            .filter(|(f, _)| *f != 201)
            .collect::<Vec<_>>()
    );
    let total = (clients * per_client) as i64;
    assert_eq!(count(&db, "SELECT count(*) AS n FROM payments"), total);
    assert_eq!(
        count(
            &db,
            "SELECT count(*) AS n FROM payments WHERE status = 'succeeded'"
        ),
        total
    );
    assert_eq!(charges(&provider), total, "one charge per payment");
}

#[test]
fn behind_the_cluster_nginx_sigterm_on_one_instance_costs_no_5xx() {
    let _x = exclusive();
    let db = fresh_db();
    let provider = provider(&["--latency", "50ms"]);
    let mut servers: Vec<Proc> = (0..3).map(|_| instance(&db, &provider.url, &[])).collect();
    let addrs: Vec<SocketAddr> = servers.iter().map(|s| s.addr).collect();
    let nginx = cluster_nginx(&addrs);
    let base = nginx.url();
    let clients = 12;
    let per_client = 15;
    let seen = std::thread::scope(|s| {
        let workers: Vec<_> = (0..clients)
            .map(|c| {
                let base = base.clone();
                s.spawn(move || {
                    (0..per_client)
                        .map(|i| pay(&base, &format!("term-{c}-{i}"), &body(20 + i)).status)
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        eventually(Duration::from_secs(10), "load is flowing", || {
            (count(&db, "SELECT count(*) AS n FROM payments") >= 20).then_some(())
        });
        servers[1].signal("TERM");
        workers
            .into_iter()
            .flat_map(|w| w.join().unwrap())
            .collect::<Vec<_>>()
    });
    assert_eq!(servers[1].wait_exit(Duration::from_secs(10)), Some(0));
    let mut by: BTreeMap<u16, usize> = BTreeMap::new();
    for s in &seen {
        *by.entry(*s).or_insert(0) += 1;
    }
    assert_eq!(
        by.get(&201),
        Some(&(clients * per_client as usize)),
        "{by:?}"
    );
    let total = (clients * per_client as usize) as i64;
    assert_eq!(count(&db, "SELECT count(*) AS n FROM payments"), total);
    assert_eq!(charges(&provider), total);
}

#[derive(QueryableByName)]
struct Row {
    #[diesel(sql_type = Text)]
    id: String,
    #[diesel(sql_type = Text)]
    status: String,
}

fn rows(db: &str) -> Vec<(String, String)> {
    let mut c = PgConnection::establish(db).unwrap();
    diesel::sql_query("SELECT id, status FROM payments ORDER BY seq")
        .load::<Row>(&mut c)
        .unwrap()
        .into_iter()
        .map(|r| (r.id, r.status))
        .collect()
}

/// The randomized idempotency test of `idempotency.rs`, with faults on, spread over three
/// instances on one database: a key and its retries land on different instances.
#[test]
fn six_hundred_random_requests_across_three_instances_with_faults_keep_the_invariants() {
    let _x = exclusive();
    let db = fresh_db();
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
    let args = [
        "--provider-timeout",
        "200ms",
        "--rate-limit",
        "100000/s",
        "--breaker-min-calls",
        "20",
        "--breaker-failure-rate",
        "100%",
    ];
    let servers: Vec<Proc> = (0..3)
        .map(|_| instance(&db, &provider.url, &args))
        .collect();
    let urls: Vec<String> = servers.iter().map(|s| s.url.clone()).collect();
    let (first_amount, all) = random_payments(&urls, 6, 100, 1600);
    assert_eq!(all.len(), 600);
    let created = check_random_answers(&first_amount, &all);
    let rows = eventually(
        Duration::from_secs(30),
        "no payment is left unsettled",
        || {
            let rows = rows(&db);
            rows.iter()
                .all(|(_, s)| s != "pending" && s != "processing")
                .then_some(rows)
        },
    );
    assert_eq!(rows.len(), first_amount.len(), "one payment per key");
    let succeeded = assert_created_are_stored(&rows, &created) as i64;
    assert_eq!(
        charges(&provider),
        succeeded,
        "provider charges == succeeded payments"
    );
    assert!(succeeded > 400, "{succeeded}");
}
