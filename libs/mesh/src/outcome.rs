//! How an attempt ended, as a client-side layer sees it from the response *headers*.
//!
//! The client layers (retry, circuit breaker, bulkhead, per-attempt timeout) sit between tonic's
//! generated client and the channel, where a call is an `http::Request` and its answer an
//! `http::Response` whose body they do not read. They must all agree on what an attempt's result
//! was, so the rule lives here, once:
//!
//! - `Err(error)` from the inner service: the attempt never got an answer. If the error chain holds
//!   a `tonic::Status` (a rejection by a layer below, such as `BULKHEAD_FULL` or an attempt
//!   timeout's `DEADLINE_EXCEEDED`), that status's code; otherwise (a transport failure: refused
//!   connection, reset stream) UNAVAILABLE, as tonic's own client reports it.
//! - `Ok(response)` whose headers carry `grpc-status`: a *trailers-only* response, the way gRPC
//!   servers (tonic included) answer an error before sending any message. Its code is that
//!   status; `grpc-retry-pushback-ms` is read from the same headers.
//! - `Ok(response)` with HTTP 200 and no `grpc-status`: the call has **started**. Its code here is
//!   OK: for a unary call the final status follows in the trailers, for a stream after the last
//!   message, and these layers do not wait for either (a retry must never happen after the first
//!   response byte anyway, and time to first byte is what the breaker measures).
//! - `Ok(response)` with another HTTP status and no `grpc-status`: not a gRPC answer (a proxy or a
//!   load balancer spoke); the code follows gRPC's HTTP-to-gRPC mapping (`429`, `502`, `503`,
//!   `504` → UNAVAILABLE, `401` → UNAUTHENTICATED, ...).

use std::{error::Error, time::Duration};

use tonic::{Code, Status};

use crate::metadata::RETRY_PUSHBACK_MS;

/// The header carrying a trailers-only response's gRPC code.
pub const GRPC_STATUS: &str = "grpc-status";

/// The result of one attempt as far as its response headers tell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    /// `Code::Ok` when the response started (or ended OK without messages); otherwise the code
    /// the attempt failed with.
    pub code: Code,
    /// The server's retry pushback (gRFC A6), if it sent one.
    pub pushback: Pushback,
}

impl Outcome {
    /// Whether the call started (or finished OK): nothing to retry, a success for the breaker.
    pub fn is_ok(&self) -> bool {
        self.code == Code::Ok
    }
}

/// What the server said about retrying, from `grpc-retry-pushback-ms` (gRFC A6).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Pushback {
    /// No pushback header: the client's own backoff applies.
    #[default]
    None,
    /// A value ≥ 0: retry after exactly this long (it replaces the backoff).
    After(Duration),
    /// A negative or unparsable value: the server asks not to retry.
    Stop,
}

impl Pushback {
    /// Reads a `grpc-retry-pushback-ms` value (absent → [`Pushback::None`]).
    pub fn parse(value: Option<&[u8]>) -> Self {
        let Some(value) = value else {
            return Self::None;
        };
        let millis = std::str::from_utf8(value)
            .ok()
            .and_then(|v| v.trim().parse::<i64>().ok());
        match millis.map(u64::try_from) {
            Some(Ok(millis)) => Self::After(Duration::from_millis(millis)),
            _ => Self::Stop,
        }
    }
}

/// Classifies an attempt's result; see the [module docs](self) for the rules.
pub fn classify<B>(result: &Result<http::Response<B>, tower::BoxError>) -> Outcome {
    match result {
        Ok(response) => classify_response(response),
        Err(error) => classify_error(&**error),
    }
}

/// Classifies a response from its headers.
pub fn classify_response<B>(response: &http::Response<B>) -> Outcome {
    let headers = response.headers();
    let pushback = Pushback::parse(headers.get(RETRY_PUSHBACK_MS).map(|v| v.as_bytes()));
    let code =
        crate::rpc::grpc_status(headers).unwrap_or_else(|| code_of_http_status(response.status()));
    Outcome { code, pushback }
}

/// Classifies an error from the inner service: the first `tonic::Status` in its source chain, or
/// UNAVAILABLE (a transport failure).
///
/// tonic's own `TimeoutExpired` (a channel that ran out the `grpc-timeout` it was given) is
/// DEADLINE_EXCEEDED, not a transport failure: the attempt timed out, and neither the retry layer
/// (timeouts are not retried) nor the breaker (a timeout is a failure either way) should read it as
/// the backend being unreachable.
pub fn classify_error(error: &(dyn Error + 'static)) -> Outcome {
    if crate::deadline::is_tonic_timeout(error) {
        return Outcome {
            code: Code::DeadlineExceeded,
            pushback: Pushback::None,
        };
    }
    match find_status(error) {
        Some(status) => Outcome {
            code: status.code(),
            pushback: Pushback::parse(
                status
                    .metadata()
                    .get(RETRY_PUSHBACK_MS)
                    .map(|v| v.as_bytes()),
            ),
        },
        None => Outcome {
            code: Code::Unavailable,
            pushback: Pushback::None,
        },
    }
}

/// The first `tonic::Status` in an error's source chain (what tonic's client will surface).
pub fn find_status<'a>(error: &'a (dyn Error + 'static)) -> Option<&'a Status> {
    let mut source = Some(error);
    while let Some(error) = source {
        if let Some(status) = error.downcast_ref::<Status>() {
            return Some(status);
        }
        source = error.source();
    }
    None
}

/// gRPC's mapping of an HTTP status without `grpc-status` to a code
/// (grpc/doc/http-grpc-status-mapping.md); 200 means the call started.
fn code_of_http_status(status: http::StatusCode) -> Code {
    match status.as_u16() {
        200 => Code::Ok,
        400 => Code::Internal,
        401 => Code::Unauthenticated,
        403 => Code::PermissionDenied,
        404 => Code::Unimplemented,
        429 | 502 | 503 | 504 => Code::Unavailable,
        _ => Code::Unknown,
    }
}

/// Whether `error` is a refusal made by a layer of this process before any call went out: an open
/// circuit ([`crate::breaker::CircuitOpen`]) or a full bulkhead ([`crate::bulkhead::BulkheadFull`]).
///
/// Such a refusal says the backend is closed to us for a while, so retrying the same backend after
/// a backoff is pointless (the retry layer returns it at once) and the caller's fallback should move
/// on instead; and the breaker does not count our own bulkhead's refusals against the backend.
pub fn is_local_rejection(error: &(dyn Error + 'static)) -> bool {
    find_status(error)
        .and_then(|status| status.source())
        .is_some_and(|source| {
            source.is::<crate::breaker::CircuitOpen>()
                || source.is::<crate::bulkhead::BulkheadFull>()
        })
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::ApiError;

    fn response(headers: &[(&'static str, &'static str)], status: u16) -> http::Response<()> {
        let mut builder = http::Response::builder().status(status);
        for (name, value) in headers {
            builder = builder.header(*name, *value);
        }
        builder.body(()).unwrap()
    }

    #[test]
    fn started_response_is_ok() {
        let outcome = classify_response(&response(&[], 200));
        assert!(outcome.is_ok());
        assert_eq!(outcome.pushback, Pushback::None);
    }

    #[test]
    fn trailers_only_response_carries_code_and_pushback() {
        let outcome = classify_response(&response(
            &[("grpc-status", "14"), ("grpc-retry-pushback-ms", "250")],
            200,
        ));
        assert_eq!(outcome.code, Code::Unavailable);
        assert_eq!(
            outcome.pushback,
            Pushback::After(Duration::from_millis(250))
        );
        let stop = classify_response(&response(
            &[("grpc-status", "8"), ("grpc-retry-pushback-ms", "-1")],
            200,
        ));
        assert_eq!(stop.code, Code::ResourceExhausted);
        assert_eq!(stop.pushback, Pushback::Stop);
        let garbage = classify_response(&response(
            &[("grpc-status", "x"), ("grpc-retry-pushback-ms", "soon")],
            200,
        ));
        assert_eq!(garbage.code, Code::Unknown);
        assert_eq!(garbage.pushback, Pushback::Stop);
    }

    #[test]
    fn non_grpc_http_status_follows_the_grpc_mapping() {
        assert_eq!(
            classify_response(&response(&[], 503)).code,
            Code::Unavailable
        );
        assert_eq!(
            classify_response(&response(&[], 404)).code,
            Code::Unimplemented
        );
        assert_eq!(classify_response(&response(&[], 500)).code, Code::Unknown);
    }

    #[test]
    fn errors_are_unavailable_unless_they_hold_a_status() {
        let transport: tower::BoxError = "connection refused".into();
        let result: Result<http::Response<()>, _> = Err(transport);
        assert_eq!(classify(&result).code, Code::Unavailable);

        let status = Status::from(
            ApiError::deadline_exceeded("attempt timed out")
                .with_retry_after(Duration::from_millis(5)),
        );
        let result: Result<http::Response<()>, tower::BoxError> = Err(Box::new(status));
        let outcome = classify(&result);
        assert_eq!(outcome.code, Code::DeadlineExceeded);
        assert_eq!(outcome.pushback, Pushback::After(Duration::from_millis(5)));
    }

    #[test]
    fn tonic_channel_timeouts_are_deadline_exceeded() {
        let error: tower::BoxError = Box::new(tonic::TimeoutExpired(()));
        assert_eq!(classify_error(&*error).code, Code::DeadlineExceeded);
    }

    #[test]
    fn open_circuits_and_full_bulkheads_are_local_rejections() {
        let open = crate::breaker::CircuitOpen {
            backend: crate::backend::BackendKey::new("m"),
            retry_after: std::time::Duration::from_secs(5),
        };
        let error: tower::BoxError = Box::new(open.into_status());
        assert!(is_local_rejection(&*error));
        let full = crate::bulkhead::BulkheadFull {
            backend: crate::backend::BackendKey::new("m"),
            limit: 1,
        };
        let error: tower::BoxError = Box::new(full.into_status());
        assert!(is_local_rejection(&*error));
        let remote: tower::BoxError = Box::new(Status::from(ApiError::unavailable(
            "CIRCUIT_OPEN",
            "a server's own breaker, not ours",
        )));
        assert!(!is_local_rejection(&*remote));
    }
}
