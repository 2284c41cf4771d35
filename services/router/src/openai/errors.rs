//! The one mapping from a gRPC status to OpenAI's error answer: HTTP status, `type`, `param`,
//! `code` and the retry headers. The HTTP edge answers every failure through it, including the
//! error event that ends a failed stream, so a failure means the same over HTTP as over gRPC.
//!
//! | gRPC code | HTTP | `type` |
//! |---|---|---|
//! | INVALID_ARGUMENT, OUT_OF_RANGE | 400 | `invalid_request_error` |
//! | UNAUTHENTICATED | 401 | `authentication_error` |
//! | PERMISSION_DENIED | 403 | `permission_denied_error` |
//! | NOT_FOUND | 404 | `not_found_error` |
//! | ABORTED (same `Idempotency-Key` still running), ALREADY_EXISTS | 409 | `conflict_error` |
//! | FAILED_PRECONDITION (e.g. sessions off, a model without a price) | 422 | `unprocessable_entity_error` |
//! | RESOURCE_EXHAUSTED (rate limit; budget: `insufficient_quota`) | 429 | `rate_limit_error` / `insufficient_quota` |
//! | UNAVAILABLE (overload, open circuit, every backend failed) | 503 | `service_unavailable_error` |
//! | DEADLINE_EXCEEDED | 504 | `timeout_error` |
//! | UNIMPLEMENTED | 501 | `server_error` |
//! | anything else (INTERNAL, UNKNOWN, DATA_LOSS, CANCELLED) | 500 | `server_error` |
//!
//! `code` is Weir's UPPER_SNAKE reason (ErrorInfo: `RATE_LIMITED`, `BUDGET_EXHAUSTED`,
//! `CIRCUIT_OPEN`, ...), `param` the first BadRequest field. A RetryInfo delay (or gRPC retry
//! pushback) becomes `Retry-After` (whole seconds, rounded up) and `retry-after-ms` (which
//! OpenAI's SDKs read first). A RESOURCE_EXHAUSTED without a delay (a spent budget does not come
//! back in seconds) carries `x-should-retry: false`, so SDKs do not retry it in vain.

use std::time::Duration;

use tonic::{Code, Status};
use weir_mesh::ApiError;

use super::types::{ErrorBody, ErrorObject};

/// An OpenAI error answer, ready to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenAiError {
    /// The HTTP status code.
    pub status: u16,
    /// The body.
    pub body: ErrorBody,
    /// How long to wait before retrying, when the server said.
    pub retry_after: Option<Duration>,
    /// `Some(false)` when a retry cannot help (sent as `x-should-retry`).
    pub should_retry: Option<bool>,
}

impl OpenAiError {
    /// A 400 `invalid_request_error` about `param` (None: the body as a whole).
    pub fn invalid_request(param: Option<&str>, message: impl Into<String>) -> Self {
        Self {
            status: 400,
            body: ErrorBody {
                error: ErrorObject {
                    message: message.into(),
                    kind: "invalid_request_error".to_string(),
                    param: param.map(str::to_string),
                    code: Some("INVALID_ARGUMENT".to_string()),
                },
            },
            retry_after: None,
            should_retry: None,
        }
    }

    /// A 404 `not_found_error` for an unknown path.
    pub fn unknown_path(method: &str, path: &str) -> Self {
        Self {
            status: 404,
            body: ErrorBody {
                error: ErrorObject {
                    message: format!("no such endpoint: {method} {path}"),
                    kind: "not_found_error".to_string(),
                    param: None,
                    code: Some("NOT_FOUND".to_string()),
                },
            },
            retry_after: None,
            should_retry: None,
        }
    }

    /// The `Retry-After` value: whole seconds, rounded up.
    pub fn retry_after_secs(&self) -> Option<u64> {
        self.retry_after
            .map(|delay| delay.as_secs() + u64::from(delay.subsec_nanos() > 0))
    }

    /// The `retry-after-ms` value.
    pub fn retry_after_ms(&self) -> Option<u128> {
        self.retry_after.map(|delay| delay.as_millis())
    }
}

/// The HTTP status and OpenAI error `type` of a gRPC code (see the module doc).
pub fn http_status(code: Code, reason: &str) -> (u16, &'static str) {
    match code {
        Code::InvalidArgument | Code::OutOfRange => (400, "invalid_request_error"),
        Code::Unauthenticated => (401, "authentication_error"),
        Code::PermissionDenied => (403, "permission_denied_error"),
        Code::NotFound => (404, "not_found_error"),
        Code::Aborted | Code::AlreadyExists => (409, "conflict_error"),
        Code::FailedPrecondition => (422, "unprocessable_entity_error"),
        Code::ResourceExhausted if reason.starts_with("BUDGET") => (429, "insufficient_quota"),
        Code::ResourceExhausted => (429, "rate_limit_error"),
        Code::Unavailable => (503, "service_unavailable_error"),
        Code::DeadlineExceeded => (504, "timeout_error"),
        Code::Unimplemented => (501, "server_error"),
        Code::Ok | Code::Cancelled | Code::Unknown | Code::Internal | Code::DataLoss => {
            (500, "server_error")
        }
    }
}

/// The OpenAI error answer for a gRPC status, with its details read by
/// [`ApiError::from_status`].
pub fn from_status(status: &Status) -> OpenAiError {
    let error = ApiError::from_status(status);
    let (http, kind) = http_status(status.code(), error.reason());
    let retry_after = error.retry_after();
    let should_retry =
        (status.code() == Code::ResourceExhausted && retry_after.is_none()).then_some(false);
    OpenAiError {
        status: http,
        body: ErrorBody {
            error: ErrorObject {
                message: status.message().to_string(),
                kind: kind.to_string(),
                param: error
                    .field_violations()
                    .first()
                    .map(|(field, _)| field.clone()),
                code: Some(error.reason().to_string()),
            },
        },
        retry_after,
        should_retry,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn each_code_has_its_http_status() {
        let cases = [
            (Code::InvalidArgument, 400),
            (Code::Unauthenticated, 401),
            (Code::PermissionDenied, 403),
            (Code::NotFound, 404),
            (Code::Aborted, 409),
            (Code::FailedPrecondition, 422),
            (Code::ResourceExhausted, 429),
            (Code::Internal, 500),
            (Code::Unavailable, 503),
            (Code::DeadlineExceeded, 504),
        ];
        for (code, http) in cases {
            assert_eq!(http_status(code, "").0, http, "{code:?}");
        }
        assert_eq!(
            http_status(Code::ResourceExhausted, "BUDGET_EXHAUSTED").1,
            "insufficient_quota"
        );
    }

    #[test]
    fn details_become_param_code_and_retry_after() {
        let status: Status =
            ApiError::resource_exhausted("RATE_LIMITED", "tenant acme", "slow down")
                .with_retry_after(Duration::from_millis(1500))
                .into();
        let error = from_status(&status);
        assert_eq!(error.status, 429);
        assert_eq!(error.body.error.kind, "rate_limit_error");
        assert_eq!(error.body.error.code.as_deref(), Some("RATE_LIMITED"));
        assert_eq!(error.body.error.message, "slow down");
        assert_eq!(error.retry_after_secs(), Some(2));
        assert_eq!(error.retry_after_ms(), Some(1500));
        assert_eq!(error.should_retry, None);

        let status: Status = ApiError::invalid_argument("params.max_tokens", "too many").into();
        let error = from_status(&status);
        assert_eq!(error.status, 400);
        assert_eq!(error.body.error.param.as_deref(), Some("params.max_tokens"));

        let status: Status =
            ApiError::resource_exhausted("BUDGET_EXHAUSTED", "tenant acme", "spent").into();
        let error = from_status(&status);
        assert_eq!(
            error.should_retry,
            Some(false),
            "a spent budget is not retried"
        );
        assert_eq!(error.retry_after, None);

        let bare = from_status(&Status::internal("boom"));
        assert_eq!(bare.status, 500);
        assert_eq!(bare.body.error.code.as_deref(), Some("INTERNAL"));
    }
}
