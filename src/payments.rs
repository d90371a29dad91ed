//! The handlers. [`create`] is the request path of `POST /payments`, top to bottom: validate,
//! claim (pool + idempotency), call the provider (breaker + budget), persist, answer. Each step
//! takes its slice of the deadline and counts its time in the context.

use std::time::{Instant, SystemTime};

use serde_json::{Map, Value, json};
use tiny_http::Request;

use crate::app::App;
use crate::db::{self, DbError, Payment, PaymentStatus};
use crate::deadline::{Exhausted, Op, Step};
use crate::error::{ApiError, FieldError};
use crate::http::{self, Reply};
use crate::idempotency::{self, Attempt, NewPayment, NextAction, StoredResponse};
use crate::middleware::Ctx;
use crate::provider::client::{ChargeOutcome, ChargeRequest};

const MAX_AMOUNT: i64 = 99_999_999;

/// `POST /payments`.
pub fn create(app: &App, ctx: &mut Ctx, request: &mut Request) -> Result<Reply, ApiError> {
    let key = idempotency_key(request)?;
    http::require_json(request)?;
    let body = http::read_body(request, app.config.max_body)?;
    let input = parse_new_payment(&body)?;
    let fingerprint = idempotency::fingerprint("POST", "/payments", &input);
    let scope = ctx.scope()?.to_string();
    // The lock is this attempt's own: a client's X-Request-Id may repeat, and a lock token
    // shared by two attempts would let one finish (or release) the other's key.
    let token = idempotency::new_lock_token();
    let attempt = Attempt {
        scope: &scope,
        key: &key,
        token: &token,
    };

    // 1. Claim: borrow a connection, decide in one short transaction, give it back.
    let action = {
        let mut writer = acquire_writer(app, ctx, Op::ClaimAcquire)?;
        let busy = slice(app, ctx, Op::ClaimWrite)?;
        let lock_ttl = app.lock_ttl;
        ctx.timed(Step::Claim, || {
            writer.transaction(busy, |tx| {
                idempotency::claim(
                    tx,
                    attempt,
                    &fingerprint,
                    &input,
                    SystemTime::now(),
                    lock_ttl,
                )
            })
        })
        .map_err(|e| db_error(e, Step::Claim, None, &ctx.request_id))?
    };
    let (mut payment, resumed) = match action {
        NextAction::Replay(stored) => {
            ctx.idempotency = Some("replayed");
            return Ok(replay(stored));
        }
        NextAction::InUse => {
            ctx.idempotency = Some("in-use");
            return Err(ApiError::KeyInUse);
        }
        NextAction::Reused => {
            ctx.idempotency = Some("reused");
            return Err(ApiError::KeyReused);
        }
        NextAction::Charge { payment, resumed } => (payment, resumed),
    };
    ctx.idempotency = Some(if resumed { "resumed" } else { "new" });

    // 2. The provider call: no connection is held; the payment id is the provider's key.
    let provider_slice = app.timeouts_slice(ctx, Op::ProviderCall);
    ctx.provider_slice = provider_slice.ok();
    let outcome = match provider_slice {
        Ok(timeout) => Some(ctx.timed(Step::Provider, || {
            app.provider.charge(
                &ChargeRequest {
                    idempotency_key: &payment.id,
                    amount: payment.amount,
                    currency: &payment.currency,
                    source: &payment.source,
                },
                timeout,
            )
        })),
        Err(_) => None,
    };
    if matches!(outcome, Some(ChargeOutcome::Rejected { .. })) {
        ctx.shed = Some("breaker_open");
    }
    let (stored, result) = settle(&mut payment, outcome, resumed, &ctx.request_id);

    // 3. Persist: the final status, and the response to replay when the outcome is final.
    let persisted = acquire_writer(app, ctx, Op::PersistAcquire).and_then(|mut writer| {
        let busy = slice(app, ctx, Op::PersistWrite)?;
        ctx.timed(Step::Persist, || {
            writer.transaction(busy, |tx| {
                idempotency::persist(tx, attempt, &payment, stored.as_ref(), SystemTime::now())
            })
        })
        .map_err(|e| db_error(e, Step::Persist, Some(&payment), &ctx.request_id))
    });
    if matches!(persisted, Ok(idempotency::Persisted::LockLost)) {
        // This attempt took too long and another took the key over: what it would have
        // written is not written, and the key's current state is the answer a retry gets.
        log::warn!(
            "{}: lost the lock on {} before recording it; a retry gets the recorded outcome",
            ctx.request_id,
            payment.id
        );
        return Err(ApiError::KeyInUse);
    }
    if persisted.is_ok() {
        app.metrics
            .payments
            .with_label_values(&[payment.status.as_str()])
            .inc();
    }
    if let Err(e) = persisted {
        // The outcome could not be recorded: the key stays locked until its lock goes stale,
        // and a retry then resumes the same payment (the provider deduplicates the charge).
        // A storage incident is logged once, by `db_error`.
        if !matches!(e, ApiError::StorageUnavailable { .. }) {
            log::warn!(
                "{}: could not persist {} ({e}); a retry will resume it",
                ctx.request_id,
                payment.id
            );
        }
        return Err(match e {
            ApiError::Overloaded { .. } => ApiError::DeadlineExceeded {
                step: Step::Acquire,
                payment: Some(as_pending(&payment)),
            },
            // Whatever else kept the outcome from being recorded, the answer carries the
            // payment as `pending`: its charge may exist.
            ApiError::Internal(cause) => {
                log::error!(
                    "{}: recording {} failed: {cause}",
                    ctx.request_id,
                    payment.id
                );
                ApiError::StorageUnavailable {
                    payment: Some(as_pending(&payment)),
                }
            }
            other => other,
        });
    }
    result
}

/// The payment's new state and the answer, from what the provider said (or `None` when the
/// budget left no useful slice for the call, so it was never made).
fn settle(
    payment: &mut Payment,
    outcome: Option<ChargeOutcome>,
    resumed: bool,
    request_id: &str,
) -> (Option<StoredResponse>, Result<Reply, ApiError>) {
    // A payment whose charge may already exist from an earlier attempt stays pending until the
    // provider says otherwise: "failed" is only for a charge that was certainly never made. A
    // resumed payment may have been charged by an attempt that could not record it, even if
    // its row still says `processing`.
    let never_sent = if payment.status == PaymentStatus::Pending || resumed {
        PaymentStatus::Pending
    } else {
        PaymentStatus::Failed
    };
    payment.updated_at = db::timestamp(SystemTime::now());
    match outcome {
        Some(ChargeOutcome::Charged { charge_id }) => {
            payment.status = PaymentStatus::Succeeded;
            payment.provider_charge_id = Some(charge_id);
            payment.failure_code = None;
            final_answer(payment, request_id)
        }
        Some(ChargeOutcome::Declined { charge_id, code }) => {
            payment.status = PaymentStatus::Declined;
            payment.provider_charge_id = charge_id;
            payment.failure_code = Some(code);
            final_answer(payment, request_id)
        }
        Some(ChargeOutcome::Ambiguous { detail, .. }) => {
            log::warn!(
                "{request_id}: provider answer for {} is ambiguous: {detail}",
                payment.id
            );
            payment.status = PaymentStatus::Pending;
            (
                None,
                Err(ApiError::ProviderError {
                    detail,
                    payment: payment.to_json(),
                }),
            )
        }
        Some(ChargeOutcome::Timeout) => {
            payment.status = PaymentStatus::Pending;
            (
                None,
                Err(ApiError::DeadlineExceeded {
                    step: Step::Provider,
                    payment: Some(payment.to_json()),
                }),
            )
        }
        Some(ChargeOutcome::Unreachable { detail }) => not_sent(
            payment,
            never_sent,
            format!("the payment provider could not be reached ({detail}); nothing was charged"),
            1,
        ),
        Some(ChargeOutcome::Rejected { retry_after }) => not_sent(
            payment,
            never_sent,
            "the payment provider is failing and the circuit breaker is open; nothing was sent"
                .into(),
            retry_after.as_secs_f64().ceil().max(1.0) as u64,
        ),
        None => {
            payment.status = never_sent;
            (
                None,
                Err(ApiError::DeadlineExceeded {
                    step: Step::Provider,
                    payment: Some(payment.to_json()),
                }),
            )
        }
    }
}

fn as_pending(payment: &Payment) -> Value {
    let mut v = payment.to_json();
    if payment.status == PaymentStatus::Succeeded || payment.status == PaymentStatus::Declined {
        // Not recorded yet: to the client the outcome is known only after a retry.
        v["status"] = json!("pending");
    }
    v
}

/// 503 `provider-unavailable`: the charge was certainly not sent this time.
fn not_sent(
    payment: &mut Payment,
    status: PaymentStatus,
    detail: String,
    retry_after_s: u64,
) -> (Option<StoredResponse>, Result<Reply, ApiError>) {
    payment.status = status;
    if status == PaymentStatus::Failed {
        payment.failure_code = Some("provider_unavailable".into());
    }
    (
        None,
        Err(ApiError::ProviderUnavailable {
            detail,
            retry_after_s,
            payment: Some(payment.to_json()),
        }),
    )
}

fn final_answer(
    payment: &Payment,
    request_id: &str,
) -> (Option<StoredResponse>, Result<Reply, ApiError>) {
    match final_reply(payment, request_id) {
        Some(reply) => (Some(to_stored(&reply)), Ok(reply)),
        None => (None, Err(ApiError::Internal("no final outcome".into()))),
    }
}

/// The answer for a payment whose outcome is final — 201 with `Location`, or 402
/// `card-declined` — exactly as it is stored for replays. `None` for any other status.
pub fn final_reply(payment: &Payment, request_id: &str) -> Option<Reply> {
    match payment.status {
        PaymentStatus::Succeeded => {
            Some(Reply::json(201, payment).header("Location", format!("/payments/{}", payment.id)))
        }
        PaymentStatus::Declined => Some(declined(payment, request_id)),
        _ => None,
    }
}

/// 402 `card-declined`, a stored outcome.
fn declined(payment: &Payment, request_id: &str) -> Reply {
    Reply::problem(
        402,
        &json!({
            "type": "/problems/card-declined",
            "title": "Card declined",
            "status": 402,
            "detail": "the payment provider declined the card",
            "code": "card-declined",
            "request_id": request_id,
            "payment": payment,
        }),
    )
}

/// A reply as the idempotency table keeps it (its content type among the headers).
pub fn to_stored(reply: &Reply) -> StoredResponse {
    let mut headers = vec![("Content-Type".to_string(), reply.content_type.clone())];
    headers.extend(reply.headers.iter().cloned());
    StoredResponse {
        status: reply.status,
        headers,
        body: reply.body.clone(),
    }
}

fn replay(stored: StoredResponse) -> Reply {
    let mut reply = Reply::text(stored.status, "application/json", stored.body);
    for (k, v) in stored.headers {
        if k.eq_ignore_ascii_case("Content-Type") {
            reply.content_type = v;
        } else {
            reply.headers.push((k, v));
        }
    }
    reply.header("Idempotent-Replayed", "true")
}

/// `GET /payments/{id}`: another scope's payment is 404, like one that does not exist.
pub fn get(app: &App, ctx: &mut Ctx, id: &str) -> Result<Reply, ApiError> {
    let scope = ctx.scope()?.to_string();
    let conn = acquire(app, ctx, Op::ClaimAcquire)?;
    match db::get_payment(&conn, &scope, id) {
        Ok(Some(p)) => Ok(Reply::json(200, &p)),
        Ok(None) => Err(ApiError::NotFound),
        Err(e) => Err(read_error(e)),
    }
}

/// `GET /payments?limit=&starting_after=`: newest first.
pub fn list(app: &App, ctx: &mut Ctx, query: &str) -> Result<Reply, ApiError> {
    let scope = ctx.scope()?.to_string();
    let mut limit = 10usize;
    let mut starting_after: Option<String> = None;
    let mut errors = Vec::new();
    for (k, v) in http::query_pairs(query) {
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
    let conn = acquire(app, ctx, Op::ClaimAcquire)?;
    match db::list_payments(&conn, &scope, limit, starting_after.as_deref()) {
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

/// Borrows a pooled connection for reading within the slice `op` may take.
fn acquire(app: &App, ctx: &mut Ctx, op: Op) -> Result<db::Conn, ApiError> {
    let timeout = slice(app, ctx, op)?;
    let t = Instant::now();
    let conn = app.db.acquire(timeout);
    ctx.add(Step::Acquire, t.elapsed());
    conn.map_err(|e| overloaded(app, ctx, e, timeout))
}

/// Takes the write token and a pooled connection within the slice `op` may take.
fn acquire_writer(app: &App, ctx: &mut Ctx, op: Op) -> Result<db::Writer, ApiError> {
    let timeout = slice(app, ctx, op)?;
    let t = Instant::now();
    let writer = app.db.writer(timeout);
    ctx.add(Step::Acquire, t.elapsed());
    writer.map_err(|e| overloaded(app, ctx, e, timeout))
}

/// A timed-out acquisition is 503 `overloaded`: nothing was done, the client may retry.
fn overloaded(app: &App, ctx: &mut Ctx, e: DbError, timeout: std::time::Duration) -> ApiError {
    match e {
        DbError::AcquireTimeout => {
            app.metrics.acquire_timeouts.inc();
            ctx.shed = Some("pool_timeout");
            ApiError::Overloaded {
                detail: format!(
                    "the database did not become available within {} ms (pool size {}); retry shortly",
                    timeout.as_millis(),
                    app.config.pool_size
                ),
                retry_after_s: 1,
            }
        }
        other => ApiError::Internal(other.to_string()),
    }
}

fn slice(app: &App, ctx: &Ctx, op: Op) -> Result<std::time::Duration, ApiError> {
    app.timeouts_slice(ctx, op)
        .map_err(|Exhausted { step }| ApiError::DeadlineExceeded {
            step,
            payment: None,
        })
}

/// A failed write as the client sees it; a storage incident's cause is logged here, once per
/// incident, with the request id of the write that found it.
fn db_error(e: DbError, step: Step, payment: Option<&Payment>, request_id: &str) -> ApiError {
    match e {
        DbError::Busy => ApiError::DeadlineExceeded {
            step,
            payment: payment.map(as_pending),
        },
        DbError::Unavailable {
            cause,
            new_incident,
        } => {
            if new_incident {
                log::error!(
                    "{request_id}: storage unavailable at step {}: {cause}; payments answer 503 and readiness fails until a write succeeds",
                    step.name()
                );
            }
            ApiError::StorageUnavailable {
                payment: payment.map(as_pending),
            }
        }
        other => ApiError::Internal(other.to_string()),
    }
}

/// A failed read: storage that cannot be read is 503 like one that cannot be written.
fn read_error(e: rusqlite::Error) -> ApiError {
    match DbError::from_sqlite(e) {
        DbError::Unavailable { .. } => ApiError::StorageUnavailable { payment: None },
        other => ApiError::Internal(other.to_string()),
    }
}

/// The `Idempotency-Key` header: 1–255 visible ASCII, optionally as an RFC 8941 string.
fn idempotency_key(request: &Request) -> Result<String, ApiError> {
    let raw = http::header(request, "Idempotency-Key").ok_or(ApiError::IdempotencyKeyMissing)?;
    let raw = raw.trim();
    let key = match raw.strip_prefix('"').and_then(|r| r.strip_suffix('"')) {
        Some(inner) => unescape_sf_string(inner).ok_or_else(|| {
            ApiError::IdempotencyKeyInvalid("Idempotency-Key is not a valid quoted string".into())
        })?,
        None => raw.to_string(),
    };
    if http::is_visible_ascii(&key, 255) {
        Ok(key)
    } else {
        Err(ApiError::IdempotencyKeyInvalid(
            "Idempotency-Key must be 1 to 255 visible ASCII characters".into(),
        ))
    }
}

/// RFC 8941 sf-string content: `\"` and `\\` are the only escapes.
fn unescape_sf_string(inner: &str) -> Option<String> {
    let mut out = String::with_capacity(inner.len());
    let mut chars = inner.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => match chars.next() {
                Some(e @ ('"' | '\\')) => out.push(e),
                _ => return None,
            },
            '"' => return None,
            c => out.push(c),
        }
    }
    Some(out)
}

/// The members of a JSON object, and the names that occur more than once. serde_json's own
/// map keeps the last of duplicate keys without a word (`{"amount":1,"amount":777}` would
/// charge 777), so the object is read member by member here.
#[derive(Debug, Default)]
struct Members {
    fields: Map<String, Value>,
    duplicates: Vec<String>,
}

impl<'de> serde::Deserialize<'de> for Members {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Members, D::Error> {
        struct Visit;
        impl<'de> serde::de::Visitor<'de> for Visit {
            type Value = Members;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<Members, A::Error> {
                let mut m = Members::default();
                while let Some(name) = map.next_key::<String>()? {
                    let value: Value = map.next_value()?;
                    if m.fields.contains_key(&name) {
                        if !m.duplicates.contains(&name) {
                            m.duplicates.push(name);
                        }
                    } else {
                        m.fields.insert(name, value);
                    }
                }
                Ok(m)
            }
        }
        d.deserialize_map(Visit)
    }
}

/// Validates the body of `POST /payments`, reporting every bad field at once.
pub fn parse_new_payment(body: &[u8]) -> Result<NewPayment, ApiError> {
    let Members {
        mut fields,
        duplicates,
    } = serde_json::from_slice(body).map_err(|e| {
        ApiError::invalid(match e.classify() {
            // The only type the members can have is "any value": a data error is the top level.
            serde_json::error::Category::Data => "the body must be a JSON object".to_string(),
            _ => format!("the body is not valid JSON: {e}"),
        })
    })?;
    let mut errors: Vec<FieldError> = duplicates
        .iter()
        .map(|name| FieldError::new(name, "appears more than once"))
        .collect();
    let amount = match fields.remove("amount") {
        Some(Value::Number(n)) => match n.as_i64() {
            Some(a) if (1..=MAX_AMOUNT).contains(&a) => Some(a),
            _ => {
                errors.push(FieldError::new(
                    "amount",
                    format!("must be a whole number of minor units from 1 to {MAX_AMOUNT}"),
                ));
                None
            }
        },
        Some(_) => {
            errors.push(FieldError::new("amount", "must be an integer"));
            None
        }
        None => {
            errors.push(FieldError::new("amount", "is required"));
            None
        }
    };
    let currency = match take_string(&mut fields, "currency", &mut errors, true) {
        Some(c) if c.len() == 3 && c.bytes().all(|b| b.is_ascii_alphabetic()) => {
            let lower = c.to_ascii_lowercase();
            if ISO_4217.split(' ').any(|code| code == lower) {
                Some(lower)
            } else {
                errors.push(FieldError::new(
                    "currency",
                    format!("`{c}` is not an ISO 4217 currency code"),
                ));
                None
            }
        }
        Some(_) => {
            errors.push(FieldError::new(
                "currency",
                "must be a three-letter ISO 4217 code",
            ));
            None
        }
        None => None,
    };
    let source = match take_string(&mut fields, "source", &mut errors, true) {
        Some(s) if (1..=255).contains(&s.chars().count()) => Some(s),
        Some(_) => {
            errors.push(FieldError::new("source", "must be 1 to 255 characters"));
            None
        }
        None => None,
    };
    let description = match take_string(&mut fields, "description", &mut errors, false) {
        Some(d) if d.chars().count() > 500 => {
            errors.push(FieldError::new(
                "description",
                "must be at most 500 characters",
            ));
            None
        }
        other => other,
    };
    let mut unknown: Vec<&String> = fields.keys().collect();
    unknown.sort();
    for name in unknown {
        errors.push(FieldError::new(name, "unknown field"));
    }
    match (amount, currency, source) {
        (Some(amount), Some(currency), Some(source)) if errors.is_empty() => Ok(NewPayment {
            amount,
            currency,
            source,
            description,
        }),
        _ => Err(ApiError::InvalidRequest {
            detail: format!(
                "{} field{} invalid: {}",
                errors.len(),
                if errors.len() == 1 { " is" } else { "s are" },
                errors
                    .iter()
                    .map(|e| e.field.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            errors,
        }),
    }
}

fn take_string(
    fields: &mut Map<String, Value>,
    name: &str,
    errors: &mut Vec<FieldError>,
    required: bool,
) -> Option<String> {
    match fields.remove(name) {
        Some(Value::String(s)) => Some(s),
        Some(Value::Null) | None if !required => None,
        None => {
            errors.push(FieldError::new(name, "is required"));
            None
        }
        Some(_) => {
            errors.push(FieldError::new(name, "must be a string"));
            None
        }
    }
}

/// Active ISO 4217 currency codes.
const ISO_4217: &str = "aed afn all amd ang aoa ars aud awg azn bam bbd bdt bgn bhd bif bmd bnd \
bob bov brl bsd btn bwp byn bzd cad cdf che chf chw clf clp cny cop cou crc cuc cup cve czk djf \
dkk dop dzd egp ern etb eur fjd fkp gbp gel ghs gip gmd gnf gtq gyd hkd hnl htg huf idr ils inr \
iqd irr isk jmd jod jpy kes kgs khr kmf kpw krw kwd kyd kzt lak lbp lkr lrd lsl lyd mad mdl mga \
mkd mmk mnt mop mru mur mvr mwk mxn mxv myr mzn nad ngn nio nok npr nzd omr pab pen pgk php pkr \
pln pyg qar ron rsd rub rwf sar sbd scr sdg sek sgd shp sle sll sos srd ssp stn svc syp szl thb \
tjs tmt tnd top try ttd twd tzs uah ugx usd usn uyi uyu uyw uzs ved ves vnd vuv wst xaf xag xau \
xcd xcg xdr xof xpd xpf xpt xsu xua yer zar zmw zwg zwl";

#[cfg(test)]
mod tests {
    use super::*;

    fn processing() -> Payment {
        Payment::sample("pay_x")
    }

    #[test]
    fn a_resumed_payment_not_sent_now_stays_pending_it_may_have_been_charged_before() {
        for outcome in [
            None,
            Some(ChargeOutcome::Rejected {
                retry_after: std::time::Duration::from_secs(1),
            }),
            Some(ChargeOutcome::Unreachable {
                detail: "refused".into(),
            }),
        ] {
            let mut fresh = processing();
            let _ = settle(&mut fresh, outcome.clone(), false, "r");
            assert_eq!(fresh.status, PaymentStatus::Failed, "{outcome:?}");
            let mut resumed = processing();
            let _ = settle(&mut resumed, outcome.clone(), true, "r");
            assert_eq!(resumed.status, PaymentStatus::Pending, "{outcome:?}");
        }
    }

    fn errors_of(body: &str) -> Vec<String> {
        match parse_new_payment(body.as_bytes()) {
            Err(ApiError::InvalidRequest { errors, .. }) => {
                errors.into_iter().map(|e| e.field).collect()
            }
            other => panic!("expected field errors, got {other:?}"),
        }
    }

    #[test]
    fn a_valid_body_is_normalized() {
        let p = parse_new_payment(
            br#"{"amount":1999,"currency":"USD","source":"tok_visa","description":null}"#,
        )
        .unwrap();
        assert_eq!(p.currency, "usd");
        assert_eq!(p.amount, 1999);
        assert_eq!(p.description, None);
    }

    #[test]
    fn every_bad_field_is_named() {
        assert_eq!(
            errors_of(r#"{"amount":0,"currency":"usd","source":"x"}"#),
            ["amount"]
        );
        assert_eq!(
            errors_of(r#"{"amount":100000000,"currency":"usd","source":"x"}"#),
            ["amount"]
        );
        assert_eq!(
            errors_of(r#"{"amount":1.5,"currency":"usd","source":"x"}"#),
            ["amount"]
        );
        assert_eq!(
            errors_of(r#"{"amount":"5","currency":"usd","source":"x"}"#),
            ["amount"]
        );
        assert_eq!(
            errors_of(r#"{"amount":5,"currency":"zzz","source":"x"}"#),
            ["currency"]
        );
        assert_eq!(
            errors_of(r#"{"amount":5,"currency":"us","source":"x"}"#),
            ["currency"]
        );
        assert_eq!(
            errors_of(r#"{"amount":5,"currency":"usd","source":""}"#),
            ["source"]
        );
        assert_eq!(
            errors_of(r#"{"amount":5,"currency":"usd","source":"x","tip":1}"#),
            ["tip"]
        );
        let long = "d".repeat(501);
        assert_eq!(
            errors_of(&format!(
                r#"{{"amount":5,"currency":"usd","source":"x","description":"{long}"}}"#
            )),
            ["description"]
        );
        assert_eq!(errors_of("{}"), ["amount", "currency", "source"]);
    }

    #[test]
    fn malformed_json_is_named_as_such() {
        match parse_new_payment(b"{\"amount\":") {
            Err(ApiError::InvalidRequest { detail, .. }) => {
                assert!(detail.contains("not valid JSON"), "{detail}")
            }
            other => panic!("{other:?}"),
        }
        for not_an_object in [&b"[1]"[..], b"7", b"\"x\"", b"null"] {
            match parse_new_payment(not_an_object) {
                Err(ApiError::InvalidRequest { detail, .. }) => {
                    assert!(detail.contains("must be a JSON object"), "{detail}")
                }
                other => panic!("{other:?}"),
            }
        }
        match parse_new_payment(b"{\"amount\":1} trailing") {
            Err(ApiError::InvalidRequest { detail, .. }) => {
                assert!(detail.contains("not valid JSON"), "{detail}")
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_duplicate_key_is_named_not_silently_overwritten() {
        assert_eq!(
            errors_of(r#"{"amount":1,"amount":777,"currency":"usd","source":"x"}"#),
            ["amount"]
        );
        match parse_new_payment(
            br#"{"amount":1,"currency":"usd","source":"x","source":"y","source":"z"}"#,
        ) {
            Err(ApiError::InvalidRequest { detail, errors }) => {
                assert_eq!(errors.len(), 1, "{errors:?}");
                assert_eq!(errors[0].field, "source");
                assert!(errors[0].message.contains("more than once"));
                assert!(detail.contains("source"), "{detail}");
            }
            other => panic!("{other:?}"),
        }
        // Nested objects are values like any other: only the body's own members count.
        assert_eq!(
            errors_of(r#"{"amount":1,"currency":"usd","source":"x","tip":{"a":1,"a":2}}"#),
            ["tip"]
        );
        assert!(parse_new_payment(br#"{"amount":1,"currency":"usd","source":"x"}"#).is_ok());
    }

    #[test]
    fn quoted_keys_unescape() {
        assert_eq!(unescape_sf_string(r#"a\"b\\c"#).as_deref(), Some("a\"b\\c"));
        assert_eq!(unescape_sf_string(r#"a\nb"#), None);
        assert_eq!(unescape_sf_string(r#"a"b"#), None);
    }
}
