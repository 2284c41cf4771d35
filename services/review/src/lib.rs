//! weir-review: the human review queue, with leases, SLAs and an audit trail.
//!
//! The API is defined in `proto/weir/review/v1/review.proto`. This version of Weir serves the service
//! with health and reflection, and answers every RPC with UNIMPLEMENTED; its behaviour lands with
//! its own issue.
//!
//! Callers authenticate as at every other service ([`weir_mesh::auth`]). The review decisions
//! ([`REVIEWER_METHODS`]: `ClaimNext`, `RenewLease`, `SubmitDecision`, `CancelItem`) need a key with
//! the `reviewer` (or `admin`) role, checked before the call reaches the service: without it they
//! are PERMISSION_DENIED `ROLE_REQUIRED`, not UNIMPLEMENTED.
#![warn(missing_docs)]

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};
use weir_mesh::{auth::Role, server::GrpcServer};
use weir_proto::{
    review::review_service_server::{ReviewService, ReviewServiceServer},
    service_names,
};

/// The RPCs that decide on review items: they need the `reviewer` (or `admin`) role.
pub const REVIEWER_METHODS: [&str; 4] = ["ClaimNext", "RenewLease", "SubmitDecision", "CancelItem"];

/// The `[review]` table of `weir.toml`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Address to listen on (default `127.0.0.1:50055`; `WEIR_REVIEW__LISTEN`).
    pub listen: SocketAddr,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 50055)),
        }
    }
}

/// The gRPC implementation. Every RPC answers UNIMPLEMENTED until the service's behaviour lands.
#[derive(Debug, Default, Clone)]
pub struct ReviewApi;

impl ReviewService for ReviewApi {}

/// Builds the review server, ready to `serve`. It authenticates in single-tenant dev mode until
/// given the stack's keys with [`GrpcServer::with_auth`].
pub fn server(_config: &Config) -> GrpcServer {
    REVIEWER_METHODS.into_iter().fold(
        GrpcServer::default().add_service(ReviewServiceServer::new(ReviewApi)),
        // Only people trusted to review may take, keep, decide or withdraw an item.
        |server, method| {
            server.require_role(
                format!("/{}/{method}", service_names::REVIEW),
                Role::Reviewer,
            )
        },
    )
}
