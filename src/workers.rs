//! Unit 03, the bounded worker pool: the thread-per-request answer to "never block the loop".
//!
//! The Rust Book's `ThreadPool` / `Worker` / `Job`, grown up for a server that must not fall
//! over under load or at shutdown:
//!
//! - **The queue is bounded.** [`WorkerPool::try_submit`] never waits: when every worker is busy
//!   and `queue` jobs already wait, it hands the job back ([`Rejected::Full`]) so the caller can
//!   answer at once (the server's 503 `overloaded`). An unbounded queue would turn overload into
//!   latency and memory instead of a fast, honest refusal.
//! - **A panicking job does not kill its worker.** Each job runs inside `catch_unwind`; the
//!   worker logs the panic and takes the next job, so the pool never silently shrinks.
//! - **Shutdown closes the queue, then joins** ([`WorkerPool::shutdown`]): the workers finish what
//!   the queue still holds, and those that finish before the deadline are joined. The
//!   [`ShutdownReport`] says how many were joined and how many were still running when the
//!   deadline passed; those are left behind, not waited for.
//!
//! The pool knows nothing about HTTP or metrics: the caller's handler does the work and keeps
//! its own gauges, told how many jobs still wait behind the one it was given.

use std::panic::{self, AssertUnwindSafe};
use std::sync::Arc;
use std::thread;
use std::time::Instant;

use crossbeam::channel::{self, Receiver, Sender, TrySendError};

/// What runs a job on a worker; the second argument is how many jobs still wait in the queue
/// as this one is taken (for a queue-depth gauge).
type Handler<J> = dyn Fn(J, usize) + Send + Sync;

/// A fixed set of threads fed by a bounded queue.
pub struct WorkerPool<J> {
    /// The only sender: dropping it closes the queue, and each worker's `recv` loop then ends
    /// once the queue is empty. That is the whole shutdown signal — no flag to forget to check.
    queue: Sender<J>,
    /// One handle per worker, indexed by worker number, to join exactly the ones that finished.
    workers: Vec<thread::JoinHandle<()>>,
    /// Each worker sends its number here as its last act, so `shutdown` can wait with a deadline
    /// (a `JoinHandle` has no `join_timeout`) instead of sleeping and polling.
    done: Receiver<usize>,
    /// How many jobs may wait; kept to name the limit in answers and logs.
    capacity: usize,
}

/// A job the pool did not take, handed back so the caller can answer for it.
#[derive(Debug)]
pub enum Rejected<J> {
    /// Every worker is busy and the queue is full: shed it now rather than wait.
    Full(J),
    /// No worker is left to take it (the queue is closed).
    Closed(J),
}

impl<J> Rejected<J> {
    pub fn into_job(self) -> J {
        match self {
            Rejected::Full(job) | Rejected::Closed(job) => job,
        }
    }
}

/// What [`WorkerPool::shutdown`] saw by its deadline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShutdownReport {
    /// Workers that finished the queue and were joined.
    pub joined: usize,
    /// Workers still running a job when the deadline passed; they were left running.
    pub still_running: usize,
}

impl<J: Send + 'static> WorkerPool<J> {
    /// Starts `size` threads named `{name_prefix}{i}`, fed by a queue of at most `queue` jobs.
    pub fn new(
        size: usize,
        queue: usize,
        name_prefix: &str,
        handler: impl Fn(J, usize) + Send + Sync + 'static,
    ) -> Result<WorkerPool<J>, String> {
        let handler: Arc<Handler<J>> = Arc::new(handler);
        let (tx, rx) = channel::bounded::<J>(queue);
        let (done_tx, done) = channel::bounded::<usize>(size);
        let mut workers = Vec::with_capacity(size);
        for i in 0..size {
            let (rx, done_tx, handler) = (rx.clone(), done_tx.clone(), handler.clone());
            let name = format!("{name_prefix}{i}");
            let worker = thread::Builder::new()
                .name(name.clone())
                .spawn(move || {
                    work(&name, &rx, &*handler);
                    let _ = done_tx.send(i);
                })
                .map_err(|e| format!("cannot start worker {i}: {e}"))?;
            workers.push(worker);
        }
        Ok(WorkerPool {
            queue: tx,
            workers,
            done,
            capacity: queue,
        })
    }

    /// Queues `job` if there is room, without waiting; otherwise hands it back.
    pub fn try_submit(&self, job: J) -> Result<(), Rejected<J>> {
        self.queue.try_send(job).map_err(|e| match e {
            TrySendError::Full(job) => Rejected::Full(job),
            TrySendError::Disconnected(job) => Rejected::Closed(job),
        })
    }

    /// Jobs waiting for a worker right now.
    pub fn queue_len(&self) -> usize {
        self.queue.len()
    }

    /// The most jobs that may wait.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// The number of workers.
    pub fn size(&self) -> usize {
        self.workers.len()
    }

    /// Closes the queue, lets the workers finish what it holds, and joins each one that is done
    /// by `deadline`. Workers still busy then are left running and counted, not waited for.
    pub fn shutdown(self, deadline: Instant) -> ShutdownReport {
        let WorkerPool {
            queue,
            workers,
            done,
            ..
        } = self;
        drop(queue);
        let mut workers: Vec<Option<thread::JoinHandle<()>>> =
            workers.into_iter().map(Some).collect();
        let mut joined = 0;
        while joined < workers.len() {
            let Ok(i) = done.recv_deadline(deadline) else {
                break;
            };
            // The worker sent its number as its last act: this join returns at once.
            if let Some(worker) = workers.get_mut(i).and_then(Option::take) {
                let _ = worker.join();
                joined += 1;
            }
        }
        ShutdownReport {
            joined,
            still_running: workers.iter().filter(|w| w.is_some()).count(),
        }
    }
}

/// One worker: takes jobs until the queue is closed and empty; a panic ends the job, not the
/// worker.
fn work<J>(name: &str, rx: &Receiver<J>, handler: &Handler<J>) {
    for job in rx.iter() {
        let waiting = rx.len();
        if let Err(panic) = panic::catch_unwind(AssertUnwindSafe(|| handler(job, waiting))) {
            let what = panic_message(panic.as_ref());
            log::error!("{name}: a job panicked ({what}); the worker takes the next one");
        }
    }
}

/// What a caught panic said, when it said it with a string.
pub fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Barrier;
    use std::time::Duration;

    /// Long enough never to be reached when things work; the tests never wait it out.
    const PATIENCE: Duration = Duration::from_secs(10);

    #[test]
    fn a_full_queue_hands_the_job_back_at_once() {
        // One worker, held on a channel; a queue of one.
        let (release, held) = channel::unbounded::<()>();
        let (started_tx, started) = channel::unbounded::<u32>();
        let pool = WorkerPool::new(1, 1, "test-", move |n: u32, _| {
            started_tx.send(n).unwrap();
            held.recv().unwrap();
        })
        .unwrap();
        pool.try_submit(1).unwrap();
        assert_eq!(started.recv_timeout(PATIENCE).unwrap(), 1);
        pool.try_submit(2).unwrap();
        assert_eq!(pool.queue_len(), 1);
        match pool.try_submit(3) {
            Err(Rejected::Full(3)) => {}
            other => panic!("expected Full(3), got {other:?}"),
        }
        release.send(()).unwrap();
        release.send(()).unwrap();
        assert_eq!(started.recv_timeout(PATIENCE).unwrap(), 2);
        let report = pool.shutdown(Instant::now() + PATIENCE);
        assert_eq!(
            report,
            ShutdownReport {
                joined: 1,
                still_running: 0
            }
        );
    }

    #[test]
    fn a_panicking_job_leaves_its_worker_alive() {
        let (ran_tx, ran) = channel::unbounded::<u32>();
        let pool = WorkerPool::new(1, 4, "test-", move |n: u32, _| {
            if n == 1 {
                panic!("job 1 fails");
            }
            ran_tx.send(n).unwrap();
        })
        .unwrap();
        pool.try_submit(1).unwrap();
        pool.try_submit(2).unwrap();
        // The only worker ran job 2 after job 1 panicked.
        assert_eq!(ran.recv_timeout(PATIENCE).unwrap(), 2);
        pool.try_submit(3).unwrap();
        assert_eq!(ran.recv_timeout(PATIENCE).unwrap(), 3);
        assert_eq!(pool.shutdown(Instant::now() + PATIENCE).joined, 1);
    }

    #[test]
    fn shutdown_runs_what_the_queue_holds_and_joins_every_worker() {
        // Both workers wait at the barrier until the test has queued everything.
        let gate = Arc::new(Barrier::new(3));
        let (ran_tx, ran) = channel::unbounded::<u32>();
        let pool = WorkerPool::new(2, 8, "test-", {
            let gate = gate.clone();
            move |n: u32, _| {
                if n < 2 {
                    gate.wait();
                }
                ran_tx.send(n).unwrap();
            }
        })
        .unwrap();
        for n in 0..6 {
            pool.try_submit(n).unwrap();
        }
        gate.wait();
        let report = pool.shutdown(Instant::now() + PATIENCE);
        assert_eq!(
            report,
            ShutdownReport {
                joined: 2,
                still_running: 0
            }
        );
        let mut all: Vec<u32> = ran.try_iter().collect();
        all.sort_unstable();
        assert_eq!(all, vec![0, 1, 2, 3, 4, 5]);
    }

    #[test]
    fn a_job_that_outlives_the_deadline_is_reported_still_running() {
        let (release, held) = channel::unbounded::<()>();
        let (started_tx, started) = channel::unbounded::<()>();
        let (finished_tx, finished) = channel::unbounded::<()>();
        let pool = WorkerPool::new(1, 1, "test-", move |(): (), _| {
            started_tx.send(()).unwrap();
            held.recv().unwrap();
            finished_tx.send(()).unwrap();
        })
        .unwrap();
        pool.try_submit(()).unwrap();
        started.recv_timeout(PATIENCE).unwrap();
        let wait = Duration::from_millis(30);
        let before = Instant::now();
        let report = pool.shutdown(before + wait);
        assert_eq!(
            report,
            ShutdownReport {
                joined: 0,
                still_running: 1
            }
        );
        // It waited until the deadline, and no longer: the job is still held.
        assert!(before.elapsed() >= wait);
        assert!(finished.try_recv().is_err());
        // The job left running still finishes once released.
        release.send(()).unwrap();
        finished.recv_timeout(PATIENCE).unwrap();
    }
}
