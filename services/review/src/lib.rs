//! weir-review: the human review queue, with leases, SLAs and an audit trail.
//!
//! The API is defined in `proto/weir/review/v1/review.proto`. This version of Weir serves the service
//! with health and reflection, and answers every RPC with UNIMPLEMENTED; its behaviour lands with
//! its own issue.
#![warn(missing_docs)]

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};
use weir_mesh::server::GrpcServer;
use weir_proto::review::review_service_server::{ReviewService, ReviewServiceServer};

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

/// Builds the review server, ready to `serve`.
pub fn server(_config: &Config) -> GrpcServer {
    GrpcServer::default().add_service(ReviewServiceServer::new(ReviewApi))
}
