//! Circuit breaker: stop calling a backend that is failing, and fail fast instead.
//!
//! # Why a breaker, when there are already retries and timeouts?
//!
//! A backend that is down or drowning makes every call wait for a timeout before failing, and each
//! caller that retries adds load to the one component that cannot take it. Retries (even with a
//! budget) are a per-call decision; a breaker is a decision about the *backend*: once enough recent
//! calls have failed it stops sending any for a while, so callers get their answer (UNAVAILABLE,
//! reason `CIRCUIT_OPEN`, which the router turns into a fallback) in microseconds instead of after
//! a timeout, and the backend gets room to recover. It then lets a few probe calls through to find
//! out whether it has.
//!
//! # States
//!
//! - **CLOSED**: calls go through; each outcome goes into a count-based sliding window of the last
//!   [`window`](BreakerConfig::window) calls (default [`DEFAULT_WINDOW`] = 20). When the window holds
//!   at least [`minimum_calls`](BreakerConfig::minimum_calls) (default 20) and the failure rate is
//!   ≥ [`failure_rate`](BreakerConfig::failure_rate) (default 50 %) or the slow-call rate is ≥
//!   [`slow_call_rate`](BreakerConfig::slow_call_rate) (default 100 %), the breaker opens. Below the
//!   minimum it never opens, so three failures out of three calls after a quiet night do not cut a
//!   backend off.
//! - **OPEN**: every call is refused at once with UNAVAILABLE, reason `CIRCUIT_OPEN`, ErrorInfo
//!   metadata `backend`, and RetryInfo (and `grpc-retry-pushback-ms`) = the time left open. The
//!   open duration starts at [`open_duration`](BreakerConfig::open_duration) (5 s) and doubles on
//!   each consecutive re-open, capped at [`max_open_duration`](BreakerConfig::max_open_duration)
//!   (60 s), so a backend that keeps failing its probes is probed less and less often.
//! - **HALF_OPEN** (the first call after the open duration moves the breaker there; there is no
//!   timer task): exactly [`half_open_probes`](BreakerConfig::half_open_probes) (3) calls are let
//!   through and the others refused like in OPEN. A probe that fails re-opens the breaker at once
//!   (for longer); when all probes have succeeded the breaker closes with a fresh window. A probe
//!   that ends with an ignored code, or is cancelled, gives its slot to the next call.
//!
//! # What counts
//!
//! - Failures ([`failure_codes`](BreakerConfig::failure_codes)): UNAVAILABLE, INTERNAL, UNKNOWN,
//!   DATA_LOSS and DEADLINE_EXCEEDED while the caller still had time (a transport error counts as
//!   UNAVAILABLE, see [`crate::outcome`]).
//! - Successes: OK, which for a call seen by the tower layer means "the response started" (HTTP
//!   200 without `grpc-status` in the headers); the final status of a stream comes later and is not
//!   waited for.
//! - Ignored (neither, not even in the window): every other code, i.e. CANCELLED,
//!   INVALID_ARGUMENT, NOT_FOUND, UNAUTHENTICATED, PERMISSION_DENIED, RESOURCE_EXHAUSTED (an
//!   upstream quota is not an outage), and also ALREADY_EXISTS, FAILED_PRECONDITION, ABORTED,
//!   OUT_OF_RANGE, UNIMPLEMENTED, which are answers about the request, not the backend's health.
//!   A call dropped before its outcome (the caller went away) is ignored too. So is a local
//!   `BULKHEAD_FULL` rejection from the bulkhead below this layer: it says *we* sent too much, not
//!   that the backend failed, and counting it would let our own burst cut off a healthy backend.
//!   So is a call that ended because the *caller's* deadline passed (one impatient tenant must not
//!   open a breaker for everyone), while our own attempt timeout (`ATTEMPT_TIMEOUT`) is a failure;
//!   and so is a backend's refusal for load (UNAVAILABLE `OVERLOADED` or `BULKHEAD_FULL` from
//!   elsewhere): it works, and says when to come back. The rules are [`crate::outcome`]'s.
//! - Slow calls: a counted call whose time to the first response byte (the response headers) is
//!   longer than [`slow_call_threshold`](BreakerConfig::slow_call_threshold) (default 10 s; `0s`
//!   disables) is slow, whether it succeeded or failed. In HALF_OPEN the slow-call rate is judged
//!   over the probes once they have all answered.
//!
//! # Shape
//!
//! [`Breaker`] is the transport-agnostic core (`try_acquire` → [`Permit`] → [`Permit::record`]), so
//! the inference service can wrap its HTTP upstream calls in it and measure time to first token
//! itself. [`Breakers`] keeps one `Breaker` per [`BackendKey`] (requests without a key share the
//! registry's default key). [`CircuitBreakerLayer`] / [`CircuitBreaker`] apply it to gRPC calls.
//!
//! # Metrics
//!
//! Gauge `weir_circuit_breaker_state{backend}` (0 closed, 1 half-open, 2 open), counters
//! `weir_circuit_breaker_transitions_total{backend,to}` and
//! `weir_circuit_breaker_rejected_total{backend}`. The handles are registered when a backend's
//! breaker is created (on its first call), so install the metrics recorder before serving. OPEN →
//! HALF_OPEN happens on the first call after the open duration, so the gauge reads OPEN until then.
//! Transitions are logged at INFO.

use std::{
    fmt,
    pin::Pin,
    sync::{Arc, Mutex, PoisonError},
    task::{Context, Poll},
    time::Duration,
};

use pin_project_lite::pin_project;
use rand::{Rng, SeedableRng, rngs::StdRng};
use serde::{Deserialize, Serialize};
use tokio::time::Instant;
use tonic::{Code, Status};
use tower::{BoxError, Layer, Service};

use crate::{
    ApiError,
    backend::{BackendKey, PerBackend},
    config::ConfigError,
    deadline::Deadline,
    error::parse_code,
    outcome,
};

/// Calls in the sliding window.
pub const DEFAULT_WINDOW: usize = 20;
/// Calls the window must hold before the breaker may open.
pub const DEFAULT_MINIMUM_CALLS: usize = 20;
/// Failure rate (0–1] at or above which the breaker opens.
pub const DEFAULT_FAILURE_RATE: f64 = 0.5;
/// Slow-call rate (0–1] at or above which the breaker opens.
pub const DEFAULT_SLOW_CALL_RATE: f64 = 1.0;
/// Time to first response byte above which a call is slow. Ten seconds is far above a healthy
/// model's time to first token and below the attempt timeout ([`crate::timeout`], 30 s), so a
/// backend that is hanging rather than failing still opens the breaker.
pub const DEFAULT_SLOW_CALL_THRESHOLD: Duration = Duration::from_secs(10);
/// First open duration.
pub const DEFAULT_OPEN_DURATION: Duration = Duration::from_secs(5);
/// Cap of the doubling open duration.
pub const DEFAULT_MAX_OPEN_DURATION: Duration = Duration::from_secs(60);
/// Jitter fraction: each open duration is drawn uniformly from `[d·(1−jitter), d]`, so callers
/// that opened together do not all probe in the same instant. 0 disables it.
pub const DEFAULT_JITTER: f64 = 0.1;
/// Probe calls let through in HALF_OPEN.
pub const DEFAULT_HALF_OPEN_PROBES: usize = 3;
/// Codes that count as failures.
pub const DEFAULT_FAILURE_CODES: [&str; 5] = [
    "UNAVAILABLE",
    "INTERNAL",
    "UNKNOWN",
    "DATA_LOSS",
    "DEADLINE_EXCEEDED",
];
/// ErrorInfo reason of a call refused by an open circuit.
pub const CIRCUIT_OPEN: &str = "CIRCUIT_OPEN";
/// The key of requests that carry no [`BackendKey`], unless the registry is given another.
pub const DEFAULT_BACKEND: &str = "default";

/// Circuit breaker settings (TOML table such as `[router.breaker]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BreakerConfig {
    /// Calls in the count-based sliding window (default [`DEFAULT_WINDOW`]).
    pub window: usize,
    /// Calls the window must hold before the breaker may open (default [`DEFAULT_MINIMUM_CALLS`]);
    /// at most `window`.
    pub minimum_calls: usize,
    /// Failure rate in (0, 1] that opens the breaker (default [`DEFAULT_FAILURE_RATE`]).
    pub failure_rate: f64,
    /// Slow-call rate in (0, 1] that opens the breaker (default [`DEFAULT_SLOW_CALL_RATE`]).
    pub slow_call_rate: f64,
    /// Time to first response byte above which a call is slow (default
    /// [`DEFAULT_SLOW_CALL_THRESHOLD`]); `0s` disables slow-call detection.
    #[serde(with = "humantime_serde")]
    pub slow_call_threshold: Duration,
    /// First open duration (default [`DEFAULT_OPEN_DURATION`]).
    #[serde(with = "humantime_serde")]
    pub open_duration: Duration,
    /// Cap of the open duration, which doubles per consecutive re-open (default
    /// [`DEFAULT_MAX_OPEN_DURATION`]).
    #[serde(with = "humantime_serde")]
    pub max_open_duration: Duration,
    /// Jitter fraction in [0, 1) taken off each open duration at random (default
    /// [`DEFAULT_JITTER`]); 0 disables it.
    pub jitter: f64,
    /// Probe calls let through in HALF_OPEN (default [`DEFAULT_HALF_OPEN_PROBES`]).
    pub half_open_probes: usize,
    /// gRPC code names that count as failures (default [`DEFAULT_FAILURE_CODES`]); OK is a
    /// success and every other code is ignored.
    pub failure_codes: Vec<String>,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        Self {
            window: DEFAULT_WINDOW,
            minimum_calls: DEFAULT_MINIMUM_CALLS,
            failure_rate: DEFAULT_FAILURE_RATE,
            slow_call_rate: DEFAULT_SLOW_CALL_RATE,
            slow_call_threshold: DEFAULT_SLOW_CALL_THRESHOLD,
            open_duration: DEFAULT_OPEN_DURATION,
            max_open_duration: DEFAULT_MAX_OPEN_DURATION,
            jitter: DEFAULT_JITTER,
            half_open_probes: DEFAULT_HALF_OPEN_PROBES,
            failure_codes: DEFAULT_FAILURE_CODES.map(String::from).to_vec(),
        }
    }
}

impl BreakerConfig {
    /// Checks every value; the error names the key as `<key_prefix>.<field>`.
    pub fn validate(&self, key_prefix: &str) -> Result<(), ConfigError> {
        let key = |field: &str| join_key(key_prefix, field);
        if self.window == 0 {
            return Err(ConfigError::invalid(key("window"), "must be at least 1"));
        }
        if self.minimum_calls == 0 || self.minimum_calls > self.window {
            return Err(ConfigError::invalid(
                key("minimum_calls"),
                format!(
                    "must be between 1 and window ({}), got {}",
                    self.window, self.minimum_calls
                ),
            ));
        }
        for (field, rate) in [
            ("failure_rate", self.failure_rate),
            ("slow_call_rate", self.slow_call_rate),
        ] {
            if !(rate > 0.0 && rate <= 1.0) {
                return Err(ConfigError::invalid(
                    key(field),
                    format!("must be in (0, 1], got {rate}"),
                ));
            }
        }
        if self.open_duration.is_zero() {
            return Err(ConfigError::invalid(
                key("open_duration"),
                "must be positive",
            ));
        }
        if self.max_open_duration < self.open_duration {
            return Err(ConfigError::invalid(
                key("max_open_duration"),
                "must be at least open_duration",
            ));
        }
        if !(0.0..1.0).contains(&self.jitter) {
            return Err(ConfigError::invalid(
                key("jitter"),
                format!("must be in [0, 1), got {}", self.jitter),
            ));
        }
        if self.half_open_probes == 0 {
            return Err(ConfigError::invalid(
                key("half_open_probes"),
                "must be at least 1",
            ));
        }
        for name in &self.failure_codes {
            match parse_code(name) {
                Some(Code::Ok) => {
                    return Err(ConfigError::invalid(
                        key("failure_codes"),
                        "OK cannot be a failure",
                    ));
                }
                Some(_) => {}
                None => {
                    return Err(ConfigError::invalid(
                        key("failure_codes"),
                        format!("unknown gRPC code {name:?}"),
                    ));
                }
            }
        }
        Ok(())
    }
}

/// `prefix.field`, or `field` when there is no prefix.
pub(crate) fn join_key(prefix: &str, field: &str) -> String {
    if prefix.is_empty() {
        field.to_string()
    } else {
        format!("{prefix}.{field}")
    }
}

/// A breaker's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BreakerState {
    /// Calls go through and are counted.
    Closed,
    /// A few probe calls go through.
    HalfOpen,
    /// Calls are refused.
    Open,
}

impl BreakerState {
    /// The value of the `weir_circuit_breaker_state` gauge: 0 closed, 1 half-open, 2 open.
    pub fn gauge_value(self) -> f64 {
        match self {
            Self::Closed => 0.0,
            Self::HalfOpen => 1.0,
            Self::Open => 2.0,
        }
    }

    /// Lower-case name, as in the `to` label of the transitions metric.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Closed => "closed",
            Self::HalfOpen => "half_open",
            Self::Open => "open",
        }
    }
}

impl fmt::Display for BreakerState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A call refused because the backend's circuit is open (or half-open with its probes taken).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("circuit open for backend {backend}; retry in {retry_after:?}")]
pub struct CircuitOpen {
    /// The backend whose circuit refused the call.
    pub backend: BackendKey,
    /// When the caller may try again: the time left open, or in HALF_OPEN the base open duration.
    pub retry_after: Duration,
}

impl From<CircuitOpen> for ApiError {
    fn from(open: CircuitOpen) -> Self {
        ApiError::unavailable(CIRCUIT_OPEN, open.to_string())
            .with_retry_after(open.retry_after)
            .with_metadata("backend", open.backend.as_str())
    }
}

impl CircuitOpen {
    /// The `Status` a gRPC caller gets (UNAVAILABLE, reason `CIRCUIT_OPEN`, RetryInfo, metadata
    /// `backend`), marked [`outcome::Local::Rejected`] so layers above recognise it as a local
    /// refusal (and a remote `CIRCUIT_OPEN` is not mistaken for ours).
    pub fn into_status(self) -> Status {
        outcome::Local::Rejected(CIRCUIT_OPEN).attach(Status::from(ApiError::from(self)))
    }
}

/// How a breaker counts a result.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    Success,
    Failure,
    Ignored,
}

/// One counted call in the window.
#[derive(Debug, Clone, Copy, Default)]
struct Sample {
    failure: bool,
    slow: bool,
}

/// The count-based sliding window: a ring of the last `capacity` counted calls with running
/// totals, so recording is O(1).
#[derive(Debug)]
struct Window {
    ring: Vec<Sample>,
    next: usize,
    len: usize,
    failures: usize,
    slow: usize,
}

impl Window {
    fn new(capacity: usize) -> Self {
        Self {
            ring: vec![Sample::default(); capacity.max(1)],
            next: 0,
            len: 0,
            failures: 0,
            slow: 0,
        }
    }

    fn push(&mut self, sample: Sample) {
        if self.len == self.ring.len() {
            let old = self.ring[self.next];
            self.failures -= usize::from(old.failure);
            self.slow -= usize::from(old.slow);
        } else {
            self.len += 1;
        }
        self.ring[self.next] = sample;
        self.next = (self.next + 1) % self.ring.len();
        self.failures += usize::from(sample.failure);
        self.slow += usize::from(sample.slow);
    }

    fn clear(&mut self) {
        self.next = 0;
        self.len = 0;
        self.failures = 0;
        self.slow = 0;
    }
}

#[derive(Debug)]
struct State {
    state: BreakerState,
    /// Bumped on every transition; a permit from an earlier epoch records nothing.
    generation: u64,
    window: Window,
    open_until: Instant,
    /// Opens since the breaker last closed; the open duration doubles with each.
    opens: u32,
    probes_in_flight: usize,
    probes_succeeded: usize,
    probes_slow: usize,
    rng: StdRng,
}

/// Metric handles, registered once per backend so the hot path does not allocate label strings.
#[derive(Debug)]
struct Metrics {
    state: metrics::Gauge,
    to_closed: metrics::Counter,
    to_half_open: metrics::Counter,
    to_open: metrics::Counter,
    rejected: metrics::Counter,
}

impl Metrics {
    fn new(backend: &BackendKey) -> Self {
        let transition = |to: &'static str| {
            metrics::counter!(
                "weir_circuit_breaker_transitions_total",
                "backend" => backend.to_string(),
                "to" => to
            )
        };
        Self {
            state: metrics::gauge!("weir_circuit_breaker_state", "backend" => backend.to_string()),
            to_closed: transition(BreakerState::Closed.as_str()),
            to_half_open: transition(BreakerState::HalfOpen.as_str()),
            to_open: transition(BreakerState::Open.as_str()),
            rejected: metrics::counter!(
                "weir_circuit_breaker_rejected_total",
                "backend" => backend.to_string()
            ),
        }
    }
}

/// The circuit breaker of one backend: the transport-agnostic core.
///
/// ```
/// # use std::sync::Arc;
/// # use weir_mesh::{backend::BackendKey, breaker::{Breaker, BreakerConfig}};
/// let breaker = Arc::new(Breaker::new(BackendKey::new("gpt-4o"), BreakerConfig::default()));
/// match breaker.try_acquire() {
///     Ok(permit) => {
///         // ... call the upstream, then at the first token (or the error):
///         permit.record(tonic::Code::Ok);
///     }
///     Err(open) => { /* fail fast: return open.into_status() or fall back */ }
/// }
/// ```
#[derive(Debug)]
pub struct Breaker {
    backend: BackendKey,
    config: BreakerConfig,
    /// Bit `n` set: code `n` is a failure.
    failure_mask: u32,
    state: Mutex<State>,
    metrics: Metrics,
}

impl Breaker {
    /// A closed breaker for `backend`, with jitter from an OS-seeded RNG.
    pub fn new(backend: BackendKey, config: BreakerConfig) -> Self {
        Self::with_rng(backend, config, StdRng::from_os_rng())
    }

    /// A closed breaker whose open-duration jitter comes from `rng` (seed it in tests).
    pub fn with_rng(backend: BackendKey, config: BreakerConfig, rng: StdRng) -> Self {
        let failure_mask = config
            .failure_codes
            .iter()
            .filter_map(|name| parse_code(name))
            .filter(|code| *code != Code::Ok)
            .fold(0u32, |mask, code| mask | (1 << (code as i32)));
        let metrics = Metrics::new(&backend);
        metrics.state.set(BreakerState::Closed.gauge_value());
        Self {
            state: Mutex::new(State {
                state: BreakerState::Closed,
                generation: 0,
                window: Window::new(config.window),
                open_until: Instant::now(),
                opens: 0,
                probes_in_flight: 0,
                probes_succeeded: 0,
                probes_slow: 0,
                rng,
            }),
            backend,
            config,
            failure_mask,
            metrics,
        }
    }

    /// The backend this breaker guards.
    pub fn backend(&self) -> &BackendKey {
        &self.backend
    }

    /// The current state (moving OPEN to HALF_OPEN if the open duration has passed).
    pub fn state(&self) -> BreakerState {
        let mut state = self.lock();
        self.advance(&mut state, Instant::now());
        state.state
    }

    /// Asks to make a call: a [`Permit`] to record its outcome with, or [`CircuitOpen`] if the
    /// call must fail fast. Dropping the permit without recording counts the call as nothing.
    pub fn try_acquire(self: &Arc<Self>) -> Result<Permit, CircuitOpen> {
        let now = Instant::now();
        let mut state = self.lock();
        self.advance(&mut state, now);
        let retry_after = match state.state {
            BreakerState::Closed => {
                return Ok(Permit::new(self, state.generation, false, now));
            }
            BreakerState::HalfOpen => {
                if state.probes_in_flight + state.probes_succeeded < self.config.half_open_probes {
                    state.probes_in_flight += 1;
                    return Ok(Permit::new(self, state.generation, true, now));
                }
                self.config.open_duration
            }
            BreakerState::Open => state.open_until.saturating_duration_since(now),
        };
        drop(state);
        self.metrics.rejected.increment(1);
        Err(CircuitOpen {
            backend: self.backend.clone(),
            // Whole milliseconds, rounded up, so a caller honouring the pushback never comes back
            // a fraction of a millisecond too early.
            retry_after: Duration::from_millis(
                u64::try_from(retry_after.as_nanos().div_ceil(1_000_000)).unwrap_or(u64::MAX),
            ),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // The state is consistent after every statement that can panic, so a poisoned lock is
        // still usable.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn verdict(&self, code: Code) -> Verdict {
        if code == Code::Ok {
            Verdict::Success
        } else if self.failure_mask & (1 << (code as i32)) != 0 {
            Verdict::Failure
        } else {
            Verdict::Ignored
        }
    }

    fn is_slow(&self, elapsed: Duration) -> bool {
        !self.config.slow_call_threshold.is_zero() && elapsed > self.config.slow_call_threshold
    }

    /// OPEN → HALF_OPEN once the open duration has passed.
    fn advance(&self, state: &mut State, now: Instant) {
        if state.state == BreakerState::Open && now >= state.open_until {
            state.probes_in_flight = 0;
            state.probes_succeeded = 0;
            state.probes_slow = 0;
            self.transition(state, BreakerState::HalfOpen, "open duration elapsed");
        }
    }

    /// Records a finished call (`None`: dropped before an outcome).
    fn finish(&self, generation: u64, probe: bool, result: Option<(Code, Duration)>) {
        let mut state = self.lock();
        if state.generation != generation {
            // The call started in an earlier state; what it says is about a past we already
            // acted on.
            return;
        }
        let verdict = result.map_or(Verdict::Ignored, |(code, _)| self.verdict(code));
        let slow = result.is_some_and(|(_, elapsed)| self.is_slow(elapsed));
        match state.state {
            BreakerState::Closed => {
                if verdict == Verdict::Ignored {
                    return;
                }
                state.window.push(Sample {
                    failure: verdict == Verdict::Failure,
                    slow,
                });
                let window = &state.window;
                if window.len >= self.config.minimum_calls {
                    let len = window.len as f64;
                    let failure_rate = window.failures as f64 / len;
                    let slow_rate = window.slow as f64 / len;
                    if failure_rate >= self.config.failure_rate {
                        let why = format!("failure rate {:.0}%", failure_rate * 100.0);
                        self.open(&mut state, &why);
                    } else if slow_rate >= self.config.slow_call_rate {
                        let why = format!("slow-call rate {:.0}%", slow_rate * 100.0);
                        self.open(&mut state, &why);
                    }
                }
            }
            BreakerState::HalfOpen if probe => {
                state.probes_in_flight -= 1;
                match verdict {
                    Verdict::Ignored => {}
                    Verdict::Failure => self.open(&mut state, "a probe call failed"),
                    Verdict::Success => {
                        state.probes_succeeded += 1;
                        state.probes_slow += usize::from(slow);
                        let probes = self.config.half_open_probes;
                        if state.probes_succeeded >= probes {
                            if state.probes_slow as f64 / probes as f64
                                >= self.config.slow_call_rate
                            {
                                self.open(&mut state, "the probe calls were slow");
                            } else {
                                state.window.clear();
                                state.opens = 0;
                                self.transition(
                                    &mut state,
                                    BreakerState::Closed,
                                    "every probe call succeeded",
                                );
                            }
                        }
                    }
                }
            }
            BreakerState::HalfOpen | BreakerState::Open => {}
        }
    }

    fn open(&self, state: &mut State, why: &str) {
        let base = self
            .config
            .open_duration
            .saturating_mul(1u32.checked_shl(state.opens).unwrap_or(u32::MAX))
            .min(self.config.max_open_duration);
        let duration = if self.config.jitter > 0.0 {
            base.mul_f64(1.0 - self.config.jitter * state.rng.random::<f64>())
        } else {
            base
        };
        state.opens = state.opens.saturating_add(1);
        state.open_until = Instant::now() + duration;
        state.window.clear();
        self.transition(
            state,
            BreakerState::Open,
            &format!("{why}; open for {duration:?}"),
        );
    }

    fn transition(&self, state: &mut State, to: BreakerState, why: &str) {
        let from = state.state;
        state.state = to;
        state.generation += 1;
        self.metrics.state.set(to.gauge_value());
        match to {
            BreakerState::Closed => self.metrics.to_closed.increment(1),
            BreakerState::HalfOpen => self.metrics.to_half_open.increment(1),
            BreakerState::Open => self.metrics.to_open.increment(1),
        }
        tracing::info!(backend = %self.backend, %from, %to, "circuit breaker: {why}");
    }
}

/// Leave to make one call through a [`Breaker`]. Record its outcome with [`Permit::record`];
/// dropping it unrecorded (the call was cancelled) counts as nothing and frees a half-open probe
/// slot.
#[derive(Debug)]
#[must_use = "record the call's outcome; dropping the permit counts the call as nothing"]
pub struct Permit {
    breaker: Option<Arc<Breaker>>,
    generation: u64,
    probe: bool,
    started: Instant,
}

impl Permit {
    fn new(breaker: &Arc<Breaker>, generation: u64, probe: bool, started: Instant) -> Self {
        Self {
            breaker: Some(breaker.clone()),
            generation,
            probe,
            started,
        }
    }

    /// Whether this call is one of the HALF_OPEN probes.
    pub fn is_probe(&self) -> bool {
        self.probe
    }

    /// Records the call's code, with the time since the permit was acquired as its time to first
    /// byte. Call it when the first response byte (first token) or the error arrives.
    pub fn record(self, code: Code) {
        let elapsed = self.started.elapsed();
        self.record_elapsed(code, elapsed);
    }

    /// Records the call's code and its time to first byte as measured by the caller.
    pub fn record_elapsed(mut self, code: Code, elapsed: Duration) {
        if let Some(breaker) = self.breaker.take() {
            breaker.finish(self.generation, self.probe, Some((code, elapsed)));
        }
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        if let Some(breaker) = self.breaker.take() {
            breaker.finish(self.generation, self.probe, None);
        }
    }
}

/// The breakers of every backend a client calls, created on first use with one config.
#[derive(Debug, Clone)]
pub struct Breakers {
    inner: Arc<Registry>,
}

#[derive(Debug)]
struct Registry {
    config: BreakerConfig,
    breakers: PerBackend<Breaker>,
}

impl Breakers {
    /// An empty registry; requests without a [`BackendKey`] use [`DEFAULT_BACKEND`].
    pub fn new(config: BreakerConfig) -> Self {
        Self::with_default_key(config, BackendKey::new(DEFAULT_BACKEND))
    }

    /// An empty registry whose untagged requests use `default_key` (e.g. the service name).
    pub fn with_default_key(config: BreakerConfig, default_key: BackendKey) -> Self {
        Self {
            inner: Arc::new(Registry {
                config,
                breakers: PerBackend::new(default_key),
            }),
        }
    }

    /// The key of untagged requests.
    pub fn default_key(&self) -> &BackendKey {
        self.inner.breakers.default_key()
    }

    /// The breaker of `key`, created closed on first use.
    pub fn get(&self, key: &BackendKey) -> Arc<Breaker> {
        self.inner
            .breakers
            .get_or_create(key, || Breaker::new(key.clone(), self.inner.config.clone()))
    }

    /// The breaker of a request: its [`BackendKey`] extension, or the default key.
    pub fn for_request<B>(&self, request: &http::Request<B>) -> Arc<Breaker> {
        self.get(self.inner.breakers.key_of(request))
    }

    /// The state of `key`'s breaker (CLOSED if it has not been used yet).
    pub fn state(&self, key: &BackendKey) -> BreakerState {
        self.inner
            .breakers
            .peek(key)
            .map_or(BreakerState::Closed, |b| b.state())
    }
}

/// Applies a circuit breaker per backend to gRPC calls (see the [module docs](self)).
#[derive(Debug, Clone)]
pub struct CircuitBreakerLayer {
    breakers: Breakers,
}

impl CircuitBreakerLayer {
    /// A layer with a fresh registry using `config` for every backend.
    pub fn new(config: BreakerConfig) -> Self {
        Self::with_breakers(Breakers::new(config))
    }

    /// A layer over an existing registry (to share it, or read states from it).
    pub fn with_breakers(breakers: Breakers) -> Self {
        Self { breakers }
    }

    /// The registry, for state queries.
    pub fn breakers(&self) -> &Breakers {
        &self.breakers
    }
}

impl<S> Layer<S> for CircuitBreakerLayer {
    type Service = CircuitBreaker<S>;

    fn layer(&self, inner: S) -> Self::Service {
        CircuitBreaker::new(inner, self.breakers.clone())
    }
}

/// A service that refuses calls to backends whose circuit is open; made by [`CircuitBreakerLayer`].
#[derive(Debug, Clone)]
pub struct CircuitBreaker<S> {
    inner: S,
    breakers: Breakers,
}

impl<S> CircuitBreaker<S> {
    /// Wraps `inner`, keeping breaker state in `breakers`.
    pub fn new(inner: S, breakers: Breakers) -> Self {
        Self { inner, breakers }
    }

    /// The registry, for state queries.
    pub fn breakers(&self) -> &Breakers {
        &self.breakers
    }
}

type GrpcRequest = http::Request<tonic::body::Body>;
type GrpcResponse = http::Response<tonic::body::Body>;

impl<S> Service<GrpcRequest> for CircuitBreaker<S>
where
    S: Service<GrpcRequest, Response = GrpcResponse>,
    S::Error: Into<BoxError>,
{
    type Response = GrpcResponse;
    type Error = BoxError;
    type Future = future::ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, request: GrpcRequest) -> Self::Future {
        match self.breakers.for_request(&request).try_acquire() {
            Ok(permit) => {
                let deadline = Deadline::of_http(&request).map(|d| d.instant());
                future::ResponseFuture::called(self.inner.call(request), permit, deadline)
            }
            Err(open) => future::ResponseFuture::rejected(Box::new(open.into_status())),
        }
    }
}

/// The circuit breaker's response future.
pub mod future {
    use super::*;

    pin_project! {
        /// Waits for the inner call's response headers and records the outcome with the breaker.
        pub struct ResponseFuture<F> {
            #[pin]
            kind: Kind<F>,
        }
    }

    pin_project! {
        #[project = KindProj]
        enum Kind<F> {
            Called { #[pin] future: F, permit: Option<Permit>, deadline: Option<Instant> },
            Rejected { error: Option<BoxError> },
        }
    }

    impl<F> ResponseFuture<F> {
        pub(super) fn called(future: F, permit: Permit, deadline: Option<Instant>) -> Self {
            Self {
                kind: Kind::Called {
                    future,
                    permit: Some(permit),
                    deadline,
                },
            }
        }

        pub(super) fn rejected(error: BoxError) -> Self {
            Self {
                kind: Kind::Rejected { error: Some(error) },
            }
        }
    }

    impl<F, E> std::future::Future for ResponseFuture<F>
    where
        F: std::future::Future<Output = Result<GrpcResponse, E>>,
        E: Into<BoxError>,
    {
        type Output = Result<GrpcResponse, BoxError>;

        fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
            match self.project().kind.project() {
                KindProj::Called {
                    future,
                    permit,
                    deadline,
                } => {
                    let result = std::task::ready!(future.poll(cx)).map_err(Into::into);
                    if let Some(permit) = permit.take() {
                        // Only backend failures and successes count: a caller whose deadline
                        // passed, or our own bulkhead's refusal, says nothing about the backend
                        // (the permit is dropped unrecorded).
                        let outcome = outcome::classify(&result);
                        if outcome.class(*deadline).feeds_breaker() {
                            permit.record(outcome.code);
                        }
                    }
                    Poll::Ready(result)
                }
                KindProj::Rejected { error } => Poll::Ready(Err(error
                    .take()
                    .unwrap_or_else(|| "circuit breaker future polled after completion".into()))),
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
pub(crate) mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use tower::ServiceExt;

    use super::*;

    /// A request to the fake backend: it answers `code` (trailers-only unless OK; `None` = a
    /// transport error) after `delay`.
    pub(crate) fn request(
        backend: Option<&str>,
        code: Option<Code>,
        delay: Duration,
    ) -> GrpcRequest {
        let mut request = http::Request::builder()
            .uri("http://backend/weir.v1.Inference/Generate")
            .header(
                "x-code",
                code.map_or_else(|| "transport".to_string(), |c| (c as i32).to_string()),
            )
            .header("x-delay-ms", delay.as_millis().to_string())
            .body(tonic::body::Body::empty())
            .unwrap();
        if let Some(backend) = backend {
            request.extensions_mut().insert(BackendKey::new(backend));
        }
        request
    }

    /// A fake backend driven by the request's `x-code` and `x-delay-ms`, counting its calls.
    pub(crate) fn backend() -> (
        impl Service<GrpcRequest, Response = GrpcResponse, Error = BoxError, Future: Send>
        + Clone
        + Send
        + 'static,
        Arc<AtomicUsize>,
    ) {
        let calls = Arc::new(AtomicUsize::new(0));
        let counter = calls.clone();
        let service = tower::service_fn(move |request: GrpcRequest| {
            counter.fetch_add(1, Ordering::SeqCst);
            let header = |name: &str| {
                request
                    .headers()
                    .get(name)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("")
                    .to_string()
            };
            let code = header("x-code");
            let delay = Duration::from_millis(header("x-delay-ms").parse().unwrap_or(0));
            async move {
                if !delay.is_zero() {
                    tokio::time::sleep(delay).await;
                }
                match code.parse::<i32>() {
                    Ok(0) => Ok(http::Response::new(tonic::body::Body::empty())),
                    Ok(code) => Ok(http::Response::builder()
                        .header("grpc-status", code.to_string())
                        .body(tonic::body::Body::empty())
                        .unwrap()),
                    Err(_) => Err::<GrpcResponse, BoxError>("connection reset".into()),
                }
            }
        });
        (service, calls)
    }

    fn config() -> BreakerConfig {
        BreakerConfig {
            jitter: 0.0,
            ..BreakerConfig::default()
        }
    }

    fn code_of(result: &Result<GrpcResponse, BoxError>) -> Code {
        outcome::classify(result).code
    }

    async fn call<S>(service: &mut S, request: GrpcRequest) -> Result<GrpcResponse, BoxError>
    where
        S: Service<GrpcRequest, Response = GrpcResponse, Error = BoxError>,
    {
        service.ready().await?.call(request).await
    }

    async fn calls<S>(service: &mut S, n: usize, code: Option<Code>)
    where
        S: Service<GrpcRequest, Response = GrpcResponse, Error = BoxError>,
    {
        for _ in 0..n {
            let _ = call(service, request(None, code, Duration::ZERO)).await;
        }
    }

    fn default_key() -> BackendKey {
        BackendKey::new(DEFAULT_BACKEND)
    }

    #[tokio::test(start_paused = true)]
    async fn opens_exactly_at_the_minimum_number_of_calls() {
        let layer = CircuitBreakerLayer::new(config());
        let (inner, _) = backend();
        let mut service = layer.layer(inner);
        calls(&mut service, 19, Some(Code::Unavailable)).await;
        // 19 failures out of 19 calls: 100 %, but below the minimum of 20.
        assert_eq!(layer.breakers().state(&default_key()), BreakerState::Closed);
        calls(&mut service, 1, None).await; // a transport error is a failure too
        assert_eq!(layer.breakers().state(&default_key()), BreakerState::Open);
    }

    #[tokio::test(start_paused = true)]
    async fn opens_exactly_at_the_failure_rate_threshold() {
        let layer = CircuitBreakerLayer::new(config());
        let (inner, _) = backend();
        let mut service = layer.layer(inner);
        calls(&mut service, 11, Some(Code::Ok)).await;
        calls(&mut service, 9, Some(Code::Internal)).await;
        // 9 / 20 = 45 %: stays closed.
        assert_eq!(layer.breakers().state(&default_key()), BreakerState::Closed);
        // The window slides: the oldest success leaves, 10 / 20 = 50 % opens it.
        calls(&mut service, 1, Some(Code::DeadlineExceeded)).await;
        assert_eq!(layer.breakers().state(&default_key()), BreakerState::Open);
    }

    #[tokio::test(start_paused = true)]
    async fn ignored_codes_never_open_it_nor_count_toward_the_minimum() {
        let layer = CircuitBreakerLayer::new(config());
        let (inner, _) = backend();
        let mut service = layer.layer(inner);
        for code in [
            Code::Cancelled,
            Code::InvalidArgument,
            Code::NotFound,
            Code::Unauthenticated,
            Code::PermissionDenied,
            Code::ResourceExhausted,
            Code::FailedPrecondition,
        ] {
            calls(&mut service, 50, Some(code)).await;
        }
        calls(&mut service, 19, Some(Code::DataLoss)).await;
        assert_eq!(layer.breakers().state(&default_key()), BreakerState::Closed);
        calls(&mut service, 1, Some(Code::Unknown)).await;
        assert_eq!(layer.breakers().state(&default_key()), BreakerState::Open);
    }

    #[tokio::test(start_paused = true)]
    async fn local_bulkhead_rejections_are_ignored() {
        let layer = CircuitBreakerLayer::new(config());
        let inner = tower::service_fn(|_: GrpcRequest| async {
            let full = crate::bulkhead::BulkheadFull {
                backend: BackendKey::new("a"),
                limit: 1,
            };
            Err::<GrpcResponse, BoxError>(Box::new(full.into_status()))
        });
        let mut service = layer.layer(inner);
        calls(&mut service, 100, None).await;
        assert_eq!(layer.breakers().state(&default_key()), BreakerState::Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn open_circuit_fails_fast_with_circuit_open_and_time_left() {
        let layer = CircuitBreakerLayer::new(config());
        let (inner, backend_calls) = backend();
        let mut service = layer.layer(inner);
        for _ in 0..20 {
            let _ = call(
                &mut service,
                request(Some("gpt-4o"), Some(Code::Unavailable), Duration::ZERO),
            )
            .await;
        }
        assert_eq!(backend_calls.load(Ordering::SeqCst), 20);
        tokio::time::advance(Duration::from_secs(2)).await;

        let started = Instant::now();
        let result = call(
            &mut service,
            request(Some("gpt-4o"), Some(Code::Ok), Duration::ZERO),
        )
        .await;
        assert_eq!(started.elapsed(), Duration::ZERO);
        assert_eq!(backend_calls.load(Ordering::SeqCst), 20, "not called");
        let status = outcome::find_status(&**result.as_ref().err().unwrap()).unwrap();
        assert_eq!(status.code(), Code::Unavailable);
        let error = ApiError::from_status(status);
        assert_eq!(error.reason(), "CIRCUIT_OPEN");
        assert_eq!(error.retry_after(), Some(Duration::from_secs(3)));
        assert_eq!(
            error.metadata().get("backend").map(String::as_str),
            Some("gpt-4o")
        );
        // Other backends are not affected.
        let other = call(
            &mut service,
            request(Some("sim-small"), Some(Code::Ok), Duration::ZERO),
        )
        .await;
        assert_eq!(code_of(&other), Code::Ok);
    }

    /// Opens the breaker of the default key with 20 failures.
    async fn open<S>(service: &mut S)
    where
        S: Service<GrpcRequest, Response = GrpcResponse, Error = BoxError>,
    {
        calls(service, 20, Some(Code::Unavailable)).await;
    }

    #[tokio::test(start_paused = true)]
    async fn half_open_admits_exactly_n_probes_then_closes_with_a_fresh_window() {
        let layer = CircuitBreakerLayer::new(config());
        let (inner, backend_calls) = backend();
        let mut service = layer.layer(inner);
        open(&mut service).await;
        tokio::time::advance(DEFAULT_OPEN_DURATION).await;

        let mut handles = Vec::new();
        for _ in 0..5 {
            let future = service.ready().await.unwrap().call(request(
                None,
                Some(Code::Ok),
                Duration::from_millis(100),
            ));
            handles.push(tokio::spawn(future));
        }
        assert_eq!(
            layer.breakers().state(&default_key()),
            BreakerState::HalfOpen
        );
        let mut codes = Vec::new();
        for handle in handles {
            codes.push(code_of(&handle.await.unwrap()));
        }
        assert_eq!(
            codes,
            [
                Code::Ok,
                Code::Ok,
                Code::Ok,
                Code::Unavailable,
                Code::Unavailable
            ]
        );
        assert_eq!(backend_calls.load(Ordering::SeqCst), 23);
        assert_eq!(layer.breakers().state(&default_key()), BreakerState::Closed);
        // A fresh window: the 20 failures that opened it are forgotten.
        calls(&mut service, 19, Some(Code::Unavailable)).await;
        assert_eq!(layer.breakers().state(&default_key()), BreakerState::Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_probe_reopens_and_the_open_duration_doubles_up_to_the_cap() {
        let breaker = Arc::new(Breaker::new(BackendKey::new("b"), config()));
        let retry_after = |breaker: &Arc<Breaker>| breaker.try_acquire().err().unwrap().retry_after;
        for _ in 0..20 {
            breaker.try_acquire().unwrap().record(Code::Unavailable);
        }
        let mut durations = vec![retry_after(&breaker)];
        for _ in 0..6 {
            tokio::time::advance(*durations.last().unwrap()).await;
            let probe = breaker.try_acquire().unwrap();
            assert!(probe.is_probe());
            probe.record(Code::Internal);
            assert_eq!(breaker.state(), BreakerState::Open);
            durations.push(retry_after(&breaker));
        }
        let secs: Vec<u64> = durations.iter().map(Duration::as_secs).collect();
        assert_eq!(secs, [5, 10, 20, 40, 60, 60, 60]);

        // Closing resets the backoff.
        tokio::time::advance(Duration::from_secs(60)).await;
        for _ in 0..3 {
            breaker.try_acquire().unwrap().record(Code::Ok);
        }
        assert_eq!(breaker.state(), BreakerState::Closed);
        for _ in 0..20 {
            breaker.try_acquire().unwrap().record(Code::Unavailable);
        }
        assert_eq!(retry_after(&breaker), Duration::from_secs(5));
    }

    #[tokio::test(start_paused = true)]
    async fn jitter_shortens_the_open_duration_within_its_fraction() {
        for seed in 0..50 {
            let config = BreakerConfig {
                jitter: 0.2,
                ..BreakerConfig::default()
            };
            let breaker = Arc::new(Breaker::with_rng(
                BackendKey::new("b"),
                config,
                StdRng::seed_from_u64(seed),
            ));
            for _ in 0..20 {
                breaker.try_acquire().unwrap().record(Code::Unavailable);
            }
            let open = breaker.try_acquire().err().unwrap().retry_after;
            assert!(
                open >= Duration::from_secs(4) && open <= Duration::from_secs(5),
                "{open:?}"
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn cancelled_and_ignored_probes_release_their_slots() {
        let layer = CircuitBreakerLayer::new(config());
        let (inner, backend_calls) = backend();
        let mut service = layer.layer(inner);
        open(&mut service).await;
        tokio::time::advance(DEFAULT_OPEN_DURATION).await;

        // Three probes that hang, then are cancelled by their callers.
        let mut hanging = Vec::new();
        for _ in 0..3 {
            let future = service.ready().await.unwrap().call(request(
                None,
                Some(Code::Ok),
                Duration::from_secs(3600),
            ));
            hanging.push(tokio::spawn(future));
        }
        tokio::task::yield_now().await;
        let rejected = call(&mut service, request(None, Some(Code::Ok), Duration::ZERO)).await;
        assert_eq!(
            code_of(&rejected),
            Code::Unavailable,
            "all probe slots taken"
        );
        for handle in &hanging {
            handle.abort();
        }
        for handle in hanging {
            let _ = handle.await;
        }
        // An ignored probe gives its slot back too.
        let ignored = call(
            &mut service,
            request(None, Some(Code::InvalidArgument), Duration::ZERO),
        )
        .await;
        assert_eq!(code_of(&ignored), Code::InvalidArgument);
        assert_eq!(
            layer.breakers().state(&default_key()),
            BreakerState::HalfOpen
        );
        calls(&mut service, 3, Some(Code::Ok)).await;
        assert_eq!(layer.breakers().state(&default_key()), BreakerState::Closed);
        assert_eq!(backend_calls.load(Ordering::SeqCst), 20 + 3 + 1 + 3);
    }

    #[tokio::test(start_paused = true)]
    async fn slow_calls_open_it() {
        let layer = CircuitBreakerLayer::new(config());
        let (inner, _) = backend();
        let mut service = layer.layer(inner);
        let slow = DEFAULT_SLOW_CALL_THRESHOLD + Duration::from_millis(1);
        for _ in 0..19 {
            let _ = call(&mut service, request(None, Some(Code::Ok), slow)).await;
        }
        assert_eq!(layer.breakers().state(&default_key()), BreakerState::Closed);
        // Exactly at the threshold is not slow.
        let _ = call(
            &mut service,
            request(None, Some(Code::Ok), DEFAULT_SLOW_CALL_THRESHOLD),
        )
        .await;
        assert_eq!(layer.breakers().state(&default_key()), BreakerState::Closed);
        // The window slides past the fast call: 20 / 20 slow opens it.
        let _ = call(&mut service, request(None, Some(Code::Ok), slow)).await;
        assert_eq!(layer.breakers().state(&default_key()), BreakerState::Closed);
        for _ in 0..19 {
            let _ = call(&mut service, request(None, Some(Code::Ok), slow)).await;
        }
        assert_eq!(layer.breakers().state(&default_key()), BreakerState::Open);
    }

    #[tokio::test(start_paused = true)]
    async fn outcomes_of_calls_from_an_earlier_state_are_not_counted() {
        let breaker = Arc::new(Breaker::new(BackendKey::new("b"), config()));
        let late = breaker.try_acquire().unwrap();
        for _ in 0..20 {
            breaker.try_acquire().unwrap().record(Code::Unavailable);
        }
        tokio::time::advance(DEFAULT_OPEN_DURATION).await;
        assert_eq!(breaker.state(), BreakerState::HalfOpen);
        // A call that started while CLOSED fails now: it is no probe and changes nothing.
        late.record(Code::Unavailable);
        assert_eq!(breaker.state(), BreakerState::HalfOpen);
    }

    #[test]
    fn config_defaults_parse_and_validate() {
        let config: BreakerConfig = toml::from_str("").unwrap();
        assert_eq!(config, BreakerConfig::default());
        config.validate("router.breaker").unwrap();
        let config: BreakerConfig = toml::from_str(
            "window = 50\nminimum_calls = 10\nslow_call_threshold = \"0s\"\nopen_duration = \"1s\"\n",
        )
        .unwrap();
        assert_eq!(config.open_duration, Duration::from_secs(1));
        config.validate("router.breaker").unwrap();
        assert!(toml::from_str::<BreakerConfig>("windw = 5").is_err());
    }

    #[test]
    fn validation_names_the_key() {
        let cases = [
            (
                BreakerConfig {
                    failure_rate: 1.5,
                    ..BreakerConfig::default()
                },
                "router.breaker.failure_rate",
            ),
            (
                BreakerConfig {
                    minimum_calls: 30,
                    ..BreakerConfig::default()
                },
                "router.breaker.minimum_calls",
            ),
            (
                BreakerConfig {
                    max_open_duration: Duration::from_secs(1),
                    ..BreakerConfig::default()
                },
                "router.breaker.max_open_duration",
            ),
            (
                BreakerConfig {
                    failure_codes: vec!["UNAVAILABLE".into(), "BROKEN".into()],
                    ..BreakerConfig::default()
                },
                "router.breaker.failure_codes",
            ),
        ];
        for (config, key) in cases {
            let error = config.validate("router.breaker").unwrap_err().to_string();
            assert!(error.contains(&format!("`{key}`")), "{error}");
        }
    }
}
