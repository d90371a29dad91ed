//! The invariants, checked at the end of a run against the provider's `/v1/stats` and the
//! SQLite file, opened read-only.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::Duration;

use rusqlite::{Connection, OpenFlags};
use serde_json::Value;

use super::model::{Answer, Invariant};

pub(crate) fn open_read_only(db: &Path) -> Result<Connection, String> {
    Connection::open_with_flags(
        db,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(|e| format!("cannot open {} read-only: {e}", db.display()))
}

fn count(conn: &Connection, sql: &str) -> Result<i64, String> {
    conn.query_row(sql, [], |r| r.get(0))
        .map_err(|e| format!("{sql}: {e}"))
}

/// The invariants, against the database file (the server has stopped) and the
/// provider's `/v1/stats`; `exit` is the server's exit code after SIGTERM.
pub(crate) fn check_invariants(
    db: &Path,
    answers: &[Answer],
    stats: &Value,
    settled_after: Duration,
    exit: Option<i32>,
) -> Result<Vec<Invariant>, String> {
    let conn = open_read_only(db)?;
    let mut out = Vec::new();

    let shared = count(
        &conn,
        "SELECT COUNT(*) FROM (SELECT payment_id FROM idempotency_keys GROUP BY payment_id HAVING COUNT(*) > 1)",
    )?;
    let keyless = count(
        &conn,
        "SELECT COUNT(*) FROM payments WHERE id NOT IN (SELECT payment_id FROM idempotency_keys)",
    )?;
    let mut ids_per_key: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    for a in answers {
        if let Some(id) = &a.id {
            ids_per_key.entry(&a.key).or_default().insert(id);
        }
    }
    let two_ids = ids_per_key.values().filter(|ids| ids.len() > 1).count();
    out.push(Invariant {
        name: "no key with two payments",
        held: shared == 0 && keyless == 0 && two_ids == 0,
        detail: format!(
            "{} keys; payments sharing a key {shared}, without a key {keyless}; keys a client saw two ids for {two_ids}",
            count(&conn, "SELECT COUNT(*) FROM idempotency_keys")?
        ),
    });

    let succeeded = count(
        &conn,
        "SELECT COUNT(*) FROM payments WHERE status = 'succeeded'",
    )?;
    let charged = stats["succeeded"].as_i64().unwrap_or(-1);
    out.push(Invariant {
        name: "provider charges == succeeded payments",
        held: charged == succeeded,
        detail: format!(
            "provider succeeded charges {charged}, succeeded payments {succeeded} (provider requests {}, replays {})",
            stats["requests"], stats["replays"]
        ),
    });

    let mut missing = 0;
    let mut seen = 0;
    let mut lookup = conn
        .prepare("SELECT COUNT(*) FROM payments WHERE id = ?1 AND status = 'succeeded'")
        .map_err(|e| e.to_string())?;
    for a in answers.iter().filter(|a| a.status == 201) {
        seen += 1;
        let found: i64 = match &a.id {
            Some(id) => lookup
                .query_row([id], |r| r.get(0))
                .map_err(|e| e.to_string())?,
            None => 0,
        };
        if found != 1 {
            missing += 1;
        }
    }
    out.push(Invariant {
        name: "every 201 a client saw is stored",
        held: missing == 0,
        detail: format!("{seen} answers 201, {missing} not stored as succeeded with that id"),
    });

    let left = count(
        &conn,
        "SELECT COUNT(*) FROM payments WHERE status IN ('processing','pending')",
    )?;
    out.push(Invariant {
        name: "nothing left processing or pending",
        held: left == 0,
        detail: format!(
            "{left} left, {:.1} s after the load stopped",
            settled_after.as_secs_f64(),
        ),
    });
    out.push(Invariant {
        name: "the server drained and exited 0 after SIGTERM",
        held: exit == Some(0),
        detail: format!(
            "exit code {}",
            exit.map_or("none: it had to be killed".into(), |c| c.to_string())
        ),
    });
    Ok(out)
}
