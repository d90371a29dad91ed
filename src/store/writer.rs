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
//! for within its `write` slice. The writer keeps to its callers' patience too: a batch commits
//! before the first of its callers stops waiting, a write that could not be committed in time
//! is not started (its caller is refused at once: nothing written), and writes that record a
//! charge already sent go ahead of new ones. When writes get slow, the server refuses new
//! payments quickly and keeps recording the rest, rather than committing work nobody waits for. A write committed on the caller's own thread waits at most its
//! `acquire` slice for a pooled connection and its `write` slice for SQLite's lock.

use std::any::Any;
use std::panic::{self, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, AtomicUsize, Ordering};
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

/// Where a queued write stands: the caller may withdraw it until the writer starts running it
/// — while it is queued, and after the writer took it into a batch whose earlier writes are
/// still running. A withdrawn write is skipped: nothing of it is written.
const QUEUED: u8 = 0;
const TAKEN: u8 = 1;
const WITHDRAWN: u8 = 2;
const RUNNING: u8 = 3;

struct Op {
    work: Work,
    state: Arc<AtomicU8>,
    answer: Sender<Answer>,
    /// When its caller stops waiting for the answer (the end of its acquire and write slices).
    give_up_at: Instant,
    /// Goes ahead of the other writes of its batch (recording the outcome of a charge that was
    /// sent: finishing started work before taking on new).
    first: bool,
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

/// A fault for experiments (`serve --write-delay`): while on, every write takes `delay` longer,
/// inside its transaction, holding SQLite's lock as a slow disk would. Off unless armed.
#[derive(Debug, Default)]
pub struct SlowWrites {
    /// The delay in microseconds; 0 while off.
    current_us: AtomicU64,
    /// The delay it was armed with.
    armed_us: AtomicU64,
}

impl SlowWrites {
    /// Switches the fault on with `delay`.
    pub fn arm(&self, delay: Duration) {
        let us = u64::try_from(delay.as_micros()).unwrap_or(u64::MAX);
        self.armed_us.store(us, Ordering::SeqCst);
        self.current_us.store(us, Ordering::SeqCst);
    }

    /// Switches an armed fault off if it is on, on if it is off; returns the delay now in force.
    pub fn toggle(&self) -> Duration {
        let armed = self.armed_us.load(Ordering::SeqCst);
        let now = match self.current_us.load(Ordering::SeqCst) {
            0 => armed,
            _ => 0,
        };
        self.current_us.store(now, Ordering::SeqCst);
        Duration::from_micros(now)
    }

    /// The delay every write takes now (zero while off).
    pub fn current(&self) -> Duration {
        Duration::from_micros(self.current_us.load(Ordering::SeqCst))
    }
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
            slow: SlowWrites::default(),
            pace_us: AtomicU64::new(0),
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
    /// A write `first` goes ahead of the others queued with it.
    pub fn write<T: Send + 'static>(
        &self,
        acquire: Duration,
        wait: Duration,
        first: bool,
        work: impl FnOnce(&Transaction) -> rusqlite::Result<T> + Send + 'static,
    ) -> Written<T> {
        let handed = Instant::now();
        let (answer_tx, answer_rx) = channel::bounded(1);
        let state = Arc::new(AtomicU8::new(QUEUED));
        let op = Op {
            work: Box::new(move |tx| work(tx).map(|v| Box::new(v) as Value)),
            state: state.clone(),
            answer: answer_tx,
            give_up_at: handed + acquire + wait,
            first,
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
                    return match answer_rx.try_recv() {
                        Ok(answer) => finish(answer, handed),
                        // Let go unrun: it could not have been committed in time.
                        Err(_) if withdraw(&state, TAKEN) => refused(Err(DbError::AcquireTimeout)),
                        Err(_) => refused(Err(DbError::Pool("a write went unanswered".into()))),
                    };
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
        // An answer not had in time, or a write the writer let go of without running it (the
        // channel closes: it is known at once), is withdrawn if the writer has not started it.
        let answer = match answer_rx.recv_timeout(acquire) {
            Ok(answer) => answer,
            Err(_) if withdraw(&state, QUEUED) => return refused(Err(DbError::AcquireTimeout)),
            // Taken: it may run soon, and its answer is worth waiting for.
            Err(_) => match answer_rx.recv_timeout(wait) {
                Ok(answer) => answer,
                // Still behind the batch's earlier writes: withdrawn, so the writer spends no
                // time on a write nobody waits for.
                Err(_) if withdraw(&state, TAKEN) => {
                    return refused(Err(DbError::AcquireTimeout));
                }
                Err(_) => return refused(Err(DbError::Busy)),
            },
        };
        finish(answer, handed)
    }

    /// The write-delay fault (`serve --write-delay`).
    pub fn slow_writes(&self) -> &SlowWrites {
        &self.writer.slow
    }

    /// Sets the pace the writer judges writes by, as if writes had lately taken `pace`.
    #[cfg(test)]
    pub fn set_pace(&self, pace: Duration) {
        let us = u64::try_from(pace.as_micros()).unwrap_or(u64::MAX);
        self.writer.pace_us.store(us, Ordering::Relaxed);
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

/// Withdraws a write that is still `from` (queued, or taken but not started); true when it is
/// withdrawn — by this call or already — and so will never be written.
fn withdraw(state: &AtomicU8, from: u8) -> bool {
    match state.compare_exchange(from, WITHDRAWN, Ordering::SeqCst, Ordering::SeqCst) {
        Ok(_) => true,
        Err(now) => now == WITHDRAWN,
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
    slow: SlowWrites,
    /// The moving average of the time one write takes, µs ([`Writer::pace`]).
    pace_us: AtomicU64,
}

impl Writer {
    fn run(&self, rx: &Receiver<Op>, stop: &AtomicBool) {
        // Taken writes a batch left for the next one (see `commit`): they go first of their kind.
        let mut carried: Vec<Op> = Vec::new();
        loop {
            let mut batch = std::mem::take(&mut carried);
            if batch.is_empty() {
                match rx.recv_timeout(IDLE_WAKE) {
                    Ok(op) => batch.push(op),
                    Err(RecvTimeoutError::Timeout) if stop.load(Ordering::SeqCst) => return,
                    Err(RecvTimeoutError::Timeout) => continue,
                    Err(RecvTimeoutError::Disconnected) => return,
                }
            }
            self.holding.store(batch.len(), Ordering::SeqCst);
            // Until the lock is had, a queued write stays withdrawable (its state is QUEUED).
            let _committing = self.commit.lock().unwrap_or_else(|e| e.into_inner());
            while batch.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(op) => batch.push(op),
                    Err(_) => break,
                }
            }
            // A write its caller withdrew is dropped; the others are taken: withdrawable only
            // until the writer starts them.
            batch.retain(|op| {
                match op
                    .state
                    .compare_exchange(QUEUED, TAKEN, Ordering::SeqCst, Ordering::SeqCst)
                {
                    Ok(_) => true,
                    Err(now) => now == TAKEN,
                }
            });
            // Outcomes of sent charges first; stable, so in arrival order within each kind
            // (carried writes ahead of new ones of their kind).
            batch.sort_by_key(|op| !op.first);
            // The batch is the writer's now, no longer waiting for it.
            self.holding.store(0, Ordering::SeqCst);
            if !batch.is_empty() {
                carried = self.commit_batch(batch, rx.len(), self.busy, self.busy);
            }
            self.holding.store(carried.len(), Ordering::SeqCst);
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
        // A batch of one is never cut short (see `commit`), so nothing is left over; a write
        // that were would be withdrawn by its caller when the channel closes.
        drop(self.commit_batch(vec![op], 0, acquire, wait.min(self.busy)));
        Ok(())
    }

    /// Commits a batch (the caller holds `commit`) and reports it if it committed; returns the
    /// taken writes it left for the next batch.
    fn commit_batch(
        &self,
        batch: Vec<Op>,
        queued: usize,
        connect: Duration,
        busy: Duration,
    ) -> Vec<Op> {
        // From here on the batch is fixed: what arrives now waits for the next one.
        self.running.store(true, Ordering::SeqCst);
        let (committed, left) = self.commit(batch, Instant::now(), connect, busy);
        self.running.store(false, Ordering::SeqCst);
        if let Some((commit, size)) = committed.filter(|&(_, size)| size > 0) {
            (self.observer)(BatchReport {
                size,
                commit,
                queued: queued + left.len(),
            });
        }
        left
    }

    /// One transaction for the whole batch, a savepoint per write, one commit; then the
    /// answers. `connect` bounds the wait for a pooled connection, `busy` the wait for SQLite's
    /// lock. Returns how long the transaction took from `BEGIN` and how many writes it held
    /// (withdrawn ones skipped), if it committed; and the taken writes it left for the next
    /// transaction.
    ///
    /// A transaction answers its writes only when it commits, so it must commit before the
    /// first of their callers stops waiting: once less than two writes' time (at the pace of the
    /// last writes) is left before that moment, the rest of the batch is left for the next one.
    /// A write that could not be written and committed before its own caller stops waiting is
    /// let go unrun: its caller answers 503 at once, instead of 504 later — unless no write of
    /// the batch could, when the one with the most time left runs (see `fallback`). Without
    /// this, writes slower than usual (a slow disk) made every batch outlast its callers'
    /// patience: the writer stayed busy and every answer came too late.
    fn commit(
        &self,
        batch: Vec<Op>,
        taken: Instant,
        connect: Duration,
        busy: Duration,
    ) -> (Option<(Duration, usize)>, Vec<Op>) {
        let answers_of = |batch: Vec<Op>| batch.into_iter().map(|op| op.answer).collect();
        let mut conn = match self.pool.get_timeout(connect) {
            Ok(c) => c,
            Err(e) => {
                fail_all(answers_of(batch), DbError::from_pool(e), taken);
                return (None, Vec::new());
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
                return (None, Vec::new());
            }
        };
        let mut done: Vec<(Sender<Answer>, Result<Value, DbError>)> =
            Vec::with_capacity(batch.len());
        let mut left = Vec::new();
        let mut earliest_give_up: Option<Instant> = None;
        // When by the pace no write of the batch could be committed before its caller stops
        // waiting, the one with the most time left runs anyway (its caller still waits): it
        // brings the pace up to date, so one slow write cannot leave a pace that refuses every
        // later write for good.
        let start = Instant::now();
        let needed_now = 2 * self.pace();
        let fallback = if batch.iter().any(|op| start + needed_now < op.give_up_at) {
            None
        } else {
            batch
                .iter()
                .enumerate()
                .filter(|(_, op)| start < op.give_up_at)
                .max_by_key(|(_, op)| op.give_up_at)
                .map(|(i, _)| i)
        };
        let mut ops = batch.into_iter().enumerate();
        while let Some((i, op)) = ops.next() {
            let now = Instant::now();
            // Time for this write and the commit, at the pace of the last writes.
            let needed = 2 * self.pace();
            if earliest_give_up.is_some_and(|earliest| now + needed >= earliest) {
                left = std::iter::once(op).chain(ops.map(|(_, op)| op)).collect();
                break;
            }
            // Its caller has stopped waiting, or it could not be written and committed before
            // that (but for the fallback above). Dropping the write closes its channel, which
            // tells the caller at once that nothing was written.
            if now >= op.give_up_at || (Some(i) != fallback && now + needed >= op.give_up_at) {
                continue;
            }
            if op
                .state
                .compare_exchange(TAKEN, RUNNING, Ordering::SeqCst, Ordering::SeqCst)
                .is_err()
            {
                // Withdrawn by its caller while the writes before it ran.
                continue;
            }
            let delay = self.slow.current();
            if !delay.is_zero() {
                thread::sleep(delay);
            }
            let (result, intact) = run_in_savepoint(&tx, op.work);
            self.keep_pace(now.elapsed());
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
                    .chain(ops.map(|(_, op)| op.answer))
                    .collect();
                fail_all(answers, why, taken);
                return (None, Vec::new());
            }
            earliest_give_up =
                Some(earliest_give_up.map_or(op.give_up_at, |e| e.min(op.give_up_at)));
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
                let size = done.len();
                let all_stored = done
                    .iter()
                    .all(|(_, r)| !matches!(r, Err(DbError::Unavailable { .. })));
                if all_stored && self.writes_failing.swap(false, Ordering::SeqCst) {
                    log::warn!("storage: writes succeed again; ready for work");
                }
                for (answer, result) in done {
                    let _ = answer.send(Answer { result, taken });
                }
                (Some((committed, size)), left)
            }
            Err(e) => {
                let why = self.note(DbError::from_sqlite(e));
                fail_all(
                    done.into_iter().map(|(answer, _)| answer).collect(),
                    why,
                    taken,
                );
                (None, left)
            }
        }
    }

    /// How long a write has taken lately (a moving average), inside its transaction.
    fn pace(&self) -> Duration {
        Duration::from_micros(self.pace_us.load(Ordering::Relaxed))
    }

    fn keep_pace(&self, write: Duration) {
        let us = u64::try_from(write.as_micros()).unwrap_or(u64::MAX);
        let pace = self.pace_us.load(Ordering::Relaxed);
        self.pace_us
            .store(pace - pace / 8 + us / 8, Ordering::Relaxed);
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
