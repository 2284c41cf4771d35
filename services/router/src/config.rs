//! The `[router]` table of `weir.toml`.
//!
//! ```toml
//! [router]
//! listen = "127.0.0.1:50051"               # WEIR_ROUTER__LISTEN
//! inference_url = "http://127.0.0.1:50052" # WEIR_ROUTER__INFERENCE_URL
//!
//! [router.routes.auto]                     # a route alias clients name instead of a model
//! models = ["sim-large", "sim-small"]      # candidates in order: the first is the primary
//! description = "Strong model first, fast model as its fallback"
//! degraded = { kind = "fixed", text = "We are busy; please try again shortly." }
//! canary = { model = "sim-new", weight = 0.05 } # 5% of requests try sim-new first
//! ```
//!
//! Every setting has a default, so the table may be left out. When it defines no route at all,
//! the router provides the route [`DEFAULT_ROUTE`] (`auto`) over [`DEFAULT_ROUTE_MODELS`], keeping
//! only the models present in the catalog (and no route when none is, or when a model is itself
//! named `auto`). Defining any route replaces that default.
//!
//! The edge of the mesh is configured here too: `[router.auth]` (API keys → tenants),
//! `[router.rate_limit]` (per-tenant GCRA, shared through Redis by replicas) and
//! `[router.client]` (retry, breaker, bulkhead and timeouts of the calls to inference); each
//! table's settings and defaults are documented on its type in weir-mesh.
//!
//! The configuration is checked once at start-up, against the model catalog, by
//! [`crate::RouteTable::new`] and [`Config::validate_inference_url`]; a bad value fails with a
//! [`ConfigError`] naming its key, such as `router.routes.auto.models`.

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
};

use serde::{Deserialize, Serialize};
use weir_mesh::{
    auth::AuthConfig, client::ClientConfig, config::ConfigError, ratelimit::RateLimitConfig,
};

/// Default address the router listens on.
pub const DEFAULT_LISTEN: SocketAddr =
    SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::new(127, 0, 0, 1), 50051));
/// Default address of the inference service.
pub const DEFAULT_INFERENCE_URL: &str = "http://127.0.0.1:50052";
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
    /// Route aliases by name (`[router.routes.<alias>]`). Empty means the default `auto` route
    /// (see the module documentation).
    pub routes: BTreeMap<String, RouteSpec>,
    /// Tenant authentication (`[router.auth]`, `[[router.auth.api_keys]]`). With no key
    /// configured every caller is the default tenant.
    pub auth: AuthConfig,
    /// Per-tenant rate limits (`[router.rate_limit]`; 100 requests/s, burst 200 by default;
    /// shared by replicas through Redis when `redis_url` is set).
    pub rate_limit: RateLimitConfig,
    /// The resilience of the router's calls to inference (`[router.client]`: retry, retry
    /// budget, breaker, bulkhead and attempt timeout, per model).
    pub client: ClientConfig,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: DEFAULT_LISTEN,
            inference_url: DEFAULT_INFERENCE_URL.to_string(),
            routes: BTreeMap::new(),
            auth: AuthConfig::default(),
            rate_limit: RateLimitConfig::default(),
            client: ClientConfig::default(),
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
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CanarySpec {
    /// The new model (a catalog model not among the route's `models`).
    pub model: String,
    /// Share of requests, 0 to 1.
    pub weight: f64,
}

impl Config {
    /// Checks `inference_url`: an `http://host[:port]` URL with no path, since gRPC replaces the
    /// path with the method's. `https://` is refused because this build has no TLS client; a
    /// channel to it would fail on every call instead of at start-up.
    pub fn validate_inference_url(&self) -> Result<(), ConfigError> {
        const KEY: &str = "router.inference_url";
        let url = self.inference_url.trim();
        let uri: http::Uri = url
            .parse()
            .map_err(|error| ConfigError::invalid(KEY, format!("{url:?} is not a URL: {error}")))?;
        match uri.scheme_str() {
            Some("http") => {}
            Some("https") => {
                return Err(ConfigError::invalid(
                    KEY,
                    format!(
                        "{url:?}: https is not supported by this build (no TLS client); use \
                         http:// (for example through a TLS-terminating sidecar)"
                    ),
                ));
            }
            _ => {
                return Err(ConfigError::invalid(
                    KEY,
                    format!("{url:?} must be an http:// URL, such as {DEFAULT_INFERENCE_URL}"),
                ));
            }
        }
        if uri.host().is_none_or(str::is_empty) {
            return Err(ConfigError::invalid(
                KEY,
                format!("{url:?} has no host; expected http://host:port"),
            ));
        }
        if uri.path_and_query().is_some_and(|p| p.as_str() != "/") {
            return Err(ConfigError::invalid(
                KEY,
                format!(
                    "{url:?} has a path or query, which gRPC would ignore; use http://host:port"
                ),
            ));
        }
        Ok(())
    }
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
        config.validate_inference_url().unwrap();
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
            let error = config.validate_inference_url().expect_err(url).to_string();
            assert!(error.contains("router.inference_url"), "{url}: {error}");
        }
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
            config.validate_inference_url().expect(url);
        }
    }
}
