//! The `[review]` table of `weir.toml`.
//!
//! ```toml
//! [review]
//! listen = "127.0.0.1:50055"              # WEIR_REVIEW__LISTEN
//! redis_url = "redis://127.0.0.1:6379"    # WEIR_REVIEW__REDIS_URL; unset = in-memory store
//! key_prefix = "weir"                     # WEIR_REVIEW__KEY_PREFIX
//! default_lease = "5m"                    # lease of a ClaimNext that asks for none
//! max_lease = "1h"                        # longest lease a ClaimNext/RenewLease may ask for
//! default_sla = "1h"                      # time to decide, for queues without their own `sla`
//! sweep_interval = "1s"                   # how often lapsed leases and SLAs are looked for
//!
//! [review.queues.payments]
//! sla = "15m"                             # time to decide in this queue
//! timeout_action = "escalate"             # reject (default) | approve | escalate
//! escalate_to = "payments-senior"         # the queue an escalated item moves to
//! ```
//!
//! Every key is optional; [`Config::validate`] checks the table once at start-up and names the
//! bad key (`review.max_lease`, `review.queues.payments.escalate_to`, ...). A queue needs no
//! table to be used: an unlisted queue has `default_sla` and the `reject` timeout action.

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    time::Duration,
};

use serde::{Deserialize, Serialize};
use weir_mesh::config::ConfigError;

/// Default address the review service listens on.
pub const DEFAULT_LISTEN: SocketAddr =
    SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::new(127, 0, 0, 1), 50055));
/// Default lease of a `ClaimNext` that asks for none.
pub const DEFAULT_LEASE: Duration = Duration::from_secs(5 * 60);
/// Default longest lease a `ClaimNext` or `RenewLease` may ask for.
pub const DEFAULT_MAX_LEASE: Duration = Duration::from_secs(60 * 60);
/// Default time to decide an item (its SLA), for queues without their own.
pub const DEFAULT_SLA: Duration = Duration::from_secs(60 * 60);
/// Longest SLA a queue or a `CreateItem` may set.
pub const MAX_SLA: Duration = Duration::from_secs(30 * 24 * 60 * 60);
/// Default interval between two sweeps for lapsed leases and SLAs.
pub const DEFAULT_SWEEP_INTERVAL: Duration = Duration::from_secs(1);
/// The queue of requests that name none.
pub const DEFAULT_QUEUE: &str = "default";

/// What happens to an item that is not decided within its SLA.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TimeoutAction {
    /// Fail closed (the default): the item ends EXPIRED, its output withheld; audited as
    /// `EXPIRED` by actor `system:sla`.
    #[default]
    Reject,
    /// The item ends DECIDED with `VERDICT_APPROVE` by reviewer `system:sla`.
    Approve,
    /// The item moves to the queue's `escalate_to` queue, PENDING there with that queue's SLA.
    Escalate,
}

impl TimeoutAction {
    /// The name used in config, metrics and audit details.
    pub fn as_str(self) -> &'static str {
        match self {
            TimeoutAction::Reject => "reject",
            TimeoutAction::Approve => "approve",
            TimeoutAction::Escalate => "escalate",
        }
    }
}

/// A `[review.queues.<name>]` table.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct QueueConfig {
    /// Time to decide an item of this queue (default: `review.default_sla`).
    #[serde(with = "humantime_serde")]
    pub sla: Option<Duration>,
    /// What happens when it passes (default `reject`).
    pub timeout_action: TimeoutAction,
    /// With `escalate`: the queue the item moves to (required then, refused otherwise).
    pub escalate_to: Option<String>,
}

/// The `[review]` table of `weir.toml`. See the module doc for the keys and defaults.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Address to listen on (default `127.0.0.1:50055`; `WEIR_REVIEW__LISTEN`).
    pub listen: SocketAddr,
    /// Redis URL. Unset: an in-memory store that loses everything on restart, the zero-setup
    /// default of `weir up` (never for production, and only one replica can use it).
    pub redis_url: Option<String>,
    /// Prefix of every Redis key (default `weir`).
    pub key_prefix: String,
    /// Lease of a `ClaimNext` that asks for none (default 5 min).
    #[serde(with = "humantime_serde")]
    pub default_lease: Duration,
    /// Longest lease that may be asked for (default 1 h).
    #[serde(with = "humantime_serde")]
    pub max_lease: Duration,
    /// Time to decide, for queues without their own `sla` (default 1 h).
    #[serde(with = "humantime_serde")]
    pub default_sla: Duration,
    /// How often each replica looks for lapsed leases and SLAs (default 1 s). A lease or SLA
    /// takes effect at most this long after it passes.
    #[serde(with = "humantime_serde")]
    pub sweep_interval: Duration,
    /// Per-queue settings.
    pub queues: BTreeMap<String, QueueConfig>,
    /// The reviewer console (`[review.console]`; on by default at `127.0.0.1:50056`).
    pub console: crate::console::ConsoleConfig,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: DEFAULT_LISTEN,
            redis_url: None,
            key_prefix: weir_mesh::store::DEFAULT_PREFIX.to_string(),
            default_lease: DEFAULT_LEASE,
            max_lease: DEFAULT_MAX_LEASE,
            default_sla: DEFAULT_SLA,
            sweep_interval: DEFAULT_SWEEP_INTERVAL,
            queues: BTreeMap::new(),
            console: crate::console::ConsoleConfig::default(),
        }
    }
}

/// Whether `name` is a valid queue name: 1 to 64 letters, digits, `-`, `_` or `.`.
pub fn valid_queue_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

impl Config {
    /// Checks every setting, naming the first bad key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let key = |name: &str| format!("review.{name}");
        let prefix_ok = !self.key_prefix.is_empty()
            && self.key_prefix.len() <= 64
            && self
                .key_prefix
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
        if !prefix_ok {
            return Err(ConfigError::invalid(
                key("key_prefix"),
                "must be 1 to 64 letters, digits, '-', '_' or '.'",
            ));
        }
        if self.max_lease.is_zero() {
            return Err(ConfigError::invalid(key("max_lease"), "must be positive"));
        }
        if self.default_lease.is_zero() || self.default_lease > self.max_lease {
            return Err(ConfigError::invalid(
                key("default_lease"),
                format!(
                    "must be positive and at most max_lease ({:?})",
                    self.max_lease
                ),
            ));
        }
        if self.default_sla.is_zero() || self.default_sla > MAX_SLA {
            return Err(ConfigError::invalid(
                key("default_sla"),
                "must be positive and at most 30 days",
            ));
        }
        if self.sweep_interval.is_zero() {
            return Err(ConfigError::invalid(
                key("sweep_interval"),
                "must be positive",
            ));
        }
        for (name, queue) in &self.queues {
            let qkey = |field: &str| key(&format!("queues.{name}.{field}"));
            if !valid_queue_name(name) {
                return Err(ConfigError::invalid(
                    key(&format!("queues.{name}")),
                    "queue names are 1 to 64 letters, digits, '-', '_' or '.'",
                ));
            }
            if let Some(sla) = queue.sla
                && (sla.is_zero() || sla > MAX_SLA)
            {
                return Err(ConfigError::invalid(
                    qkey("sla"),
                    "must be positive and at most 30 days",
                ));
            }
            match (queue.timeout_action, &queue.escalate_to) {
                (TimeoutAction::Escalate, None) => {
                    return Err(ConfigError::invalid(
                        qkey("escalate_to"),
                        "required with timeout_action = \"escalate\"",
                    ));
                }
                (TimeoutAction::Escalate, Some(to)) if !valid_queue_name(to) || to == name => {
                    return Err(ConfigError::invalid(
                        qkey("escalate_to"),
                        format!("{to:?} must be another valid queue name"),
                    ));
                }
                (TimeoutAction::Reject | TimeoutAction::Approve, Some(_)) => {
                    return Err(ConfigError::invalid(
                        qkey("escalate_to"),
                        "only allowed with timeout_action = \"escalate\"",
                    ));
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// The SLA of items of `queue` created without their own.
    pub fn sla(&self, queue: &str) -> Duration {
        self.queues
            .get(queue)
            .and_then(|q| q.sla)
            .unwrap_or(self.default_sla)
    }

    /// What happens to an item of `queue` whose SLA passes, and where it goes on `escalate`.
    pub fn timeout_action(&self, queue: &str) -> (TimeoutAction, Option<&str>) {
        match self.queues.get(queue) {
            Some(q) => (q.timeout_action, q.escalate_to.as_deref()),
            None => (TimeoutAction::Reject, None),
        }
    }
}

#[cfg(test)]
mod tests {
    use weir_mesh::config::Source;

    use super::*;

    #[test]
    fn defaults_validate() {
        let config: Config = Source::from_toml("").section("review").unwrap_or_default();
        assert_eq!(config, Config::default());
        assert!(config.validate().is_ok());
        assert_eq!(config.sla("anything"), DEFAULT_SLA);
        assert_eq!(config.timeout_action("x"), (TimeoutAction::Reject, None));
    }

    #[test]
    fn queues_parse_and_bad_values_name_their_key() {
        let source = Source::from_toml(
            "[review]\ndefault_lease = \"90s\"\n[review.queues.pay]\nsla = \"15m\"\n\
             timeout_action = \"escalate\"\nescalate_to = \"senior\"\n",
        );
        let config: Config = source.section("review").unwrap_or_default();
        assert_eq!(config.default_lease, Duration::from_secs(90));
        assert_eq!(config.sla("pay"), Duration::from_secs(900));
        assert_eq!(
            config.timeout_action("pay"),
            (TimeoutAction::Escalate, Some("senior"))
        );
        assert!(config.validate().is_ok());
        for (toml, bad) in [
            ("default_lease = \"2h\"", "review.default_lease"),
            ("max_lease = \"0s\"", "review.max_lease"),
            ("sweep_interval = \"0s\"", "review.sweep_interval"),
            ("key_prefix = \"a b\"", "review.key_prefix"),
            (
                "[review.queues.q]\ntimeout_action = \"escalate\"",
                "review.queues.q.escalate_to",
            ),
            (
                "[review.queues.q]\nescalate_to = \"r\"",
                "review.queues.q.escalate_to",
            ),
            ("[review.queues.q]\nsla = \"0s\"", "review.queues.q.sla"),
        ] {
            let config: Config = Source::from_toml(&format!("[review]\n{toml}\n"))
                .section("review")
                .unwrap_or_default();
            let message = config.validate().err().map(|e| e.to_string());
            let message = message.unwrap_or_default();
            assert!(message.contains(bad), "{message:?} should name {bad}");
        }
        assert!(
            Source::from_toml("[review]\nlease = \"1h\"\n")
                .section::<Config>("review")
                .is_err()
        );
        assert!(
            Source::from_toml("[review.queues.q]\ntimeout_action = \"ignore\"\n")
                .section::<Config>("review")
                .is_err()
        );
    }
}
