//! When a failed model call moves on to the next candidate of the route.
//!
//! The walk tries a plan's candidates in order. After a candidate fails, the next one is tried only
//! if the failure says something about *that backend*, not about the request or the tenant:
//!
//! | failure | falls back? |
//! |---|---|
//! | UNAVAILABLE (backend down, circuit open `CIRCUIT_OPEN`, shed `OVERLOADED`, bulkhead full `BULKHEAD_FULL`, cut stream) | yes |
//! | DEADLINE_EXCEEDED of the attempt (a hung backend), while the caller's deadline has time left | yes |
//! | RESOURCE_EXHAUSTED from the upstream model API (`UPSTREAM_RATE_LIMITED`, simulated quota faults) | yes |
//! | INTERNAL, UNKNOWN, DATA_LOSS (a broken backend) | yes |
//! | FAILED_PRECONDITION of the backend's set-up (`UPSTREAM_MODEL_NOT_FOUND`, `UPSTREAM_API_KEY_MISSING`) | yes |
//! | INVALID_ARGUMENT, NOT_FOUND, PERMISSION_DENIED, UNAUTHENTICATED, CANCELLED | no: the request itself is wrong or gone |
//! | RESOURCE_EXHAUSTED for the tenant's own quota (`RATE_LIMITED`, `BUDGET_EXHAUSTED`) | no: another model would not fix it |
//!
//! When every candidate failed with a fallback-worthy error, the route's degraded answer (if any)
//! is served and marked `SERVED_BY_DEGRADED`; otherwise the last error is returned.

use tonic::Code;
use weir_mesh::ApiError;

/// Reasons of RESOURCE_EXHAUSTED that are the tenant's own quota, never a backend's.
pub const TENANT_QUOTA_REASONS: [&str; 2] = ["RATE_LIMITED", "BUDGET_EXHAUSTED"];

/// Reasons of FAILED_PRECONDITION that describe one backend's set-up, so another may work.
pub const BACKEND_SETUP_REASONS: [&str; 2] =
    ["UPSTREAM_MODEL_NOT_FOUND", "UPSTREAM_API_KEY_MISSING"];

/// Whether `error` from one candidate lets the walk try the next one (see the module table).
pub fn falls_back(error: &ApiError) -> bool {
    match error.code() {
        Code::Unavailable
        | Code::DeadlineExceeded
        | Code::Internal
        | Code::Unknown
        | Code::DataLoss => true,
        Code::ResourceExhausted => !TENANT_QUOTA_REASONS.contains(&error.reason()),
        Code::FailedPrecondition => BACKEND_SETUP_REASONS.contains(&error.reason()),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backend_failures_fall_back() {
        for (code, reason) in [
            (Code::Unavailable, "CIRCUIT_OPEN"),
            (Code::Unavailable, "BULKHEAD_FULL"),
            (Code::Unavailable, "OVERLOADED"),
            (Code::DeadlineExceeded, "DEADLINE_EXCEEDED"),
            (Code::ResourceExhausted, "UPSTREAM_RATE_LIMITED"),
            (Code::Internal, "INTERNAL"),
            (Code::FailedPrecondition, "UPSTREAM_API_KEY_MISSING"),
        ] {
            assert!(
                falls_back(&ApiError::new(code, reason, "x")),
                "{code:?} {reason}"
            );
        }
    }

    #[test]
    fn request_and_tenant_failures_do_not() {
        for (code, reason) in [
            (Code::InvalidArgument, "INVALID_ARGUMENT"),
            (Code::NotFound, "MODEL_NOT_FOUND"),
            (Code::ResourceExhausted, "BUDGET_EXHAUSTED"),
            (Code::ResourceExhausted, "RATE_LIMITED"),
            (Code::Cancelled, "CANCELLED"),
            (Code::Unauthenticated, "API_KEY_INVALID"),
            (Code::FailedPrecondition, "PRICE_UNKNOWN"),
        ] {
            assert!(
                !falls_back(&ApiError::new(code, reason, "x")),
                "{code:?} {reason}"
            );
        }
    }
}
