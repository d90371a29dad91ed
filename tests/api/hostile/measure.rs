//! How the hostile corpus measures: the target (serve alone or behind nginx), connections
//! watched without blocking, the process's threads, fds and VmRSS sampled, and the table.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use super::{DEADLINE, FD_MARGIN, SETTLE, SOCKET_TIMEOUT, THREAD_MARGIN};
use crate::helpers::*;
use crate::nginx::{Nginx, Relay};

pub struct Target {
    pub name: &'static str,
    pub serve: Serve,
    /// nginx with the relay that counts what it forwards; `None`: clients reach `serve` directly.
    pub front: Option<(Nginx, Relay)>,
}

impl Target {
    pub fn direct() -> Target {
        Target {
            name: "direct",
            serve: Serve::start(&["--socket-timeout", SOCKET_TIMEOUT]),
            front: None,
        }
    }

    pub fn through_nginx() -> Target {
        let serve = Serve::start(&["--socket-timeout", SOCKET_TIMEOUT]);
        let relay = Relay::start(serve.proc.addr);
        let nginx = Nginx::start(&[relay.addr]);
        Target {
            name: "through nginx",
            serve,
            front: Some((nginx, relay)),
        }
    }

    pub fn nginx(&self) -> bool {
        self.front.is_some()
    }

    /// Where clients connect.
    pub fn addr(&self) -> SocketAddr {
        match &self.front {
            Some((nginx, _)) => nginx.addr,
            None => self.serve.proc.addr,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr())
    }

    /// paytrace's process id (behind nginx too).
    pub fn pid(&self) -> u32 {
        self.serve.proc.pid()
    }

    pub fn usage(&self) -> Usage {
        let (threads, fds) = threads_and_fds(self.pid());
        Usage { threads, fds }
    }

    /// Connections nginx has opened to paytrace so far.
    pub fn forwarded(&self) -> Option<usize> {
        self.front.as_ref().map(|(_, relay)| relay.accepted())
    }
}

#[derive(Clone, Copy, Debug)]
pub struct Usage {
    pub threads: usize,
    pub fds: usize,
}

/// Polls until threads and fds are within the margins of `before`, up to [`SETTLE`]; the last
/// sample, and whether it got there.
pub fn settle(t: &Target, before: Usage) -> (Usage, bool) {
    let deadline = Instant::now() + SETTLE;
    loop {
        let now = t.usage();
        let back =
            now.threads <= before.threads + THREAD_MARGIN && now.fds <= before.fds + FD_MARGIN;
        if back || Instant::now() >= deadline {
            return (now, back);
        }
        thread::sleep(Duration::from_millis(50));
    }
}

#[derive(Clone, Copy, Debug, Default)]
pub struct Peak {
    pub threads: usize,
    pub fds: usize,
    pub rss_kib: u64,
}

/// Samples a process's threads, fds and VmRSS every 10 ms, keeping the peaks.
pub struct Sampler {
    pub stop: Arc<AtomicBool>,
    pub peak: Arc<Mutex<Peak>>,
    pub rss_now: Arc<AtomicU64>,
    pub handle: Option<thread::JoinHandle<()>>,
}

impl Sampler {
    pub fn start(pid: u32) -> Sampler {
        let stop = Arc::new(AtomicBool::new(false));
        let peak = Arc::new(Mutex::new(Peak::default()));
        let rss_now = Arc::new(AtomicU64::new(rss_kib(pid)));
        let (s, p, r) = (stop.clone(), peak.clone(), rss_now.clone());
        let handle = thread::spawn(move || {
            while !s.load(Ordering::SeqCst) {
                let (threads, fds) = threads_and_fds(pid);
                let rss = rss_kib(pid);
                r.store(rss, Ordering::SeqCst);
                let mut p = p.lock().unwrap();
                p.threads = p.threads.max(threads);
                p.fds = p.fds.max(fds);
                p.rss_kib = p.rss_kib.max(rss);
                drop(p);
                thread::sleep(Duration::from_millis(10));
            }
        });
        Sampler {
            stop,
            peak,
            rss_now,
            handle: Some(handle),
        }
    }

    pub fn finish(mut self) -> Peak {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
        *self.peak.lock().unwrap()
    }
}

/// The rows of one case, which share a baseline, a sampler and a settle check.
pub struct Group<'a> {
    pub t: &'a Target,
    pub before: Usage,
    pub sampler: Sampler,
    pub last_forwarded: Option<usize>,
    pub rows: Vec<Row>,
    pub pending: Vec<String>,
}

impl<'a> Group<'a> {
    pub fn start(t: &'a Target) -> Group<'a> {
        Group {
            t,
            before: t.usage(),
            sampler: Sampler::start(t.pid()),
            last_forwarded: t.forwarded(),
            rows: Vec::new(),
            pending: Vec::new(),
        }
    }

    /// Connections nginx opened to paytrace since the last call (`None` without nginx).
    pub fn forwarded_since_last(&mut self) -> Option<usize> {
        let now = self.t.forwarded()?;
        let delta = now - self.last_forwarded.unwrap_or(0);
        self.last_forwarded = Some(now);
        Some(delta)
    }

    pub fn row(
        &mut self,
        case: &str,
        seen: &[Seen],
        forwarded: Option<usize>,
        mut failures: Vec<String>,
    ) {
        failures.append(&mut self.pending);
        self.rows.push(Row::new(case, seen, forwarded, failures));
    }

    /// A failure of the whole case, filed with the next row.
    pub fn fail_next(&mut self, failure: String) {
        self.pending.push(failure);
    }

    pub fn fail_last(&mut self, failure: String) {
        if let Some(r) = self.rows.last_mut() {
            r.failures.push(failure);
        }
    }

    /// Waits for threads and fds to come back, then files the rows with the usage.
    pub fn finish(mut self, table: &mut Vec<Row>) {
        let (after, back) = settle(self.t, self.before);
        let peak = self.sampler.finish();
        let before = self.before;
        for r in self.rows.iter_mut() {
            r.threads = (
                before.threads,
                peak.threads.max(after.threads),
                after.threads,
            );
            r.fds = (before.fds, peak.fds.max(after.fds), after.fds);
            r.rss_peak_kib = peak.rss_kib;
        }
        if !back && let Some(r) = self.rows.first_mut() {
            r.failures.push(format!(
                "threads/fds not back within {SETTLE:?}: {before:?} → {after:?} \
                 (margins +{THREAD_MARGIN}/+{FD_MARGIN})"
            ));
        }
        table.append(&mut self.rows);
    }
}

// ---------------------------------------------------------------------------------------------
// One hostile connection, watched without blocking

/// What one connection saw.
#[derive(Clone, Debug, Default)]
pub struct Seen {
    pub status: Option<u16>,
    /// The response head (status line and headers).
    pub head: String,
    /// From the request's first byte to the status line.
    pub answered: Option<Duration>,
    /// From the request's first byte to EOF or a reset.
    pub closed: Option<Duration>,
}

pub struct Conn {
    pub s: TcpStream,
    pub sent: Instant,
    pub buf: Vec<u8>,
    pub seen: Seen,
}

impl Conn {
    /// Connects, writes `first`, and switches to non-blocking reads and writes.
    pub fn open(addr: SocketAddr, first: &[u8]) -> Conn {
        let mut s = TcpStream::connect(addr).unwrap();
        let sent = Instant::now();
        s.set_write_timeout(Some(Duration::from_secs(2))).unwrap();
        // A server that closes at once may make this fail: that is what `poll` will see.
        let _ = s.write_all(first);
        s.set_nonblocking(true).unwrap();
        Conn {
            s,
            sent,
            buf: Vec::new(),
            seen: Seen::default(),
        }
    }

    /// Reads whatever arrived; true once the connection is closed.
    pub fn poll(&mut self) -> bool {
        let mut chunk = [0u8; 4096];
        while self.seen.closed.is_none() {
            match self.s.read(&mut chunk) {
                Ok(0) => self.seen.closed = Some(self.sent.elapsed()),
                Ok(n) => {
                    self.buf.extend_from_slice(&chunk[..n]);
                    self.parse();
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return false,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => self.seen.closed = Some(self.sent.elapsed()),
            }
        }
        true
    }

    /// Sends a few bytes if the connection is still open (a failed write means it is not).
    pub fn send_some(&mut self, bytes: &[u8]) {
        if self.poll() {
            return;
        }
        match self.s.write(bytes) {
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::Interrupted => {}
            Err(_) => {
                self.poll();
            }
        }
    }

    pub fn parse(&mut self) {
        if self.seen.status.is_some() {
            return;
        }
        let Some(end) = self.buf.windows(2).position(|w| w == b"\r\n") else {
            return;
        };
        let line = String::from_utf8_lossy(&self.buf[..end]).to_string();
        self.seen.status = Some(
            line.split_whitespace()
                .nth(1)
                .and_then(|s| s.parse().ok())
                .unwrap_or(0),
        );
        self.seen.answered = Some(self.sent.elapsed());
        let head_end = self
            .buf
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .unwrap_or(self.buf.len());
        self.seen.head = String::from_utf8_lossy(&self.buf[..head_end]).to_string();
    }
}

/// Polls every connection (all of them, each time); true once all are closed.
pub fn poll_all(conns: &mut [Conn]) -> bool {
    let mut all = true;
    for c in conns {
        all &= c.poll();
    }
    all
}

pub fn poll_all_pairs<K>(conns: &mut [(K, Conn)]) -> bool {
    let mut all = true;
    for (_, c) in conns {
        all &= c.poll();
    }
    all
}

// ---------------------------------------------------------------------------------------------
// Expectations and the table

/// Each connection got one of the `allowed` statuses, or — if `or_close` — was closed without
/// an answer.
pub fn expect_status(seen: &[Seen], allowed: &[u16], or_close: bool, fails: &mut Vec<String>) {
    let wrong: Vec<String> = seen
        .iter()
        .filter_map(|s| match s.status {
            Some(code) if !allowed.contains(&code) => Some(code.to_string()),
            None if s.closed.is_none() => Some("no answer, still open".to_string()),
            None if !or_close => Some("closed without an answer".to_string()),
            _ => None,
        })
        .collect();
    if !wrong.is_empty() {
        fails.push(format!(
            "{} of {} got {} (expected {allowed:?}{})",
            wrong.len(),
            seen.len(),
            summary_of(wrong),
            if or_close { " or a close" } else { "" }
        ));
    }
}

pub fn expect_not_forwarded(forwarded: Option<usize>, fails: &mut Vec<String>) {
    if let Some(n) = forwarded
        && n > 0
    {
        fails.push(format!("nginx forwarded {n} of these to paytrace"));
    }
}

/// Closed by the server while the test watched (each watch lasts [`DEADLINE`]).
pub fn expect_closed(seen: &[Seen], fails: &mut Vec<String>) {
    let open = seen.iter().filter(|s| s.closed.is_none()).count();
    if open > 0 {
        fails.push(format!(
            "{open} of {} still open after {DEADLINE:?}",
            seen.len()
        ));
    }
}

pub fn expect_closed_within(seen: &[Seen], within: Duration, fails: &mut Vec<String>) {
    let late = seen
        .iter()
        .filter(|s| s.closed.is_none_or(|c| c > within))
        .count();
    if late > 0 {
        fails.push(format!(
            "{late} of {} not closed within {within:?}",
            seen.len()
        ));
    }
}

pub fn expect_answered_within(seen: &[Seen], within: Duration, fails: &mut Vec<String>) {
    let late = seen
        .iter()
        .filter(|s| s.answered.or(s.closed).is_none_or(|a| a > within))
        .count();
    if late > 0 {
        fails.push(format!(
            "{late} of {} neither answered nor closed within {within:?}",
            seen.len()
        ));
    }
}

/// One line of the table.
pub struct Row {
    pub case: String,
    pub n: usize,
    pub answers: String,
    pub answered_max: String,
    pub closed_max: String,
    pub threads: (usize, usize, usize),
    pub fds: (usize, usize, usize),
    pub rss_peak_kib: u64,
    /// Requests nginx forwarded to paytrace during this row (or the whole case, on its first
    /// row, when the case's connections run at once).
    pub forwarded: String,
    pub failures: Vec<String>,
}

impl Row {
    pub fn new(case: &str, seen: &[Seen], forwarded: Option<usize>, failures: Vec<String>) -> Row {
        let labels: Vec<String> = seen
            .iter()
            .map(|s| match (s.status, s.closed) {
                (Some(code), Some(_)) => code.to_string(),
                (Some(code), None) => format!("{code} (left open)"),
                (None, Some(_)) => "closed".to_string(),
                (None, None) => "open".to_string(),
            })
            .collect();
        let max =
            |f: fn(&Seen) -> Option<Duration>| seen.iter().filter_map(f).max().map(fmt_duration);
        let open = seen.iter().filter(|s| s.closed.is_none()).count();
        Row {
            case: case.to_string(),
            n: seen.len(),
            answers: summary_of(labels),
            answered_max: max(|s| s.answered).unwrap_or_else(|| "–".into()),
            closed_max: if open > 0 {
                format!("{open} open at {}", fmt_duration(DEADLINE))
            } else {
                max(|s| s.closed).unwrap_or_else(|| "–".into())
            },
            threads: (0, 0, 0),
            fds: (0, 0, 0),
            rss_peak_kib: 0,
            forwarded: forwarded.map_or_else(|| "–".to_string(), |n| n.to_string()),
            failures,
        }
    }
}

/// "40× 413, 2× closed", most frequent first.
pub fn summary_of(labels: Vec<String>) -> String {
    let mut counts: Vec<(String, usize)> = Vec::new();
    for l in labels {
        match counts.iter_mut().find(|(k, _)| *k == l) {
            Some((_, n)) => *n += 1,
            None => counts.push((l, 1)),
        }
    }
    counts.sort_by_key(|c| std::cmp::Reverse(c.1));
    counts
        .iter()
        .map(|(k, n)| format!("{n}× {k}"))
        .collect::<Vec<_>>()
        .join(", ")
}

pub fn fmt_duration(d: Duration) -> String {
    if d < Duration::from_secs(1) {
        format!("{} ms", d.as_millis())
    } else {
        format!("{:.1} s", d.as_secs_f64())
    }
}

pub fn render(target: &str, rows: &[Row]) -> String {
    let mut out = format!(
        "hostile corpus, {target} (serve --socket-timeout {SOCKET_TIMEOUT}; each connection watched {}; \
         `reached paytrace`: connections nginx opened to paytrace, for the whole case on its first row)\n\
         | case | n | answers | answered ≤ | closed ≤ | threads before/peak/after | fds before/peak/after | VmRSS peak | reached paytrace | verdict |\n\
         |---|---|---|---|---|---|---|---|---|---|\n",
        fmt_duration(DEADLINE)
    );
    for r in rows {
        out.push_str(&format!(
            "| {} | {} | {} | {} | {} | {}/{}/{} | {}/{}/{} | {} MiB | {} | {} |\n",
            r.case,
            r.n,
            r.answers,
            r.answered_max,
            r.closed_max,
            r.threads.0,
            r.threads.1,
            r.threads.2,
            r.fds.0,
            r.fds.1,
            r.fds.2,
            r.rss_peak_kib >> 10,
            r.forwarded,
            if r.failures.is_empty() { "ok" } else { "FAIL" },
        ));
    }
    out
}
