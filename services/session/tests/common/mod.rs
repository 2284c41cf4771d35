//! The shared harness of the integration tests: a real Redis (`WEIR_TEST_REDIS_URL`, default
//! `redis://127.0.0.1:6379`), a real weir-inference server as the summarizer, and the session
//! service, all on `127.0.0.1:0`. Each harness uses its own key prefix, so tests never collide,
//! and short TTLs, so what they leave in Redis expires on its own.
#![allow(clippy::unwrap_used, clippy::expect_used, dead_code)]

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Status, transport::Channel};
use weir_inference::InferenceApi;
use weir_mesh::store::RedisConnection;
use weir_mesh::{
    ApiError,
    auth::{self, ApiKeySpec, AuthConfig, Authenticator},
    catalog::{Catalog, ModelSpec, SimSpec},
    identity::MeshIdentity,
    metadata::AUTHORIZATION,
    tenant::Tenant,
};
use weir_proto::{
    common::{Message, Role, ToolCall},
    session::{
        AppendTurnsRequest, AppendTurnsResponse, CreateSessionRequest, ListTurnsRequest, Session,
        Turn, session_service_client::SessionServiceClient,
    },
};
use weir_session::{
    Config, SessionApi,
    store::{RedisStore, SessionRef, redis::SessionKeys},
};

/// Redis used by the tests.
pub fn redis_url() -> String {
    std::env::var("WEIR_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_string())
}

/// A key prefix no other test (or test run) uses.
pub fn unique_prefix() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!(
        "wtest-{}-{nanos}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// Model with a small window so a few dozen turns trigger summarization: context budget 500
/// tokens (600 - 100), threshold 400, 200 kept raw.
pub const TINY: &str = "sim-tiny";
/// Like [`TINY`] but the model takes 300 ms to answer, so a summary is in flight for a while.
pub const SLOW: &str = "sim-slow";
/// Always fails (for summarization failures).
pub const BROKEN: &str = "sim-broken";
/// A simulated model counted with the o200k estimate (another tokenizer family).
pub const O200K: &str = "sim-o200k";

pub fn catalog() -> Arc<Catalog> {
    let mut models: Vec<(String, ModelSpec)> = Catalog::default()
        .iter()
        .map(|(n, s)| (n.to_string(), s.clone()))
        .collect();
    let tiny = ModelSpec {
        context_window: 600,
        max_output_tokens: 100,
        sim: SimSpec {
            output_tokens: 24,
            ..SimSpec::default()
        },
        ..ModelSpec::default()
    };
    models.push((TINY.to_string(), tiny.clone()));
    models.push((
        SLOW.to_string(),
        ModelSpec {
            sim: SimSpec {
                time_to_first_token: Duration::from_millis(300),
                ..tiny.sim.clone()
            },
            ..tiny.clone()
        },
    ));
    models.push((
        BROKEN.to_string(),
        ModelSpec {
            sim: SimSpec {
                error_rate: 1.0,
                ..tiny.sim.clone()
            },
            ..tiny.clone()
        },
    ));
    models.push((
        O200K.to_string(),
        ModelSpec {
            family: Some("o200k".to_string()),
            ..ModelSpec::default()
        },
    ));
    Arc::new(Catalog::new(models))
}

/// A running inference service.
pub struct Inference {
    pub api: InferenceApi,
    pub url: String,
    shutdown: CancellationToken,
}

impl Drop for Inference {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

pub async fn start_inference(catalog: Arc<Catalog>, addr: SocketAddr) -> Inference {
    let api = InferenceApi::new(catalog);
    let listener = weir_mesh::server::bind(addr).await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let shutdown = CancellationToken::new();
    tokio::spawn(
        weir_inference::server_with(&weir_inference::Config::default(), api.clone())
            .serve(listener, shutdown.clone()),
    );
    Inference { api, url, shutdown }
}

/// The session service and everything it needs.
pub struct Harness {
    pub client: SessionServiceClient<Channel>,
    pub api: SessionApi,
    pub inference: Option<Inference>,
    pub config: Config,
    pub catalog: Arc<Catalog>,
    pub redis: RedisConnection,
    /// A second handle on the same keys, for what a test does behind the service's back (late
    /// summary commits).
    pub store: RedisStore,
    shutdown: CancellationToken,
    task: Option<JoinHandle<()>>,
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// The defaults of the tests: real Redis, unique prefix, short TTLs.
pub fn test_config(inference_url: &str) -> Config {
    Config {
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        redis_url: Some(redis_url()),
        key_prefix: unique_prefix(),
        inference_url: inference_url.to_string(),
        default_ttl: Duration::from_secs(600),
        tombstone_ttl: Duration::from_secs(600),
        summary_timeout: Duration::from_secs(10),
        default_model: "sim-small".to_string(),
        ..Config::default()
    }
}

impl Harness {
    pub async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    /// Starts inference and session services; `adjust` edits the session config first.
    pub async fn start_with(adjust: impl FnOnce(&mut Config)) -> Self {
        let catalog = catalog();
        let inference =
            start_inference(catalog.clone(), SocketAddr::from(([127, 0, 0, 1], 0))).await;
        let mut config = test_config(&inference.url);
        adjust(&mut config);
        Self::start_session(config, catalog, Some(inference)).await
    }

    pub async fn start_session(
        config: Config,
        catalog: Arc<Catalog>,
        inference: Option<Inference>,
    ) -> Self {
        let redis = weir_mesh::store::connect(&redis_url()).await.unwrap();
        let store = RedisStore::new(redis.clone(), &config.key_prefix);
        let (client, api, shutdown, task) = serve(&config, catalog.clone()).await;
        Self {
            client,
            api,
            inference,
            config,
            catalog,
            redis,
            store,
            shutdown,
            task: Some(task),
        }
    }

    /// Stops the session server and starts a fresh one (new process state, same Redis).
    pub async fn restart(&mut self) {
        self.shutdown.cancel();
        if let Some(task) = self.task.take() {
            task.await.unwrap();
        }
        let (client, api, shutdown, task) = serve(&self.config, self.catalog.clone()).await;
        self.client = client;
        self.api = api;
        self.shutdown = shutdown;
        self.task = Some(task);
    }

    pub fn keys(&self, tenant: &str, id: &str) -> SessionKeys {
        SessionKeys::new(&self.config.key_prefix, &session_ref(tenant, id))
    }

    /// Every key of session `id` in Redis right now (SCAN over its key pattern; on a cluster,
    /// every master's keys).
    pub async fn scan_session_keys(&self, tenant: &str, id: &str) -> Vec<String> {
        let pattern = format!("{}:{{{tenant}}}:session:s:{id}:*", self.config.key_prefix);
        let mut conn = self.redis.clone();
        let mut keys = weir_mesh::store::keys_matching(&mut conn, &pattern)
            .await
            .unwrap();
        keys.sort();
        keys
    }

    pub async fn pttl(&self, key: &str) -> i64 {
        let mut conn = self.redis.clone();
        redis::cmd("PTTL")
            .arg(key)
            .query_async(&mut conn)
            .await
            .unwrap()
    }

    pub async fn exists(&self, key: &str) -> bool {
        let mut conn = self.redis.clone();
        let n: i64 = redis::cmd("EXISTS")
            .arg(key)
            .query_async(&mut conn)
            .await
            .unwrap();
        n == 1
    }

    pub async fn create(
        &self,
        tenant: &str,
        body: CreateSessionRequest,
    ) -> Result<Session, Status> {
        let mut client = self.client.clone();
        let response = client.create_session(req(tenant, body)).await?;
        Ok(response.into_inner().session.unwrap())
    }

    pub async fn append(
        &self,
        tenant: &str,
        id: &str,
        messages: Vec<Message>,
    ) -> Result<AppendTurnsResponse, Status> {
        let mut client = self.client.clone();
        let body = AppendTurnsRequest {
            session_id: id.to_string(),
            messages,
            ..AppendTurnsRequest::default()
        };
        Ok(client.append_turns(req(tenant, body)).await?.into_inner())
    }

    /// Every raw turn, through ListTurns pages.
    pub async fn all_turns(&self, tenant: &str, id: &str) -> Vec<Turn> {
        let mut client = self.client.clone();
        let mut turns = Vec::new();
        let mut token = String::new();
        loop {
            let page = client
                .list_turns(req(
                    tenant,
                    ListTurnsRequest {
                        session_id: id.to_string(),
                        page_size: 1000,
                        page_token: token.clone(),
                    },
                ))
                .await
                .unwrap()
                .into_inner();
            turns.extend(page.turns);
            if page.next_page_token.is_empty() {
                return turns;
            }
            token = page.next_page_token;
        }
    }

    /// Polls until the summarizer of this process is idle (bounded wait).
    pub async fn summarizer_idle(&self) {
        wait_for(
            "the summarizer to be idle",
            Duration::from_secs(15),
            || async { self.api.summary_stats().running == 0 },
        )
        .await;
    }
}

async fn serve(
    config: &Config,
    catalog: Arc<Catalog>,
) -> (
    SessionServiceClient<Channel>,
    SessionApi,
    CancellationToken,
    JoinHandle<()>,
) {
    let api = weir_session::api(config, catalog, MeshIdentity::disabled())
        .await
        .unwrap();
    let listener = weir_mesh::server::bind(config.listen).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let shutdown = CancellationToken::new();
    let server = weir_session::server_with(api.clone()).with_auth(authenticator());
    let token = shutdown.clone();
    let task = tokio::spawn(async move {
        server.serve(listener, token).await.unwrap();
    });
    let client = SessionServiceClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    (client, api, shutdown, task)
}

pub fn session_ref(tenant: &str, id: &str) -> SessionRef {
    SessionRef::new(Tenant::new(tenant).unwrap(), id)
}

/// The tenants the test server has admin keys for.
pub const TENANTS: [&str; 4] = ["acme", "globex", "tenant-a", "tenant-b"];

/// The API key of `tenant` (one of [`TENANTS`]).
pub fn key(tenant: &str) -> String {
    format!("{tenant}-session-test-key-0123456789abcdef")
}

/// Keys with the `admin` role (for DeleteUserSessions) for every tenant of [`TENANTS`].
pub fn authenticator() -> Authenticator {
    let keys = TENANTS.map(|t| ApiKeySpec::clear(t, &key(t), &[auth::Role::Admin]));
    Authenticator::from_config(&AuthConfig::with_keys(keys.to_vec()), "auth").unwrap()
}

/// A request of `tenant`, authenticated with its API key as an external caller would.
pub fn req<T>(tenant: &str, body: T) -> Request<T> {
    let mut request = Request::new(body);
    request.metadata_mut().insert(
        AUTHORIZATION,
        format!("Bearer {}", key(tenant)).parse().unwrap(),
    );
    request
}

/// Polls `check` every 20 ms until it holds; panics naming `what` after `limit`.
pub async fn wait_for<F, Fut>(what: &str, limit: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if check().await {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub fn message(role: Role, content: &str) -> Message {
    Message {
        role: role.into(),
        content: content.to_string(),
        ..Message::default()
    }
}

pub fn user(content: &str) -> Message {
    message(Role::User, content)
}

pub fn assistant(content: &str) -> Message {
    message(Role::Assistant, content)
}

pub fn tool_call(id: &str) -> Message {
    Message {
        role: Role::Assistant.into(),
        tool_calls: vec![ToolCall {
            id: id.to_string(),
            name: "lookup".to_string(),
            arguments_json: format!("{{\"q\":\"{id}\"}}"),
        }],
        ..Message::default()
    }
}

pub fn tool_result(id: &str, content: &str) -> Message {
    Message {
        role: Role::Tool.into(),
        content: content.to_string(),
        tool_call_id: id.to_string(),
        ..Message::default()
    }
}

/// The ErrorInfo reason and first BadRequest field of a status.
pub fn reason_and_field(status: &Status) -> (String, String) {
    let error = ApiError::from_status(status);
    let field = error
        .field_violations()
        .first()
        .map(|(f, _)| f.clone())
        .unwrap_or_default();
    (error.reason().to_string(), field)
}
