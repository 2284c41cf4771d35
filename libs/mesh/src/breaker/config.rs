//! The breaker's table (`[...client.breaker]`), validated at start-up.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use tonic::Code;

use crate::{config::ConfigError, error::parse_code};

use super::*;

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
