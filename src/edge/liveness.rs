//! Liveness of the accept path: a server that cannot accept must not look alive.
//!
//! tiny_http's accept thread can die by an error `recv()` reports, or by a panic it never
//! reports. A prober sends a request through tiny_http's unix socket every second, and the
//! dispatcher answers it at once (without a worker); three unanswered probes in a row raise a
//! flag, and the dispatcher then exits the process with status 1.

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use tiny_http::Request;

use super::http;

/// The path of the liveness probe; answered by the dispatcher only with the right token.
const PROBE_PATH: &str = "/__paytrace/accept-probe";
const PROBE_HEADER: &str = "X-Paytrace-Probe";

/// How long a probe waits for its answer, and how many may fail in a row.
const PROBE_WAIT: Duration = Duration::from_secs(2);
const FAILURES_TO_DIE: u32 = 3;

/// The prober's thread and what the dispatcher needs to recognise its probes.
pub struct Prober {
    token: String,
    dead: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    thread: JoinHandle<()>,
}

impl Prober {
    /// Starts probing tiny_http at `socket`.
    pub fn start(socket: PathBuf) -> Result<Prober, String> {
        let token = crate::ids::request_id();
        let dead = Arc::new(AtomicBool::new(false));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (token, dead, stop) = (token.clone(), dead.clone(), stop.clone());
            thread::Builder::new()
                .name("accept-prober".into())
                .spawn(move || probe_loop(&socket, &token, &stop, &dead))
                .map_err(|e| format!("cannot start the accept prober: {e}"))?
        };
        Ok(Prober {
            token,
            dead,
            stop,
            thread,
        })
    }

    /// Whether `request` is one of this prober's probes.
    pub fn is_probe(&self, request: &Request) -> bool {
        http::split_target(request.url()).0 == PROBE_PATH
            && http::header(request, PROBE_HEADER) == Some(self.token.as_str())
    }

    /// Whether probes stopped coming through: tiny_http's accept thread is gone.
    pub fn accept_dead(&self) -> bool {
        self.dead.load(Ordering::SeqCst)
    }

    pub fn stop(self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = self.thread.join();
    }
}

fn probe_loop(socket: &Path, token: &str, stop: &AtomicBool, dead: &AtomicBool) {
    let mut failures = 0;
    while !stop.load(Ordering::SeqCst) {
        if probe(socket, token, PROBE_WAIT) {
            failures = 0;
        } else if !stop.load(Ordering::SeqCst) {
            failures += 1;
            log::warn!(
                "accept probe {failures}/{FAILURES_TO_DIE} got no answer within {PROBE_WAIT:?}"
            );
            if failures >= FAILURES_TO_DIE {
                dead.store(true, Ordering::SeqCst);
                return;
            }
        }
        let next = Instant::now() + Duration::from_secs(1);
        while Instant::now() < next && !stop.load(Ordering::SeqCst) {
            thread::sleep(Duration::from_millis(50));
        }
    }
}

fn probe(socket: &Path, token: &str, wait: Duration) -> bool {
    use std::io::{Read, Write};
    let Ok(mut s) = UnixStream::connect(socket) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(wait));
    let _ = s.set_write_timeout(Some(wait));
    let request = format!(
        "GET {PROBE_PATH} HTTP/1.1\r\nHost: probe\r\n{PROBE_HEADER}: {token}\r\nConnection: close\r\n\r\n"
    );
    if s.write_all(request.as_bytes()).is_err() {
        return false;
    }
    let mut head = [0u8; 12];
    s.read_exact(&mut head).is_ok() && head.starts_with(b"HTTP/1.1 204")
}
