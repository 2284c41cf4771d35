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

use tonic::Code;
use weir_mesh::ApiError;
pub use weir_mesh::store::{REDIS_RETRY_AFTER, REDIS_UNAVAILABLE, is_outage};

use crate::store::StoreError;

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
        StoreError::Redis(error) => weir_mesh::store::redis_error("session", &error),
        // Internal states the caller cannot fix (summarizer races never reach an RPC).
        error @ (StoreError::VersionConflict { .. }
        | StoreError::InvalidCover { .. }
        | StoreError::Corrupt(_)) => {
            tracing::error!(session = id, %error, "session store failure");
            ApiError::internal(format!("session store failure: {error}"))
        }
    }
}

#[cfg(test)]
mod tests {
    use redis::RedisError;

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
