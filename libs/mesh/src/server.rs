//! The gRPC server every Weir service runs on.
//!
//! [`GrpcServer`] adds, to the service's own routes:
//! - gRPC health (`grpc.health.v1.Health`): SERVING for each hosted service and for the empty
//!   name while running; NOT_SERVING as soon as shutdown starts, so load balancers stop sending.
//! - gRPC reflection (v1 and v1alpha) advertising the hosted services, with the descriptors from
//!   weir-proto, so grpcurl works without .proto files.
//! - The server-side stack, outermost first: trace context ([`crate::trace`]: a server span
//!   continuing the caller's trace) → RPC metrics ([`crate::rpc_metrics`]) → deadline
//!   ([`crate::deadline`]: parse `grpc-timeout`, cap it, answer DEADLINE_EXCEEDED) → auth
//!   ([`crate::auth`]: API key or mesh token, on every server; single-tenant dev mode unless
//!   [`GrpcServer::with_auth`] says otherwise) → admission ([`crate::admission`]:
//!   criticality-aware load shedding under an adaptive concurrency limit) → rate limit
//!   ([`crate::ratelimit`], the router only) → the service. Health and reflection are never shed,
//!   authenticated or rate-limited.
//! - In-process channels ([`GrpcServer::local_channel`], [`crate::local`]): the same layered stack
//!   and routes as a tower service, for callers in the same process (the router's HTTP edge, the
//!   router calling co-located services) whose calls must take exactly the walk a socket
//!   caller's take, without a loopback hop.
//! - Graceful shutdown: when the [`CancellationToken`] is cancelled the server reports
//!   NOT_SERVING, waits [`ServerConfig::drain_delay`] (time for load balancers to notice), stops
//!   accepting, and lets in-flight calls finish for up to [`ServerConfig::shutdown_grace`]; calls
//!   still running after that are dropped (their clients see the connection close).

use std::{convert::Infallible, net::SocketAddr, time::Duration};

use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::{
    body::Body,
    server::NamedService,
    service::Routes,
    transport::{Server, server::TcpIncoming},
};
use tonic_health::ServingStatus;
use tower::{Service, ServiceBuilder, ServiceExt};

use crate::{
    admission::{AdmissionConfig, AdmissionController, AdmissionLayer},
    auth::{AuthLayer, Authenticator, Role},
    config::ConfigError,
    deadline::{DeadlineConfig, DeadlineLayer},
    local::{LocalChannel, LocalPublisher},
    ratelimit::RateLimitLayer,
    rpc_metrics::RpcMetricsLayer,
    trace::TraceLayer,
};

/// Default time in-flight calls get to finish after shutdown starts.
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
/// Default time between reporting NOT_SERVING and refusing new connections.
pub const DEFAULT_DRAIN_DELAY: Duration = Duration::ZERO;

/// The `[server]` table: what every Weir server does the same way (shutdown, deadlines,
/// admission). `[server.deadline]` and `[server.admission]` hold the layers' own settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// How long in-flight calls may run after shutdown starts (default 10 s).
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
    /// How long to keep accepting after reporting NOT_SERVING (default 0; set it to a few seconds
    /// behind a load balancer that polls health).
    #[serde(with = "humantime_serde")]
    pub drain_delay: Duration,
    /// Deadline cap per method (`[server.deadline]`; default 60 s for every method).
    pub deadline: DeadlineConfig,
    /// Load shedding and the concurrency limit (`[server.admission]`; AIMD from 100).
    pub admission: AdmissionConfig,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            shutdown_grace: DEFAULT_SHUTDOWN_GRACE,
            drain_delay: DEFAULT_DRAIN_DELAY,
            deadline: DeadlineConfig::default(),
            admission: AdmissionConfig::default(),
        }
    }
}

impl ServerConfig {
    /// Checks the layers' settings, naming the bad key under `server.`.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.deadline.validate("server.deadline")?;
        self.admission.validate("server.admission")
    }
}

/// Errors of a running server.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The reflection service could not be built from the descriptor set (a build bug).
    #[error("gRPC reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    /// The transport failed.
    #[error("gRPC transport: {0}")]
    Transport(#[from] tonic::transport::Error),
    /// The listener's address could not be read.
    #[error("listener: {0}")]
    Io(#[from] std::io::Error),
}

/// `stack` as a [`LocalService`]: its answers' bodies boxed, its errors boxed.
fn local_service<S, B>(stack: S) -> LocalService
where
    S: Service<http::Request<Body>, Response = http::Response<B>> + Clone + Send + Sync + 'static,
    S::Future: Send + 'static,
    S::Error: Into<tower::BoxError>,
    B: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    B::Error: Into<tower::BoxError>,
{
    let boxed =
        ServiceExt::<http::Request<Body>>::map_response(stack, |response| response.map(Body::new));
    let boxed = ServiceExt::<http::Request<Body>>::map_err(boxed, |error: S::Error| {
        LocalError(error.into())
    });
    // A socket carries headers and a body, nothing else: the caller's extensions (its own tenant,
    // deadline, backend key) must not reach the callee's layers, which decide everything from
    // the metadata, as for a caller over the wire.
    LocalService::new(boxed.map_request(|mut request: http::Request<Body>| {
        *request.extensions_mut() = http::Extensions::new();
        request
    }))
}

/// Binds a TCP listener (port 0 picks a free port; read it back with `local_addr`).
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

/// A gRPC server for one or more Weir services, with health, reflection, the server-side
/// resilience stack and graceful shutdown.
#[derive(Debug, Default)]
pub struct GrpcServer {
    routes: tonic::service::RoutesBuilder,
    names: Vec<&'static str>,
    config: ServerConfig,
    /// Name for the admission controller's metrics (the service's config table name).
    label: &'static str,
    authenticator: Authenticator,
    roles: Vec<(String, Role)>,
    rate_limit: Option<RateLimitLayer>,
    /// Where the stack is published for [`LocalChannel`]s, and withdrawn when serving stops.
    publisher: Option<LocalPublisher>,
}

/// A server's whole stack (every layer, then the routes) as an in-process tower service: a
/// `RouterServiceClient::new(local)` calls it as a client over a socket would, minus the socket.
pub type LocalService =
    tower::util::BoxCloneSyncService<http::Request<Body>, http::Response<Body>, LocalError>;

/// Why a [`LocalService`] call failed outside gRPC (a layer's own error; gRPC failures are
/// answers with a status). A named type rather than a bare `BoxError`, which async handlers
/// holding a client of the service could not prove `Send`.
#[derive(Debug)]
pub struct LocalError(tower::BoxError);

impl std::fmt::Display for LocalError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl LocalError {
    pub(crate) fn new(error: impl Into<tower::BoxError>) -> Self {
        Self(error.into())
    }
}

impl std::error::Error for LocalError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&*self.0)
    }
}

impl GrpcServer {
    /// An empty server with the given shutdown behaviour.
    pub fn new(config: ServerConfig) -> Self {
        Self {
            routes: Routes::builder(),
            names: Vec::new(),
            config,
            label: "",
            authenticator: Authenticator::default_tenant(),
            roles: Vec::new(),
            rate_limit: None,
            publisher: None,
        }
    }

    /// A channel to this server for callers in the same process ([`crate::local`]): the server's
    /// whole stack, minus the socket. Calls wait until the server serves and fail with
    /// UNAVAILABLE `UPSTREAM_UNREACHABLE` once it has stopped accepting (after its drain delay).
    /// Every channel of one server shares its layers (one admission limit, one rate limiter).
    pub fn local_channel(&mut self) -> LocalChannel {
        self.publisher
            .get_or_insert_with(LocalPublisher::new)
            .channel()
    }

    /// Names the server in metrics (e.g. `"router"`); the default is the first service's name.
    pub fn with_label(mut self, label: &'static str) -> Self {
        self.label = label;
        self
    }

    /// Authenticates every call with `authenticator` (the stack's keys and mesh identity). The
    /// default is [`Authenticator::default_tenant`]: every caller is the `default` tenant and a
    /// client's `weir-tenant` is dropped, so no server ever trusts a bare header.
    pub fn with_auth(mut self, authenticator: Authenticator) -> Self {
        self.authenticator = authenticator;
        self
    }

    /// Calls of `path` (`/package.Service/Method`) need an API key with `role`
    /// ([`AuthLayer::require_role`]).
    pub fn require_role(mut self, path: impl Into<String>, role: Role) -> Self {
        self.roles.push((path.into(), role));
        self
    }

    /// Rate-limits every call by tenant (the front door only).
    pub fn with_rate_limit(mut self, rate_limit: RateLimitLayer) -> Self {
        self.rate_limit = Some(rate_limit);
        self
    }

    /// Sets the shutdown behaviour (the `[server]` table of `weir.toml`).
    pub fn with_config(mut self, config: ServerConfig) -> Self {
        self.config = config;
        self
    }

    /// The fully qualified names of the hosted services.
    pub fn service_names(&self) -> &[&'static str] {
        &self.names
    }

    /// Hosts a generated tonic service (`FooServiceServer::new(...)`).
    pub fn add_service<S>(mut self, service: S) -> Self
    where
        S: Service<http::Request<Body>, Error = Infallible>
            + NamedService
            + Clone
            + Send
            + Sync
            + 'static,
        S::Response: axum::response::IntoResponse,
        S::Future: Send + 'static,
    {
        self.names.push(S::NAME);
        self.routes.add_service(service);
        self
    }

    /// Serves on `listener` until `shutdown` is cancelled, then drains (see the module doc).
    pub async fn serve(
        mut self,
        listener: TcpListener,
        shutdown: CancellationToken,
    ) -> Result<(), ServeError> {
        let addr = listener.local_addr()?;
        let (reporter, health) = tonic_health::server::health_reporter();
        for name in self.names.iter().copied().chain([""]) {
            reporter
                .set_service_status(name, ServingStatus::Serving)
                .await;
        }
        let mut reflection_v1 = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(weir_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET);
        let mut reflection_v1alpha = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(weir_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET);
        for name in self.names.iter().copied().chain(["grpc.health.v1.Health"]) {
            reflection_v1 = reflection_v1.with_service_name(name);
            reflection_v1alpha = reflection_v1alpha.with_service_name(name);
        }

        let routes = self
            .routes
            .routes()
            .add_service(health)
            .add_service(reflection_v1.build_v1()?)
            .add_service(reflection_v1alpha.build_v1alpha()?);

        let names = self.names.clone();
        let config = self.config.clone();
        let label = if self.label.is_empty() {
            self.names.first().copied().unwrap_or("grpc")
        } else {
            self.label
        };
        let auth = self
            .roles
            .into_iter()
            .fold(AuthLayer::new(self.authenticator), |layer, (path, role)| {
                layer.require_role(path, role)
            });
        let layers = ServiceBuilder::new()
            // One span per call, continuing the caller's trace (W3C traceparent).
            .layer(TraceLayer::server(label))
            // Every answered call counted by code and timed, refusals included.
            .layer(RpcMetricsLayer::new(label))
            // Every call gets a bounded deadline, and handlers find it in their extensions.
            .layer(DeadlineLayer::server(config.deadline.clone()))
            // Decide the caller before admission: it is a hash lookup, admission must see the
            // criticality clamped to what the caller may claim, and unauthenticated calls must
            // not take admission slots from authenticated ones.
            .layer(auth)
            // Shed the least critical calls first when the server is saturated.
            .layer(AdmissionLayer::with_controller(AdmissionController::named(
                &config.admission,
                label,
            )))
            // Only the front door rate-limits tenants.
            .option_layer(self.rate_limit);
        let publisher = self.publisher.take();
        let drain_signal = {
            let shutdown = shutdown.clone();
            let publisher = publisher.clone();
            async move {
                shutdown.cancelled().await;
                for name in names.iter().copied().chain([""]) {
                    reporter
                        .set_service_status(name, ServingStatus::NotServing)
                        .await;
                }
                tracing::info!(%addr, services = ?names, "draining: health is NOT_SERVING");
                tokio::time::sleep(config.drain_delay).await;
                // In-process callers are refused from now on, as new connections are.
                if let Some(publisher) = publisher {
                    publisher.stop();
                }
            }
        };
        tracing::info!(%addr, services = ?self.names, "serving gRPC");
        if let Some(publisher) = &publisher {
            publisher.serve(local_service(
                layers.clone().service(routes.clone().prepare()),
            ));
        }
        let server = Server::builder()
            .layer(layers)
            .add_routes(routes)
            // No Nagle delay: a response larger than one segment would otherwise wait for the
            // client's delayed ACK (~40 ms on Linux).
            .serve_with_incoming_shutdown(
                TcpIncoming::from(listener).with_nodelay(Some(true)),
                drain_signal,
            );
        tokio::pin!(server);
        let deadline = async {
            shutdown.cancelled().await;
            tokio::time::sleep(config.drain_delay + config.shutdown_grace).await;
        };
        tokio::select! {
            result = &mut server => {
                tracing::info!(%addr, "stopped");
                Ok(result?)
            }
            () = deadline => {
                tracing::warn!(
                    %addr,
                    grace = ?config.shutdown_grace,
                    "shutdown grace expired; dropping calls still in flight"
                );
                Ok(())
            }
        }
    }
}
