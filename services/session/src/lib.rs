//! weir-session: conversation history in Redis, token-budgeted context and summarization.
//!
//! The API is defined in `proto/weir/session/v1/session.proto`. This version of Weir serves the service
//! with health and reflection, and answers every RPC with UNIMPLEMENTED; its behaviour lands with
//! its own issue.
#![warn(missing_docs)]

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};
use weir_mesh::server::GrpcServer;
use weir_proto::session::session_service_server::{SessionService, SessionServiceServer};

/// The `[session]` table of `weir.toml`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Address to listen on (default `127.0.0.1:50053`; `WEIR_SESSION__LISTEN`).
    pub listen: SocketAddr,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 50053)),
        }
    }
}

/// The gRPC implementation. Every RPC answers UNIMPLEMENTED until the service's behaviour lands.
#[derive(Debug, Default, Clone)]
pub struct SessionApi;

impl SessionService for SessionApi {}

/// Builds the session server, ready to `serve`.
pub fn server(_config: &Config) -> GrpcServer {
    GrpcServer::default().add_service(SessionServiceServer::new(SessionApi))
}
