//! Why a database step did not complete: shared by the pool (`db.rs`) and the writer
//! (`writer.rs`), and sorted so that callers can answer a client truthfully.

/// Why a database step did not complete.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("timed out waiting for a pooled connection")]
    AcquireTimeout,
    #[error("the write did not get the database lock within its slice")]
    Busy,
    /// The database cannot be written: disk full, read-only, I/O error, cannot be opened.
    /// `new_incident` is true for the first such failure after writes last succeeded, so the
    /// cause is logged once per incident.
    #[error("the database cannot be written: {cause}")]
    Unavailable { cause: String, new_incident: bool },
    #[error("database error: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("pool error: {0}")]
    Pool(String),
    #[error("database error: {0}")]
    Postgres(String),
}

impl DbError {
    /// Sorts an r2d2 error: no connection within the timeout, or anything else. (r2d2 says
    /// which only in its message.)
    pub fn from_pool(e: r2d2::Error) -> DbError {
        let message = e.to_string();
        if message.contains("timed out") {
            DbError::AcquireTimeout
        } else {
            DbError::Pool(message)
        }
    }

    /// The same failure again, for each write of a batch that failed as a whole; a storage
    /// incident is new only for the first of them.
    pub fn share(&self) -> DbError {
        match self {
            DbError::AcquireTimeout => DbError::AcquireTimeout,
            DbError::Busy => DbError::Busy,
            DbError::Unavailable { cause, .. } => DbError::Unavailable {
                cause: cause.clone(),
                new_incident: false,
            },
            DbError::Sqlite(e) => DbError::Pool(format!("the batch failed: {e}")),
            DbError::Pool(e) => DbError::Pool(e.clone()),
            DbError::Postgres(e) => DbError::Postgres(e.clone()),
        }
    }

    /// Sorts a SQLite error: busy (the write's slice ran out), storage that cannot be written,
    /// or anything else.
    pub fn from_sqlite(e: rusqlite::Error) -> DbError {
        use rusqlite::ErrorCode::*;
        match e.sqlite_error_code() {
            Some(DatabaseBusy | DatabaseLocked) => DbError::Busy,
            Some(DiskFull | SystemIoFailure | ReadOnly | CannotOpen | PermissionDenied) => {
                DbError::Unavailable {
                    cause: e.to_string(),
                    new_incident: false,
                }
            }
            _ => DbError::Sqlite(e),
        }
    }
}
