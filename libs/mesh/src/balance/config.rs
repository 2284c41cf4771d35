//! The balancer's table (`[...client.balance]`), validated at start-up.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::config::ConfigError;

use super::*;

/// Load balancing and outlier ejection settings (TOML table such as
/// `[router.client.inference.balance]`; see the [module docs](super)).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BalanceConfig {
    /// How often each host name of the service URL is resolved again, adding and removing
    /// endpoints (default [`DEFAULT_RESOLVE_INTERVAL`]).
    #[serde(with = "humantime_serde")]
    pub resolve_interval: Duration,
    /// Failures in a row (UNAVAILABLE or a failed connection) that eject an endpoint (default
    /// [`DEFAULT_CONSECUTIVE_FAILURES`]); at least 1.
    pub consecutive_failures: u32,
    /// Ejection time of a first ejection; the n-th ejection in a row lasts n times as long
    /// (default [`DEFAULT_BASE_EJECTION_TIME`]).
    #[serde(with = "humantime_serde")]
    pub base_ejection_time: Duration,
    /// Cap of an ejection's time, at least `base_ejection_time` (default
    /// [`DEFAULT_MAX_EJECTION_TIME`]).
    #[serde(with = "humantime_serde")]
    pub max_ejection_time: Duration,
    /// Most endpoints ejected at once, in percent of the endpoints, rounded down (default
    /// [`DEFAULT_MAX_EJECTION_PERCENT`]); 0 turns ejection off.
    pub max_ejection_percent: u32,
}

impl Default for BalanceConfig {
    fn default() -> Self {
        Self {
            resolve_interval: DEFAULT_RESOLVE_INTERVAL,
            consecutive_failures: DEFAULT_CONSECUTIVE_FAILURES,
            base_ejection_time: DEFAULT_BASE_EJECTION_TIME,
            max_ejection_time: DEFAULT_MAX_EJECTION_TIME,
            max_ejection_percent: DEFAULT_MAX_EJECTION_PERCENT,
        }
    }
}

impl BalanceConfig {
    /// Checks every key, naming the bad one under `key_prefix` (e.g.
    /// `router.client.inference.balance`).
    pub fn validate(&self, key_prefix: &str) -> Result<(), ConfigError> {
        let key = |name: &str| format!("{key_prefix}.{name}");
        if self.resolve_interval.is_zero() {
            return Err(ConfigError::invalid(
                key("resolve_interval"),
                "must be more than 0s (for example \"10s\")",
            ));
        }
        if self.consecutive_failures == 0 {
            return Err(ConfigError::invalid(
                key("consecutive_failures"),
                "must be at least 1",
            ));
        }
        if self.base_ejection_time.is_zero() {
            return Err(ConfigError::invalid(
                key("base_ejection_time"),
                "must be more than 0s (for example \"30s\")",
            ));
        }
        if self.max_ejection_time < self.base_ejection_time {
            return Err(ConfigError::invalid(
                key("max_ejection_time"),
                format!(
                    "must be at least base_ejection_time ({:?})",
                    self.base_ejection_time
                ),
            ));
        }
        if self.max_ejection_percent > 100 {
            return Err(ConfigError::invalid(
                key("max_ejection_percent"),
                "must be between 0 and 100",
            ));
        }
        Ok(())
    }

    /// How long the `times`-th ejection in a row lasts: `base_ejection_time × times`, capped at
    /// `max_ejection_time`.
    pub fn ejection_time(&self, times: u32) -> Duration {
        self.base_ejection_time
            .saturating_mul(times.max(1))
            .min(self.max_ejection_time)
    }

    /// How many of `endpoints` may be ejected at once.
    pub fn max_ejected(&self, endpoints: usize) -> usize {
        endpoints.saturating_mul(self.max_ejection_percent as usize) / 100
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_read_from_toml() {
        BalanceConfig::default().validate("b").unwrap();
        let config: BalanceConfig =
            toml::from_str("resolve_interval = \"2s\"\nmax_ejection_percent = 30\n").unwrap();
        assert_eq!(config.resolve_interval, Duration::from_secs(2));
        assert_eq!(config.max_ejection_percent, 30);
        assert_eq!(config.consecutive_failures, DEFAULT_CONSECUTIVE_FAILURES);
        assert!(toml::from_str::<BalanceConfig>("max_ejection_percnt = 3").is_err());
    }

    #[test]
    fn bad_values_name_their_key() {
        type Break = fn(&mut BalanceConfig);
        let cases: [(Break, &str); 5] = [
            (|c| c.resolve_interval = Duration::ZERO, "resolve_interval"),
            (|c| c.consecutive_failures = 0, "consecutive_failures"),
            (
                |c| c.base_ejection_time = Duration::ZERO,
                "base_ejection_time",
            ),
            (
                |c| c.max_ejection_time = Duration::from_secs(1),
                "max_ejection_time",
            ),
            (|c| c.max_ejection_percent = 101, "max_ejection_percent"),
        ];
        for (break_it, name) in cases {
            let mut config = BalanceConfig::default();
            break_it(&mut config);
            let error = config.validate("p.balance").unwrap_err().to_string();
            assert!(error.contains(&format!("p.balance.{name}")), "{error}");
        }
    }

    #[test]
    fn ejections_grow_linearly_up_to_the_cap_and_respect_the_percentage() {
        let config = BalanceConfig::default();
        assert_eq!(config.ejection_time(1), Duration::from_secs(30));
        assert_eq!(config.ejection_time(3), Duration::from_secs(90));
        assert_eq!(config.ejection_time(50), Duration::from_secs(300));
        assert_eq!(config.max_ejected(1), 0);
        assert_eq!(config.max_ejected(2), 1);
        assert_eq!(config.max_ejected(5), 2);
    }
}
