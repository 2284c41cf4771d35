//! weir-budget: prices, reservations, limits and spend.
//!
//! The API is `proto/weir/budget/v1/budget.proto`. Money is integer micro-USD everywhere (`i64`,
//! at most [`pricing::MAX_MICROS`], about $9 billion, so Lua can do exact arithmetic on it);
//! negative or overflowing amounts are refused with INVALID_ARGUMENT.
//!
//! # Why reserve-then-settle
//!
//! Checking the budget before a call and counting the spend after it lets every concurrent request
//! pass the same check, so a tenant overspends by as many requests as are in flight (the bug the
//! popular gateways have). Here a request first *reserves* its worst-case cost (prompt + max output
//! tokens at the model's price): the reservation is checked and held against every scope in one
//! atomic Redis script, so held + spent never exceeds the hard limit, whatever the concurrency.
//! After the call the reservation is *committed* with the actual cost (the difference is refunded),
//! *released* if the model never ran, or *expired* by the sweeper if its holder vanished.
//!
//! # Semantics
//!
//! - **States**: HELD → exactly one of COMMITTED, RELEASED or EXPIRED. Every transition is a Lua
//!   script ([`store::redis`] documents the key layout and each script's invariant).
//! - **Scopes**: a reservation holds against the tenant (always added) and optionally API keys,
//!   users and sessions, all or none. A scope **without a budget has no limit**: nothing is held
//!   against it, but its spend is still reported by GetSpend. Spend counts toward a budget from
//!   the moment the budget is set.
//! - **Refusal**: RESOURCE_EXHAUSTED, reason `BUDGET_EXHAUSTED`, a QuotaFailure naming the scope
//!   that is out (`tenant:acme`, `api_key:k1`, `user:u1`, `session:s1`) and a RetryInfo until its
//!   period resets (rolling windows: until the oldest spend leaves the window).
//! - **Idempotency**: a Reserve retried with the same `request_id` returns the first reservation
//!   and holds once (the record is kept for `idempotency_ttl`); the same id with other scopes,
//!   amount or model is INVALID_ARGUMENT. A Commit charges once: a retry returns the first result;
//!   a second commit under a different `request_id` is FAILED_PRECONDITION
//!   (`RESERVATION_ALREADY_COMMITTED`). Settled reservations are kept `idempotency_ttl`.
//! - **Overruns**: a commit above the held amount is charged in full; the excess is reported as
//!   `overrun_micros` and, being spend, is seen by every later reservation. It is the only way
//!   spend can pass the hard limit (the model already ran).
//! - **Expiry**: an unsettled hold expires at its TTL (default [`DEFAULT_RESERVATION_TTL`]); the
//!   sweeper (every [`DEFAULT_SWEEP_INTERVAL`], on every replica) or the next Commit/Release
//!   moves it to EXPIRED and gives the hold back, exactly once. A Commit arriving after expiry
//!   still records its cost as an overrun (the model ran), leaving the state EXPIRED.
//! - **Periods**: daily, weekly (Monday) or monthly calendar periods in an IANA time zone, or a
//!   rolling window (60 buckets; see [`period`]). Spend is keyed by period, so a reset is atomic.
//!   A reservation's charge belongs to the period it was made in.
//! - **Soft limit**: the first commit that takes a period's spend to the soft limit raises one
//!   event ([`events`]): log, [`events::Metrics`] counter, optional webhook. Exactly once per
//!   period (rolling windows: re-armed when spend falls back below it).
//! - **Prices** come from the model catalog (`[models.<name>.price]`); a model without a price
//!   fails closed with FAILED_PRECONDITION `PRICE_UNKNOWN`. [`pricing::cost_micros`] is the pure
//!   pricing function the router can call to reserve a worst-case cost without a network call.
//! - **Failures**: Redis unreachable → UNAVAILABLE `REDIS_UNAVAILABLE`; nothing is held.
//! - **Clocks**: periods and expiries use the service's clock; run replicas with synchronized
//!   clocks (NTP).
//! - **Who**: every RPC acts for the tenant the server's auth layer authenticated (an API key, or
//!   the mesh token of the router calling on a user's behalf; see [`weir_mesh::auth`]); a bare
//!   `weir-tenant` header is ignored. `SetBudget` raises or lowers what a tenant may spend, so it
//!   needs a key with the `admin` role (PERMISSION_DENIED `ROLE_REQUIRED` otherwise).
#![warn(missing_docs)]

pub mod api;
mod cache;
pub mod events;
pub mod period;
/// Pricing lives in weir-mesh, shared with the router that prices its reservations.
pub use weir_mesh::pricing;
pub mod scope;
pub mod store;

use std::{net::SocketAddr, sync::Arc, time::Duration};

use serde::{Deserialize, Serialize};
use weir_mesh::{
    auth::Role,
    catalog::Catalog,
    config::ConfigError,
    server::GrpcServer,
    store::{ConnectError, DEFAULT_PREFIX},
};
use weir_proto::{budget::budget_service_server::BudgetServiceServer, service_names};

pub use api::BudgetApi;
pub use events::{Metrics, MetricsSnapshot, SoftLimitEvent};
pub use pricing::{MAX_MICROS, Tier, Tokens, cost_micros};

/// Default listen address.
pub const DEFAULT_LISTEN: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 50054);
/// Default hold of a reservation whose request gives no TTL.
pub const DEFAULT_RESERVATION_TTL: Duration = Duration::from_secs(10 * 60);
/// Default longest TTL a reservation may ask for.
pub const DEFAULT_MAX_RESERVATION_TTL: Duration = Duration::from_secs(24 * 3600);
/// Default interval between sweeps for expired holds.
pub const DEFAULT_SWEEP_INTERVAL: Duration = Duration::from_secs(1);
/// Default time idempotency records and settled reservations are kept.
pub const DEFAULT_IDEMPOTENCY_TTL: Duration = Duration::from_secs(24 * 3600);
/// Default time per-hour spend (GetSpend) is kept.
pub const DEFAULT_SPEND_RETENTION: Duration = Duration::from_secs(90 * 24 * 3600);
/// Most expired reservations one sweep script handles (it runs again while there are more).
pub const SWEEP_BATCH: usize = 256;

/// The `[budget]` table of `weir.toml`. Every key has a `WEIR_BUDGET__<KEY>` override.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Address to listen on (default `127.0.0.1:50054`).
    pub listen: SocketAddr,
    /// Redis URL (`redis://host:port/db`); unset means an in-memory store, which loses everything
    /// on restart and is only meant for `weir up` (default unset).
    pub redis_url: Option<String>,
    /// Prefix of every Redis key (default `weir`).
    pub key_prefix: String,
    /// Hold of a reservation that asks for no TTL (default 10 min).
    #[serde(with = "humantime_serde")]
    pub default_reservation_ttl: Duration,
    /// Longest TTL a reservation may ask for (default 24 h).
    #[serde(with = "humantime_serde")]
    pub max_reservation_ttl: Duration,
    /// How often the sweeper expires unsettled holds (default 1 s): a hold lasts at most its TTL
    /// plus this.
    #[serde(with = "humantime_serde")]
    pub sweep_interval: Duration,
    /// How long a retried Reserve or Commit is recognised, and settled reservations kept
    /// (default 24 h).
    #[serde(with = "humantime_serde")]
    pub idempotency_ttl: Duration,
    /// How long per-hour spend by model is kept for GetSpend (default 90 days).
    #[serde(with = "humantime_serde")]
    pub spend_retention: Duration,
    /// URL to POST soft-limit events to, as JSON (default unset: log and metric only).
    pub soft_limit_webhook: Option<String>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: DEFAULT_LISTEN,
            redis_url: None,
            key_prefix: DEFAULT_PREFIX.to_string(),
            default_reservation_ttl: DEFAULT_RESERVATION_TTL,
            max_reservation_ttl: DEFAULT_MAX_RESERVATION_TTL,
            sweep_interval: DEFAULT_SWEEP_INTERVAL,
            idempotency_ttl: DEFAULT_IDEMPOTENCY_TTL,
            spend_retention: DEFAULT_SPEND_RETENTION,
            soft_limit_webhook: None,
        }
    }
}

impl Config {
    /// Checks the settings, naming the first bad key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.key_prefix.is_empty() || self.key_prefix.contains(char::is_whitespace) {
            return Err(ConfigError::invalid(
                "budget.key_prefix",
                "must be non-empty, without whitespace",
            ));
        }
        if self.default_reservation_ttl.is_zero() {
            return Err(ConfigError::invalid(
                "budget.default_reservation_ttl",
                "must be positive",
            ));
        }
        if self.max_reservation_ttl < self.default_reservation_ttl {
            return Err(ConfigError::invalid(
                "budget.max_reservation_ttl",
                "must be at least default_reservation_ttl",
            ));
        }
        if self.sweep_interval.is_zero() {
            return Err(ConfigError::invalid(
                "budget.sweep_interval",
                "must be positive",
            ));
        }
        if self.idempotency_ttl < Duration::from_secs(1) {
            return Err(ConfigError::invalid(
                "budget.idempotency_ttl",
                "must be at least 1s",
            ));
        }
        if self.spend_retention < Duration::from_secs(3600) {
            return Err(ConfigError::invalid(
                "budget.spend_retention",
                "must be at least 1h",
            ));
        }
        if let Some(url) = &self.soft_limit_webhook
            && !(url.starts_with("http://") || url.starts_with("https://"))
        {
            return Err(ConfigError::invalid(
                "budget.soft_limit_webhook",
                "must be an http:// or https:// URL",
            ));
        }
        Ok(())
    }
}

/// Why the budget service could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// Redis could not be reached (set `[budget] redis_url` or `WEIR_BUDGET__REDIS_URL`).
    #[error("budget store: {0}")]
    Redis(#[from] ConnectError),
}

/// Builds the budget API: connects to Redis (or uses memory) and starts the sweeper, which runs
/// until every clone of the API is dropped.
pub async fn api(config: &Config, catalog: Arc<Catalog>) -> Result<BudgetApi, StartError> {
    config.validate()?;
    let store = match &config.redis_url {
        Some(url) => {
            let conn = weir_mesh::store::connect(url).await?;
            store::Store::Redis(store::redis::RedisStore::new(
                conn,
                &config.key_prefix,
                config.idempotency_ttl,
                config.idempotency_ttl,
                config.spend_retention,
            ))
        }
        None => {
            tracing::warn!("budget: no redis_url, using an in-memory store (lost on restart)");
            store::Store::Memory(store::memory::MemoryStore::default())
        }
    };
    let api = BudgetApi::new(
        store,
        catalog,
        api::Settings {
            default_ttl: config.default_reservation_ttl,
            max_ttl: config.max_reservation_ttl,
            usage_retention: config.spend_retention,
        },
        Arc::new(Metrics::default()),
        config.soft_limit_webhook.clone(),
    );
    api.metrics().register();
    spawn_sweeper(&api, config.sweep_interval);
    Ok(api)
}

/// Builds the budget server, ready to `serve`.
pub async fn server(config: &Config, catalog: Arc<Catalog>) -> Result<GrpcServer, StartError> {
    Ok(server_with(api(config, catalog).await?))
}

/// A server for an already built API (tests and benchmarks keep a clone to read its metrics).
/// It authenticates in single-tenant dev mode until given the stack's keys with
/// [`GrpcServer::with_auth`].
pub fn server_with(api: BudgetApi) -> GrpcServer {
    GrpcServer::default()
        .add_service(BudgetServiceServer::new(api))
        // A limit is set by an administrator, never by the tenant that spends against it.
        .require_role(format!("/{}/SetBudget", service_names::BUDGET), Role::Admin)
}

/// Expires unsettled holds every `interval`. It holds only a weak reference, so it stops when the
/// server (and every other clone of the API) is gone.
fn spawn_sweeper(api: &BudgetApi, interval: Duration) {
    let weak = api.downgrade();
    tokio::spawn(async move {
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticker.tick().await;
            let Some(inner) = weak.upgrade() else {
                return;
            };
            loop {
                match inner.store.sweep(api::now_ms(), SWEEP_BATCH).await {
                    Ok((seen, expired)) => {
                        if expired > 0 {
                            inner.metrics().add_expired(expired as u64);
                            tracing::info!(expired, "expired unsettled budget holds");
                        }
                        if seen < SWEEP_BATCH {
                            break;
                        }
                    }
                    Err(error) => {
                        tracing::warn!(%error, "budget sweeper failed; retrying next tick");
                        break;
                    }
                }
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use weir_mesh::config::Source;

    #[test]
    fn config_defaults_and_overrides() {
        let config: Config = Source::from_toml(
            "[budget]\nredis_url = \"redis://127.0.0.1:6379\"\nsweep_interval = \"250ms\"\n",
        )
        .section("budget")
        .unwrap_or_default();
        assert_eq!(config.sweep_interval, Duration::from_millis(250));
        assert_eq!(config.default_reservation_ttl, DEFAULT_RESERVATION_TTL);
        assert_eq!(config.key_prefix, "weir");
        assert!(config.validate().is_ok());
    }

    #[test]
    fn bad_config_names_the_key() {
        for (config, key) in [
            (
                Config {
                    sweep_interval: Duration::ZERO,
                    ..Config::default()
                },
                "budget.sweep_interval",
            ),
            (
                Config {
                    soft_limit_webhook: Some("ftp://x".into()),
                    ..Config::default()
                },
                "budget.soft_limit_webhook",
            ),
            (
                Config {
                    max_reservation_ttl: Duration::from_secs(1),
                    ..Config::default()
                },
                "budget.max_reservation_ttl",
            ),
        ] {
            let message = config
                .validate()
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
            assert!(message.contains(key), "{message} should name {key}");
        }
        let unknown = Source::from_toml("[budget]\nttl = \"1s\"\n").section::<Config>("budget");
        assert!(unknown.is_err());
    }
}
