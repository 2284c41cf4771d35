//! Upstream failures, and the one place they become statuses: [`api_error`].
//!
//! Everything that can go wrong talking to an upstream is an [`UpstreamError`]; the statuses
//! callers get are:
//!
//! | upstream                          | status              | reason                        |
//! |-----------------------------------|---------------------|-------------------------------|
//! | HTTP 429                          | RESOURCE_EXHAUSTED  | `UPSTREAM_RATE_LIMITED` (+ RetryInfo from `retry-after-ms` / `Retry-After`, QuotaFailure `upstream:<model>`) |
//! | HTTP 5xx                          | UNAVAILABLE         | `UPSTREAM_UNAVAILABLE`        |
//! | HTTP 400, 413, 422                | INVALID_ARGUMENT    | `UPSTREAM_REJECTED` (the upstream's message) |
//! | HTTP 401, 403                     | UNAVAILABLE         | `UPSTREAM_AUTH_FAILED` (the operator must fix the key; a router may fall back) |
//! | HTTP 404                          | FAILED_PRECONDITION | `UPSTREAM_MODEL_NOT_FOUND`    |
//! | HTTP 408, or the configured timeout | UNAVAILABLE       | `UPSTREAM_TIMEOUT`            |
//! | other HTTP statuses               | UNKNOWN             | `UPSTREAM_ERROR`              |
//! | connection refused, DNS, TLS      | UNAVAILABLE         | `UPSTREAM_UNREACHABLE`        |
//! | malformed JSON or event stream    | UNAVAILABLE         | `UPSTREAM_MALFORMED_RESPONSE` |
//! | an error event inside a stream    | UNAVAILABLE         | `UPSTREAM_UNAVAILABLE`        |
//! | a stream ending without `[DONE]` or a finish reason, or breaking off | UNAVAILABLE | `STREAM_CUT` |
//!
//! Every one carries ErrorInfo metadata `model` and, for HTTP errors, `http_status`.

use std::{
    error::Error as StdError,
    time::{Duration, SystemTime},
};

use reqwest::{StatusCode, header::HeaderMap};
use tonic::Code;
use weir_mesh::ApiError;

use super::{read_capped, wire::ErrorBody, wire::ErrorDetail};

/// Largest error body read; the rest is ignored (64 KiB).
pub const MAX_ERROR_BODY_BYTES: usize = 64 << 10;
/// Longest upstream error message quoted in a status.
pub const MAX_ERROR_MESSAGE_CHARS: usize = 500;

/// A failure talking to the upstream, before it becomes a status in [`api_error`].
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum UpstreamError {
    /// `api_key_env` names a variable that is unset or empty.
    #[error("environment variable {0} (api_key_env) is not set")]
    MissingApiKey(String),
    /// The model cannot be called as configured.
    #[error("{0}")]
    Misconfigured(String),
    /// The upstream answered with a non-success HTTP status.
    #[error("HTTP {status}: {message}")]
    Http {
        /// The HTTP status code.
        status: u16,
        /// The upstream's error message (or the start of its body).
        message: String,
        /// The request parameter the upstream blamed (OpenAI's `error.param`).
        param: Option<String>,
        /// When to come back, from `retry-after-ms` or `Retry-After`.
        retry_after: Option<Duration>,
    },
    /// No connection could be made (refused, DNS, TLS, connect timeout).
    #[error("cannot connect: {0}")]
    Unreachable(String),
    /// The connection failed while sending the request or waiting for the response.
    #[error("request failed: {0}")]
    Transport(String),
    /// The configured timeout passed.
    #[error("no complete answer within the configured timeout of {0:?}")]
    Timeout(Duration),
    /// The response is not what the protocol says.
    #[error("malformed response: {0}")]
    Malformed(String),
    /// The upstream reported an error inside the event stream.
    #[error("error in the event stream: {0}")]
    StreamError(String),
    /// The stream broke off before the answer was complete.
    #[error("the stream broke off after {chunks} content chunks: {detail}")]
    Cut {
        /// Content chunks received before the cut.
        chunks: u64,
        /// What happened.
        detail: String,
    },
}

/// Turns an upstream failure of model `model` (sent upstream as `upstream_model`) into the status
/// the caller gets; see the module doc for the table.
pub fn api_error(
    error: UpstreamError,
    model: &str,
    upstream_model: &str,
    api_key_env: Option<&str>,
) -> ApiError {
    let text = error.to_string();
    let api = match error {
        UpstreamError::MissingApiKey(var) => ApiError::new(
            Code::FailedPrecondition,
            "UPSTREAM_API_KEY_MISSING",
            format!(
                "model {model} needs an API key in the environment variable {var} \
                 (models.{model}.openai.api_key_env), which is not set in the inference \
                 service's environment"
            ),
        ),
        UpstreamError::Misconfigured(detail) => ApiError::new(
            Code::FailedPrecondition,
            "MODEL_MISCONFIGURED",
            format!("model {model} cannot be called: {detail}"),
        ),
        UpstreamError::Http {
            status,
            message,
            param,
            retry_after,
        } => {
            let mut api = match status {
                429 => ApiError::resource_exhausted(
                    "UPSTREAM_RATE_LIMITED",
                    format!("upstream:{model}"),
                    format!("the upstream rate-limited model {model} (HTTP 429): {message}"),
                ),
                400 | 413 | 422 => {
                    let api = ApiError::new(
                        Code::InvalidArgument,
                        "UPSTREAM_REJECTED",
                        format!(
                            "the upstream rejected the request for model {model} (HTTP \
                             {status}): {message}"
                        ),
                    );
                    match param {
                        Some(param) => api.with_field_violation(param, message),
                        None => api,
                    }
                }
                401 | 403 => {
                    let key = api_key_env.map_or_else(
                        || {
                            "no API key is configured (models.<name>.openai.api_key_env)"
                                .to_string()
                        },
                        |var| format!("the key comes from {var}"),
                    );
                    ApiError::unavailable(
                        "UPSTREAM_AUTH_FAILED",
                        format!(
                            "the upstream refused Weir's credentials for model {model} (HTTP \
                             {status}): {message}; the operator must fix the API key ({key})"
                        ),
                    )
                }
                404 => ApiError::new(
                    Code::FailedPrecondition,
                    "UPSTREAM_MODEL_NOT_FOUND",
                    format!(
                        "the upstream has no model \"{upstream_model}\" for model {model} (HTTP \
                         404): {message}; check models.{model}.openai.base_url and upstream_model"
                    ),
                ),
                408 => ApiError::unavailable(
                    "UPSTREAM_TIMEOUT",
                    format!("the upstream timed out serving model {model} (HTTP 408): {message}"),
                ),
                500..=599 => ApiError::unavailable(
                    "UPSTREAM_UNAVAILABLE",
                    format!("the upstream failed serving model {model} (HTTP {status}): {message}"),
                ),
                _ => ApiError::new(
                    Code::Unknown,
                    "UPSTREAM_ERROR",
                    format!("the upstream answered HTTP {status} for model {model}: {message}"),
                ),
            };
            if let Some(delay) = retry_after
                && matches!(api.code(), Code::ResourceExhausted | Code::Unavailable)
            {
                api = api.with_retry_after(delay);
            }
            api.with_metadata("http_status", status.to_string())
        }
        UpstreamError::Unreachable(_) => {
            ApiError::unavailable("UPSTREAM_UNREACHABLE", format!("model {model}: {text}"))
        }
        UpstreamError::Transport(_) | UpstreamError::StreamError(_) => {
            ApiError::unavailable("UPSTREAM_UNAVAILABLE", format!("model {model}: {text}"))
        }
        UpstreamError::Timeout(_) => {
            ApiError::unavailable("UPSTREAM_TIMEOUT", format!("model {model}: {text}"))
        }
        UpstreamError::Malformed(_) => ApiError::unavailable(
            "UPSTREAM_MALFORMED_RESPONSE",
            format!("model {model}: {text}"),
        ),
        UpstreamError::Cut { .. } => {
            ApiError::unavailable("STREAM_CUT", format!("model {model}: {text}"))
        }
    };
    api.with_metadata("model", model)
}

/// The delay an HTTP error response asks for: OpenAI's `retry-after-ms` (milliseconds, possibly
/// fractional), else `Retry-After` as seconds or as an HTTP date (relative to `now`; a date in the
/// past means "now").
pub fn retry_after(headers: &HeaderMap, now: SystemTime) -> Option<Duration> {
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
    };
    if let Some(millis) = header("retry-after-ms").and_then(|v| v.parse::<f64>().ok())
        && let Ok(delay) = Duration::try_from_secs_f64(millis / 1000.0)
    {
        return Some(delay);
    }
    let value = header("retry-after")?;
    if let Ok(seconds) = value.parse::<f64>() {
        return Duration::try_from_secs_f64(seconds).ok();
    }
    let date = httpdate::parse_http_date(value).ok()?;
    Some(date.duration_since(now).unwrap_or(Duration::ZERO))
}

/// The error of a request that got no response.
pub(super) fn send_error(error: &reqwest::Error) -> UpstreamError {
    if error.is_connect() {
        UpstreamError::Unreachable(chain(error))
    } else {
        UpstreamError::Transport(chain(error))
    }
}

/// The error of a non-success response, with the upstream's message.
pub(super) async fn http_error(response: reqwest::Response) -> UpstreamError {
    let status = response.status();
    let retry_after = retry_after(response.headers(), SystemTime::now());
    let body = read_capped(response, MAX_ERROR_BODY_BYTES)
        .await
        .unwrap_or_default();
    let (message, param) = error_message(status, &body);
    UpstreamError::Http {
        status: status.as_u16(),
        message,
        param,
        retry_after,
    }
}

/// The message (and blamed parameter) of an error body: OpenAI's `{"error": {"message", "param"}}`,
/// vLLM's `{"message"}`, FastAPI's `{"detail"}`, or the text itself.
fn error_message(status: StatusCode, body: &[u8]) -> (String, Option<String>) {
    let parsed: Option<ErrorBody> = serde_json::from_slice(body).ok();
    let (message, param) = match parsed {
        Some(ErrorBody {
            error: Some(ErrorDetail { message, param }),
            ..
        }) => (message, param),
        Some(ErrorBody {
            message: Some(message),
            ..
        }) => (Some(message), None),
        Some(ErrorBody {
            detail: Some(detail),
            ..
        }) => (Some(json_text(&detail)), None),
        _ => (None, None),
    };
    let message = message.filter(|m| !m.trim().is_empty()).unwrap_or_else(|| {
        let text = String::from_utf8_lossy(body);
        let text = text.trim();
        if text.is_empty() {
            status
                .canonical_reason()
                .unwrap_or("no error message")
                .to_string()
        } else {
            text.to_string()
        }
    });
    (truncate(&message, MAX_ERROR_MESSAGE_CHARS), param)
}

fn json_text(value: &serde_json::Value) -> String {
    match value {
        serde_json::Value::String(text) => text.clone(),
        other => other.to_string(),
    }
}

pub(super) fn truncate(text: &str, max_chars: usize) -> String {
    match text.char_indices().nth(max_chars) {
        Some((end, _)) => format!("{}…", &text[..end]),
        None => text.to_string(),
    }
}

/// An error and its sources, `outer: inner: innermost`.
pub(super) fn chain(error: &dyn StdError) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use reqwest::header::HeaderValue;

    use super::*;

    fn http(status: u16, message: &str) -> UpstreamError {
        http_with(status, message, None, None)
    }

    fn http_with(
        status: u16,
        message: &str,
        param: Option<&str>,
        retry_after: Option<Duration>,
    ) -> UpstreamError {
        UpstreamError::Http {
            status,
            message: message.to_string(),
            param: param.map(str::to_string),
            retry_after,
        }
    }

    fn map(error: UpstreamError) -> ApiError {
        api_error(error, "gpt", "gpt-4o", Some("OPENAI_API_KEY"))
    }

    #[test]
    fn rate_limits_are_resource_exhausted_with_retry_info_and_quota() {
        let error = map(http_with(
            429,
            "slow down",
            None,
            Some(Duration::from_secs(2)),
        ));
        assert_eq!(error.code(), Code::ResourceExhausted);
        assert_eq!(error.reason(), "UPSTREAM_RATE_LIMITED");
        assert_eq!(error.retry_after(), Some(Duration::from_secs(2)));
        assert_eq!(error.quota_violations()[0].0, "upstream:gpt");
        assert_eq!(
            error.metadata().get("http_status").map(String::as_str),
            Some("429")
        );
        assert!(error.message().contains("slow down"));
    }

    #[test]
    fn every_status_has_its_code_and_reason() {
        for (status, code, reason) in [
            (500, Code::Unavailable, "UPSTREAM_UNAVAILABLE"),
            (502, Code::Unavailable, "UPSTREAM_UNAVAILABLE"),
            (503, Code::Unavailable, "UPSTREAM_UNAVAILABLE"),
            (400, Code::InvalidArgument, "UPSTREAM_REJECTED"),
            (413, Code::InvalidArgument, "UPSTREAM_REJECTED"),
            (422, Code::InvalidArgument, "UPSTREAM_REJECTED"),
            (401, Code::Unavailable, "UPSTREAM_AUTH_FAILED"),
            (403, Code::Unavailable, "UPSTREAM_AUTH_FAILED"),
            (404, Code::FailedPrecondition, "UPSTREAM_MODEL_NOT_FOUND"),
            (408, Code::Unavailable, "UPSTREAM_TIMEOUT"),
            (409, Code::Unknown, "UPSTREAM_ERROR"),
        ] {
            let error = map(http(status, "boom"));
            assert_eq!(
                (error.code(), error.reason()),
                (code, reason),
                "HTTP {status}"
            );
            assert_eq!(
                error.metadata().get("http_status"),
                Some(&status.to_string())
            );
            assert_eq!(
                error.metadata().get("model").map(String::as_str),
                Some("gpt")
            );
            assert!(error.message().contains("boom"), "{}", error.message());
        }
    }

    #[test]
    fn messages_tell_the_operator_what_to_fix() {
        let auth = map(http(401, "Incorrect API key provided"));
        assert!(auth.message().contains("operator must fix the API key"));
        assert!(auth.message().contains("OPENAI_API_KEY"));
        let missing = map(http(404, "The model does not exist"));
        assert!(missing.message().contains("\"gpt-4o\""));
        let key = map(UpstreamError::MissingApiKey("OPENAI_API_KEY".to_string()));
        assert_eq!(key.code(), Code::FailedPrecondition);
        assert_eq!(key.reason(), "UPSTREAM_API_KEY_MISSING");
        assert!(key.message().contains("OPENAI_API_KEY"));
    }

    #[test]
    fn rejected_requests_name_the_upstream_parameter() {
        let error = map(http_with(400, "messages too long", Some("messages"), None));
        assert_eq!(
            error.field_violations(),
            [("messages".to_string(), "messages too long".to_string())]
        );
        // Retry-After only matters when a retry could help.
        let error = map(http_with(400, "no", None, Some(Duration::from_secs(1))));
        assert_eq!(error.retry_after(), None);
        let error = map(http_with(503, "busy", None, Some(Duration::from_secs(1))));
        assert_eq!(error.retry_after(), Some(Duration::from_secs(1)));
    }

    #[test]
    fn transport_failures_map_to_unavailable_reasons() {
        for (error, reason) in [
            (
                UpstreamError::Unreachable("refused".into()),
                "UPSTREAM_UNREACHABLE",
            ),
            (
                UpstreamError::Transport("reset".into()),
                "UPSTREAM_UNAVAILABLE",
            ),
            (
                UpstreamError::Timeout(Duration::from_secs(60)),
                "UPSTREAM_TIMEOUT",
            ),
            (
                UpstreamError::Malformed("not json".into()),
                "UPSTREAM_MALFORMED_RESPONSE",
            ),
            (
                UpstreamError::StreamError("overloaded".into()),
                "UPSTREAM_UNAVAILABLE",
            ),
            (
                UpstreamError::Cut {
                    chunks: 3,
                    detail: "closed".into(),
                },
                "STREAM_CUT",
            ),
        ] {
            let error = map(error);
            assert_eq!((error.code(), error.reason()), (Code::Unavailable, reason));
        }
    }

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.insert(*name, HeaderValue::from_str(value).unwrap());
        }
        map
    }

    #[test]
    fn retry_after_in_seconds_milliseconds_or_as_a_date() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        assert_eq!(retry_after(&headers(&[]), now), None);
        assert_eq!(
            retry_after(&headers(&[("retry-after", "2")]), now),
            Some(Duration::from_secs(2))
        );
        assert_eq!(
            retry_after(&headers(&[("retry-after", " 1.5 ")]), now),
            Some(Duration::from_millis(1500))
        );
        assert_eq!(
            retry_after(
                &headers(&[("retry-after-ms", "250"), ("retry-after", "1")]),
                now
            ),
            Some(Duration::from_millis(250))
        );
        let date = httpdate::fmt_http_date(now + Duration::from_secs(30));
        assert_eq!(
            retry_after(&headers(&[("retry-after", &date)]), now),
            Some(Duration::from_secs(30))
        );
        let past = httpdate::fmt_http_date(now - Duration::from_secs(30));
        assert_eq!(
            retry_after(&headers(&[("retry-after", &past)]), now),
            Some(Duration::ZERO)
        );
        assert_eq!(retry_after(&headers(&[("retry-after", "soon")]), now), None);
        assert_eq!(retry_after(&headers(&[("retry-after", "-1")]), now), None);
        // An unusable retry-after-ms falls back to Retry-After.
        assert_eq!(
            retry_after(
                &headers(&[("retry-after-ms", "x"), ("retry-after", "3")]),
                now
            ),
            Some(Duration::from_secs(3))
        );
    }

    #[test]
    fn error_bodies_of_every_flavour() {
        let status = StatusCode::BAD_REQUEST;
        assert_eq!(
            error_message(
                status,
                br#"{"error":{"message":"bad temperature","type":"invalid_request_error","param":"temperature","code":null}}"#
            ),
            ("bad temperature".to_string(), Some("temperature".to_string()))
        );
        assert_eq!(
            error_message(status, br#"{"object":"error","message":"vllm says no"}"#).0,
            "vllm says no"
        );
        assert_eq!(
            error_message(status, br#"{"detail":[{"msg":"field required"}]}"#).0,
            r#"[{"msg":"field required"}]"#
        );
        assert_eq!(error_message(status, b"plain text\n").0, "plain text");
        assert_eq!(error_message(status, b"").0, "Bad Request");
        let long = "x".repeat(2000);
        assert_eq!(
            error_message(status, long.as_bytes()).0.chars().count(),
            MAX_ERROR_MESSAGE_CHARS + 1
        );
    }
}
