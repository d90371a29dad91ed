//! Unit 04, the write path: one writer thread and group commit.
//!
//! SQLite has one writer at a time, so this process has one writer thread. Requests hand it
//! their writes ([`WriteQueue::write`]) and wait for the answer. It takes everything queued
//! (up to [`MAX_BATCH`]), runs each write in its own savepoint inside one `BEGIN IMMEDIATE`
//! transaction, commits once — one fsync for the whole batch under `--sync full` — and only
//! then answers each waiting request: nothing is reported written before it is durable. A write
//! that fails rolls back its own savepoint; its neighbours commit. When nothing is queued and
//! nobody is committing, a request commits its own write on its own thread instead (a batch
//! of one): handing it to the writer thread would only add two thread wake-ups.
//!
//! Why not let every request write for itself: each write then waits its turn for SQLite's lock
//! (or this process's write token), and on a busy machine every hand-off of the lock has to wake
//! one particular thread — two hand-offs per payment, a lock convoy — and every commit is its
//! own fsync. Here the hand-off is a channel the writer drains in bulk.
//!
//! The budget still rules: a write not taken by the writer within its `acquire` slice is
//! withdrawn and answered like a saturated pool (the caller's 503), and a taken one is waited
//! for within its `write` slice. A write committed on the caller's own thread waits at most its
//! `acquire` slice for a pooled connection and its `write` slice for SQLite's lock.

use std::any::Any;
use std::panic::{self, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crossbeam::channel::{self, Receiver, RecvTimeoutError, Sender, TrySendError};
use r2d2::Pool;
use r2d2_sqlite::SqliteConnectionManager;
use rusqlite::{Transaction, TransactionBehavior};

use super::error::DbError;

/// The most writes one transaction takes.
pub const MAX_BATCH: usize = 256;
/// The most writes waiting for the writer; a caller that finds the queue full is refused at
/// once (it is bounded by its acquire slice anyway).
const QUEUE_CAPACITY: usize = 1024;
/// How often an idle writer looks at its stop flag.
const IDLE_WAKE: Duration = Duration::from_millis(50);

/// What the writer reports after each batch, for the metrics.
#[derive(Clone, Copy, Debug)]
pub struct BatchReport {
    /// Writes in the transaction (withdrawn ones not counted).
    pub size: usize,
    /// From `BEGIN` to the end of `COMMIT`.
    pub commit: Duration,
    /// Writes still queued when the batch ended.
    pub queued: usize,
}

/// Receives a [`BatchReport`] after every batch.
pub type BatchObserver = Arc<dyn Fn(BatchReport) + Send + Sync>;

/// A write's result, boxed so that one queue carries writes of every type.
type Value = Box<dyn Any + Send>;
type Work = Box<dyn FnOnce(&Transaction) -> rusqlite::Result<Value> + Send>;

/// Where a queued write stands: the caller may withdraw it until the writer takes it.
const QUEUED: u8 = 0;
const TAKEN: u8 = 1;
const WITHDRAWN: u8 = 2;

struct Op {
    work: Work,
    state: Arc<AtomicU8>,
    answer: Sender<Answer>,
}

struct Answer {
    result: Result<Value, DbError>,
    /// When the writer took the write: the end of its wait in the queue.
    taken: Instant,
}

/// How long a write waited for the writer and how long it then took, with its result.
#[derive(Debug)]
pub struct Written<T> {
    pub result: Result<T, DbError>,
    /// From handing it over to the writer taking it (the `acquire` step).
    pub waited: Duration,
    /// From being taken to its commit being answered (the write step).
    pub ran: Duration,
}

/// The queue in front of the writer thread, and the thread.
pub struct WriteQueue {
    tx: Sender<Op>,
    stop: Arc<AtomicBool>,
    writer: Arc<Writer>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl WriteQueue {
    /// Starts the writer on `pool`. Each batch borrows one pooled connection for its
    /// transaction, whose wait for SQLite's lock (held only by other processes) is at most
    /// `busy`. `writes_failing` is set while writes fail for lack of storage, cleared by the
    /// next commit.
    pub fn start(
        pool: Pool<SqliteConnectionManager>,
        busy: Duration,
        writes_failing: Arc<AtomicBool>,
        observer: BatchObserver,
    ) -> Result<WriteQueue, String> {
        let (tx, rx) = channel::bounded::<Op>(QUEUE_CAPACITY);
        let stop = Arc::new(AtomicBool::new(false));
        let writer = Arc::new(Writer {
            pool,
            busy,
            running: AtomicBool::new(false),
            holding: AtomicUsize::new(0),
            commit: Mutex::new(()),
            writes_failing,
            observer,
        });
        let thread = {
            let (stop, writer) = (stop.clone(), writer.clone());
            thread::Builder::new()
                .name("db-writer".into())
                .spawn(move || writer.run(&rx, &stop))
                .map_err(|e| format!("cannot start the database writer: {e}"))?
        };
        Ok(WriteQueue {
            tx,
            stop,
            writer,
            thread: Mutex::new(Some(thread)),
        })
    }

    /// Writes waiting for the writer: queued, or taken out of the queue by the writer thread
    /// while it waits to commit.
    pub fn queued(&self) -> usize {
        self.tx.len() + self.writer.holding.load(Ordering::SeqCst)
    }

    /// Whether a batch is being committed right now.
    pub fn running(&self) -> bool {
        self.writer.running.load(Ordering::SeqCst)
    }

    /// Hands `work` to the writer. If the writer has not taken it within `acquire`, it is
    /// withdrawn ([`DbError::AcquireTimeout`]: nothing was written). Once taken, its answer is
    /// waited for within `wait`; [`DbError::Busy`] after that is the one answer that comes
    /// before the commit: the write may still be committed (callers treat it as "unknown").
    pub fn write<T: Send + 'static>(
        &self,
        acquire: Duration,
        wait: Duration,
        work: impl FnOnce(&Transaction) -> rusqlite::Result<T> + Send + 'static,
    ) -> Written<T> {
        let handed = Instant::now();
        let (answer_tx, answer_rx) = channel::bounded(1);
        let state = Arc::new(AtomicU8::new(QUEUED));
        let op = Op {
            work: Box::new(move |tx| work(tx).map(|v| Box::new(v) as Value)),
            state: state.clone(),
            answer: answer_tx,
        };
        let refused = |result| Written {
            result,
            waited: handed.elapsed(),
            ran: Duration::ZERO,
        };
        // Nobody committing and nothing queued: commit here, on the caller's thread. Waking
        // the writer thread and being woken back costs two scheduler hand-offs, which on a
        // busy machine cost more than the commit; batching only pays when writes overlap, and
        // then this lock is taken and they queue.
        let op = if self.queued() == 0 {
            match self.writer.try_commit_alone(op, acquire, wait) {
                Ok(()) => {
                    let answer = answer_rx.try_recv().unwrap_or_else(|_| Answer {
                        result: Err(DbError::Pool("a write went unanswered".into())),
                        taken: handed,
                    });
                    return finish(answer, handed);
                }
                Err(op) => op,
            }
        } else {
            op
        };
        match self.tx.try_send(op) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => return refused(Err(DbError::AcquireTimeout)),
            Err(TrySendError::Disconnected(_)) => {
                return refused(Err(DbError::Pool("the database writer has stopped".into())));
            }
        }
        let answer = match answer_rx.recv_timeout(acquire) {
            Ok(answer) => answer,
            Err(_) => {
                // Not answered within the acquire slice: withdraw it unless the writer has
                // taken it, in which case it runs, and its answer is worth waiting for.
                if state
                    .compare_exchange(QUEUED, WITHDRAWN, Ordering::SeqCst, Ordering::SeqCst)
                    .is_ok()
                {
                    return refused(Err(DbError::AcquireTimeout));
                }
                match answer_rx.recv_timeout(wait) {
                    Ok(answer) => answer,
                    Err(_) => return refused(Err(DbError::Busy)),
                }
            }
        };
        finish(answer, handed)
    }

    /// Lets the writer finish what is queued, then joins it (the last write of the process).
    pub fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
        let thread = self.thread.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(thread) = thread
            && thread.join().is_err()
        {
            log::error!("the database writer panicked");
        }
    }
}

/// The writer: its thread's state, and the lock that makes it the only one committing.
struct Writer {
    pool: Pool<SqliteConnectionManager>,
    /// How long a batch's `BEGIN IMMEDIATE` waits for SQLite's lock (held only by other
    /// processes: this one commits one batch at a time).
    busy: Duration,
    /// Set while a batch is being committed.
    running: AtomicBool,
    /// Writes the writer thread took out of the queue and holds while it waits for `commit`.
    holding: AtomicUsize,
    /// Held by whoever commits: the writer thread with a batch, or a caller committing its own
    /// write when nothing else was going on.
    commit: Mutex<()>,
    writes_failing: Arc<AtomicBool>,
    observer: BatchObserver,
}

impl Writer {
    fn run(&self, rx: &Receiver<Op>, stop: &AtomicBool) {
        loop {
            let first = match rx.recv_timeout(IDLE_WAKE) {
                Ok(op) => op,
                Err(RecvTimeoutError::Timeout) if stop.load(Ordering::SeqCst) => return,
                Err(RecvTimeoutError::Timeout) => continue,
                Err(RecvTimeoutError::Disconnected) => return,
            };
            self.holding.store(1, Ordering::SeqCst);
            // Until the lock is had, `first` stays withdrawable (its state is still QUEUED).
            let _committing = self.commit.lock().unwrap_or_else(|e| e.into_inner());
            let mut batch = Vec::with_capacity(16);
            batch.push(first);
            while batch.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(op) => batch.push(op),
                    Err(_) => break,
                }
            }
            self.holding.store(0, Ordering::SeqCst);
            // A write its caller withdrew is dropped; the others can no longer be withdrawn.
            batch.retain(|op| {
                op.state
                    .compare_exchange(QUEUED, TAKEN, Ordering::SeqCst, Ordering::SeqCst)
                    .is_ok()
            });
            if !batch.is_empty() {
                self.commit_batch(batch, rx.len(), self.busy, self.busy);
            }
        }
    }

    /// Commits `op` alone on the caller's thread if nobody is committing; otherwise hands it
    /// back to be queued. The caller's own slices bound it: `acquire` for a pooled connection,
    /// `wait` for SQLite's lock.
    fn try_commit_alone(&self, op: Op, acquire: Duration, wait: Duration) -> Result<(), Op> {
        let _committing = match self.commit.try_lock() {
            Ok(guard) => guard,
            Err(std::sync::TryLockError::Poisoned(e)) => e.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => return Err(op),
        };
        op.state.store(TAKEN, Ordering::SeqCst);
        self.commit_batch(vec![op], 0, acquire, wait.min(self.busy));
        Ok(())
    }

    /// Commits a fixed batch (the caller holds `commit`) and reports it if it committed.
    fn commit_batch(&self, batch: Vec<Op>, queued: usize, connect: Duration, busy: Duration) {
        // From here on the batch is fixed: what arrives now waits for the next one.
        self.running.store(true, Ordering::SeqCst);
        let size = batch.len();
        let committed = self.commit(batch, Instant::now(), connect, busy);
        self.running.store(false, Ordering::SeqCst);
        if let Some(commit) = committed {
            (self.observer)(BatchReport {
                size,
                commit,
                queued,
            });
        }
    }

    /// One transaction for the whole batch, a savepoint per write, one commit; then the
    /// answers. `connect` bounds the wait for a pooled connection, `busy` the wait for SQLite's
    /// lock. Returns how long the transaction took from `BEGIN` if it committed.
    fn commit(
        &self,
        batch: Vec<Op>,
        taken: Instant,
        connect: Duration,
        busy: Duration,
    ) -> Option<Duration> {
        let answers_of = |batch: Vec<Op>| batch.into_iter().map(|op| op.answer).collect();
        let mut conn = match self.pool.get_timeout(connect) {
            Ok(c) => c,
            Err(e) => {
                fail_all(answers_of(batch), DbError::from_pool(e), taken);
                return None;
            }
        };
        let begun_at = Instant::now();
        let begun = conn
            .busy_timeout(busy)
            .and_then(|()| conn.transaction_with_behavior(TransactionBehavior::Immediate));
        let tx = match begun {
            Ok(tx) => tx,
            Err(e) => {
                let why = self.note(DbError::from_sqlite(e));
                fail_all(answers_of(batch), why, taken);
                return None;
            }
        };
        let mut done: Vec<(Sender<Answer>, Result<Value, DbError>)> =
            Vec::with_capacity(batch.len());
        let mut ops = batch.into_iter();
        while let Some(op) = ops.next() {
            let (result, intact) = run_in_savepoint(&tx, op.work);
            if !intact || tx.is_autocommit() {
                // The transaction cannot be trusted any more — SQLite rolled it back (a full
                // disk, an I/O error), or a savepoint could not be released or rolled back —
                // so nothing of the batch is committed and every write of it fails.
                let why = match result {
                    Err(e) => self.note(e),
                    Ok(_) => DbError::Pool("the batch's transaction could not go on".into()),
                };
                let answers = done
                    .into_iter()
                    .map(|(answer, _)| answer)
                    .chain(std::iter::once(op.answer))
                    .chain(ops.map(|op| op.answer))
                    .collect();
                fail_all(answers, why, taken);
                return None;
            }
            done.push((op.answer, result));
        }
        match tx.commit() {
            Ok(()) => {
                let committed = begun_at.elapsed();
                // A write's own storage error still marks the incident; the storage is back
                // only if every write of the batch reached it.
                let done: Vec<_> = done
                    .into_iter()
                    .map(|(answer, result)| (answer, result.map_err(|e| self.note(e))))
                    .collect();
                let all_stored = done
                    .iter()
                    .all(|(_, r)| !matches!(r, Err(DbError::Unavailable { .. })));
                if all_stored && self.writes_failing.swap(false, Ordering::SeqCst) {
                    log::warn!("storage: writes succeed again; ready for work");
                }
                for (answer, result) in done {
                    let _ = answer.send(Answer { result, taken });
                }
                Some(committed)
            }
            Err(e) => {
                let why = self.note(DbError::from_sqlite(e));
                fail_all(
                    done.into_iter().map(|(answer, _)| answer).collect(),
                    why,
                    taken,
                );
                None
            }
        }
    }

    /// Marks a storage incident (the first failure after writes last succeeded is a new one).
    fn note(&self, e: DbError) -> DbError {
        match e {
            DbError::Unavailable { cause, .. } => DbError::Unavailable {
                cause,
                new_incident: !self.writes_failing.swap(true, Ordering::SeqCst),
            },
            other => other,
        }
    }
}

/// Runs one write in its own savepoint: on success the savepoint is released, on failure (or
/// a panic, which must not end the writer) rolled back. The flag says whether the transaction
/// is still intact — false when the savepoint could not be released or rolled back.
fn run_in_savepoint(tx: &Transaction, work: Work) -> (Result<Value, DbError>, bool) {
    if let Err(e) = tx.execute_batch("SAVEPOINT write") {
        return (Err(DbError::from_sqlite(e)), false);
    }
    let ran = panic::catch_unwind(AssertUnwindSafe(|| work(tx)));
    match ran {
        Ok(Ok(v)) => match tx.execute_batch("RELEASE write") {
            Ok(()) => (Ok(v), true),
            Err(e) => (Err(DbError::from_sqlite(e)), false),
        },
        Ok(Err(e)) => {
            let undone = tx.execute_batch("ROLLBACK TO write; RELEASE write").is_ok();
            (Err(DbError::from_sqlite(e)), undone)
        }
        Err(panic) => {
            let what = crate::workers::panic_message(panic.as_ref());
            log::error!("a database write panicked: {what}");
            let undone = tx.execute_batch("ROLLBACK TO write; RELEASE write").is_ok();
            (
                Err(DbError::Pool(format!("the write panicked: {what}"))),
                undone,
            )
        }
    }
}

/// A write's answer with its own type again, and its times.
fn finish<T: 'static>(answer: Answer, handed: Instant) -> Written<T> {
    // The writer sends back exactly what `work` returned, so the downcast holds.
    let result = answer.result.and_then(|v| {
        v.downcast::<T>()
            .map(|v| *v)
            .map_err(|_| DbError::Pool("a write was answered with another type".into()))
    });
    let waited = answer.taken.saturating_duration_since(handed);
    Written {
        result,
        waited,
        ran: handed.elapsed().saturating_sub(waited),
    }
}

/// Answers every write with `why`; the first keeps whether it is a new storage incident, so
/// that its cause is logged once.
fn fail_all(answers: Vec<Sender<Answer>>, why: DbError, taken: Instant) {
    let copies: Vec<DbError> = answers.iter().skip(1).map(|_| why.share()).collect();
    for (answer, result) in answers.into_iter().zip(std::iter::once(why).chain(copies)) {
        let _ = answer.send(Answer {
            result: Err(result),
            taken,
        });
    }
}
