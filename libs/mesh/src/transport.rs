//! Transport failures as the gRPC statuses a caller can act on.
//!
//! When the connection under a call breaks (the peer process died, a proxy reset it), tonic
//! surfaces whatever hyper or h2 reported, mostly as `UNKNOWN` "h2 protocol error: error reading a
//! body from connection", with no `google.rpc` details. UNKNOWN tells a caller nothing: it is not
//! retried, not a reason to fall back, and reads like a bug. What happened is that the backend
//! became unavailable, so the client stack ([`crate::client::ClientStack`]) maps every failure
//! that is not already a gRPC status to UNAVAILABLE with an ErrorInfo reason:
//!
//! | when | code | reason |
//! |---|---|---|
//! | no connection could be made (or the in-process server has stopped, [`crate::local`], or no address of the service is known, [`crate::balance`]): the request was never sent | UNAVAILABLE | [`UPSTREAM_UNREACHABLE`] |
//! | the connection broke after the request was sent, before or after the response started | UNAVAILABLE | [`STREAM_CUT`] |
//! | tonic's own timer ran out the `grpc-timeout` it was given | DEADLINE_EXCEEDED | `DEADLINE_EXCEEDED` |
//! | a status (from the peer, or from a layer of ours such as the breaker) | unchanged | unchanged |
//!
//! This is the same reading [`crate::outcome`] gives the client layers (a transport failure is
//! UNAVAILABLE), so what a caller is told and what the breaker and retry layers counted agree. The
//! two reasons tell a caller that keeps books what it needs: an unreachable backend never saw the
//! request, while a cut one may have worked on it (and an upstream model API may bill for that).

use tonic::Status;
use tower::BoxError;

use crate::{ApiError, outcome::find_status};

/// ErrorInfo reason of a call for which no connection could be made: the request was never sent.
pub const UPSTREAM_UNREACHABLE: &str = "UPSTREAM_UNREACHABLE";
/// ErrorInfo reason of a call whose connection broke after its request was sent, before its answer
/// (a unary response, or a stream) ended.
pub const STREAM_CUT: &str = "STREAM_CUT";

/// The status a caller gets for a call that failed before its response started (see the
/// [module docs](self)).
pub fn call_error(error: BoxError) -> Status {
    if chain(&*error).any(|e| {
        e.is::<tonic::ConnectError>()
            || e.is::<crate::local::NotServing>()
            || e.is::<crate::balance::NoEndpoints>()
    }) {
        return ApiError::unavailable(
            UPSTREAM_UNREACHABLE,
            format!("could not connect to the service ({error}); retry"),
        )
        .into();
    }
    to_status(error, STREAM_CUT, "the call failed before its answer")
}

/// `error` and its sources.
fn chain<'a>(
    error: &'a (dyn std::error::Error + 'static),
) -> impl Iterator<Item = &'a (dyn std::error::Error + 'static)> {
    std::iter::successors(Some(error), |e| e.source())
}

/// The status a caller gets for a response body that failed after the response started (see the
/// [module docs](self)). tonic passes a `Status` body error on unchanged, so this is what a
/// streaming caller's next message reads.
pub fn body_error(error: impl Into<BoxError>) -> Status {
    to_status(
        error.into(),
        STREAM_CUT,
        "the answer was cut off before it ended",
    )
}

/// `response` with tonic's body type, whose errors are read by [`body_error`]: what the client
/// stack hands to tonic.
pub fn tonic_response<B>(response: http::Response<B>) -> http::Response<tonic::body::Body>
where
    B: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    use http_body_util::BodyExt;
    response.map(|body| tonic::body::Body::new(body.map_err(body_error)))
}

fn to_status(error: BoxError, reason: &'static str, what: &str) -> Status {
    if find_status(&*error).is_some_and(|status| !is_made_from_transport_error(status)) {
        // Ours or the peer's: tonic takes it out of the chain with its code and details.
        return Status::from_error(error);
    }
    if crate::outcome::is_tonic_timeout(&*error) {
        // tonic calls its own expiry CANCELLED; it is the deadline it was given running out.
        return ApiError::deadline_exceeded(format!("{what}: the deadline passed ({error})"))
            .into();
    }
    ApiError::unavailable(
        reason,
        format!("{what}: the connection failed ({error}); retry"),
    )
    .into()
}

/// Whether `status` is tonic's rendering of a transport error (tonic's body type turns every body
/// error into a status, an h2 or hyper error into UNKNOWN "h2 protocol error: ..."), not an answer:
/// it wraps the transport error as its source and has no `google.rpc` details, while a peer's
/// status (decoded from the wire) has no source and every status of ours carries an ErrorInfo.
fn is_made_from_transport_error(status: &Status) -> bool {
    use std::error::Error;
    status.details().is_empty() && status.source().is_some()
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use std::io;

    use tonic::Code;

    use super::*;

    fn reason(status: &Status) -> String {
        ApiError::from_status(status).reason().to_string()
    }

    #[test]
    fn a_broken_connection_is_a_cut_before_and_after_the_response_started() {
        let lost = || -> BoxError {
            Box::new(io::Error::new(
                io::ErrorKind::ConnectionReset,
                "connection reset",
            ))
        };
        let status = call_error(lost());
        assert_eq!(status.code(), Code::Unavailable);
        assert_eq!(reason(&status), STREAM_CUT);
        let status = body_error(lost());
        assert_eq!(status.code(), Code::Unavailable);
        assert_eq!(reason(&status), STREAM_CUT);
        assert!(status.message().contains("connection reset"), "{status:?}");
    }

    #[test]
    fn tonics_status_for_a_transport_error_is_a_transport_error() {
        // What tonic's body type makes of a body error it cannot map (tonic::body::Body::new).
        let rendered = Status::from_error(Box::new(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "error reading a body from connection",
        )));
        assert_eq!(rendered.code(), Code::Unknown);
        let status = body_error(rendered);
        assert_eq!(status.code(), Code::Unavailable);
        assert_eq!(reason(&status), STREAM_CUT);
    }

    #[test]
    fn statuses_pass_through_unchanged() {
        let ours = Status::from(ApiError::unavailable("CIRCUIT_OPEN", "open"));
        let status = call_error(Box::new(ours));
        assert_eq!(reason(&status), "CIRCUIT_OPEN");
        let peers = Status::invalid_argument("bad");
        let status = body_error(peers);
        assert_eq!(status.code(), Code::InvalidArgument);
        assert_eq!(status.message(), "bad");
    }

    #[test]
    fn a_connection_never_made_is_unreachable() {
        let refused: BoxError = Box::new(tonic::ConnectError(Box::new(io::Error::new(
            io::ErrorKind::ConnectionRefused,
            "connection refused",
        ))));
        let status = call_error(refused);
        assert_eq!(status.code(), Code::Unavailable);
        assert_eq!(reason(&status), UPSTREAM_UNREACHABLE);
    }

    #[test]
    fn tonics_own_timeout_is_deadline_exceeded() {
        let status = call_error(Box::new(tonic::TimeoutExpired(())));
        assert_eq!(status.code(), Code::DeadlineExceeded);
    }
}
