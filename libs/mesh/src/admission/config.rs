//! The `[<service>.admission]` table: settings, defaults and validation.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::config::ConfigError;

/// Default: the limit adapts ([`LimitAlgorithm::Gradient`]).
pub const DEFAULT_ALGORITHM: LimitAlgorithm = LimitAlgorithm::Gradient;
/// Default starting limit (and the fixed limit of `algorithm = "static"`). Model calls are
/// long-lived (a streamed answer holds its slot for seconds), so a gateway needs a few thousand
/// slots; a server that must protect a smaller resource sets its own. Starting high errs on the
/// side of latency, never of goodput: the limit comes down within seconds if latency says so.
pub const DEFAULT_INITIAL_LIMIT: u32 = 2000;
/// Default lowest adaptive limit. The gradient's queue headroom keeps the limit far above it
/// under any sustained overload (see the module doc); it only matters for small configured
/// limits.
pub const DEFAULT_MIN_LIMIT: u32 = 10;
/// Default highest adaptive limit.
pub const DEFAULT_MAX_LIMIT: u32 = 10_000;
/// Default largest decrease per sampling window: the limit is multiplied by at least 0.95, so
/// one bad window costs 5 % of the limit, and the gradient's headroom (√limit) balances it at a
/// limit of 400 even under the worst congestion, `(1 / (1 − 0.95))²`. On the 2-core benchmark
/// machine (`overload_curve`) a limit of 100 cost a third of the goodput while 400 kept it at
/// capacity: reaching capacity takes far more requests in flight than the no-load latency
/// suggests when the whole mesh shares the CPUs.
pub const DEFAULT_BACKOFF_RATIO: f64 = 0.95;
/// Default: a window whose mean latency is within twice the baseline (the no-load latency) is
/// not congested.
pub const DEFAULT_LATENCY_TOLERANCE: f64 = 2.0;
/// Default number of sampling windows the latency baseline (the lowest window latency) is taken
/// over: 600 windows of 100 ms, about a minute. A lasting change in a dependency's speed becomes
/// the new baseline after that long; an overload shorter than that does not (a shorter memory
/// would let a sustained overload's latency become "normal" and the limit grow back into it).
pub const DEFAULT_BASELINE_WINDOW: u32 = 600;
/// Default length of a sampling window: the limit moves at most once per window.
pub const DEFAULT_WINDOW: Duration = Duration::from_millis(100);
/// Default fewest samples a window needs before it moves the limit (a window with fewer is
/// extended): a handful of calls is no measurement of a server's latency.
pub const DEFAULT_MIN_WINDOW_SAMPLES: u32 = 10;
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
    /// Adapts to the latency gradient (see the module doc). `aimd`, the name of the algorithm it
    /// replaced, is read as this one.
    #[serde(alias = "aimd")]
    Gradient,
}

/// Each criticality's share of the limit (see the module doc).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Shares {
    /// SHEDDABLE's share (default [`DEFAULT_SHEDDABLE_SHARE`], 0.5).
    pub sheddable: f64,
    /// SHEDDABLE_PLUS's share (default [`DEFAULT_SHEDDABLE_PLUS_SHARE`], 0.75).
    pub sheddable_plus: f64,
    /// CRITICAL_PLUS's share (default [`DEFAULT_CRITICAL_PLUS_SHARE`], 1.5). CRITICAL's is
    /// always 1.
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
    /// `gradient` (default, [`DEFAULT_ALGORITHM`]; `aimd` is read as it) or `static`.
    pub algorithm: LimitAlgorithm,
    /// Starting limit, and the fixed limit when static (default [`DEFAULT_INITIAL_LIMIT`]).
    pub initial_limit: u32,
    /// Lowest adaptive limit (default [`DEFAULT_MIN_LIMIT`]).
    pub min_limit: u32,
    /// Highest adaptive limit (default [`DEFAULT_MAX_LIMIT`]).
    pub max_limit: u32,
    /// Smallest factor the limit is multiplied by in one window, in (0, 1) (default
    /// [`DEFAULT_BACKOFF_RATIO`]).
    pub backoff_ratio: f64,
    /// A window's mean latency up to this many times the baseline is not congestion (default
    /// [`DEFAULT_LATENCY_TOLERANCE`]); at least 1.
    pub latency_tolerance: f64,
    /// A fixed latency a window's mean may reach before it is congestion, instead of
    /// `latency_tolerance` × the baseline (default none).
    #[serde(with = "humantime_serde")]
    pub latency_threshold: Option<Duration>,
    /// Sampling windows the latency baseline is the minimum over (default
    /// [`DEFAULT_BASELINE_WINDOW`]).
    pub baseline_window: u32,
    /// Length of a sampling window (default [`DEFAULT_WINDOW`]).
    #[serde(with = "humantime_serde")]
    pub window: Duration,
    /// Fewest samples a window needs to move the limit (default [`DEFAULT_MIN_WINDOW_SAMPLES`]).
    pub min_window_samples: u32,
    /// Each criticality's share of the limit.
    pub shares: Shares,
    /// How long shed clients are told to wait (default [`DEFAULT_PUSHBACK`]).
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
            window: DEFAULT_WINDOW,
            min_window_samples: DEFAULT_MIN_WINDOW_SAMPLES,
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
        if self.window.is_zero() {
            return Err(ConfigError::invalid(key("window"), "must be positive"));
        }
        if self.min_window_samples == 0 {
            return Err(ConfigError::invalid(
                key("min_window_samples"),
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
