//! weir-router: Weir's front door.
//!
//! Clients call `weir.router.v1.RouterService` (see `proto/weir/router/v1/router.proto`). This
//! version serves the synchronous (`Complete`) and streaming (`CompleteStream`) execution models:
//!
//! - the request's `model` names a catalog model or a route alias ([`route`]); a route is an
//!   ordered list of candidate models whose first entry, the primary, serves the request;
//! - the router checks what it alone can ([`request`]), calls the inference service
//!   ([`inference`]) and answers with what happened: the served model, the requested name, the
//!   route and `served_by`;
//! - a streamed answer is relayed token by token as it arrives ([`relay`]): `start` when the first
//!   upstream event arrives, deltas, `done`; a stream cut short ends with an explicit error, and a
//!   client that goes away cancels the model call.
//!
//! - a request with a `session_id` is answered with the session's history before its new messages,
//!   and the exchange is appended to it afterwards ([`session`]);
//! - with budgets on, each request reserves its worst-case cost before the model call and commits
//!   its actual cost after it; a tenant above its soft limit is steered to the route's economy
//!   tier ([`spend`]); both are settled when the answer ends ([`settlement`]);
//! - with review policies (`[router.review]`, [`review`]), an answer a policy flags is queued at
//!   the review service: withheld until a reviewer decides (blocking; a stream that may be flagged
//!   is held back until its end) or delivered and audited afterwards (post-hoc); see
//!   [`review_gate`].
//!
//! - a route's canary is checked against its primary and rolled back when it fails
//!   ([`canary`]); operators read and resume it through `weir.router.v1.RouteAdminService`
//!   ([`admin`], `admin` role only), and may pause it.
//!
//! Errors from the inference, session and budget services reach the client with their code and
//! `google.rpc` details (reason, RetryInfo, BadRequest, QuotaFailure) intact. Asynchronous jobs
//! ([`jobs`]) are queued and run by workers through `Complete`; batches land with their own issue,
//! and the batch RPCs answer UNIMPLEMENTED until then.
//!
//! [`server`] validates the `[router]` table ([`Config`]) against the model catalog and builds the
//! server; the same library is served alone by `weir serve router` and together by `weir up`.
#![warn(missing_docs)]

pub mod admin;
mod api;
pub mod cache;
pub mod canary;
pub mod clients;
pub mod config;
pub mod fallback;
pub mod inference;
pub mod jobs;
pub mod matching;
pub mod openai;
pub mod prices;
pub mod relay;
pub mod replay;
pub mod request;
pub mod review;
pub mod review_gate;
pub mod route;
pub mod rules;
pub mod session;
pub mod settlement;
pub mod spend;

use std::sync::Arc;

use weir_mesh::{
    auth::{AuthConfig, Authenticator, Role},
    catalog::Catalog,
    client::ClientStack,
    config::ConfigError,
    identity::MeshIdentity,
    local::Dialer,
    ratelimit::{RateLimitLayer, TenantLimiter},
    server::GrpcServer,
};
use weir_proto::{router::router_service_server::RouterServiceServer, service_names};

pub use admin::RouteAdmin;
pub use api::RouterApi;
pub use config::{BudgetPolicy, Config, RouteSpec, TenantBudgetPolicy};
pub use relay::CompleteStream;
pub use route::{Plan, RouteTable};

/// Largest gRPC message the router decodes: 64 MiB, so that one `CreateBatch` can carry a batch
/// of up to 50,000 items (tonic's default, 4 MiB, held about 20,000 short prompts). Every other
/// service keeps tonic's 4 MiB; a `Complete` is still bounded by its model's context window,
/// checked after decoding, and by admission, which bounds how many calls are decoded at once.
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;

/// Validates `config` against `catalog` (naming the bad key, e.g. `router.routes.auto.models`)
/// and builds the router server, ready to `serve(listener, shutdown)`. Callers authenticate with
/// `authenticator` (the stack's `[auth]` keys), and the router's calls to other services are
/// signed with its mesh identity, so they believe the tenant the router authenticated.
///
/// The channels to the inference, session, budget and review services connect on first use, so those may
/// start later; building them needs a Tokio runtime, so call this from within one.
pub fn server(
    config: &Config,
    catalog: Arc<Catalog>,
    authenticator: Authenticator,
) -> Result<GrpcServer, ConfigError> {
    server_with_jobs(config, catalog, authenticator, &Dialer::default()).map(|(server, _)| server)
}

/// [`server`], and the jobs it serves (when `[router.jobs]` is on), for the caller to run
/// workers on ([`jobs::worker::spawn`]) once the router listens. The router reaches the services
/// it calls through `dialer`: in the process for those it hosts ([`weir_mesh::local`]), else
/// over a socket.
pub fn server_with_jobs(
    config: &Config,
    catalog: Arc<Catalog>,
    authenticator: Authenticator,
    dialer: &Dialer,
) -> Result<(GrpcServer, Option<jobs::api::Jobs>), ConfigError> {
    if config.auth != AuthConfig::default() {
        // Never ignore keys silently: they would not be checked.
        return Err(ConfigError::invalid(
            "router.auth",
            "API keys are now shared by every service: move this table to the top-level [auth]",
        ));
    }
    let api = router_api_with(config, catalog, authenticator.identity().clone(), dialer)?;
    let jobs = api.jobs().cloned();
    let admin = api.route_admin();
    let limiter = TenantLimiter::from_config(&config.rate_limit, "router.rate_limit")?;
    let admin_only = |rpc: &str| format!("/{}/{rpc}", service_names::ROUTE_ADMIN);
    Ok(GrpcServer::default()
        .add_service(RouterServiceServer::new(api).max_decoding_message_size(MAX_MESSAGE_BYTES))
        .add_service(admin.into_service())
        // Reading and changing the routes' state is an operator's job.
        .require_role(admin_only("ListRoutes"), Role::Admin)
        .require_role(admin_only("ResumeCanary"), Role::Admin)
        .require_role(admin_only("PauseCanary"), Role::Admin)
        .with_auth(authenticator)
        // Complete and CompleteStream start while their Redis check runs; they wait for its
        // verdict before the model call (api.rs), so the limit stays exact.
        .with_rate_limit(RateLimitLayer::new(limiter).overlapping(api::RATE_LIMIT_OVERLAPPED)))
    .map(|server| (server, jobs))
}

/// Validates `config` against `catalog` and builds the gRPC implementation, for callers that host
/// it on a server of their own. Needs a Tokio runtime (see [`server`]).
///
/// Each service the router calls gets its own client stack built from its own table
/// (`[router.client.inference]`, `.session`, `.budget`, `.review`; see [`clients`]): its own settings,
/// breakers, bulkheads and retry budget, so an outage or a burst at one never trips the others.
/// Every call is signed with `identity`.
pub fn router_api(
    config: &Config,
    catalog: Arc<Catalog>,
    identity: MeshIdentity,
) -> Result<RouterApi, ConfigError> {
    router_api_with(config, catalog, identity, &Dialer::default())
}

/// [`router_api`], reaching the services it calls through `dialer` (see [`server_with_jobs`]).
pub fn router_api_with(
    config: &Config,
    catalog: Arc<Catalog>,
    identity: MeshIdentity,
    dialer: &Dialer,
) -> Result<RouterApi, ConfigError> {
    config.validate()?;
    config.client.validate()?;
    let routes = RouteTable::new(config, catalog)?;
    canary::spawn_checks(&routes);
    let policies = review::Policies::new(&config.review, routes.catalog(), &routes)?;
    let stack =
        |settings, key: &str, url: &str| client_stack(settings, key, url, &identity, dialer);
    let inference = stack(
        &config.client.inference,
        "router.inference_url",
        &config.inference_url,
    )?;
    let records = weir_mesh::idempotency::Idempotency::from_config(
        &config.idempotency,
        "router.idempotency",
        "router",
    )?;
    let mut api = RouterApi::new(routes, inference)
        .with_idempotency(records)
        .with_cache(cache::ResponseCache::from_config(&config.cache)?);
    if let Some(store) = jobs::JobStore::from_config(&config.jobs, "router.jobs")? {
        api = api.with_jobs(jobs::api::Jobs::new(store, config.jobs.clone()));
    }
    if let Some(url) = config.session_url() {
        api = api.with_sessions(stack(&config.client.session, "router.session_url", url)?);
    }
    if let Some(url) = config.budget_url() {
        api = api.with_budget(
            stack(&config.client.budget, "router.budget_url", url)?,
            config.budget.clone(),
        )?;
    }
    if let Some(url) = config.review.review_url() {
        api = api.with_reviews(
            stack(&config.client.review, "router.review.review_url", url)?,
            policies,
        );
    }
    Ok(api)
}

/// A client stack with `settings` over the transport `dialer` picks for `url` (configured at
/// `key`; a list of URLs or a host name is balanced over every replica, see
/// [`weir_mesh::balance`]), signing every call with `identity`.
fn client_stack(
    settings: &weir_mesh::client::ClientConfig,
    key: &str,
    url: &str,
    identity: &MeshIdentity,
    dialer: &Dialer,
) -> Result<ClientStack, ConfigError> {
    // The dependency's name (`router.budget_url` → `budget`) labels the balancer's metrics.
    let service = key
        .rsplit('.')
        .next()
        .unwrap_or(key)
        .trim_end_matches("_url");
    let channel = dialer
        .dial_balanced(url, &settings.balance, service)
        .map_err(|error| ConfigError::invalid(key, error.to_string()))?;
    Ok(ClientStack::signed(channel, settings, identity.clone()))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn defaults_build_a_server_hosting_the_router() {
        let server = server(
            &Config::default(),
            Arc::new(Catalog::default()),
            Authenticator::default(),
        )
        .unwrap();
        assert_eq!(
            server.service_names(),
            [service_names::ROUTER, service_names::ROUTE_ADMIN]
        );
    }

    #[tokio::test]
    async fn defaults_provide_the_auto_route() {
        let api = router_api(
            &Config::default(),
            Arc::new(Catalog::default()),
            MeshIdentity::disabled(),
        )
        .unwrap();
        let auto = api.routes().get("auto").unwrap();
        let models: Vec<&str> = auto.candidates().iter().map(|c| c.model()).collect();
        assert_eq!(models, ["sim-large", "sim-small"]);
    }

    fn build_error(config: &Config) -> String {
        server(
            config,
            Arc::new(Catalog::default()),
            Authenticator::default(),
        )
        .err()
        .unwrap()
        .to_string()
    }

    #[tokio::test]
    async fn each_dependency_gets_the_stack_of_its_own_table() {
        use weir_mesh::backend::BackendKey;
        let mut config = Config {
            budget_url: "http://127.0.0.1:1".to_string(),
            ..Config::default()
        };
        config.client.inference.bulkhead.max_concurrent = 4;
        let api = router_api(&config, Arc::new(Catalog::default()), Default::default()).unwrap();
        let limit = |stack: &ClientStack, backend: &str| {
            stack.bulkheads().get(&BackendKey::new(backend)).limit()
        };
        // A burst of model calls can fill the models' compartments, never the bookkeeping's.
        assert_eq!(limit(api.inference_client(), "sim-large"), 4);
        assert_eq!(limit(api.budget_client().unwrap(), "budget"), 1024);
        assert_eq!(limit(api.session_client().unwrap(), "session"), 1024);
        assert!(api.review_client().is_none(), "review is off by default");
        config.review.review_url = "http://127.0.0.1:1".to_string();
        let api = router_api(&config, Arc::new(Catalog::default()), Default::default()).unwrap();
        assert_eq!(limit(api.review_client().unwrap(), "review"), 1024);
    }

    #[tokio::test]
    async fn a_bad_config_fails_naming_its_key() {
        let config = Config {
            inference_url: "inference:50052".to_string(),
            ..Config::default()
        };
        let error = build_error(&config);
        assert!(error.contains("router.inference_url"), "{error}");

        let mut config = Config::default();
        config.routes.insert(
            "auto".to_string(),
            RouteSpec {
                models: vec!["gpt-9".to_string()],
                ..RouteSpec::default()
            },
        );
        let error = build_error(&config);
        assert!(error.contains("router.routes.auto.models"), "{error}");

        // A review policy's regex is compiled at start-up.
        let mut config = Config::default();
        config.review.review_url = "http://127.0.0.1:1".to_string();
        config.review.policies.push(review::PolicySpec {
            name: "pii".to_string(),
            prompt_regex: Some("(unclosed".to_string()),
            ..review::PolicySpec::default()
        });
        let error = build_error(&config);
        assert!(
            error.contains("router.review.policies[0].prompt_regex"),
            "{error}"
        );

        // Keys are the stack's ([auth]), never silently ignored here.
        let mut config = Config::default();
        config
            .auth
            .api_keys
            .push(weir_mesh::auth::ApiKeySpec::clear("acme", "k", &[]));
        let error = build_error(&config);
        assert!(
            error.contains("router.auth") && error.contains("[auth]"),
            "{error}"
        );
    }
}
