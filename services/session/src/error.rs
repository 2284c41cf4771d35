//! How store failures reach the caller: each [`StoreError`] becomes a [`weir_mesh::ApiError`]
//! (which `weir_mesh::error` turns into a `tonic::Status` with its `google.rpc` details).
//!
//! | failure | code | reason |
//! |---|---|---|
//! | unknown, expired or deleted session | NOT_FOUND | `SESSION_NOT_FOUND` |
//! | client-chosen id taken (or deleted less than `tombstone_ttl` ago) | ALREADY_EXISTS | `SESSION_EXISTS` |
//! | `expected_last_seq` mismatch | ABORTED | `LAST_SEQ_MISMATCH` (metadata `last_seq`) |
//! | `request_id` reused with other messages | INVALID_ARGUMENT | `INVALID_ARGUMENT` (field `request_id`) |
//! | Redis unreachable, timed out, loading, read-only | UNAVAILABLE | `REDIS_UNAVAILABLE` (RetryInfo 1 s) |
//! | any other Redis error, corrupt data | INTERNAL | `INTERNAL` |

use std::time::Duration;

use redis::{ErrorKind, RedisError, ServerErrorKind};
use tonic::Code;
use weir_mesh::ApiError;

use crate::store::StoreError;

/// Reason of failures caused by Redis being unreachable.
pub const REDIS_UNAVAILABLE: &str = "REDIS_UNAVAILABLE";
/// How long a client is told to wait before retrying after a Redis outage.
pub const REDIS_RETRY_AFTER: Duration = Duration::from_secs(1);

/// The API error for a store failure on session `id`.
pub fn api_error(error: StoreError, id: &str) -> ApiError {
    match error {
        StoreError::NotFound => ApiError::not_found("session", id),
        StoreError::AlreadyExists => ApiError::new(
            Code::AlreadyExists,
            "SESSION_EXISTS",
            format!("session \"{id}\" already exists"),
        ),
        StoreError::RecentlyDeleted => ApiError::new(
            Code::AlreadyExists,
            "SESSION_EXISTS",
            format!("session \"{id}\" was deleted recently; its id cannot be reused yet"),
        ),
        StoreError::Aborted { expected, actual } => ApiError::new(
            Code::Aborted,
            "LAST_SEQ_MISMATCH",
            format!(
                "expected_last_seq is {expected} but session \"{id}\" is at {actual}; read it \
                 again and retry"
            ),
        )
        .with_metadata("last_seq", actual.to_string()),
        StoreError::RequestIdReused => ApiError::invalid_argument(
            "request_id",
            "was used before with other messages; use a new request_id for a new append",
        ),
        StoreError::Redis(error) => redis_error(&error),
        // Internal states the caller cannot fix (summarizer races never reach an RPC).
        error @ (StoreError::VersionConflict { .. }
        | StoreError::InvalidCover { .. }
        | StoreError::Corrupt(_)) => {
            tracing::error!(session = id, %error, "session store failure");
            ApiError::internal(format!("session store failure: {error}"))
        }
    }
}

/// UNAVAILABLE for an outage (the caller may retry), INTERNAL for anything else.
fn redis_error(error: &RedisError) -> ApiError {
    if is_outage(error) {
        tracing::warn!(%error, "redis unavailable");
        ApiError::unavailable(REDIS_UNAVAILABLE, "the session store is unavailable; retry")
            .with_retry_after(REDIS_RETRY_AFTER)
    } else {
        tracing::error!(%error, "redis error");
        ApiError::internal(format!("session store error: {error}"))
    }
}

/// Whether a Redis error means "not reachable right now" rather than a bug.
pub fn is_outage(error: &RedisError) -> bool {
    if error.is_io_error()
        || error.is_timeout()
        || error.is_connection_dropped()
        || error.is_connection_refusal()
    {
        return true;
    }
    matches!(
        error.kind(),
        ErrorKind::Io
            | ErrorKind::Parse
            | ErrorKind::AuthenticationFailed
            | ErrorKind::ClusterConnectionNotFound
            | ErrorKind::Server(
                ServerErrorKind::BusyLoading
                    | ServerErrorKind::TryAgain
                    | ServerErrorKind::ClusterDown
                    | ServerErrorKind::MasterDown
                    | ServerErrorKind::ReadOnly
            )
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_and_reasons() {
        let cases = [
            (StoreError::NotFound, Code::NotFound, "SESSION_NOT_FOUND"),
            (
                StoreError::AlreadyExists,
                Code::AlreadyExists,
                "SESSION_EXISTS",
            ),
            (
                StoreError::RecentlyDeleted,
                Code::AlreadyExists,
                "SESSION_EXISTS",
            ),
            (
                StoreError::Aborted {
                    expected: 1,
                    actual: 2,
                },
                Code::Aborted,
                "LAST_SEQ_MISMATCH",
            ),
            (
                StoreError::RequestIdReused,
                Code::InvalidArgument,
                "INVALID_ARGUMENT",
            ),
            (
                StoreError::Redis(RedisError::from(std::io::Error::from(
                    std::io::ErrorKind::ConnectionRefused,
                ))),
                Code::Unavailable,
                REDIS_UNAVAILABLE,
            ),
            (StoreError::Corrupt("x".into()), Code::Internal, "INTERNAL"),
        ];
        for (error, code, reason) in cases {
            let api = api_error(error, "s1");
            assert_eq!((api.code(), api.reason()), (code, reason), "{api}");
        }
    }
}
