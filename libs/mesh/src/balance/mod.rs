//! Client-side load balancing over the replicas of a service, with outlier ejection per replica.
//!
//! # Why
//!
//! Weir's services keep their state in Redis, so each can run as several replicas. A service URL
//! setting (`router.inference_url`, ...) therefore accepts a comma-separated list
//! (`"http://10.0.0.1:50052,http://10.0.0.2:50052"`, which fits in an environment variable), and
//! each element's host may be a DNS name that resolves to many addresses (a Kubernetes headless
//! Service gives one address per pod). Every address is an **endpoint** with its own lazy
//! channel, and each call goes to one of them. When a replica dies, its siblings take its calls:
//! the endpoint is **ejected** for a while, and the calls that failed on it are retried by the
//! retry layer above on another endpoint.
//!
//! A single URL whose host is an IP address is not balanced: [`crate::local::Dialer::dial`] gives
//! the one channel (or in-process server) it always gave, with no balancer in between.
//!
//! # Where it sits
//!
//! The balancer is the client stack's transport ([`crate::client::ClientStack`]): below retry,
//! circuit breaker (per model), bulkhead, attempt timeout and signing, so each *attempt* picks an
//! endpoint. A retry after UNAVAILABLE therefore goes to another endpoint; and since the
//! balancer's picks for a retry (a request carrying `grpc-previous-rpc-attempts`) avoid endpoints
//! whose last attempt failed while others have none, a dead replica costs a call one fast failed
//! attempt, not the call.
//!
//! # Choosing an endpoint
//!
//! Power of two choices: two endpoints drawn at random among those not ejected, and the one with
//! fewer calls in flight takes the call (a stream counts until its body ends). It needs no shared
//! view of load and avoids the herding of "least loaded of all".
//!
//! tonic's `Channel::balance_channel` and tower's `p2c` balance the same way, but keep their
//! endpoints' state to themselves: outlier ejection needs to see each attempt's outcome per
//! endpoint, count ejections against a cap over the whole set, and report per-endpoint metrics.
//! So this is a small balancer of our own over one lazy tonic `Channel` per endpoint (or the
//! in-process server, when this process hosts that address).
//!
//! # Outlier ejection (after Envoy's outlier detection)
//!
//! - **What counts as a failure**: the endpoint's fault only: an attempt that ended UNAVAILABLE
//!   ([`crate::outcome`]'s [`Class::BackendFailure`](crate::outcome::Class) with that code: a
//!   refused, failed or cut connection, or an UNAVAILABLE answer). Never the caller's (CANCELLED,
//!   the caller's deadline, INVALID_ARGUMENT, RESOURCE_EXHAUSTED from a rate limit...) nor a load
//!   refusal (UNAVAILABLE `OVERLOADED`: the replica works). A success (the response started) ends
//!   the streak; other outcomes leave it as it is.
//! - **Ejection**: [`consecutive_failures`](BalanceConfig::consecutive_failures) (default
//!   [`DEFAULT_CONSECUTIVE_FAILURES`] = 5) failures in a row eject the endpoint for
//!   [`base_ejection_time`](BalanceConfig::base_ejection_time) (default 30 s) × the number of
//!   ejections in a row, capped at [`max_ejection_time`](BalanceConfig::max_ejection_time) (default
//!   300 s). The streak of ejections restarts once an endpoint has stayed in for a whole
//!   `max_ejection_time` after its last ejection. When the ejection time is over, the endpoint
//!   takes calls again (no timer task: the next pick sees it).
//! - **Cap**: at most [`max_ejection_percent`](BalanceConfig::max_ejection_percent) (default 50 %)
//!   of the endpoints, rounded down, are ejected at once (so a single endpoint is never ejected,
//!   and one of two may be). If the set shrinks and every endpoint is ejected, the one ejected
//!   longest ago takes the calls: a call is never refused only because endpoints are ejected.
//! - **Why not the circuit breaker's state machine?** A breaker ([`crate::breaker`]) refuses
//!   calls and judges a failure *rate* over a window of 20 calls, made for "is this model down";
//!   an ejected endpoint is not refused but skipped while its siblings serve, judged on a short
//!   streak (a dead replica must leave the set after 5 fast failures, not after 20 calls), and the
//!   cap is a decision over the whole set that no per-endpoint breaker can take. The two share
//!   the classification of outcomes, [`crate::outcome`], so they agree on what a failure is.
//! - **The model's breaker stays closed** when one replica of inference dies: it sits above the
//!   balancer and sees the failed attempts (at most `consecutive_failures` plus the calls in
//!   flight on the dead replica), far fewer than its 50 % of at least 20 calls, and the retries on
//!   the siblings succeed.
//!
//! A caveat: a replica answering UNAVAILABLE for a reason all replicas share (its own upstream
//! model API is down) is ejected like a dead one; the cap keeps at least half of the replicas
//! serving, and the model's breaker handles that outage.
//!
//! # Resolution
//!
//! Each element's host is resolved ([`tokio::net::lookup_host`]) at start and again every
//! [`resolve_interval`](BalanceConfig::resolve_interval) (default [`DEFAULT_RESOLVE_INTERVAL`] =
//! 10 s); the endpoints are the union of the addresses. New addresses become endpoints, vanished
//! ones are removed (calls in flight on them finish), and known ones keep their channel and
//! health. A name that fails to resolve keeps its previous addresses. A list of IP addresses only
//! is never resolved again. Calls made before the first resolution wait for it; if there is no
//! address at all they fail with UNAVAILABLE `UPSTREAM_UNREACHABLE` ([`NoEndpoints`]).
//!
//! # Metrics
//!
//! Counter `weir_endpoint_ejections_total{service,endpoint}`; gauge
//! `weir_balance_healthy_endpoints{service}` (endpoints not ejected, updated on each call and
//! each change), where `service` is the dependency (`inference`, `session`, ...).

mod config;
mod core;
mod resolve;

use std::{
    fmt,
    net::SocketAddr,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use futures::future::BoxFuture;
use http_body_util::BodyExt;
use tonic::{Code, body::Body};
use tower::{BoxError, Service, ServiceExt};

pub use config::BalanceConfig;
pub use resolve::{BadUrl, Resolve, Target, resolver};

use crate::{
    local::Transport,
    metadata::PREVIOUS_RPC_ATTEMPTS,
    outcome::{self, Class},
};
use core::{Pool, Verdict};

/// How often host names are resolved again.
pub const DEFAULT_RESOLVE_INTERVAL: Duration = Duration::from_secs(10);
/// Failures in a row that eject an endpoint.
pub const DEFAULT_CONSECUTIVE_FAILURES: u32 = 5;
/// Ejection time of a first ejection.
pub const DEFAULT_BASE_EJECTION_TIME: Duration = Duration::from_secs(30);
/// Cap of the ejection time.
pub const DEFAULT_MAX_EJECTION_TIME: Duration = Duration::from_secs(300);
/// Most endpoints ejected at once, in percent (rounded down).
pub const DEFAULT_MAX_EJECTION_PERCENT: u32 = 50;

/// A call for which the service's names resolved to no address at all. Read as UNAVAILABLE
/// `UPSTREAM_UNREACHABLE` ([`crate::transport::call_error`]): the request was never sent.
#[derive(Debug, thiserror::Error)]
#[error("no address of the service is known (its names resolved to none)")]
pub struct NoEndpoints;

/// A transport over the endpoints of one service (see the [module docs](self)). Cheap to clone;
/// clones share endpoints and health. The resolver task ends when the last clone is dropped.
#[derive(Clone)]
pub struct Balancer {
    pool: Arc<Pool>,
}

impl fmt::Debug for Balancer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Balancer")
            .field("service", &self.pool.service())
            .field("endpoints", &self.pool.addrs())
            .finish()
    }
}

impl Balancer {
    /// A balancer for `service` (a metrics label, such as `inference`) over `targets`, whose
    /// names `resolve` looks up, with `connect` making each endpoint's transport (an address it
    /// refuses is left out, with a warning). Needs a Tokio runtime when a target is a name (the
    /// resolver task is spawned).
    pub fn new(
        service: &str,
        targets: Vec<Target>,
        config: &BalanceConfig,
        resolve: Resolve,
        connect: impl Fn(SocketAddr) -> Result<Transport, tonic::transport::Error>
        + Send
        + Sync
        + 'static,
    ) -> Self {
        let pool = Arc::new(Pool::new(service, config.clone(), None));
        resolve::start(&pool, targets, resolve, Arc::new(connect));
        Self { pool }
    }

    /// The endpoints' addresses now.
    pub fn endpoints(&self) -> Vec<SocketAddr> {
        self.pool.addrs()
    }

    /// The addresses of the endpoints ejected now.
    pub fn ejected(&self) -> Vec<SocketAddr> {
        self.pool.ejected()
    }

    /// Waits until the endpoints were resolved at least once.
    pub async fn resolved(&self) {
        self.pool.resolved().await;
    }
}

/// What an attempt's result says about its endpoint (see the module docs).
fn verdict(result: &Result<http::Response<Body>, BoxError>) -> Verdict {
    let outcome = outcome::classify(result);
    match outcome.class(None) {
        Class::Success => Verdict::Success,
        Class::BackendFailure if outcome.code == Code::Unavailable => Verdict::Failure,
        _ => Verdict::Ignored,
    }
}

impl Service<http::Request<Body>> for Balancer {
    type Response = http::Response<Body>;
    type Error = BoxError;
    type Future = BoxFuture<'static, Result<http::Response<Body>, BoxError>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // Each endpoint's readiness is awaited per call, on the endpoint the call picks.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let pool = self.pool.clone();
        Box::pin(async move {
            pool.resolved().await;
            let retry = request.headers().contains_key(PREVIOUS_RPC_ATTEMPTS);
            let held = pool.pick(retry).ok_or(NoEndpoints)?;
            let endpoint = held.0.clone();
            let result = endpoint.transport.clone().oneshot(request).await;
            pool.record(&endpoint, verdict(&result));
            result.map(|response| {
                // The endpoint counts this call in flight until its body is done with.
                response.map(|body| {
                    Body::new(body.map_frame(move |frame| {
                        let _held = &held;
                        frame
                    }))
                })
            })
        })
    }
}
