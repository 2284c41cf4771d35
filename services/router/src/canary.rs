//! Canaries that roll themselves back.
//!
//! A route's canary (`[router.routes.<alias>.canary]`) takes a share of the route's requests and
//! falls back to the route's models when it fails, so a broken canary costs latency, not errors.
//! It would still keep its share forever; this module watches it, after Flagger and Argo
//! Rollouts: metric thresholds, an interval and a count of failed checks.
//!
//! # What is recorded
//!
//! Every model call the walk makes for a route with a canary, to the canary model or to the
//! route's primary (the first model of its default tier), is one sample: a success with its
//! latency (the whole call for `Complete`, the time to the first event for a stream), or a
//! failure. Whose fault a call was comes from the mesh's classification
//! ([`weir_mesh::outcome::Class`]), the one the circuit breakers use: only successes and
//! backend failures count. A call cut short by its caller's own deadline, a cancelled call,
//! a caller's mistake or a backend's load refusal (`OVERLOADED`, `BULKHEAD_FULL`) says nothing
//! about the model and is not recorded.
//!
//! # The check
//!
//! Every `interval` (default [`DEFAULT_INTERVAL`]) a check judges the calls since the previous
//! check, then forgets them:
//!
//! - fewer than `min_requests` canary calls (default [`DEFAULT_MIN_REQUESTS`]): **skipped**,
//!   neither pass nor fail;
//! - the canary's error rate exceeds the primary's by more than `max_error_rate_increase`
//!   (default [`DEFAULT_MAX_ERROR_RATE_INCREASE`], five percentage points): **failed**;
//! - the canary's p95 success latency is above both `latency_floor` (default
//!   [`DEFAULT_LATENCY_FLOOR`]) and `max_latency_ratio` (default [`DEFAULT_MAX_LATENCY_RATIO`])
//!   times the primary's p95: **failed** (not compared when either side has no success);
//! - otherwise **passed**.
//!
//! p95 rather than p99: with a few dozen calls per interval p99 is the single slowest call, and
//! one slow call should not fail a check.
//!
//! After `failed_checks` failed checks **in a row** (default [`DEFAULT_FAILED_CHECKS`]; a passed
//! check resets the count, a skipped one leaves it) the canary is **rolled back**: its weight
//! becomes 0, so no request is sent to it, with a `warn!` line naming the route, the model and
//! the failing figures, `weir_canary_rollbacks_total{route,model}` counted,
//! `weir_canary_rolled_back{route,model}` at 1 and `weir_canary_weight{route,model}` (the
//! current share) at 0. It stays off until an operator resumes it (`ResumeCanary`, `weir routes
//! canary resume`), which restores the configured weight and clears the count, or the router
//! restarts. An operator may also take a canary off at once (`PauseCanary`): weight 0 too, but
//! not counted as a rollback.
//!
//! # Promotion
//!
//! Optionally (`step_weight` above 0; off by default) a canary that stays healthy is promoted in
//! steps: after `promote_after` passed checks in a row its current weight grows by `step_weight`,
//! up to `max_weight`. A failed check starts the count again; a rollback still drops it to 0, and
//! a resume restores the *configured* weight, from which promotion starts over.
//!
//! State is per router process: each replica judges its own traffic and rolls back on its own,
//! and a restart starts again from the configured weight. The durable fix for a bad canary is
//! `weight = 0` in the config.
//!
//! Metrics: `weir_canary_weight{route,model}`, `weir_canary_rolled_back{route,model}` (1 while
//! rolled back), `weir_canary_checks_total{route,result}` (`skipped`, `passed`, `failed`),
//! `weir_canary_rollbacks_total{route,model}`.

use std::{
    sync::{
        Arc, Mutex, MutexGuard, PoisonError, Weak,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, SystemTime},
};

use tonic::Code;
use weir_mesh::{
    ApiError,
    catalog::Catalog,
    config::ConfigError,
    deadline::Deadline,
    outcome::{BULKHEAD_FULL, Class, OVERLOADED, Outcome, Pushback},
};

use crate::{
    config::CanarySpec,
    route::{Candidate, RouteTable},
};

/// Default time between checks: 30s.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(30);
/// Default failed checks in a row before a rollback: 3 (Flagger's `threshold`).
pub const DEFAULT_FAILED_CHECKS: u32 = 3;
/// Default fewest canary calls for a check to judge: 20.
pub const DEFAULT_MIN_REQUESTS: u64 = 20;
/// Default allowed excess of the canary's error rate over the primary's: 0.05 (5 points).
pub const DEFAULT_MAX_ERROR_RATE_INCREASE: f64 = 0.05;
/// Default most the canary's p95 latency may be, as a multiple of the primary's: 1.5.
pub const DEFAULT_MAX_LATENCY_RATIO: f64 = 1.5;
/// Default latency below which the canary always passes the latency test: 50ms.
pub const DEFAULT_LATENCY_FLOOR: Duration = Duration::from_millis(50);
/// Default promotion step: 0, never promoted.
pub const DEFAULT_STEP_WEIGHT: f64 = 0.0;
/// Default most a promotion raises the weight to: 0.5 (Flagger's `maxWeight` default is 50%).
pub const DEFAULT_MAX_WEIGHT: f64 = 0.5;
/// Default passed checks in a row before each promotion step: 1.
pub const DEFAULT_PROMOTE_AFTER: u32 = 1;
/// Shortest `interval` accepted.
pub const MIN_INTERVAL: Duration = Duration::from_millis(100);
/// Most success latencies kept per side and interval; later ones still count as calls.
const MAX_SAMPLES: usize = 10_000;

/// The validated analysis settings of one canary (see [`CanarySpec`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    /// Time between checks.
    pub interval: Duration,
    /// Failed checks in a row before a rollback.
    pub failed_checks: u32,
    /// Fewest canary calls for a check to judge.
    pub min_requests: u64,
    /// Allowed excess of the canary's error rate over the primary's.
    pub max_error_rate_increase: f64,
    /// Most the canary's p95 success latency may be, as a multiple of the primary's.
    pub max_latency_ratio: f64,
    /// A canary p95 at or below this always passes the latency test.
    pub latency_floor: Duration,
    /// Promotion step, in parts per million of requests (0: never promoted).
    pub step_ppm: u64,
    /// The most promotion raises the weight to, in parts per million.
    pub max_ppm: u64,
    /// Passed checks in a row before each promotion step.
    pub promote_after: u32,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            interval: DEFAULT_INTERVAL,
            failed_checks: DEFAULT_FAILED_CHECKS,
            min_requests: DEFAULT_MIN_REQUESTS,
            max_error_rate_increase: DEFAULT_MAX_ERROR_RATE_INCREASE,
            max_latency_ratio: DEFAULT_MAX_LATENCY_RATIO,
            latency_floor: DEFAULT_LATENCY_FLOOR,
            step_ppm: 0,
            max_ppm: ppm(DEFAULT_MAX_WEIGHT),
            promote_after: DEFAULT_PROMOTE_AFTER,
        }
    }
}

/// One side's calls since the last check.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Side {
    /// Calls that counted (successes and backend failures).
    pub calls: u64,
    /// Backend failures among them.
    pub failures: u64,
    /// Latencies of the successes (at most [`MAX_SAMPLES`]).
    pub latencies: Vec<Duration>,
}

impl Side {
    fn record(&mut self, success: bool, elapsed: Duration) {
        self.calls += 1;
        if !success {
            self.failures += 1;
        } else if self.latencies.len() < MAX_SAMPLES {
            self.latencies.push(elapsed);
        }
    }

    /// Failures per call, 0 without calls.
    pub fn error_rate(&self) -> f64 {
        if self.calls == 0 {
            0.0
        } else {
            self.failures as f64 / self.calls as f64
        }
    }

    /// The 95th percentile of the success latencies (nearest rank), `None` without successes.
    pub fn p95(&self) -> Option<Duration> {
        let mut sorted = self.latencies.clone();
        sorted.sort_unstable();
        let rank = (sorted.len() as f64 * 0.95).ceil() as usize;
        sorted.get(rank.saturating_sub(1)).copied()
    }
}

/// The figures a check judged.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Figures {
    /// Canary calls that counted.
    pub canary_calls: u64,
    /// Canary backend failures.
    pub canary_failures: u64,
    /// Primary calls that counted.
    pub primary_calls: u64,
    /// Primary backend failures.
    pub primary_failures: u64,
    /// The canary's p95 success latency, if it had a success.
    pub canary_p95: Option<Duration>,
    /// The primary's p95 success latency, if it had a success.
    pub primary_p95: Option<Duration>,
}

/// What a check concluded.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// Too few canary calls to judge.
    Skipped,
    /// The canary is within every threshold.
    Passed,
    /// The canary broke a threshold; the text says which, with the figures.
    Failed(String),
}

impl Verdict {
    /// The `result` label of `weir_canary_checks_total`.
    pub fn label(&self) -> &'static str {
        match self {
            Verdict::Skipped => "skipped",
            Verdict::Passed => "passed",
            Verdict::Failed(_) => "failed",
        }
    }
}

/// Judges one interval's calls (see the module documentation).
pub fn judge(canary: &Side, primary: &Side, settings: &Settings) -> (Verdict, Figures) {
    let figures = Figures {
        canary_calls: canary.calls,
        canary_failures: canary.failures,
        primary_calls: primary.calls,
        primary_failures: primary.failures,
        canary_p95: canary.p95(),
        primary_p95: primary.p95(),
    };
    if canary.calls < settings.min_requests {
        return (Verdict::Skipped, figures);
    }
    let (canary_rate, primary_rate) = (canary.error_rate(), primary.error_rate());
    if canary_rate - primary_rate > settings.max_error_rate_increase {
        let reason = format!(
            "error rate {:.1}% ({} of {} calls) against the primary's {:.1}%: more than {:.1} \
             points higher",
            canary_rate * 100.0,
            canary.failures,
            canary.calls,
            primary_rate * 100.0,
            settings.max_error_rate_increase * 100.0
        );
        return (Verdict::Failed(reason), figures);
    }
    if let (Some(slow), Some(base)) = (figures.canary_p95, figures.primary_p95)
        && slow > settings.latency_floor
        && slow.as_secs_f64() > base.as_secs_f64() * settings.max_latency_ratio
    {
        let reason = format!(
            "p95 latency {}ms against the primary's {}ms: more than {} times as slow",
            slow.as_millis(),
            base.as_millis(),
            settings.max_latency_ratio
        );
        return (Verdict::Failed(reason), figures);
    }
    (Verdict::Passed, figures)
}

/// One check: when, what it concluded, on which figures.
#[derive(Debug, Clone, PartialEq)]
pub struct Check {
    /// When it ran.
    pub at: SystemTime,
    /// What it concluded.
    pub verdict: Verdict,
    /// What it judged.
    pub figures: Figures,
}

/// Why a canary is off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cause {
    /// Its checks failed: rolled back.
    Checks,
    /// An operator paused it ([`Canary::pause`]).
    Operator,
}

/// When and why a canary was taken off (weight 0).
#[derive(Debug, Clone, PartialEq)]
pub struct Off {
    /// When.
    pub at: SystemTime,
    /// Rolled back by its checks, or paused.
    pub cause: Cause,
    /// The last failed check's reason, or that an operator paused it.
    pub reason: String,
}

/// A canary's state as an operator sees it ([`Canary::status`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Status {
    /// The canary model.
    pub model: String,
    /// The weight from config.
    pub configured_weight: f64,
    /// The weight requests see now (0 while off).
    pub current_weight: f64,
    /// Failed checks in a row so far.
    pub failed_checks: u32,
    /// Set while rolled back or paused.
    pub off: Option<Off>,
    /// The last check, if one has run.
    pub last_check: Option<Check>,
}

#[derive(Debug, Default)]
struct State {
    canary: Side,
    primary: Side,
    failed_in_a_row: u32,
    passed_in_a_row: u32,
    off: Option<Off>,
    last_check: Option<Check>,
}

/// A validated canary split with its analysis state. Shared by the route table and its check
/// task ([`spawn_checks`]).
#[derive(Debug)]
pub struct Canary {
    route: String,
    candidate: Candidate,
    primary: String,
    settings: Settings,
    /// The configured share of requests, in parts per million.
    configured_ppm: u64,
    /// The share requests see now (0 once rolled back), in parts per million, so the choice is
    /// exact integer arithmetic.
    weight_ppm: AtomicU64,
    /// Requests without a session seen so far, for the exact-share counter.
    counter: AtomicU64,
    state: Mutex<State>,
}

impl Canary {
    /// Validates `spec` for route `alias`, whose default tier is `candidates` (primary first),
    /// naming the key at fault (`router.routes.<alias>.canary.<field>`).
    pub(crate) fn new(
        catalog: &Catalog,
        alias: &str,
        candidates: &[Candidate],
        spec: CanarySpec,
    ) -> Result<Self, ConfigError> {
        let key = |field: &str| format!("router.routes.{alias}.canary.{field}");
        let invalid = |field: &str, message: &str| Err(ConfigError::invalid(key(field), message));
        if catalog.get(&spec.model).is_none() {
            let message = format!("\"{}\" is not a model in the catalog", spec.model);
            return invalid("model", &message);
        }
        if candidates.iter().any(|c| c.model() == spec.model) {
            let message = format!(
                "\"{}\" is already one of the route's models; a canary is a new model",
                spec.model
            );
            return invalid("model", &message);
        }
        if !(0.0..=1.0).contains(&spec.weight) {
            return invalid("weight", "must be between 0 and 1");
        }
        if spec.interval < MIN_INTERVAL {
            return invalid("interval", "must be at least 100ms");
        }
        if spec.failed_checks == 0 {
            return invalid("failed_checks", "must be at least 1");
        }
        if spec.min_requests == 0 {
            return invalid("min_requests", "must be at least 1");
        }
        if !(0.0..=1.0).contains(&spec.max_error_rate_increase) {
            return invalid("max_error_rate_increase", "must be between 0 and 1");
        }
        if !(spec.max_latency_ratio >= 1.0 && spec.max_latency_ratio.is_finite()) {
            return invalid("max_latency_ratio", "must be a number of at least 1");
        }
        if !(0.0..=1.0).contains(&spec.step_weight) {
            return invalid("step_weight", "must be between 0 and 1");
        }
        if spec.step_weight > 0.0 && !(spec.weight..=1.0).contains(&spec.max_weight) {
            return invalid("max_weight", "must be between `weight` and 1");
        }
        if spec.promote_after == 0 {
            return invalid("promote_after", "must be at least 1");
        }
        Ok(Self {
            route: alias.to_string(),
            candidate: Candidate::new(spec.model),
            primary: candidates
                .first()
                .map(|c| c.model().to_string())
                .unwrap_or_default(),
            settings: Settings {
                interval: spec.interval,
                failed_checks: spec.failed_checks,
                min_requests: spec.min_requests,
                max_error_rate_increase: spec.max_error_rate_increase,
                max_latency_ratio: spec.max_latency_ratio,
                latency_floor: spec.latency_floor,
                step_ppm: ppm(spec.step_weight),
                max_ppm: ppm(spec.max_weight),
                promote_after: spec.promote_after,
            },
            configured_ppm: ppm(spec.weight),
            weight_ppm: AtomicU64::new(ppm(spec.weight)),
            counter: AtomicU64::new(0),
            state: Mutex::new(State::default()),
        })
    }

    /// The canary model, as the walk's first candidate.
    pub fn candidate(&self) -> &Candidate {
        &self.candidate
    }

    /// The analysis settings.
    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// Whether this request tries the canary: by a stable hash of `sticky` when given, else the
    /// n-th request is chosen iff floor((n+1)·w) > floor(n·w), which sends exactly a share w of
    /// the current weight (0 once rolled back).
    pub fn chosen(&self, sticky: Option<&str>) -> bool {
        let weight_ppm = self.weight_ppm.load(Ordering::Relaxed);
        match sticky {
            Some(key) => fnv1a(key.as_bytes()) % 1_000_000 < weight_ppm,
            None => {
                let n = self.counter.fetch_add(1, Ordering::Relaxed);
                let before = n.saturating_mul(weight_ppm) / 1_000_000;
                let after = (n + 1).saturating_mul(weight_ppm) / 1_000_000;
                after > before
            }
        }
    }

    /// Records one finished call to `model` (the canary or the primary; other models are
    /// ignored): `error` is `None` on success. `deadline` is the caller's, to tell its own
    /// impatience from the model's fault.
    pub fn record(
        &self,
        model: &str,
        error: Option<&ApiError>,
        deadline: Option<Deadline>,
        elapsed: Duration,
    ) {
        let canary = model == self.candidate.model();
        if !canary && model != self.primary {
            return;
        }
        let outcome = Outcome {
            code: error.map_or(Code::Ok, ApiError::code),
            pushback: Pushback::None,
            local: None,
            busy: error.is_some_and(|e| {
                e.code() == Code::Unavailable && [OVERLOADED, BULKHEAD_FULL].contains(&e.reason())
            }),
        };
        let success = match outcome.class(deadline.map(|d| d.instant())) {
            Class::Success => true,
            Class::BackendFailure => false,
            _ => return,
        };
        let mut state = self.lock();
        let side = if canary {
            &mut state.canary
        } else {
            &mut state.primary
        };
        side.record(success, elapsed);
    }

    /// Runs one check over the calls since the last one (see the module documentation); rolls
    /// the canary back on the last allowed failed check. A rolled-back canary is still checked
    /// (it has no calls, so the check is skipped), but nothing a check finds changes its state:
    /// only [`Canary::resume`] does.
    pub fn check(&self, now: SystemTime) -> Check {
        let mut state = self.lock();
        let canary = std::mem::take(&mut state.canary);
        let primary = std::mem::take(&mut state.primary);
        let (verdict, figures) = judge(&canary, &primary, &self.settings);
        metrics::counter!(
            "weir_canary_checks_total",
            "route" => self.route.clone(),
            "result" => verdict.label()
        )
        .increment(1);
        match &verdict {
            _ if state.off.is_some() => {}
            Verdict::Skipped => {}
            Verdict::Passed => {
                state.failed_in_a_row = 0;
                state.passed_in_a_row += 1;
                if state.passed_in_a_row >= self.settings.promote_after {
                    state.passed_in_a_row = 0;
                    self.promote(&state);
                }
            }
            Verdict::Failed(reason) => {
                state.passed_in_a_row = 0;
                state.failed_in_a_row += 1;
                tracing::info!(
                    route = %self.route,
                    model = self.candidate.model(),
                    failed_checks = state.failed_in_a_row,
                    limit = self.settings.failed_checks,
                    %reason,
                    "canary check failed"
                );
                if state.failed_in_a_row >= self.settings.failed_checks {
                    self.roll_back(&mut state, now, reason, &figures);
                }
            }
        }
        let check = Check {
            at: now,
            verdict,
            figures,
        };
        state.last_check = Some(check.clone());
        check
    }

    /// One promotion step, when promotion is on and the weight is below its maximum.
    fn promote(&self, state: &State) {
        let current = self.weight_ppm.load(Ordering::Relaxed);
        let next = (current + self.settings.step_ppm).min(self.settings.max_ppm);
        if self.settings.step_ppm == 0 || next <= current {
            return;
        }
        self.weight_ppm.store(next, Ordering::Relaxed);
        tracing::info!(
            route = %self.route,
            model = self.candidate.model(),
            from = ppm_to_share(current),
            to = ppm_to_share(next),
            "canary promoted after passed checks"
        );
        self.publish(state);
    }

    fn roll_back(&self, state: &mut State, now: SystemTime, reason: &str, figures: &Figures) {
        self.weight_ppm.store(0, Ordering::Relaxed);
        state.off = Some(Off {
            at: now,
            cause: Cause::Checks,
            reason: reason.to_string(),
        });
        tracing::warn!(
            route = %self.route,
            model = self.candidate.model(),
            primary = %self.primary,
            canary_calls = figures.canary_calls,
            canary_failures = figures.canary_failures,
            primary_calls = figures.primary_calls,
            primary_failures = figures.primary_failures,
            canary_p95_ms = figures.canary_p95.map(|d| d.as_millis()),
            primary_p95_ms = figures.primary_p95.map(|d| d.as_millis()),
            failed_checks = state.failed_in_a_row,
            %reason,
            "canary rolled back: its weight is 0 until `weir routes canary resume {}` or a restart",
            self.route
        );
        metrics::counter!(
            "weir_canary_rollbacks_total",
            "route" => self.route.clone(),
            "model" => self.candidate.model().to_string()
        )
        .increment(1);
        self.publish(state);
    }

    /// Takes the canary off (weight 0) now, until [`Canary::resume`]; checks go on but change
    /// nothing. Keeps the state of a canary that is already off (a rollback stays a rollback).
    pub fn pause(&self, now: SystemTime) {
        let mut state = self.lock();
        if state.off.is_none() {
            self.weight_ppm.store(0, Ordering::Relaxed);
            state.off = Some(Off {
                at: now,
                cause: Cause::Operator,
                reason: "paused by an operator".to_string(),
            });
            tracing::warn!(
                route = %self.route,
                model = self.candidate.model(),
                "canary paused: its weight is 0 until `weir routes canary resume {}` or a restart",
                self.route
            );
        }
        self.publish(&state);
    }

    /// Turns the canary back on at its configured weight, with no failed check counted and the
    /// calls so far forgotten. Does nothing to a canary that is on.
    pub fn resume(&self) {
        let mut state = self.lock();
        let was_off = state.off.take().is_some();
        *state = State {
            last_check: state.last_check.take(),
            ..State::default()
        };
        self.weight_ppm
            .store(self.configured_ppm, Ordering::Relaxed);
        if was_off {
            tracing::info!(
                route = %self.route,
                model = self.candidate.model(),
                "canary resumed at its configured weight"
            );
        }
        self.publish(&state);
    }

    /// The canary's state for an operator.
    pub fn status(&self) -> Status {
        let state = self.lock();
        Status {
            model: self.candidate.model().to_string(),
            configured_weight: ppm_to_share(self.configured_ppm),
            current_weight: ppm_to_share(self.weight_ppm.load(Ordering::Relaxed)),
            failed_checks: state.failed_in_a_row,
            off: state.off.clone(),
            last_check: state.last_check.clone(),
        }
    }

    /// Sets `weir_canary_weight{route,model}` to the current share and
    /// `weir_canary_rolled_back{route,model}` to 1 while its checks have it off (0 otherwise).
    fn publish(&self, state: &State) {
        let (route, model) = (self.route.clone(), self.candidate.model().to_string());
        metrics::gauge!("weir_canary_weight", "route" => route.clone(), "model" => model.clone())
            .set(ppm_to_share(self.weight_ppm.load(Ordering::Relaxed)));
        let rolled_back = state
            .off
            .as_ref()
            .is_some_and(|off| off.cause == Cause::Checks);
        metrics::gauge!("weir_canary_rolled_back", "route" => route, "model" => model)
            .set(if rolled_back { 1.0 } else { 0.0 });
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // The state is plain counters: one a panicking holder left behind is still usable.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A share (checked to be within 0..=1) in parts per million.
fn ppm(share: f64) -> u64 {
    // Within 0..=1, so the product is within 0..=1e6 and the cast cannot truncate.
    (share.clamp(0.0, 1.0) * 1_000_000.0).round() as u64
}

fn ppm_to_share(ppm: u64) -> f64 {
    ppm as f64 / 1_000_000.0
}

/// 64-bit FNV-1a: stable across processes and versions, unlike std's hasher.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, byte| {
        (hash ^ u64::from(*byte)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Starts one task per canary of `routes` that checks it every `interval`. A task ends when its
/// route table is dropped. Needs a Tokio runtime.
pub fn spawn_checks(routes: &RouteTable) {
    for canary in routes.routes().filter_map(|route| route.shared_canary()) {
        canary.publish(&canary.lock());
        let every = canary.settings.interval;
        let canary: Weak<Canary> = Arc::downgrade(canary);
        tokio::spawn(async move {
            let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                ticker.tick().await;
                let Some(canary) = canary.upgrade() else {
                    break;
                };
                canary.check(SystemTime::now());
            }
        });
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use weir_mesh::catalog::ModelSpec;

    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn side(successes: u64, failures: u64, latency: Duration) -> Side {
        let mut side = Side::default();
        for _ in 0..successes {
            side.record(true, latency);
        }
        for _ in 0..failures {
            side.record(false, Duration::ZERO);
        }
        side
    }

    fn catalog() -> Catalog {
        Catalog::new(["p", "c"].map(|name| (name.to_string(), ModelSpec::default())))
    }

    fn canary(spec: CanarySpec) -> Canary {
        let catalog = catalog();
        let candidates = [Candidate::new("p".to_string())];
        Canary::new(&catalog, "auto", &candidates, spec).unwrap()
    }

    fn spec() -> CanarySpec {
        CanarySpec {
            model: "c".to_string(),
            weight: 0.5,
            min_requests: 4,
            failed_checks: 2,
            ..CanarySpec::default()
        }
    }

    #[test]
    fn too_few_canary_calls_skip_the_check() {
        let settings = Settings::default();
        let (verdict, figures) = judge(&side(0, 19, MS), &side(100, 0, MS), &settings);
        assert_eq!(verdict, Verdict::Skipped);
        assert_eq!(figures.canary_failures, 19);
        let (verdict, _) = judge(&side(0, 20, MS), &side(100, 0, MS), &settings);
        assert!(matches!(verdict, Verdict::Failed(_)), "{verdict:?}");
    }

    #[test]
    fn the_error_rate_may_exceed_the_primarys_by_the_allowed_points() {
        let settings = Settings::default();
        // 10% against 5%: exactly 5 points higher passes; 11% fails.
        let (verdict, _) = judge(&side(90, 10, MS), &side(95, 5, MS), &settings);
        assert_eq!(verdict, Verdict::Passed);
        let (verdict, _) = judge(&side(89, 11, MS), &side(95, 5, MS), &settings);
        let Verdict::Failed(reason) = verdict else {
            panic!("fails")
        };
        assert!(
            reason.contains("11.0%") && reason.contains("5.0%"),
            "{reason}"
        );
        // A primary as bad as the canary: the canary is not to blame.
        let (verdict, _) = judge(&side(50, 50, MS), &side(50, 50, MS), &settings);
        assert_eq!(verdict, Verdict::Passed);
    }

    #[test]
    fn latency_fails_above_the_ratio_and_the_floor() {
        let settings = Settings::default();
        let slow = |ms| side(20, 0, ms * MS);
        // 200ms against 100ms: twice as slow.
        let (verdict, figures) = judge(&slow(200), &slow(100), &settings);
        assert!(matches!(verdict, Verdict::Failed(ref r) if r.contains("200ms")));
        assert_eq!(figures.canary_p95, Some(200 * MS));
        // 150ms against 100ms: exactly the ratio passes.
        assert_eq!(judge(&slow(150), &slow(100), &settings).0, Verdict::Passed);
        // 40ms against 1ms is far above the ratio, but under the floor.
        assert_eq!(judge(&slow(40), &slow(1), &settings).0, Verdict::Passed);
        // No primary success to compare with: latency is not judged.
        assert_eq!(
            judge(&slow(900), &side(0, 3, MS), &settings).0,
            Verdict::Passed
        );
    }

    #[test]
    fn p95_is_the_nearest_rank() {
        let mut side = Side::default();
        for ms in 1..=100 {
            side.record(true, ms * MS);
        }
        assert_eq!(side.p95(), Some(95 * MS));
        assert_eq!(Side::default().p95(), None);
    }

    #[test]
    fn failed_checks_in_a_row_roll_back_and_it_stays_off_until_resumed() {
        let canary = canary(spec());
        let failure = ApiError::new(Code::Unavailable, "UNAVAILABLE", "down");
        let fail_interval = |canary: &Canary| {
            for _ in 0..4 {
                canary.record("c", Some(&failure), None, MS);
                canary.record("p", None, None, MS);
            }
            canary.check(SystemTime::now())
        };
        assert!(matches!(fail_interval(&canary).verdict, Verdict::Failed(_)));
        assert_eq!(canary.status().failed_checks, 1);
        assert_eq!(canary.status().current_weight, 0.5);
        // A pass in between starts the count again.
        for _ in 0..4 {
            canary.record("c", None, None, MS);
        }
        assert_eq!(canary.check(SystemTime::now()).verdict, Verdict::Passed);
        assert_eq!(canary.status().failed_checks, 0);
        // A skipped check leaves the count.
        fail_interval(&canary);
        assert_eq!(canary.check(SystemTime::now()).verdict, Verdict::Skipped);
        assert_eq!(canary.status().failed_checks, 1);
        fail_interval(&canary);
        let status = canary.status();
        assert_eq!(status.current_weight, 0.0);
        let off = status.off.unwrap();
        assert_eq!(off.cause, Cause::Checks);
        assert!(off.reason.contains("100.0%"));
        assert!((0..100).all(|_| !canary.chosen(None)), "no request is sent");
        // Healthy calls afterwards do not bring it back.
        for _ in 0..10 {
            canary.record("c", None, None, MS);
        }
        assert_eq!(canary.check(SystemTime::now()).verdict, Verdict::Passed);
        assert_eq!(canary.status().current_weight, 0.0);
        assert!(canary.status().off.is_some());
        canary.resume();
        let status = canary.status();
        assert_eq!((status.current_weight, status.failed_checks), (0.5, 0));
        assert!(status.off.is_none());
        assert_eq!((0..100).filter(|_| canary.chosen(None)).count(), 50);
    }

    #[test]
    fn passed_checks_promote_in_steps_up_to_the_maximum() {
        let canary = canary(CanarySpec {
            weight: 0.1,
            step_weight: 0.25,
            max_weight: 0.5,
            promote_after: 2,
            ..spec()
        });
        let healthy_interval = |canary: &Canary| {
            for _ in 0..4 {
                canary.record("c", None, None, MS);
            }
            canary.check(SystemTime::now()).verdict
        };
        let weight = |canary: &Canary| canary.status().current_weight;
        assert_eq!(healthy_interval(&canary), Verdict::Passed);
        assert_eq!(weight(&canary), 0.1, "one pass is not enough");
        // A skipped check neither counts nor resets.
        canary.check(SystemTime::now());
        healthy_interval(&canary);
        assert_eq!(weight(&canary), 0.35);
        healthy_interval(&canary);
        healthy_interval(&canary);
        assert_eq!(weight(&canary), 0.5, "capped at max_weight");
        healthy_interval(&canary);
        healthy_interval(&canary);
        assert_eq!(weight(&canary), 0.5);
        // A failed check starts the count again.
        let failure = ApiError::new(Code::Unavailable, "UNAVAILABLE", "down");
        for _ in 0..4 {
            canary.record("c", Some(&failure), None, MS);
        }
        canary.check(SystemTime::now());
        healthy_interval(&canary);
        assert_eq!(canary.status().failed_checks, 0);
        canary.resume();
        assert_eq!(
            weight(&canary),
            0.1,
            "resume restores the configured weight"
        );
    }

    #[test]
    fn a_pause_takes_the_canary_off_until_resumed_and_keeps_a_rollback() {
        let canary = canary(spec());
        canary.pause(SystemTime::now());
        let status = canary.status();
        assert_eq!(status.current_weight, 0.0);
        assert_eq!(status.off.unwrap().cause, Cause::Operator);
        assert!((0..100).all(|_| !canary.chosen(None)));
        canary.resume();
        assert_eq!(canary.status().current_weight, 0.5);

        // Pausing a rolled-back canary leaves it rolled back, with its reason.
        let failure = ApiError::new(Code::Unavailable, "UNAVAILABLE", "down");
        for _ in 0..2 {
            for _ in 0..4 {
                canary.record("c", Some(&failure), None, MS);
            }
            canary.check(SystemTime::now());
        }
        canary.pause(SystemTime::now());
        assert_eq!(canary.status().off.unwrap().cause, Cause::Checks);
    }

    #[test]
    fn the_callers_impatience_and_load_refusals_do_not_count() {
        let canary = canary(spec());
        let gone = Some(Deadline::after(Duration::ZERO));
        let timed_out = ApiError::new(Code::DeadlineExceeded, "DEADLINE_EXCEEDED", "late");
        let cancelled = ApiError::new(Code::Cancelled, "CANCELLED", "gone");
        let busy = ApiError::new(Code::Unavailable, OVERLOADED, "shed");
        let invalid = ApiError::invalid_argument("messages", "empty");
        for _ in 0..10 {
            canary.record("c", Some(&timed_out), gone, MS);
            canary.record("c", Some(&cancelled), None, MS);
            canary.record("c", Some(&busy), None, MS);
            canary.record("c", Some(&invalid), None, MS);
            canary.record("other", Some(&timed_out), None, MS);
        }
        let check = canary.check(SystemTime::now());
        assert_eq!(check.verdict, Verdict::Skipped);
        assert_eq!(check.figures, Figures::default());
        // A model's own timeout while the caller still had time is the model's fault.
        let later = Some(Deadline::after(Duration::from_secs(60)));
        canary.record("c", Some(&timed_out), later, MS);
        assert_eq!(canary.check(SystemTime::now()).figures.canary_failures, 1);
    }

    #[test]
    fn the_docs_example_lists_the_defaults() {
        let docs = include_str!("../../../docs/routing.md");
        let block = docs
            .split("```toml\n")
            .filter_map(|rest| rest.split("```\n").next())
            .find(|block| block.starts_with("[router.routes.auto.canary]"))
            .unwrap();
        let spec: CanarySpec = weir_mesh::config::Source::from_toml(block)
            .section("router.routes.auto.canary")
            .unwrap();
        let expected = CanarySpec {
            model: "sim-new".to_string(),
            weight: 0.1,
            ..CanarySpec::default()
        };
        assert_eq!(spec, expected);
    }

    #[test]
    fn bad_settings_name_their_key() {
        let catalog = catalog();
        let candidates = [Candidate::new("p".to_string())];
        for (field, adjust) in [
            (
                "interval",
                (|s: &mut CanarySpec| s.interval = MS) as fn(&mut CanarySpec),
            ),
            ("failed_checks", |s| s.failed_checks = 0),
            ("min_requests", |s| s.min_requests = 0),
            ("max_error_rate_increase", |s| {
                s.max_error_rate_increase = 2.0
            }),
            ("max_latency_ratio", |s| s.max_latency_ratio = 0.5),
            ("max_latency_ratio", |s| s.max_latency_ratio = f64::NAN),
            ("step_weight", |s| s.step_weight = 1.5),
            ("max_weight", |s| {
                s.step_weight = 0.1;
                s.max_weight = 0.2;
            }),
            ("promote_after", |s| s.promote_after = 0),
        ] {
            let mut spec = spec();
            adjust(&mut spec);
            let error = Canary::new(&catalog, "auto", &candidates, spec)
                .unwrap_err()
                .to_string();
            assert!(
                error.contains(&format!("router.routes.auto.canary.{field}")),
                "{field}: {error}"
            );
        }
    }
}
