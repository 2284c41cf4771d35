//! The one place where a failure becomes a `tonic::Status`.
//!
//! Handlers return domain errors; each domain error converts into an [`ApiError`], and
//! `Status::from(ApiError)` attaches the `google.rpc` details (via tonic-types) that clients and
//! Weir's own resilience layers read:
//!
//! - ErrorInfo, always: domain [`DOMAIN`] (`weir.dev`) and an UPPER_SNAKE reason such as
//!   `CIRCUIT_OPEN` or `BUDGET_EXHAUSTED`, with optional metadata.
//! - RetryInfo, when the caller should come back later (rate limits, upstream Retry-After,
//!   overload); the same delay is also sent as `grpc-retry-pushback-ms` so gRPC clients that
//!   implement gRFC A6 honour it.
//! - QuotaFailure, for RESOURCE_EXHAUSTED caused by a quota (rate limit, budget).
//! - BadRequest, for INVALID_ARGUMENT, naming each field and what is wrong with it.
//!
//! The mapping is lossless in both directions: [`ApiError::from_status`] reads the details back,
//! so an error that crosses several hops keeps its reason and retry delay.

use std::{collections::HashMap, fmt, time::Duration};

use tonic::{Code, Status, metadata::MetadataValue};
use tonic_types::{ErrorDetails, StatusExt};

use crate::metadata::RETRY_PUSHBACK_MS;

/// ErrorInfo domain of every error Weir produces.
pub const DOMAIN: &str = "weir.dev";

/// A failure on its way to becoming a `tonic::Status`: the code, an UPPER_SNAKE reason, a message
/// that tells the caller what to fix, and the details that apply.
///
/// It is one pointer wide (the fields live in a `Box`), so `Result<T, ApiError>` stays small on
/// the success path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError(Box<Inner>);

#[derive(Debug, Clone, PartialEq, Eq)]
struct Inner {
    code: Code,
    reason: String,
    message: String,
    metadata: HashMap<String, String>,
    retry_after: Option<Duration>,
    field_violations: Vec<(String, String)>,
    quota_violations: Vec<(String, String)>,
}

impl ApiError {
    /// A failure with the given code, reason (UPPER_SNAKE) and message.
    pub fn new(code: Code, reason: impl Into<String>, message: impl Into<String>) -> Self {
        Self(Box::new(Inner {
            code,
            reason: reason.into(),
            message: message.into(),
            metadata: HashMap::new(),
            retry_after: None,
            field_violations: Vec::new(),
            quota_violations: Vec::new(),
        }))
    }

    /// INVALID_ARGUMENT, reason `INVALID_ARGUMENT`, with a BadRequest violation naming `field`
    /// (a protobuf field path such as `params.max_tokens` or `messages[2].role`).
    pub fn invalid_argument(field: impl Into<String>, description: impl Into<String>) -> Self {
        let field = field.into();
        let description = description.into();
        Self::new(
            Code::InvalidArgument,
            "INVALID_ARGUMENT",
            format!("{field}: {description}"),
        )
        .with_field_violation(field, description)
    }

    /// NOT_FOUND, reason `<KIND>_NOT_FOUND`, e.g. `not_found("model", "gpt-9")`.
    pub fn not_found(kind: &str, name: impl fmt::Display) -> Self {
        Self::new(
            Code::NotFound,
            format!(
                "{}_NOT_FOUND",
                kind.to_ascii_uppercase().replace([' ', '-'], "_")
            ),
            format!("{kind} \"{name}\" not found"),
        )
    }

    /// UNAVAILABLE with the given reason: the caller may retry (elsewhere or later).
    pub fn unavailable(reason: impl Into<String>, message: impl Into<String>) -> Self {
        Self::new(Code::Unavailable, reason, message)
    }

    /// RESOURCE_EXHAUSTED with the given reason and a QuotaFailure violation for `subject`
    /// (what ran out, e.g. `tenant:acme` or `upstream:gpt-4o`).
    pub fn resource_exhausted(
        reason: impl Into<String>,
        subject: impl Into<String>,
        message: impl Into<String>,
    ) -> Self {
        let message = message.into();
        Self::new(Code::ResourceExhausted, reason, message.clone())
            .with_quota_violation(subject, message)
    }

    /// DEADLINE_EXCEEDED, reason `DEADLINE_EXCEEDED`.
    pub fn deadline_exceeded(message: impl Into<String>) -> Self {
        Self::new(Code::DeadlineExceeded, "DEADLINE_EXCEEDED", message)
    }

    /// INTERNAL, reason `INTERNAL`: a bug or an unexpected state, never the caller's fault.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(Code::Internal, "INTERNAL", message)
    }

    /// Adds a BadRequest field violation.
    pub fn with_field_violation(
        mut self,
        field: impl Into<String>,
        description: impl Into<String>,
    ) -> Self {
        self.0
            .field_violations
            .push((field.into(), description.into()));
        self
    }

    /// Adds a QuotaFailure violation.
    pub fn with_quota_violation(
        mut self,
        subject: impl Into<String>,
        description: impl Into<String>,
    ) -> Self {
        self.0
            .quota_violations
            .push((subject.into(), description.into()));
        self
    }

    /// Tells the caller to retry after `delay` (RetryInfo and `grpc-retry-pushback-ms`).
    pub fn with_retry_after(mut self, delay: Duration) -> Self {
        self.0.retry_after = Some(delay);
        self
    }

    /// Adds an ErrorInfo metadata entry (e.g. the upstream HTTP status, the model).
    pub fn with_metadata(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.0.metadata.insert(key.into(), value.into());
        self
    }

    /// The gRPC code.
    pub fn code(&self) -> Code {
        self.0.code
    }

    /// The ErrorInfo reason.
    pub fn reason(&self) -> &str {
        &self.0.reason
    }

    /// The message.
    pub fn message(&self) -> &str {
        &self.0.message
    }

    /// The retry delay, if any.
    pub fn retry_after(&self) -> Option<Duration> {
        self.0.retry_after
    }

    /// The ErrorInfo metadata.
    pub fn metadata(&self) -> &HashMap<String, String> {
        &self.0.metadata
    }

    /// The BadRequest field violations, as (field, description).
    pub fn field_violations(&self) -> &[(String, String)] {
        &self.0.field_violations
    }

    /// The QuotaFailure violations, as (subject, description).
    pub fn quota_violations(&self) -> &[(String, String)] {
        &self.0.quota_violations
    }

    /// Reads a `Status` back into an `ApiError`, keeping its details. A status without ErrorInfo
    /// (from a non-Weir server, or tonic itself) gets the code's name as its reason.
    pub fn from_status(status: &Status) -> Self {
        let details = status.get_error_details();
        let (reason, metadata) = match details.error_info() {
            Some(info) => (info.reason.clone(), info.metadata.clone()),
            None => (code_name(status.code()).to_string(), HashMap::new()),
        };
        let retry_after = details
            .retry_info()
            .and_then(|info| info.retry_delay)
            .or_else(|| pushback(status));
        Self(Box::new(Inner {
            code: status.code(),
            reason,
            message: status.message().to_string(),
            metadata,
            retry_after,
            field_violations: details
                .bad_request()
                .map(|b| {
                    b.field_violations
                        .iter()
                        .map(|v| (v.field.clone(), v.description.clone()))
                        .collect()
                })
                .unwrap_or_default(),
            quota_violations: details
                .quota_failure()
                .map(|q| {
                    q.violations
                        .iter()
                        .map(|v| (v.subject.clone(), v.description.clone()))
                        .collect()
                })
                .unwrap_or_default(),
        }))
    }
}

impl fmt::Display for ApiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} ({}): {}",
            code_name(self.0.code),
            self.0.reason,
            self.0.message
        )
    }
}

impl std::error::Error for ApiError {}

impl From<ApiError> for Status {
    fn from(error: ApiError) -> Self {
        let error = *error.0;
        let mut details = ErrorDetails::new();
        details.set_error_info(error.reason, DOMAIN, error.metadata);
        if let Some(delay) = error.retry_after {
            details.set_retry_info(Some(delay));
        }
        for (field, description) in error.field_violations {
            details.add_bad_request_violation(field, description);
        }
        for (subject, description) in error.quota_violations {
            details.add_quota_failure_violation(subject, description);
        }
        let mut status = Status::with_error_details(error.code, error.message, details);
        if let Some(delay) = error.retry_after {
            let millis = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX);
            if let Ok(value) = MetadataValue::try_from(millis.to_string()) {
                status.metadata_mut().insert(RETRY_PUSHBACK_MS, value);
            }
        }
        status
    }
}

/// The `grpc-retry-pushback-ms` of a status, if present and non-negative.
pub fn pushback(status: &Status) -> Option<Duration> {
    let value = status.metadata().get(RETRY_PUSHBACK_MS)?.to_str().ok()?;
    let millis: i64 = value.trim().parse().ok()?;
    u64::try_from(millis).ok().map(Duration::from_millis)
}

/// The canonical UPPER_SNAKE name of a gRPC code.
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// Parses a gRPC code from its UPPER_SNAKE or lower_snake name (as used in config files).
pub fn parse_code(name: &str) -> Option<Code> {
    let upper = name.trim().to_ascii_uppercase();
    (0..=16)
        .map(Code::from_i32)
        .find(|code| code_name(*code) == upper)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_round_trip_keeps_every_detail() {
        let error = ApiError::resource_exhausted("RATE_LIMITED", "tenant:acme", "slow down")
            .with_retry_after(Duration::from_millis(1500))
            .with_metadata("limit", "10/s");
        let status = Status::from(error.clone());
        assert_eq!(status.code(), Code::ResourceExhausted);
        assert_eq!(pushback(&status), Some(Duration::from_millis(1500)));
        let back = ApiError::from_status(&status);
        assert_eq!(back, error);
    }

    #[test]
    fn invalid_argument_names_the_field() {
        let status = Status::from(ApiError::invalid_argument(
            "params.max_tokens",
            "must be positive, got -1",
        ));
        assert_eq!(status.code(), Code::InvalidArgument);
        assert!(status.message().contains("params.max_tokens"));
        let details = status.get_error_details();
        let bad = details
            .bad_request()
            .map(|b| b.field_violations[0].field.clone());
        assert_eq!(bad.as_deref(), Some("params.max_tokens"));
        assert_eq!(
            details.error_info().map(|i| i.domain.as_str()),
            Some(DOMAIN)
        );
    }

    #[test]
    fn foreign_status_gets_code_name_as_reason() {
        let back = ApiError::from_status(&Status::unavailable("down"));
        assert_eq!(back.reason(), "UNAVAILABLE");
        assert_eq!(back.retry_after(), None);
    }

    #[test]
    fn codes_parse_from_config_names() {
        assert_eq!(parse_code("unavailable"), Some(Code::Unavailable));
        assert_eq!(
            parse_code("RESOURCE_EXHAUSTED"),
            Some(Code::ResourceExhausted)
        );
        assert_eq!(parse_code("nope"), None);
    }
}
