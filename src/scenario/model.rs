//! The values a scenario run is made of and reports on: what it runs ([`Run`]), what the
//! clients saw ([`Answer`]), what `/metrics` said ([`Sample`]), and the result ([`RunResult`]).

use std::time::Duration;

use serde::Serialize;
use serde_json::Value;

/// The timeline's resolution.
pub const TICK: Duration = Duration::from_millis(250);
/// The failure a run injects.
#[derive(Clone, Debug)]
pub enum Fault {
    /// `PUT /_control/faults` on the provider with `on`, later with `off`.
    Provider { on: Value, off: Value },
    /// SIGTERM to the server; nothing is undone (the clients find no server after the drain).
    Sigterm,
    /// SIGKILL to the server (no drain, no checkpoint); later the same command again on the
    /// same database.
    CrashAndRestart,
    /// `n` more clients that send a payment's head, then its body one byte every 200 ms, one
    /// after another until the fault ends.
    SlowClients { n: usize },
    /// The server runs with `--write-delay`, switched off before the load starts; SIGUSR1
    /// switches it on, later off again.
    SlowWrites,
}

impl Run {
    /// A run of 8 closed-loop clients that do not retry, straight to the server, with a 3 s
    /// request budget: what most scenarios use.
    pub fn new(
        label: &'static str,
        serve_args: Vec<String>,
        base_latency_ms: u64,
        fault: Fault,
        fault_text: String,
    ) -> Run {
        Run {
            label,
            serve_args,
            base_latency_ms,
            fault,
            fault_text,
            clients: 8,
            via_nginx: false,
            retry: false,
            request_timeout: Duration::from_secs(3),
        }
    }
}

/// What one client saw of one request. Times are seconds since the load started.
#[derive(Clone, Debug)]
pub struct Answer {
    pub sent: f64,
    pub done: f64,
    /// 0 when there was no HTTP answer at all (connection refused, client timeout).
    pub status: u16,
    /// The problem's `code`, and for a 504 its `step`.
    pub code: Option<String>,
    /// The payment id of a 201.
    pub id: Option<String>,
    pub key: String,
    /// 1 for the first request with this key, 2 for its first retry, …
    pub attempt: u32,
    /// Sent by one of the slow clients (a byte at a time), not by the closed-loop clients.
    pub slow_client: bool,
}

impl Answer {
    pub fn latency_ms(&self) -> f64 {
        (self.done - self.sent) * 1000.0
    }

    /// `201`, `502 provider-error`, `504 deadline-exceeded/provider`, `no answer`.
    pub fn label(&self) -> String {
        if self.slow_client {
            return match self.status {
                0 => "slow client: closed".into(),
                s => format!("slow client: {s}"),
            };
        }
        match (self.status, &self.code) {
            (0, _) => "no answer".into(),
            (s, Some(code)) => format!("{s} {code}"),
            (s, None) => s.to_string(),
        }
    }
}

/// `/metrics` at one moment: the gauges as they were, the counters as totals so far.
#[derive(Clone, Debug, Default)]
pub struct Sample {
    pub t: f64,
    /// Whether the server answered `/metrics` at all; the other fields are 0 when not.
    pub up: bool,
    pub queue_depth: f64,
    pub workers_busy: f64,
    pub breaker_state: f64,
    pub writer_queue: f64,
    pub provider_in_flight: f64,
    pub shed: f64,
    pub shed_queue_full: f64,
    pub acquire_timeouts: f64,
    pub to_open: f64,
    pub to_half_open: f64,
    pub to_closed: f64,
}

/// One run of a scenario: a server started with `serve_args` beside a provider whose base
/// latency is `base_latency_ms`, the fault `fault` applied at 20% of the run and `recover`
/// applied at 60%.
#[derive(Clone, Debug)]
pub struct Run {
    /// Names the run when a scenario has more than one (`nested`, `unnested`).
    pub label: &'static str,
    pub serve_args: Vec<String>,
    pub base_latency_ms: u64,
    /// What is done to the system at 20% of the run, and undone at 60%.
    pub fault: Fault,
    /// The failure in words, for the story.
    pub fault_text: String,
    /// Closed-loop clients.
    pub clients: usize,
    /// The clients (slow ones too) reach the server through the shipped nginx config instead
    /// of directly.
    pub via_nginx: bool,
    /// Whether a client sends the same request again, at once and with the same key, after
    /// anything but a final answer (201, 402) — a retry storm — instead of a fresh one.
    pub retry: bool,
    /// The server's request budget, to count answers that came at or after it.
    pub request_timeout: Duration,
}

pub struct RunResult {
    pub label: &'static str,
    pub fault_text: String,
    /// When the fault was applied and removed, seconds since the load started.
    pub fault_t: f64,
    pub recover_t: f64,
    /// The server's exit code after the drain (SIGTERM), `None` when it had to be killed.
    pub server_exit: Option<i32>,
    pub duration: f64,
    pub request_timeout: Duration,
    /// Whether the clients went through nginx.
    pub via_nginx: bool,
    pub answers: Vec<Answer>,
    pub samples: Vec<Sample>,
    pub invariants: Vec<Invariant>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Invariant {
    pub name: &'static str,
    pub held: bool,
    pub detail: String,
}
