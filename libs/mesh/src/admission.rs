//! Admission control: a concurrency limit per server that sheds the least important requests
//! first.
//!
//! # Why a concurrency limit, and why adaptive
//!
//! A server past its capacity does not get slower gracefully: queues grow, every request waits
//! behind all the others, and soon every caller times out and retries, so the server spends its
//! time on work nobody is waiting for. Capping the number of requests *in flight* (Little's law:
//! in-flight = throughput × latency) keeps queues short, and refusing the excess at once, with a
//! cheap UNAVAILABLE, is far kinder than serving it late. The right cap depends on what the server
//! and its dependencies can do right now, so by default it is learned (Netflix's
//! concurrency-limits, AIMD): each completed request is a latency sample; a sample above
//! [`AdmissionConfig::latency_tolerance`] × the latency baseline (or above the fixed
//! [`AdmissionConfig::latency_threshold`]) means queueing has started, and the limit is multiplied
//! by [`AdmissionConfig::backoff_ratio`] (0.9); a healthy sample while at least half the limit is
//! in use adds 1. The limit stays within [`AdmissionConfig::min_limit`] ..
//! [`AdmissionConfig::max_limit`]. `algorithm = "static"` pins it at
//! [`AdmissionConfig::initial_limit`].
//!
//! Two refinements over the textbook AIMD:
//! - The baseline is a slow moving average of the latency samples (over about
//!   [`AdmissionConfig::baseline_window`] samples), so "slow" means slower than this server
//!   usually is, not a number someone guessed for every method of every service.
//! - The limit is lowered at most once per round trip, as TCP does: after a decrease, samples from
//!   requests that were admitted *before* it are not counted against the new limit (their latency
//!   describes the old load). Without this, one burst of slow completions would collapse the
//!   limit to the minimum at once.
//!
//! Latency is measured until the response headers (for a stream: until the handler returned its
//! stream), not until the end of the stream, because the length of a streamed LLM answer says how
//! many tokens were asked for, not how loaded the server is. The *permit*, however, is held until
//! a streaming response body ends or is dropped: a stream being generated is load.
//!
//! # Criticality-aware shedding
//!
//! All requests share one in-flight count, but each [`Criticality`] may only be admitted while the
//! count is below its own share of the current limit L:
//!
//! | criticality | admitted while in flight < | default |
//! |---|---|---|
//! | SHEDDABLE | `thresholds.sheddable` × L | 50 % |
//! | SHEDDABLE_PLUS | `thresholds.sheddable_plus` × L | 75 % |
//! | CRITICAL | L | 100 % |
//! | CRITICAL_PLUS | `thresholds.critical_plus` × L | 150 % |
//!
//! So as load rises, batch traffic is refused first while interactive traffic still finds free
//! slots, and CRITICAL_PLUS has headroom above the limit (bounded, so it cannot push the server
//! into collapse on its own). Each share is at least one request.
//!
//! # Answers
//!
//! A shed request is answered at once, without reaching the handler: UNAVAILABLE, reason
//! `OVERLOADED`, with RetryInfo and `grpc-retry-pushback-ms` = [`AdmissionConfig::pushback`]
//! (default 1 s). A SHEDDABLE request shed while the server is full even for CRITICAL traffic
//! gets `grpc-retry-pushback-ms: -1` and no RetryInfo: "do not retry", because retrying batch
//! work into a saturated server only steals capacity from interactive traffic.
//! A `weir-criticality` header that is not one of the four names is answered INVALID_ARGUMENT.
//!
//! Health checks (`/grpc.health.v1.Health/`) and reflection (`/grpc.reflection.`) are never
//! counted or shed: a load balancer must still see an overloaded server as alive and SERVING, or it
//! would move all of its traffic to the remaining servers at once.
//!
//! # Where this differs from RESILIENCE.md
//!
//! RESILIENCE.md asks for "Gradient2 or AIMD" and leaves the thresholds open. The choices made
//! here: AIMD with a learned latency baseline (Gradient2's idea) rather than a fixed timeout, one
//! decrease per round trip, and CRITICAL_PLUS bounded at 150 % of the limit rather than unbounded.
//! "−1 to say don't" is only sent to SHEDDABLE, and only when the server is saturated; everyone
//! else is told when to come back.
//!
//! # Metrics
//!
//! `weir_shed_requests_total{service, criticality}`, `weir_admission_in_flight{service}`,
//! `weir_admission_limit{service}`.

use std::{
    fmt,
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use http::{HeaderValue, Request, Response};
use serde::{Deserialize, Serialize};
use tokio::time::Instant;
use tower::{Layer, Service};

use crate::{
    config::ConfigError, criticality::Criticality, error::ApiError, metadata::RETRY_PUSHBACK_MS,
};

/// Default: the limit adapts (AIMD).
pub const DEFAULT_ALGORITHM: LimitAlgorithm = LimitAlgorithm::Aimd;
/// Default starting limit (and the fixed limit of `algorithm = "static"`). Model calls are
/// long-lived (a streamed answer holds its slot for seconds), so a gateway needs a few thousand
/// slots; a server that must protect a smaller resource sets its own.
pub const DEFAULT_INITIAL_LIMIT: u32 = 2000;
/// Default lowest adaptive limit.
pub const DEFAULT_MIN_LIMIT: u32 = 10;
/// Default highest adaptive limit.
pub const DEFAULT_MAX_LIMIT: u32 = 10_000;
/// Default multiplicative decrease on a congested sample.
pub const DEFAULT_BACKOFF_RATIO: f64 = 0.9;
/// Default: a sample more than twice the baseline latency means congestion.
pub const DEFAULT_LATENCY_TOLERANCE: f64 = 2.0;
/// Default number of samples the latency baseline averages over.
pub const DEFAULT_BASELINE_WINDOW: u32 = 500;
/// Default share of the limit that SHEDDABLE requests may use.
pub const DEFAULT_SHEDDABLE_SHARE: f64 = 0.5;
/// Default share of the limit that SHEDDABLE_PLUS requests may use.
pub const DEFAULT_SHEDDABLE_PLUS_SHARE: f64 = 0.75;
/// Default share of the limit that CRITICAL_PLUS requests may use (above 1: headroom).
pub const DEFAULT_CRITICAL_PLUS_SHARE: f64 = 1.5;
/// Default time shed clients are told to wait before coming back.
pub const DEFAULT_PUSHBACK: Duration = Duration::from_secs(1);
/// Value of the `service` metric label when none is given.
pub const DEFAULT_SERVICE_LABEL: &str = "server";

/// How the concurrency limit is chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LimitAlgorithm {
    /// Fixed at `initial_limit`.
    Static,
    /// Additive increase, multiplicative decrease on latency above the baseline.
    Aimd,
}

/// Each criticality's share of the limit (see the module doc).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Shares {
    /// SHEDDABLE's share (default 0.5).
    pub sheddable: f64,
    /// SHEDDABLE_PLUS's share (default 0.75).
    pub sheddable_plus: f64,
    /// CRITICAL_PLUS's share (default 1.5). CRITICAL's is always 1.
    pub critical_plus: f64,
}

impl Default for Shares {
    fn default() -> Self {
        Self {
            sheddable: DEFAULT_SHEDDABLE_SHARE,
            sheddable_plus: DEFAULT_SHEDDABLE_PLUS_SHARE,
            critical_plus: DEFAULT_CRITICAL_PLUS_SHARE,
        }
    }
}

/// Settings of the admission layer (the `[<service>.admission]` table).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdmissionConfig {
    /// Shed and limit at all (default true). When false every request is admitted, but
    /// `weir-criticality` is still parsed and stored for the handler.
    pub enabled: bool,
    /// `aimd` (default) or `static`.
    pub algorithm: LimitAlgorithm,
    /// Starting limit, and the fixed limit when static (default 2000).
    pub initial_limit: u32,
    /// Lowest adaptive limit (default 10).
    pub min_limit: u32,
    /// Highest adaptive limit (default 10,000).
    pub max_limit: u32,
    /// Multiplicative decrease on congestion, in (0, 1) (default 0.9).
    pub backoff_ratio: f64,
    /// A sample above this many times the baseline is congestion (default 2.0).
    pub latency_tolerance: f64,
    /// A fixed latency above which a sample is congestion, instead of the baseline (default none).
    #[serde(with = "humantime_serde")]
    pub latency_threshold: Option<Duration>,
    /// Samples the baseline averages over (default 500).
    pub baseline_window: u32,
    /// Each criticality's share of the limit.
    pub shares: Shares,
    /// How long shed clients are told to wait (default 1 s).
    #[serde(with = "humantime_serde")]
    pub pushback: Duration,
}

impl Default for AdmissionConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            algorithm: DEFAULT_ALGORITHM,
            initial_limit: DEFAULT_INITIAL_LIMIT,
            min_limit: DEFAULT_MIN_LIMIT,
            max_limit: DEFAULT_MAX_LIMIT,
            backoff_ratio: DEFAULT_BACKOFF_RATIO,
            latency_tolerance: DEFAULT_LATENCY_TOLERANCE,
            latency_threshold: None,
            baseline_window: DEFAULT_BASELINE_WINDOW,
            shares: Shares::default(),
            pushback: DEFAULT_PUSHBACK,
        }
    }
}

impl AdmissionConfig {
    /// A fixed limit of `limit` requests in flight, default shares.
    pub fn fixed(limit: u32) -> Self {
        Self {
            algorithm: LimitAlgorithm::Static,
            initial_limit: limit,
            min_limit: limit.min(DEFAULT_MIN_LIMIT),
            max_limit: limit.max(DEFAULT_MAX_LIMIT),
            ..Self::default()
        }
    }

    /// Checks the settings; `key_prefix` is the table's path (e.g. `router.admission`).
    pub fn validate(&self, key_prefix: &str) -> Result<(), ConfigError> {
        let key = |field: &str| format!("{key_prefix}.{field}");
        if self.min_limit == 0 {
            return Err(ConfigError::invalid(key("min_limit"), "must be at least 1"));
        }
        if self.max_limit < self.min_limit {
            return Err(ConfigError::invalid(
                key("max_limit"),
                format!("must be at least min_limit ({})", self.min_limit),
            ));
        }
        if !(self.min_limit..=self.max_limit).contains(&self.initial_limit) {
            return Err(ConfigError::invalid(
                key("initial_limit"),
                format!(
                    "must be between min_limit ({}) and max_limit ({})",
                    self.min_limit, self.max_limit
                ),
            ));
        }
        if !(self.backoff_ratio > 0.0 && self.backoff_ratio < 1.0) {
            return Err(ConfigError::invalid(
                key("backoff_ratio"),
                "must be between 0 and 1 (exclusive)",
            ));
        }
        if !(self.latency_tolerance >= 1.0 && self.latency_tolerance.is_finite()) {
            return Err(ConfigError::invalid(
                key("latency_tolerance"),
                "must be a finite number of at least 1",
            ));
        }
        if self.latency_threshold == Some(Duration::ZERO) {
            return Err(ConfigError::invalid(
                key("latency_threshold"),
                "must be positive (omit it to use the latency baseline)",
            ));
        }
        if self.baseline_window == 0 {
            return Err(ConfigError::invalid(
                key("baseline_window"),
                "must be at least 1",
            ));
        }
        let shares = &self.shares;
        let ordered = 0.0 < shares.sheddable
            && shares.sheddable <= shares.sheddable_plus
            && shares.sheddable_plus <= 1.0
            && 1.0 <= shares.critical_plus
            && shares.critical_plus.is_finite();
        if !ordered {
            return Err(ConfigError::invalid(
                key("shares"),
                "need 0 < sheddable <= sheddable_plus <= 1 <= critical_plus",
            ));
        }
        Ok(())
    }
}

/// True for the paths that are never shed, counted, authenticated or rate limited: gRPC health and
/// reflection.
pub fn is_exempt_path(path: &str) -> bool {
    path.starts_with("/grpc.health.v1.Health/") || path.starts_with("/grpc.reflection.")
}

/// The shared state of one server's admission control: the in-flight count and the limit.
/// Cheap to clone; clones share the state.
#[derive(Clone)]
pub struct AdmissionController {
    shared: Arc<Shared>,
}

struct Shared {
    config: AdmissionConfig,
    service: String,
    in_flight: AtomicUsize,
    /// The current limit, rounded down, for the admission fast path.
    limit: AtomicUsize,
    aimd: Mutex<Aimd>,
}

struct Aimd {
    limit: f64,
    /// Moving average of latency samples, in seconds.
    baseline: Option<f64>,
    last_decrease: Option<Instant>,
}

impl fmt::Debug for AdmissionController {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AdmissionController")
            .field("service", &self.shared.service)
            .field("in_flight", &self.in_flight())
            .field("limit", &self.limit())
            .finish()
    }
}

/// Why a request was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("overloaded: {criticality} requests are admitted below {cap} in flight (limit {limit})")]
pub struct Shed {
    /// The request's criticality.
    pub criticality: Criticality,
    /// In-flight requests when it was refused.
    pub in_flight: usize,
    /// The current limit.
    pub limit: usize,
    /// The in-flight count below which this criticality is admitted.
    pub cap: usize,
}

impl AdmissionController {
    /// A controller with `config` (assumed validated), reporting metrics with `service = "server"`.
    pub fn new(config: &AdmissionConfig) -> Self {
        Self::named(config, DEFAULT_SERVICE_LABEL)
    }

    /// A controller whose metrics carry `service` (several servers may share a process).
    pub fn named(config: &AdmissionConfig, service: &str) -> Self {
        let limit = f64::from(config.initial_limit.max(1));
        let controller = Self {
            shared: Arc::new(Shared {
                config: config.clone(),
                service: service.to_string(),
                in_flight: AtomicUsize::new(0),
                limit: AtomicUsize::new(limit as usize),
                aimd: Mutex::new(Aimd {
                    limit,
                    baseline: None,
                    last_decrease: None,
                }),
            }),
        };
        metrics::gauge!("weir_admission_limit", "service" => controller.shared.service.clone())
            .set(limit);
        controller
    }

    /// Requests in flight now.
    pub fn in_flight(&self) -> usize {
        self.shared.in_flight.load(Ordering::Acquire)
    }

    /// The current limit.
    pub fn limit(&self) -> usize {
        self.shared.limit.load(Ordering::Acquire)
    }

    /// The in-flight count below which `criticality` is admitted under `limit`.
    fn cap(&self, criticality: Criticality, limit: usize) -> usize {
        let shares = &self.shared.config.shares;
        let share = match criticality {
            Criticality::Sheddable => shares.sheddable,
            Criticality::SheddablePlus => shares.sheddable_plus,
            Criticality::Critical => 1.0,
            Criticality::CriticalPlus => shares.critical_plus,
        };
        ((limit as f64 * share).floor() as usize).max(1)
    }

    /// Admits a request of `criticality`, or says why not. The permit gives the slot back when
    /// dropped.
    pub fn try_acquire(&self, criticality: Criticality) -> Result<Permit, Shed> {
        let shared = &self.shared;
        if !shared.config.enabled {
            shared.in_flight.fetch_add(1, Ordering::AcqRel);
            return Ok(self.permit());
        }
        let limit = self.limit();
        let cap = self.cap(criticality, limit);
        let mut current = shared.in_flight.load(Ordering::Acquire);
        loop {
            if current >= cap {
                return Err(Shed {
                    criticality,
                    in_flight: current,
                    limit,
                    cap,
                });
            }
            match shared.in_flight.compare_exchange_weak(
                current,
                current + 1,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => break,
                Err(actual) => current = actual,
            }
        }
        metrics::gauge!("weir_admission_in_flight", "service" => shared.service.clone())
            .set((current + 1) as f64);
        Ok(self.permit())
    }

    fn permit(&self) -> Permit {
        Permit {
            shared: self.shared.clone(),
            admitted_at: Instant::now(),
            sampled: false,
        }
    }

    /// The answer to a shed request (see the module doc).
    pub fn shed_response<B: Default>(&self, shed: &Shed) -> Response<B> {
        metrics::counter!(
            "weir_shed_requests_total",
            "service" => self.shared.service.clone(),
            "criticality" => shed.criticality.as_str(),
        )
        .increment(1);
        let error = ApiError::unavailable(
            "OVERLOADED",
            format!(
                "the server is overloaded and sheds {} requests above {} in flight; retry later",
                shed.criticality, shed.cap
            ),
        )
        .with_metadata("criticality", shed.criticality.as_str())
        .with_metadata("limit", shed.limit.to_string());
        // Batch work refused while the server is full even for CRITICAL traffic is told not to
        // retry at all: its retries would only compete with interactive traffic.
        let saturated = shed.in_flight >= self.cap(Criticality::Critical, shed.limit);
        if shed.criticality == Criticality::Sheddable && saturated {
            let mut status = tonic::Status::from(error);
            status
                .metadata_mut()
                .insert(RETRY_PUSHBACK_MS, tonic::metadata::MetadataValue::from(-1));
            status.into_http()
        } else {
            tonic::Status::from(error.with_retry_after(self.shared.config.pushback)).into_http()
        }
    }

    /// Feeds one latency sample of a request admitted at `admitted_at` to the adaptive limit.
    /// `dropped` marks a request that failed in a way that signals overload (an error from the
    /// inner service, DEADLINE_EXCEEDED): it counts as congestion whatever its latency.
    pub fn record(&self, admitted_at: Instant, latency: Duration, dropped: bool) {
        let shared = &self.shared;
        let config = &shared.config;
        if !config.enabled || config.algorithm == LimitAlgorithm::Static {
            return;
        }
        let Ok(mut aimd) = shared.aimd.lock() else {
            return;
        };
        let sample = latency.as_secs_f64();
        let threshold = match (config.latency_threshold, aimd.baseline) {
            (Some(threshold), _) => Some(threshold.as_secs_f64()),
            (None, Some(baseline)) => Some(baseline * config.latency_tolerance),
            (None, None) => None,
        };
        let congested = dropped || threshold.is_some_and(|t| sample > t);
        // The baseline follows the samples slowly (an exponential moving average), and congested
        // samples ten times more slowly still: a lasting change in a dependency's speed becomes
        // the new normal, but a short overload does not teach the limit that queueing is normal.
        let mut alpha = 2.0 / (f64::from(config.baseline_window) + 1.0);
        if congested {
            alpha /= 10.0;
        }
        aimd.baseline = Some(match aimd.baseline {
            None => sample,
            Some(baseline) => baseline + alpha * (sample - baseline),
        });
        let min = f64::from(config.min_limit);
        let max = f64::from(config.max_limit);
        let old = aimd.limit;
        if congested {
            // Once per round trip: ignore requests admitted before the last decrease.
            if aimd.last_decrease.is_none_or(|at| admitted_at >= at) {
                aimd.limit = (aimd.limit * config.backoff_ratio).max(min);
                aimd.last_decrease = Some(Instant::now());
            }
        } else if self.in_flight() * 2 >= aimd.limit as usize {
            // Grow only while the limit is actually used, or an idle server would grow it without
            // bound and lose its protection.
            aimd.limit = (aimd.limit + 1.0).min(max);
        }
        if aimd.limit != old {
            shared.limit.store(aimd.limit as usize, Ordering::Release);
            metrics::gauge!("weir_admission_limit", "service" => shared.service.clone())
                .set(aimd.limit.floor());
        }
    }
}

/// One admitted request's slot. Dropping it gives the slot back, so cancelled, failed and finished
/// requests all return their permits.
pub struct Permit {
    shared: Arc<Shared>,
    admitted_at: Instant,
    sampled: bool,
}

impl fmt::Debug for Permit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Permit")
            .field("admitted_at", &self.admitted_at)
            .finish()
    }
}

impl Permit {
    /// Records this request's latency (once) into the adaptive limit.
    fn sample(&mut self, dropped: bool) {
        if !self.sampled {
            self.sampled = true;
            let controller = AdmissionController {
                shared: self.shared.clone(),
            };
            controller.record(self.admitted_at, self.admitted_at.elapsed(), dropped);
        }
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        let previous = self.shared.in_flight.fetch_sub(1, Ordering::AcqRel);
        metrics::gauge!("weir_admission_in_flight", "service" => self.shared.service.clone())
            .set(previous.saturating_sub(1) as f64);
    }
}

/// Adds [`Admission`] to a server stack.
#[derive(Debug, Clone)]
pub struct AdmissionLayer {
    controller: AdmissionController,
}

impl AdmissionLayer {
    /// A layer with its own controller built from `config`.
    pub fn new(config: &AdmissionConfig) -> Self {
        Self::with_controller(AdmissionController::new(config))
    }

    /// A layer that uses `controller` (to share it, name its metrics, or inspect it in tests).
    pub fn with_controller(controller: AdmissionController) -> Self {
        Self { controller }
    }

    /// The controller.
    pub fn controller(&self) -> &AdmissionController {
        &self.controller
    }
}

impl<S> Layer<S> for AdmissionLayer {
    type Service = Admission<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Admission {
            inner,
            controller: self.controller.clone(),
        }
    }
}

/// The admission service: parses criticality, admits or sheds, holds the permit until the
/// response body is finished.
#[derive(Debug, Clone)]
pub struct Admission<S> {
    inner: S,
    controller: AdmissionController,
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for Admission<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    ResBody: Default,
{
    type Response = Response<body::ResponseBody<ResBody>>;
    type Error = S::Error;
    type Future = future::ResponseFuture<S::Future, ResBody>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<ReqBody>) -> Self::Future {
        if is_exempt_path(request.uri().path()) {
            return future::ResponseFuture::admitted(self.inner.call(request), None);
        }
        let criticality = match Criticality::from_headers(request.headers()) {
            Ok(criticality) => criticality,
            Err(error) => {
                return future::ResponseFuture::rejected(tonic::Status::from(error).into_http());
            }
        };
        request.extensions_mut().insert(criticality);
        match self.controller.try_acquire(criticality) {
            Ok(permit) => future::ResponseFuture::admitted(self.inner.call(request), Some(permit)),
            Err(shed) => {
                tracing::debug!(%shed, "shed");
                future::ResponseFuture::rejected(self.controller.shed_response(&shed))
            }
        }
    }
}

/// True when a response says the request failed in a way that signals overload.
fn signals_overload(headers: &http::HeaderMap) -> bool {
    // A trailers-only gRPC error carries its status in the headers.
    const DEADLINE_EXCEEDED: HeaderValue = HeaderValue::from_static("4");
    headers.get("grpc-status") == Some(&DEADLINE_EXCEEDED)
}

/// The response future of [`Admission`].
pub mod future {
    use std::future::Future;

    use super::*;

    pin_project_lite::pin_project! {
        /// Resolves to the inner response with a body that holds the permit, or to the shed
        /// answer.
        pub struct ResponseFuture<F, B> {
            #[pin]
            state: State<F, B>,
        }
    }

    pin_project_lite::pin_project! {
        #[project = StateProj]
        enum State<F, B> {
            Rejected { response: Option<Response<body::ResponseBody<B>>> },
            Admitted { #[pin] inner: F, permit: Option<Permit> },
        }
    }

    impl<F, B> ResponseFuture<F, B> {
        pub(super) fn admitted(inner: F, permit: Option<Permit>) -> Self {
            Self {
                state: State::Admitted { inner, permit },
            }
        }

        pub(super) fn rejected(response: Response<body::ResponseBody<B>>) -> Self {
            Self {
                state: State::Rejected {
                    response: Some(response),
                },
            }
        }
    }

    impl<F, B, E> Future for ResponseFuture<F, B>
    where
        F: Future<Output = Result<Response<B>, E>>,
        B: Default,
    {
        type Output = Result<Response<body::ResponseBody<B>>, E>;

        fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
            match self.project().state.project() {
                StateProj::Rejected { response } => {
                    Poll::Ready(Ok(response.take().unwrap_or_default()))
                }
                StateProj::Admitted { inner, permit } => {
                    let result = std::task::ready!(inner.poll(cx));
                    let mut permit = permit.take();
                    Poll::Ready(match result {
                        Ok(response) => {
                            if let Some(permit) = permit.as_mut() {
                                permit.sample(signals_overload(response.headers()));
                            }
                            Ok(body::holding(response, permit))
                        }
                        Err(error) => {
                            if let Some(permit) = permit.as_mut() {
                                permit.sample(true);
                            }
                            Err(error)
                        }
                    })
                }
            }
        }
    }
}

/// The response body of [`Admission`].
pub mod body {
    use tonic::Code;

    use super::Permit;
    use crate::rpc::{ObservedBody, Observer};

    /// The inner body, holding the request's admission permit until the body ends or is dropped,
    /// so a long stream counts as in flight for as long as it runs.
    pub type ResponseBody<B> = ObservedBody<B, HeldPermit>;

    /// The admission permit a response holds; giving it back is all its end does.
    #[derive(Debug, Default)]
    pub struct HeldPermit(pub(super) Option<Permit>);

    impl Observer for HeldPermit {
        fn end(self, _code: Code, _started: std::time::Instant) {
            // Dropping `self` gives the permit back.
        }
    }

    impl<B> ObservedBody<B, HeldPermit> {
        /// True while the body still holds an admission permit.
        pub fn holds_permit(&self) -> bool {
            self.observer().is_some_and(|held| held.0.is_some())
        }
    }

    /// `response` with a body holding `permit`.
    pub(super) fn holding<B>(
        response: http::Response<B>,
        permit: Option<Permit>,
    ) -> http::Response<ResponseBody<B>> {
        ObservedBody::wrap(
            response,
            HeldPermit(permit),
            std::time::Instant::now(),
            Code::Internal,
        )
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use std::convert::Infallible;

    use http_body_util::{BodyExt, Empty, StreamBody};
    use tokio::sync::mpsc;
    use tokio_stream::wrappers::ReceiverStream;
    use tonic::{Code, codegen::Bytes};
    use tower::ServiceExt;

    use super::*;
    use crate::metadata::CRITICALITY;

    type TestBody = tonic::body::Body;
    type Frame = http_body::Frame<Bytes>;

    fn request(path: &str, criticality: Option<&'static str>) -> Request<()> {
        let mut request = Request::builder().uri(path).body(()).unwrap();
        if let Some(c) = criticality {
            request
                .headers_mut()
                .insert(CRITICALITY, HeaderValue::from_static(c));
        }
        request
    }

    fn code<B>(response: &Response<B>) -> Code {
        tonic::Status::from_header_map(response.headers())
            .map(|s| s.code())
            .unwrap_or(Code::Ok)
    }

    /// A handler that takes `delay` (on the paused clock) and answers with an empty body.
    fn slow(
        delay: Duration,
    ) -> impl Service<Request<()>, Response = Response<TestBody>, Error = Infallible> + Clone {
        tower::service_fn(move |_request: Request<()>| async move {
            tokio::time::sleep(delay).await;
            Ok::<_, Infallible>(Response::new(TestBody::default()))
        })
    }

    #[tokio::test(start_paused = true)]
    async fn sheds_the_lowest_criticality_first() {
        let layer = AdmissionLayer::new(&AdmissionConfig::fixed(10));
        let controller = layer.controller().clone();
        let mut service = layer.layer(slow(Duration::from_secs(60)));
        // Five slow CRITICAL requests take half the limit: SHEDDABLE is now refused.
        let mut held = Vec::new();
        for _ in 0..5 {
            held.push(service.call(request("/weir.Test/Run", None)));
        }
        let response = service
            .call(request("/weir.Test/Run", Some("SHEDDABLE")))
            .await
            .unwrap();
        assert_eq!(code(&response), Code::Unavailable);
        let status = tonic::Status::from_header_map(response.headers()).unwrap();
        assert_eq!(ApiError::from_status(&status).reason(), "OVERLOADED");
        assert_eq!(
            crate::error::pushback(&status),
            Some(DEFAULT_PUSHBACK),
            "not saturated yet: come back later"
        );
        // SHEDDABLE_PLUS still fits (below 75 %) up to 7 in flight.
        held.push(service.call(request("/weir.Test/Run", Some("SHEDDABLE_PLUS"))));
        held.push(service.call(request("/weir.Test/Run", Some("SHEDDABLE_PLUS"))));
        let response = service
            .call(request("/weir.Test/Run", Some("SHEDDABLE_PLUS")))
            .await
            .unwrap();
        assert_eq!(code(&response), Code::Unavailable);
        // CRITICAL is admitted until the limit.
        for _ in 0..3 {
            held.push(service.call(request("/weir.Test/Run", Some("CRITICAL"))));
        }
        assert_eq!(controller.in_flight(), 10);
        let response = service.call(request("/weir.Test/Run", None)).await.unwrap();
        assert_eq!(code(&response), Code::Unavailable);
        // Saturated: SHEDDABLE is told not to retry at all.
        let response = service
            .call(request("/weir.Test/Run", Some("SHEDDABLE")))
            .await
            .unwrap();
        let pushback = response.headers().get(RETRY_PUSHBACK_MS).cloned();
        assert_eq!(pushback, Some(HeaderValue::from_static("-1")));
        // CRITICAL_PLUS has headroom above the limit (150 %).
        for _ in 0..5 {
            held.push(service.call(request("/weir.Test/Run", Some("CRITICAL_PLUS"))));
        }
        let response = service
            .call(request("/weir.Test/Run", Some("CRITICAL_PLUS")))
            .await
            .unwrap();
        assert_eq!(code(&response), Code::Unavailable);
        assert_eq!(controller.in_flight(), 15);
        // Health checks are never shed.
        let response = service
            .call(request("/grpc.health.v1.Health/Check", Some("SHEDDABLE")))
            .await
            .unwrap();
        assert_eq!(code(&response), Code::Ok);
        // The held requests complete and give their slots back.
        for response in futures::future::join_all(held).await {
            let response = response.unwrap();
            assert_eq!(code(&response), Code::Ok);
            drop(response);
        }
        assert_eq!(controller.in_flight(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn permits_return_after_cancellation() {
        let layer = AdmissionLayer::new(&AdmissionConfig::fixed(4));
        let controller = layer.controller().clone();
        let mut service = layer.layer(slow(Duration::from_secs(60)));
        for _ in 0..10 {
            let futures: Vec<_> = (0..4)
                .map(|_| service.call(request("/weir.Test/Run", None)))
                .collect();
            assert_eq!(controller.in_flight(), 4);
            // A caller that goes away mid-call drops the future.
            let _ = tokio::time::timeout(
                Duration::from_millis(10),
                futures::future::join_all(futures),
            )
            .await;
            assert_eq!(controller.in_flight(), 0);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn permit_is_held_until_a_streamed_body_ends_or_drops() {
        let (senders_tx, mut senders_rx) = mpsc::unbounded_channel();
        let streaming = tower::service_fn(move |_request: Request<()>| {
            let senders_tx = senders_tx.clone();
            async move {
                let (tx, rx) = mpsc::channel::<Result<Frame, Infallible>>(4);
                let _ = senders_tx.send(tx);
                Ok::<_, Infallible>(Response::new(TestBody::new(StreamBody::new(
                    ReceiverStream::new(rx),
                ))))
            }
        });
        let layer = AdmissionLayer::new(&AdmissionConfig::fixed(4));
        let controller = layer.controller().clone();
        let service = layer.layer(streaming);

        // A stream read to its end gives the permit back at the end, not at the headers.
        let response = service
            .clone()
            .oneshot(request("/weir.Test/Stream", None))
            .await
            .unwrap();
        let tx = senders_rx.recv().await.unwrap();
        assert_eq!(
            controller.in_flight(),
            1,
            "headers sent, stream still running"
        );
        let mut body = response.into_body();
        tx.send(Ok(Frame::data(Bytes::from_static(b"token"))))
            .await
            .unwrap();
        assert!(body.frame().await.is_some());
        assert_eq!(controller.in_flight(), 1);
        drop(tx);
        assert!(body.frame().await.is_none());
        assert!(!body.holds_permit());
        assert_eq!(controller.in_flight(), 0);
        drop(body);

        // A stream the client abandons gives it back when the body is dropped.
        let response = service
            .clone()
            .oneshot(request("/weir.Test/Stream", None))
            .await
            .unwrap();
        let _tx = senders_rx.recv().await.unwrap();
        assert_eq!(controller.in_flight(), 1);
        drop(response);
        assert_eq!(controller.in_flight(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn aimd_lowers_the_limit_under_rising_latency_and_recovers() {
        let config = AdmissionConfig {
            initial_limit: 40,
            min_limit: 5,
            max_limit: 60,
            ..AdmissionConfig::default()
        };
        let controller = AdmissionController::new(&config);
        let latency = Arc::new(Mutex::new(Duration::from_millis(10)));
        let service = {
            let latency = latency.clone();
            tower::service_fn(move |_request: Request<()>| {
                let delay = *latency.lock().unwrap();
                async move {
                    tokio::time::sleep(delay).await;
                    Ok::<_, Infallible>(Response::new(Empty::<Bytes>::new()))
                }
            })
        };
        let service = AdmissionLayer::with_controller(controller.clone()).layer(service);
        // Rounds of concurrent requests that use most of the limit.
        let round = |n: usize| {
            let service = service.clone();
            async move {
                let calls = (0..n).map(|_| service.clone().oneshot(request("/t/Run", None)));
                futures::future::join_all(calls).await
            }
        };

        for _ in 0..5 {
            round(30).await;
        }
        let healthy = controller.limit();
        assert!(
            healthy > 40,
            "healthy and busy: the limit grows, got {healthy}"
        );

        // Latency rises tenfold: queueing. The limit comes down, one step per round trip.
        *latency.lock().unwrap() = Duration::from_millis(100);
        let mut limits = Vec::new();
        for _ in 0..10 {
            round(controller.limit()).await;
            limits.push(controller.limit());
        }
        let lowered = controller.limit();
        assert!(
            lowered < healthy * 6 / 10,
            "the limit must come down: {healthy} -> {limits:?}"
        );
        assert!(lowered >= 5, "never below min_limit");

        // Latency back to normal: the limit climbs again, additively.
        *latency.lock().unwrap() = Duration::from_millis(10);
        for _ in 0..5 {
            let n = controller.limit();
            round(n).await;
        }
        let recovered = controller.limit();
        assert!(
            recovered > lowered,
            "the limit recovers: {lowered} -> {recovered}"
        );
        assert!(recovered <= 60, "never above max_limit");
    }

    #[tokio::test(start_paused = true)]
    async fn static_limit_does_not_move_and_invalid_criticality_is_refused() {
        let layer = AdmissionLayer::new(&AdmissionConfig::fixed(3));
        let controller = layer.controller().clone();
        let service = layer.layer(slow(Duration::from_secs(5)));
        for _ in 0..3 {
            let calls = (0..3).map(|_| service.clone().oneshot(request("/t/Run", None)));
            futures::future::join_all(calls).await;
        }
        assert_eq!(controller.limit(), 3);
        let response = service
            .clone()
            .oneshot(request("/t/Run", Some("URGENT")))
            .await
            .unwrap();
        assert_eq!(code(&response), Code::InvalidArgument);
        let status = tonic::Status::from_header_map(response.headers()).unwrap();
        assert!(status.message().contains(CRITICALITY), "{status:?}");
    }

    #[test]
    fn config_validation_names_the_key() {
        assert!(
            AdmissionConfig::default()
                .validate("router.admission")
                .is_ok()
        );
        let bad = AdmissionConfig {
            min_limit: 50,
            max_limit: 20,
            ..AdmissionConfig::default()
        };
        let error = bad
            .validate("router.admission")
            .err()
            .map(|e| e.to_string());
        assert!(
            error
                .as_deref()
                .is_some_and(|e| e.contains("router.admission.max_limit")),
            "{error:?}"
        );
        let text = "initial_limit = 20\nlatency_threshold = \"250ms\"\nalgorithm = \"static\"\n\
                    [shares]\nsheddable = 0.4\n";
        let parsed: AdmissionConfig = toml::from_str(text).unwrap();
        assert_eq!(parsed.latency_threshold, Some(Duration::from_millis(250)));
        assert_eq!(parsed.algorithm, LimitAlgorithm::Static);
        assert_eq!(parsed.shares.sheddable_plus, DEFAULT_SHEDDABLE_PLUS_SHARE);
    }
}
