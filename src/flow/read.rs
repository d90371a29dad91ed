//! Reading payments back: `GET /payments/{id}` and `GET /payments`. Only the caller's own
//! payments are visible: another scope's payment is 404, like one that does not exist.

use serde_json::json;

use super::{Caller, Report, borrow};
use crate::app::App;
use crate::deadline::Op;
use crate::error::{ApiError, FieldError};
use crate::reply::Reply;
use crate::store::db::DbError;

/// `GET /payments/{id}`.
pub fn get(app: &App, caller: &Caller, id: &str, report: &mut Report) -> Result<Reply, ApiError> {
    let mut conn = borrow(app, caller, Op::ClaimAcquire, report)?;
    match conn.get_payment(caller.scope, id) {
        Ok(Some(p)) => Ok(Reply::json(200, &p)),
        Ok(None) => Err(ApiError::NotFound),
        Err(e) => Err(read_error(e)),
    }
}

/// `GET /payments?limit=&starting_after=`, newest first; `query` is the decoded pairs.
pub fn list(
    app: &App,
    caller: &Caller,
    query: &[(String, String)],
    report: &mut Report,
) -> Result<Reply, ApiError> {
    let mut limit = 10usize;
    let mut starting_after: Option<&str> = None;
    let mut errors = Vec::new();
    for (k, v) in query {
        match k.as_str() {
            "limit" => match v.parse::<usize>() {
                Ok(n) if (1..=100).contains(&n) => limit = n,
                _ => errors.push(FieldError::new(
                    "limit",
                    "must be a whole number from 1 to 100",
                )),
            },
            "starting_after" => starting_after = Some(v),
            other => errors.push(FieldError::new(other, "unknown query parameter")),
        }
    }
    if !errors.is_empty() {
        return Err(ApiError::InvalidRequest {
            detail: "the query is invalid".into(),
            errors,
        });
    }
    let mut conn = borrow(app, caller, Op::ClaimAcquire, report)?;
    match conn.list_payments(caller.scope, limit, starting_after) {
        Ok(Some((data, has_more))) => Ok(Reply::json(
            200,
            &json!({"object": "list", "data": data, "has_more": has_more}),
        )),
        Ok(None) => Err(ApiError::InvalidRequest {
            detail: "starting_after names no payment of yours".into(),
            errors: vec![FieldError::new("starting_after", "no such payment")],
        }),
        Err(e) => Err(read_error(e)),
    }
}

/// A failed read: storage that cannot be read is 503 like one that cannot be written.
fn read_error(e: DbError) -> ApiError {
    match e {
        DbError::Unavailable { .. } => ApiError::StorageUnavailable { payment: None },
        other => ApiError::Internal(other.to_string()),
    }
}
