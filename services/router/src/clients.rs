//! `[router.client.<dependency>]`: one client stack, with its own settings, per service the
//! router calls.
//!
//! ```toml
//! [router.client.inference.bulkhead]   # the model calls
//! max_concurrent = 64                  # per model
//! backends = { gpt-4o = 16 }
//!
//! [router.client.budget.timeout]       # Reserve, Commit, Release
//! attempt_timeout = "1s"
//!
//! [router.client.session.retry]        # GetContext, AppendTurns
//! max_attempts = 2
//!
//! [router.client.review.timeout]       # CreateItem
//! attempt_timeout = "3s"
//!
//! [router.client.inference.balance]    # replicas of inference (a URL list or a DNS name)
//! consecutive_failures = 5             # then the replica is ejected for 30 s, 60 s, ...
//! ```
//!
//! # Why one table per dependency
//!
//! A model call and a budget `Commit` have nothing in common but the transport: one takes
//! seconds and may stream for minutes, the other takes a millisecond against Redis. With one
//! `[router.client]` table for all of them, the inference bulkhead (64 in flight) also refused
//! `Reserve` and `Commit` as soon as 64 were in flight, and requests failed closed while the
//! budget service was healthy. So each dependency gets its own stack (its own breakers,
//! bulkheads and retry budget, which was already so) **and** its own settings, with defaults that
//! fit what it calls:
//!
//! | table | defaults that differ from the mesh's [`ClientConfig::default`] |
//! |---|---|
//! | `[router.client.inference]` | none: bulkhead 64 per model, attempt timeout 30 s, slow call 10 s |
//! | `[router.client.session]`, `[router.client.budget]`, `[router.client.review]` | bulkhead [`DEFAULT_BOOKKEEPING_MAX_CONCURRENT`] (1024), attempt timeout [`DEFAULT_BOOKKEEPING_ATTEMPT_TIMEOUT`] (2 s), slow call [`DEFAULT_BOOKKEEPING_SLOW_CALL`] (1 s) |
//!
//! A table gives only what it changes: its keys are laid over that dependency's defaults, not over
//! the mesh's (so `[router.client.budget.retry] max_attempts = 2` keeps the budget's 2 s attempt
//! timeout). Every key, its meaning and the mesh's defaults are documented on
//! [`ClientConfig`]; environment overrides follow the table path, e.g.
//! `WEIR_ROUTER__CLIENT__BUDGET__BULKHEAD__MAX_CONCURRENT=2048`.
//!
//! The settings of the single `[router.client]` table of earlier versions (`retry`, `breaker`,
//! `bulkhead`, ... directly under it) are refused with a message naming the table to use instead,
//! rather than silently applied to one dependency or ignored.

use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize};
use serde_json::Value;
use weir_mesh::{client::ClientConfig, config::ConfigError};

/// Calls in flight per bookkeeping service (session, budget, review): they answer in about a
/// millisecond, so a slot is free again almost at once; the limit only stops a hung service
/// from collecting every request's task.
pub const DEFAULT_BOOKKEEPING_MAX_CONCURRENT: usize = 1024;
/// Attempt timeout of a bookkeeping call: far above a healthy Redis-backed answer, far below a
/// model call's, so a hung session or budget service is cut (and retried) quickly.
pub const DEFAULT_BOOKKEEPING_ATTEMPT_TIMEOUT: Duration = Duration::from_secs(2);
/// A bookkeeping call slower than this counts as slow for its breaker.
pub const DEFAULT_BOOKKEEPING_SLOW_CALL: Duration = Duration::from_secs(1);

/// The dependencies with a table under `[router.client]`, in the order they are documented.
pub const DEPENDENCIES: [&str; 4] = ["inference", "session", "budget", "review"];

/// `[router.client]`: the client settings of each service the router calls.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Clients {
    /// `[router.client.inference]`: the model calls (per model: breaker, bulkhead, retry budget).
    pub inference: ClientConfig,
    /// `[router.client.session]`: `GetContext` and `AppendTurns`.
    pub session: ClientConfig,
    /// `[router.client.budget]`: `Reserve`, `Commit`, `Release` and `GetBudget`.
    pub budget: ClientConfig,
    /// `[router.client.review]`: `CreateItem` (review items of flagged answers). Bookkeeping-like:
    /// a Redis-backed write made for a request already served, at criticality
    /// [`crate::inference::BOOKKEEPING_CRITICALITY`].
    pub review: ClientConfig,
}

impl Default for Clients {
    fn default() -> Self {
        Self {
            inference: ClientConfig::default(),
            session: bookkeeping_defaults(),
            budget: bookkeeping_defaults(),
            review: bookkeeping_defaults(),
        }
    }
}

/// The defaults of a bookkeeping dependency (see the module doc).
pub fn bookkeeping_defaults() -> ClientConfig {
    let mut config = ClientConfig::default();
    config.bulkhead.max_concurrent = DEFAULT_BOOKKEEPING_MAX_CONCURRENT;
    config.timeout.attempt_timeout = DEFAULT_BOOKKEEPING_ATTEMPT_TIMEOUT;
    config.breaker.slow_call_threshold = DEFAULT_BOOKKEEPING_SLOW_CALL;
    config
}

impl Clients {
    /// Checks every table, naming the bad key (e.g. `router.client.budget.bulkhead.max_concurrent`).
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.inference.validate("router.client.inference")?;
        self.session.validate("router.client.session")?;
        self.budget.validate("router.client.budget")?;
        self.review.validate("router.client.review")
    }
}

impl<'de> Deserialize<'de> for Clients {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        let Value::Object(tables) = Value::deserialize(deserializer)? else {
            return Err(D::Error::custom(
                "[router.client] is a table of tables: inference, session, budget, review",
            ));
        };
        let mut clients = Clients::default();
        for (name, table) in tables {
            let slot = match name.as_str() {
                "inference" => &mut clients.inference,
                "session" => &mut clients.session,
                "budget" => &mut clients.budget,
                "review" => &mut clients.review,
                other if MESH_KEYS.contains(&other) => {
                    return Err(D::Error::custom(format!(
                        "router.client.{other} moved: each dependency has its own table, so use \
                         router.client.inference.{other} (or .session / .budget / .review)"
                    )));
                }
                other => {
                    return Err(D::Error::custom(format!(
                        "unknown table router.client.{other}; expected one of {}",
                        DEPENDENCIES.join(", ")
                    )));
                }
            };
            *slot = overlay(slot, table)
                .map_err(|error| D::Error::custom(format!("router.client.{name}: {error}")))?;
        }
        Ok(clients)
    }
}

/// The keys of a [`ClientConfig`], which the one `[router.client]` table of earlier versions held.
const MESH_KEYS: [&str; 7] = [
    "deadline_margin",
    "retry",
    "retry_budget",
    "breaker",
    "bulkhead",
    "timeout",
    "balance",
];

/// `patch` (a table as written) laid over `base`: tables merge key by key, any other value
/// replaces the base's.
fn overlay(base: &ClientConfig, patch: Value) -> Result<ClientConfig, serde_json::Error> {
    let mut merged = serde_json::to_value(base)?;
    merge(&mut merged, patch);
    serde_json::from_value(merged)
}

fn merge(base: &mut Value, patch: Value) {
    match (base, patch) {
        (Value::Object(base), Value::Object(patch)) => {
            for (key, value) in patch {
                match base.get_mut(&key) {
                    Some(slot) => merge(slot, value),
                    None => {
                        base.insert(key, value);
                    }
                }
            }
        }
        (base, patch) => *base = patch,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use weir_mesh::config::Source;

    use super::*;
    use crate::Config;

    fn router(toml: &str) -> Result<Config, ConfigError> {
        Source::from_toml(toml).section("router")
    }

    #[test]
    fn each_dependency_has_its_own_defaults() {
        let clients = Clients::default();
        assert_eq!(clients.inference, ClientConfig::default());
        assert_eq!(clients.budget.bulkhead.max_concurrent, 1024);
        assert_eq!(
            clients.session.timeout.attempt_timeout,
            Duration::from_secs(2)
        );
        assert_eq!(
            clients.inference.bulkhead.max_concurrent,
            weir_mesh::bulkhead::DEFAULT_MAX_CONCURRENT
        );
        clients.validate().unwrap();
        assert_eq!(router("").unwrap().client, clients);
    }

    #[test]
    fn a_table_changes_only_what_it_names_over_its_dependencys_defaults() {
        let config = router(
            r#"
[router.client.budget.retry]
max_attempts = 2

[router.client.inference.bulkhead]
backends = { gpt-4o = 16 }
"#,
        )
        .unwrap();
        let budget = &config.client.budget;
        assert_eq!(budget.retry.max_attempts, 2);
        assert_eq!(
            budget.timeout.attempt_timeout,
            Duration::from_secs(2),
            "kept"
        );
        assert_eq!(budget.bulkhead.max_concurrent, 1024, "kept");
        let inference = &config.client.inference;
        assert_eq!(inference.bulkhead.backends.get("gpt-4o"), Some(&16));
        assert_eq!(inference.bulkhead.max_concurrent, 64);
        assert_eq!(config.client.session, bookkeeping_defaults());
        assert_eq!(config.client.review, bookkeeping_defaults());
        let config = router("[router.client.review.timeout]\nattempt_timeout = \"3s\"\n").unwrap();
        assert_eq!(
            config.client.review.timeout.attempt_timeout,
            Duration::from_secs(3)
        );
        assert_eq!(config.client.review.bulkhead.max_concurrent, 1024, "kept");
    }

    #[test]
    fn the_old_single_table_is_refused_naming_the_new_one() {
        let error = router("[router.client.retry]\nmax_attempts = 2\n")
            .unwrap_err()
            .to_string();
        assert!(error.contains("router.client.inference.retry"), "{error}");
        let error = router("[router.client.reviews]\n").unwrap_err().to_string();
        assert!(error.contains("router.client.reviews"), "{error}");
        let error = router("[router.client.budget.bulkhead]\nmax_concurent = 3\n")
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("router.client.budget") && error.contains("max_concurent"),
            "{error}"
        );
    }

    #[test]
    fn each_dependency_has_its_own_balance_table() {
        let config = router(
            "[router.client.inference.balance]\nconsecutive_failures = 3\nresolve_interval = \"2s\"\n",
        )
        .unwrap();
        assert_eq!(config.client.inference.balance.consecutive_failures, 3);
        assert_eq!(
            config.client.inference.balance.resolve_interval,
            Duration::from_secs(2)
        );
        assert_eq!(config.client.budget.balance, Default::default());
        let config =
            router("[router.client.budget.balance]\nmax_ejection_percent = 150\n").unwrap();
        let error = config.client.validate().unwrap_err().to_string();
        assert!(
            error.contains("router.client.budget.balance.max_ejection_percent"),
            "{error}"
        );
        let error = router("[router.client.balance]\nconsecutive_failures = 3\n")
            .unwrap_err()
            .to_string();
        assert!(error.contains("router.client.inference.balance"), "{error}");
    }

    #[test]
    fn invalid_values_name_their_key() {
        let config = router("[router.client.session.bulkhead]\nmax_concurrent = 0\n").unwrap();
        let error = config.client.validate().unwrap_err().to_string();
        assert!(
            error.contains("router.client.session.bulkhead.max_concurrent"),
            "{error}"
        );
    }
}
