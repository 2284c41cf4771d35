//! Retries: try a failed call again, but only when it is safe, useful and affordable.
//!
//! The retry layer sits on the client stack below deadline propagation and above the circuit
//! breaker, bulkhead and per-attempt timeout, so every attempt passes those layers on its own.
//! Only this one layer retries a call: a retry further down the stack would multiply with it.
//!
//! # When a call is retried
//!
//! An attempt's result is read by [`crate::outcome::classify`], from the response *headers*. It
//! is retried only if all of these hold:
//!
//! - **It failed before the response started.** A response whose headers carry no `grpc-status`
//!   has started: its messages (for a stream, tokens) are on their way to the caller, so running
//!   the call again would duplicate them. It is returned as it is, whatever happens later in its
//!   body. This is what makes streams safe: nothing is retried after the first token.
//! - **Its code is retryable.** UNAVAILABLE by default ([`RetryPolicy::retry_on`]), plus
//!   RESOURCE_EXHAUSTED when the answer carries a pushback (an upstream model API's Retry-After,
//!   which the inference service turns into `grpc-retry-pushback-ms`). INVALID_ARGUMENT,
//!   NOT_FOUND, PERMISSION_DENIED, CANCELLED and DEADLINE_EXCEEDED are never retried
//!   ([`NEVER_RETRIED`]): the same request would fail the same way, or the caller has gone.
//! - **The server did not ask us to stop.** `grpc-retry-pushback-ms` ≥ 0 means "retry after
//!   exactly this long" and replaces the backoff; a negative or unparsable value means "do not".
//! - **Attempts are left.** Attempts count the first call: [`DEFAULT_MAX_ATTEMPTS`] (3), clamped
//!   to [`MAX_ATTEMPTS_LIMIT`] (5), as gRPC does (gRFC A6).
//! - **The retry can still be useful.** With a deadline (the [`Deadline`] that
//!   [`crate::deadline::DeadlineLayer::propagate`] stored, else the request's `grpc-timeout`), the
//!   time remaining must cover the backoff plus [`RetryPolicy::min_attempt_time`]; an attempt that
//!   cannot get that much time only adds load.
//! - **The budget allows it** (below).
//!
//! When a retry is refused, the caller gets the last attempt's answer unchanged (status, message,
//! details), so it can still decide on a fallback.
//!
//! # Backoff
//!
//! Full jitter: before retry *n* (n = 1 for the second attempt) the layer waits
//! `random(0, min(initial · 2^(n−1), max))`, initial [`DEFAULT_INITIAL_BACKOFF`] (100 ms), max
//! [`DEFAULT_MAX_BACKOFF`] (1 s). Randomising the whole interval, not just a part of it, spreads
//! the retries of many clients that failed at the same moment, so they do not return together.
//! The random source can be seeded ([`RetryLayer::with_seed`]) for reproducible tests.
//!
//! # Why budgets and not max retries?
//!
//! A maximum of 3 attempts looks harmless, but when a backend fails outright it means every call
//! is sent three times: the outage triples the load on the thing that is already failing, and if
//! the layers above retry too, the factors multiply into a self-inflicted denial of service. A
//! **retry budget** bounds retries as a share of *first* attempts instead: retries may add at most
//! [`DEFAULT_BUDGET_RATIO`] (20%) on top of the calls made, plus a floor of
//! [`DEFAULT_BUDGET_MIN_PER_SEC`] (10) retries per second so a quiet client can still retry,
//! over a sliding [`DEFAULT_BUDGET_TTL`] (10 s) window (Finagle's and Linkerd's defaults). During
//! an outage the load is then multiplied by about 1.2, not 3 (`examples/retry_amplification.rs`
//! measures 1.21 at 1,000 calls/s, and 1.30 at 100 calls/s, where the floor adds 10%), while an
//! occasional failure among healthy calls is still retried. The budget is tower's
//! [`TpsBudget`], which implements exactly this: each call deposits one token, each retry
//! withdraws `1 / ratio` tokens, and the floor is a reserve of `min_per_sec × ttl` retries.
//!
//! **The budget is per backend**: a [`RetryBudget`] holds one `TpsBudget` per [`BackendKey`]
//! (the key in the request's extensions, else the layer's default key), and is shared by every
//! stack that reaches those backends (clone it). A budget per stack would let the healthy calls
//! of one model pay for the retries of a failing one, through one channel to the inference
//! service, so the failing model would see up to the full 3× again.
//!
//! # Replaying the request
//!
//! An `http::Request` body can be sent only once, so the layer reads it fully before the first
//! attempt and builds a fresh body for each attempt. Weir's RPCs are unary or server-streaming:
//! the request is one message, and reading it costs nothing but the copy. A body larger than
//! [`RetryPolicy::max_replay_bytes`] (default 4 MiB) is sent once, not retried, without being held
//! in memory twice. (A client-streaming or bidirectional call, which Weir does not have, must not
//! go through this layer: its body does not end before the answer.)
//!
//! Each attempt carries `grpc-timeout` = the time remaining and, from the second on,
//! `grpc-previous-rpc-attempts` (gRFC A6).
//!
//! # Metrics
//!
//! `weir_retry_attempts_total{backend}` (every attempt, first included),
//! `weir_retries_total{backend}`, `weir_retry_budget_exhausted_total{backend}` (retries refused by
//! the budget) and `weir_retry_pushback_total{backend}` (retries that waited a server's pushback).

use std::{
    collections::HashMap,
    convert::Infallible,
    fmt,
    future::Future,
    pin::Pin,
    sync::{Arc, Mutex, PoisonError},
    task::{Context, Poll},
    time::Duration,
};

use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use http::{HeaderMap, HeaderValue};
use http_body::Frame;
use http_body_util::{BodyExt, BodyStream, Full, StreamBody};
use rand::{Rng, SeedableRng, rngs::StdRng};
use tonic::{Code, Status, body::Body};
use tower::{
    BoxError, Layer, Service, ServiceExt,
    retry::budget::{Budget, TpsBudget},
};

use crate::{
    backend::BackendKey,
    config::ConfigError,
    deadline::{Deadline, set_header_timeout},
    error::{code_name, parse_code},
    metadata::PREVIOUS_RPC_ATTEMPTS,
    outcome::{self, Pushback},
};

/// Default number of attempts, the first call included.
pub const DEFAULT_MAX_ATTEMPTS: u32 = 3;
/// Most attempts a policy can ask for; larger values are clamped to it (gRFC A6).
pub const MAX_ATTEMPTS_LIMIT: u32 = 5;
/// Default cap of the first retry's backoff; it doubles for each further retry.
pub const DEFAULT_INITIAL_BACKOFF: Duration = Duration::from_millis(100);
/// Default cap of any retry's backoff.
pub const DEFAULT_MAX_BACKOFF: Duration = Duration::from_secs(1);
/// Default least time an attempt must be able to get before its deadline to be worth sending.
pub const DEFAULT_MIN_ATTEMPT_TIME: Duration = Duration::from_millis(10);
/// Default largest request body kept for replay (4 MiB); larger calls are sent once.
pub const DEFAULT_MAX_REPLAY_BYTES: usize = 4 * 1024 * 1024;
/// Default codes retried (besides RESOURCE_EXHAUSTED with pushback).
pub const DEFAULT_RETRY_ON: &[&str] = &["UNAVAILABLE"];
/// Codes that are never retried, whatever the configuration says.
pub const NEVER_RETRIED: &[Code] = &[
    Code::Ok,
    Code::InvalidArgument,
    Code::NotFound,
    Code::PermissionDenied,
    Code::Cancelled,
    Code::DeadlineExceeded,
];
/// Default window over which the retry budget counts calls and retries.
pub const DEFAULT_BUDGET_TTL: Duration = Duration::from_secs(10);
/// Default floor of the retry budget: retries per second allowed whatever the traffic.
pub const DEFAULT_BUDGET_MIN_PER_SEC: u32 = 10;
/// Default share of calls that may be retried on top of the floor (0.2 = 20%).
pub const DEFAULT_BUDGET_RATIO: f32 = 0.2;

/// What to retry and how (`[<service>.retry]` in `weir.toml`).
///
/// ```toml
/// [router.retry]
/// max_attempts = 3
/// initial_backoff = "100ms"
/// max_backoff = "1s"
/// retry_on = ["UNAVAILABLE"]
/// retry_resource_exhausted_with_pushback = true
/// min_attempt_time = "10ms"
/// max_replay_bytes = 4194304
/// ```
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct RetryPolicy {
    /// Attempts, the first call included; 1 disables retries. Values above
    /// [`MAX_ATTEMPTS_LIMIT`] are treated as it. Default [`DEFAULT_MAX_ATTEMPTS`].
    pub max_attempts: u32,
    /// Cap of the first retry's random backoff. Default [`DEFAULT_INITIAL_BACKOFF`].
    #[serde(with = "humantime_serde")]
    pub initial_backoff: Duration,
    /// Cap of every retry's random backoff. Default [`DEFAULT_MAX_BACKOFF`].
    #[serde(with = "humantime_serde")]
    pub max_backoff: Duration,
    /// gRPC codes (UPPER_SNAKE names) retried. Default [`DEFAULT_RETRY_ON`]. Codes in
    /// [`NEVER_RETRIED`] and RESOURCE_EXHAUSTED are refused by [`RetryPolicy::validate`].
    pub retry_on: Vec<String>,
    /// Whether RESOURCE_EXHAUSTED is retried when the answer carries a pushback (an upstream's
    /// Retry-After), after exactly that delay. Default `true`.
    pub retry_resource_exhausted_with_pushback: bool,
    /// Least time an attempt must be able to get before the deadline, after its backoff.
    /// Default [`DEFAULT_MIN_ATTEMPT_TIME`].
    #[serde(with = "humantime_serde")]
    pub min_attempt_time: Duration,
    /// Largest request body kept for replay, in bytes; larger calls are not retried.
    /// Default [`DEFAULT_MAX_REPLAY_BYTES`].
    pub max_replay_bytes: usize,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: DEFAULT_MAX_ATTEMPTS,
            initial_backoff: DEFAULT_INITIAL_BACKOFF,
            max_backoff: DEFAULT_MAX_BACKOFF,
            retry_on: DEFAULT_RETRY_ON.iter().map(|c| c.to_string()).collect(),
            retry_resource_exhausted_with_pushback: true,
            min_attempt_time: DEFAULT_MIN_ATTEMPT_TIME,
            max_replay_bytes: DEFAULT_MAX_REPLAY_BYTES,
        }
    }
}

impl RetryPolicy {
    /// Checks the values, naming the key under `key_prefix` (e.g. `router.retry`) at fault.
    pub fn validate(&self, key_prefix: &str) -> Result<(), ConfigError> {
        if self.max_attempts == 0 {
            return Err(ConfigError::invalid(
                format!("{key_prefix}.max_attempts"),
                "must be at least 1 (the first call counts as an attempt)",
            ));
        }
        if self.initial_backoff > self.max_backoff {
            return Err(ConfigError::invalid(
                format!("{key_prefix}.initial_backoff"),
                "must not be longer than max_backoff",
            ));
        }
        for name in &self.retry_on {
            let key = format!("{key_prefix}.retry_on");
            let code = parse_code(name)
                .ok_or_else(|| ConfigError::invalid(&key, format!("unknown gRPC code {name:?}")))?;
            if NEVER_RETRIED.contains(&code) {
                return Err(ConfigError::invalid(
                    key,
                    format!(
                        "{} is never retried: the same request would fail the same way, or the \
                         caller has gone",
                        code_name(code)
                    ),
                ));
            }
            if code == Code::ResourceExhausted {
                return Err(ConfigError::invalid(
                    key,
                    "RESOURCE_EXHAUSTED is retried only with a pushback; see \
                     retry_resource_exhausted_with_pushback",
                ));
            }
        }
        Ok(())
    }

    /// The attempts this policy allows, clamped to `1..=MAX_ATTEMPTS_LIMIT`.
    pub fn attempts(&self) -> u32 {
        self.max_attempts.clamp(1, MAX_ATTEMPTS_LIMIT)
    }

    /// The cap of retry `n`'s backoff (n ≥ 1): `min(initial · 2^(n−1), max)`.
    pub fn backoff_cap(&self, retry: u32) -> Duration {
        let factor = 1u32 << retry.saturating_sub(1).min(31);
        self.initial_backoff
            .saturating_mul(factor)
            .min(self.max_backoff)
    }

    /// The codes of `retry_on` that may be retried (unknown and never-retried names dropped).
    fn codes(&self) -> Vec<Code> {
        self.retry_on
            .iter()
            .filter_map(|name| parse_code(name))
            .filter(|code| !NEVER_RETRIED.contains(code) && *code != Code::ResourceExhausted)
            .collect()
    }
}

/// Size of the retry budget (`[<service>.retry_budget]` in `weir.toml`).
///
/// ```toml
/// [router.retry_budget]
/// ttl = "10s"
/// min_retries_per_sec = 10
/// retry_ratio = 0.2
/// ```
#[derive(Debug, Clone, PartialEq, serde::Deserialize, serde::Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct RetryBudgetConfig {
    /// Window over which calls and retries are counted, 1 s to 60 s. Default
    /// [`DEFAULT_BUDGET_TTL`].
    #[serde(with = "humantime_serde")]
    pub ttl: Duration,
    /// Retries per second allowed whatever the traffic. Default [`DEFAULT_BUDGET_MIN_PER_SEC`].
    pub min_retries_per_sec: u32,
    /// Retries allowed per call on top of the floor, 0 to 1000 (0.2 = 20%). Default
    /// [`DEFAULT_BUDGET_RATIO`].
    pub retry_ratio: f32,
}

impl Default for RetryBudgetConfig {
    fn default() -> Self {
        Self {
            ttl: DEFAULT_BUDGET_TTL,
            min_retries_per_sec: DEFAULT_BUDGET_MIN_PER_SEC,
            retry_ratio: DEFAULT_BUDGET_RATIO,
        }
    }
}

impl RetryBudgetConfig {
    /// Checks the values, naming the key under `key_prefix` (e.g. `router.retry_budget`).
    pub fn validate(&self, key_prefix: &str) -> Result<(), ConfigError> {
        if !(Duration::from_secs(1)..=Duration::from_secs(60)).contains(&self.ttl) {
            return Err(ConfigError::invalid(
                format!("{key_prefix}.ttl"),
                "must be between 1s and 60s",
            ));
        }
        if !(0.0..=1000.0).contains(&self.retry_ratio) {
            return Err(ConfigError::invalid(
                format!("{key_prefix}.retry_ratio"),
                "must be between 0 and 1000 (0.2 = 20% of calls)",
            ));
        }
        if self.min_retries_per_sec >= i32::MAX as u32 {
            return Err(ConfigError::invalid(
                format!("{key_prefix}.min_retries_per_sec"),
                "is too large",
            ));
        }
        Ok(())
    }

    /// A `TpsBudget` of this size; out-of-range values (which `validate` reports) are clamped
    /// into range instead of panicking as `TpsBudget::new` would.
    fn tps_budget(&self) -> TpsBudget {
        let ttl = self
            .ttl
            .clamp(Duration::from_secs(1), Duration::from_secs(60));
        let ratio = if self.retry_ratio.is_nan() {
            DEFAULT_BUDGET_RATIO
        } else {
            self.retry_ratio.clamp(0.0, 1000.0)
        };
        let floor = self.min_retries_per_sec.min(i32::MAX as u32 - 1);
        TpsBudget::new(ttl, floor, ratio)
    }
}

/// The retry budget shared by the stacks that reach the same backends: one
/// [`TpsBudget`] per [`BackendKey`], created on first use. Cheap to clone (an `Arc`).
#[derive(Clone)]
pub struct RetryBudget {
    inner: Arc<BudgetKind>,
}

enum BudgetKind {
    Tps {
        config: RetryBudgetConfig,
        per_backend: Mutex<HashMap<BackendKey, Arc<TpsBudget>>>,
    },
    Unlimited,
}

impl RetryBudget {
    /// A budget of the configured size per backend.
    pub fn new(config: &RetryBudgetConfig) -> Self {
        Self {
            inner: Arc::new(BudgetKind::Tps {
                config: config.clone(),
                per_backend: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// No budget: every retry the policy allows is made. For comparisons and tests only; this is
    /// the retry storm the budget exists to prevent.
    pub fn unlimited() -> Self {
        Self {
            inner: Arc::new(BudgetKind::Unlimited),
        }
    }

    /// The budget of `backend` (`None`: unlimited).
    fn of(&self, backend: &BackendKey) -> Option<Arc<TpsBudget>> {
        match &*self.inner {
            BudgetKind::Unlimited => None,
            BudgetKind::Tps {
                config,
                per_backend,
            } => {
                let mut map = per_backend.lock().unwrap_or_else(PoisonError::into_inner);
                Some(
                    map.entry(backend.clone())
                        .or_insert_with(|| Arc::new(config.tps_budget()))
                        .clone(),
                )
            }
        }
    }
}

impl Default for RetryBudget {
    fn default() -> Self {
        Self::new(&RetryBudgetConfig::default())
    }
}

impl fmt::Debug for RetryBudget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &*self.inner {
            BudgetKind::Unlimited => f.write_str("RetryBudget(unlimited)"),
            BudgetKind::Tps { config, .. } => f.debug_tuple("RetryBudget").field(config).finish(),
        }
    }
}

/// Name of the backend of requests without a [`BackendKey`], unless
/// [`RetryLayer::with_default_backend`] names it.
pub const DEFAULT_BACKEND: &str = "default";

/// The retry layer; see the [module docs](self).
#[derive(Clone)]
pub struct RetryLayer {
    policy: Arc<Resolved>,
    budget: RetryBudget,
    default_backend: BackendKey,
    rng: Arc<Mutex<StdRng>>,
}

/// A policy with its codes parsed once.
#[derive(Debug)]
struct Resolved {
    policy: RetryPolicy,
    codes: Vec<Code>,
}

impl RetryLayer {
    /// Retries by `policy`, spending from `budget` (share it between the stacks that reach the
    /// same backends).
    pub fn new(policy: RetryPolicy, budget: RetryBudget) -> Self {
        let codes = policy.codes();
        Self {
            policy: Arc::new(Resolved { policy, codes }),
            budget,
            default_backend: BackendKey::new(DEFAULT_BACKEND),
            rng: Arc::new(Mutex::new(StdRng::from_os_rng())),
        }
    }

    /// Names the backend of requests that carry no [`BackendKey`] (budget and metrics label).
    pub fn with_default_backend(mut self, backend: BackendKey) -> Self {
        self.default_backend = backend;
        self
    }

    /// Draws the backoff jitter from a generator seeded with `seed`, for reproducible runs.
    pub fn with_seed(mut self, seed: u64) -> Self {
        self.rng = Arc::new(Mutex::new(StdRng::seed_from_u64(seed)));
        self
    }
}

impl fmt::Debug for RetryLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RetryLayer")
            .field("policy", &self.policy.policy)
            .field("budget", &self.budget)
            .field("default_backend", &self.default_backend)
            .finish()
    }
}

impl<S> Layer<S> for RetryLayer {
    type Service = Retry<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Retry {
            inner,
            layer: self.clone(),
        }
    }
}

/// The service [`RetryLayer`] builds.
#[derive(Clone, Debug)]
pub struct Retry<S> {
    inner: S,
    layer: RetryLayer,
}

impl<S> Service<http::Request<Body>> for Retry<S>
where
    S: Service<http::Request<Body>, Response = http::Response<Body>> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: Into<BoxError>,
{
    type Response = http::Response<Body>;
    type Error = BoxError;
    type Future = future::ResponseFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        // The service that was polled ready goes with this call; a clone stays for the next.
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        future::ResponseFuture::new(Box::pin(run(inner, self.layer.clone(), request)))
    }
}

/// The retry layer's response future.
pub mod future {
    use super::*;

    type Boxed = Pin<Box<dyn Future<Output = Result<http::Response<Body>, BoxError>> + Send>>;

    /// Resolves to the answer of the last attempt made.
    pub struct ResponseFuture {
        inner: Boxed,
    }

    impl ResponseFuture {
        pub(super) fn new(inner: Boxed) -> Self {
            Self { inner }
        }
    }

    impl Future for ResponseFuture {
        type Output = Result<http::Response<Body>, BoxError>;

        fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
            self.inner.as_mut().poll(cx)
        }
    }

    impl fmt::Debug for ResponseFuture {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("retry::ResponseFuture")
        }
    }
}

/// One call: the first attempt and the retries the policy, deadline and budget allow.
async fn run<S>(
    mut inner: S,
    layer: RetryLayer,
    request: http::Request<Body>,
) -> Result<http::Response<Body>, BoxError>
where
    S: Service<http::Request<Body>, Response = http::Response<Body>>,
    S::Error: Into<BoxError>,
{
    let backend = BackendKey::of(request.extensions())
        .cloned()
        .unwrap_or_else(|| layer.default_backend.clone());
    let label = backend.to_string();
    let budget = layer.budget.of(&backend);
    if let Some(budget) = &budget {
        budget.deposit();
    }
    let policy = &layer.policy;
    let max_attempts = policy.policy.attempts();
    metrics::counter!("weir_retry_attempts_total", "backend" => label.clone()).increment(1);
    if max_attempts <= 1 {
        return inner.call(request).await.map_err(Into::into);
    }
    let deadline = Deadline::of_http(&request);

    let (parts, body) = request.into_parts();
    let template = Template {
        method: parts.method,
        uri: parts.uri,
        version: parts.version,
        headers: parts.headers,
        extensions: parts.extensions,
    };
    let replay = match buffer(body, policy.policy.max_replay_bytes).await? {
        Buffered::Replay(replay) => replay,
        Buffered::TooLarge(body) => {
            tracing::debug!(backend = %label, "request body too large to replay: not retried");
            let request = template.request(body, 1, deadline);
            return inner.call(request).await.map_err(Into::into);
        }
    };

    let mut attempt = 1;
    loop {
        let request = template.request(replay.body(), attempt, deadline);
        if attempt > 1 {
            // The first attempt uses the readiness `poll_ready` reserved.
            inner.ready().await.map_err(Into::into)?;
        }
        let result = inner.call(request).await.map_err(Into::into);
        let outcome = outcome::classify(&result);
        if let Err(error) = &result
            && outcome::is_local_rejection(&**error)
        {
            // An open circuit or a full bulkhead below us: the same backend stays closed for a
            // while, so the caller's fallback moves on instead of waiting here.
            return result;
        }
        let delay = match policy.next_delay(outcome, attempt, max_attempts, deadline, &layer) {
            Some(delay) => delay,
            None => return result,
        };
        if let Some(budget) = &budget
            && !budget.withdraw()
        {
            metrics::counter!("weir_retry_budget_exhausted_total", "backend" => label.clone())
                .increment(1);
            tracing::debug!(backend = %label, attempt, "retry budget exhausted: not retried");
            return result;
        }
        if matches!(outcome.pushback, Pushback::After(_)) {
            metrics::counter!("weir_retry_pushback_total", "backend" => label.clone()).increment(1);
        }
        tracing::debug!(
            backend = %label,
            attempt,
            code = code_name(outcome.code),
            delay_ms = delay.as_millis(),
            "retrying"
        );
        // Drop the failed answer before waiting: it may hold a connection's resources.
        drop(result);
        tokio::time::sleep(delay).await;
        attempt += 1;
        metrics::counter!("weir_retries_total", "backend" => label.clone()).increment(1);
        metrics::counter!("weir_retry_attempts_total", "backend" => label.clone()).increment(1);
    }
}

impl Resolved {
    /// The wait before the next attempt, or `None` if the last one's answer is final.
    fn next_delay(
        &self,
        outcome: outcome::Outcome,
        attempt: u32,
        max_attempts: u32,
        deadline: Option<Deadline>,
        layer: &RetryLayer,
    ) -> Option<Duration> {
        // Started (or succeeded): committed, never retried.
        if outcome.is_ok() {
            return None;
        }
        let pushback = match outcome.pushback {
            Pushback::Stop => return None,
            Pushback::After(delay) => Some(delay),
            Pushback::None => None,
        };
        let retryable = self.codes.contains(&outcome.code)
            || (outcome.code == Code::ResourceExhausted
                && self.policy.retry_resource_exhausted_with_pushback
                && pushback.is_some());
        if !retryable || attempt >= max_attempts {
            return None;
        }
        let delay = pushback.unwrap_or_else(|| {
            let cap = self.policy.backoff_cap(attempt);
            let cap_nanos = u64::try_from(cap.as_nanos()).unwrap_or(u64::MAX);
            let mut rng = layer.rng.lock().unwrap_or_else(PoisonError::into_inner);
            Duration::from_nanos(rng.random_range(0..=cap_nanos))
        });
        if let Some(deadline) = deadline
            && deadline.remaining() < delay.saturating_add(self.policy.min_attempt_time)
        {
            return None;
        }
        Some(delay)
    }
}

/// The parts of the request every attempt copies.
struct Template {
    method: http::Method,
    uri: http::Uri,
    version: http::Version,
    headers: HeaderMap,
    extensions: http::Extensions,
}

impl Template {
    /// Attempt number `attempt` (1 = the first call) of the request, with `body`.
    fn request(&self, body: Body, attempt: u32, deadline: Option<Deadline>) -> http::Request<Body> {
        let mut request = http::Request::new(body);
        *request.method_mut() = self.method.clone();
        *request.uri_mut() = self.uri.clone();
        *request.version_mut() = self.version;
        *request.headers_mut() = self.headers.clone();
        *request.extensions_mut() = self.extensions.clone();
        if attempt > 1 {
            request
                .headers_mut()
                .insert(PREVIOUS_RPC_ATTEMPTS, HeaderValue::from(attempt - 1));
        }
        if let Some(deadline) = deadline {
            set_header_timeout(request.headers_mut(), deadline.remaining());
        }
        request
    }
}

/// A request body read for replay, or given back whole when it was too large.
enum Buffered {
    Replay(Replay),
    TooLarge(Body),
}

/// A request body that can be sent again.
struct Replay {
    data: Bytes,
    trailers: Option<HeaderMap>,
}

impl Replay {
    /// A fresh body with the same bytes (and trailers, which gRPC requests do not use).
    fn body(&self) -> Body {
        match &self.trailers {
            None => Body::new(Full::new(self.data.clone())),
            Some(trailers) => Body::new(StreamBody::new(futures::stream::iter([
                Ok::<_, Infallible>(Frame::data(self.data.clone())),
                Ok(Frame::trailers(trailers.clone())),
            ]))),
        }
    }
}

/// Reads `body` to its end, up to `limit` bytes. Past the limit, gives back a body that sends
/// what was read followed by the rest, unread.
async fn buffer(mut body: Body, limit: usize) -> Result<Buffered, Status> {
    let mut chunks: Vec<Bytes> = Vec::new();
    let mut size = 0usize;
    let mut trailers = None;
    while let Some(frame) = body.frame().await {
        let frame = match frame?.into_data() {
            Ok(data) => {
                size = size.saturating_add(data.len());
                chunks.push(data);
                if size > limit {
                    let read = futures::stream::iter(chunks.into_iter().map(Frame::data).map(Ok));
                    let rest = BodyStream::new(body);
                    return Ok(Buffered::TooLarge(Body::new(StreamBody::new(
                        read.chain(rest),
                    ))));
                }
                continue;
            }
            Err(frame) => frame,
        };
        if let Ok(frame_trailers) = frame.into_trailers() {
            trailers = Some(frame_trailers);
        }
    }
    let data = match chunks.len() {
        0 => Bytes::new(),
        1 => chunks.swap_remove(0),
        _ => {
            let mut all = BytesMut::with_capacity(size);
            for chunk in chunks {
                all.extend_from_slice(&chunk);
            }
            all.freeze()
        }
    };
    Ok(Buffered::Replay(Replay { data, trailers }))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use tokio::time::Instant;
    use tower::{ServiceBuilder, service_fn};

    use super::*;
    use crate::{
        ApiError,
        deadline::{DEFAULT_MARGIN, DeadlineLayer},
        metadata::{GRPC_TIMEOUT, RETRY_PUSHBACK_MS},
    };

    /// What the fake backend saw of one attempt.
    #[derive(Debug, Clone)]
    struct Seen {
        at: Instant,
        previous_attempts: Option<String>,
        timeout: Option<Duration>,
        body: Bytes,
    }

    /// A trailers-only answer with `code`, as a tonic server sends errors, and an optional
    /// `grpc-retry-pushback-ms`.
    fn trailers_only(code: Code, message: &str, pushback: Option<&'static str>) -> Reply {
        let mut response: http::Response<Body> =
            Status::from(ApiError::new(code, code_name(code), message)).into_http();
        if let Some(pushback) = pushback {
            response
                .headers_mut()
                .insert(RETRY_PUSHBACK_MS, HeaderValue::from_static(pushback));
        }
        Reply::Answer(response)
    }

    /// A started response: headers without `grpc-status`, the messages to follow.
    fn started() -> Reply {
        Reply::Answer(http::Response::new(Body::empty()))
    }

    enum Reply {
        Answer(http::Response<Body>),
        Transport,
        After(Duration, Box<Reply>),
    }

    /// A fake backend: `script(n)` (n = 1 for the first call it receives) says how it answers.
    #[derive(Clone)]
    struct Fake {
        seen: Arc<Mutex<Vec<Seen>>>,
    }

    impl Fake {
        fn new() -> Self {
            Self {
                seen: Arc::default(),
            }
        }

        fn calls(&self) -> usize {
            self.seen.lock().unwrap().len()
        }

        fn seen(&self) -> Vec<Seen> {
            self.seen.lock().unwrap().clone()
        }

        fn service(
            &self,
            script: impl Fn(usize) -> Reply + Send + Sync + 'static,
        ) -> impl Service<
            http::Request<Body>,
            Response = http::Response<Body>,
            Error = BoxError,
            Future = impl Send + 'static,
        > + Clone
        + Send
        + 'static {
            let seen = self.seen.clone();
            let script = Arc::new(script);
            service_fn(move |request: http::Request<Body>| {
                let seen = seen.clone();
                let script = script.clone();
                async move {
                    let (parts, body) = request.into_parts();
                    let header = |name| {
                        parts
                            .headers
                            .get(name)
                            .and_then(|v: &HeaderValue| v.to_str().ok())
                            .map(str::to_string)
                    };
                    let previous_attempts = header(PREVIOUS_RPC_ATTEMPTS);
                    let timeout =
                        header(GRPC_TIMEOUT).and_then(|t| crate::deadline::parse_grpc_timeout(&t));
                    drop(parts);
                    let at = Instant::now();
                    let body = body.collect().await.unwrap().to_bytes();
                    let n = {
                        let mut seen = seen.lock().unwrap();
                        seen.push(Seen {
                            at,
                            previous_attempts,
                            timeout,
                            body,
                        });
                        seen.len()
                    };
                    let mut reply = script(n);
                    loop {
                        match reply {
                            Reply::Answer(response) => return Ok(response),
                            Reply::Transport => return Err(BoxError::from("connection reset")),
                            Reply::After(delay, next) => {
                                tokio::time::sleep(delay).await;
                                reply = *next;
                            }
                        }
                    }
                }
            })
        }
    }

    fn policy(max_attempts: u32) -> RetryPolicy {
        RetryPolicy {
            max_attempts,
            ..RetryPolicy::default()
        }
    }

    fn request(body: &'static [u8]) -> http::Request<Body> {
        http::Request::builder()
            .uri("http://weir.test/t.T/M")
            .body(Body::new(Full::new(Bytes::from_static(body))))
            .unwrap()
    }

    fn code_of(result: &Result<http::Response<Body>, BoxError>) -> Code {
        outcome::classify(result).code
    }

    fn message_of(result: &Result<http::Response<Body>, BoxError>) -> String {
        match result {
            Ok(response) => Status::from_header_map(response.headers())
                .map(|s| s.message().to_string())
                .unwrap_or_default(),
            Err(error) => error.to_string(),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn unavailable_is_retried_until_the_attempts_run_out_and_the_last_answer_is_returned() {
        let fake = Fake::new();
        let service = RetryLayer::new(policy(3), RetryBudget::unlimited())
            .with_seed(1)
            .layer(fake.service(|n| trailers_only(Code::Unavailable, &format!("try {n}"), None)));
        let result = service.oneshot(request(b"prompt")).await;
        assert_eq!(code_of(&result), Code::Unavailable);
        assert_eq!(message_of(&result), "try 3");
        assert_eq!(fake.calls(), 3);
        // Every attempt carried the same body.
        assert!(fake.seen().iter().all(|s| s.body == "prompt"));
    }

    #[tokio::test(start_paused = true)]
    async fn max_attempts_is_clamped_to_five() {
        let fake = Fake::new();
        let service = RetryLayer::new(policy(50), RetryBudget::unlimited())
            .with_seed(1)
            .layer(fake.service(|_| trailers_only(Code::Unavailable, "down", None)));
        service.oneshot(request(b"x")).await.unwrap();
        assert_eq!(fake.calls(), 5);
    }

    #[tokio::test(start_paused = true)]
    async fn a_transport_error_is_retried_and_a_success_ends_the_call() {
        let fake = Fake::new();
        let service = RetryLayer::new(policy(3), RetryBudget::unlimited())
            .with_seed(1)
            .layer(fake.service(|n| if n == 1 { Reply::Transport } else { started() }));
        let result = service.oneshot(request(b"x")).await;
        assert_eq!(code_of(&result), Code::Ok);
        assert_eq!(fake.calls(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn codes_that_would_fail_again_are_never_retried() {
        for code in [
            Code::InvalidArgument,
            Code::NotFound,
            Code::PermissionDenied,
            Code::Cancelled,
            Code::DeadlineExceeded,
            Code::Internal,
            Code::ResourceExhausted,
        ] {
            let fake = Fake::new();
            let service = RetryLayer::new(policy(5), RetryBudget::unlimited())
                .with_seed(1)
                .layer(fake.service(move |_| trailers_only(code, "no", None)));
            let result = service.oneshot(request(b"x")).await;
            assert_eq!(code_of(&result), code);
            assert_eq!(message_of(&result), "no");
            assert_eq!(fake.calls(), 1, "{code:?} was retried");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_timed_out_attempt_is_not_retried() {
        // tonic's channel timing out the attempt's grpc-timeout: a timeout, not a transport error.
        let calls = Arc::new(AtomicUsize::new(0));
        let counter = calls.clone();
        let channel = service_fn(move |_request: http::Request<Body>| {
            counter.fetch_add(1, Ordering::SeqCst);
            async { Err::<http::Response<Body>, BoxError>(Box::new(tonic::TimeoutExpired(()))) }
        });
        let service = RetryLayer::new(policy(3), RetryBudget::unlimited()).layer(channel);
        let result = service.oneshot(request(b"x")).await;
        assert!(result.is_err());
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn retry_delays_stay_within_full_jitter_bounds() {
        let policy = policy(5);
        let layer = RetryLayer::new(policy.clone(), RetryBudget::unlimited()).with_seed(7);
        let mut largest = [Duration::ZERO; 4];
        for _ in 0..200 {
            let fake = Fake::new();
            let service = layer
                .clone()
                .layer(fake.service(|_| trailers_only(Code::Unavailable, "down", None)));
            service.oneshot(request(b"x")).await.unwrap();
            let seen = fake.seen();
            assert_eq!(seen.len(), 5);
            for (retry, pair) in seen.windows(2).enumerate() {
                let waited = pair[1].at - pair[0].at;
                let cap = policy.backoff_cap(retry as u32 + 1);
                assert!(
                    waited <= cap,
                    "retry {} waited {waited:?} > {cap:?}",
                    retry + 1
                );
                largest[retry] = largest[retry].max(waited);
            }
        }
        // The caps are 100, 200, 400 and 800 ms; the draws cover their whole range.
        let caps: Vec<_> = (1..=4).map(|n| policy.backoff_cap(n)).collect();
        assert_eq!(
            caps,
            [100, 200, 400, 800].map(Duration::from_millis).to_vec()
        );
        for (largest, cap) in largest.iter().zip(&caps) {
            assert!(*largest > *cap * 9 / 10, "{largest:?} of {cap:?}");
        }
        assert_eq!(policy.backoff_cap(6), DEFAULT_MAX_BACKOFF);
    }

    #[tokio::test(start_paused = true)]
    async fn retries_send_the_attempt_count_and_the_time_remaining() {
        let fake = Fake::new();
        let service = RetryLayer::new(policy(3), RetryBudget::unlimited())
            .with_seed(3)
            .layer(fake.service(|_| trailers_only(Code::Unavailable, "down", None)));
        let mut request = request(b"x");
        let deadline = Deadline::after(Duration::from_secs(2));
        request.extensions_mut().insert(deadline);
        service.oneshot(request).await.unwrap();
        let seen = fake.seen();
        let previous: Vec<_> = seen.iter().map(|s| s.previous_attempts.clone()).collect();
        assert_eq!(previous, [None, Some("1".into()), Some("2".into())]);
        for attempt in &seen {
            assert_eq!(
                attempt.timeout,
                Some(deadline.instant() - attempt.at),
                "grpc-timeout is the time remaining at each attempt"
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn pushback_replaces_the_backoff() {
        let fake = Fake::new();
        let service = RetryLayer::new(policy(3), RetryBudget::unlimited())
            .with_seed(1)
            .layer(fake.service(|n| match n {
                1 => trailers_only(Code::Unavailable, "busy", Some("700")),
                _ => started(),
            }));
        let result = service.oneshot(request(b"x")).await;
        assert_eq!(code_of(&result), Code::Ok);
        let seen = fake.seen();
        assert_eq!(seen[1].at - seen[0].at, Duration::from_millis(700));
    }

    #[tokio::test(start_paused = true)]
    async fn resource_exhausted_is_retried_only_with_pushback() {
        // An upstream 429 with Retry-After: 2 s, turned into pushback by the inference service.
        let fake = Fake::new();
        let service = RetryLayer::new(policy(3), RetryBudget::unlimited())
            .with_seed(1)
            .layer(fake.service(|n| match n {
                1 => trailers_only(Code::ResourceExhausted, "429", Some("2000")),
                _ => started(),
            }));
        let start = Instant::now();
        let result = service.oneshot(request(b"x")).await;
        assert_eq!(code_of(&result), Code::Ok);
        assert_eq!(fake.calls(), 2);
        assert_eq!(start.elapsed(), Duration::from_secs(2));

        // The same code without pushback (a quota): final.
        let fake = Fake::new();
        let service = RetryLayer::new(policy(3), RetryBudget::unlimited())
            .layer(fake.service(|_| trailers_only(Code::ResourceExhausted, "quota", None)));
        service.oneshot(request(b"x")).await.unwrap();
        assert_eq!(fake.calls(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn negative_or_unparsable_pushback_stops_retries() {
        for pushback in ["-1", "soon"] {
            let fake = Fake::new();
            let service = RetryLayer::new(policy(3), RetryBudget::unlimited()).layer(
                fake.service(move |_| trailers_only(Code::Unavailable, "shed", Some(pushback))),
            );
            let result = service.oneshot(request(b"x")).await;
            assert_eq!(code_of(&result), Code::Unavailable);
            assert_eq!(fake.calls(), 1, "pushback {pushback:?}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn nothing_is_retried_once_the_response_has_started() {
        // A stream that sends its headers (the first token is on its way), then fails.
        let fake = Fake::new();
        let service =
            RetryLayer::new(policy(3), RetryBudget::unlimited()).layer(fake.service(|_| {
                let body = StreamBody::new(futures::stream::iter([
                    Ok(Frame::data(Bytes::from_static(b"token"))),
                    Err(Status::from(ApiError::unavailable(
                        "UPSTREAM_RESET",
                        "reset",
                    ))),
                ]));
                Reply::Answer(http::Response::new(Body::new(body)))
            }));
        let response = service.oneshot(request(b"x")).await.unwrap();
        let mut body = response.into_body();
        let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
        assert_eq!(first, "token");
        let failure = body.frame().await.unwrap().unwrap_err();
        assert_eq!(failure.code(), Code::Unavailable);
        assert_eq!(fake.calls(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn no_retry_that_could_not_get_useful_time() {
        // 300 ms left, but the server asks for 500 ms: the failure is returned at once.
        let fake = Fake::new();
        let service = RetryLayer::new(policy(3), RetryBudget::unlimited())
            .layer(fake.service(|_| trailers_only(Code::Unavailable, "busy", Some("500"))));
        let mut request = request(b"x");
        request
            .extensions_mut()
            .insert(Deadline::after(Duration::from_millis(300)));
        let start = Instant::now();
        let result = service.oneshot(request).await;
        assert_eq!(code_of(&result), Code::Unavailable);
        assert_eq!(fake.calls(), 1);
        assert_eq!(start.elapsed(), Duration::ZERO);

        // 295 ms after a 290 ms pushback would leave 5 ms < the 10 ms minimum attempt.
        let fake = Fake::new();
        let service = RetryLayer::new(policy(3), RetryBudget::unlimited())
            .layer(fake.service(|_| trailers_only(Code::Unavailable, "busy", Some("290"))));
        let mut request = self::request(b"x");
        request
            .extensions_mut()
            .insert(Deadline::after(Duration::from_millis(295)));
        service.oneshot(request).await.unwrap();
        assert_eq!(fake.calls(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn the_deadline_bounds_the_total_time_of_all_attempts() {
        // Each attempt fails after 300 ms; the caller gave the call 1 s.
        for seed in 0..20 {
            let fake = Fake::new();
            let service = ServiceBuilder::new()
                .layer(DeadlineLayer::propagate(DEFAULT_MARGIN))
                .layer(RetryLayer::new(policy(5), RetryBudget::unlimited()).with_seed(seed))
                .service(fake.service(|_| {
                    Reply::After(
                        Duration::from_millis(300),
                        Box::new(trailers_only(Code::Unavailable, "slow failure", None)),
                    )
                }));
            let mut request = request(b"x");
            request
                .headers_mut()
                .insert(GRPC_TIMEOUT, HeaderValue::from_static("1S"));
            let start = Instant::now();
            let result = service.oneshot(request).await;
            let elapsed = start.elapsed();
            assert!(
                elapsed <= Duration::from_secs(1),
                "seed {seed}: {elapsed:?}"
            );
            assert!(
                matches!(code_of(&result), Code::Unavailable | Code::DeadlineExceeded),
                "{:?}",
                code_of(&result)
            );
            let seen = fake.seen();
            assert!(
                seen.len() >= 2,
                "seed {seed}: the deadline left room for a retry"
            );
            // No attempt started without the minimum useful time before the deadline.
            for attempt in &seen {
                let left = Duration::from_secs(1) - DEFAULT_MARGIN - (attempt.at - start);
                assert!(left >= DEFAULT_MIN_ATTEMPT_TIME, "seed {seed}: {left:?}");
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_too_large_to_replay_is_sent_once_intact() {
        let fake = Fake::new();
        let service = RetryLayer::new(
            RetryPolicy {
                max_replay_bytes: 4,
                ..policy(3)
            },
            RetryBudget::unlimited(),
        )
        .layer(fake.service(|_| trailers_only(Code::Unavailable, "down", None)));
        let chunks = futures::stream::iter(
            [&b"abc"[..], b"def", b"ghi"]
                .map(|chunk| Ok::<_, Infallible>(Frame::data(Bytes::from_static(chunk)))),
        );
        let request = http::Request::builder()
            .uri("http://weir.test/t.T/M")
            .body(Body::new(StreamBody::new(chunks)))
            .unwrap();
        service.oneshot(request).await.unwrap();
        assert_eq!(fake.calls(), 1);
        assert_eq!(fake.seen()[0].body, "abcdefghi");
    }

    /// `calls` calls at `per_second` to a backend that fails every one; returns attempts / calls
    /// and the simulated time the run took.
    async fn amplification(budget: RetryBudget, calls: usize, per_second: u32) -> (f64, Duration) {
        let start = Instant::now();
        let fake = Fake::new();
        let service = RetryLayer::new(RetryPolicy::default(), budget)
            .with_seed(11)
            .layer(fake.service(|_| trailers_only(Code::Unavailable, "down", None)));
        let gap = Duration::from_secs(1) / per_second;
        let done = Arc::new(AtomicUsize::new(0));
        for _ in 0..calls {
            let service = service.clone();
            let done = done.clone();
            tokio::spawn(async move {
                service.oneshot(request(b"x")).await.unwrap();
                done.fetch_add(1, Ordering::SeqCst);
            });
            tokio::time::sleep(gap).await;
        }
        while done.load(Ordering::SeqCst) < calls {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        (fake.calls() as f64 / calls as f64, start.elapsed())
    }

    #[tokio::test(start_paused = true)]
    async fn the_budget_caps_retries_at_twenty_percent_plus_the_floor() {
        // 5,000 calls in 10 s (one budget window) to a backend that fails every one.
        let calls = 5_000;
        let (without, _) = amplification(RetryBudget::unlimited(), calls, 500).await;
        assert_eq!(without, 3.0);
        let (with, elapsed) = amplification(RetryBudget::default(), calls, 500).await;
        // At most 20% of the calls, plus the floor of 10 retries/s over the run (its last
        // retries come a little after the 10 s of calls; the window slides in 1 s slots).
        let floor_seconds = elapsed.as_secs_f64().ceil() + 1.0;
        let bound = 1.0 + 0.2 + 10.0 * floor_seconds / calls as f64;
        assert!(
            with <= bound,
            "amplification {with} > {bound} ({elapsed:?})"
        );
        assert!(
            with >= 1.2,
            "the budget still allows 20% of retries: {with}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn budgets_are_per_backend() {
        // A floor-only budget (no ratio) of 1 retry/s × 1 s: one retry per backend.
        let budget = RetryBudget::new(&RetryBudgetConfig {
            ttl: Duration::from_secs(1),
            min_retries_per_sec: 1,
            retry_ratio: 0.0,
        });
        let fake = Fake::new();
        let service = RetryLayer::new(policy(2), budget)
            .layer(fake.service(|_| trailers_only(Code::Unavailable, "down", None)));
        for backend in ["a", "a", "b"] {
            let mut request = request(b"x");
            request.extensions_mut().insert(BackendKey::new(backend));
            service.clone().oneshot(request).await.unwrap();
        }
        // a: 2 + 1 (budget spent), b: 2.
        assert_eq!(fake.calls(), 5);
    }

    /// A handler that never answers in time: `/t.Slow/Call` sleeps 10 s.
    #[derive(Clone)]
    struct Slow;

    impl tonic::server::NamedService for Slow {
        const NAME: &'static str = "t.Slow";
    }

    impl Service<http::Request<Body>> for Slow {
        type Response = http::Response<Body>;
        type Error = Infallible;
        type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

        fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, _request: http::Request<Body>) -> Self::Future {
            Box::pin(async {
                tokio::time::sleep(Duration::from_secs(10)).await;
                Ok(http::Response::new(Body::empty()))
            })
        }
    }

    fn grpc_request(path: &str) -> http::Request<Body> {
        http::Request::builder()
            .method("POST")
            .uri(path)
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(Body::empty())
            .unwrap()
    }

    /// The layers on a real tonic server and client, over a socket: the types fit tonic's bounds,
    /// and the caller sees DEADLINE_EXCEEDED, never tonic's CANCELLED.
    #[tokio::test]
    async fn the_layers_fit_a_real_tonic_server_and_client() {
        use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let (_reporter, health) = tonic_health::server::health_reporter();
        let mut config = crate::deadline::DeadlineConfig::default();
        config
            .method_caps
            .insert("/t.Slow/Call".into(), Duration::from_millis(200).into());
        tokio::spawn(
            tonic::transport::Server::builder()
                .layer(DeadlineLayer::server(config))
                .add_service(health)
                .add_service(Slow)
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{address}"))
            .unwrap()
            .connect_lazy();
        let stack = ServiceBuilder::new()
            .layer(DeadlineLayer::propagate(DEFAULT_MARGIN))
            .layer(RetryLayer::new(
                RetryPolicy::default(),
                RetryBudget::default(),
            ))
            .service(channel.clone());
        let mut client = HealthClient::new(stack.clone());

        let mut request = tonic::Request::new(HealthCheckRequest::default());
        Deadline::after(Duration::from_secs(5)).apply_to(&mut request);
        client.check(request).await.unwrap();

        // No time left after the margin: the client layer answers without calling.
        let mut request = tonic::Request::new(HealthCheckRequest::default());
        Deadline::after(Duration::from_millis(2)).apply_to(&mut request);
        let status = client.check(request).await.unwrap_err();
        assert_eq!(status.code(), Code::DeadlineExceeded);
        assert!(status.message().contains("before the call"), "{status:?}");

        // A slow handler, no deadline from the caller: the method's 200 ms cap ends it.
        let start = std::time::Instant::now();
        let result = channel.clone().oneshot(grpc_request("/t.Slow/Call")).await;
        assert_eq!(code_of(&result.map_err(Into::into)), Code::DeadlineExceeded);
        let elapsed = start.elapsed();
        assert!(elapsed >= Duration::from_millis(190), "{elapsed:?}");
        assert!(elapsed < Duration::from_secs(2), "{elapsed:?}");

        // A slow handler and a 300 ms deadline through the client stack: whichever answers first,
        // tonic's channel timer (CANCELLED, translated) or the server, the caller sees
        // DEADLINE_EXCEEDED, in time.
        let mut request = grpc_request("/t.Slow/Call");
        request
            .extensions_mut()
            .insert(Deadline::after(Duration::from_millis(300)));
        let start = std::time::Instant::now();
        let result = stack.oneshot(request).await;
        assert_eq!(code_of(&result), Code::DeadlineExceeded);
        if let Err(error) = &result {
            let status = outcome::find_status(&**error).unwrap();
            assert_eq!(status.code(), Code::DeadlineExceeded);
        }
        let elapsed = start.elapsed();
        assert!(elapsed < Duration::from_millis(400), "{elapsed:?}");
    }

    #[test]
    fn policy_config_parses_and_validates() {
        let policy: RetryPolicy = toml::from_str(
            r#"
            max_attempts = 4
            initial_backoff = "50ms"
            retry_on = ["UNAVAILABLE", "aborted"]
            "#,
        )
        .unwrap();
        assert_eq!(policy.max_backoff, DEFAULT_MAX_BACKOFF);
        policy.validate("router.retry").unwrap();
        assert_eq!(policy.codes(), [Code::Unavailable, Code::Aborted]);

        for (toml, key) in [
            ("retry_on = [\"INVALID_ARGUMENT\"]", "router.retry.retry_on"),
            (
                "retry_on = [\"RESOURCE_EXHAUSTED\"]",
                "router.retry.retry_on",
            ),
            ("retry_on = [\"NOPE\"]", "router.retry.retry_on"),
            ("max_attempts = 0", "router.retry.max_attempts"),
            ("initial_backoff = \"2s\"", "router.retry.initial_backoff"),
        ] {
            let policy: RetryPolicy = toml::from_str(toml).unwrap();
            let error = policy.validate("router.retry").unwrap_err().to_string();
            assert!(error.contains(key), "{toml}: {error}");
        }
        assert!(toml::from_str::<RetryPolicy>("attempts = 3").is_err());

        let budget: RetryBudgetConfig = toml::from_str("retry_ratio = 0.5").unwrap();
        assert_eq!(budget.ttl, DEFAULT_BUDGET_TTL);
        budget.validate("router.retry_budget").unwrap();
        let bad: RetryBudgetConfig = toml::from_str("ttl = \"5m\"").unwrap();
        let error = bad.validate("router.retry_budget").unwrap_err().to_string();
        assert!(error.contains("router.retry_budget.ttl"), "{error}");
        // Out-of-range values never panic at construction.
        let _ = RetryBudget::new(&bad).of(&BackendKey::new("x"));
    }
}
