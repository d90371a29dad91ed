//! Spawns the real binary on port 0 with a temporary database, and talks to it over real
//! sockets. Nothing here sleeps to hope: every wait polls a condition until a deadline.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;

pub const KEY: &str = "sk_test_paytrace";

/// Tests that put heavy load on the machine, and tests that assert tight timings, take this
/// lock so that they never run at the same time (the rest still run in parallel).
pub fn exclusive() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// A running `paytrace` process; killed when dropped.
pub struct Proc {
    child: Child,
    pub addr: SocketAddr,
    pub url: String,
    log: Arc<Mutex<Vec<String>>>,
    /// Set when the log reader has seen the end of stderr (the process is gone and every line
    /// it wrote has been read).
    log_done: Arc<std::sync::atomic::AtomicBool>,
}

impl Proc {
    /// Starts `paytrace <args>` and waits (≤ 20 s) for its `listening on http://ADDR` line.
    pub fn start(args: &[&str]) -> Proc {
        Proc::start_with(Command::new(env!("CARGO_BIN_EXE_paytrace")), args)
    }

    pub fn start_with(mut cmd: Command, args: &[&str]) -> Proc {
        if !cmd.get_envs().any(|(k, _)| k == "RUST_LOG") {
            cmd.env("RUST_LOG", "info");
        }
        let mut child = cmd
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("paytrace starts");
        let stderr = child.stderr.take().expect("stderr is piped");
        let log = Arc::new(Mutex::new(Vec::new()));
        let log_done = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (sink, done) = (log.clone(), log_done.clone());
        thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                sink.lock().unwrap().push(line);
            }
            done.store(true, std::sync::atomic::Ordering::SeqCst);
        });
        let mut proc = Proc {
            child,
            addr: "0.0.0.0:0".parse().unwrap(),
            url: String::new(),
            log,
            log_done,
        };
        let line = proc.wait_for_log("listening on http://", Duration::from_secs(20));
        let addr = line
            .split("listening on http://")
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .expect("an address follows `listening on`");
        proc.addr = addr.parse().expect("a socket address");
        proc.url = format!("http://{addr}");
        proc
    }

    /// The first log line containing `needle`, waiting up to `within` (also after the process
    /// exited, until every line it wrote has been read).
    pub fn wait_for_log(&mut self, needle: &str, within: Duration) -> String {
        let deadline = Instant::now() + within;
        loop {
            if let Some(line) = self.log.lock().unwrap().iter().find(|l| l.contains(needle)) {
                return line.clone();
            }
            let all_read = self.log_done.load(std::sync::atomic::Ordering::SeqCst);
            if let (true, Ok(Some(status))) = (all_read, self.child.try_wait()) {
                panic!(
                    "paytrace exited ({status}) before logging `{needle}`:\n{}",
                    self.log_text()
                );
            }
            assert!(
                Instant::now() < deadline,
                "no `{needle}` in the log within {within:?}:\n{}",
                self.log_text()
            );
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// Sends a signal (`TERM`, `INT`, …) with kill(1).
    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([format!("-{sig}"), self.child.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -{sig} failed");
    }

    /// The process id (for reading `/proc/PID/…`).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Every line logged so far.
    pub fn log_lines(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }

    pub fn log_text(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    /// Waits up to `within` for the process to exit; its exit code.
    pub fn wait_exit(&mut self, within: Duration) -> Option<i32> {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.code();
            }
            thread::sleep(Duration::from_millis(10));
        }
        None
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A `paytrace serve` with its own temporary database.
pub struct Serve {
    pub proc: Proc,
    pub dir: tempfile::TempDir,
    /// The provider it charges (the embedded one unless `--provider-url` was given).
    pub provider_url: String,
}

impl Serve {
    pub fn start(args: &[&str]) -> Serve {
        Serve::start_in(tempfile::tempdir().unwrap(), args)
    }

    /// Starts on the database in `dir` (to restart after a crash).
    pub fn start_in(dir: tempfile::TempDir, args: &[&str]) -> Serve {
        Serve::start_cmd(Command::new(env!("CARGO_BIN_EXE_paytrace")), dir, args)
    }

    /// Starts `cmd` (with its environment, e.g. `RUST_LOG`) as `serve` on a fresh database; a
    /// `paytrace` command runs the server [`server_binary`] names.
    pub fn start_cmd(cmd: Command, dir: tempfile::TempDir, args: &[&str]) -> Serve {
        let cmd = serve_command(cmd);
        let db = dir.path().join("paytrace.db");
        let mut all = vec![
            "serve",
            "--addr",
            "127.0.0.1:0",
            "--db",
            db.to_str().unwrap(),
        ];
        all.extend_from_slice(args);
        let proc = Proc::start_with(cmd, &all);
        let line = proc
            .log
            .lock()
            .unwrap()
            .iter()
            .find(|l| l.contains("listening on"))
            .cloned()
            .unwrap();
        let provider_url = line
            .split("provider ")
            .last()
            .map(|s| s.trim().to_string())
            .unwrap_or_default();
        Serve {
            proc,
            dir,
            provider_url,
        }
    }

    pub fn url(&self) -> &str {
        &self.proc.url
    }

    /// SIGKILL, no chance to clean up; the database directory is handed back.
    pub fn kill9(self) -> tempfile::TempDir {
        let Serve { mut proc, dir, .. } = self;
        proc.child.kill().unwrap();
        proc.child.wait().unwrap();
        dir
    }

    pub fn db(&self) -> rusqlite::Connection {
        rusqlite::Connection::open(self.dir.path().join("paytrace.db")).unwrap()
    }

    /// `PRAGMA integrity_check` of the database: `ok` when it is sound.
    pub fn integrity(&self) -> String {
        self.db()
            .query_row("PRAGMA integrity_check", [], |r| r.get(0))
            .unwrap()
    }

    /// Whether the write-ahead log is empty or gone: everything is in the database file.
    pub fn wal_is_checkpointed(&self) -> bool {
        std::fs::metadata(self.dir.path().join("paytrace.db-wal"))
            .map(|m| m.len() == 0)
            .unwrap_or(true)
    }

    /// `status` of every payment row, by id.
    pub fn rows(&self) -> Vec<(String, String)> {
        let db = self.db();
        let mut stmt = db
            .prepare("SELECT id, status FROM payments ORDER BY seq")
            .unwrap();
        stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .unwrap()
            .map(Result::unwrap)
            .collect()
    }
}

/// The binary `serve` runs: `paytrace`, or, with `PAYTRACE_TEST_SERVER=async` in a build with
/// the `async-twin` feature, the async twin `paytrace-async`, which serves the same API — so
/// the same tests check both servers (`.ci/run` runs the API contract's modules both ways).
pub fn server_binary() -> &'static str {
    match std::env::var("PAYTRACE_TEST_SERVER").as_deref() {
        Err(_) | Ok("" | "sync") => env!("CARGO_BIN_EXE_paytrace"),
        Ok("async") => twin_binary(),
        Ok(other) => panic!("PAYTRACE_TEST_SERVER is `sync` or `async`, not `{other}`"),
    }
}

#[cfg(feature = "async-twin")]
fn twin_binary() -> &'static str {
    env!("CARGO_BIN_EXE_paytrace-async")
}

#[cfg(not(feature = "async-twin"))]
fn twin_binary() -> &'static str {
    panic!("PAYTRACE_TEST_SERVER=async needs the twin: cargo test --features async-twin")
}

/// Whether the tests run against the async twin.
pub fn on_twin() -> bool {
    server_binary() != env!("CARGO_BIN_EXE_paytrace")
}

/// `cmd` itself, or — when it runs `paytrace` and the tests run against the twin — the same
/// arguments, environment and directory for the twin.
fn serve_command(cmd: Command) -> Command {
    if !on_twin() || cmd.get_program() != env!("CARGO_BIN_EXE_paytrace") {
        return cmd;
    }
    let mut twin = Command::new(server_binary());
    for (k, v) in cmd.get_envs() {
        match v {
            Some(v) => twin.env(k, v),
            None => twin.env_remove(k),
        };
    }
    twin.args(cmd.get_args());
    if let Some(dir) = cmd.get_current_dir() {
        twin.current_dir(dir);
    }
    twin
}

/// `paytrace provider` on a free port.
pub fn provider(args: &[&str]) -> Proc {
    let mut all = vec!["provider", "--addr", "127.0.0.1:0"];
    all.extend_from_slice(args);
    Proc::start(&all)
}

/// A response as a client sees it.
#[derive(Debug)]
pub struct Resp {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Value,
    pub elapsed: Duration,
}

impl Resp {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

pub fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(20)))
        .build()
        .new_agent()
}

pub fn to_resp(r: Result<ureq::http::Response<ureq::Body>, ureq::Error>, started: Instant) -> Resp {
    let mut r = r.expect("a response");
    let status = r.status().as_u16();
    let headers = r
        .headers()
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").to_string()))
        .collect();
    let text = r.body_mut().read_to_string().unwrap_or_default();
    let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
    Resp {
        status,
        headers,
        body,
        elapsed: started.elapsed(),
    }
}

pub fn get(url: &str) -> Resp {
    let t = Instant::now();
    to_resp(
        agent()
            .get(url)
            .header("Authorization", format!("Bearer {KEY}"))
            .call(),
        t,
    )
}

pub fn get_json(url: &str) -> Value {
    get(url).body
}

/// `POST {base}/payments` with the dev key, `key` and a JSON body.
pub fn pay(base: &str, key: &str, body: &str) -> Resp {
    pay_with(base, key, body, &[])
}

pub fn pay_with(base: &str, key: &str, body: &str, extra: &[(&str, &str)]) -> Resp {
    pay_full(base, KEY, key, body, extra)
}

/// `POST {base}/payments` as another API key.
pub fn pay_as(base: &str, api: &str, key: &str, body: &str) -> Resp {
    pay_full(base, api, key, body, &[])
}

fn pay_full(base: &str, api: &str, key: &str, body: &str, extra: &[(&str, &str)]) -> Resp {
    let mut req = agent()
        .post(format!("{base}/payments"))
        .header("Authorization", format!("Bearer {api}"))
        .header("Idempotency-Key", key);
    if !extra
        .iter()
        .any(|(k, _)| k.eq_ignore_ascii_case("Content-Type"))
    {
        req = req.header("Content-Type", "application/json");
    }
    for (k, v) in extra {
        req = req.header(*k, *v);
    }
    let t = Instant::now();
    to_resp(req.send(body.as_bytes()), t)
}

pub fn body(amount: u32) -> String {
    format!(r#"{{"amount":{amount},"currency":"usd","source":"tok_visa"}}"#)
}

/// `PUT /_control/faults` on a simulated provider.
pub fn set_faults(provider: &Proc, json: &str) {
    let r = agent()
        .put(format!("{}/_control/faults", provider.url))
        .send(json.as_bytes())
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
}

pub fn provider_stats(provider_url: &str) -> Value {
    get_json(&format!("{provider_url}/v1/stats"))
}

/// Sends raw bytes on a new connection and reads the answer (status, head, body) until the
/// server closes, waiting at most `within`.
pub fn raw(addr: SocketAddr, bytes: &[u8], within: Duration) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(within)).unwrap();
    s.write_all(bytes).unwrap();
    read_response(&mut s)
}

/// Reads one response (headers + Content-Length body); status 0 if none came.
pub fn read_response(s: &mut TcpStream) -> (u16, String) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = find(&buf, b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_string();
            let len = head
                .lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse::<usize>().ok())?
                })
                .unwrap_or(0);
            while buf.len() < end + 4 + len {
                match s.read(&mut chunk) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
            }
            let status = head
                .split_whitespace()
                .nth(1)
                .and_then(|s| s.parse().ok())
                .unwrap_or(0);
            return (status, String::from_utf8_lossy(&buf).to_string());
        }
        match s.read(&mut chunk) {
            Ok(0) | Err(_) => return (0, String::from_utf8_lossy(&buf).to_string()),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// An address where nothing listens (bound, then released).
pub fn dead_addr() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

/// Runs `f(0)`, …, `f(n − 1)` on `n` threads released at the same moment; their results in
/// order.
pub fn concurrently<T: Send>(n: usize, f: impl Fn(usize) -> T + Sync) -> Vec<T> {
    let start = std::sync::Barrier::new(n);
    thread::scope(|s| {
        let handles: Vec<_> = (0..n)
            .map(|i| {
                let (f, start) = (&f, &start);
                s.spawn(move || {
                    start.wait();
                    f(i)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

/// Polls `f` every 20 ms until it returns `Some`, or panics after `within`.
pub fn eventually<T>(within: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "not within {within:?}: {what}");
        thread::sleep(Duration::from_millis(20));
    }
}

/// What a process holds right now, from `/proc`: its thread count (`Threads:` in
/// `/proc/PID/status`) and its open file descriptors (entries of `/proc/PID/fd`).
pub fn threads_and_fds(pid: u32) -> (usize, usize) {
    let threads = proc_status_field(pid, "Threads:").unwrap_or(0) as usize;
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0);
    (threads, fds)
}

/// The resident memory of a process in KiB (`VmRSS:` in `/proc/PID/status`); 0 once it is gone.
pub fn rss_kib(pid: u32) -> u64 {
    proc_status_field(pid, "VmRSS:").unwrap_or(0)
}

fn proc_status_field(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    line[field.len()..].split_whitespace().next()?.parse().ok()
}

/// One request of a randomized run: the key, the amount sent, the answer.
pub type Sent = (String, u32, Resp);

/// `threads` clients sending `per_thread` payments each, every one to a server of `urls` drawn
/// at random: mostly with fresh keys, one in ten with a key the client used before (three in
/// ten of those with a changed amount: a 422). Seeded (`seed + thread`). Returns the amount
/// each key was first sent with, and every request.
pub fn random_payments(
    urls: &[String],
    threads: u64,
    per_thread: usize,
    seed: u64,
) -> (std::collections::BTreeMap<String, u32>, Vec<Sent>) {
    use rand::{Rng, SeedableRng};
    let mut first_amount = std::collections::BTreeMap::new();
    let mut all = Vec::new();
    thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                s.spawn(move || {
                    let mut rng = rand::rngs::StdRng::seed_from_u64(seed + t);
                    let mut used: Vec<(String, u32)> = Vec::new();
                    let mut seen = Vec::new();
                    for i in 0..per_thread {
                        let (key, amount) = if !used.is_empty() && rng.random_bool(0.1) {
                            let (k, a) = used[rng.random_range(0..used.len())].clone();
                            let a = if rng.random_bool(0.3) { a + 1 } else { a };
                            (k, a)
                        } else {
                            let k = format!("r-{t}-{i}");
                            let a = rng.random_range(1..10_000);
                            used.push((k.clone(), a));
                            (k, a)
                        };
                        let url = match urls.len() {
                            1 => &urls[0],
                            n => &urls[rng.random_range(0..n)],
                        };
                        let r = pay(url, &key, &body(amount));
                        seen.push((key, amount, r));
                    }
                    (used, seen)
                })
            })
            .collect();
        for h in handles {
            let (used, seen) = h.join().unwrap();
            first_amount.extend(used);
            all.extend(seen);
        }
    });
    (first_amount, all)
}

/// The answers of [`random_payments`] as a client sees them: never a 500; a 422 only for a
/// changed amount; every answer naming a payment names the same one for its key. Returns the
/// ids answered 201.
pub fn check_random_answers(
    first_amount: &std::collections::BTreeMap<String, u32>,
    all: &[Sent],
) -> Vec<String> {
    let mut key_ids = std::collections::BTreeMap::new();
    let mut created = Vec::new();
    for (key, amount, r) in all {
        assert_ne!(r.status, 500, "{key}: {}", r.body);
        if r.status == 422 {
            assert_ne!(
                *amount, first_amount[key],
                "{key}: 422 for an unchanged body"
            );
            continue;
        }
        let id = r.body["id"].as_str().or(r.body["payment"]["id"].as_str());
        if let Some(id) = id {
            let previous = key_ids.entry(key.clone()).or_insert_with(|| id.to_string());
            assert_eq!(previous, id, "{key} maps to two payments");
        }
        if r.status == 201 {
            created.push(id.unwrap().to_string());
        }
    }
    created
}

/// Every payment answered 201 is stored as `succeeded` in `rows` (id, status); returns how many
/// rows are `succeeded`.
pub fn assert_created_are_stored(rows: &[(String, String)], created: &[String]) -> usize {
    let status: std::collections::BTreeMap<&str, &str> =
        rows.iter().map(|(i, s)| (i.as_str(), s.as_str())).collect();
    for id in created {
        assert_eq!(
            status.get(id.as_str()),
            Some(&"succeeded"),
            "201 {id} is stored"
        );
    }
    rows.iter().filter(|(_, s)| s == "succeeded").count()
}
