//! One run of a scenario: start the provider and the server, drive the clients, sample
//! `/metrics` every 250 ms, inject and remove the fault on schedule, then wait for the
//! reconciler, stop the server and collect what the invariants are checked against.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::thread;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::Value;

use super::invariants;
use super::model::{Answer, Fault, Run, RunResult, Sample, TICK};
use crate::bench::nginx::Nginx;
use crate::bench::{Proc, spawn};
use crate::config::DEV_API_KEY;

/// How long, after the load stopped, the reconciler has to settle what is left.
const SETTLE_WITHIN: Duration = Duration::from_secs(20);

/// One sample's value: the line whose series is exactly `series`, or the sum of the series
/// of the metric `series` over all its labels.
fn metric(text: &str, series: &str) -> f64 {
    let labelled = format!("{series}{{");
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (key, value) = l.rsplit_once(' ')?;
            (key == series || (!series.contains('{') && key.starts_with(&labelled)))
                .then(|| value.trim().parse::<f64>().ok())
                .flatten()
        })
        .sum()
}

fn sample(agent: &ureq::Agent, url: &str, t: f64) -> Option<Sample> {
    let text = agent
        .get(format!("{url}/metrics"))
        .call()
        .ok()?
        .into_body()
        .read_to_string()
        .ok()?;
    let m = |s: &str| metric(&text, s);
    Some(Sample {
        t,
        up: true,
        queue_depth: m("paytrace_queue_depth"),
        workers_busy: m("paytrace_workers_busy"),
        breaker_state: m("paytrace_breaker_state"),
        writer_queue: m("paytrace_db_writer_queue"),
        provider_in_flight: m("paytrace_provider_calls_in_flight"),
        shed: m("paytrace_requests_shed_total"),
        shed_queue_full: m("paytrace_requests_shed_total{reason=\"queue_full\"}"),
        acquire_timeouts: m("paytrace_db_acquire_timeouts_total"),
        to_open: m("paytrace_breaker_transitions_total{to=\"open\"}"),
        to_half_open: m("paytrace_breaker_transitions_total{to=\"half-open\"}"),
        to_closed: m("paytrace_breaker_transitions_total{to=\"closed\"}"),
    })
}

fn agent(timeout: Duration) -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(timeout))
        .build()
        .new_agent()
}

fn put_faults(agent: &ureq::Agent, provider: &str, body: &Value) -> Result<(), String> {
    let r = agent
        .put(format!("{provider}/_control/faults"))
        .header("Content-Type", "application/json")
        .send(body.to_string().as_bytes())
        .map_err(|e| format!("cannot set the provider's faults: {e}"))?;
    if r.status().as_u16() == 200 {
        Ok(())
    } else {
        Err(format!(
            "the provider refused the faults {body}: {}",
            r.status()
        ))
    }
}

/// Sends SIGUSR1 to a server started with `--write-delay`, and waits until its
/// `paytrace_db_write_delay_seconds` says the delay is `on` (non-zero) or off.
fn switch_write_delay(server: &Proc, agent: &ureq::Agent, on: bool) -> Result<(), String> {
    signal(server, "USR1")?;
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let delay = agent
            .get(format!("{}/metrics", server.1))
            .call()
            .ok()
            .and_then(|r| r.into_body().read_to_string().ok())
            .map(|text| metric(&text, "paytrace_db_write_delay_seconds"));
        if delay.is_some_and(|d| (d > 0.0) == on) {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "the server did not switch its write delay {} within 5 s of SIGUSR1",
                if on { "on" } else { "off" }
            ));
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// One closed-loop client: a payment with a fresh key, wait for the answer, the next one; with
/// `retry`, anything but a final answer is sent again at once with the same key and body.
fn client(
    url: &RwLock<String>,
    seed: u64,
    n: usize,
    retry: bool,
    start: Instant,
    stop: &AtomicBool,
) -> Vec<Answer> {
    let agent = agent(Duration::from_secs(15));
    let mut rng = StdRng::seed_from_u64(seed ^ (n as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15));
    let mut answers = Vec::new();
    let mut i = 0u64;
    let mut again: Option<(String, u32, u32)> = None;
    while !stop.load(Ordering::Relaxed) {
        let (key, amount, attempt) = match again.take() {
            Some((key, amount, attempt)) => (key, amount, attempt + 1),
            None => {
                i += 1;
                let amount: u32 = rng.random_range(100..100_000);
                (format!("scenario-{seed:x}-{n}-{i}"), amount, 1)
            }
        };
        let body = format!(r#"{{"amount":{amount},"currency":"usd","source":"tok_visa"}}"#);
        let sent = start.elapsed().as_secs_f64();
        // Read each time: a restarted server listens on a new port.
        let base = url.read().map(|u| u.clone()).unwrap_or_default();
        let result = agent
            .post(format!("{base}/payments"))
            .header("Authorization", format!("Bearer {DEV_API_KEY}"))
            .header("Idempotency-Key", &key)
            .header("Content-Type", "application/json")
            .send(body.as_bytes());
        let (status, code, id) = match result {
            Ok(mut r) => {
                let status = r.status().as_u16();
                // An answer whose body did not arrive whole (a server killed while writing it)
                // was not seen: the client retries it like any other lost answer.
                let Some(v) = r
                    .body_mut()
                    .read_to_string()
                    .ok()
                    .and_then(|b| serde_json::from_str::<Value>(&b).ok())
                else {
                    answers.push(Answer {
                        sent,
                        done: start.elapsed().as_secs_f64(),
                        status: 0,
                        code: None,
                        id: None,
                        key: key.clone(),
                        attempt,
                        slow_client: false,
                    });
                    if retry {
                        again = Some((key, amount, attempt));
                    }
                    continue;
                };
                let code = v["code"].as_str().map(|c| match v["step"].as_str() {
                    Some(step) => format!("{c}/{step}"),
                    None => c.to_string(),
                });
                let id = (status == 201)
                    .then(|| v["id"].as_str().map(str::to_string))
                    .flatten();
                (status, code, id)
            }
            Err(_) => (0, None, None),
        };
        let done = start.elapsed().as_secs_f64();
        if retry && !matches!(status, 201 | 402) {
            again = Some((key.clone(), amount, attempt));
        }
        answers.push(Answer {
            sent,
            done,
            status,
            code,
            id,
            key,
            attempt,
            slow_client: false,
        });
        if status == 0 {
            // No server to talk to: do not spin.
            thread::sleep(Duration::from_millis(20));
        }
    }
    answers
}

/// One slow client: a payment's head, then its body a byte every 200 ms, until the server
/// answers or closes; again, while the fault lasts.
fn slow_client(url: &RwLock<String>, n: usize, start: Instant, until: &AtomicBool) -> Vec<Answer> {
    let mut answers = Vec::new();
    let mut i = 0;
    while !until.load(Ordering::Relaxed) {
        i += 1;
        let base = url.read().map(|u| u.clone()).unwrap_or_default();
        let addr = base.trim_start_matches("http://").to_string();
        let key = format!("slow-{n}-{i}");
        let body = r#"{"amount":1999,"currency":"usd","source":"tok_visa"}"#;
        let head = format!(
            "POST /payments HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {DEV_API_KEY}\r\n\
             Idempotency-Key: {key}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        let sent = start.elapsed().as_secs_f64();
        let status = trickle(&addr, head.as_bytes(), body.as_bytes(), until);
        answers.push(Answer {
            sent,
            done: start.elapsed().as_secs_f64(),
            status,
            code: None,
            id: None,
            key,
            attempt: 1,
            slow_client: true,
        });
        if status == 0 {
            thread::sleep(Duration::from_millis(50));
        }
    }
    answers
}

/// Sends `head`, then `body` a byte every 200 ms; the status of the answer, 0 when the
/// connection closed without one.
fn trickle(addr: &str, head: &[u8], body: &[u8], until: &AtomicBool) -> u16 {
    use std::io::{Read, Write};
    let Ok(mut stream) = std::net::TcpStream::connect(addr) else {
        return 0;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(30)));
    if stream.write_all(head).is_err() {
        return 0;
    }
    for byte in body {
        thread::sleep(Duration::from_millis(200));
        // Stop early when the server has answered (the write fails) or the fault is over.
        if until.load(Ordering::Relaxed) {
            // Given up: whatever answers a request whose body never came has a second.
            let _ = stream.set_read_timeout(Some(Duration::from_secs(1)));
            break;
        }
        if stream.write_all(&[*byte]).is_err() {
            break;
        }
    }
    let mut answer = [0u8; 64];
    match stream.read(&mut answer) {
        Ok(n) if n >= 12 => std::str::from_utf8(&answer[9..12])
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(0),
        _ => 0,
    }
}

/// A scratch directory for the run's database, removed when dropped.
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Sends `sig` with kill(1): no unsafe code for a signal.
fn signal(process: &Proc, sig: &str) -> Result<(), String> {
    let ok = Command::new("kill")
        .args([format!("-{sig}"), process.0.id().to_string()])
        .status()
        .map_err(|e| format!("cannot run kill: {e}"))?
        .success();
    if ok {
        Ok(())
    } else {
        Err(format!("kill -{sig} failed"))
    }
}

/// Sends SIGTERM (unless the run sent it already: a second signal cuts the drain short) and
/// waits for the exit, at most `within`; then kills (when dropped).
fn stop_gracefully(mut server: Proc, signalled: bool, within: Duration) -> Option<i32> {
    if !signalled {
        let _ = signal(&server, "TERM");
    }
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if let Ok(Some(status)) = server.0.try_wait() {
            return status.code();
        }
        thread::sleep(Duration::from_millis(20));
    }
    None
}

/// Payments still `processing` or `pending`, read from the file while the server runs (WAL:
/// a reader sees what was committed).
fn unsettled(db: &Path) -> Result<i64, String> {
    let conn = invariants::open_read_only(db)?;
    conn.query_row(
        "SELECT COUNT(*) FROM payments WHERE status IN ('processing','pending')",
        [],
        |r| r.get(0),
    )
    .map_err(|e| e.to_string())
}

pub(crate) fn execute(run: &Run, duration: Duration, seed: u64) -> Result<RunResult, String> {
    let dir = std::env::temp_dir().join(format!("paytrace-scenario-{:08x}", rand::random::<u32>()));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let scratch = Scratch(dir);
    let db = scratch.0.join("paytrace.db");
    let provider = spawn(&[
        "provider".into(),
        "--addr".into(),
        "127.0.0.1:0".into(),
        "--latency".into(),
        format!("{}ms", run.base_latency_ms),
        "--seed".into(),
        seed.to_string(),
    ])?;
    let mut serve_args: Vec<String> = vec![
        "serve".into(),
        "--addr".into(),
        "127.0.0.1:0".into(),
        "--db".into(),
        db.display().to_string(),
        "--provider-url".into(),
        provider.1.clone(),
    ];
    serve_args.extend(run.serve_args.iter().cloned());
    let mut server = spawn(&serve_args)?;
    // Where the clients send their requests, and where `/metrics` is read: the same server,
    // unless the clients go through nginx.
    let server_url = Arc::new(RwLock::new(server.1.clone()));
    let front = if run.via_nginx {
        Some(Nginx::single(&server.1)?)
    } else {
        None
    };
    let url = match &front {
        Some(nginx) => Arc::new(RwLock::new(nginx.url.clone())),
        None => server_url.clone(),
    };
    let control = agent(Duration::from_secs(5));
    if matches!(run.fault, Fault::SlowWrites) {
        // Started with the fault on; the load starts without it.
        switch_write_delay(&server, &control, false)?;
    }

    let start = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..run.clients)
        .map(|n| {
            let (url, stop) = (url.clone(), stop.clone());
            let retry = run.retry;
            thread::spawn(move || client(&url, seed, n, retry, start, &stop))
        })
        .collect();
    let samples = Arc::new(Mutex::new(Vec::new()));
    let sampler = {
        let (url, stop, samples) = (server_url.clone(), stop.clone(), samples.clone());
        thread::spawn(move || {
            let agent = agent(Duration::from_secs(1));
            let mut next = start + TICK;
            while !stop.load(Ordering::Relaxed) {
                let now = Instant::now();
                if next > now {
                    thread::sleep(next - now);
                }
                let t = next.duration_since(start).as_secs_f64();
                let base = url.read().map(|u| u.clone()).unwrap_or_default();
                let s = sample(&agent, &base, t).unwrap_or(Sample {
                    t,
                    ..Sample::default()
                });
                samples.lock().unwrap_or_else(|e| e.into_inner()).push(s);
                next += TICK;
            }
        })
    };
    let fault_at = duration.mul_f64(0.2);
    let recover_at = duration.mul_f64(0.6);
    let sleep_until = |at: Duration| {
        let elapsed = start.elapsed();
        if at > elapsed {
            thread::sleep(at - elapsed);
        }
    };
    sleep_until(fault_at);
    let slow_until = Arc::new(AtomicBool::new(false));
    let slow: Vec<_> = match run.fault {
        Fault::SlowClients { n } => (0..n)
            .map(|i| {
                let (url, until) = (url.clone(), slow_until.clone());
                thread::spawn(move || slow_client(&url, i, start, &until))
            })
            .collect(),
        _ => Vec::new(),
    };
    let injected = match &run.fault {
        Fault::Provider { on, .. } => put_faults(&control, &provider.1, on),
        Fault::Sigterm => signal(&server, "TERM"),
        Fault::CrashAndRestart => server.0.kill().map_err(|e| format!("cannot kill -9: {e}")),
        Fault::SlowClients { .. } => Ok(()),
        Fault::SlowWrites => switch_write_delay(&server, &control, true),
    };
    let fault_t = start.elapsed().as_secs_f64();
    sleep_until(recover_at);
    let recovered = match &run.fault {
        Fault::Provider { off, .. } => put_faults(&control, &provider.1, off),
        Fault::Sigterm => Ok(()),
        Fault::SlowWrites => switch_write_delay(&server, &control, false),
        Fault::SlowClients { .. } => {
            slow_until.store(true, Ordering::Relaxed);
            Ok(())
        }
        Fault::CrashAndRestart => {
            let _ = server.0.wait();
            // The same command on the same database; a new port, which the clients pick up.
            spawn(&serve_args).map(|restarted| {
                if let Ok(mut u) = server_url.write() {
                    *u = restarted.1.clone();
                }
                server = restarted;
            })
        }
    };
    let recover_t = start.elapsed().as_secs_f64();
    sleep_until(duration);
    stop.store(true, Ordering::Relaxed);
    let mut answers: Vec<Answer> = clients
        .into_iter()
        .chain(slow)
        .flat_map(|c| c.join().unwrap_or_default())
        .collect();
    answers.sort_by(|a, b| a.done.total_cmp(&b.done));
    let _ = sampler.join();
    let samples = std::mem::take(&mut *samples.lock().unwrap_or_else(|e| e.into_inner()));
    injected?;
    recovered?;

    // The reconciler settles what the clients left behind; give it a deadline, not a sleep.
    let settle_start = Instant::now();
    let mut left = unsettled(&db)?;
    while left > 0 && settle_start.elapsed() < SETTLE_WITHIN {
        thread::sleep(Duration::from_millis(200));
        left = unsettled(&db)?;
    }
    let settled_after = settle_start.elapsed();
    let stats: Value = control
        .get(format!("{}/v1/stats", provider.1))
        .call()
        .map_err(|e| format!("cannot read the provider's stats: {e}"))?
        .into_body()
        .read_json()
        .map_err(|e| format!("the provider's stats are not JSON: {e}"))?;
    let signalled = matches!(run.fault, Fault::Sigterm);
    let exit = stop_gracefully(
        server,
        signalled,
        run.request_timeout + Duration::from_secs(5),
    );
    drop(front);
    drop(provider);
    let invariants = invariants::check_invariants(&db, &answers, &stats, settled_after, exit)?;
    Ok(RunResult {
        label: run.label,
        fault_text: run.fault_text.clone(),
        fault_t,
        recover_t,
        duration: duration.as_secs_f64(),
        request_timeout: run.request_timeout,
        via_nginx: run.via_nginx,
        server_exit: exit,
        answers,
        samples,
        invariants,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_metric_is_one_series_or_the_sum_of_its_labels() {
        let text = "# HELP x\npaytrace_queue_depth 3\n\
                    paytrace_requests_shed_total{reason=\"queue_full\"} 2\n\
                    paytrace_requests_shed_total{reason=\"breaker_open\"} 5\n\
                    paytrace_queue_depth_other 9\n";
        assert_eq!(metric(text, "paytrace_queue_depth"), 3.0);
        assert_eq!(metric(text, "paytrace_requests_shed_total"), 7.0);
        assert_eq!(
            metric(text, "paytrace_requests_shed_total{reason=\"queue_full\"}"),
            2.0
        );
        assert_eq!(metric(text, "paytrace_missing"), 0.0);
    }
}
