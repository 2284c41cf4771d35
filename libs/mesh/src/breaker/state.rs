//! The breaker itself: its state machine over a count-based sliding window, per backend.

use std::{
    fmt,
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use rand::{Rng, SeedableRng, rngs::StdRng};
use tokio::time::Instant;
use tonic::{Code, Status};

use crate::{
    ApiError,
    backend::{BackendKey, PerBackend},
    error::parse_code,
    outcome,
};

use super::*;

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
