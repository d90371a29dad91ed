//! Unit 04, the pool: r2d2 over SQLite in WAL mode, the schema and its migrations, and the
//! payments table. Knows SQLite, nothing about HTTP.
//!
//! Two rules carry the design. Acquisition always has a timeout (a saturated pool fails fast
//! instead of queueing forever), and every write goes through the single writer (`writer.rs`):
//! one `BEGIN IMMEDIATE` transaction for what is queued, committed by the writer thread (or,
//! when nothing else is going on, by the request itself): a deferred
//! transaction that reads then writes fails at once with "database is locked" under WAL when
//! another writer committed in between, ignoring the busy timeout.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

use r2d2::{Pool, PooledConnection};
use r2d2_sqlite::SqliteConnectionManager;
use rusqlite::{Connection, OptionalExtension, Row, Transaction, TransactionBehavior, params};
use serde::Serialize;

pub use super::error::DbError;
use super::writer::{BatchObserver, SlowWrites, WriteQueue, Written};
use crate::config::SyncMode;

pub type Conn = PooledConnection<SqliteConnectionManager>;

/// Schema versions, applied in order; `PRAGMA user_version` records how many have run.
const MIGRATIONS: &[&str] = &[
    // 1: payments and the idempotency keys that point at them.
    "CREATE TABLE payments (
        seq                INTEGER PRIMARY KEY AUTOINCREMENT,
        id                 TEXT NOT NULL UNIQUE,
        scope              TEXT NOT NULL,
        status             TEXT NOT NULL CHECK (status IN
                               ('processing','pending','succeeded','declined','failed')),
        amount             INTEGER NOT NULL CHECK (amount BETWEEN 1 AND 99999999),
        currency           TEXT NOT NULL,
        source             TEXT NOT NULL,
        description        TEXT,
        provider_charge_id TEXT,
        failure_code       TEXT,
        created_at         TEXT NOT NULL,
        updated_at         TEXT NOT NULL
     );
     CREATE INDEX payments_by_scope ON payments (scope, seq);
     CREATE INDEX payments_by_status ON payments (status) WHERE status IN ('processing','pending');
     CREATE TABLE idempotency_keys (
        scope            TEXT NOT NULL,
        key              TEXT NOT NULL,
        fingerprint      TEXT NOT NULL,
        payment_id       TEXT NOT NULL REFERENCES payments (id),
        lock_token       TEXT,
        locked_at_ms     INTEGER,
        response_status  INTEGER,
        response_headers TEXT,
        response_body    BLOB,
        created_at_ms    INTEGER NOT NULL,
        finished_at_ms   INTEGER,
        PRIMARY KEY (scope, key)
     );
     CREATE INDEX keys_finished ON idempotency_keys (finished_at_ms) WHERE finished_at_ms IS NOT NULL;",
    // 2: a place for the writes that prove the database can be written (start-up, readiness).
    "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);",
    // 3: the reconciler joins unsettled payments to their keys every second.
    "CREATE INDEX keys_by_payment ON idempotency_keys (payment_id);",
];

/// Records `value` under `key` in `meta`: a real write, which is how a read-only file, a full
/// disk or an I/O error is noticed before a payment depends on it.
const META_UPSERT: &str = "INSERT INTO meta (key, value) VALUES (?1, ?2)
                           ON CONFLICT (key) DO UPDATE SET value = excluded.value";

/// The shared connection pool, and the one writer in front of it.
#[derive(Clone)]
pub struct Db {
    pool: Pool<SqliteConnectionManager>,
    /// Every write of this process goes through one writer thread, which commits what is
    /// queued in one transaction (`writer.rs`); the pool lends it a connection per batch and
    /// serves every read.
    writer: Arc<WriteQueue>,
    /// Set while writes fail because the storage cannot be written (see
    /// [`DbError::Unavailable`]); cleared by the next commit. Readiness fails meanwhile, and
    /// the housekeeping thread probes with [`Db::probe_write`] so that a server nobody sends
    /// work to still notices the recovery.
    writes_failing: Arc<AtomicBool>,
}

impl Db {
    /// Opens (creating parent directories and the file) and migrates the database, fills a
    /// pool of `size` connections, each in WAL mode with foreign keys on, and starts the
    /// writer; `observer` hears about every batch it commits.
    pub fn open(
        path: &Path,
        size: u32,
        sync: SyncMode,
        write_timeout: Duration,
        observer: BatchObserver,
    ) -> Result<Db, String> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        }
        let sync_pragma = match sync {
            SyncMode::Full => "FULL",
            SyncMode::Normal => "NORMAL",
        };
        // Migrate on a plain connection first, so the pool's connections see the final schema.
        let mut setup =
            Connection::open(path).map_err(|e| format!("cannot open {}: {e}", path.display()))?;
        setup
            .pragma_update(None, "journal_mode", "WAL")
            .map_err(|e| format!("cannot enable WAL on {}: {e}", path.display()))?;
        migrate(&mut setup).map_err(|e| format!("migrating {}: {e}", path.display()))?;
        // SQLite opens a file it may not write read-only without a word, and a migrated
        // database needs no write to start: only an actual write shows that payments can be
        // recorded. Root ignores file modes, so this is also the only check that holds for it.
        setup
            .execute(
                META_UPSERT,
                params!["started_at", timestamp(SystemTime::now())],
            )
            .map_err(|e| {
                format!(
                    "{} cannot be written ({e}): check the file's and its directory's permissions, the mount and the free space",
                    path.display()
                )
            })?;
        drop(setup);

        let manager = SqliteConnectionManager::file(path).with_init(move |c| {
            c.execute_batch(&format!(
                "PRAGMA journal_mode = WAL; PRAGMA synchronous = {sync_pragma}; PRAGMA foreign_keys = ON; \
                 PRAGMA wal_autocheckpoint = 1000;"
            ))?;
            c.busy_timeout(write_timeout)?;
            c.set_transaction_behavior(TransactionBehavior::Immediate);
            Ok(())
        });
        let pool = Pool::builder()
            .max_size(size)
            // Measured: the default `SELECT 1` on every checkout costs a round trip on the hot path;
            // a local SQLite file does not go stale the way a network connection does.
            .test_on_check_out(false)
            .connection_timeout(Duration::from_secs(5))
            .build(manager)
            .map_err(|e| format!("cannot open the pool on {}: {e}", path.display()))?;
        let writes_failing = Arc::new(AtomicBool::new(false));
        let writer = WriteQueue::start(
            pool.clone(),
            write_timeout,
            writes_failing.clone(),
            observer,
        )?;
        Ok(Db {
            pool,
            writer: Arc::new(writer),
            writes_failing,
        })
    }

    /// Hands `work` to the writer: it runs in its own savepoint of the next batch, and its
    /// result is returned once the batch has committed (or failed). See [`WriteQueue::write`]
    /// for the two timeouts, and the one answer that comes before the commit.
    pub fn write<T: Send + 'static>(
        &self,
        acquire: Duration,
        wait: Duration,
        work: impl FnOnce(&Transaction) -> rusqlite::Result<T> + Send + 'static,
    ) -> Written<T> {
        self.writer.write(acquire, wait, false, work)
    }

    /// [`Db::write`] for a write that records what already happened (a charge's outcome): it
    /// goes ahead of the other writes waiting with it, so that when the writer cannot keep up,
    /// new payments are refused before started ones go unrecorded.
    pub fn write_first<T: Send + 'static>(
        &self,
        acquire: Duration,
        wait: Duration,
        work: impl FnOnce(&Transaction) -> rusqlite::Result<T> + Send + 'static,
    ) -> Written<T> {
        self.writer.write(acquire, wait, true, work)
    }

    /// Writes waiting for the writer.
    pub fn writer_queue(&self) -> usize {
        self.writer.queued()
    }

    /// The write-delay fault (`serve --write-delay`).
    pub fn slow_writes(&self) -> &SlowWrites {
        self.writer.slow_writes()
    }

    #[cfg(test)]
    pub fn set_writer_pace(&self, pace: Duration) {
        self.writer.set_pace(pace);
    }

    /// Whether the writer is running a batch right now.
    pub fn writer_running(&self) -> bool {
        self.writer.running()
    }

    /// Lets the writer commit what is queued and stops it (shutdown, before the checkpoint).
    pub fn stop_writer(&self) {
        self.writer.stop();
    }

    /// Whether the last write reached the storage (false during a disk-full or I/O incident).
    pub fn storage_healthy(&self) -> bool {
        !self.writes_failing.load(Ordering::SeqCst)
    }

    /// One small real write (to `meta`), to find out whether the storage can be written again.
    pub fn probe_write(&self, timeout: Duration) -> Result<(), DbError> {
        let stamp = timestamp(SystemTime::now());
        self.write(timeout, timeout, move |tx| {
            tx.prepare_cached(META_UPSERT)?
                .execute(params!["write_probe", stamp])
                .map(|_| ())
        })
        .result
    }

    /// Borrows a connection, waiting at most `timeout`.
    pub fn acquire(&self, timeout: Duration) -> Result<Conn, DbError> {
        self.pool.get_timeout(timeout).map_err(DbError::from_pool)
    }

    /// (open connections, idle connections).
    pub fn state(&self) -> (u32, u32) {
        let s = self.pool.state();
        (s.connections, s.idle_connections)
    }

    /// Whether the database can take work (readiness): writes are not failing, and it answers
    /// a trivial query within `timeout`.
    pub fn ping(&self, timeout: Duration) -> bool {
        self.storage_healthy()
            && self
                .acquire(timeout)
                .and_then(|c| {
                    c.query_row("SELECT 1", [], |_| Ok(()))
                        .map_err(DbError::from)
                })
                .is_ok()
    }

    /// Copies what it can of the WAL into the database file without waiting for anyone. SQLite
    /// otherwise checkpoints inside the commit that crosses its threshold (1000 pages) — and
    /// fsyncs — while holding the write lock, stalling every writer queued behind it. The
    /// housekeeping thread calls this every 100 ms so that the in-commit checkpoint, kept as a
    /// safety net, rarely has anything to do. (Measured at 32 workers, provider 50 ms, when
    /// writers still queued for a token: the mean wait for it fell from 5.4 ms to 0.9 ms.)
    pub fn checkpoint_passive(&self, timeout: Duration) -> Result<(), DbError> {
        let conn = self.acquire(timeout)?;
        conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()))?;
        Ok(())
    }

    /// Checkpoints the WAL into the main file and truncates it (the last step of shutdown).
    pub fn checkpoint(&self, timeout: Duration) -> Result<(), DbError> {
        let conn = self.acquire(timeout)?;
        conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))?;
        Ok(())
    }
}

/// Applies the migrations not applied yet. `PRAGMA user_version` says how many ran; the
/// `schema_version` table records each one and when, like on PostgreSQL (versions applied
/// before the table existed are recorded with `applied_at` unknown).
fn migrate(conn: &mut Connection) -> rusqlite::Result<()> {
    let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(version.max(0) as usize) {
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        tx.execute_batch(sql)?;
        tx.execute_batch(
            "CREATE TABLE IF NOT EXISTS schema_version (version INTEGER PRIMARY KEY, applied_at TEXT NOT NULL)",
        )?;
        for earlier in 1..=i as i64 {
            tx.execute(
                "INSERT OR IGNORE INTO schema_version (version, applied_at) VALUES (?1, 'unknown')",
                params![earlier],
            )?;
        }
        tx.execute(
            "INSERT INTO schema_version (version, applied_at) VALUES (?1, ?2)",
            params![i as i64 + 1, timestamp(SystemTime::now())],
        )?;
        tx.pragma_update(None, "user_version", i as i64 + 1)?;
        tx.commit()?;
    }
    Ok(())
}

/// RFC 3339 UTC with milliseconds, e.g. `2026-11-27T14:48:43.123Z`.
pub fn timestamp(at: SystemTime) -> String {
    humantime::format_rfc3339_millis(at).to_string()
}

/// Milliseconds since the Unix epoch.
pub fn unix_ms(at: SystemTime) -> i64 {
    at.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Where a payment stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PaymentStatus {
    /// Claimed; the charge has not been sent yet.
    Processing,
    /// The charge was sent; its outcome is not known yet.
    Pending,
    Succeeded,
    Declined,
    /// The charge was never made; a retry with the same key may still make it.
    Failed,
}

impl PaymentStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            PaymentStatus::Processing => "processing",
            PaymentStatus::Pending => "pending",
            PaymentStatus::Succeeded => "succeeded",
            PaymentStatus::Declined => "declined",
            PaymentStatus::Failed => "failed",
        }
    }

    pub(crate) fn parse(s: &str) -> PaymentStatus {
        match s {
            "processing" => PaymentStatus::Processing,
            "pending" => PaymentStatus::Pending,
            "succeeded" => PaymentStatus::Succeeded,
            "declined" => PaymentStatus::Declined,
            _ => PaymentStatus::Failed,
        }
    }
}

/// The payment object, as stored and as sent.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Payment {
    pub id: String,
    pub object: &'static str,
    pub status: PaymentStatus,
    pub amount: i64,
    pub currency: String,
    pub source: String,
    pub description: Option<String>,
    pub provider_charge_id: Option<String>,
    pub failure_code: Option<String>,
    pub created_at: String,
    pub updated_at: String,
}

impl Payment {
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::to_value(self).unwrap_or(serde_json::Value::Null)
    }
}

const PAYMENT_COLUMNS: &str = "id, status, amount, currency, source, description, \
                               provider_charge_id, failure_code, created_at, updated_at";

fn payment_from_row(r: &Row) -> rusqlite::Result<Payment> {
    Ok(Payment {
        id: r.get(0)?,
        object: "payment",
        status: PaymentStatus::parse(&r.get::<_, String>(1)?),
        amount: r.get(2)?,
        currency: r.get(3)?,
        source: r.get(4)?,
        description: r.get(5)?,
        provider_charge_id: r.get(6)?,
        failure_code: r.get(7)?,
        created_at: r.get(8)?,
        updated_at: r.get(9)?,
    })
}

/// Inserts a new payment owned by `scope`.
pub fn insert_payment(tx: &Transaction, scope: &str, p: &Payment) -> rusqlite::Result<()> {
    tx.prepare_cached(
        "INSERT INTO payments (id, scope, status, amount, currency, source, description,
                               provider_charge_id, failure_code, created_at, updated_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
    )?
    .execute(params![
        p.id,
        scope,
        p.status.as_str(),
        p.amount,
        p.currency,
        p.source,
        p.description,
        p.provider_charge_id,
        p.failure_code,
        p.created_at,
        p.updated_at
    ])?;
    Ok(())
}

/// Records a payment's new status and what the provider said.
pub fn update_payment(tx: &Transaction, p: &Payment) -> rusqlite::Result<()> {
    tx.prepare_cached(
        "UPDATE payments SET status = ?2, provider_charge_id = ?3, failure_code = ?4, updated_at = ?5
         WHERE id = ?1",
    )?
    .execute(params![
        p.id,
        p.status.as_str(),
        p.provider_charge_id,
        p.failure_code,
        p.updated_at
    ])?;
    Ok(())
}

/// One payment by id, only if `scope` owns it.
pub fn get_payment(conn: &Connection, scope: &str, id: &str) -> rusqlite::Result<Option<Payment>> {
    conn.prepare_cached(&format!(
        "SELECT {PAYMENT_COLUMNS} FROM payments WHERE id = ?1 AND scope = ?2"
    ))?
    .query_row(params![id, scope], payment_from_row)
    .optional()
}

/// A payment by id whoever owns it (the idempotency layer's own lookups).
pub fn payment_by_id(conn: &Connection, id: &str) -> rusqlite::Result<Option<Payment>> {
    conn.prepare_cached(&format!(
        "SELECT {PAYMENT_COLUMNS} FROM payments WHERE id = ?1"
    ))?
    .query_row(params![id], payment_from_row)
    .optional()
}

/// Newest first, at most `limit`, strictly older than `starting_after` when given.
/// Returns `None` when `starting_after` names no payment of this scope.
pub fn list_payments(
    conn: &Connection,
    scope: &str,
    limit: usize,
    starting_after: Option<&str>,
) -> rusqlite::Result<Option<(Vec<Payment>, bool)>> {
    let before = match starting_after {
        None => i64::MAX,
        Some(id) => match conn
            .prepare_cached("SELECT seq FROM payments WHERE id = ?1 AND scope = ?2")?
            .query_row(params![id, scope], |r| r.get::<_, i64>(0))
            .optional()?
        {
            Some(seq) => seq,
            None => return Ok(None),
        },
    };
    let mut stmt = conn.prepare_cached(&format!(
        "SELECT {PAYMENT_COLUMNS} FROM payments WHERE scope = ?1 AND seq < ?2
         ORDER BY seq DESC LIMIT ?3"
    ))?;
    let mut rows: Vec<Payment> = stmt
        .query_map(params![scope, before, limit as i64 + 1], payment_from_row)?
        .collect::<rusqlite::Result<_>>()?;
    let has_more = rows.len() > limit;
    rows.truncate(limit);
    Ok(Some((rows, has_more)))
}

#[cfg(test)]
impl Payment {
    /// A `processing` payment of 100 usd, for unit tests here and in the flow.
    pub fn sample(id: &str) -> Payment {
        let now = timestamp(SystemTime::now());
        Payment {
            id: id.into(),
            object: "payment",
            status: PaymentStatus::Processing,
            amount: 100,
            currency: "usd".into(),
            source: "tok_visa".into(),
            description: None,
            provider_charge_id: None,
            failure_code: None,
            created_at: now.clone(),
            updated_at: now,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_observer() -> BatchObserver {
        Arc::new(|_| {})
    }

    /// A database at `path` with `--sync normal`, `pool` connections and the write timeout.
    fn open_normal(path: &Path, pool: u32, write_timeout: Duration) -> Db {
        Db::open(path, pool, SyncMode::Normal, write_timeout, no_observer()).unwrap()
    }

    fn temp_db() -> (tempfile::TempDir, Db) {
        let dir = tempfile::tempdir().unwrap();
        let db = open_normal(&dir.path().join("sub/t.db"), 2, Duration::from_millis(100));
        (dir, db)
    }

    fn payment(id: &str) -> Payment {
        Payment::sample(id)
    }

    #[test]
    fn migrations_are_recorded_and_idempotent() {
        let (dir, db) = temp_db();
        drop(db);
        let again = Db::open(
            &dir.path().join("sub/t.db"),
            1,
            SyncMode::Full,
            Duration::from_millis(100),
            no_observer(),
        )
        .unwrap();
        let c = again.acquire(Duration::from_secs(1)).unwrap();
        let v: i64 = c
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .unwrap();
        assert_eq!(v, MIGRATIONS.len() as i64);
        let recorded: i64 = c
            .query_row(
                "SELECT count(*) FROM schema_version WHERE applied_at != 'unknown'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(
            recorded,
            MIGRATIONS.len() as i64,
            "each migration recorded once"
        );
        let mode: String = c
            .query_row("PRAGMA journal_mode", [], |r| r.get(0))
            .unwrap();
        assert_eq!(mode, "wal");
    }

    #[test]
    fn an_exhausted_pool_times_out() {
        let (_dir, db) = temp_db();
        let _a = db.acquire(Duration::from_secs(1)).unwrap();
        let _b = db.acquire(Duration::from_secs(1)).unwrap();
        assert!(matches!(
            db.acquire(Duration::from_millis(20)),
            Err(DbError::AcquireTimeout)
        ));
    }

    /// Holds SQLite's write lock from another connection (as another process would) until
    /// the returned sender is dropped or sent to.
    fn hold_write_lock(path: &Path) -> crossbeam::channel::Sender<()> {
        let (tx, rx) = crossbeam::channel::bounded::<()>(0);
        let (locked_tx, locked_rx) = crossbeam::channel::bounded(0);
        let path = path.to_path_buf();
        std::thread::spawn(move || {
            let c = Connection::open(path).unwrap();
            c.execute_batch("BEGIN IMMEDIATE").unwrap();
            locked_tx.send(()).unwrap();
            let _ = rx.recv();
            c.execute_batch("COMMIT").unwrap();
        });
        locked_rx.recv().unwrap();
        tx
    }

    /// Writes a row to `meta` from another thread (5 s for each timeout), as a request would.
    fn write_in_background(db: &Db, key: &str) -> std::thread::JoinHandle<Written<usize>> {
        let key = key.to_string();
        in_background(db, move |db| {
            db.write(
                Duration::from_secs(5),
                Duration::from_secs(5),
                meta_insert(key),
            )
        })
    }

    /// Runs `f` on the database from another thread, as a request would.
    fn in_background<T: Send + 'static>(
        db: &Db,
        f: impl FnOnce(&Db) -> T + Send + 'static,
    ) -> std::thread::JoinHandle<T> {
        let db = db.clone();
        std::thread::spawn(move || f(&db))
    }

    /// The keys of `meta` that `query` (selecting `key`) returns, in its order.
    fn meta_keys(db: &Db, query: &str) -> Vec<String> {
        let c = db.acquire(Duration::from_secs(1)).unwrap();
        c.prepare(query)
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .map(Result::unwrap)
            .collect()
    }

    fn meta_insert(key: String) -> impl FnOnce(&Transaction) -> rusqlite::Result<usize> {
        move |tx| {
            tx.execute(
                "INSERT INTO meta (key, value) VALUES (?1, 'v')",
                params![key],
            )
        }
    }

    /// A database whose writer is stuck: its first write (`first`, from another thread) waits
    /// in `BEGIN` for SQLite's lock, held elsewhere until the returned sender is dropped.
    fn stuck_writer(
        first: &str,
    ) -> (
        tempfile::TempDir,
        Db,
        crossbeam::channel::Sender<()>,
        std::thread::JoinHandle<Written<usize>>,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.db");
        let db = open_normal(&path, 2, Duration::from_secs(5));
        let lock = hold_write_lock(&path);
        let first = write_in_background(&db, first);
        eventually_queue_empty(&db);
        (dir, db, lock, first)
    }

    #[test]
    fn a_write_the_writer_did_not_take_within_its_acquire_slice_is_withdrawn_and_never_runs() {
        let (_dir, db, lock, first) = stuck_writer("first");
        let t = std::time::Instant::now();
        let second = db.write(
            Duration::from_millis(50),
            Duration::from_secs(5),
            meta_insert("second".into()),
        );
        assert!(
            matches!(second.result, Err(DbError::AcquireTimeout)),
            "{second:?}"
        );
        assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
        // A reader is not held up by a writer waiting for the lock.
        assert!(db.acquire(Duration::from_millis(500)).is_ok());
        drop(lock);
        assert_eq!(first.join().unwrap().result.unwrap(), 1);
        // The withdrawn write never ran, and the writer goes on.
        assert_eq!(
            db.write(
                Duration::from_secs(1),
                Duration::from_secs(1),
                meta_insert("third".into())
            )
            .result
            .unwrap(),
            1
        );
        let keys = meta_keys(&db, "SELECT key FROM meta WHERE value = 'v' ORDER BY key");
        assert_eq!(keys, ["first", "third"]);
    }

    #[test]
    fn a_write_recording_what_happened_goes_ahead_of_the_writes_queued_with_it() {
        let (_dir, db, lock, blocker) = stuck_writer("blocker");
        let new = write_in_background(&db, "new");
        eventually_queued(&db, 1);
        let recorded = in_background(&db, |db| {
            db.write_first(
                Duration::from_secs(5),
                Duration::from_secs(5),
                meta_insert("recorded".into()),
            )
        });
        eventually_queued(&db, 2);
        drop(lock);
        for w in [blocker, new, recorded] {
            assert_eq!(w.join().unwrap().result.unwrap(), 1);
        }
        let order = meta_keys(
            &db,
            "SELECT key FROM meta WHERE key IN ('new', 'recorded') ORDER BY rowid",
        );
        assert_eq!(order, ["recorded", "new"], "queued later, written first");
    }

    #[test]
    fn a_write_that_could_not_be_committed_before_its_caller_stops_waiting_is_refused_unrun() {
        let (_dir, db, lock, blocker) = stuck_writer("blocker");
        // A write whose caller waits 3.5 s in all, then a patient one (10 s): the writer takes
        // both into its next batch, the impatient one first.
        let t = std::time::Instant::now();
        let impatient = in_background(&db, |db| {
            db.write(
                Duration::from_secs(3),
                Duration::from_millis(500),
                meta_insert("impatient".into()),
            )
        });
        eventually_queued(&db, 1);
        let patient = write_in_background(&db, "patient");
        eventually_queued(&db, 2);
        // As if writes had lately taken 5 s each: neither could be written and committed in
        // time; the one with the most time left runs (the pace must come up to date), the
        // other is let go at once — not run first because it is first.
        db.set_writer_pace(Duration::from_secs(5));
        drop(lock);
        assert_eq!(blocker.join().unwrap().result.unwrap(), 1);
        assert_eq!(patient.join().unwrap().result.unwrap(), 1);
        let impatient = impatient.join().unwrap();
        assert!(
            matches!(impatient.result, Err(DbError::AcquireTimeout)),
            "{impatient:?}"
        );
        // Refused when the writer let it go, not when its caller's wait ran out.
        assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
        let c = db.acquire(Duration::from_secs(1)).unwrap();
        let n: i64 = c
            .query_row(
                "SELECT count(*) FROM meta WHERE key = 'impatient'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(n, 0, "refused, and so never written");
        // The first write of a batch runs whatever the pace says: one slow write cannot make
        // the writer refuse everything after it.
        db.set_writer_pace(Duration::from_secs(5));
        let alone = db.write(
            Duration::from_secs(1),
            Duration::from_secs(1),
            meta_insert("alone".into()),
        );
        assert_eq!(alone.result.unwrap(), 1);
    }

    #[test]
    fn the_write_delay_fault_slows_every_write_and_switches_off_and_on() {
        let (_dir, db) = temp_db();
        let slow = Duration::from_millis(40);
        db.slow_writes().arm(slow);
        assert_eq!(db.slow_writes().current(), slow);
        let w = db.write(
            Duration::from_secs(5),
            Duration::from_secs(5),
            meta_insert("slow".into()),
        );
        assert_eq!(w.result.unwrap(), 1);
        assert!(w.ran >= slow, "{:?}", w.ran);
        // SIGUSR1's switch: off, then on again at the armed delay.
        assert_eq!(db.slow_writes().toggle(), Duration::ZERO);
        assert_eq!(db.slow_writes().current(), Duration::ZERO);
        assert_eq!(db.slow_writes().toggle(), slow);
    }

    /// Waits (≤ 5 s) until `n` writes wait for the writer.
    fn eventually_queued(db: &Db, n: usize) {
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while db.writer_queue() < n {
            assert!(std::time::Instant::now() < deadline, "{n} writes queue");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Waits (≤ 5 s) until the writer runs a batch and has taken everything queued.
    fn eventually_queue_empty(db: &Db) {
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while !db.writer_running() || db.writer_queue() > 0 {
            assert!(
                std::time::Instant::now() < deadline,
                "the writer took nothing"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn writes_queued_together_commit_in_one_batch_and_a_failing_one_fails_alone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("b.db");
        let sizes = Arc::new(std::sync::Mutex::new(Vec::new()));
        let observer: BatchObserver = {
            let sizes = sizes.clone();
            Arc::new(move |b| sizes.lock().unwrap().push(b.size))
        };
        let db = Db::open(&path, 2, SyncMode::Full, Duration::from_secs(5), observer).unwrap();
        // A key already taken, for one write of the batch to collide with.
        db.write(
            Duration::from_secs(1),
            Duration::from_secs(1),
            meta_insert("taken".into()),
        )
        .result
        .unwrap();
        let lock = hold_write_lock(&path);
        // The writer is stuck on a first write; ten more queue behind it meanwhile.
        let blocker = write_in_background(&db, "blocker");
        eventually_queue_empty(&db);
        let writes: Vec<_> = (0..10)
            .map(|i| {
                // Number 4 repeats a key already written: a constraint violation of its own.
                let key = if i == 4 {
                    "taken".to_string()
                } else {
                    format!("k{i}")
                };
                write_in_background(&db, &key)
            })
            .collect();
        eventually_queued(&db, 10);
        drop(lock);
        assert!(blocker.join().unwrap().result.is_ok());
        let results: Vec<_> = writes
            .into_iter()
            .map(|w| w.join().unwrap().result)
            .collect();
        for (i, r) in results.iter().enumerate() {
            match (i, r) {
                (4, Err(DbError::Sqlite(e))) => assert!(e.to_string().contains("UNIQUE"), "{e}"),
                (4, other) => panic!("the duplicate fails: {other:?}"),
                (_, Ok(1)) => {}
                (i, other) => panic!("write {i}: {other:?}"),
            }
        }
        let c = db.acquire(Duration::from_secs(1)).unwrap();
        let n: i64 = c
            .query_row("SELECT count(*) FROM meta WHERE key LIKE 'k%'", [], |r| {
                r.get(0)
            })
            .unwrap();
        assert_eq!(n, 9, "every write but the failing one committed");
        // A batch is reported after its answers are sent: wait for the report.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        let sizes = loop {
            let sizes = sizes.lock().unwrap().clone();
            if sizes.len() >= 3 || std::time::Instant::now() > deadline {
                break sizes;
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        assert_eq!(sizes.get(1), Some(&1), "the blocker alone: {sizes:?}");
        assert_eq!(
            sizes.get(2),
            Some(&10),
            "the ten queued writes were one batch: {sizes:?}"
        );
    }

    #[test]
    fn a_write_that_ends_the_whole_transaction_fails_every_write_of_its_batch() {
        // One pooled connection, so the page limit set on it applies to every write here.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("batch-full.db");
        let db = open_normal(&path, 1, Duration::from_secs(5));
        {
            let c = db.acquire(Duration::from_secs(1)).unwrap();
            let pages: i64 = c.query_row("PRAGMA page_count", [], |r| r.get(0)).unwrap();
            c.pragma_update(None, "max_page_count", (pages + 2).to_string())
                .unwrap();
        }
        let lock = hold_write_lock(&path);
        let blocker = write_in_background(&db, "blocker");
        eventually_queue_empty(&db);
        // Five small writes and one too large for the file queue behind it: one batch.
        let writes: Vec<_> = (0..6)
            .map(|i| {
                in_background(&db, move |db| {
                    db.write(Duration::from_secs(5), Duration::from_secs(5), move |tx| {
                        let value = if i == 3 {
                            "x".repeat(256 * 1024)
                        } else {
                            "v".into()
                        };
                        tx.execute(
                            "INSERT INTO meta (key, value) VALUES (?1, ?2)",
                            params![format!("small-{i}"), value],
                        )
                    })
                })
            })
            .collect();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while db.writer_queue() < 6 {
            assert!(std::time::Instant::now() < deadline, "six writes queue");
            std::thread::sleep(Duration::from_millis(5));
        }
        drop(lock);
        assert!(blocker.join().unwrap().result.is_ok());
        for w in writes {
            let r = w.join().unwrap().result;
            assert!(
                matches!(r, Err(DbError::Unavailable { .. })),
                "every write of the batch fails with it: {r:?}"
            );
        }
        let c = db.acquire(Duration::from_secs(1)).unwrap();
        let n: i64 = c
            .query_row(
                "SELECT count(*) FROM meta WHERE key LIKE 'small-%'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(n, 0, "nothing of the failed batch was stored");
    }

    #[test]
    fn a_full_database_is_unavailable_once_per_incident_until_a_write_succeeds() {
        // One pooled connection, so the page limit set on it applies to every write here.
        let dir = tempfile::tempdir().unwrap();
        let db = open_normal(&dir.path().join("full.db"), 1, Duration::from_millis(100));
        let limit = |pages: &str| {
            let c = db.acquire(Duration::from_secs(1)).unwrap();
            c.pragma_update(None, "max_page_count", pages).unwrap();
        };
        let big = |db: &Db| {
            db.write(Duration::from_secs(1), Duration::from_secs(1), |tx| {
                tx.execute(
                    "INSERT INTO meta (key, value) VALUES (?1, ?2)",
                    params![crate::ids::request_id(), "x".repeat(64 * 1024)],
                )
            })
            .result
        };
        assert!(db.storage_healthy());
        let pages: i64 = db
            .acquire(Duration::from_secs(1))
            .unwrap()
            .query_row("PRAGMA page_count", [], |r| r.get(0))
            .unwrap();
        limit(&pages.to_string());
        match big(&db) {
            Err(DbError::Unavailable {
                cause,
                new_incident: true,
            }) => assert!(cause.contains("full"), "{cause}"),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            big(&db),
            Err(DbError::Unavailable {
                new_incident: false,
                ..
            })
        ));
        assert!(!db.storage_healthy());
        assert!(!db.ping(Duration::from_secs(1)), "readiness fails");
        limit("1073741823");
        db.probe_write(Duration::from_secs(1)).unwrap();
        assert!(db.storage_healthy());
        assert!(db.ping(Duration::from_secs(1)));
    }

    #[test]
    fn payments_are_scoped_and_listed_newest_first() {
        let (_dir, db) = temp_db();
        db.write(Duration::from_secs(1), Duration::from_secs(1), |tx| {
            for i in 0..3 {
                insert_payment(tx, "a", &payment(&format!("pay_{i}")))?;
            }
            insert_payment(tx, "b", &payment("pay_b"))
        })
        .result
        .unwrap();
        let c = db.acquire(Duration::from_secs(1)).unwrap();
        assert!(get_payment(&c, "a", "pay_b").unwrap().is_none());
        assert!(get_payment(&c, "b", "pay_b").unwrap().is_some());
        let (page, more) = list_payments(&c, "a", 2, None).unwrap().unwrap();
        assert_eq!(
            page.iter().map(|p| p.id.as_str()).collect::<Vec<_>>(),
            ["pay_2", "pay_1"]
        );
        assert!(more);
        let (page, more) = list_payments(&c, "a", 2, Some("pay_1")).unwrap().unwrap();
        assert_eq!(page.len(), 1);
        assert!(!more);
        assert!(list_payments(&c, "a", 2, Some("pay_b")).unwrap().is_none());
    }
}
