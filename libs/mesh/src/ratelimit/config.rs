//! The `[router.rate_limit]` table: rates, bursts and overrides, validated at start-up.

use std::{collections::BTreeMap, time::Duration};

use serde::{Deserialize, Serialize};

use crate::{
    config::ConfigError,
    store::{DEFAULT_PREFIX, redact},
    tenant::Tenant,
};

use super::*;

/// A rate override: omitted fields keep the table's global value.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitOverride {
    /// Sustained rate.
    pub requests_per_second: Option<f64>,
    /// Burst.
    pub burst: Option<u32>,
}

/// Settings of the rate limit layer (the `[<service>.rate_limit]` table).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RateLimitConfig {
    /// Limit at all (default true).
    pub enabled: bool,
    /// Global sustained rate per tenant (default 100).
    pub requests_per_second: f64,
    /// Global burst per tenant (default 200).
    pub burst: u32,
    /// Per-tenant overrides, by tenant id.
    pub tenants: BTreeMap<String, LimitOverride>,
    /// Per-API-key limits, by key id, checked in addition to the tenant's.
    pub api_keys: BTreeMap<String, LimitOverride>,
    /// Redis shared by the replicas (default none: local limits).
    pub redis_url: Option<String>,
    /// Redis key prefix (default `weir`).
    pub key_prefix: String,
    /// Replicas sharing the limit; the local share is the limit ÷ replicas (default 1).
    pub replicas: u32,
    /// Longest wait for Redis before deciding locally (default 50 ms).
    #[serde(with = "humantime_serde")]
    pub redis_timeout: Duration,
    /// How long to skip Redis after it failed (default 1 s).
    #[serde(with = "humantime_serde")]
    pub redis_retry_interval: Duration,
}

impl Default for RateLimitConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            requests_per_second: DEFAULT_REQUESTS_PER_SECOND,
            burst: DEFAULT_BURST,
            tenants: BTreeMap::new(),
            api_keys: BTreeMap::new(),
            redis_url: None,
            key_prefix: DEFAULT_PREFIX.to_string(),
            replicas: DEFAULT_REPLICAS,
            redis_timeout: DEFAULT_REDIS_TIMEOUT,
            redis_retry_interval: DEFAULT_REDIS_RETRY_INTERVAL,
        }
    }
}

impl RateLimitConfig {
    /// Checks the settings; `key_prefix` is the table's path (e.g. `router.rate_limit`).
    pub fn validate(&self, key_prefix: &str) -> Result<(), ConfigError> {
        let key = |field: &str| format!("{key_prefix}.{field}");
        check_rate(self.requests_per_second, &key("requests_per_second"))?;
        if self.burst == 0 {
            return Err(ConfigError::invalid(key("burst"), "must be at least 1"));
        }
        if self.replicas == 0 {
            return Err(ConfigError::invalid(key("replicas"), "must be at least 1"));
        }
        if self.redis_timeout.is_zero() {
            return Err(ConfigError::invalid(
                key("redis_timeout"),
                "must be positive",
            ));
        }
        if self.key_prefix.is_empty() || self.key_prefix.contains(char::is_whitespace) {
            return Err(ConfigError::invalid(
                key("key_prefix"),
                "must be non-empty, without spaces",
            ));
        }
        if let Some(url) = &self.redis_url {
            crate::store::check_url(url).map_err(|error| {
                ConfigError::invalid(key("redis_url"), format!("{}: {error}", redact(url)))
            })?;
        }
        for (tenant, limit) in &self.tenants {
            let at = format!("{key_prefix}.tenants.{tenant}");
            Tenant::new(tenant).map_err(|_| ConfigError::invalid(&at, "not a valid tenant id"))?;
            limit.validate(&at)?;
        }
        for (id, limit) in &self.api_keys {
            let at = format!("{key_prefix}.api_keys.{id}");
            Tenant::new(id).map_err(|_| {
                ConfigError::invalid(&at, "key ids are 1 to 64 letters, digits, '-', '_' or '.'")
            })?;
            limit.validate(&at)?;
        }
        Ok(())
    }

    pub(super) fn global(&self) -> Rate {
        Rate {
            per_second: self.requests_per_second,
            burst: self.burst,
        }
    }
}

impl LimitOverride {
    fn validate(&self, key_prefix: &str) -> Result<(), ConfigError> {
        if let Some(rate) = self.requests_per_second {
            check_rate(rate, &format!("{key_prefix}.requests_per_second"))?;
        }
        if self.burst == Some(0) {
            return Err(ConfigError::invalid(
                format!("{key_prefix}.burst"),
                "must be at least 1",
            ));
        }
        Ok(())
    }

    pub(super) fn over(&self, global: Rate) -> Rate {
        Rate {
            per_second: self.requests_per_second.unwrap_or(global.per_second),
            burst: self.burst.unwrap_or(global.burst),
        }
    }
}

fn check_rate(rate: f64, key: &str) -> Result<(), ConfigError> {
    if rate.is_finite() && rate > 0.0 && rate <= 1e9 {
        Ok(())
    } else {
        Err(ConfigError::invalid(
            key,
            "must be a number above 0 and at most 1e9",
        ))
    }
}
