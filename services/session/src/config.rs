//! The `[session]` table of `weir.toml`.
//!
//! ```toml
//! [session]
//! listen = "127.0.0.1:50053"                # WEIR_SESSION__LISTEN
//! redis_url = "redis://127.0.0.1:6379"      # WEIR_SESSION__REDIS_URL; unset = in-memory store
//! key_prefix = "weir"                       # WEIR_SESSION__KEY_PREFIX
//! inference_url = "http://127.0.0.1:50052"  # WEIR_SESSION__INFERENCE_URL (summaries)
//! default_ttl = "24h"                       # idle time before a session expires
//! max_ttl = "30days"                        # longest TTL a CreateSession may ask for
//! default_model = "sim-small"               # model of sessions created without one (default: none)
//! summarize = true                          # compress old turns into a summary
//! summarize_threshold = 0.8                 # ... when raw turns exceed 80% of the context budget
//! summary_keep = 0.5                        # ... keeping the newest half of that budget raw
//! summary_model = ""                        # model that writes summaries; "" = the session's
//! summary_max_tokens = 256                  # length limit of a summary
//! summary_timeout = "30s"                   # deadline of one summarization call
//! max_turns_per_append = 100
//! max_message_bytes = 262144                # content + tool call arguments of one message
//! max_request_ids = 1000                    # idempotency keys remembered per session
//! tombstone_ttl = "1h"                      # how long a deleted id stays reserved
//! ```
//!
//! Every key is optional; [`Config::validate`] checks the table against the model catalog once at
//! start-up and names the bad key (`session.summarize_threshold`, ...).

use std::{
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    time::Duration,
};

use serde::{Deserialize, Serialize};
use weir_mesh::{
    catalog::{Catalog, ModelSpec},
    config::ConfigError,
};

/// Default address the session service listens on.
pub const DEFAULT_LISTEN: SocketAddr =
    SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::new(127, 0, 0, 1), 50053));
/// Default address of the inference service that writes summaries.
pub const DEFAULT_INFERENCE_URL: &str = "http://127.0.0.1:50052";
/// Default idle time after which a session expires (each append restarts it).
pub const DEFAULT_TTL: Duration = Duration::from_secs(24 * 60 * 60);
/// Shortest TTL a session may have.
pub const MIN_TTL: Duration = Duration::from_secs(1);
/// Default longest TTL a `CreateSession` may ask for.
pub const DEFAULT_MAX_TTL: Duration = Duration::from_secs(30 * 24 * 60 * 60);
/// Default model of sessions created without one.
/// Default fraction of the session model's context budget that raw turns may fill before the
/// oldest are summarized.
pub const DEFAULT_SUMMARIZE_THRESHOLD: f64 = 0.8;
/// Default fraction of the threshold kept as raw turns after a summary (the newest ones).
pub const DEFAULT_SUMMARY_KEEP: f64 = 0.5;
/// Default length limit of a summary, in tokens (capped by the summary model's
/// `max_output_tokens`).
pub const DEFAULT_SUMMARY_MAX_TOKENS: u32 = 256;
/// Default deadline of one summarization call to the inference service.
pub const DEFAULT_SUMMARY_TIMEOUT: Duration = Duration::from_secs(30);
/// Default most messages in one `AppendTurns`.
pub const DEFAULT_MAX_TURNS_PER_APPEND: usize = 100;
/// Hard limit of `max_turns_per_append` (one Redis script call carries them all).
pub const MAX_TURNS_PER_APPEND_LIMIT: usize = 1000;
/// Default largest message (content plus tool call arguments), in bytes.
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 256 * 1024;
/// Default number of `request_id`s remembered per session for idempotent retries (the oldest are
/// forgotten first; retries come within seconds, so this is plenty).
pub const DEFAULT_MAX_REQUEST_IDS: usize = 1000;
/// Default time a deleted session's id stays reserved (its tombstone lives this long).
pub const DEFAULT_TOMBSTONE_TTL: Duration = Duration::from_secs(60 * 60);

/// The `[session]` table of `weir.toml`. See the module doc for the keys and defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Address to listen on (default `127.0.0.1:50053`; `WEIR_SESSION__LISTEN`).
    pub listen: SocketAddr,
    /// Redis URL (`redis://host:port/db`). Unset: an in-memory store that loses everything on
    /// restart, the zero-setup default of `weir up` (never for production).
    pub redis_url: Option<String>,
    /// Prefix of every Redis key (default `weir`).
    pub key_prefix: String,
    /// The inference service that writes summaries (default `http://127.0.0.1:50052`).
    pub inference_url: String,
    /// Idle time before a session expires when `CreateSession` sets none (default 24 h).
    #[serde(with = "humantime_serde")]
    pub default_ttl: Duration,
    /// Longest TTL a `CreateSession` may ask for (default 30 days).
    #[serde(with = "humantime_serde")]
    pub max_ttl: Duration,
    /// Model of sessions created without one; must be in the catalog. Empty (the default): a
    /// `CreateSession` must name its model.
    pub default_model: String,
    /// Whether old turns are summarized at all (default true).
    pub summarize: bool,
    /// Raw turns may fill this fraction of the session model's context budget before the oldest
    /// are summarized (default 0.8; above 0, at most 1).
    pub summarize_threshold: f64,
    /// After a summary, raw turns worth about this fraction of the threshold stay raw (default
    /// 0.5; above 0, below 1).
    pub summary_keep: f64,
    /// Model that writes summaries; empty (the default) means the session's own model.
    pub summary_model: String,
    /// Length limit of a summary in tokens (default 256).
    pub summary_max_tokens: u32,
    /// Deadline of one summarization call (default 30 s).
    #[serde(with = "humantime_serde")]
    pub summary_timeout: Duration,
    /// Most messages in one `AppendTurns` (default 100, at most 1000).
    pub max_turns_per_append: usize,
    /// Largest message in bytes, content plus tool call arguments (default 256 KiB).
    pub max_message_bytes: usize,
    /// `request_id`s remembered per session (default 1000).
    pub max_request_ids: usize,
    /// How long a deleted session's id stays reserved (default 1 h).
    #[serde(with = "humantime_serde")]
    pub tombstone_ttl: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: DEFAULT_LISTEN,
            redis_url: None,
            key_prefix: weir_mesh::store::DEFAULT_PREFIX.to_string(),
            inference_url: DEFAULT_INFERENCE_URL.to_string(),
            default_ttl: DEFAULT_TTL,
            max_ttl: DEFAULT_MAX_TTL,
            default_model: String::new(),
            summarize: true,
            summarize_threshold: DEFAULT_SUMMARIZE_THRESHOLD,
            summary_keep: DEFAULT_SUMMARY_KEEP,
            summary_model: String::new(),
            summary_max_tokens: DEFAULT_SUMMARY_MAX_TOKENS,
            summary_timeout: DEFAULT_SUMMARY_TIMEOUT,
            max_turns_per_append: DEFAULT_MAX_TURNS_PER_APPEND,
            max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
            max_request_ids: DEFAULT_MAX_REQUEST_IDS,
            tombstone_ttl: DEFAULT_TOMBSTONE_TTL,
        }
    }
}

impl Config {
    /// Checks every setting against the model catalog, naming the first bad key.
    pub fn validate(&self, catalog: &Catalog) -> Result<(), ConfigError> {
        let key = |name: &str| format!("session.{name}");
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
        if !(self.inference_url.starts_with("http://")
            || self.inference_url.starts_with("https://"))
        {
            return Err(ConfigError::invalid(
                key("inference_url"),
                format!("{:?} is not an http:// URL", self.inference_url),
            ));
        }
        if self.max_ttl < MIN_TTL {
            return Err(ConfigError::invalid(key("max_ttl"), "must be at least 1s"));
        }
        if self.default_ttl < MIN_TTL || self.default_ttl > self.max_ttl {
            return Err(ConfigError::invalid(
                key("default_ttl"),
                format!("must be between 1s and max_ttl ({:?})", self.max_ttl),
            ));
        }
        if !self.default_model.is_empty() && catalog.get(&self.default_model).is_none() {
            return Err(ConfigError::invalid(
                key("default_model"),
                format!("{:?} is not a model of the catalog", self.default_model),
            ));
        }
        if !self.summary_model.is_empty() && catalog.get(&self.summary_model).is_none() {
            return Err(ConfigError::invalid(
                key("summary_model"),
                format!("{:?} is not a model of the catalog", self.summary_model),
            ));
        }
        if !(self.summarize_threshold > 0.0 && self.summarize_threshold <= 1.0) {
            return Err(ConfigError::invalid(
                key("summarize_threshold"),
                "must be above 0 and at most 1",
            ));
        }
        if !(self.summary_keep > 0.0 && self.summary_keep < 1.0) {
            return Err(ConfigError::invalid(
                key("summary_keep"),
                "must be above 0 and below 1",
            ));
        }
        if self.summary_max_tokens == 0 {
            return Err(ConfigError::invalid(
                key("summary_max_tokens"),
                "must be positive",
            ));
        }
        if self.summary_timeout.is_zero() {
            return Err(ConfigError::invalid(
                key("summary_timeout"),
                "must be positive",
            ));
        }
        if self.max_turns_per_append == 0 || self.max_turns_per_append > MAX_TURNS_PER_APPEND_LIMIT
        {
            return Err(ConfigError::invalid(
                key("max_turns_per_append"),
                format!("must be 1 to {MAX_TURNS_PER_APPEND_LIMIT}"),
            ));
        }
        if self.max_message_bytes == 0 {
            return Err(ConfigError::invalid(
                key("max_message_bytes"),
                "must be positive",
            ));
        }
        if self.max_request_ids == 0 {
            return Err(ConfigError::invalid(
                key("max_request_ids"),
                "must be positive",
            ));
        }
        if self.tombstone_ttl < MIN_TTL {
            return Err(ConfigError::invalid(
                key("tombstone_ttl"),
                "must be at least 1s",
            ));
        }
        Ok(())
    }

    /// Tokens that raw turns of a session on `model` may hold before summarization starts:
    /// `summarize_threshold` × the model's context budget ([`context_budget`]).
    pub fn threshold_tokens(&self, model: &ModelSpec) -> u64 {
        scale(context_budget(model), self.summarize_threshold)
    }

    /// Tokens of raw turns kept after a summary: `summary_keep` × [`Self::threshold_tokens`].
    pub fn keep_tokens(&self, model: &ModelSpec) -> u64 {
        scale(self.threshold_tokens(model), self.summary_keep)
    }
}

/// The tokens of history a model can be given: its context window minus the room reserved for
/// its answer (`max_output_tokens`). This is `GetContext`'s budget when `max_tokens` is 0.
pub fn context_budget(model: &ModelSpec) -> u64 {
    u64::from(model.context_window.saturating_sub(model.max_output_tokens)).max(1)
}

fn scale(tokens: u64, fraction: f64) -> u64 {
    // Budgets are far below 2^53, so the float round trip is exact enough; the result is floored.
    #[allow(
        clippy::cast_precision_loss,
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss
    )]
    let scaled = (tokens as f64 * fraction).floor() as u64;
    scaled.max(1)
}

#[cfg(test)]
mod tests {
    use weir_mesh::config::Source;

    use super::*;

    #[test]
    fn defaults_validate_against_the_default_catalog() {
        let config: Config = Source::from_toml("").section("session").unwrap_or_default();
        assert_eq!(config, Config::default());
        assert!(config.validate(&Catalog::default()).is_ok());
        // sim-small: 8192 - 1024 = 7168 tokens of context; 80% of it is 5734.
        let spec = Catalog::default()
            .get("sim-small")
            .cloned()
            .unwrap_or_default();
        assert_eq!(context_budget(&spec), 7168);
        assert_eq!(config.threshold_tokens(&spec), 5734);
        assert_eq!(config.keep_tokens(&spec), 2867);
    }

    #[test]
    fn durations_parse_and_bad_values_name_their_key() {
        let source = Source::from_toml("[session]\ndefault_ttl = \"90m\"\n");
        let config: Option<Config> = source.section("session").ok();
        assert_eq!(
            config.map(|c| c.default_ttl),
            Some(Duration::from_secs(5400))
        );
        for (toml, bad) in [
            ("summarize_threshold = 1.5", "session.summarize_threshold"),
            ("default_model = \"nope\"", "session.default_model"),
            ("summary_model = \"nope\"", "session.summary_model"),
            ("default_ttl = \"0s\"", "session.default_ttl"),
            (
                "max_turns_per_append = 5000",
                "session.max_turns_per_append",
            ),
            ("key_prefix = \"a b\"", "session.key_prefix"),
            ("inference_url = \"localhost:1\"", "session.inference_url"),
        ] {
            let config: Config = Source::from_toml(&format!("[session]\n{toml}\n"))
                .section("session")
                .unwrap_or_default();
            let error = config.validate(&Catalog::default()).err();
            let message = error.map(|e| e.to_string()).unwrap_or_default();
            assert!(message.contains(bad), "{message:?} should name {bad}");
        }
        assert!(
            Source::from_toml("[session]\nttl = \"1h\"\n")
                .section::<Config>("session")
                .is_err()
        );
    }
}
