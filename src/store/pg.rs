//! Unit 04 and 05 on PostgreSQL: the same schema, the same claim → provider → persist phases,
//! for several paytrace instances sharing one database server.
//!
//! The client is diesel's `PgConnection` (libpq underneath, through `pq-sys`): every call blocks
//! the calling thread on its socket, so no async runtime runs inside the server. The pool is
//! r2d2, as for SQLite, and every borrow has a timeout.
//!
//! What SQLite's single writer does for one process, PostgreSQL does for all of them:
//! - **claim** is `INSERT … ON CONFLICT (scope, key) DO NOTHING` on the key's primary key — two
//!   instances inserting the same key at once are ordered by the unique index, and the second
//!   one waits for the first to commit — then, for a key that exists, `SELECT … FOR UPDATE`:
//!   the row lock orders every decision about one key across instances;
//! - each attempt's lock token is made by the server (`new_lock_token`), so an attempt only
//!   ever finishes or releases the key it claimed itself;
//! - **persist** updates the key only `WHERE lock_token = <this attempt's>`;
//! - every instance runs the reconciler and the TTL sweeper; they pick rows with
//!   `FOR UPDATE SKIP LOCKED`, so two instances never work on the same row at once;
//! - each request commits its own short transaction: PostgreSQL's WAL writer flushes the
//!   commits that arrive together with one fsync (its own group commit), which is what the
//!   SQLite writer thread does by hand.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime};

use diesel::connection::SimpleConnection;
use diesel::pg::PgConnection;
use diesel::prelude::*;
use diesel::r2d2::{ConnectionManager, CustomizeConnection, Pool, PooledConnection};
use diesel::result::{DatabaseErrorKind, Error as PgError};
use diesel::sql_query;
use diesel::sql_types::{BigInt, Binary, Integer, Nullable, Text};

use super::db::{self, Payment, PaymentStatus};
use super::error::DbError;
use super::idempotency::{Attempt, NewPayment, NextAction, Persisted, StoredResponse, Unsettled};
use super::writer::Written;
use crate::config::SyncMode;

/// A pooled PostgreSQL connection.
pub type PgConn = PooledConnection<ConnectionManager<PgConnection>>;

/// Schema versions, applied in order; `schema_version` records each one applied. The same
/// tables, columns and indexes as the SQLite schema, in PostgreSQL's types.
const MIGRATIONS: &[&str] = &[
    // 1: payments and the idempotency keys that point at them. The key row is inserted first
    // (its primary key is what orders concurrent claims), so its reference to the payment is
    // checked at commit.
    "CREATE TABLE payments (
        seq                BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        id                 TEXT NOT NULL UNIQUE,
        scope              TEXT NOT NULL,
        status             TEXT NOT NULL CHECK (status IN
                               ('processing','pending','succeeded','declined','failed')),
        amount             BIGINT NOT NULL CHECK (amount BETWEEN 1 AND 99999999),
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
        payment_id       TEXT NOT NULL REFERENCES payments (id) DEFERRABLE INITIALLY DEFERRED,
        lock_token       TEXT,
        locked_at_ms     BIGINT,
        response_status  INTEGER,
        response_headers TEXT,
        response_body    BYTEA,
        created_at_ms    BIGINT NOT NULL,
        finished_at_ms   BIGINT,
        PRIMARY KEY (scope, key)
     );
     CREATE INDEX keys_finished ON idempotency_keys (finished_at_ms) WHERE finished_at_ms IS NOT NULL;",
    // 2: a place for the writes that prove the database can be written (start-up, readiness).
    "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);",
    // 3: the reconciler joins unsettled payments to their keys every second.
    "CREATE INDEX keys_by_payment ON idempotency_keys (payment_id);",
];

/// Serializes instances migrating the same database at once (an arbitrary constant).
const MIGRATION_LOCK: i64 = 0x7061_7974_7261_6365;

const META_UPSERT: &str = "INSERT INTO meta (key, value) VALUES ($1, $2)
                           ON CONFLICT (key) DO UPDATE SET value = excluded.value";

/// Whether `--db` names a PostgreSQL database rather than a SQLite file.
pub fn is_url(db: &str) -> bool {
    db.starts_with("postgres://") || db.starts_with("postgresql://")
}

/// `url` without a password, for logs and error messages.
pub fn redacted(url: &str) -> String {
    match (url.find("://"), url.find('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &url[scheme + 3..at];
            match userinfo.find(':') {
                Some(colon) => format!(
                    "{}{}:***{}",
                    &url[..scheme + 3],
                    &userinfo[..colon],
                    &url[at..]
                ),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}

/// `url` with a connect timeout, unless it names one: libpq otherwise waits for the operating
/// system's, minutes for an address that does not answer.
fn with_connect_timeout(url: &str) -> String {
    if url.contains("connect_timeout=") {
        url.to_string()
    } else if url.contains('?') {
        format!("{url}&connect_timeout=5")
    } else {
        format!("{url}?connect_timeout=5")
    }
}

/// Session settings of every pooled connection.
#[derive(Debug)]
struct Session {
    /// The longest any statement may run (reads; each write sets its own slice).
    statement_timeout: Duration,
    synchronous_commit: &'static str,
}

impl CustomizeConnection<PgConnection, diesel::r2d2::Error> for Session {
    fn on_acquire(&self, conn: &mut PgConnection) -> Result<(), diesel::r2d2::Error> {
        conn.batch_execute(&format!(
            "SET application_name = 'paytrace'; SET statement_timeout = {}; SET synchronous_commit = {};",
            self.statement_timeout.as_millis().max(1),
            self.synchronous_commit
        ))
        .map_err(diesel::r2d2::Error::QueryError)
    }
}

/// The pool on a PostgreSQL database.
#[derive(Clone)]
pub struct PgStore {
    pool: Pool<ConnectionManager<PgConnection>>,
    /// As for SQLite: set while writes fail because the database cannot be written or reached;
    /// cleared by the next commit.
    writes_failing: Arc<AtomicBool>,
}

impl PgStore {
    /// Connects, migrates (one instance at a time), proves with a write that the database can
    /// be written, and fills a pool of `size` connections.
    pub fn open(
        url: &str,
        size: u32,
        sync: SyncMode,
        write_timeout: Duration,
    ) -> Result<PgStore, String> {
        let shown = redacted(url);
        let url = with_connect_timeout(url);
        let mut setup = PgConnection::establish(&url)
            .map_err(|e| format!("cannot connect to {shown}: {}", e.to_string().trim()))?;
        migrate(&mut setup).map_err(|e| format!("migrating {shown}: {e}"))?;
        sql_query(META_UPSERT)
            .bind::<Text, _>("started_at")
            .bind::<Text, _>(db::timestamp(SystemTime::now()))
            .execute(&mut setup)
            .map_err(|e| {
                format!(
                    "{shown} cannot be written ({e}): check the role's privileges and the server"
                )
            })?;
        drop(setup);
        let session = Session {
            // Reads get the write slice's order of magnitude: a read stuck behind a lock must
            // not hold a worker for the whole request.
            statement_timeout: write_timeout.max(Duration::from_millis(100)) * 4,
            synchronous_commit: match sync {
                SyncMode::Full => "on",
                SyncMode::Normal => "off",
            },
        };
        let pool = Pool::builder()
            .max_size(size)
            // A network connection goes stale (server restart, idle timeout): test it on
            // checkout, a loopback round trip, so a request never gets a dead one.
            .test_on_check_out(true)
            .connection_timeout(Duration::from_secs(5))
            .connection_customizer(Box::new(session))
            .build(ConnectionManager::<PgConnection>::new(url))
            .map_err(|e| format!("cannot open the pool on {shown}: {e}"))?;
        Ok(PgStore {
            pool,
            writes_failing: Arc::new(AtomicBool::new(false)),
        })
    }

    /// Borrows a connection, waiting at most `timeout`.
    pub fn acquire(&self, timeout: Duration) -> Result<PgConn, DbError> {
        self.pool.get_timeout(timeout).map_err(DbError::from_pool)
    }

    /// (open connections, idle connections).
    pub fn state(&self) -> (u32, u32) {
        let s = self.pool.state();
        (s.connections, s.idle_connections)
    }

    pub fn storage_healthy(&self) -> bool {
        !self.writes_failing.load(Ordering::SeqCst)
    }

    /// Readiness: writes are not failing, and the server answers within `timeout`.
    pub fn ping(&self, timeout: Duration) -> bool {
        self.storage_healthy()
            && self
                .acquire(timeout)
                .is_ok_and(|mut c| c.batch_execute("SELECT 1").is_ok())
    }

    /// One small real write, to find out whether the database can be written again.
    pub fn probe_write(&self, timeout: Duration) -> Result<(), DbError> {
        let stamp = db::timestamp(SystemTime::now());
        self.write(timeout, timeout, move |c| {
            sql_query(META_UPSERT)
                .bind::<Text, _>("write_probe")
                .bind::<Text, _>(&stamp)
                .execute(c)
                .map(|_| ())
        })
        .result
    }

    /// Runs `work` in its own transaction on a connection borrowed within `acquire`; each
    /// statement (and each lock wait) of it gets at most `wait`. Commits with PostgreSQL's own
    /// commit: no writer thread in between.
    pub fn write<T>(
        &self,
        acquire: Duration,
        wait: Duration,
        work: impl FnOnce(&mut PgConnection) -> Result<T, PgError>,
    ) -> Written<T> {
        let handed = Instant::now();
        let mut conn = match self.acquire(acquire) {
            Ok(c) => c,
            Err(e) => {
                let result = Err(self.note(e));
                return Written {
                    result,
                    waited: handed.elapsed(),
                    ran: Duration::ZERO,
                };
            }
        };
        let waited = handed.elapsed();
        let ms = wait.as_millis().max(1);
        let result = conn
            .transaction(|c| {
                c.batch_execute(&format!(
                    "SET LOCAL statement_timeout = {ms}; SET LOCAL lock_timeout = {ms};"
                ))?;
                work(c)
            })
            .map_err(|e| self.note(classify(e)));
        if result.is_ok() && self.writes_failing.swap(false, Ordering::SeqCst) {
            log::warn!("storage: writes succeed again; ready for work");
        }
        Written {
            result,
            waited,
            ran: handed.elapsed().saturating_sub(waited),
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

    /// Phase 1 (see the module's comment for how instances are ordered).
    pub fn claim(
        &self,
        acquire: Duration,
        wait: Duration,
        attempt: Attempt,
        fingerprint: &str,
        input: &NewPayment,
        lock_ttl: Duration,
    ) -> Written<NextAction> {
        self.write(acquire, wait, |c| {
            claim(c, attempt, fingerprint, input, SystemTime::now(), lock_ttl)
        })
    }

    /// Phase 3: writes nothing unless `attempt.token` still holds the key's lock.
    pub fn persist(
        &self,
        acquire: Duration,
        wait: Duration,
        attempt: Attempt,
        payment: &Payment,
        stored: Option<&StoredResponse>,
    ) -> Written<Persisted> {
        self.write(acquire, wait, |c| {
            persist(c, attempt, payment, stored, SystemTime::now())
        })
    }

    /// Up to `limit` unsettled payments, each leased to this caller: its key is locked with a
    /// fresh token (`Unsettled::lease`), so another instance's reconciler and new requests leave
    /// it alone until [`PgStore::settle`] or [`PgStore::release`]. Rows another instance is
    /// leasing at this moment are skipped, not waited for.
    pub fn unsettled(
        &self,
        timeout: Duration,
        stale_before_ms: i64,
        limit: usize,
    ) -> Result<Vec<Unsettled>, DbError> {
        let lease = format!("reconciler_{:032x}", rand::random::<u128>());
        self.write(timeout, timeout, |c| {
            let picked: Vec<KeyRef> = sql_query(
                "WITH picked AS (
                     SELECT k.scope, k.key FROM idempotency_keys k
                     JOIN payments p ON p.id = k.payment_id
                     WHERE p.status IN ('processing', 'pending') AND k.response_status IS NULL
                       AND (k.locked_at_ms IS NULL OR k.locked_at_ms < $1)
                     ORDER BY p.seq LIMIT $2
                     FOR UPDATE OF k SKIP LOCKED)
                 UPDATE idempotency_keys k SET lock_token = $3, locked_at_ms = $4
                 FROM picked WHERE k.scope = picked.scope AND k.key = picked.key
                 RETURNING k.scope, k.key, k.payment_id",
            )
            .bind::<BigInt, _>(stale_before_ms)
            .bind::<BigInt, _>(limit as i64)
            .bind::<Text, _>(&lease)
            .bind::<BigInt, _>(db::unix_ms(SystemTime::now()))
            .load(c)?;
            let mut out = Vec::with_capacity(picked.len());
            for k in picked {
                if let Some(payment) = payment_by_id(c, &k.payment_id)? {
                    out.push(Unsettled {
                        scope: k.scope,
                        key: k.key,
                        payment,
                        lease: Some(lease.clone()),
                    });
                }
            }
            Ok(out)
        })
        .result
    }

    /// Records what the reconciler found for `u` under its lease (see [`PgStore::unsettled`]).
    pub fn settle(
        &self,
        acquire: Duration,
        wait: Duration,
        u: &Unsettled,
        payment: &Payment,
        stored: Option<&StoredResponse>,
    ) -> Written<bool> {
        let Some(lease) = u.lease.as_deref() else {
            return Written {
                result: Ok(false),
                waited: Duration::ZERO,
                ran: Duration::ZERO,
            };
        };
        let attempt = Attempt {
            scope: &u.scope,
            key: &u.key,
            token: lease,
        };
        let written = self.persist(acquire, wait, attempt, payment, stored);
        Written {
            result: written.result.map(|p| p == Persisted::Recorded),
            waited: written.waited,
            ran: written.ran,
        }
    }

    /// Gives back a lease the reconciler could not settle, so the key is retryable at once.
    pub fn release(&self, timeout: Duration, u: &Unsettled) -> Result<(), DbError> {
        let Some(lease) = u.lease.as_deref() else {
            return Ok(());
        };
        self.write(timeout, timeout, |c| {
            sql_query(
                "UPDATE idempotency_keys SET lock_token = NULL, locked_at_ms = NULL
                 WHERE scope = $1 AND key = $2 AND lock_token = $3",
            )
            .bind::<Text, _>(&u.scope)
            .bind::<Text, _>(&u.key)
            .bind::<Text, _>(lease)
            .execute(c)
            .map(|_| ())
        })
        .result
    }

    /// Deletes finished keys older than `finished_before_ms`, at most 1000 per call, skipping
    /// rows another instance's sweeper holds; payments are never deleted.
    pub fn sweep(
        &self,
        acquire: Duration,
        wait: Duration,
        finished_before_ms: i64,
    ) -> Written<usize> {
        self.write(acquire, wait, |c| {
            sql_query(
                "DELETE FROM idempotency_keys WHERE (scope, key) IN (
                     SELECT scope, key FROM idempotency_keys WHERE finished_at_ms < $1
                     LIMIT 1000 FOR UPDATE SKIP LOCKED)",
            )
            .bind::<BigInt, _>(finished_before_ms)
            .execute(c)
        })
    }
}

/// Sorts a PostgreSQL error like [`DbError::from_sqlite`] does a SQLite one: a timeout of the
/// write's slice, a database that cannot be written or reached, or anything else.
fn classify(e: PgError) -> DbError {
    let message = e.to_string();
    match &e {
        PgError::DatabaseError(DatabaseErrorKind::ClosedConnection, _)
        | PgError::DatabaseError(DatabaseErrorKind::ReadOnlyTransaction, _) => {
            DbError::Unavailable {
                cause: message,
                new_incident: false,
            }
        }
        _ if message.contains("statement timeout") || message.contains("lock timeout") => {
            DbError::Busy
        }
        _ if [
            "could not extend file",
            "No space left",
            "server closed the connection",
            "terminating connection",
            "could not connect",
            "read-only",
        ]
        .iter()
        .any(|m| message.contains(m)) =>
        {
            DbError::Unavailable {
                cause: message,
                new_incident: false,
            }
        }
        _ => DbError::Postgres(message),
    }
}

fn migrate(c: &mut PgConnection) -> Result<(), PgError> {
    c.transaction(|c| {
        sql_query("SELECT pg_advisory_xact_lock($1)")
            .bind::<BigInt, _>(MIGRATION_LOCK)
            .execute(c)?;
        c.batch_execute(
            "CREATE TABLE IF NOT EXISTS schema_version (
                 version    INTEGER PRIMARY KEY,
                 applied_at TEXT NOT NULL
             )",
        )?;
        let current: Version =
            sql_query("SELECT COALESCE(MAX(version), 0) AS version FROM schema_version")
                .get_result(c)?;
        for (i, sql) in MIGRATIONS
            .iter()
            .enumerate()
            .skip(current.version.max(0) as usize)
        {
            c.batch_execute(sql)?;
            sql_query("INSERT INTO schema_version (version, applied_at) VALUES ($1, $2)")
                .bind::<Integer, _>(i as i32 + 1)
                .bind::<Text, _>(db::timestamp(SystemTime::now()))
                .execute(c)?;
        }
        Ok(())
    })
}

#[derive(QueryableByName)]
struct Version {
    #[diesel(sql_type = Integer)]
    version: i32,
}

#[derive(QueryableByName)]
struct KeyRef {
    #[diesel(sql_type = Text)]
    scope: String,
    #[diesel(sql_type = Text)]
    key: String,
    #[diesel(sql_type = Text)]
    payment_id: String,
}

#[derive(QueryableByName)]
struct KeyRow {
    #[diesel(sql_type = Text)]
    fingerprint: String,
    #[diesel(sql_type = Text)]
    payment_id: String,
    #[diesel(sql_type = Nullable<BigInt>)]
    locked_at_ms: Option<i64>,
    #[diesel(sql_type = Nullable<Integer>)]
    response_status: Option<i32>,
    #[diesel(sql_type = Nullable<Text>)]
    response_headers: Option<String>,
    #[diesel(sql_type = Nullable<Binary>)]
    response_body: Option<Vec<u8>>,
}

#[derive(QueryableByName)]
struct PaymentRow {
    #[diesel(sql_type = Text)]
    id: String,
    #[diesel(sql_type = Text)]
    status: String,
    #[diesel(sql_type = BigInt)]
    amount: i64,
    #[diesel(sql_type = Text)]
    currency: String,
    #[diesel(sql_type = Text)]
    source: String,
    #[diesel(sql_type = Nullable<Text>)]
    description: Option<String>,
    #[diesel(sql_type = Nullable<Text>)]
    provider_charge_id: Option<String>,
    #[diesel(sql_type = Nullable<Text>)]
    failure_code: Option<String>,
    #[diesel(sql_type = Text)]
    created_at: String,
    #[diesel(sql_type = Text)]
    updated_at: String,
}

impl From<PaymentRow> for Payment {
    fn from(r: PaymentRow) -> Payment {
        Payment {
            id: r.id,
            object: "payment",
            status: PaymentStatus::parse(&r.status),
            amount: r.amount,
            currency: r.currency,
            source: r.source,
            description: r.description,
            provider_charge_id: r.provider_charge_id,
            failure_code: r.failure_code,
            created_at: r.created_at,
            updated_at: r.updated_at,
        }
    }
}

const PAYMENT_COLUMNS: &str = "id, status, amount, currency, source, description, \
                               provider_charge_id, failure_code, created_at, updated_at";

fn payment_by_id(c: &mut PgConnection, id: &str) -> Result<Option<Payment>, PgError> {
    let row: Option<PaymentRow> = sql_query(format!(
        "SELECT {PAYMENT_COLUMNS} FROM payments WHERE id = $1"
    ))
    .bind::<Text, _>(id)
    .get_result(c)
    .optional()?;
    Ok(row.map(Payment::from))
}

/// One payment by id, only if `scope` owns it.
pub fn get_payment(
    c: &mut PgConnection,
    scope: &str,
    id: &str,
) -> Result<Option<Payment>, DbError> {
    let row: Option<PaymentRow> = sql_query(format!(
        "SELECT {PAYMENT_COLUMNS} FROM payments WHERE id = $1 AND scope = $2"
    ))
    .bind::<Text, _>(id)
    .bind::<Text, _>(scope)
    .get_result(c)
    .optional()
    .map_err(classify)?;
    Ok(row.map(Payment::from))
}

#[derive(QueryableByName)]
struct Seq {
    #[diesel(sql_type = BigInt)]
    seq: i64,
}

/// Newest first, at most `limit`, strictly older than `starting_after` when given; `None`
/// when `starting_after` names no payment of this scope.
pub fn list_payments(
    c: &mut PgConnection,
    scope: &str,
    limit: usize,
    starting_after: Option<&str>,
) -> Result<Option<(Vec<Payment>, bool)>, DbError> {
    let before = match starting_after {
        None => i64::MAX,
        Some(id) => {
            let seq: Option<Seq> =
                sql_query("SELECT seq FROM payments WHERE id = $1 AND scope = $2")
                    .bind::<Text, _>(id)
                    .bind::<Text, _>(scope)
                    .get_result(c)
                    .optional()
                    .map_err(classify)?;
            match seq {
                Some(s) => s.seq,
                None => return Ok(None),
            }
        }
    };
    let rows: Vec<PaymentRow> = sql_query(format!(
        "SELECT {PAYMENT_COLUMNS} FROM payments WHERE scope = $1 AND seq < $2
         ORDER BY seq DESC LIMIT $3"
    ))
    .bind::<Text, _>(scope)
    .bind::<BigInt, _>(before)
    .bind::<BigInt, _>(limit as i64 + 1)
    .load(c)
    .map_err(classify)?;
    let mut rows: Vec<Payment> = rows.into_iter().map(Payment::from).collect();
    let has_more = rows.len() > limit;
    rows.truncate(limit);
    Ok(Some((rows, has_more)))
}

fn insert_payment(c: &mut PgConnection, scope: &str, p: &Payment) -> Result<(), PgError> {
    sql_query(
        "INSERT INTO payments (id, scope, status, amount, currency, source, description,
                               provider_charge_id, failure_code, created_at, updated_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
    )
    .bind::<Text, _>(&p.id)
    .bind::<Text, _>(scope)
    .bind::<Text, _>(p.status.as_str())
    .bind::<BigInt, _>(p.amount)
    .bind::<Text, _>(&p.currency)
    .bind::<Text, _>(&p.source)
    .bind::<Nullable<Text>, _>(p.description.as_deref())
    .bind::<Nullable<Text>, _>(p.provider_charge_id.as_deref())
    .bind::<Nullable<Text>, _>(p.failure_code.as_deref())
    .bind::<Text, _>(&p.created_at)
    .bind::<Text, _>(&p.updated_at)
    .execute(c)
    .map(|_| ())
}

/// Phase 1, inside the write's transaction.
fn claim(
    c: &mut PgConnection,
    attempt: Attempt,
    fingerprint: &str,
    input: &NewPayment,
    now: SystemTime,
    lock_ttl: Duration,
) -> Result<NextAction, PgError> {
    let Attempt { scope, key, token } = attempt;
    let now_ms = db::unix_ms(now);
    // Twice at most: a key found taken can be deleted by a sweeper before it is read.
    for _ in 0..2 {
        let payment_id = crate::ids::payment_id();
        // The unique index decides between instances: an insert racing another one for the
        // same key waits for it to commit, then inserts nothing.
        let inserted = sql_query(
            "INSERT INTO idempotency_keys (scope, key, fingerprint, payment_id, lock_token, locked_at_ms, created_at_ms)
             VALUES ($1, $2, $3, $4, $5, $6, $6) ON CONFLICT (scope, key) DO NOTHING",
        )
        .bind::<Text, _>(scope)
        .bind::<Text, _>(key)
        .bind::<Text, _>(fingerprint)
        .bind::<Text, _>(&payment_id)
        .bind::<Text, _>(token)
        .bind::<BigInt, _>(now_ms)
        .execute(c)?;
        if inserted == 1 {
            let stamp = db::timestamp(now);
            let payment = Payment {
                id: payment_id,
                object: "payment",
                status: PaymentStatus::Processing,
                amount: input.amount,
                currency: input.currency.clone(),
                source: input.source.clone(),
                description: input.description.clone(),
                provider_charge_id: None,
                failure_code: None,
                created_at: stamp.clone(),
                updated_at: stamp,
            };
            insert_payment(c, scope, &payment)?;
            return Ok(NextAction::Charge {
                payment,
                resumed: false,
            });
        }
        // The key exists: lock its row, so that this decision and a takeover are the only
        // ones made about it until this transaction ends.
        let row: Option<KeyRow> = sql_query(
            "SELECT fingerprint, payment_id, locked_at_ms, response_status, response_headers, response_body
             FROM idempotency_keys WHERE scope = $1 AND key = $2 FOR UPDATE",
        )
        .bind::<Text, _>(scope)
        .bind::<Text, _>(key)
        .get_result(c)
        .optional()?;
        let Some(row) = row else { continue };
        if row.fingerprint != fingerprint {
            return Ok(NextAction::Reused);
        }
        if let Some(status) = row.response_status {
            let headers = row
                .response_headers
                .and_then(|h| serde_json::from_str(&h).ok())
                .unwrap_or_default();
            return Ok(NextAction::Replay(StoredResponse {
                status: u16::try_from(status).unwrap_or(500),
                headers,
                body: row.response_body.unwrap_or_default(),
            }));
        }
        if let Some(at) = row.locked_at_ms
            && now_ms.saturating_sub(at) < lock_ttl.as_millis() as i64
        {
            return Ok(NextAction::InUse);
        }
        sql_query(
            "UPDATE idempotency_keys SET lock_token = $3, locked_at_ms = $4 WHERE scope = $1 AND key = $2",
        )
        .bind::<Text, _>(scope)
        .bind::<Text, _>(key)
        .bind::<Text, _>(token)
        .bind::<BigInt, _>(now_ms)
        .execute(c)?;
        return match payment_by_id(c, &row.payment_id)? {
            Some(payment) => Ok(NextAction::Charge {
                payment,
                resumed: true,
            }),
            None => Err(PgError::NotFound),
        };
    }
    Err(PgError::NotFound)
}

/// Phase 3, inside the write's transaction: the key first (its row lock, and whether this
/// attempt still holds it), then the payment.
fn persist(
    c: &mut PgConnection,
    attempt: Attempt,
    payment: &Payment,
    stored: Option<&StoredResponse>,
    now: SystemTime,
) -> Result<Persisted, PgError> {
    let Attempt { scope, key, token } = attempt;
    let updated = match stored {
        Some(resp) => {
            let headers = serde_json::to_string(&resp.headers).unwrap_or_else(|_| "[]".into());
            sql_query(
                "UPDATE idempotency_keys
                 SET lock_token = NULL, locked_at_ms = NULL, response_status = $4,
                     response_headers = $5, response_body = $6, finished_at_ms = $7
                 WHERE scope = $1 AND key = $2 AND lock_token = $3",
            )
            .bind::<Text, _>(scope)
            .bind::<Text, _>(key)
            .bind::<Text, _>(token)
            .bind::<Integer, _>(i32::from(resp.status))
            .bind::<Text, _>(headers)
            .bind::<Binary, _>(&resp.body)
            .bind::<BigInt, _>(db::unix_ms(now))
            .execute(c)?
        }
        None => sql_query(
            "UPDATE idempotency_keys SET lock_token = NULL, locked_at_ms = NULL
             WHERE scope = $1 AND key = $2 AND lock_token = $3",
        )
        .bind::<Text, _>(scope)
        .bind::<Text, _>(key)
        .bind::<Text, _>(token)
        .execute(c)?,
    };
    if updated == 0 {
        return Ok(Persisted::LockLost);
    }
    sql_query(
        "UPDATE payments SET status = $2, provider_charge_id = $3, failure_code = $4, updated_at = $5
         WHERE id = $1",
    )
    .bind::<Text, _>(&payment.id)
    .bind::<Text, _>(payment.status.as_str())
    .bind::<Nullable<Text>, _>(payment.provider_charge_id.as_deref())
    .bind::<Nullable<Text>, _>(payment.failure_code.as_deref())
    .bind::<Text, _>(&payment.updated_at)
    .execute(c)?;
    Ok(Persisted::Recorded)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_told_from_paths_and_passwords_never_shown() {
        assert!(is_url("postgres://app@127.0.0.1:5432/pay"));
        assert!(is_url("postgresql://app@db/pay"));
        assert!(!is_url("data/paytrace.db"));
        assert!(!is_url("postgres.db"));
        assert_eq!(
            redacted("postgres://app:s3cret@db:5432/pay"),
            "postgres://app:***@db:5432/pay"
        );
        assert_eq!(redacted("postgres://app@db/pay"), "postgres://app@db/pay");
        assert_eq!(
            with_connect_timeout("postgres://a@h/d"),
            "postgres://a@h/d?connect_timeout=5"
        );
        assert_eq!(
            with_connect_timeout("postgres://a@h/d?sslmode=disable"),
            "postgres://a@h/d?sslmode=disable&connect_timeout=5"
        );
        assert_eq!(
            with_connect_timeout("postgres://a@h/d?connect_timeout=1"),
            "postgres://a@h/d?connect_timeout=1"
        );
    }
}
