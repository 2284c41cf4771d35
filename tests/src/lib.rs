//! The shared harness of Weir's end-to-end tests.
//!
//! [`Mesh`] starts real Weir services (the same launcher `weir up` uses) on `127.0.0.1:0` and
//! hands out gRPC clients over real sockets; [`upstream::Upstream`] (the `weir-test-upstream`
//! crate) is a real HTTP server that speaks the OpenAI protocol. Nothing of Weir's own is mocked.
#![allow(clippy::unwrap_used, clippy::expect_used)]

pub use weir_test_upstream as upstream;

pub mod otlp;

use std::{
    future::Future,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

use tonic::transport::Channel;
use weir::stack::{self, Running, Service, StackConfig};
use weir_mesh::{config::Source, store::RedisConnection};
use weir_proto::{
    budget::budget_service_client::BudgetServiceClient,
    common::{Message, Role},
    inference::inference_service_client::InferenceServiceClient,
    review::review_service_client::ReviewServiceClient,
    router::{CompleteRequest, CompleteStreamRequest, router_service_client::RouterServiceClient},
    session::session_service_client::SessionServiceClient,
};

/// A running set of Weir services on loopback ports. Dropping it shuts them down.
#[derive(Debug)]
pub struct Mesh {
    running: Option<Running>,
}

impl Mesh {
    /// Starts every service with the given `weir.toml` text (listen addresses are replaced by
    /// `127.0.0.1:0`).
    pub async fn start(toml: &str) -> Self {
        Self::start_services(toml, &Service::ALL).await
    }

    /// Starts only `services`.
    pub async fn start_services(toml: &str, services: &[Service]) -> Self {
        Self::start_with(toml, services, |_| {}).await
    }

    /// Starts only `services`, after `adjust` has edited the parsed configuration (listen
    /// addresses are already `127.0.0.1:0`): to point a router at services another `Mesh` runs,
    /// or to restart a service on the address it had.
    pub async fn start_with(
        toml: &str,
        services: &[Service],
        adjust: impl FnOnce(&mut StackConfig),
    ) -> Self {
        let mut config =
            StackConfig::from_source(&Source::from_toml(toml)).expect("test config is valid");
        config.listen_on_any_port(IpAddr::V4(Ipv4Addr::LOCALHOST));
        // Calls between services take real sockets, as between the separate processes of a
        // deployment; tests/tests/in_process.rs turns in-process calls back on.
        config.mesh.in_process = false;
        adjust(&mut config);
        let running = stack::start(config, services, Default::default())
            .await
            .expect("services start");
        Self {
            running: Some(running),
        }
    }

    fn running(&self) -> &Running {
        self.running.as_ref().expect("mesh is running")
    }

    /// `http://127.0.0.1:<port>` of a started service.
    pub fn url(&self, service: Service) -> String {
        self.running()
            .url(service)
            .unwrap_or_else(|| panic!("{service} was not started"))
    }

    /// The address of a started service.
    pub fn addr(&self, service: Service) -> SocketAddr {
        self.running()
            .addr(service)
            .unwrap_or_else(|| panic!("{service} was not started"))
    }

    /// `http://127.0.0.1:<port>` of the reviewer console (the review service runs it unless
    /// `[review.console] listen = ""`).
    pub fn console_url(&self) -> String {
        let addr = self
            .running()
            .console_addr()
            .expect("the review service was started with its console");
        format!("http://{addr}")
    }

    /// The OpenAI base URL of the router's HTTP edge, `http://127.0.0.1:<port>/v1` (the router
    /// runs it unless `[router.http] listen = ""`).
    pub fn openai_url(&self) -> String {
        let addr = self
            .running()
            .openai_addr()
            .expect("the router was started with its HTTP edge");
        format!("http://{addr}/v1")
    }

    /// A channel to a started service.
    pub fn channel(&self, service: Service) -> Channel {
        weir_mesh::client::lazy_channel(&self.url(service)).expect("valid URL")
    }

    /// The in-process inference service: what its simulated models received, its breakers.
    pub fn inference_api(&self) -> &weir_inference::InferenceApi {
        self.running()
            .inference()
            .expect("the inference service was started")
    }

    /// A router client.
    pub fn router(&self) -> RouterServiceClient<Channel> {
        RouterServiceClient::new(self.channel(Service::Router))
    }

    /// An inference client.
    pub fn inference(&self) -> InferenceServiceClient<Channel> {
        InferenceServiceClient::new(self.channel(Service::Inference))
    }

    /// A session service client. Without API keys configured every call is the default
    /// tenant's; with keys, send one with [`with_key`].
    pub fn session(&self) -> SessionServiceClient<Channel> {
        SessionServiceClient::new(self.channel(Service::Session))
    }

    /// A budget service client (the default tenant, or the key's: see [`Mesh::session`]).
    pub fn budget(&self) -> BudgetServiceClient<Channel> {
        BudgetServiceClient::new(self.channel(Service::Budget))
    }

    /// A review service client (see [`Mesh::session`]).
    pub fn review(&self) -> ReviewServiceClient<Channel> {
        ReviewServiceClient::new(self.channel(Service::Review))
    }

    /// Shuts every service down and waits until they have stopped.
    pub async fn stop(mut self) {
        if let Some(running) = self.running.take() {
            running.stop().await.expect("services stop cleanly");
        }
    }
}

impl Drop for Mesh {
    fn drop(&mut self) {
        if let Some(running) = &self.running {
            running.shutdown_token().cancel();
        }
    }
}

/// The Redis the tests use: `WEIR_TEST_REDIS_URL`, default `redis://127.0.0.1:6379`.
pub fn redis_url() -> String {
    std::env::var("WEIR_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_string())
}

/// A Redis key prefix no other test (or test run) uses, so tests sharing one Redis never collide.
pub fn unique_prefix() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!(
        "wtest-{}-{nanos}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// `body` as a request authenticated with the API key `key` (`authorization: Bearer <key>`).
pub fn with_key<T>(body: T, key: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(body);
    request.metadata_mut().insert(
        weir_mesh::metadata::AUTHORIZATION,
        format!("Bearer {key}").parse().expect("a key is ASCII"),
    );
    request
}

/// A connection to the test Redis ([`redis_url`]): one server or, for a `redis+cluster://` URL, a
/// Redis Cluster (the stores' own client, so a test reads and writes where the stores do).
pub async fn redis_connection() -> RedisConnection {
    redis_connection_at(&redis_url()).await
}

/// [`redis_connection`] to `url`.
pub async fn redis_connection_at(url: &str) -> RedisConnection {
    weir_mesh::store::connect(url)
        .await
        .expect("the test Redis is up")
}

/// Deletes every key under `<prefix>:` from the test Redis ([`redis_url`]); returns how many were
/// deleted. For tests and benchmarks: each cleans up its own prefix.
pub async fn delete_prefix(prefix: &str) -> usize {
    delete_prefix_at(&redis_url(), prefix).await
}

/// [`delete_prefix`] on the Redis at `url`: on every master of a cluster, with UNLINK so that a
/// large database is never blocked.
pub async fn delete_prefix_at(url: &str, prefix: &str) -> usize {
    let mut connection = redis_connection_at(url).await;
    let keys = weir_mesh::store::keys_matching(&mut connection, &format!("{prefix}:*"))
        .await
        .expect("the test Redis lists keys");
    // One UNLINK for many keys on a server; on a cluster the keys span slots, and the cluster
    // client splits a multi-key UNLINK by slot itself.
    for batch in keys.chunks(10_000) {
        let _: () = redis::cmd("UNLINK")
            .arg(batch)
            .query_async(&mut connection)
            .await
            .expect("UNLINK");
    }
    keys.len()
}

/// The tenant's total spend, as the budget service reports it to a caller with the API key
/// `key` (`GetSpend` of the tenant scope).
pub async fn tenant_spend(mesh: &Mesh, key: &str) -> i64 {
    mesh.budget()
        .get_spend(with_key(
            weir_proto::budget::GetSpendRequest {
                scope: Some(weir_proto::budget::Scope {
                    kind: weir_proto::budget::ScopeKind::Tenant.into(),
                    id: String::new(),
                }),
                ..Default::default()
            },
            key,
        ))
        .await
        .expect("GetSpend")
        .into_inner()
        .total_micros
}

/// `weir_model_calls_total{model, grpc_code}` from this process's Prometheus recorder (installed
/// by the first call, so call it once before the calls to count).
pub fn model_calls(model: &str, code: &str) -> f64 {
    let text = weir_mesh::telemetry::install_metrics_recorder().render();
    let labels = [
        format!("model=\"{model}\""),
        format!("grpc_code=\"{code}\""),
    ];
    text.lines()
        .filter(|line| line.starts_with("weir_model_calls_total{"))
        .filter(|line| labels.iter().all(|label| line.contains(label.as_str())))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// A user message.
pub fn user(text: &str) -> Message {
    Message {
        role: Role::User as i32,
        content: text.to_string(),
        ..Message::default()
    }
}

/// An assistant message.
pub fn assistant(text: &str) -> Message {
    Message {
        role: Role::Assistant as i32,
        content: text.to_string(),
        ..Message::default()
    }
}

/// A `Complete` request for `model` with one user message.
pub fn complete(model: &str, text: &str) -> CompleteRequest {
    CompleteRequest {
        model: model.to_string(),
        messages: vec![user(text)],
        ..CompleteRequest::default()
    }
}

/// A `CompleteStream` request for `model` with one user message.
pub fn complete_stream(model: &str, text: &str) -> CompleteStreamRequest {
    CompleteStreamRequest {
        model: model.to_string(),
        messages: vec![user(text)],
        ..CompleteStreamRequest::default()
    }
}

/// Polls `check` until it returns true or `timeout` passes; returns whether it became true.
/// Tests use this instead of sleeping a fixed time.
pub async fn eventually<F, Fut>(timeout: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if check().await {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Runs `warm_up` and then `calls` sequential `Complete` calls to `model` through `router`, and
/// returns the latencies of the `calls`, sorted (for benchmarks).
pub async fn time_completes(
    router: &mut RouterServiceClient<Channel>,
    model: &str,
    warm_up: usize,
    calls: usize,
) -> Vec<Duration> {
    for _ in 0..warm_up {
        router
            .complete(complete(model, "warm up"))
            .await
            .expect("warm-up call");
    }
    let mut samples = Vec::with_capacity(calls);
    for i in 0..calls {
        let start = std::time::Instant::now();
        router
            .complete(complete(model, &format!("call {i}")))
            .await
            .expect("timed call");
        samples.push(start.elapsed());
    }
    samples.sort();
    samples
}

/// Prints one benchmark line: `name`, the number of samples, p50, p90, p99 and the largest.
pub fn report(name: &str, mut samples: Vec<Duration>) {
    samples.sort();
    println!(
        "{name:<44} n={:<6} p50={:>8.1?} p90={:>8.1?} p99={:>8.1?} max={:>8.1?}",
        samples.len(),
        percentile(&samples, 0.50),
        percentile(&samples, 0.90),
        percentile(&samples, 0.99),
        samples.last().copied().unwrap_or_default(),
    );
}

/// The `p` quantile (0 to 1) of `sorted` durations.
pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index.min(sorted.len().saturating_sub(1))]
}

/// The ErrorInfo reason of `status` (`OVERLOADED`, `CIRCUIT_OPEN`, ...), empty when it has none.
pub fn reason(status: &tonic::Status) -> String {
    use tonic_types::StatusExt;
    status
        .get_error_details()
        .error_info()
        .map(|info| info.reason.clone())
        .unwrap_or_default()
}

/// The value of `weir_admission_limit{service="<service>"}` in a Prometheus text exposition (from
/// `weir_mesh::telemetry::install_metrics_recorder().render()`).
pub fn admission_limit(exposition: &str, service: &str) -> Option<f64> {
    let label = format!("service=\"{service}\"");
    exposition
        .lines()
        .find(|l| l.starts_with("weir_admission_limit{") && l.contains(&label))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}
