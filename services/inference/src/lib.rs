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
//! Resilience: every backend call (simulated and HTTP alike) goes through a circuit breaker and a
//! bulkhead of its own model ([`weir_mesh::breaker`], [`weir_mesh::bulkhead`]), so a failing or
//! slow model fails fast and cannot take the capacity of the others. See `api.rs` for where the
//! permits are taken and what is recorded, and [`Config`] for the settings.
//!
//! Callers: the router and the session service's summarizer call with mesh tokens naming the tenant
//! they authenticated; anyone else authenticates with an API key, as at every Weir service (the
//! launcher gives the server the stack's [`weir_mesh::auth::Authenticator`]).
//!
//! Logging: each call is logged at debug with its model, backend and token counts, never with
//! prompt or answer text, and never with an API key.
#![warn(missing_docs)]

use std::{net::SocketAddr, sync::Arc};

use serde::{Deserialize, Deserializer, Serialize};
use weir_mesh::{
    breaker::BreakerConfig, bulkhead::BulkheadConfig, catalog::Catalog, config::ConfigError,
    server::GrpcServer,
};

mod api;
mod backend;
pub mod observe;
mod validate;

pub use api::InferenceApi;
pub use backend::sim::SimRequest;

/// Default address of the inference service.
pub const DEFAULT_LISTEN: SocketAddr = SocketAddr::new(
    std::net::IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, 1)),
    50052,
);

/// Config key of the breaker settings.
const BREAKER_KEY: &str = "inference.breaker";
/// Config key of the bulkhead settings.
const BULKHEAD_KEY: &str = "inference.bulkhead";

/// The `[inference]` table of `weir.toml`.
///
/// ```toml
/// [inference]
/// listen = "127.0.0.1:50052"
///
/// # One circuit breaker per model, around every backend call (sim and openai alike).
/// # A stream's call is "slow" by its time to first token.
/// [inference.breaker]
/// window = 20                 # calls in the count-based sliding window
/// minimum_calls = 20          # calls the window must hold before the breaker may open
/// failure_rate = 0.5          # failure rate that opens it
/// slow_call_rate = 1.0        # slow-call rate that opens it
/// slow_call_threshold = "10s" # time to first token above which a call is slow ("0s": off)
/// open_duration = "5s"        # first open duration, doubling per consecutive re-open...
/// max_open_duration = "60s"   # ...up to this
/// jitter = 0.1                # fraction taken off each open duration at random
/// half_open_probes = 3        # probe calls let through in HALF_OPEN
/// failure_codes = ["UNAVAILABLE", "INTERNAL", "UNKNOWN", "DATA_LOSS", "DEADLINE_EXCEEDED"]
///
/// # One concurrency limit per model; a stream holds its slot until it ends or is cancelled.
/// [inference.bulkhead]
/// max_concurrent = 64         # calls in flight per model; full → UNAVAILABLE BULKHEAD_FULL
/// backends = { gpt-4o = 16 }  # per-model overrides of max_concurrent (default: none)
/// ```
///
/// The bulkhead's `max_queue` / `max_queue_wait` are accepted and checked but not used: the
/// inference service refuses at once when a model's compartment is full (queueing, if wanted,
/// belongs to the caller's client stack).
///
/// Both tables are checked when the table is deserialized (so `weir up` with a bad value fails at
/// start-up naming the key, e.g. `inference.breaker.minimum_calls`); a `Config` built in code is
/// checked by [`Config::validate`] and [`try_server`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Address to listen on (default `127.0.0.1:50052`; `WEIR_INFERENCE__LISTEN`).
    pub listen: SocketAddr,
    /// `[inference.breaker]`: the circuit breaker of each model (defaults:
    /// [`BreakerConfig::default`], i.e. 20-call window, 50 % failures, 5 s open, 3 probes).
    #[serde(deserialize_with = "validated_breaker")]
    pub breaker: BreakerConfig,
    /// `[inference.bulkhead]`: the concurrency limit of each model (default 64 in flight, no
    /// queue; [`BulkheadConfig::default`]).
    #[serde(deserialize_with = "validated_bulkhead")]
    pub bulkhead: BulkheadConfig,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: DEFAULT_LISTEN,
            breaker: BreakerConfig::default(),
            bulkhead: BulkheadConfig::default(),
        }
    }
}

impl Config {
    /// Checks the breaker and bulkhead settings; the error names the key (e.g.
    /// `inference.breaker.window`).
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.breaker.validate(BREAKER_KEY)?;
        self.bulkhead.validate(BULKHEAD_KEY)
    }
}

/// A deserialization error from a failed check of a nested table. The figment path of the error
/// already ends at the table (`inference.breaker`), so only the field is named here.
fn nested_error<E: serde::de::Error>(error: ConfigError) -> E {
    match error {
        ConfigError::Invalid { key, message } => E::custom(format!("`{key}` {message}")),
        other => E::custom(other),
    }
}

fn validated_breaker<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<BreakerConfig, D::Error> {
    let config = BreakerConfig::deserialize(deserializer)?;
    config.validate("").map_err(nested_error)?;
    Ok(config)
}

fn validated_bulkhead<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<BulkheadConfig, D::Error> {
    let config = BulkheadConfig::deserialize(deserializer)?;
    config.validate("").map_err(nested_error)?;
    Ok(config)
}

/// Builds the inference server for the models of `catalog`, ready to `serve`.
///
/// A `Config` read from `weir.toml` or the environment has been validated already (see
/// [`Config`]). One built in code with invalid breaker or bulkhead settings is logged at ERROR and
/// those settings are replaced by their defaults; use [`try_server`] to get the error instead.
pub fn server(config: &Config, catalog: Arc<Catalog>) -> GrpcServer {
    server_with(config, InferenceApi::with_config(catalog, config))
}

/// Like [`server`], but refuses invalid breaker or bulkhead settings with the key named.
pub fn try_server(config: &Config, catalog: Arc<Catalog>) -> Result<GrpcServer, ConfigError> {
    config.validate()?;
    Ok(server(config, catalog))
}

/// Builds the inference server around an existing [`InferenceApi`]; keep a clone of `api` to read
/// what the simulated models received ([`InferenceApi::sim_requests`]). The breaker and bulkhead
/// settings are the ones `api` was built with ([`InferenceApi::with_config`]), not `config`'s.
pub fn server_with(_config: &Config, api: InferenceApi) -> GrpcServer {
    GrpcServer::default().add_service(api.into_service())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

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

    #[test]
    fn breaker_and_bulkhead_tables() {
        let source = Source::from_toml(
            "[inference.breaker]\nminimum_calls = 4\nwindow = 4\nopen_duration = \"300ms\"\n\
             [inference.bulkhead]\nmax_concurrent = 2\nbackends = { gpt-4o = 1 }\n",
        );
        let config = source.section::<Config>("inference").unwrap();
        assert_eq!(config.breaker.window, 4);
        assert_eq!(
            config.breaker.open_duration,
            std::time::Duration::from_millis(300)
        );
        assert_eq!(config.breaker.half_open_probes, 3, "the rest defaulted");
        assert_eq!(config.bulkhead.max_concurrent, 2);
        assert_eq!(config.bulkhead.backends.get("gpt-4o"), Some(&1));
        assert_eq!(config.listen, DEFAULT_LISTEN);
        config.validate().unwrap();
        Config::default().validate().unwrap();
    }

    #[test]
    fn invalid_breaker_and_bulkhead_fail_at_load_naming_the_key() {
        for (toml, key, field) in [
            (
                "[inference.breaker]\nminimum_calls = 30\n",
                "inference.breaker",
                "minimum_calls",
            ),
            (
                "[inference.breaker]\njitter = 1.5\n",
                "inference.breaker",
                "jitter",
            ),
            (
                "[inference.bulkhead]\nmax_concurrent = 0\n",
                "inference.bulkhead",
                "max_concurrent",
            ),
        ] {
            let error = Source::from_toml(toml)
                .section::<Config>("inference")
                .unwrap_err()
                .to_string();
            assert!(error.contains(&format!("`{key}`")), "{error}");
            assert!(error.contains(&format!("`{field}`")), "{error}");
        }
        assert!(
            Source::from_toml("[inference.breaker]\nwindw = 4\n")
                .section::<Config>("inference")
                .is_err()
        );
    }

    #[test]
    fn configs_built_in_code_are_checked_by_try_server() {
        let config = Config {
            breaker: weir_mesh::breaker::BreakerConfig {
                window: 0,
                ..Default::default()
            },
            ..Config::default()
        };
        let error = config.validate().unwrap_err().to_string();
        assert!(error.contains("`inference.breaker.window`"), "{error}");
        let catalog = Arc::new(Catalog::default());
        assert!(try_server(&config, catalog.clone()).is_err());
        assert!(try_server(&Config::default(), catalog.clone()).is_ok());
        // The infallible constructor falls back to the defaults rather than serve broken settings.
        let _ = server(&config, catalog);
    }
}
