//! The store the flow talks to, whichever database `--db` names: a SQLite file (one process,
//! its single writer thread, `db.rs`) or a PostgreSQL server shared by several instances
//! (`pg.rs`). The same operations, the same answers, the same timeouts: `acquire` bounds the
//! wait for a connection (or for the SQLite writer), `wait` the write itself.

use std::path::Path;
use std::time::{Duration, SystemTime};

use super::db::{self, Conn, Db, DbError, Payment};
use super::idempotency::{
    self, Attempt, NewPayment, NextAction, Persisted, StoredResponse, Unsettled,
};
use super::pg::{self, PgConn, PgStore};
use super::writer::{BatchObserver, SlowWrites, Written};
use crate::config::SyncMode;

/// The database behind the server.
#[derive(Clone)]
pub enum Store {
    Sqlite(Db),
    Postgres(PgStore),
}

/// A connection borrowed to read with.
pub enum Reader {
    Sqlite(Conn),
    Postgres(PgConn),
}

impl Reader {
    /// One payment by id, only if `scope` owns it.
    pub fn get_payment(&mut self, scope: &str, id: &str) -> Result<Option<Payment>, DbError> {
        match self {
            Reader::Sqlite(c) => db::get_payment(c, scope, id).map_err(DbError::from_sqlite),
            Reader::Postgres(c) => pg::get_payment(c, scope, id),
        }
    }

    /// Newest first; `None` when `starting_after` names no payment of this scope.
    pub fn list_payments(
        &mut self,
        scope: &str,
        limit: usize,
        starting_after: Option<&str>,
    ) -> Result<Option<(Vec<Payment>, bool)>, DbError> {
        match self {
            Reader::Sqlite(c) => {
                db::list_payments(c, scope, limit, starting_after).map_err(DbError::from_sqlite)
            }
            Reader::Postgres(c) => pg::list_payments(c, scope, limit, starting_after),
        }
    }
}

/// An [`Attempt`] the SQLite writer thread can own.
struct OwnedAttempt {
    scope: String,
    key: String,
    token: String,
}

impl OwnedAttempt {
    fn from(a: Attempt) -> OwnedAttempt {
        OwnedAttempt {
            scope: a.scope.to_string(),
            key: a.key.to_string(),
            token: a.token.to_string(),
        }
    }

    fn as_attempt(&self) -> Attempt<'_> {
        Attempt {
            scope: &self.scope,
            key: &self.key,
            token: &self.token,
        }
    }
}

impl Store {
    /// Opens and migrates the database `db` names: `postgres://USER@HOST:PORT/DB` is a
    /// PostgreSQL server, anything else a SQLite file. `observer` hears about the SQLite
    /// writer's batches (PostgreSQL has no writer thread: each request commits its own).
    pub fn open(
        db: &Path,
        size: u32,
        sync: SyncMode,
        write_timeout: Duration,
        observer: BatchObserver,
    ) -> Result<Store, String> {
        match db.to_str().filter(|s| pg::is_url(s)) {
            Some(url) => PgStore::open(url, size, sync, write_timeout).map(Store::Postgres),
            None => Db::open(db, size, sync, write_timeout, observer).map(Store::Sqlite),
        }
    }

    /// Whether this is a PostgreSQL database (no writer thread, no WAL file to checkpoint).
    pub fn is_postgres(&self) -> bool {
        matches!(self, Store::Postgres(_))
    }

    /// Borrows a connection to read with, waiting at most `timeout`.
    pub fn acquire(&self, timeout: Duration) -> Result<Reader, DbError> {
        match self {
            Store::Sqlite(db) => db.acquire(timeout).map(Reader::Sqlite),
            Store::Postgres(pg) => pg.acquire(timeout).map(Reader::Postgres),
        }
    }

    /// Phase 1 of a payment: claim the key, or find out what to answer instead.
    pub fn claim(
        &self,
        acquire: Duration,
        wait: Duration,
        attempt: Attempt,
        fingerprint: &str,
        input: &NewPayment,
        lock_ttl: Duration,
    ) -> Written<NextAction> {
        match self {
            Store::Sqlite(db) => {
                let (owned, fingerprint, input) = (
                    OwnedAttempt::from(attempt),
                    fingerprint.to_string(),
                    input.clone(),
                );
                db.write(acquire, wait, move |tx| {
                    idempotency::claim(
                        tx,
                        owned.as_attempt(),
                        &fingerprint,
                        &input,
                        SystemTime::now(),
                        lock_ttl,
                    )
                })
            }
            Store::Postgres(pg) => pg.claim(acquire, wait, attempt, fingerprint, input, lock_ttl),
        }
    }

    /// Phase 3: record the outcome while `attempt` still holds the key.
    pub fn persist(
        &self,
        acquire: Duration,
        wait: Duration,
        attempt: Attempt,
        payment: &Payment,
        stored: Option<&StoredResponse>,
    ) -> Written<Persisted> {
        match self {
            Store::Sqlite(db) => {
                let (owned, record, stored) = (
                    OwnedAttempt::from(attempt),
                    payment.clone(),
                    stored.cloned(),
                );
                // Ahead of the claims queued with it: a charge was sent.
                db.write_first(acquire, wait, move |tx| {
                    idempotency::persist(
                        tx,
                        owned.as_attempt(),
                        &record,
                        stored.as_ref(),
                        SystemTime::now(),
                    )
                })
            }
            Store::Postgres(pg) => pg.persist(acquire, wait, attempt, payment, stored),
        }
    }

    /// Up to `limit` payments whose requests are gone before their outcome was known. On
    /// PostgreSQL each comes leased to the caller (see [`PgStore::unsettled`]): settle or
    /// [`Store::release`] it.
    pub fn unsettled(
        &self,
        timeout: Duration,
        stale_before_ms: i64,
        limit: usize,
    ) -> Result<Vec<Unsettled>, DbError> {
        match self {
            Store::Sqlite(db) => db.acquire(timeout).and_then(|c| {
                idempotency::unsettled(&c, stale_before_ms, limit).map_err(DbError::from_sqlite)
            }),
            Store::Postgres(pg) => pg.unsettled(timeout, stale_before_ms, limit),
        }
    }

    /// Records what the reconciler found for `u`; whether anything was written.
    pub fn settle(
        &self,
        acquire: Duration,
        wait: Duration,
        u: &Unsettled,
        payment: &Payment,
        stored: Option<&StoredResponse>,
        stale_before_ms: i64,
    ) -> Written<bool> {
        match self {
            Store::Sqlite(db) => {
                let (owned, record, stored) = (u.clone(), payment.clone(), stored.cloned());
                db.write_first(acquire, wait, move |tx| {
                    idempotency::settle(
                        tx,
                        &owned,
                        &record,
                        stored.as_ref(),
                        stale_before_ms,
                        SystemTime::now(),
                    )
                })
            }
            Store::Postgres(pg) => pg.settle(acquire, wait, u, payment, stored),
        }
    }

    /// Gives back what [`Store::unsettled`] leased and the reconciler could not settle (a
    /// no-op on SQLite, which leases nothing).
    pub fn release(&self, timeout: Duration, u: &Unsettled) -> Result<(), DbError> {
        match self {
            Store::Sqlite(_) => Ok(()),
            Store::Postgres(pg) => pg.release(timeout, u),
        }
    }

    /// Deletes finished keys older than `finished_before_ms`.
    pub fn sweep(
        &self,
        acquire: Duration,
        wait: Duration,
        finished_before_ms: i64,
    ) -> Written<usize> {
        match self {
            Store::Sqlite(db) => db.write(acquire, wait, move |tx| {
                idempotency::sweep(tx, finished_before_ms)
            }),
            Store::Postgres(pg) => pg.sweep(acquire, wait, finished_before_ms),
        }
    }

    /// The write-delay fault (`serve --write-delay`): the SQLite writer's; PostgreSQL has none.
    pub fn slow_writes(&self) -> Option<&SlowWrites> {
        match self {
            Store::Sqlite(db) => Some(db.slow_writes()),
            Store::Postgres(_) => None,
        }
    }

    /// Writes waiting for the SQLite writer (always 0 on PostgreSQL).
    pub fn writer_queue(&self) -> usize {
        match self {
            Store::Sqlite(db) => db.writer_queue(),
            Store::Postgres(_) => 0,
        }
    }

    /// Whether the SQLite writer is running a batch right now.
    pub fn writer_running(&self) -> bool {
        match self {
            Store::Sqlite(db) => db.writer_running(),
            Store::Postgres(_) => false,
        }
    }

    /// Stops the SQLite writer (shutdown); nothing to stop on PostgreSQL.
    pub fn stop_writer(&self) {
        if let Store::Sqlite(db) = self {
            db.stop_writer();
        }
    }

    /// Whether the last write reached the storage.
    pub fn storage_healthy(&self) -> bool {
        match self {
            Store::Sqlite(db) => db.storage_healthy(),
            Store::Postgres(pg) => pg.storage_healthy(),
        }
    }

    /// One small real write, to find out whether the storage can be written again.
    pub fn probe_write(&self, timeout: Duration) -> Result<(), DbError> {
        match self {
            Store::Sqlite(db) => db.probe_write(timeout),
            Store::Postgres(pg) => pg.probe_write(timeout),
        }
    }

    /// (open connections, idle connections).
    pub fn state(&self) -> (u32, u32) {
        match self {
            Store::Sqlite(db) => db.state(),
            Store::Postgres(pg) => pg.state(),
        }
    }

    /// Readiness: writes are not failing and the database answers within `timeout`.
    pub fn ping(&self, timeout: Duration) -> bool {
        match self {
            Store::Sqlite(db) => db.ping(timeout),
            Store::Postgres(pg) => pg.ping(timeout),
        }
    }

    /// SQLite's passive WAL checkpoint (housekeeping); PostgreSQL checkpoints by itself.
    pub fn checkpoint_passive(&self, timeout: Duration) -> Result<(), DbError> {
        match self {
            Store::Sqlite(db) => db.checkpoint_passive(timeout),
            Store::Postgres(_) => Ok(()),
        }
    }

    /// SQLite's last checkpoint at shutdown; nothing to do on PostgreSQL.
    pub fn checkpoint(&self, timeout: Duration) -> Result<(), DbError> {
        match self {
            Store::Sqlite(db) => db.checkpoint(timeout),
            Store::Postgres(_) => Ok(()),
        }
    }
}
