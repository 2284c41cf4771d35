//! weir-mesh: what every Weir service shares.
//!
//! - [`error`]: the one place where failures become `tonic::Status`, with `google.rpc` details
//!   (ErrorInfo in domain `weir.dev`, RetryInfo, QuotaFailure, BadRequest).
//! - [`config`]: `weir.toml` + `WEIR_*` environment overrides, validated at start-up.
//! - [`catalog`]: the model catalog shared by the services (backends, limits).
//! - [`pricing`]: integer micro-USD costs from a catalog price and token counts, the one function
//!   the router reserves with and the budget service commits with.
//! - [`server`]: the gRPC server builder: health, reflection, graceful drain on shutdown.
//! - [`client`]: channels to other Weir services.
//! - [`balance`]: client-side load balancing over a service's replicas (a URL list, DNS names
//!   resolved again periodically), with outlier ejection per replica.
//! - [`local`]: in-process calls between services hosted by the same process (the callee's whole
//!   server stack, minus the socket), and the [`local::Dialer`] that picks them.
//! - [`shutdown`]: SIGTERM / Ctrl-C as a cancellation token.
//! - [`telemetry`]: logs (JSON with trace ids), OpenTelemetry trace export, the Prometheus
//!   `/metrics` endpoint; the `[telemetry]` table.
//! - [`trace`]: W3C trace context across calls; one span per RPC (server and client).
//! - [`rpc_metrics`]: requests, codes and latency of every server call.
//! - [`rpc`]: what those two share: method names, and a response body that reports the final code.
//! - [`metadata`]: the gRPC metadata keys Weir uses between services.
//! - [`tokens`]: token counting per tokenizer family (exact for the simulated model, estimated
//!   otherwise), shared so every service agrees on prompt and answer sizes.
//! - [`deadline`]: the caller's deadline: parsed, capped and enforced on servers, propagated
//!   (minus a margin) by clients.
//! - [`tenant`]: the tenant of a request, as the auth layer authenticated it.
//! - [`backend`]: the per-backend key that keyed layers (breaker, bulkhead) isolate by.
//! - [`store`]: Redis connections and tenant-scoped key spaces.
//! - [`idempotency`]: idempotency keys: a retried request is run once and answered the same way,
//!   shared by replicas through Redis.
//! - [`outcome`]: failure classification, shared by breaker, retry, bulkhead and admission:
//!   success, backend failure, caller gone, local rejection or the caller's mistake.
//! - [`breaker`]: circuit breaker per backend (closed / open / half-open), failing fast when open.
//! - [`bulkhead`]: concurrency limit per backend, so one slow backend cannot take every slot.
//! - [`timeout`]: per-attempt timeout, bounded by the call's remaining deadline.
//! - [`retry`]: retries with full-jitter backoff, server pushback and a per-backend retry budget,
//!   never after the response has started.
//! - [`criticality`]: request criticality from `weir-criticality` (CRITICAL_PLUS .. SHEDDABLE).
//! - [`admission`]: server concurrency limit (an adaptive latency gradient) that sheds the lowest
//!   criticality first and keeps goodput at capacity.
//! - [`auth`]: every server's caller: API keys (tenant, roles, criticality ceiling) or a mesh
//!   token; a bare `weir-tenant` is never believed.
//! - [`identity`]: mesh tokens (HMAC-SHA256) that let services vouch for a call's tenant to each
//!   other; the threat model.
//! - [`ratelimit`]: per-tenant GCRA rate limits, shared by replicas through Redis, local fallback.
//! - [`transport`]: broken connections as UNAVAILABLE (`UPSTREAM_UNREACHABLE`, `STREAM_CUT`), not
//!   tonic's UNKNOWN.
//!
//! The resilience layers (deadline, retry, breaker, rate limit, bulkhead, admission) are added here
//! as one module per concern, each a tower `Layer` + `Service`; docs/resilience.md describes them.
#![warn(missing_docs)]

pub mod admission;
pub mod auth;
pub mod backend;
pub mod balance;
pub mod breaker;
pub mod bulkhead;
pub mod catalog;
pub mod client;
pub mod config;
pub mod criticality;
pub mod deadline;
pub mod due;
pub mod error;
pub mod idempotency;
pub mod identity;
pub mod local;
pub mod metadata;
pub mod outcome;
pub mod pricing;
pub mod ratelimit;
pub mod retry;
pub mod rpc;
pub mod rpc_metrics;
pub mod server;
pub mod shutdown;
pub mod store;
pub mod telemetry;
pub mod tenant;
pub mod timeout;
pub mod tokens;
pub mod trace;
pub mod transport;

pub use error::ApiError;
