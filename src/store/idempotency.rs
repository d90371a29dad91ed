//! Unit 05, idempotency: decide what a `POST /payments` with a given key should do
//! ([`NextAction`]), and record what it did. Never builds HTTP responses; stores and returns
//! them as plain data.
//!
//! Each phase is its own short `BEGIN IMMEDIATE` transaction and no connection is held while the
//! provider is called:
//! 1. [`claim`]: insert the key (locked, with its fingerprint) and a `processing` payment — or
//!    find the key and decide: replay, in use, reused, or resume;
//! 2. the provider call, with the payment id as the provider's own idempotency key;
//! 3. [`persist`]: the payment's final status, the response to replay, the key unlocked.

use std::time::{Duration, SystemTime};

use rusqlite::{OptionalExtension, Transaction, params};
use sha2::{Digest, Sha256};

use super::db::{self, Payment, PaymentStatus};

/// What a client asked to pay, validated and normalized.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct NewPayment {
    pub amount: i64,
    pub currency: String,
    pub source: String,
    pub description: Option<String>,
}

/// SHA-256 of method, path and the normalized body (a fixed-order JSON of the validated
/// fields, so whitespace and field order do not change it).
pub fn fingerprint(method: &str, path: &str, body: &NewPayment) -> String {
    let mut h = Sha256::new();
    h.update(method.as_bytes());
    h.update(b"\n");
    h.update(path.as_bytes());
    h.update(b"\n");
    h.update(serde_json::to_vec(body).unwrap_or_default());
    hex::encode(h.finalize())
}

/// A finished request's response, kept for replays.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

/// The decision for a request, made inside the claim transaction.
#[derive(Debug, PartialEq)]
pub enum NextAction {
    /// Charge this payment. `resumed` when the key existed and an earlier attempt stopped
    /// before finishing: the same payment (and so the same provider key) is used again.
    Charge { payment: Payment, resumed: bool },
    /// The key finished earlier with the same request: answer with what was answered then.
    Replay(StoredResponse),
    /// Another request holds the key right now.
    InUse,
    /// The key was used with a different request.
    Reused,
}

/// A new lock token: 128 random bits, one per attempt, made by the server (never a client's
/// value, which may repeat).
pub fn new_lock_token() -> String {
    format!("lock_{:032x}", rand::random::<u128>())
}

/// One request's hold on a key: whose key (`scope`), which key, and the token that identifies
/// this attempt's lock.
#[derive(Clone, Copy, Debug)]
pub struct Attempt<'a> {
    pub scope: &'a str,
    pub key: &'a str,
    pub token: &'a str,
}

/// Phase 1. A lock older than `lock_ttl` belongs to a request that died and is taken over.
pub fn claim(
    tx: &Transaction,
    attempt: Attempt,
    fingerprint: &str,
    input: &NewPayment,
    now: SystemTime,
    lock_ttl: Duration,
) -> rusqlite::Result<NextAction> {
    let Attempt { scope, key, token } = attempt;
    let now_ms = db::unix_ms(now);
    let existing = tx
        .prepare_cached(
            "SELECT fingerprint, payment_id, locked_at_ms, response_status, response_headers, response_body
             FROM idempotency_keys WHERE scope = ?1 AND key = ?2",
        )?
        .query_row(params![scope, key], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, Option<i64>>(2)?,
                r.get::<_, Option<u16>>(3)?,
                r.get::<_, Option<String>>(4)?,
                r.get::<_, Option<Vec<u8>>>(5)?,
            ))
        })
        .optional()?;

    let Some((stored_fp, payment_id, locked_at, status, headers, body)) = existing else {
        let stamp = db::timestamp(now);
        let payment = Payment {
            id: crate::ids::payment_id(),
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
        db::insert_payment(tx, scope, &payment)?;
        tx.prepare_cached(
            "INSERT INTO idempotency_keys (scope, key, fingerprint, payment_id, lock_token, locked_at_ms, created_at_ms)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?6)",
        )?
        .execute(params![scope, key, fingerprint, payment.id, token, now_ms])?;
        return Ok(NextAction::Charge {
            payment,
            resumed: false,
        });
    };

    if stored_fp != fingerprint {
        return Ok(NextAction::Reused);
    }
    if let Some(status) = status {
        let headers = headers
            .and_then(|h| serde_json::from_str(&h).ok())
            .unwrap_or_default();
        return Ok(NextAction::Replay(StoredResponse {
            status,
            headers,
            body: body.unwrap_or_default(),
        }));
    }
    if let Some(at) = locked_at
        && now_ms.saturating_sub(at) < lock_ttl.as_millis() as i64
    {
        return Ok(NextAction::InUse);
    }
    tx.prepare_cached(
        "UPDATE idempotency_keys SET lock_token = ?3, locked_at_ms = ?4 WHERE scope = ?1 AND key = ?2",
    )?
    .execute(params![scope, key, token, now_ms])?;
    match db::payment_by_id(tx, &payment_id)? {
        Some(payment) => Ok(NextAction::Charge {
            payment,
            resumed: true,
        }),
        None => Err(rusqlite::Error::QueryReturnedNoRows),
    }
}

/// What [`persist`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Persisted {
    Recorded,
    /// The attempt's lock went stale and another attempt (or the reconciler) took the key:
    /// nothing was written, so a late attempt never overwrites a newer outcome.
    LockLost,
}

/// Phase 3. Records the payment's new state; with `stored`, the key is finished and replays
/// that response from now on; without it, the key is only unlocked and stays retryable.
/// Writes nothing unless `token` still holds the key's lock.
pub fn persist(
    tx: &Transaction,
    attempt: Attempt,
    payment: &Payment,
    stored: Option<&StoredResponse>,
    now: SystemTime,
) -> rusqlite::Result<Persisted> {
    let Attempt { scope, key, token } = attempt;
    let held = tx
        .prepare_cached(
            "SELECT 1 FROM idempotency_keys WHERE scope = ?1 AND key = ?2 AND lock_token = ?3",
        )?
        .exists(params![scope, key, token])?;
    if !held {
        return Ok(Persisted::LockLost);
    }
    db::update_payment(tx, payment)?;
    match stored {
        Some(resp) => {
            let headers = serde_json::to_string(&resp.headers).unwrap_or_else(|_| "[]".into());
            tx.prepare_cached(
                "UPDATE idempotency_keys
                 SET lock_token = NULL, locked_at_ms = NULL, response_status = ?4,
                     response_headers = ?5, response_body = ?6, finished_at_ms = ?7
                 WHERE scope = ?1 AND key = ?2 AND lock_token = ?3",
            )?
            .execute(params![
                scope,
                key,
                token,
                resp.status,
                headers,
                resp.body,
                db::unix_ms(now)
            ])?;
        }
        None => {
            tx.prepare_cached(
                "UPDATE idempotency_keys SET lock_token = NULL, locked_at_ms = NULL
                 WHERE scope = ?1 AND key = ?2 AND lock_token = ?3",
            )?
            .execute(params![scope, key, token])?;
        }
    }
    Ok(Persisted::Recorded)
}

/// A payment whose request is gone before its outcome was known: `processing` or `pending`,
/// its key neither finished nor held by a live request.
#[derive(Clone, Debug)]
pub struct Unsettled {
    pub scope: String,
    pub key: String,
    pub payment: Payment,
    /// On PostgreSQL, the token this reconciler locked the key with while it asks the
    /// provider (other instances skip it meanwhile); `None` on SQLite, where one process
    /// reconciles alone.
    pub lease: Option<String>,
}

/// Up to `limit` unsettled payments; a lock taken before `stale_before_ms` belongs to a request
/// that died.
pub fn unsettled(
    conn: &rusqlite::Connection,
    stale_before_ms: i64,
    limit: usize,
) -> rusqlite::Result<Vec<Unsettled>> {
    let mut stmt = conn.prepare_cached(
        "SELECT k.scope, k.key, p.id FROM payments p JOIN idempotency_keys k ON k.payment_id = p.id
         WHERE p.status IN ('processing', 'pending') AND k.response_status IS NULL
           AND (k.locked_at_ms IS NULL OR k.locked_at_ms < ?1)
         ORDER BY p.seq LIMIT ?2",
    )?;
    let rows: Vec<(String, String, String)> = stmt
        .query_map(params![stale_before_ms, limit as i64], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?))
        })?
        .collect::<rusqlite::Result<_>>()?;
    let mut out = Vec::with_capacity(rows.len());
    for (scope, key, id) in rows {
        if let Some(payment) = db::payment_by_id(conn, &id)? {
            out.push(Unsettled {
                scope,
                key,
                payment,
                lease: None,
            });
        }
    }
    Ok(out)
}

/// Records what the reconciler found for `u`, unless a request took the key meanwhile (then
/// that request will find out for itself): the payment's new state, and with `stored` the key
/// is finished and replays it; without, the key is released and stays retryable.
/// Returns whether anything was written.
pub fn settle(
    tx: &Transaction,
    u: &Unsettled,
    payment: &Payment,
    stored: Option<&StoredResponse>,
    stale_before_ms: i64,
    now: SystemTime,
) -> rusqlite::Result<bool> {
    let free: bool = tx
        .prepare_cached(
            "SELECT response_status IS NULL AND (locked_at_ms IS NULL OR locked_at_ms < ?3)
             FROM idempotency_keys WHERE scope = ?1 AND key = ?2",
        )?
        .query_row(params![u.scope, u.key, stale_before_ms], |r| r.get(0))
        .optional()?
        .unwrap_or(false);
    if !free {
        return Ok(false);
    }
    // Take the key for this write, then finish or release it like a request would.
    let token = "reconciler";
    tx.prepare_cached(
        "UPDATE idempotency_keys SET lock_token = ?3, locked_at_ms = ?4 WHERE scope = ?1 AND key = ?2",
    )?
    .execute(params![u.scope, u.key, token, db::unix_ms(now)])?;
    let attempt = Attempt {
        scope: &u.scope,
        key: &u.key,
        token,
    };
    Ok(persist(tx, attempt, payment, stored, now)? == Persisted::Recorded)
}

/// Deletes finished keys older than `finished_before_ms`; payments are never deleted.
pub fn sweep(tx: &Transaction, finished_before_ms: i64) -> rusqlite::Result<usize> {
    tx.prepare_cached("DELETE FROM idempotency_keys WHERE finished_at_ms < ?1")?
        .execute(params![finished_before_ms])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::SyncMode;
    use crate::store::db::Db;

    fn input(amount: i64) -> NewPayment {
        NewPayment {
            amount,
            currency: "usd".into(),
            source: "tok_visa".into(),
            description: None,
        }
    }

    fn att<'a>(key: &'a str, token: &'a str) -> Attempt<'a> {
        Attempt {
            scope: "scope",
            key,
            token,
        }
    }

    fn setup() -> (tempfile::TempDir, Db) {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(
            &dir.path().join("k.db"),
            1,
            SyncMode::Normal,
            Duration::from_millis(100),
            std::sync::Arc::new(|_| {}),
        )
        .unwrap();
        (dir, db)
    }

    /// Runs `f` in one transaction on a pooled connection (the logic under test, without the
    /// writer thread in between).
    fn in_tx<T>(db: &Db, f: impl FnOnce(&Transaction) -> rusqlite::Result<T>) -> T {
        let mut c = db.acquire(Duration::from_secs(1)).unwrap();
        let tx = c.transaction().unwrap();
        let value = f(&tx).unwrap();
        tx.commit().unwrap();
        value
    }

    fn do_claim(db: &Db, key: &str, amount: i64, token: &str, now: SystemTime) -> NextAction {
        let fp = fingerprint("POST", "/payments", &input(amount));
        in_tx(db, |tx| {
            claim(
                tx,
                att(key, token),
                &fp,
                &input(amount),
                now,
                Duration::from_secs(4),
            )
        })
    }

    #[test]
    fn fingerprints_depend_on_every_field() {
        let a = fingerprint("POST", "/payments", &input(1));
        assert_eq!(a, fingerprint("POST", "/payments", &input(1)));
        assert_ne!(a, fingerprint("POST", "/payments", &input(2)));
        assert_ne!(a, fingerprint("POST", "/other", &input(1)));
        assert_eq!(a.len(), 64);
    }

    #[test]
    fn a_key_goes_claim_in_use_resume_replay() {
        let (_d, db) = setup();
        let t0 = SystemTime::now();
        let NextAction::Charge {
            mut payment,
            resumed,
        } = do_claim(&db, "k", 5, "t1", t0)
        else {
            panic!("first claim must charge")
        };
        assert!(!resumed);
        assert_eq!(do_claim(&db, "k", 5, "t2", t0), NextAction::InUse);
        assert_eq!(do_claim(&db, "k", 6, "t2", t0), NextAction::Reused);

        // The first attempt dies without persisting: after the lock TTL it is taken over.
        let later = t0 + Duration::from_secs(5);
        let NextAction::Charge {
            payment: again,
            resumed,
        } = do_claim(&db, "k", 5, "t3", later)
        else {
            panic!("stale lock must be taken over")
        };
        assert!(resumed);
        assert_eq!(again.id, payment.id);

        // The old attempt can no longer finish the key; the new one can.
        payment.status = PaymentStatus::Succeeded;
        let resp = StoredResponse {
            status: 201,
            headers: vec![("Location".into(), format!("/payments/{}", payment.id))],
            body: b"{}".to_vec(),
        };
        let late = in_tx(&db, |tx| {
            persist(tx, att("k", "t1"), &payment, Some(&resp), later)
        });
        assert_eq!(late, Persisted::LockLost);
        assert_eq!(do_claim(&db, "k", 5, "t4", t0), NextAction::InUse);
        in_tx(&db, |tx| {
            persist(tx, att("k", "t3"), &payment, Some(&resp), later)
        });
        assert_eq!(do_claim(&db, "k", 5, "t5", later), NextAction::Replay(resp));
    }

    #[test]
    fn unsettled_payments_are_found_and_settled_unless_a_request_holds_them() {
        let (_d, db) = setup();
        let t0 = SystemTime::now();
        let now_ms = db::unix_ms(t0);
        let NextAction::Charge { mut payment, .. } = do_claim(&db, "k", 5, "t1", t0) else {
            panic!()
        };
        let conn = db.acquire(Duration::from_secs(1)).unwrap();
        assert!(
            unsettled(&conn, now_ms - 4000, 10).unwrap().is_empty(),
            "a live request holds it"
        );
        let found = unsettled(&conn, now_ms + 1, 10).unwrap();
        drop(conn);
        assert_eq!(found.len(), 1, "its lock is stale");
        payment.status = PaymentStatus::Succeeded;
        let resp = StoredResponse {
            status: 201,
            headers: vec![],
            body: b"{}".to_vec(),
        };
        let live = in_tx(&db, |tx| {
            settle(tx, &found[0], &payment, Some(&resp), now_ms - 4000, t0)
        });
        assert!(!live, "not while the lock is fresh");
        let done = in_tx(&db, |tx| {
            settle(tx, &found[0], &payment, Some(&resp), now_ms + 1, t0)
        });
        assert!(done);
        assert_eq!(do_claim(&db, "k", 5, "t2", t0), NextAction::Replay(resp));
        let swept = in_tx(&db, |tx| sweep(tx, now_ms + 1));
        assert_eq!(swept, 1);
    }

    #[test]
    fn an_unlocked_unfinished_key_resumes_at_once() {
        let (_d, db) = setup();
        let t0 = SystemTime::now();
        let NextAction::Charge { mut payment, .. } = do_claim(&db, "k", 5, "t1", t0) else {
            panic!()
        };
        payment.status = PaymentStatus::Pending;
        in_tx(&db, |tx| persist(tx, att("k", "t1"), &payment, None, t0));
        match do_claim(&db, "k", 5, "t2", t0) {
            NextAction::Charge {
                payment: p,
                resumed,
            } => {
                assert!(resumed);
                assert_eq!(p.id, payment.id);
                assert_eq!(p.status, PaymentStatus::Pending);
            }
            other => panic!("expected resume, got {other:?}"),
        }
    }
}
