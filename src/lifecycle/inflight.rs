//! The requests being worked on right now, so that a drain which runs out of time (unit 07)
//! can say which ones it left unfinished, and how many it finished.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// The requests being worked on right now, so a drain that runs out of time can say which.
#[derive(Default)]
pub struct InFlight {
    running: Mutex<HashMap<u64, Running>>,
    next: AtomicU64,
    /// Requests finished since start (the drain summary counts the difference).
    finished: AtomicU64,
}

struct Running {
    request_id: String,
    method: String,
    path: String,
    started: Instant,
}

/// Held by a worker while it handles one request.
pub struct Ticket<'a> {
    registry: &'a InFlight,
    id: u64,
}

impl Drop for Ticket<'_> {
    fn drop(&mut self) {
        self.registry.lock().remove(&self.id);
        self.registry.finished.fetch_add(1, Ordering::Relaxed);
    }
}

impl InFlight {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Running>> {
        self.running.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn enter(&self, request_id: &str, method: &str, path: &str) -> Ticket<'_> {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        self.lock().insert(
            id,
            Running {
                request_id: request_id.to_string(),
                method: method.to_string(),
                path: path.to_string(),
                started: Instant::now(),
            },
        );
        Ticket { registry: self, id }
    }

    /// Requests being worked on right now.
    pub fn running(&self) -> usize {
        self.lock().len()
    }

    pub fn finished(&self) -> u64 {
        self.finished.load(Ordering::Relaxed)
    }

    /// One line per unfinished request: id, method, path, how long it has run.
    pub fn describe(&self) -> Vec<String> {
        let mut lines: Vec<(Duration, String)> = self
            .lock()
            .values()
            .map(|r| {
                let age = r.started.elapsed();
                (
                    age,
                    format!(
                        "{} {} {} (running {} ms)",
                        r.request_id,
                        r.method,
                        r.path,
                        age.as_millis()
                    ),
                )
            })
            .collect();
        lines.sort_by_key(|l| std::cmp::Reverse(l.0));
        lines.into_iter().map(|(_, l)| l).collect()
    }
}
