//! The `[router]` table of `weir.toml`.
//!
//! ```toml
//! [router]
//! listen = "127.0.0.1:50051"               # WEIR_ROUTER__LISTEN
//! inference_url = "http://127.0.0.1:50052" # WEIR_ROUTER__INFERENCE_URL
//! session_url = "http://127.0.0.1:50053"   # WEIR_ROUTER__SESSION_URL; "" turns sessions off
//! budget_url = ""                          # WEIR_ROUTER__BUDGET_URL; "" (default) = no budgets
//!
//! [router.http]                            # the OpenAI-compatible HTTP edge (crate::openai::edge)
//! listen = "127.0.0.1:50057"               # WEIR_ROUTER__HTTP__LISTEN; "" turns it off
//!
//! [router.cache]                           # the response cache (crate::cache); off by default
//! enabled = false                          # WEIR_ROUTER__CACHE__ENABLED
//! cached_price_fraction = 0.0              # WEIR_ROUTER__CACHE__CACHED_PRICE_FRACTION
//! ttl = "1h"                               # WEIR_ROUTER__CACHE__TTL
//! max_entry_bytes = 262144                 # WEIR_ROUTER__CACHE__MAX_ENTRY_BYTES
//! # redis_url = "redis://127.0.0.1:6379"   # WEIR_ROUTER__CACHE__REDIS_URL; unset: in the process
//! key_prefix = "weir"                      # WEIR_ROUTER__CACHE__KEY_PREFIX
//!
//! [router.budget]                          # only read when budget_url is set
//! fail_open = false                        # WEIR_ROUTER__BUDGET__FAIL_OPEN
//! [router.budget.tenants.internal-tools]
//! fail_open = true                         # this tenant is served when budgets cannot be checked
//!
//! [router.routes.auto]                     # a route alias clients name instead of a model
//! models = ["sim-large", "sim-small"]      # candidates in order: the first is the primary
//! economy = ["sim-small"]                  # cheaper tier for tenants above their soft limit
//! tiers = { fast = ["sim-small"] }         # named tiers the rules pick (crate::rules)
//! description = "Strong model first, fast model as its fallback"
//! degraded = { kind = "fixed", text = "We are busy; please try again shortly." }
//! canary = { model = "sim-new", weight = 0.05 } # 5% of requests try sim-new first
//! [[router.routes.auto.rules]]             # first that holds picks its tier (docs/routing.md)
//! name = "short-questions"
//! tier = "fast"
//! max_prompt_tokens = 200
//! ```
//!
//! Every setting has a default, so the table may be left out. When it defines no route at all,
//! the router provides the route [`DEFAULT_ROUTE`] (`auto`) over [`DEFAULT_ROUTE_MODELS`], keeping
//! only the models present in the catalog (and no route when none is, or when a model is itself
//! named `auto`). Defining any route replaces that default.
//!
//! # Sessions and budgets
//!
//! - `session_url` (default [`DEFAULT_SESSION_URL`]) is the session service that requests with a
//!   `session_id` load their history from and append their exchange to (see [`crate::session`]).
//!   Requests without a `session_id` never call it. Empty turns sessions off: a request with a
//!   `session_id` is then refused with FAILED_PRECONDITION, reason `SESSIONS_DISABLED`.
//! - `budget_url` (default empty: off) is the budget service every request reserves its
//!   worst-case cost with and commits its actual cost to (see [`crate::spend`]). It is off by
//!   default because it makes every request depend on the budget service and needs a price for
//!   every model of the catalog (checked at start-up, naming `models.<name>.price`).
//! - `[router.budget]` ([`BudgetPolicy`]) says what happens when the budget service cannot answer
//!   (unreachable, its Redis down, its circuit open): **fail closed** by default (UNAVAILABLE,
//!   reason `BUDGET_UNAVAILABLE`), or, for tenants marked `fail_open`, serve the request unmetered
//!   with a `BUDGET_UNAVAILABLE` notice.
//! - A route's `economy` tier serves tenants whose spend is above their soft limit (see
//!   [`crate::route`]).
//!
//! - `[router.review]` ([`ReviewConfig`]): `review_url` (default empty: off) is the review service
//!   that answers matched by a review policy are sent to, held back (blocking) or sampled for audit
//!   (post-hoc); see [`crate::review`] for the policies and [`crate::review_gate`] for the walk.
//!
//! Each of the four URLs may list the service's replicas, comma-separated
//! (`"http://10.0.0.1:50052,http://10.0.0.2:50052"`), or name a host that resolves to several
//! addresses (a headless Service): the router then balances over every replica and ejects a sick
//! one for a while ([`weir_mesh::balance`]; `[router.client.<dependency>.balance]`). A single
//! `http://<IP address>:port` is one plain channel, as before.
//!
//! `weir up` (and `weir::stack::start`) points `inference_url`, and `session_url`, `budget_url` and
//! `review.review_url` when set, at the services it runs in the same process.
//!
//! The edge of the mesh is configured here too: `[router.auth]` (API keys → tenants),
//! `[router.rate_limit]` (per-tenant GCRA, shared through Redis by replicas) and
//! `[router.client.inference]`, `[router.client.session]`, `[router.client.budget]`,
//! `[router.client.review]` (retry, breaker, bulkhead and timeouts of the calls to each service,
//! with defaults that fit it: see [`crate::clients`]); each table's settings and defaults are
//! documented on its type in weir-mesh.
//!
//! The configuration is checked once at start-up, against the model catalog, by
//! [`crate::RouteTable::new`] and [`Config::validate`]; a bad value fails with a [`ConfigError`]
//! naming its key, such as `router.routes.auto.models`.

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    time::Duration,
};

use serde::{Deserialize, Serialize};
use weir_mesh::{
    auth::AuthConfig, config::ConfigError, idempotency::IdempotencyConfig,
    ratelimit::RateLimitConfig,
};

use crate::{canary, clients::Clients, review::ReviewConfig};

/// Default address the router listens on.
pub const DEFAULT_LISTEN: SocketAddr =
    SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::new(127, 0, 0, 1), 50051));
/// Default address of the inference service.
pub const DEFAULT_INFERENCE_URL: &str = "http://127.0.0.1:50052";
/// Default address of the session service (sessions are on by default; they only matter to
/// requests that name a `session_id`).
pub const DEFAULT_SESSION_URL: &str = "http://127.0.0.1:50053";
/// Default address of the budget service: none, budgets are off until `budget_url` is set.
pub const DEFAULT_BUDGET_URL: &str = "";
/// Default of `[router.budget] fail_open`: refuse requests when the budget cannot be checked.
pub const DEFAULT_BUDGET_FAIL_OPEN: bool = false;
/// Alias of the route provided when the configuration defines none.
pub const DEFAULT_ROUTE: &str = "auto";
/// Candidates of the default route, primary first; models missing from the catalog are left out.
pub const DEFAULT_ROUTE_MODELS: [&str; 2] = ["sim-large", "sim-small"];

/// The `[router]` table of `weir.toml`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Address to listen on (default `127.0.0.1:50051`; `WEIR_ROUTER__LISTEN`).
    pub listen: SocketAddr,
    /// URL of the inference service (default `http://127.0.0.1:50052`;
    /// `WEIR_ROUTER__INFERENCE_URL`). Plain `http://host:port`: the channel connects on first use
    /// and reconnects on its own, so the router may start before the inference service.
    pub inference_url: String,
    /// URL of the session service (default `http://127.0.0.1:50053`; `WEIR_ROUTER__SESSION_URL`),
    /// called for requests with a `session_id`. Empty turns sessions off (see the module doc).
    pub session_url: String,
    /// URL of the budget service (default empty: budgets off; `WEIR_ROUTER__BUDGET_URL`). When
    /// set, every request reserves its worst-case cost before the model call and commits its
    /// actual cost after it (see the module doc).
    pub budget_url: String,
    /// What the router does when the budget service cannot answer (`[router.budget]`; fail
    /// closed by default).
    pub budget: BudgetPolicy,
    /// Route aliases by name (`[router.routes.<alias>]`). Empty means the default `auto` route
    /// (see the module documentation).
    pub routes: BTreeMap<String, RouteSpec>,
    /// Tenant authentication (`[router.auth]`, `[[router.auth.api_keys]]`). With no key
    /// configured every caller is the default tenant.
    pub auth: AuthConfig,
    /// Per-tenant rate limits (`[router.rate_limit]`; 100 requests/s, burst 200 by default;
    /// shared by replicas through Redis when `redis_url` is set).
    pub rate_limit: RateLimitConfig,
    /// The resilience of the router's calls to each service it depends on
    /// (`[router.client.inference]`, `.session`, `.budget`: retry, retry budget, breaker, bulkhead
    /// and attempt timeout; see [`crate::clients`]).
    pub client: Clients,
    /// Review policies and the review service they send items to (`[router.review]`; off by
    /// default). See [`crate::review`].
    pub review: ReviewConfig,
    /// Records of requests with a `request_id`, replayed to their retries
    /// (`[router.idempotency]`: `retention` 24 h, `redis_url` to share them between replicas; in
    /// the process by default). See [`crate::replay`].
    pub idempotency: IdempotencyConfig,
    /// Asynchronous jobs (`[router.jobs]`: queue, workers, capacity; see [`crate::jobs`]).
    pub jobs: crate::jobs::JobsConfig,
    /// The OpenAI-compatible HTTP edge (`[router.http]`: `listen`, default `127.0.0.1:50057`,
    /// `""` off; see [`crate::openai::edge`]).
    pub http: crate::openai::edge::HttpConfig,
    /// The response cache (`[router.cache]`: `enabled` false, `ttl` 1h, `max_entry_bytes`
    /// 256 KiB, `redis_url` to share entries between replicas; in the process by default). See
    /// [`crate::cache`].
    pub cache: crate::cache::CacheConfig,
    /// Each tenant's plan (`[router.plans]`, `acme = "pro"`), for the `plans` condition of
    /// routing rules. Empty by default: no tenant has a plan.
    pub plans: BTreeMap<String, String>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: DEFAULT_LISTEN,
            inference_url: DEFAULT_INFERENCE_URL.to_string(),
            session_url: DEFAULT_SESSION_URL.to_string(),
            budget_url: DEFAULT_BUDGET_URL.to_string(),
            budget: BudgetPolicy::default(),
            routes: BTreeMap::new(),
            auth: AuthConfig::default(),
            rate_limit: RateLimitConfig::default(),
            client: Clients::default(),
            idempotency: IdempotencyConfig::default(),
            review: ReviewConfig::default(),
            jobs: crate::jobs::JobsConfig::default(),
            http: crate::openai::edge::HttpConfig::default(),
            cache: crate::cache::CacheConfig::default(),
            plans: BTreeMap::new(),
        }
    }
}

/// One route alias: `[router.routes.<alias>]`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RouteSpec {
    /// Catalog models in order of preference: the first is the primary, the rest are tried in
    /// order when the ones before them fail (see [`crate::fallback`]). At least one; no model
    /// twice.
    pub models: Vec<String>,
    /// Human-readable description.
    pub description: String,
    /// The answer given when every model failed with a fallback-worthy error. Unset: the last
    /// model's error is returned.
    pub degraded: Option<DegradedSpec>,
    /// A share of the route's traffic that tries a new model first.
    pub canary: Option<CanarySpec>,
    /// The route's cheaper tier: catalog models in order of preference (primary first, then its
    /// fallbacks) that serve tenants whose spend is above their soft budget limit, instead of
    /// `models` (and the canary). Empty (the default): the route is never steered. Only used when
    /// `router.budget_url` is set. Sugar for a tier `economy` and a last rule `economy` with
    /// `budget = "soft_limit_reached"` (see [`crate::rules`]).
    pub economy: Vec<String>,
    /// Named tiers (`tiers = { fast = ["sim-small"] }`): catalog models in order of preference,
    /// picked by `rules`. Empty by default.
    pub tiers: BTreeMap<String, Vec<String>>,
    /// Rules picking a tier per request, in order (`[[router.routes.<alias>.rules]]`; see
    /// [`crate::rules`]). None by default: the route's `models` serve every request.
    pub rules: Vec<crate::rules::RuleSpec>,
}

/// `[router.budget]`: how the router behaves when the budget service cannot answer.
///
/// "Cannot answer" means UNAVAILABLE (the service or its Redis is down, its circuit breaker in the
/// router is open, its bulkhead is full) or DEADLINE_EXCEEDED. Answers from a working budget
/// service (RESOURCE_EXHAUSTED when the budget is spent, FAILED_PRECONDITION for a model without a
/// price) always apply.
///
/// - **Fail closed** (the default): the request is refused with UNAVAILABLE, reason
///   `BUDGET_UNAVAILABLE`, before any model runs. Spend can then never pass a limit unseen.
/// - **Fail open** (`fail_open = true`, globally or per tenant): the request is served without a
///   reservation, its spend is not recorded (`cost_micros` 0), and the answer carries a
///   `BUDGET_UNAVAILABLE` notice. For tenants whose availability matters more than an exact
///   spend figure.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BudgetPolicy {
    /// Serve tenants without their own setting when the budget service cannot answer (default
    /// false: refuse them; `WEIR_ROUTER__BUDGET__FAIL_OPEN`).
    pub fail_open: bool,
    /// Per-tenant overrides (`[router.budget.tenants.<tenant>]`), by tenant id.
    pub tenants: BTreeMap<String, TenantBudgetPolicy>,
}

/// `[router.budget.tenants.<tenant>]`: one tenant's override of [`BudgetPolicy`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TenantBudgetPolicy {
    /// Whether this tenant is served when the budget service cannot answer; unset means the
    /// table's `fail_open`.
    pub fail_open: Option<bool>,
}

impl Default for BudgetPolicy {
    fn default() -> Self {
        Self {
            fail_open: DEFAULT_BUDGET_FAIL_OPEN,
            tenants: BTreeMap::new(),
        }
    }
}

impl BudgetPolicy {
    /// Whether `tenant` is served unmetered when the budget service cannot answer.
    pub fn fail_open_for(&self, tenant: &str) -> bool {
        self.tenants
            .get(tenant)
            .and_then(|t| t.fail_open)
            .unwrap_or(self.fail_open)
    }

    /// Checks the tenant ids, naming the bad key (`router.budget.tenants.<id>`).
    pub fn validate(&self) -> Result<(), ConfigError> {
        for tenant in self.tenants.keys() {
            if weir_mesh::tenant::Tenant::new(tenant).is_err() {
                return Err(ConfigError::invalid(
                    format!("router.budget.tenants.{tenant}"),
                    "tenant ids are 1 to 64 letters, digits, '-', '_' or '.'",
                ));
            }
        }
        Ok(())
    }
}

/// Text of the default refusal.
pub const DEFAULT_REFUSAL: &str = "I can't help with that right now. Please try again later.";

/// A route's degraded answer: `degraded = { kind = "fixed" | "echo" | "refusal", text = "..." }`.
///
/// Each suits a use case: a fixed apology for chat, the original input echoed back for
/// translation or rewriting (the untranslated text beats an error), a refusal for moderation
/// (default to safe).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum DegradedSpec {
    /// A fixed text.
    Fixed {
        /// The text (required, non-empty).
        text: String,
    },
    /// The content of the request's last user message, unchanged.
    Echo,
    /// A refusal (default text [`DEFAULT_REFUSAL`]).
    Refusal {
        /// The refusal text.
        #[serde(default = "default_refusal")]
        text: String,
    },
}

fn default_refusal() -> String {
    DEFAULT_REFUSAL.to_string()
}

/// A canary split: `canary = { model = "sim-new", weight = 0.05 }`.
///
/// A `weight` share of the route's requests (0 to 1) try `model` first; if it fails they fall
/// back to the route's models in order, so a bad canary costs latency, not errors. Requests with
/// a `session_id` are assigned by a hash of it (a conversation stays on one model); others by a
/// counter, so exactly `weight` of them go to the canary.
///
/// Every `interval` the canary's calls are compared with the primary's; after `failed_checks`
/// failed checks in a row its weight drops to 0 until an operator resumes it (see
/// [`crate::canary`]). Each key has an environment override, e.g.
/// `WEIR_ROUTER__ROUTES__AUTO__CANARY__INTERVAL`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CanarySpec {
    /// The new model (a catalog model not among the route's `models`).
    pub model: String,
    /// Share of requests, 0 to 1 (default 0).
    pub weight: f64,
    /// How often the canary is checked against the primary, over the calls since the last check
    /// (default [`canary::DEFAULT_INTERVAL`], 30s; at least 100ms).
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    /// Failed checks in a row that roll the canary back (default
    /// [`canary::DEFAULT_FAILED_CHECKS`], 3; at least 1).
    pub failed_checks: u32,
    /// Fewest canary calls a check needs to judge; a check with fewer is skipped, neither pass nor
    /// fail (default [`canary::DEFAULT_MIN_REQUESTS`], 20; at least 1).
    pub min_requests: u64,
    /// How far the canary's error rate may exceed the primary's, as a fraction (default
    /// [`canary::DEFAULT_MAX_ERROR_RATE_INCREASE`], 0.05: five percentage points; 0 to 1).
    pub max_error_rate_increase: f64,
    /// Most the canary's p95 success latency may be, as a multiple of the primary's (default
    /// [`canary::DEFAULT_MAX_LATENCY_RATIO`], 1.5; at least 1).
    pub max_latency_ratio: f64,
    /// A canary p95 at or below this always passes the latency test, so that fast models whose
    /// latency is mostly noise do not flap (default [`canary::DEFAULT_LATENCY_FLOOR`], 50ms).
    #[serde(with = "humantime_serde")]
    pub latency_floor: Duration,
    /// Promotion: after `promote_after` passed checks in a row the current weight grows by this
    /// much, up to `max_weight` (default [`canary::DEFAULT_STEP_WEIGHT`], 0: never promoted; 0
    /// to 1).
    pub step_weight: f64,
    /// The most promotion raises the weight to (default [`canary::DEFAULT_MAX_WEIGHT`], 0.5; from
    /// `weight` to 1 when `step_weight` is set).
    pub max_weight: f64,
    /// Passed checks in a row before each promotion step (default
    /// [`canary::DEFAULT_PROMOTE_AFTER`], 1; at least 1).
    pub promote_after: u32,
}

impl Default for CanarySpec {
    fn default() -> Self {
        Self {
            model: String::new(),
            weight: 0.0,
            interval: canary::DEFAULT_INTERVAL,
            failed_checks: canary::DEFAULT_FAILED_CHECKS,
            min_requests: canary::DEFAULT_MIN_REQUESTS,
            max_error_rate_increase: canary::DEFAULT_MAX_ERROR_RATE_INCREASE,
            max_latency_ratio: canary::DEFAULT_MAX_LATENCY_RATIO,
            latency_floor: canary::DEFAULT_LATENCY_FLOOR,
            step_weight: canary::DEFAULT_STEP_WEIGHT,
            max_weight: canary::DEFAULT_MAX_WEIGHT,
            promote_after: canary::DEFAULT_PROMOTE_AFTER,
        }
    }
}

impl Config {
    /// Checks the service URLs and the budget policy, naming the bad key: `inference_url` must be
    /// a usable URL (see [`validate_service_url`]); `session_url` and `budget_url` too, unless
    /// empty (the feature is off).
    pub fn validate(&self) -> Result<(), ConfigError> {
        validate_service_url("router.inference_url", &self.inference_url)?;
        for (key, url) in [
            ("router.session_url", &self.session_url),
            ("router.budget_url", &self.budget_url),
        ] {
            if !url.trim().is_empty() {
                validate_service_url(key, url)?;
            }
        }
        self.budget.validate()?;
        self.cache.validate()?;
        self.review.validate()
    }

    /// The session service URL, or `None` when sessions are off.
    pub fn session_url(&self) -> Option<&str> {
        Some(self.session_url.trim()).filter(|url| !url.is_empty())
    }

    /// The budget service URL, or `None` when budgets are off.
    pub fn budget_url(&self) -> Option<&str> {
        Some(self.budget_url.trim()).filter(|url| !url.is_empty())
    }
}

/// Checks the URL of a service the router calls, configured at `key`: an `http://host[:port]`
/// URL with no path, since gRPC replaces the path with the method's, or a comma-separated list of
/// them (the service's replicas, balanced over: [`weir_mesh::balance`]), naming the bad element.
/// `https://` is refused because this build has no TLS client; a channel to it would fail on every
/// call instead of at start-up.
pub fn validate_service_url(key: &str, urls: &str) -> Result<(), ConfigError> {
    for url in urls.split(',') {
        if url.trim().is_empty() {
            return Err(ConfigError::invalid(
                key,
                format!("{urls:?} has an empty element; separate URLs with single commas"),
            ));
        }
        validate_one_url(key, url)?;
    }
    Ok(())
}

fn validate_one_url(key: &str, url: &str) -> Result<(), ConfigError> {
    let url = url.trim();
    let uri: http::Uri = url
        .parse()
        .map_err(|error| ConfigError::invalid(key, format!("{url:?} is not a URL: {error}")))?;
    match uri.scheme_str() {
        Some("http") => {}
        Some("https") => {
            return Err(ConfigError::invalid(
                key,
                format!(
                    "{url:?}: https is not supported by this build (no TLS client); use http:// \
                     (for example through a TLS-terminating sidecar)"
                ),
            ));
        }
        _ => {
            return Err(ConfigError::invalid(
                key,
                format!("{url:?} must be an http:// URL, such as {DEFAULT_INFERENCE_URL}"),
            ));
        }
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err(ConfigError::invalid(
            key,
            format!("{url:?} has no host; expected http://host:port"),
        ));
    }
    if uri.path_and_query().is_some_and(|p| p.as_str() != "/") {
        return Err(ConfigError::invalid(
            key,
            format!("{url:?} has a path or query, which gRPC would ignore; use http://host:port"),
        ));
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use weir_mesh::config::Source;

    use super::*;

    fn parse(toml: &str) -> Result<Config, ConfigError> {
        Source::from_toml(toml).section("router")
    }

    #[test]
    fn absent_table_is_all_defaults() {
        let config = parse("").unwrap();
        assert_eq!(config, Config::default());
        assert_eq!(config.listen.to_string(), "127.0.0.1:50051");
        assert_eq!(config.inference_url, "http://127.0.0.1:50052");
        assert!(config.routes.is_empty());
        config.validate().unwrap();
        assert_eq!(config.session_url(), Some(DEFAULT_SESSION_URL));
        assert_eq!(config.budget_url(), None);
        assert!(!config.budget.fail_open_for("anyone"));
    }

    #[test]
    fn routes_parse_in_order() {
        let config = parse(
            r#"
            [router.routes.cheap]
            models = ["sim-small", "sim-large"]
            description = "fast first"
            "#,
        )
        .unwrap();
        let cheap = &config.routes["cheap"];
        assert_eq!(cheap.models, ["sim-small", "sim-large"]);
        assert_eq!(cheap.description, "fast first");
        assert_eq!(config.inference_url, DEFAULT_INFERENCE_URL);
    }

    #[test]
    fn unknown_keys_are_named() {
        let error = parse("[router.routes.auto]\nmodel = [\"x\"]\n")
            .unwrap_err()
            .to_string();
        assert!(error.contains("model"), "{error}");
        let error = parse("[router]\ninference = \"x\"\n")
            .unwrap_err()
            .to_string();
        assert!(error.contains("inference"), "{error}");
    }

    #[test]
    fn bad_inference_urls_name_the_key() {
        for url in [
            "",
            "not a url",
            "127.0.0.1:50052",
            "ftp://127.0.0.1:50052",
            "https://inference:443",
            "http://127.0.0.1:50052/v1",
            "http:///nohost",
        ] {
            let config = Config {
                inference_url: url.to_string(),
                ..Config::default()
            };
            let error = config.validate().expect_err(url).to_string();
            assert!(error.contains("router.inference_url"), "{url}: {error}");
        }
    }

    #[test]
    fn a_list_of_replicas_is_accepted_and_a_bad_element_is_named() {
        let config = Config {
            inference_url: "http://10.0.0.1:50052, http://inference-headless:50052".to_string(),
            ..Config::default()
        };
        config.validate().unwrap();
        for (urls, named) in [
            (
                "http://10.0.0.1:50052,ftp://10.0.0.2:50052",
                "ftp://10.0.0.2:50052",
            ),
            (
                "http://10.0.0.1:50052,,http://10.0.0.2:50052",
                "empty element",
            ),
            ("http://10.0.0.1:50052,", "empty element"),
        ] {
            let config = Config {
                inference_url: urls.to_string(),
                ..Config::default()
            };
            let error = config.validate().expect_err(urls).to_string();
            assert!(error.contains("router.inference_url"), "{urls}: {error}");
            assert!(error.contains(named), "{urls}: {error}");
        }
    }

    #[test]
    fn session_and_budget_urls_are_optional_but_checked_when_set() {
        let config =
            parse("[router]\nsession_url = \"\"\nbudget_url = \"http://budget:50054\"\n").unwrap();
        config.validate().unwrap();
        assert_eq!(config.session_url(), None);
        assert_eq!(config.budget_url(), Some("http://budget:50054"));
        for (key, toml) in [
            ("router.session_url", "session_url = \"session:50053\""),
            ("router.budget_url", "budget_url = \"https://budget:443\""),
            (
                "router.budget_url",
                "budget_url = \"http://budget:50054/v1\"",
            ),
        ] {
            let config = parse(&format!("[router]\n{toml}\n")).unwrap();
            let error = config.validate().expect_err(toml).to_string();
            assert!(error.contains(key), "{toml}: {error}");
        }
    }

    #[test]
    fn fail_open_is_per_tenant_with_a_global_default() {
        let config = parse(
            r#"
            [router.budget]
            fail_open = false
            [router.budget.tenants.tools]
            fail_open = true
            [router.budget.tenants.vip]
            "#,
        )
        .unwrap();
        config.validate().unwrap();
        assert!(config.budget.fail_open_for("tools"));
        assert!(!config.budget.fail_open_for("vip"));
        assert!(!config.budget.fail_open_for("other"));

        let open = parse(
            "[router.budget]\nfail_open = true\n[router.budget.tenants.strict]\nfail_open = false\n",
        )
        .unwrap();
        assert!(open.budget.fail_open_for("other"));
        assert!(!open.budget.fail_open_for("strict"));

        let bad = parse("[router.budget.tenants.\"a b\"]\nfail_open = true\n").unwrap();
        let error = bad.validate().unwrap_err().to_string();
        assert!(error.contains("router.budget.tenants.a b"), "{error}");
        assert!(parse("[router.budget]\nfailopen = true\n").is_err());
    }

    #[test]
    fn the_cache_table_parses_and_is_checked() {
        let config = parse("").unwrap();
        assert!(!config.cache.enabled, "off by default");
        let config = parse(
            "[router.cache]\nenabled = true\nttl = \"5m\"\nmax_entry_bytes = 1024\n\
             redis_url = \"redis://127.0.0.1:6379\"\nkey_prefix = \"t\"\n",
        )
        .unwrap();
        config.validate().unwrap();
        assert!(config.cache.enabled);
        assert_eq!(config.cache.ttl, std::time::Duration::from_secs(300));
        assert_eq!(config.cache.max_entry_bytes, 1024);
        let bad = parse("[router.cache]\nttl = \"0s\"\n").unwrap();
        let error = bad.validate().unwrap_err().to_string();
        assert!(error.contains("router.cache.ttl"), "{error}");
        assert!(parse("[router.cache]\nttl_seconds = 5\n").is_err());
    }

    #[test]
    fn economy_tiers_parse() {
        let config = parse("[router.routes.auto]\nmodels = [\"a\"]\neconomy = [\"b\"]\n").unwrap();
        assert_eq!(config.routes["auto"].economy, ["b"]);
    }

    #[test]
    fn good_inference_urls_pass() {
        for url in [
            "http://127.0.0.1:50052",
            "http://inference:50052/",
            "http://[::1]:50052",
        ] {
            let config = Config {
                inference_url: url.to_string(),
                ..Config::default()
            };
            config.validate().expect(url);
        }
    }
}
