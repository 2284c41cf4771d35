//! The whole Weir stack: its configuration and a launcher for any subset of its services.

use std::{collections::BTreeMap, fmt, net::SocketAddr, path::Path, sync::Arc};

use clap::ValueEnum;
use tokio::{net::TcpListener, task::JoinSet};
use tokio_util::sync::CancellationToken;
use weir_mesh::{
    auth::{AuthConfig, AuthMode, Authenticator},
    catalog::Catalog,
    config::{ConfigError, Source},
    identity::{MeshConfig, MeshIdentity},
    local::Dialer,
    server::{GrpcServer, ServeError, ServerConfig},
    telemetry::TelemetryConfig,
};

/// One of Weir's five services.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, ValueEnum)]
pub enum Service {
    /// The front door (`weir.router.v1.RouterService`).
    Router,
    /// Model backends (`weir.inference.v1.InferenceService`).
    Inference,
    /// Conversation history (`weir.session.v1.SessionService`).
    Session,
    /// Prices and spend (`weir.budget.v1.BudgetService`).
    Budget,
    /// Human review (`weir.review.v1.ReviewService`).
    Review,
    /// Job workers only, calling a router (`weir serve worker`; no port of its own, and not
    /// part of `weir up`, whose router runs workers itself).
    Worker,
}

impl Service {
    /// All services, in the order `weir up` starts them (dependencies first).
    pub const ALL: [Service; 5] = [
        Service::Inference,
        Service::Session,
        Service::Budget,
        Service::Review,
        Service::Router,
    ];

    /// The service's name in config tables and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Service::Router => "router",
            Service::Inference => "inference",
            Service::Session => "session",
            Service::Budget => "budget",
            Service::Review => "review",
            Service::Worker => "worker",
        }
    }
}

impl fmt::Display for Service {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // `pad`, not `write_str`, so `{:<10}` aligns the table `weir up` prints.
        f.pad(self.name())
    }
}

/// Everything in `weir.toml`, each part defaulted.
#[derive(Debug, Clone)]
pub struct StackConfig {
    /// `[models.<name>]`: the model catalog.
    pub catalog: Arc<Catalog>,
    /// `[server]`: shutdown behaviour shared by every service.
    pub server: ServerConfig,
    /// `[telemetry]`: logs, trace export and the metrics endpoint of the process.
    pub telemetry: TelemetryConfig,
    /// `[auth]`: the API keys (tenants, roles, criticality ceilings) every service accepts.
    pub auth: AuthConfig,
    /// `[mesh]`: the secret services vouch for each other's calls with.
    pub mesh: MeshConfig,
    /// `[router]`.
    pub router: weir_router::Config,
    /// `[inference]`.
    pub inference: weir_inference::Config,
    /// `[session]`.
    pub session: weir_session::Config,
    /// `[budget]`.
    pub budget: weir_budget::Config,
    /// `[review]`.
    pub review: weir_review::Config,
    /// `[worker]`: the `weir serve worker` process.
    pub worker: crate::worker::WorkerConfig,
}

impl StackConfig {
    /// Loads `path` (or `$WEIR_CONFIG`, or nothing) with `WEIR_*` overrides.
    pub fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        Self::from_source(&Source::load(path)?)
    }

    /// Reads every section from a source.
    pub fn from_source(source: &Source) -> Result<Self, ConfigError> {
        let server: ServerConfig = source.section("server")?;
        server.validate()?;
        let telemetry: TelemetryConfig = source.section("telemetry")?;
        telemetry.validate()?;
        let mut router: weir_router::Config = source.section("router")?;
        let mut auth: AuthConfig = source.section("auth")?;
        if router.auth != AuthConfig::default() {
            // Keys used to be the router's alone; they still work there, moved to where every
            // service reads them.
            if auth != AuthConfig::default() {
                return Err(ConfigError::invalid(
                    "router.auth",
                    "both [auth] and [router.auth] are set: keys now live in [auth] only; \
                     merge [router.auth] into it",
                ));
            }
            tracing::warn!("[router.auth] is deprecated: move it to the top-level [auth] table");
            auth = std::mem::take(&mut router.auth);
        }
        auth.validate("auth")?;
        let mesh: MeshConfig = source.section("mesh")?;
        mesh.validate("mesh")?;
        Ok(Self {
            catalog: Arc::new(Catalog::from_source(source)?),
            server,
            telemetry,
            auth,
            mesh,
            router,
            inference: source.section("inference")?,
            session: source.section("session")?,
            budget: source.section("budget")?,
            review: source.section("review")?,
            worker: source.section("worker")?,
        })
    }

    /// The configured listen address of a service.
    pub fn listen(&self, service: Service) -> SocketAddr {
        match service {
            Service::Router => self.router.listen,
            Service::Inference => self.inference.listen,
            Service::Session => self.session.listen,
            Service::Budget => self.budget.listen,
            Service::Review => self.review.listen,
            // Never bound: workers call the router and listen on nothing.
            Service::Worker => self.router.listen,
        }
    }

    /// Sets every service's listen address to port 0 on `ip` (tests use 127.0.0.1).
    pub fn listen_on_any_port(&mut self, ip: std::net::IpAddr) {
        let any = SocketAddr::new(ip, 0);
        self.router.listen = any;
        self.inference.listen = any;
        self.session.listen = any;
        self.budget.listen = any;
        self.review.listen = any;
        if self.review.console.listen.is_some() {
            self.review.console.listen = Some(any);
        }
        if self.router.http.listen.is_some() {
            self.router.http.listen = Some(any);
        }
    }
}

/// Why the stack could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A listen address could not be bound.
    #[error(
        "cannot listen on {addr} for the {service} service: {source} (set [{service}] listen in weir.toml or WEIR_{upper}__LISTEN)",
        upper = service.name().to_ascii_uppercase()
    )]
    Bind {
        /// The service.
        service: Service,
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
    /// The configuration is invalid for this service.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The session service could not start (its config or its Redis).
    #[error("session service: {0}")]
    Session(#[from] weir_session::StartError),
    /// The budget service could not start (its config or its Redis).
    #[error("budget service: {0}")]
    Budget(#[from] weir_budget::StartError),
    /// The reviewer console's address could not be bound.
    #[error(
        "cannot listen on {addr} for the reviewer console: {source} (set [review.console] listen in \
         weir.toml or WEIR_REVIEW__CONSOLE__LISTEN; \"\" turns the console off)"
    )]
    ConsoleBind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The OpenAI-compatible HTTP edge's address could not be bound.
    #[error(
        "cannot listen on {addr} for the OpenAI-compatible HTTP edge: {source} (set [router.http] \
         listen in weir.toml or WEIR_ROUTER__HTTP__LISTEN; \"\" turns the edge off)"
    )]
    HttpBind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The review service could not start (its config or its Redis).
    #[error("review service: {0}")]
    Review(#[from] weir_review::StartError),
}

/// A running set of services.
#[derive(Debug)]
pub struct Running {
    /// The router `weir serve worker` calls, when this process runs workers alone.
    worker_router: Option<String>,
    addrs: BTreeMap<Service, SocketAddr>,
    console: Option<SocketAddr>,
    openai: Option<SocketAddr>,
    auth_mode: AuthMode,
    inference: Option<weir_inference::InferenceApi>,
    tasks: JoinSet<(Service, Result<(), ServeError>)>,
    shutdown: CancellationToken,
}

impl Running {
    /// Where `service` listens, if it was started.
    pub fn addr(&self, service: Service) -> Option<SocketAddr> {
        self.addrs.get(&service).copied()
    }

    /// `http://` URL of `service`, if it was started.
    pub fn url(&self, service: Service) -> Option<String> {
        self.addr(service).map(|addr| format!("http://{addr}"))
    }

    /// The router the job workers of `weir serve worker` call (None when this process runs no
    /// workers of its own besides a router's).
    pub fn worker_router(&self) -> Option<&str> {
        self.worker_router.as_deref()
    }

    /// Where the reviewer console listens, when the review service was started with one.
    pub fn console_addr(&self) -> Option<SocketAddr> {
        self.console
    }

    /// Where the OpenAI-compatible HTTP edge listens, when the router was started with one.
    pub fn openai_addr(&self) -> Option<SocketAddr> {
        self.openai
    }

    /// Started services and their addresses, in start order.
    pub fn addrs(&self) -> impl Iterator<Item = (Service, SocketAddr)> + '_ {
        Service::ALL
            .into_iter()
            .filter_map(|s| self.addr(s).map(|a| (s, a)))
    }

    /// The running inference service's implementation, if it was started: what its simulated
    /// models received, its breakers and bulkheads.
    pub fn inference(&self) -> Option<&weir_inference::InferenceApi> {
        self.inference.as_ref()
    }

    /// How the services authenticate callers: `api_keys`, or `default_tenant` (single-tenant dev
    /// mode, no keys configured).
    pub fn auth_mode(&self) -> AuthMode {
        self.auth_mode
    }

    /// The token that stops every service.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Waits until every service has stopped. If one fails, the others are shut down too and the
    /// first error is returned.
    pub async fn wait(mut self) -> Result<(), (Service, ServeError)> {
        let mut first_error = None;
        while let Some(joined) = self.tasks.join_next().await {
            match joined {
                Ok((_, Ok(()))) => {}
                Ok((service, Err(error))) => {
                    tracing::error!(%service, %error, "service failed; stopping the others");
                    self.shutdown.cancel();
                    first_error.get_or_insert((service, error));
                }
                Err(join_error) => {
                    tracing::error!(%join_error, "service task panicked; stopping the others");
                    self.shutdown.cancel();
                }
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// Shuts every service down and waits for them.
    pub async fn stop(self) -> Result<(), (Service, ServeError)> {
        self.shutdown.cancel();
        self.wait().await
    }
}

/// The stack's authenticator: the `[auth]` keys, and the mesh identity services sign and verify
/// calls with. The `[mesh]` secret when configured; else, when this process hosts every service
/// (`weir up`), a random one (no other process needs to verify its tokens); else none, which is
/// only allowed without API keys (every caller is the default tenant anyway).
pub fn authenticator(
    config: &StackConfig,
    services: &[Service],
) -> Result<Authenticator, ConfigError> {
    let authenticator = Authenticator::from_config(&config.auth, "auth")?;
    let identity = match config.mesh.configured_secret("mesh")? {
        Some(secret) => MeshIdentity::new(&secret, &config.mesh),
        None if Service::ALL.iter().all(|s| services.contains(s)) => {
            MeshIdentity::random(&config.mesh)?
        }
        None if authenticator.mode() == AuthMode::ApiKeys => {
            return Err(ConfigError::invalid(
                "mesh.secret",
                "API keys are configured ([auth]) and services run in separate processes, so \
                 they need a shared mesh secret: set [mesh] secret_env (or WEIR_MESH__SECRET) to \
                 the same random string of 32+ characters in every service",
            ));
        }
        None => MeshIdentity::disabled(),
    };
    Ok(authenticator.with_identity(identity))
}

/// `addr` as a client can reach it from this host: a wildcard listen address (`0.0.0.0`, `::`)
/// becomes loopback.
fn loopback(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        ip if !ip.is_unspecified() => addr,
        std::net::IpAddr::V4(_) => SocketAddr::from((std::net::Ipv4Addr::LOCALHOST, addr.port())),
        std::net::IpAddr::V6(_) => SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, addr.port())),
    }
}

/// Starts `services` from `config`, each on its own listener, stopping when `shutdown` is
/// cancelled. All listeners are bound before any service starts, so a port conflict fails fast.
///
/// When the inference service runs in the same process, the router and the session service (which
/// summarizes through it) are pointed at its actual address (so port 0 works, and `weir up` is
/// self-contained). Likewise the router's `session_url`, `budget_url` and `review.review_url` are
/// pointed at the session, budget and review services running in the same process, when they are
/// set: an empty URL keeps that feature off (budgets and review are off unless set).
pub async fn start(
    mut config: StackConfig,
    services: &[Service],
    shutdown: CancellationToken,
) -> Result<Running, StartError> {
    let mut listeners = BTreeMap::new();
    for &service in Service::ALL.iter().filter(|s| services.contains(s)) {
        let addr = config.listen(service);
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| StartError::Bind {
                service,
                addr,
                source,
            })?;
        listeners.insert(service, listener);
    }
    // The reviewer console is part of the review service: bound with it, so a taken port fails
    // the start like any other.
    let console_listener = match config.review.console.listen {
        Some(addr) if listeners.contains_key(&Service::Review) => Some(
            TcpListener::bind(addr)
                .await
                .map_err(|source| StartError::ConsoleBind { addr, source })?,
        ),
        _ => None,
    };
    let console = console_listener
        .as_ref()
        .map(TcpListener::local_addr)
        .transpose()
        .map_err(|source| StartError::ConsoleBind {
            addr: config.review.console.listen.unwrap_or(config.review.listen),
            source,
        })?;
    // The HTTP edge is part of the router: bound with it, likewise.
    let openai_listener = match config.router.http.listen {
        Some(addr) if listeners.contains_key(&Service::Router) => Some(
            TcpListener::bind(addr)
                .await
                .map_err(|source| StartError::HttpBind { addr, source })?,
        ),
        _ => None,
    };
    let openai = openai_listener
        .as_ref()
        .map(TcpListener::local_addr)
        .transpose()
        .map_err(|source| StartError::HttpBind {
            addr: config.router.http.listen.unwrap_or(config.router.listen),
            source,
        })?;
    let mut addrs = BTreeMap::new();
    for (service, listener) in &listeners {
        let addr = listener.local_addr().map_err(|source| StartError::Bind {
            service: *service,
            addr: config.listen(*service),
            source,
        })?;
        addrs.insert(*service, addr);
    }
    if let Some(inference) = addrs.get(&Service::Inference) {
        config.router.inference_url = format!("http://{inference}");
        config.session.inference_url = format!("http://{inference}");
    }
    if let Some(session) = addrs.get(&Service::Session)
        && config.router.session_url().is_some()
    {
        config.router.session_url = format!("http://{session}");
    }
    if let Some(budget) = addrs.get(&Service::Budget)
        && config.router.budget_url().is_some()
    {
        config.router.budget_url = format!("http://{budget}");
    }
    if let Some(review) = addrs.get(&Service::Review)
        && config.router.review.review_url().is_some()
    {
        config.router.review.review_url = format!("http://{review}");
    }

    // Build every server before serving any, so a config error starts nothing.
    let authenticator = authenticator(&config, services)?;
    let identity = authenticator.identity().clone();
    let mut servers: Vec<(Service, GrpcServer, TcpListener)> = Vec::new();
    let mut inference = None;
    let mut router_jobs = None;
    // The HTTP edge calls the router's own stack in the process (every layer, no socket).
    let mut local_router = None;
    // The router is built last, so that it can call the services hosted here in the process
    // (`[mesh] in_process`, weir_mesh::local): their whole stacks, minus the socket.
    let mut dialer = Dialer::default();
    let mut listeners: Vec<_> = listeners.into_iter().collect();
    listeners.sort_by_key(|(service, _)| *service == Service::Router);
    for (service, listener) in listeners {
        let server = match service {
            Service::Router => {
                let (mut server, jobs) = weir_router::server_with_jobs(
                    &config.router,
                    config.catalog.clone(),
                    authenticator.clone(),
                    &dialer,
                )?;
                router_jobs = jobs;
                if openai_listener.is_some() {
                    local_router = Some(server.local_channel());
                }
                server
            }
            Service::Inference => {
                config.inference.validate()?;
                let api = weir_inference::InferenceApi::with_config(
                    config.catalog.clone(),
                    &config.inference,
                );
                inference = Some(api.clone());
                weir_inference::server_with(&config.inference, api)
            }
            Service::Session => {
                weir_session::server(&config.session, config.catalog.clone(), identity.clone())
                    .await?
            }
            Service::Budget => weir_budget::server(&config.budget, config.catalog.clone()).await?,
            Service::Review => weir_review::server(&config.review).await?,
            Service::Worker => continue,
        };
        let mut server = server
            .with_config(config.server.clone())
            .with_label(service.name())
            // Every service authenticates its callers with the same keys and mesh secret.
            .with_auth(authenticator.clone());
        if config.mesh.in_process
            && service != Service::Router
            && let Some(addr) = addrs.get(&service)
        {
            dialer = dialer.with_local(*addr, server.local_channel());
        }
        servers.push((service, server, listener));
    }

    let openai_models = match openai_listener {
        Some(_) => weir_router::openai::edge::model_ids(&config.router, config.catalog.clone())?,
        None => Vec::new(),
    };
    let mut workers = Vec::new();
    // The router's own workers call it on its own port, as any client would.
    if let (Some(jobs), Some(router)) = (&router_jobs, addrs.get(&Service::Router)) {
        let url = format!("http://{}", loopback(*router));
        let count = jobs.config().workers;
        workers.extend(weir_router::jobs::worker::spawn(
            jobs,
            count,
            &url,
            identity.clone(),
            shutdown.clone(),
        )?);
    }
    let worker_router = services
        .contains(&Service::Worker)
        .then(|| config.worker.router_url.clone());
    if worker_router.is_some() {
        workers.extend(crate::worker::start(
            &config.worker,
            &config.router.jobs,
            identity.clone(),
            shutdown.clone(),
        )?);
    }
    let mut tasks = JoinSet::new();
    for worker in workers {
        tasks.spawn(async move {
            if let Err(error) = worker.await {
                tracing::error!(%error, "a job worker panicked");
            }
            (Service::Worker, Ok(()))
        });
    }
    for (service, server, listener) in servers {
        let token = shutdown.clone();
        tasks.spawn(async move { (service, server.serve(listener, token).await) });
    }
    if let (Some(listener), Some(review)) = (console_listener, addrs.get(&Service::Review)) {
        // The console calls the review service's own gRPC port, as any client would.
        let review_url = format!("http://{}", loopback(*review));
        let queues: Vec<String> = config.review.queues.keys().cloned().collect();
        let token = shutdown.clone();
        tasks.spawn(async move {
            let served = weir_review::console::serve(listener, &review_url, queues, token).await;
            (Service::Review, served.map_err(ServeError::from))
        });
    }
    if let (Some(listener), Some(router)) = (openai_listener, local_router) {
        // The edge calls the router's own server stack in the process, as a client over a
        // socket would, so every request takes the gRPC walk (auth, admission, limits,
        // idempotency, budgets) unchanged, without a loopback hop.
        let models = openai_models.clone();
        let authenticator = authenticator.clone();
        let token = shutdown.clone();
        // Uploaded files (OpenAI's Files API) live in the router's job store.
        let files = router_jobs.as_ref().map(|jobs| jobs.store().clone());
        let http = config.router.http.clone();
        tasks.spawn(async move {
            // Calls wait until the router serves, and fail UNAVAILABLE once it has stopped.
            let served = weir_router::openai::edge::serve(
                listener,
                router,
                models,
                authenticator,
                files,
                http,
                token,
            )
            .await;
            (Service::Router, served.map_err(ServeError::from))
        });
    }
    Ok(Running {
        worker_router,
        addrs,
        console,
        openai,
        auth_mode: authenticator.mode(),
        inference,
        tasks,
        shutdown,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    const KEYS: &str = "[[auth.api_keys]]\ntenant = \"acme\"\nkey = \"acme-key-0123456789\"\n";

    fn load(toml: &str) -> Result<StackConfig, ConfigError> {
        StackConfig::from_source(&Source::from_toml(toml))
    }

    #[test]
    fn the_documented_example_config_loads() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/weir.toml");
        let text = std::fs::read_to_string(&path).unwrap();
        load(&text).unwrap();
        // Its commented-out tables are valid too, once uncommented.
        let uncommented: String = text
            .lines()
            .map(|line| match line.strip_prefix("# ") {
                Some(rest) if rest.starts_with('[') || rest.contains(" = ") => rest,
                _ => line,
            })
            .collect::<Vec<_>>()
            .join("\n");
        load(&uncommented).unwrap();
    }

    #[test]
    fn the_kubernetes_config_loads_with_each_deployments_environment() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/k8s/base");
        let text = std::fs::read_to_string(dir.join("weir.toml")).unwrap();
        let config = load(&text).unwrap();
        assert_eq!(config.server.drain_delay, std::time::Duration::from_secs(5));
        // Every WEIR_<TABLE>__<KEY> a Deployment sets names a real key: its values (a secret
        // stands for a Redis URL) applied over the ConfigMap's file, as the environment is.
        for service in ["inference", "session", "budget", "review", "router"] {
            let manifest = std::fs::read_to_string(dir.join(format!("{service}.yaml"))).unwrap();
            let mut table: toml::Table = text.parse().unwrap();
            let lines: Vec<&str> = manifest.lines().collect();
            let mut set = 0;
            for (n, line) in lines.iter().enumerate() {
                let Some(name) = line.trim().strip_prefix("- name: WEIR_") else {
                    continue;
                };
                if name == "CONFIG" || name.starts_with("MESH__") {
                    continue;
                }
                let value = lines
                    .get(n + 1)
                    .and_then(|v| v.trim().strip_prefix("value: "))
                    .map_or("redis://redis:6379", |v| v.trim_matches('"'));
                let path: Vec<String> = name.split("__").map(str::to_ascii_lowercase).collect();
                let (key, tables) = path.split_last().unwrap();
                let mut at = &mut table;
                for part in tables {
                    at = at
                        .entry(part.clone())
                        .or_insert_with(|| toml::Value::Table(toml::Table::new()))
                        .as_table_mut()
                        .unwrap();
                }
                at.insert(key.clone(), toml::Value::String(value.to_string()));
                set += 1;
            }
            assert!(
                set >= 2,
                "{service}.yaml sets its listen address and telemetry"
            );
            let config = load(&toml::to_string(&table).unwrap())
                .unwrap_or_else(|e| panic!("{service}.yaml: {e}"));
            let service = Service::from_str(service, true).unwrap();
            assert_eq!(config.listen(service).ip().to_string(), "0.0.0.0");
        }
    }

    #[test]
    fn zero_config_is_dev_mode_with_a_generated_mesh_secret() {
        let config = load("").unwrap();
        let up = authenticator(&config, &Service::ALL).unwrap();
        assert_eq!(up.mode(), AuthMode::DefaultTenant);
        assert!(up.identity().is_enabled(), "weir up signs its own calls");
        let alone = authenticator(&config, &[Service::Session]).unwrap();
        assert!(
            !alone.identity().is_enabled(),
            "nothing to share a secret with"
        );
    }

    #[test]
    fn keys_in_separate_processes_need_a_mesh_secret() {
        let config = load(KEYS).unwrap();
        assert!(authenticator(&config, &Service::ALL).is_ok());
        let error = authenticator(&config, &[Service::Budget])
            .unwrap_err()
            .to_string();
        assert!(error.contains("`mesh.secret`"), "{error}");
        assert!(error.contains("WEIR_MESH__SECRET"), "{error}");
        let with_secret = format!("{KEYS}[mesh]\nsecret = \"{}\"\n", "s".repeat(32));
        let config = load(&with_secret).unwrap();
        let serve = authenticator(&config, &[Service::Budget]).unwrap();
        assert_eq!(serve.mode(), AuthMode::ApiKeys);
        assert!(serve.identity().is_enabled());
        let short = load("[mesh]\nsecret = \"short\"\n").unwrap();
        let error = authenticator(&short, &Service::ALL)
            .unwrap_err()
            .to_string();
        assert!(error.contains("`mesh.secret`"), "{error}");
    }

    #[test]
    fn router_auth_still_works_but_not_next_to_auth() {
        let old = KEYS.replace("auth.api_keys", "router.auth.api_keys");
        let config = load(&old).unwrap();
        assert_eq!(config.auth.api_keys.len(), 1, "moved to [auth]");
        assert_eq!(config.router.auth, AuthConfig::default());
        let error = load(&format!("{KEYS}{old}")).unwrap_err().to_string();
        assert!(error.contains("`router.auth`"), "{error}");
        let error = load("[auth]\nmode = \"trust_header\"\n")
            .unwrap_err()
            .to_string();
        assert!(error.contains("auth.mode"), "{error}");
    }
}
