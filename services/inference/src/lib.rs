//! weir-inference: the service that calls model backends.
//!
//! The API is `weir.inference.v1.InferenceService` (`proto/weir/inference/v1/inference.proto`):
//! `Generate` (a whole answer), `GenerateStream` (token by token) and `ListModels`. Each model of
//! the catalog (`[models.<name>]` in `weir.toml`, see [`weir_mesh::catalog`]) is served by one
//! backend:
//!
//! - `sim` (`backend/sim.rs`), the default: a deterministic simulated model with configurable
//!   latency, token rate, answer length and fault injection. The same request always gets the same
//!   answer, so tests and demos need no API key and no network.
//! - `openai` (`backend/openai/`): any OpenAI-compatible chat completions endpoint (OpenAI, vLLM,
//!   Ollama, llama.cpp), streamed over server-sent events.
//!
//! Every request is validated first (`validate.rs`): bad input is INVALID_ARGUMENT naming the field,
//! an unknown model NOT_FOUND, and a prompt that does not fit the model's context window is
//! refused before any backend is called. Token counts come from [`weir_mesh::tokens`], so the
//! router, session and budget services agree with the numbers reported here.
//!
//! Deadlines and cancellation: the caller's `grpc-timeout` bounds the whole call (an expired
//! deadline ends it with DEADLINE_EXCEEDED), and an upstream HTTP request never outlives the gRPC
//! call that caused it: cancelling a `GenerateStream` drops the upstream response body, which
//! closes its connection, and stops the simulated model.
//!
//! Logging: each call is logged at debug with its model, backend and token counts, never with
//! prompt or answer text, and never with an API key.
#![warn(missing_docs)]

use std::{net::SocketAddr, sync::Arc};

use serde::{Deserialize, Serialize};
use weir_mesh::{catalog::Catalog, server::GrpcServer};

mod api;
mod backend;
mod validate;

pub use api::InferenceApi;
pub use backend::sim::SimRequest;

/// Default address of the inference service.
pub const DEFAULT_LISTEN: SocketAddr = SocketAddr::new(
    std::net::IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, 1)),
    50052,
);

/// The `[inference]` table of `weir.toml`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Address to listen on (default `127.0.0.1:50052`; `WEIR_INFERENCE__LISTEN`).
    pub listen: SocketAddr,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: DEFAULT_LISTEN,
        }
    }
}

/// Builds the inference server for the models of `catalog`, ready to `serve`.
pub fn server(config: &Config, catalog: Arc<Catalog>) -> GrpcServer {
    server_with(config, InferenceApi::new(catalog))
}

/// Builds the inference server around an existing [`InferenceApi`]; keep a clone of `api` to read
/// what the simulated models received ([`InferenceApi::sim_requests`]).
pub fn server_with(_config: &Config, api: InferenceApi) -> GrpcServer {
    GrpcServer::default().add_service(api.into_service())
}

#[cfg(test)]
mod tests {
    use weir_mesh::config::Source;

    use super::*;

    #[test]
    fn config_defaults_and_overrides() {
        let source = Source::from_toml("");
        assert_eq!(
            source.section::<Config>("inference").ok(),
            Some(Config::default())
        );
        let source = Source::from_toml("[inference]\nlisten = \"0.0.0.0:6000\"\n");
        assert_eq!(
            source
                .section::<Config>("inference")
                .ok()
                .map(|c| c.listen.port()),
            Some(6000)
        );
        let source = Source::from_toml("[inference]\nport = 1\n");
        assert!(source.section::<Config>("inference").is_err());
    }
}
