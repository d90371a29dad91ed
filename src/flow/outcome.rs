//! What a provider's answer means: the payment's new status, and the answer its client gets.
//! One mapping, used by the handler ([`settle`]) and by the reconciler, so a payment settled
//! late reads exactly like one settled in its request.

use std::time::SystemTime;

use serde_json::{Value, json};

use crate::deadline::Step;
use crate::error::ApiError;
use crate::provider::client::ChargeOutcome;
use crate::reply::Reply;
use crate::store::db::{self, Payment, PaymentStatus};
use crate::store::idempotency::StoredResponse;

/// What a payment became, and what its client is told.
#[derive(Debug)]
pub struct Settled {
    /// The answer to keep for replays: only a final outcome (201, 402) is stored.
    pub stored: Option<StoredResponse>,
    pub answer: Result<Reply, ApiError>,
}

impl Settled {
    fn not_final(error: ApiError) -> Settled {
        Settled {
            stored: None,
            answer: Err(error),
        }
    }
}

/// The one mapping from what the provider said to the payment's new state and the answer (or
/// `None` when the budget left no useful slice for the call, so it was never made). The
/// handler and the reconciler both settle payments through it.
pub fn settle(
    payment: &mut Payment,
    outcome: Option<ChargeOutcome>,
    resumed: bool,
    request_id: &str,
    now: SystemTime,
) -> Settled {
    // A payment whose charge may already exist from an earlier attempt stays pending until the
    // provider says otherwise: "failed" is only for a charge that was certainly never made. A
    // resumed payment may have been charged by an attempt that could not record it, even if
    // its row still says `processing`.
    let never_sent = if payment.status == PaymentStatus::Pending || resumed {
        PaymentStatus::Pending
    } else {
        PaymentStatus::Failed
    };
    payment.updated_at = db::timestamp(now);
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
            Settled::not_final(ApiError::ProviderError {
                detail,
                payment: payment.to_json(),
            })
        }
        Some(ChargeOutcome::Timeout) => {
            payment.status = PaymentStatus::Pending;
            Settled::not_final(ApiError::DeadlineExceeded {
                step: Step::Provider,
                payment: Some(payment.to_json()),
            })
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
            Settled::not_final(ApiError::DeadlineExceeded {
                step: Step::Provider,
                payment: Some(payment.to_json()),
            })
        }
    }
}

/// The payment as a client must see it when its outcome was not recorded.
pub fn as_pending(payment: &Payment) -> Value {
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
) -> Settled {
    payment.status = status;
    if status == PaymentStatus::Failed {
        payment.failure_code = Some("provider_unavailable".into());
    }
    Settled::not_final(ApiError::ProviderUnavailable {
        detail,
        retry_after_s,
        payment: Some(payment.to_json()),
    })
}

fn final_answer(payment: &Payment, request_id: &str) -> Settled {
    match final_reply(payment, request_id) {
        Some(reply) => Settled {
            stored: Some(to_stored(&reply)),
            answer: Ok(reply),
        },
        None => Settled::not_final(ApiError::Internal("no final outcome".into())),
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

/// A stored answer, as the retry of a finished key gets it.
pub fn replay(stored: StoredResponse) -> Reply {
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
            let _ = settle(&mut fresh, outcome.clone(), false, "r", SystemTime::now());
            assert_eq!(fresh.status, PaymentStatus::Failed, "{outcome:?}");
            let mut resumed = processing();
            let _ = settle(&mut resumed, outcome.clone(), true, "r", SystemTime::now());
            assert_eq!(resumed.status, PaymentStatus::Pending, "{outcome:?}");
        }
    }
}
