//! What the live page shows that no other part keeps: the last requests with their steps, a
//! few counters of answers the metrics only keep per route, and — with the in-process simulated
//! provider — the handles of its controls. Built once at start-up and held by `App`; the
//! observation layer records every request here, `GET /debug/state` reads it.
//!
//! Recording costs one short lock per request (a push onto a bounded ring); reading copies the
//! ring under the same lock.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::deadline::Step;
use crate::provider::sim::SimProvider;

/// Requests kept: the page lists the last [`SHOWN`]; the acquire p99 is read over all of them.
pub const KEPT: usize = 256;
/// Requests listed by `GET /debug/state`, newest first.
pub const SHOWN: usize = 50;
/// The page's own routes: not recorded, so that watching the server does not fill the list
/// or the rates it watches.
pub const OWN_ROUTES: &[&str] = &["GET /", "GET /debug/state"];

/// One answered request, as the page draws it.
#[derive(Clone, Debug)]
pub struct Seen {
    pub request_id: String,
    /// The route label (`GET /payments/{id}`), never the raw path: no payment id is shown.
    pub route: &'static str,
    pub status: u16,
    /// When it was received.
    pub at: Instant,
    pub total: Duration,
    /// Each of [`Step::ALL`], in that order.
    pub steps: [Duration; 5],
    /// The budget the request started with.
    pub budget: Duration,
    /// Why it was shed, if it was.
    pub shed: Option<&'static str>,
}

impl Seen {
    /// What was left of the budget when the answer was ready (zero when it ran out).
    pub fn budget_left(&self) -> Duration {
        self.budget.saturating_sub(self.total)
    }

    pub fn step(&self, step: Step) -> Duration {
        self.steps[step as usize]
    }
}

/// Answers counted over every route except the page's own.
#[derive(Default)]
pub struct Counts {
    pub requests: AtomicU64,
    /// 413 `body-too-large`: unit 01's refusals.
    pub body_too_large: AtomicU64,
    /// 401: unit 02's auth.
    pub unauthorized: AtomicU64,
    /// 429: unit 02's rate limit.
    pub rate_limited: AtomicU64,
}

/// A load burst started from the page (`POST /debug/burst`): one at a time.
#[derive(Default)]
pub struct Burst {
    pub running: AtomicBool,
    /// The summary of the last burst (`paytrace load --json`'s main fields).
    pub last: Mutex<Option<Value>>,
}

/// The controls the page has when `serve` started the simulated provider itself.
pub struct Controls {
    pub sim: SimProvider,
    /// Where a burst is sent: the server's own loopback address (`None` when it listens on a
    /// specific address that is not loopback: no burst then).
    pub target: Option<SocketAddr>,
    /// Shared with the burst's thread, which outlives the request that started it.
    pub burst: Arc<Burst>,
}

pub struct Board {
    /// When the server started: `at_ms` of the state counts from here.
    pub started: Instant,
    recent: Mutex<VecDeque<Seen>>,
    pub counts: Counts,
    /// `None` against a real provider (`--provider-url`): no controls.
    pub controls: Option<Controls>,
}

/// The loopback address a burst goes to, for a server listening on `addr`: itself when it is
/// loopback; loopback on the same port when it listens on every address; none otherwise.
pub fn burst_target(addr: SocketAddr) -> Option<SocketAddr> {
    let ip = addr.ip();
    if ip.is_loopback() {
        Some(addr)
    } else if ip.is_unspecified() {
        let loopback = match ip {
            std::net::IpAddr::V4(_) => std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST),
            std::net::IpAddr::V6(_) => std::net::IpAddr::V6(std::net::Ipv6Addr::LOCALHOST),
        };
        Some(SocketAddr::new(loopback, addr.port()))
    } else {
        None
    }
}

impl Board {
    pub fn new(started: Instant, controls: Option<Controls>) -> Board {
        Board {
            started,
            recent: Mutex::new(VecDeque::with_capacity(KEPT)),
            counts: Counts::default(),
            controls,
        }
    }

    fn lock(&self) -> MutexGuard<'_, VecDeque<Seen>> {
        self.recent.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records one answered request (the page's own routes are skipped).
    pub fn record(&self, seen: Seen) {
        if OWN_ROUTES.contains(&seen.route) {
            return;
        }
        let c = &self.counts;
        c.requests.fetch_add(1, Ordering::Relaxed);
        match seen.status {
            413 => c.body_too_large.fetch_add(1, Ordering::Relaxed),
            401 => c.unauthorized.fetch_add(1, Ordering::Relaxed),
            429 => c.rate_limited.fetch_add(1, Ordering::Relaxed),
            _ => 0,
        };
        let mut recent = self.lock();
        if recent.len() == KEPT {
            recent.pop_front();
        }
        recent.push_back(seen);
    }

    /// The last `n` requests, newest first.
    pub fn recent(&self, n: usize) -> Vec<Seen> {
        self.lock().iter().rev().take(n).cloned().collect()
    }

    /// The 99th percentile of the `acquire` step over the payments kept (those that reached
    /// it), in ms; `None` before the first.
    pub fn acquire_p99_ms(&self) -> Option<f64> {
        let mut acquire: Vec<Duration> = self
            .lock()
            .iter()
            .filter(|s| s.route == "POST /payments" && s.shed.is_none())
            .map(|s| s.step(Step::Acquire))
            .collect();
        if acquire.is_empty() {
            return None;
        }
        acquire.sort_unstable();
        // Nearest rank: the smallest value with at least 99% of the others at or below it.
        let rank = (acquire.len() * 99).div_ceil(100).max(1);
        Some(crate::server_timing::round_ms(acquire[rank - 1]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seen(route: &'static str, status: u16, acquire_ms: u64) -> Seen {
        let mut steps = [Duration::ZERO; 5];
        steps[Step::Acquire as usize] = Duration::from_millis(acquire_ms);
        Seen {
            request_id: format!("req_{acquire_ms}"),
            route,
            status,
            at: Instant::now(),
            total: Duration::from_millis(10),
            steps,
            budget: Duration::from_millis(3000),
            shed: None,
        }
    }

    #[test]
    fn the_ring_keeps_the_last_requests_newest_first_and_skips_the_page_itself() {
        let board = Board::new(Instant::now(), None);
        for i in 0..(KEPT as u64 + 10) {
            board.record(seen("POST /payments", 201, i));
        }
        board.record(seen("GET /debug/state", 200, 9999));
        board.record(seen("POST /payments", 401, 0));
        let recent = board.recent(SHOWN);
        assert_eq!(recent.len(), SHOWN);
        assert_eq!(recent[0].status, 401, "newest first");
        assert_eq!(recent[1].step(Step::Acquire), Duration::from_millis(265));
        assert_eq!(board.lock().len(), KEPT, "bounded");
        assert_eq!(
            board.counts.requests.load(Ordering::Relaxed),
            KEPT as u64 + 11
        );
        assert_eq!(board.counts.unauthorized.load(Ordering::Relaxed), 1);
        assert_eq!(recent[0].budget_left(), Duration::from_millis(2990));
    }

    #[test]
    fn acquire_p99_is_read_over_the_payments_kept() {
        let board = Board::new(Instant::now(), None);
        assert_eq!(board.acquire_p99_ms(), None);
        for i in 1..=100 {
            board.record(seen("POST /payments", 201, i));
        }
        board.record(seen("GET /payments", 200, 5000));
        assert_eq!(board.acquire_p99_ms(), Some(99.0));
    }

    #[test]
    fn a_burst_goes_only_to_loopback() {
        let at = |s: &str| s.parse::<SocketAddr>().unwrap();
        assert_eq!(burst_target(at("127.0.0.1:80")), Some(at("127.0.0.1:80")));
        assert_eq!(burst_target(at("0.0.0.0:81")), Some(at("127.0.0.1:81")));
        assert_eq!(burst_target(at("[::]:82")), Some(at("[::1]:82")));
        assert_eq!(burst_target(at("192.0.2.1:80")), None);
    }
}
