//! The API's one error type and its one mapping to a status code and an RFC 9457
//! `application/problem+json` body (`type`, `title`, `status`, `detail`, `code`, `request_id`,
//! and `errors` for field errors).

use serde::Serialize;
use serde_json::{Value, json};

use crate::deadline::Step;
use crate::reply::Reply;

/// `Retry-After` of a 503 `storage-unavailable`: a full disk or a read-only file needs a person,
/// so clients should not retry at once.
const STORAGE_RETRY_AFTER_S: u64 = 5;

/// One invalid field of a request body.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

impl FieldError {
    pub fn new(field: &str, message: impl Into<String>) -> FieldError {
        FieldError {
            field: field.to_string(),
            message: message.into(),
        }
    }
}

/// Everything a request can fail with: each variant is one documented answer (a status and its code).
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{detail}")]
    InvalidRequest {
        detail: String,
        errors: Vec<FieldError>,
    },
    #[error("the Idempotency-Key header is required for POST /payments")]
    IdempotencyKeyMissing,
    #[error("{0}")]
    IdempotencyKeyInvalid(String),
    #[error("a valid API key is required: Authorization: Bearer <key>")]
    Unauthorized,
    #[error("no such resource")]
    NotFound,
    #[error("this path does not support the method; allowed: {allow}")]
    MethodNotAllowed { allow: &'static str },
    #[error("the request did not arrive in full within the socket timeout")]
    RequestTimeout,
    #[error("only the Expect value 100-continue is supported")]
    ExpectationFailed,
    #[error("only HTTP/1.0 and HTTP/1.1 are served here")]
    VersionNotSupported,
    #[error("a request with this Idempotency-Key is still being processed; retry shortly")]
    KeyInUse,
    #[error("the request body is larger than the limit of {limit} bytes")]
    BodyTooLarge { limit: u64 },
    #[error("the request line is longer than 8 KiB")]
    UriTooLong,
    #[error("{0}")]
    UnsupportedMediaType(String),
    #[error(
        "this Idempotency-Key was already used with a different request; use a new key for a new payment"
    )]
    KeyReused,
    #[error("{0}")]
    HeadersTooLarge(String),
    #[error("{detail}")]
    Overloaded { detail: String, retry_after_s: u64 },
    /// The provider's answer does not say in full that this charge succeeded or was declined.
    #[error("{detail}: the charge may or may not exist; retry with the same Idempotency-Key")]
    ProviderError { detail: String, payment: Value },
    #[error("{detail}")]
    ProviderUnavailable {
        detail: String,
        retry_after_s: u64,
        payment: Option<Value>,
    },
    #[error("too many requests for this API key; retry after {retry_after_s} s")]
    RateLimited { retry_after_s: u64 },
    #[error("the server is shutting down; retry on a new connection")]
    ShuttingDown,
    /// The database cannot be written (disk full, read-only, I/O error). The cause is logged,
    /// not sent; `payment` is there when a charge was sent.
    #[error(
        "the database cannot be written right now; the incident is logged with this request id; retry later with the same Idempotency-Key"
    )]
    StorageUnavailable { payment: Option<Value> },
    #[error("the request's deadline ran out before or during step `{}`", step.name())]
    DeadlineExceeded { step: Step, payment: Option<Value> },
    #[error("internal error; the incident is logged with this request id")]
    Internal(String),
}

impl ApiError {
    pub fn invalid(detail: impl Into<String>) -> ApiError {
        ApiError::InvalidRequest {
            detail: detail.into(),
            errors: Vec::new(),
        }
    }

    pub fn status(&self) -> u16 {
        match self {
            ApiError::InvalidRequest { .. }
            | ApiError::IdempotencyKeyMissing
            | ApiError::IdempotencyKeyInvalid(_) => 400,
            ApiError::Unauthorized => 401,
            ApiError::NotFound => 404,
            ApiError::MethodNotAllowed { .. } => 405,
            ApiError::RequestTimeout => 408,
            ApiError::ExpectationFailed => 417,
            ApiError::VersionNotSupported => 505,
            ApiError::KeyInUse => 409,
            ApiError::BodyTooLarge { .. } => 413,
            ApiError::UriTooLong => 414,
            ApiError::UnsupportedMediaType(_) => 415,
            ApiError::KeyReused => 422,
            ApiError::HeadersTooLarge(_) => 431,
            ApiError::RateLimited { .. } => 429,
            ApiError::Internal(_) => 500,
            ApiError::ProviderError { .. } => 502,
            ApiError::Overloaded { .. }
            | ApiError::ProviderUnavailable { .. }
            | ApiError::ShuttingDown
            | ApiError::StorageUnavailable { .. } => 503,
            ApiError::DeadlineExceeded { .. } => 504,
        }
    }

    /// The problem slug: `type` is `/problems/<code>`.
    pub fn code(&self) -> &'static str {
        match self {
            ApiError::InvalidRequest { .. } => "invalid-request",
            ApiError::IdempotencyKeyMissing => "idempotency-key-missing",
            ApiError::IdempotencyKeyInvalid(_) => "idempotency-key-invalid",
            ApiError::Unauthorized => "unauthorized",
            ApiError::NotFound => "not-found",
            ApiError::MethodNotAllowed { .. } => "method-not-allowed",
            ApiError::RequestTimeout => "request-timeout",
            ApiError::ExpectationFailed => "expectation-failed",
            ApiError::VersionNotSupported => "http-version-not-supported",
            ApiError::KeyInUse => "idempotency-key-in-use",
            ApiError::BodyTooLarge { .. } => "body-too-large",
            ApiError::UriTooLong => "uri-too-long",
            ApiError::UnsupportedMediaType(_) => "unsupported-media-type",
            ApiError::KeyReused => "idempotency-key-reused",
            ApiError::HeadersTooLarge(_) => "headers-too-large",
            ApiError::RateLimited { .. } => "rate-limited",
            ApiError::Overloaded { .. } => "overloaded",
            ApiError::ProviderError { .. } => "provider-error",
            ApiError::ProviderUnavailable { .. } => "provider-unavailable",
            ApiError::ShuttingDown => "shutting-down",
            ApiError::StorageUnavailable { .. } => "storage-unavailable",
            ApiError::DeadlineExceeded { .. } => "deadline-exceeded",
            ApiError::Internal(_) => "internal-error",
        }
    }

    fn title(&self) -> &'static str {
        match self {
            ApiError::InvalidRequest { .. } => "The request is invalid",
            ApiError::IdempotencyKeyMissing => "Idempotency-Key is missing",
            ApiError::IdempotencyKeyInvalid(_) => "Idempotency-Key is invalid",
            ApiError::Unauthorized => "Unauthorized",
            ApiError::NotFound => "Not found",
            ApiError::MethodNotAllowed { .. } => "Method not allowed",
            ApiError::RequestTimeout => "Request timeout",
            ApiError::ExpectationFailed => "Expectation failed",
            ApiError::VersionNotSupported => "HTTP version not supported",
            ApiError::KeyInUse => "Idempotency-Key in use",
            ApiError::BodyTooLarge { .. } => "Request body too large",
            ApiError::UriTooLong => "Request line too long",
            ApiError::UnsupportedMediaType(_) => "Unsupported media type",
            ApiError::KeyReused => "Idempotency-Key reused",
            ApiError::HeadersTooLarge(_) => "Request headers too large",
            ApiError::RateLimited { .. } => "Rate limited",
            ApiError::Overloaded { .. } => "Overloaded",
            ApiError::ProviderError { .. } => "Payment provider error",
            ApiError::ProviderUnavailable { .. } => "Payment provider unavailable",
            ApiError::ShuttingDown => "Shutting down",
            ApiError::StorageUnavailable { .. } => "Storage unavailable",
            ApiError::DeadlineExceeded { .. } => "Deadline exceeded",
            ApiError::Internal(_) => "Internal server error",
        }
    }

    /// The response for this error, as a client sees it.
    pub fn into_reply(self, request_id: &str) -> Reply {
        let status = self.status();
        let code = self.code();
        let mut body = json!({
            "type": format!("/problems/{code}"),
            "title": self.title(),
            "status": status,
            "detail": self.to_string(),
            "code": code,
            "request_id": request_id,
        });
        let mut headers: Vec<(&'static str, String)> = Vec::new();
        match self {
            ApiError::InvalidRequest { errors, .. } if !errors.is_empty() => {
                body["errors"] = json!(errors);
            }
            ApiError::Unauthorized => headers.push(("WWW-Authenticate", "Bearer".into())),
            ApiError::MethodNotAllowed { allow } => headers.push(("Allow", allow.into())),
            ApiError::KeyInUse => headers.push(("Retry-After", "1".into())),
            ApiError::Overloaded { retry_after_s, .. }
            | ApiError::RateLimited { retry_after_s } => {
                headers.push(("Retry-After", retry_after_s.to_string()))
            }
            ApiError::ProviderError { payment, .. } => body["payment"] = payment,
            ApiError::ProviderUnavailable {
                retry_after_s,
                payment,
                ..
            } => {
                headers.push(("Retry-After", retry_after_s.to_string()));
                if let Some(p) = payment {
                    body["payment"] = p;
                }
            }
            ApiError::StorageUnavailable { payment } => {
                headers.push(("Retry-After", STORAGE_RETRY_AFTER_S.to_string()));
                if let Some(p) = payment {
                    body["payment"] = p;
                }
            }
            ApiError::DeadlineExceeded { step, payment } => {
                body["step"] = json!(step.name());
                if let Some(p) = payment {
                    body["payment"] = p;
                }
            }
            _ => {}
        }
        let mut reply = Reply::problem(status, &body);
        for (name, value) in headers {
            reply = reply.header(name, value);
        }
        reply
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(reply: &Reply) -> Value {
        serde_json::from_slice(&reply.body).unwrap()
    }

    #[test]
    fn problems_carry_type_code_status_and_request_id() {
        let r = ApiError::KeyReused.into_reply("req_1");
        assert_eq!(r.status, 422);
        let b = body(&r);
        assert_eq!(b["type"], "/problems/idempotency-key-reused");
        assert_eq!(b["code"], "idempotency-key-reused");
        assert_eq!(b["status"], 422);
        assert_eq!(b["request_id"], "req_1");
        assert!(r.content_type.starts_with("application/problem+json"));
    }

    #[test]
    fn field_errors_and_guard_headers_are_attached() {
        let r = ApiError::InvalidRequest {
            detail: "bad".into(),
            errors: vec![FieldError::new("amount", "must be at least 1")],
        }
        .into_reply("r");
        assert_eq!(body(&r)["errors"][0]["field"], "amount");
        let r = ApiError::Unauthorized.into_reply("r");
        assert!(
            r.headers
                .iter()
                .any(|(k, v)| k == "WWW-Authenticate" && v == "Bearer")
        );
        let r = ApiError::MethodNotAllowed { allow: "GET" }.into_reply("r");
        assert!(r.headers.iter().any(|(k, v)| k == "Allow" && v == "GET"));
        let r = ApiError::DeadlineExceeded {
            step: Step::Provider,
            payment: None,
        }
        .into_reply("r");
        assert_eq!(body(&r)["step"], "provider");
        assert!(body(&r)["detail"].as_str().unwrap().contains("provider"));
    }

    #[test]
    fn storage_unavailable_is_a_retryable_503_that_carries_a_sent_payment() {
        let r = ApiError::StorageUnavailable {
            payment: Some(json!({"id": "pay_1", "status": "pending"})),
        }
        .into_reply("req_9");
        assert_eq!(r.status, 503);
        let b = body(&r);
        assert_eq!(b["code"], "storage-unavailable");
        assert_eq!(b["payment"]["status"], "pending");
        assert_eq!(b["request_id"], "req_9");
        assert!(
            r.headers
                .iter()
                .any(|(k, v)| k == "Retry-After" && v == "5")
        );
        let r = ApiError::StorageUnavailable { payment: None }.into_reply("r");
        assert!(body(&r).get("payment").is_none());
    }
}
