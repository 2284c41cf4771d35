//! Channels to other Weir services, and the client stack every call to them goes through.
//!
//! [`ClientStack`] assembles the client layers in the order of docs/resilience.md, so every
//! service gets the same behaviour by construction: trace context ([`crate::trace`]) → deadline
//! propagation → retry (with a budget) → circuit breaker → bulkhead → per-attempt timeout → mesh
//! token ([`crate::identity`], with [`ClientStack::signed`]) → the channel.
//!
//! The transport under the stack is what [`crate::local::Dialer`] dials for the service's URL:
//! one channel, the in-process server, or a [`crate::balance::Balancer`] over the service's
//! replicas, below every layer so that each attempt (a retry included) picks its replica.
//!
//! A [`Channel`] connects lazily and reconnects on its own, so a service can start before its
//! dependencies and survive their restarts; calls made while a dependency is down fail with
//! UNAVAILABLE, which the router's resilience layers (retry, breaker, fallback) act on.

use std::time::Duration;

use tonic::{
    Status,
    body::Body,
    transport::{Channel, Endpoint},
};
use tower::{ServiceBuilder, util::BoxCloneSyncService};

use crate::{
    balance::BalanceConfig,
    breaker::{BreakerConfig, Breakers, CircuitBreakerLayer},
    bulkhead::{BulkheadConfig, BulkheadLayer, Bulkheads},
    config::ConfigError,
    deadline::DeadlineLayer,
    identity::{MeshIdentity, SignLayer},
    local::Transport,
    retry::{RetryBudget, RetryBudgetConfig, RetryLayer, RetryPolicy},
    timeout::{AttemptTimeoutLayer, TimeoutConfig},
    trace::TraceLayer,
    transport,
};

/// Default TCP connect timeout for calls between services.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Default HTTP/2 keep-alive ping interval, so dead connections are noticed.
pub const DEFAULT_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);

/// A channel to `url` (e.g. `http://127.0.0.1:50052`), connecting on first use.
pub fn lazy_channel(url: &str) -> Result<Channel, tonic::transport::Error> {
    Ok(Endpoint::from_shared(url.to_string())?
        .connect_timeout(DEFAULT_CONNECT_TIMEOUT)
        .http2_keep_alive_interval(DEFAULT_KEEPALIVE_INTERVAL)
        .keep_alive_while_idle(true)
        .tcp_nodelay(true)
        .connect_lazy())
}

/// The settings of a client stack: what a service does to every call it makes to another
/// service (`[router.client]` for the router's calls to inference). Every part has its documented
/// defaults (docs/resilience.md).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClientConfig {
    /// Time kept back from the caller's remaining deadline when it is sent on (default 5 ms).
    #[serde(with = "humantime_serde")]
    pub deadline_margin: Duration,
    /// Retry policy (`[...client.retry]`).
    pub retry: RetryPolicy,
    /// Retry budget, per backend (`[...client.retry_budget]`).
    pub retry_budget: RetryBudgetConfig,
    /// Circuit breaker, per backend (`[...client.breaker]`).
    pub breaker: BreakerConfig,
    /// Concurrency limit, per backend (`[...client.bulkhead]`).
    pub bulkhead: BulkheadConfig,
    /// Per-attempt timeout (`[...client.timeout]`).
    pub timeout: TimeoutConfig,
    /// Load balancing over the service's endpoints and their outlier ejection
    /// (`[...client.balance]`), used when its URL lists several or names a host to resolve.
    pub balance: BalanceConfig,
}

impl Default for ClientConfig {
    fn default() -> Self {
        Self {
            deadline_margin: crate::deadline::DEFAULT_MARGIN,
            retry: RetryPolicy::default(),
            retry_budget: RetryBudgetConfig::default(),
            breaker: BreakerConfig::default(),
            bulkhead: BulkheadConfig::default(),
            timeout: TimeoutConfig::default(),
            balance: BalanceConfig::default(),
        }
    }
}

impl ClientConfig {
    /// Checks every part, naming the bad key under `key_prefix` (e.g. `router.client`).
    pub fn validate(&self, key_prefix: &str) -> Result<(), ConfigError> {
        self.retry.validate(&format!("{key_prefix}.retry"))?;
        self.retry_budget
            .validate(&format!("{key_prefix}.retry_budget"))?;
        self.breaker.validate(&format!("{key_prefix}.breaker"))?;
        self.bulkhead.validate(&format!("{key_prefix}.bulkhead"))?;
        self.timeout.validate(&format!("{key_prefix}.timeout"))?;
        self.balance.validate(&format!("{key_prefix}.balance"))
    }
}

/// A type-erased client stack, usable as the transport of any generated tonic client.
///
/// Its error is a concrete `tonic::Status` rather than a boxed trait object: a `BoxError` here
/// makes the futures of tonic clients over it fail the compiler's `Send` proof inside
/// `async_trait` handlers (a higher-ranked lifetime limitation), and tonic turns every error into
/// a `Status` anyway.
pub type BoxedClient = BoxCloneSyncService<http::Request<Body>, http::Response<Body>, Status>;

/// A client stack over one channel, with handles on its per-backend state.
#[derive(Debug, Clone)]
pub struct ClientStack {
    service: BoxedClient,
    breakers: Breakers,
    bulkheads: Bulkheads,
}

impl ClientStack {
    /// Builds the stack of docs/resilience.md over `channel`, outermost first, without a mesh
    /// identity: calls carry no mesh token, so the callee treats them as an external caller (for
    /// tools and tests; services use [`ClientStack::signed`]). Calls tagged with a
    /// [`crate::backend::BackendKey`] get their own breaker, bulkhead and retry budget.
    pub fn new(channel: impl Into<Transport>, config: &ClientConfig) -> Self {
        Self::signed(channel, config, MeshIdentity::disabled())
    }

    /// [`ClientStack::new`], with every attempt that names a tenant (`weir-tenant`) signed by
    /// `identity`, so the callee believes the tenant (and the criticality) this service sends.
    /// `channel` is a socket [`Channel`] or, for a server in this process, a
    /// [`crate::local::LocalChannel`] (see [`crate::local::Dialer`]): the layers are the same.
    pub fn signed(
        channel: impl Into<Transport>,
        config: &ClientConfig,
        identity: MeshIdentity,
    ) -> Self {
        let breakers = Breakers::new(config.breaker.clone());
        let bulkheads = Bulkheads::new(config.bulkhead.clone());
        let service = ServiceBuilder::new()
            // Back to tonic's body type, whatever the layers below wrapped it in; a connection
            // that breaks mid-answer is UNAVAILABLE `STREAM_CUT`, not tonic's UNKNOWN.
            .map_response(transport::tonic_response)
            // The status of a refusal or failure (see BoxedClient); a transport failure is
            // UNAVAILABLE (`UPSTREAM_UNREACHABLE` or `STREAM_CUT`), as the layers below counted it.
            .map_err(transport::call_error)
            // A client span per call, its context sent on in `traceparent`.
            .layer(TraceLayer::client())
            // Send only the time we have left, so a slow hop cannot eat the caller's deadline.
            .layer(DeadlineLayer::propagate(config.deadline_margin))
            // Retries spend from a per-backend budget, so an outage is not multiplied by 3.
            .layer(RetryLayer::new(
                config.retry.clone(),
                RetryBudget::new(&config.retry_budget),
            ))
            // Stop calling a failing backend and fail fast, so fallbacks answer quickly.
            .layer(CircuitBreakerLayer::with_breakers(breakers.clone()))
            // One slow backend cannot take every connection and slot from the others.
            .layer(BulkheadLayer::with_bulkheads(bulkheads.clone()))
            // No single attempt may hang past its own bound or the deadline.
            .layer(AttemptTimeoutLayer::new(config.timeout.clone()))
            // Vouch for the tenant per attempt, so each token expires with that attempt's deadline.
            .layer(SignLayer::new(identity))
            .service(channel.into());
        Self {
            service: BoxCloneSyncService::new(service),
            breakers,
            bulkheads,
        }
    }

    /// The stack, for `FooServiceClient::new(stack.service())`.
    pub fn service(&self) -> BoxedClient {
        self.service.clone()
    }

    /// The circuit breakers, by backend (for health reports, metrics and tests).
    pub fn breakers(&self) -> &Breakers {
        &self.breakers
    }

    /// The bulkheads, by backend.
    pub fn bulkheads(&self) -> &Bulkheads {
        &self.bulkheads
    }
}
