//! How failures reach the caller: each [`StoreError`] (and each refused input) becomes a
//! [`weir_mesh::ApiError`], which `weir_mesh::error` turns into a `tonic::Status` with its
//! `google.rpc` details.
//!
//! | failure | code | reason |
//! |---|---|---|
//! | unknown item, or another tenant's | NOT_FOUND | `ITEM_NOT_FOUND` |
//! | lease lapsed, foreign, or never held | FAILED_PRECONDITION | `LEASE_NOT_HELD` |
//! | item decided, cancelled or expired | FAILED_PRECONDITION | `ALREADY_DECIDED` |
//! | `ClaimNext.item_id` not PENDING in that queue | FAILED_PRECONDITION | `ITEM_NOT_PENDING` |
//! | `VERDICT_EDIT` without `edited_content` | INVALID_ARGUMENT | `EDIT_WITHOUT_CONTENT` |
//! | other bad input | INVALID_ARGUMENT | `INVALID_ARGUMENT` (naming the field) |
//! | Redis unreachable, timed out, loading, read-only | UNAVAILABLE | `REDIS_UNAVAILABLE` (RetryInfo 1 s) |
//! | any other Redis error, corrupt data | INTERNAL | `INTERNAL` |

use tonic::Code;
use weir_mesh::ApiError;
pub use weir_mesh::store::{REDIS_RETRY_AFTER, REDIS_UNAVAILABLE, is_outage};

use crate::store::{StoreError, state};

/// Reason of a decision or renewal without the item's current lease.
pub const LEASE_NOT_HELD: &str = "LEASE_NOT_HELD";
/// Reason of a change to an item that is decided, cancelled or expired.
pub const ALREADY_DECIDED: &str = "ALREADY_DECIDED";
/// Reason of a claim of a named item that is not PENDING in the queue.
pub const ITEM_NOT_PENDING: &str = "ITEM_NOT_PENDING";
/// Reason of an edit without its replacement text.
pub const EDIT_WITHOUT_CONTENT: &str = "EDIT_WITHOUT_CONTENT";

/// The API error for a store failure on item `id`.
pub fn api_error(error: StoreError, id: &str) -> ApiError {
    match error {
        StoreError::NotFound => ApiError::not_found("item", id),
        StoreError::LeaseNotHeld => ApiError::new(
            Code::FailedPrecondition,
            LEASE_NOT_HELD,
            format!(
                "the lease on item \"{id}\" is not held: it lapsed, or was never yours; claim the \
                 item again"
            ),
        ),
        StoreError::Terminal(s) => ApiError::new(
            Code::FailedPrecondition,
            ALREADY_DECIDED,
            format!("item \"{id}\" is already {}", state_name(s)),
        )
        .with_metadata("state", state_name(s)),
        StoreError::NotPending => ApiError::new(
            Code::FailedPrecondition,
            ITEM_NOT_PENDING,
            format!("item \"{id}\" is not pending in that queue (claimed by someone else?)"),
        ),
        StoreError::Redis(error) => weir_mesh::store::redis_error("review", &error),
        StoreError::Corrupt(what) => {
            tracing::error!(item = id, what, "review store failure");
            ApiError::internal(format!("review store failure: {what}"))
        }
    }
}

/// INVALID_ARGUMENT `EDIT_WITHOUT_CONTENT`.
pub fn edit_without_content() -> ApiError {
    ApiError::new(
        Code::InvalidArgument,
        EDIT_WITHOUT_CONTENT,
        "edited_content: required with VERDICT_EDIT",
    )
    .with_field_violation("edited_content", "required with VERDICT_EDIT")
}

fn state_name(s: i32) -> &'static str {
    match s {
        state::DECIDED => "DECIDED",
        state::CANCELLED => "CANCELLED",
        state::EXPIRED => "EXPIRED",
        state::PENDING => "PENDING",
        state::CLAIMED => "CLAIMED",
        _ => "UNSPECIFIED",
    }
}

#[cfg(test)]
mod tests {
    use redis::RedisError;

    use super::*;

    #[test]
    fn codes_and_reasons() {
        let cases = [
            (StoreError::NotFound, Code::NotFound, "ITEM_NOT_FOUND"),
            (
                StoreError::LeaseNotHeld,
                Code::FailedPrecondition,
                LEASE_NOT_HELD,
            ),
            (
                StoreError::Terminal(state::DECIDED),
                Code::FailedPrecondition,
                ALREADY_DECIDED,
            ),
            (
                StoreError::NotPending,
                Code::FailedPrecondition,
                ITEM_NOT_PENDING,
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
            let api = api_error(error, "r1");
            assert_eq!((api.code(), api.reason()), (code, reason), "{api}");
        }
        let edit = edit_without_content();
        assert_eq!(
            (edit.code(), edit.reason()),
            (Code::InvalidArgument, EDIT_WITHOUT_CONTENT)
        );
    }
}
