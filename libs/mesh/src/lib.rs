//! weir-mesh: what every Weir service shares.
//!
//! - [`error`]: the one place where failures become `tonic::Status`, with `google.rpc` details
//!   (ErrorInfo in domain `weir.dev`, RetryInfo, QuotaFailure, BadRequest).
//! - [`config`]: `weir.toml` + `WEIR_*` environment overrides, validated at start-up.
//! - [`catalog`]: the model catalog shared by the services (backends, limits).
//! - [`server`]: the gRPC server builder: health, reflection, graceful drain on shutdown.
//! - [`client`]: channels to other Weir services.
//! - [`shutdown`]: SIGTERM / Ctrl-C as a cancellation token.
//! - [`telemetry`]: logging set-up.
//! - [`metadata`]: the gRPC metadata keys Weir uses between services.
//! - [`tokens`]: token counting per tokenizer family (exact for the simulated model, estimated
//!   otherwise), shared so every service agrees on prompt and answer sizes.
//! - [`deadline`]: the caller's deadline from `grpc-timeout`.
//! - [`tenant`]: the tenant of a request, from the `weir-tenant` metadata.
//! - [`store`]: Redis connections and tenant-scoped key spaces.
//!
//! The resilience layers (deadline, retry, breaker, rate limit, bulkhead, admission) are added here
//! as one module per concern, each a tower `Layer` + `Service`.
#![warn(missing_docs)]

pub mod catalog;
pub mod client;
pub mod config;
pub mod deadline;
pub mod error;
pub mod metadata;
pub mod server;
pub mod shutdown;
pub mod store;
pub mod telemetry;
pub mod tenant;
pub mod tokens;

pub use error::ApiError;
