//! The model catalog: every model Weir can call, shared by the services through `[models.<name>]`
//! tables in `weir.toml`.
//!
//! ```toml
//! [models.sim-small]            # the simulated model: deterministic, no keys needed
//! backend = "sim"
//! context_window = 8192
//! sim = { time_to_first_token = "20ms", tokens_per_second = 200.0 }
//!
//! [models.gpt-4o-mini]          # any OpenAI-compatible chat completions API
//! backend = "openai"
//! family = "o200k"
//! openai = { base_url = "https://api.openai.com/v1", api_key_env = "OPENAI_API_KEY" }
//! ```
//!
//! Prices live with the model, in micro-USD per million tokens (integers: money is never floating
//! point). A model with no `price` table that is not marked `free` has an *unknown price*: the
//! budget service refuses to price it (FAILED_PRECONDITION, `PRICE_UNKNOWN`) rather than count it
//! as $0.
//!
//! ```toml
//! [models.gpt-4o-mini.price]
//! version = "2024-07"                     # free-form; reported with every estimate
//! input_micros_per_mtok = 150000          # $0.15 per million prompt tokens
//! output_micros_per_mtok = 600000         # $0.60 per million generated tokens
//! cached_input_micros_per_mtok = 75000    # optional; defaults to the input price
//! batch_input_micros_per_mtok = 75000     # optional; defaults to the input price
//! batch_output_micros_per_mtok = 300000   # optional; defaults to the output price
//!
//! [models.local-llama]
//! price = { free = true }                 # explicitly free: every price must be 0 or unset
//! ```
//!
//! When the file defines no model, [`Catalog::default`] provides two simulated models,
//! `sim-small` (fast) and `sim-large` (slower, longer answers), so `weir up` works with no file.

use std::{collections::BTreeMap, time::Duration};

use serde::{Deserialize, Serialize};

use crate::config::ConfigError;

/// Default context window of a model, in tokens.
pub const DEFAULT_CONTEXT_WINDOW: u32 = 8192;
/// Default largest `max_tokens` a model accepts.
pub const DEFAULT_MAX_OUTPUT_TOKENS: u32 = 1024;
/// Default length of a simulated answer, in tokens (before `max_tokens` cuts it).
pub const DEFAULT_SIM_OUTPUT_TOKENS: u32 = 32;
/// Default `version` of a price table entry that names none.
pub const DEFAULT_PRICE_VERSION: &str = "1";
/// Largest price accepted, in micro-USD per million tokens ($1,000,000 per million tokens): far
/// above any real price, and small enough that pricing a huge request cannot overflow.
pub const MAX_PRICE_MICROS_PER_MTOK: i64 = 1_000_000_000_000;
/// Default gRPC status of injected simulated faults.
pub const DEFAULT_SIM_ERROR_CODE: &str = "UNAVAILABLE";
/// Default per-request timeout for an OpenAI-compatible upstream.
pub const DEFAULT_OPENAI_TIMEOUT: Duration = Duration::from_secs(60);
/// Default connect timeout for an OpenAI-compatible upstream.
pub const DEFAULT_OPENAI_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Which kind of backend serves a model.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    /// The built-in simulated model.
    #[default]
    Sim,
    /// An OpenAI-compatible chat completions HTTP API.
    Openai,
}

impl BackendKind {
    /// The name used in config and in `ModelInfo.backend`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Sim => "sim",
            Self::Openai => "openai",
        }
    }
}

/// One model of the catalog.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ModelSpec {
    /// Backend kind (default `sim`).
    pub backend: BackendKind,
    /// Tokenizer family used to count tokens: `sim` (whitespace and punctuation, the default for
    /// simulated models), `o200k` or `cl100k` (OpenAI; estimated), or another name (estimated as
    /// characters / 4).
    pub family: Option<String>,
    /// Context window in tokens (default 8192).
    pub context_window: u32,
    /// Largest `max_tokens` accepted (default 1024).
    pub max_output_tokens: u32,
    /// Human-readable description.
    pub description: String,
    /// Settings of the simulated backend.
    pub sim: SimSpec,
    /// Settings of the OpenAI-compatible backend (required when `backend = "openai"`).
    pub openai: Option<OpenAiSpec>,
    /// The model's price; `None` means the price is unknown and the budget service refuses to
    /// price the model (it is never counted as $0: mark a free model `free = true`).
    pub price: Option<PriceSpec>,
}

impl Default for ModelSpec {
    fn default() -> Self {
        Self {
            backend: BackendKind::Sim,
            family: None,
            context_window: DEFAULT_CONTEXT_WINDOW,
            max_output_tokens: DEFAULT_MAX_OUTPUT_TOKENS,
            description: String::new(),
            sim: SimSpec::default(),
            openai: None,
            price: None,
        }
    }
}

impl ModelSpec {
    /// The tokenizer family: the configured one, else `sim` for simulated models and `o200k` for
    /// OpenAI-compatible ones.
    pub fn family(&self) -> &str {
        match (&self.family, self.backend) {
            (Some(family), _) => family,
            (None, BackendKind::Sim) => "sim",
            (None, BackendKind::Openai) => "o200k",
        }
    }
}

/// One entry of the versioned price table, in integer micro-USD per million tokens.
///
/// Cached-input and batch prices are optional and default to the standard input and output
/// prices, so forgetting one over-charges, never under-charges. A model marked `free` must have
/// every price 0 or unset. Use the `effective_*` methods to read the prices that apply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PriceSpec {
    /// Version of this entry (free-form, e.g. `"2024-07"`; default `"1"`).
    pub version: String,
    /// Prompt tokens not served from the cache, standard tier.
    pub input_micros_per_mtok: i64,
    /// Generated tokens, standard tier.
    pub output_micros_per_mtok: i64,
    /// Prompt tokens served from the backend's prompt cache (default: the input price).
    pub cached_input_micros_per_mtok: Option<i64>,
    /// Prompt tokens at the batch tier (default: the input price).
    pub batch_input_micros_per_mtok: Option<i64>,
    /// Generated tokens at the batch tier (default: the output price).
    pub batch_output_micros_per_mtok: Option<i64>,
    /// The model is explicitly free: every price is zero (default false).
    pub free: bool,
}

impl Default for PriceSpec {
    fn default() -> Self {
        Self {
            version: DEFAULT_PRICE_VERSION.to_string(),
            input_micros_per_mtok: 0,
            output_micros_per_mtok: 0,
            cached_input_micros_per_mtok: None,
            batch_input_micros_per_mtok: None,
            batch_output_micros_per_mtok: None,
            free: false,
        }
    }
}

impl PriceSpec {
    /// A paid price: input and output per million tokens, cached input and batch prices derived
    /// by the usual discounts (cached input 50 % of input, batch 50 % of standard).
    pub fn per_mtok(version: &str, input: i64, output: i64) -> Self {
        Self {
            version: version.to_string(),
            input_micros_per_mtok: input,
            output_micros_per_mtok: output,
            cached_input_micros_per_mtok: Some(input / 2),
            batch_input_micros_per_mtok: Some(input / 2),
            batch_output_micros_per_mtok: Some(output / 2),
            free: false,
        }
    }

    /// An explicitly free model.
    pub fn free() -> Self {
        Self {
            free: true,
            ..Self::default()
        }
    }

    /// Cached-input price that applies (the input price when not set).
    pub fn effective_cached_input(&self) -> i64 {
        self.cached_input_micros_per_mtok
            .unwrap_or(self.input_micros_per_mtok)
    }

    /// Batch input price that applies (the input price when not set).
    pub fn effective_batch_input(&self) -> i64 {
        self.batch_input_micros_per_mtok
            .unwrap_or(self.input_micros_per_mtok)
    }

    /// Batch output price that applies (the output price when not set).
    pub fn effective_batch_output(&self) -> i64 {
        self.batch_output_micros_per_mtok
            .unwrap_or(self.output_micros_per_mtok)
    }

    /// Checks the entry; `key` is the table's key path (e.g. `models.gpt.price`).
    pub fn validate(&self, key: &str) -> Result<(), ConfigError> {
        if self.version.is_empty() || self.version.len() > 64 {
            return Err(ConfigError::invalid(
                format!("{key}.version"),
                "must be 1 to 64 characters",
            ));
        }
        let prices = [
            ("input_micros_per_mtok", Some(self.input_micros_per_mtok)),
            ("output_micros_per_mtok", Some(self.output_micros_per_mtok)),
            (
                "cached_input_micros_per_mtok",
                self.cached_input_micros_per_mtok,
            ),
            (
                "batch_input_micros_per_mtok",
                self.batch_input_micros_per_mtok,
            ),
            (
                "batch_output_micros_per_mtok",
                self.batch_output_micros_per_mtok,
            ),
        ];
        for (field, value) in prices {
            let Some(value) = value else { continue };
            if !(0..=MAX_PRICE_MICROS_PER_MTOK).contains(&value) {
                return Err(ConfigError::invalid(
                    format!("{key}.{field}"),
                    format!(
                        "must be 0 to {MAX_PRICE_MICROS_PER_MTOK} micro-USD per million tokens, got {value}"
                    ),
                ));
            }
            if self.free && value != 0 {
                return Err(ConfigError::invalid(
                    format!("{key}.{field}"),
                    "a model marked free = true must have every price 0 or unset",
                ));
            }
        }
        if !self.free && self.input_micros_per_mtok == 0 && self.output_micros_per_mtok == 0 {
            return Err(ConfigError::invalid(
                format!("{key}.free"),
                "input and output prices are both 0: set free = true if the model really is free",
            ));
        }
        Ok(())
    }
}

/// Behaviour of the simulated backend. Everything is deterministic: the same request gets the
/// same answer, and an error rate of 0.25 fails exactly every fourth request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SimSpec {
    /// Delay before the first token (default 0).
    #[serde(with = "humantime_serde")]
    pub time_to_first_token: Duration,
    /// Generation speed after the first token; 0 means instant (default 0).
    pub tokens_per_second: f64,
    /// Answer length in tokens before `max_tokens` cuts it (default 32).
    pub output_tokens: u32,
    /// Extra delay added before anything happens, on every request (default 0).
    #[serde(with = "humantime_serde")]
    pub added_latency: Duration,
    /// Fraction of requests (0 to 1) that fail with `error_code` (default 0).
    pub error_rate: f64,
    /// gRPC status name of injected failures (default `UNAVAILABLE`).
    pub error_code: String,
    /// For injected RESOURCE_EXHAUSTED or UNAVAILABLE failures: the retry delay to advertise.
    #[serde(with = "humantime_serde")]
    pub retry_after: Option<Duration>,
    /// Never answer: the request hangs until the caller's deadline or cancellation (default false).
    pub hang: bool,
    /// Streams fail with UNAVAILABLE after this many tokens, as a cut connection would.
    pub cut_after_tokens: Option<u32>,
}

impl Default for SimSpec {
    fn default() -> Self {
        Self {
            time_to_first_token: Duration::ZERO,
            tokens_per_second: 0.0,
            output_tokens: DEFAULT_SIM_OUTPUT_TOKENS,
            added_latency: Duration::ZERO,
            error_rate: 0.0,
            error_code: DEFAULT_SIM_ERROR_CODE.to_string(),
            retry_after: None,
            hang: false,
            cut_after_tokens: None,
        }
    }
}

/// An OpenAI-compatible chat completions endpoint (OpenAI, vLLM, Ollama, llama.cpp, ...).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OpenAiSpec {
    /// Base URL up to and including the version, e.g. `https://api.openai.com/v1` or
    /// `http://localhost:11434/v1`; `/chat/completions` is appended.
    pub base_url: String,
    /// Name of the environment variable holding the API key (sent as a bearer token); unset for
    /// servers that need none. The key itself never goes in the config file.
    pub api_key_env: Option<String>,
    /// Model name to send upstream; defaults to the catalog name.
    pub upstream_model: Option<String>,
    /// Whole-request timeout when the caller sets no deadline (default 60 s).
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// Connect timeout (default 5 s).
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
}

impl Default for OpenAiSpec {
    fn default() -> Self {
        Self {
            base_url: String::new(),
            api_key_env: None,
            upstream_model: None,
            timeout: DEFAULT_OPENAI_TIMEOUT,
            connect_timeout: DEFAULT_OPENAI_CONNECT_TIMEOUT,
        }
    }
}

/// All models, by name.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Catalog {
    models: BTreeMap<String, ModelSpec>,
}

impl Default for Catalog {
    /// Two simulated models, so Weir runs with no config file: `sim-small` (20 ms to first token,
    /// 200 tokens/s, 24-token answers; priced $0.15 / $0.60 per million input / output tokens)
    /// and `sim-large` (80 ms, 60 tokens/s, 64-token answers; $2.50 / $10.00). Both have cached
    /// input and batch prices at half the standard price.
    fn default() -> Self {
        let mut models = BTreeMap::new();
        models.insert(
            "sim-small".to_string(),
            ModelSpec {
                description: "Simulated fast, cheap model".to_string(),
                sim: SimSpec {
                    time_to_first_token: Duration::from_millis(20),
                    tokens_per_second: 200.0,
                    output_tokens: 24,
                    ..SimSpec::default()
                },
                price: Some(PriceSpec::per_mtok("sim-2025-01", 150_000, 600_000)),
                ..ModelSpec::default()
            },
        );
        models.insert(
            "sim-large".to_string(),
            ModelSpec {
                description: "Simulated strong, slower model".to_string(),
                context_window: 32768,
                sim: SimSpec {
                    time_to_first_token: Duration::from_millis(80),
                    tokens_per_second: 60.0,
                    output_tokens: 64,
                    ..SimSpec::default()
                },
                price: Some(PriceSpec::per_mtok("sim-2025-01", 2_500_000, 10_000_000)),
                ..ModelSpec::default()
            },
        );
        Self { models }
    }
}

impl Catalog {
    /// A catalog of the given models.
    pub fn new(models: impl IntoIterator<Item = (String, ModelSpec)>) -> Self {
        Self {
            models: models.into_iter().collect(),
        }
    }

    /// Reads `[models]` from the config source: the defaults when the file defines none,
    /// otherwise exactly the models it defines. Validates every model.
    pub fn from_source(source: &crate::config::Source) -> Result<Self, ConfigError> {
        let catalog: Catalog = source.section("models")?;
        let catalog = if catalog.models.is_empty() {
            Catalog::default()
        } else {
            catalog
        };
        catalog.validate()?;
        Ok(catalog)
    }

    /// The model named `name`.
    pub fn get(&self, name: &str) -> Option<&ModelSpec> {
        self.models.get(name)
    }

    /// Models in name order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &ModelSpec)> {
        self.models.iter().map(|(name, spec)| (name.as_str(), spec))
    }

    /// Number of models.
    pub fn len(&self) -> usize {
        self.models.len()
    }

    /// True when there is no model.
    pub fn is_empty(&self) -> bool {
        self.models.is_empty()
    }

    /// Checks every model, naming the first bad key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        for (name, spec) in &self.models {
            let key = |field: &str| format!("models.{name}.{field}");
            if name.is_empty() || name.len() > 128 {
                return Err(ConfigError::invalid(
                    "models",
                    "model names must be 1 to 128 characters",
                ));
            }
            if spec.context_window == 0 {
                return Err(ConfigError::invalid(
                    key("context_window"),
                    "must be positive",
                ));
            }
            if spec.max_output_tokens == 0 || spec.max_output_tokens > spec.context_window {
                return Err(ConfigError::invalid(
                    key("max_output_tokens"),
                    format!(
                        "must be between 1 and context_window ({})",
                        spec.context_window
                    ),
                ));
            }
            let sim = &spec.sim;
            if !(0.0..=1.0).contains(&sim.error_rate) {
                return Err(ConfigError::invalid(
                    key("sim.error_rate"),
                    "must be 0 to 1",
                ));
            }
            if !(sim.tokens_per_second >= 0.0 && sim.tokens_per_second.is_finite()) {
                return Err(ConfigError::invalid(
                    key("sim.tokens_per_second"),
                    "must be a finite number >= 0",
                ));
            }
            if crate::error::parse_code(&sim.error_code).is_none() {
                return Err(ConfigError::invalid(
                    key("sim.error_code"),
                    format!("{:?} is not a gRPC status name", sim.error_code),
                ));
            }
            if let Some(price) = &spec.price {
                price.validate(&key("price"))?;
            }
            if spec.backend == BackendKind::Openai {
                let Some(openai) = &spec.openai else {
                    return Err(ConfigError::invalid(
                        key("openai"),
                        "backend \"openai\" needs an [models.<name>.openai] table with base_url",
                    ));
                };
                if !(openai.base_url.starts_with("http://")
                    || openai.base_url.starts_with("https://"))
                {
                    return Err(ConfigError::invalid(
                        key("openai.base_url"),
                        "must be an http:// or https:// URL",
                    ));
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Source;

    #[test]
    fn no_models_means_the_default_sim_models() {
        let catalog = Catalog::from_source(&Source::from_toml("")).ok();
        let names: Vec<String> = catalog
            .iter()
            .flat_map(|c| c.iter().map(|(n, _)| n.to_string()).collect::<Vec<_>>())
            .collect();
        assert_eq!(names, ["sim-large", "sim-small"]);
    }

    #[test]
    fn defined_models_replace_the_defaults() {
        let toml = r#"
            [models.fast]
            sim = { time_to_first_token = "5ms", error_rate = 0.5 }
            [models.gpt]
            backend = "openai"
            openai = { base_url = "http://127.0.0.1:9/v1" }
        "#;
        let catalog = Catalog::from_source(&Source::from_toml(toml));
        let catalog = catalog.ok();
        let catalog = catalog.as_ref();
        assert_eq!(catalog.map(Catalog::len), Some(2));
        let fast = catalog.and_then(|c| c.get("fast"));
        assert_eq!(
            fast.map(|m| m.sim.time_to_first_token),
            Some(Duration::from_millis(5))
        );
        assert_eq!(
            catalog.and_then(|c| c.get("gpt")).map(ModelSpec::family),
            Some("o200k")
        );
    }

    #[test]
    fn bad_values_name_their_key() {
        for (toml, key) in [
            (
                "[models.a]\nsim = { error_rate = 2.0 }",
                "models.a.sim.error_rate",
            ),
            (
                "[models.a]\nsim = { error_code = \"NOPE\" }",
                "models.a.sim.error_code",
            ),
            ("[models.a]\nbackend = \"openai\"", "models.a.openai"),
            (
                "[models.a]\nmax_output_tokens = 0",
                "models.a.max_output_tokens",
            ),
            (
                "[models.a]\nprice = { input_micros_per_mtok = -1, output_micros_per_mtok = 5 }",
                "models.a.price.input_micros_per_mtok",
            ),
            (
                "[models.a]\nprice = { free = true, output_micros_per_mtok = 5 }",
                "models.a.price.output_micros_per_mtok",
            ),
            (
                "[models.a]\nprice = { version = \"\" , input_micros_per_mtok = 1 }",
                "models.a.price.version",
            ),
            (
                "[models.a]\nprice = { version = \"2\" }",
                "models.a.price.free",
            ),
            (
                "[models.a]\nprice = { input_micros_per_mtok = 1, batch_output_micros_per_mtok = 1000000000000000 }",
                "models.a.price.batch_output_micros_per_mtok",
            ),
        ] {
            let error = Catalog::from_source(&Source::from_toml(toml)).err();
            let message = error.map(|e| e.to_string()).unwrap_or_default();
            assert!(message.contains(key), "{message} should name {key}");
        }
    }

    #[test]
    fn prices_parse_and_optional_ones_default_to_standard() {
        let toml = r#"
            [models.paid]
            price = { version = "2024-07", input_micros_per_mtok = 150000, output_micros_per_mtok = 600000, cached_input_micros_per_mtok = 75000 }
            [models.local]
            price = { free = true }
            [models.unpriced]
        "#;
        let catalog = Catalog::from_source(&Source::from_toml(toml)).ok();
        let price = |name: &str| {
            catalog
                .as_ref()
                .and_then(|c| c.get(name))
                .and_then(|m| m.price.clone())
        };
        let paid = price("paid").unwrap_or_default();
        assert_eq!(paid.version, "2024-07");
        assert_eq!(paid.effective_cached_input(), 75_000);
        assert_eq!(paid.effective_batch_input(), 150_000);
        assert_eq!(paid.effective_batch_output(), 600_000);
        assert_eq!(price("local"), Some(PriceSpec::free()));
        assert_eq!(price("unpriced"), None);
    }

    #[test]
    fn default_models_are_priced() {
        let catalog = Catalog::default();
        assert!(catalog.validate().is_ok());
        let small = catalog.get("sim-small").and_then(|m| m.price.clone());
        assert_eq!(
            small.as_ref().map(|p| p.input_micros_per_mtok),
            Some(150_000)
        );
        assert_eq!(
            small.as_ref().map(|p| p.output_micros_per_mtok),
            Some(600_000)
        );
        assert_eq!(small.map(|p| p.effective_cached_input()), Some(75_000));
        let large = catalog.get("sim-large").and_then(|m| m.price.clone());
        assert_eq!(
            large.as_ref().map(|p| p.input_micros_per_mtok),
            Some(2_500_000)
        );
        assert_eq!(large.map(|p| p.effective_batch_output()), Some(5_000_000));
    }
}
