//! Failure classification: how a call or an attempt ended, and what that says about whom.
//!
//! Breaker, retry, admission, bulkhead and the inference service's per-model breakers all ask the
//! same two questions of a finished call: *what code did it end with*, and *whose fault was it*.
//! The rules live here, once, in a leaf module that depends on none of those layers (the layers
//! mark their own refusals with [`Local`], a type defined here, instead of this module knowing
//! their error types).
//!
//! # Classes
//!
//! | class | codes and conditions | breaker | admission limit |
//! |---|---|---|---|
//! | [`Class::Success`] | OK (for a tower layer: the response started) | success | sample |
//! | [`Class::BackendFailure`] | UNAVAILABLE, INTERNAL, UNKNOWN, DATA_LOSS, transport errors; DEADLINE_EXCEEDED from our own attempt timeout ([`ATTEMPT_TIMEOUT`]) or from an upstream while the caller still had time | failure | sample |
//! | [`Class::BackendBusy`] | UNAVAILABLE from elsewhere with reason [`OVERLOADED`] or [`BULKHEAD_FULL`]: the backend works but refused the call for load | ignored | sample |
//! | [`Class::CallerGone`] | DEADLINE_EXCEEDED when the caller's deadline has passed (within [`CALLER_GONE_SLACK`]), tonic's `TimeoutExpired`, CANCELLED, a dropped call | ignored | no sample |
//! | [`Class::LocalRejection`] | a refusal by a layer of this process ([`Local::Rejected`]: open circuit, full bulkhead, shed `OVERLOADED`, rate limited, auth) | ignored | no sample |
//! | [`Class::CallerError`] | every other code: INVALID_ARGUMENT, NOT_FOUND, ALREADY_EXISTS, PERMISSION_DENIED, UNAUTHENTICATED, RESOURCE_EXHAUSTED, FAILED_PRECONDITION, ABORTED, OUT_OF_RANGE, UNIMPLEMENTED | ignored | no sample |
//!
//! A call that ends because its caller's deadline passed, or because the caller went away, says
//! nothing about the backend or about overload: counting it would let one impatient tenant open a
//! healthy backend's breaker, or shrink a server's concurrency limit, for everybody.
//!
//! # Telling a caller's deadline from a backend's timeout
//!
//! - Our own per-attempt timeout ([`crate::timeout`]) fails an attempt whose bound was the attempt
//!   timeout with DEADLINE_EXCEEDED, reason [`ATTEMPT_TIMEOUT`], marked [`Local::AttemptTimeout`]:
//!   always a backend failure (the backend hung while the caller still had time).
//! - Any other DEADLINE_EXCEEDED (our per-attempt timeout bound by the caller's deadline, our
//!   deadline layer, or the next hop answering because the `grpc-timeout` we sent ran out) is
//!   compared with the call's deadline: if that deadline is less than [`CALLER_GONE_SLACK`] away
//!   (or past), the caller's time ran out: caller gone. Otherwise an upstream timed out on its own
//!   while we still had time: a backend failure. Without a known deadline it is a backend failure.
//!
//! # Reading an attempt's result from the response *headers*
//!
//! The client layers sit between tonic's generated client and the channel, where a call is an
//! `http::Request` and its answer an `http::Response` whose body they do not read:
//!
//! - `Err(error)` from the inner service: the attempt never got an answer. If the error chain holds
//!   a `tonic::Status` (a rejection by a layer below, such as `BULKHEAD_FULL` or an attempt
//!   timeout's `DEADLINE_EXCEEDED`), that status's code; tonic's `TimeoutExpired` is
//!   DEADLINE_EXCEEDED; otherwise (a transport failure: refused connection, reset stream)
//!   UNAVAILABLE, as tonic's own client reports it.
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
//!
//! See `docs/resilience.md` for how the layers use these classes.

use std::{error::Error, sync::Arc, time::Duration};

use tokio::time::Instant;
use tonic::{Code, Status};

use crate::metadata::RETRY_PUSHBACK_MS;

/// The header carrying a trailers-only response's gRPC code.
pub const GRPC_STATUS: &str = "grpc-status";

/// ErrorInfo reason of a DEADLINE_EXCEEDED raised by our own per-attempt timeout when its bound
/// was the attempt timeout (not the caller's deadline): the backend hung while the caller still
/// had time, a backend failure.
pub const ATTEMPT_TIMEOUT: &str = "ATTEMPT_TIMEOUT";

/// ErrorInfo reason of a request shed by a server's admission control ([`crate::admission`]).
pub const OVERLOADED: &str = "OVERLOADED";
/// ErrorInfo reason of a call refused by a full bulkhead ([`crate::bulkhead`]).
pub const BULKHEAD_FULL: &str = "BULKHEAD_FULL";

/// How close to the caller's deadline a DEADLINE_EXCEEDED must arrive to be the caller's deadline
/// running out rather than an upstream's own timeout: 20 ms.
///
/// The next hop answers a little *before* our deadline: the client deadline layer sends
/// `grpc-timeout` 5 ms short ([`crate::deadline::DEFAULT_MARGIN`]) and the server answers 5 ms
/// before that runs out ([`crate::deadline::SERVER_ANSWER_LEAD`]); the rest covers the answer's
/// transit and tokio's 1 ms timer granularity on one host or a fast network. A backend that times
/// out on its own within 20 ms of the caller's deadline is (harmlessly) not counted against it.
pub const CALLER_GONE_SLACK: Duration = Duration::from_millis(20);

/// Whose fault a finished call was; see the [module docs](self) for the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Class {
    /// OK (or, for a tower layer, the response started).
    Success,
    /// The backend failed or hung while the caller still wanted the answer.
    BackendFailure,
    /// The backend is working but refused the call for load: UNAVAILABLE with reason
    /// [`OVERLOADED`] (its admission control shed it) or [`BULKHEAD_FULL`] (one of its
    /// bulkheads was full). Its pushback says when to come back; a breaker that opened on it
    /// would turn the backend's partial shedding into a full outage for the open duration.
    BackendBusy,
    /// The caller's deadline passed, or the caller cancelled or went away.
    CallerGone,
    /// A layer of this process refused the call before it went out.
    LocalRejection,
    /// The request itself was wrong or not allowed: an answer about the request, not the backend.
    CallerError,
}

impl Class {
    /// Whether a circuit breaker counts this call (as a success or a failure). Everything else is
    /// ignored, not even entered in the window.
    pub fn feeds_breaker(self) -> bool {
        matches!(self, Self::Success | Self::BackendFailure)
    }

    /// Whether this call is a latency sample for an adaptive concurrency limit: completed work and
    /// backend failures only. Caller-gone calls, local rejections and caller errors never move the
    /// limit.
    pub fn is_sample(self) -> bool {
        matches!(
            self,
            Self::Success | Self::BackendFailure | Self::BackendBusy
        )
    }

    /// The class of a call that ended with `code`, given what this process knows about it:
    /// `local` if one of its own layers produced the code, and the call's `deadline` (the
    /// caller's, as this process holds it), judged at `now`.
    pub fn of(code: Code, local: Option<Local>, deadline: Option<Instant>, now: Instant) -> Self {
        match (code, local) {
            (_, Some(Local::Rejected(_))) => Self::LocalRejection,
            (Code::DeadlineExceeded, Some(Local::AttemptTimeout)) => Self::BackendFailure,
            (Code::Ok, _) => Self::Success,
            (Code::Cancelled, _) => Self::CallerGone,
            (Code::DeadlineExceeded, _) => match deadline {
                Some(deadline) if now + CALLER_GONE_SLACK >= deadline => Self::CallerGone,
                _ => Self::BackendFailure,
            },
            (Code::Unavailable | Code::Internal | Code::Unknown | Code::DataLoss, _) => {
                Self::BackendFailure
            }
            _ => Self::CallerError,
        }
    }
}

/// A cause that only this process knows: carried as the source of the `tonic::Status` a layer
/// produces ([`Local::attach`]), so it never crosses the wire and a remote status with the same
/// code and reason is not mistaken for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Local {
    /// A refusal by a layer of this process before any call went out (its ErrorInfo reason:
    /// `CIRCUIT_OPEN`, `BULKHEAD_FULL`, ...).
    #[error("refused by this process ({0})")]
    Rejected(&'static str),
    /// Our own per-attempt timeout fired while the caller still had time ([`ATTEMPT_TIMEOUT`]).
    #[error("this process's attempt timeout fired")]
    AttemptTimeout,
}

impl Local {
    /// `status` with this cause as its source.
    pub fn attach(self, mut status: Status) -> Status {
        status.set_source(Arc::new(self));
        status
    }

    /// The local cause of `error`: the source of the first `tonic::Status` in its chain, if it is
    /// a [`Local`].
    pub fn of(error: &(dyn Error + 'static)) -> Option<Self> {
        find_status(error)
            .and_then(|status| status.source())
            .and_then(|source| source.downcast_ref::<Self>())
            .copied()
    }
}

/// The result of one attempt as far as its response headers tell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    /// `Code::Ok` when the response started (or ended OK without messages); otherwise the code
    /// the attempt failed with.
    pub code: Code,
    /// The server's retry pushback (gRFC A6), if it sent one.
    pub pushback: Pushback,
    /// Set when a layer of this process produced the code (see [`Local`]).
    pub local: Option<Local>,
    /// An UNAVAILABLE from elsewhere whose reason says the backend refused it for load
    /// ([`Class::BackendBusy`]).
    pub busy: bool,
}

impl Outcome {
    /// Whether the call started (or finished OK): nothing to retry, a success for the breaker.
    pub fn is_ok(&self) -> bool {
        self.code == Code::Ok
    }

    /// Whether a layer of this process refused the attempt before it went out.
    pub fn is_local_rejection(&self) -> bool {
        matches!(self.local, Some(Local::Rejected(_)))
    }

    /// The [`Class`] of this attempt for a call whose caller's deadline is `deadline`, now.
    pub fn class(&self, deadline: Option<Instant>) -> Class {
        if self.busy && self.local.is_none() {
            return Class::BackendBusy;
        }
        Class::of(self.code, self.local, deadline, Instant::now())
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
    let code = grpc_status(headers).unwrap_or_else(|| code_of_http_status(response.status()));
    // Only a failure's details are decoded: a started response costs nothing more.
    let busy = code == Code::Unavailable
        && Status::from_header_map(headers).is_some_and(|status| is_busy(&status));
    Outcome {
        code,
        pushback,
        local: None,
        busy,
    }
}

/// Whether `status` is an UNAVAILABLE whose ErrorInfo reason says "refused for load".
fn is_busy(status: &Status) -> bool {
    use tonic_types::StatusExt;
    status.code() == Code::Unavailable
        && status
            .get_error_details()
            .error_info()
            .is_some_and(|info| info.reason == OVERLOADED || info.reason == BULKHEAD_FULL)
}

/// Classifies an error from the inner service: the first `tonic::Status` in its source chain, or
/// UNAVAILABLE (a transport failure).
///
/// tonic's own `TimeoutExpired` (a channel that ran out the `grpc-timeout` it was given) is
/// DEADLINE_EXCEEDED, not a transport failure: that `grpc-timeout` is the caller's remaining
/// deadline, so the caller's time ran out.
pub fn classify_error(error: &(dyn Error + 'static)) -> Outcome {
    if is_tonic_timeout(error) {
        return Outcome {
            code: Code::DeadlineExceeded,
            pushback: Pushback::None,
            local: None,
            busy: false,
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
            local: Local::of(error),
            busy: is_busy(status),
        },
        None => Outcome {
            code: Code::Unavailable,
            pushback: Pushback::None,
            local: None,
            busy: false,
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

/// Whether `error` is (or wraps) tonic's own timeout, which a tonic channel raises when the
/// `grpc-timeout` it was given runs out, and which tonic turns into CANCELLED.
pub fn is_tonic_timeout(error: &(dyn Error + 'static)) -> bool {
    let mut source = Some(error);
    while let Some(error) = source {
        if error.is::<tonic::TimeoutExpired>() {
            return true;
        }
        source = error.source();
    }
    false
}

/// The gRPC code in `grpc-status` of `headers` (a trailers-only response's headers, or trailers),
/// if present; an unparsable value is UNKNOWN.
pub fn grpc_status(headers: &http::HeaderMap) -> Option<Code> {
    let value = headers.get(GRPC_STATUS)?;
    Some(
        std::str::from_utf8(value.as_bytes())
            .ok()
            .and_then(|v| v.trim().parse::<i32>().ok())
            .map_or(Code::Unknown, Code::from_i32),
    )
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

/// Whether `error` is a refusal made by a layer of this process before any call went out (an
/// open circuit, a full bulkhead: a status marked [`Local::Rejected`]).
///
/// Such a refusal says the backend is closed to us for a while, so retrying the same backend after
/// a backoff is pointless (the retry layer returns it at once) and the caller's fallback should move
/// on instead; and the breaker does not count our own bulkhead's refusals against the backend.
pub fn is_local_rejection(error: &(dyn Error + 'static)) -> bool {
    matches!(Local::of(error), Some(Local::Rejected(_)))
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

    #[tokio::test(start_paused = true)]
    async fn the_classification_table() {
        use Class::*;
        let now = Instant::now();
        let soon = Some(now + Duration::from_millis(10));
        let later = Some(now + Duration::from_secs(5));
        let past = Some(now - Duration::from_millis(1));
        let rejected = Some(Local::Rejected("BULKHEAD_FULL"));
        let cases = [
            (Code::Ok, None, later, Success),
            (Code::Unavailable, None, later, BackendFailure),
            (Code::Internal, None, None, BackendFailure),
            (Code::Unknown, None, later, BackendFailure),
            (Code::DataLoss, None, later, BackendFailure),
            // Our own attempt timeout fired while the caller still had time.
            (
                Code::DeadlineExceeded,
                Some(Local::AttemptTimeout),
                later,
                BackendFailure,
            ),
            (
                Code::DeadlineExceeded,
                Some(Local::AttemptTimeout),
                soon,
                BackendFailure,
            ),
            // An upstream's own timeout while the caller still had time.
            (Code::DeadlineExceeded, None, later, BackendFailure),
            (Code::DeadlineExceeded, None, None, BackendFailure),
            // The caller's deadline passed, or is within the slack (the next hop answers early).
            (Code::DeadlineExceeded, None, past, CallerGone),
            (Code::DeadlineExceeded, None, soon, CallerGone),
            (Code::Cancelled, None, later, CallerGone),
            // Refusals of this process's own layers, whatever their code.
            (Code::Unavailable, rejected, later, LocalRejection),
            (Code::ResourceExhausted, rejected, later, LocalRejection),
            (Code::InvalidArgument, None, later, CallerError),
            (Code::NotFound, None, later, CallerError),
            (Code::PermissionDenied, None, later, CallerError),
            (Code::Unauthenticated, None, later, CallerError),
            (Code::ResourceExhausted, None, later, CallerError),
            (Code::FailedPrecondition, None, later, CallerError),
        ];
        for (code, local, deadline, class) in cases {
            assert_eq!(
                Class::of(code, local, deadline, now),
                class,
                "{code:?} {local:?} {deadline:?}"
            );
        }
        assert!(Success.feeds_breaker() && BackendFailure.feeds_breaker());
        assert!(Success.is_sample() && BackendFailure.is_sample());
        for class in [CallerGone, LocalRejection, CallerError] {
            assert!(!class.feeds_breaker() && !class.is_sample(), "{class:?}");
        }
        // Just outside the slack, an upstream's DEADLINE_EXCEEDED is the upstream's.
        let outside = Some(now + CALLER_GONE_SLACK + Duration::from_millis(1));
        assert_eq!(
            Class::of(Code::DeadlineExceeded, None, outside, now),
            BackendFailure
        );
        // tonic's own channel timeout: the caller's grpc-timeout ran out.
        let error: tower::BoxError = Box::new(tonic::TimeoutExpired(()));
        assert_eq!(classify_error(&*error).class(soon), CallerGone);
    }

    #[tokio::test(start_paused = true)]
    async fn a_backend_refusing_for_load_is_busy_not_failed() {
        for reason in [OVERLOADED, BULKHEAD_FULL] {
            let response: http::Response<tonic::body::Body> =
                Status::from(ApiError::unavailable(reason, "busy")).into_http();
            let outcome = classify_response(&response);
            assert_eq!(outcome.code, Code::Unavailable);
            let class = outcome.class(None);
            assert_eq!(class, Class::BackendBusy, "{reason}");
            assert!(!class.feeds_breaker() && class.is_sample());
        }
        // Any other UNAVAILABLE from elsewhere, a remote CIRCUIT_OPEN included, is a failure.
        for reason in ["CIRCUIT_OPEN", "UPSTREAM_UNAVAILABLE"] {
            let response: http::Response<tonic::body::Body> =
                Status::from(ApiError::unavailable(reason, "down")).into_http();
            assert_eq!(
                classify_response(&response).class(None),
                Class::BackendFailure,
                "{reason}"
            );
        }
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
