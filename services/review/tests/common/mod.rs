//! The shared harness of the review integration tests: a real Redis (`WEIR_TEST_REDIS_URL`,
//! default `redis://127.0.0.1:6379`) and one or more review servers on `127.0.0.1:0` sharing a
//! key prefix no other test uses. Every key under the prefix is deleted when the harness drops
//! (even after a failed assertion), so the shared Redis stays clean.
#![allow(clippy::unwrap_used, clippy::expect_used, dead_code)]

use std::{
    net::SocketAddr,
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

use tokio_util::sync::CancellationToken;
use tonic::{Request, Status, transport::Channel};
use weir_mesh::{
    auth::{ApiKeySpec, AuthConfig, Authenticator, Role},
    metadata::AUTHORIZATION,
};
use weir_proto::{
    common::{Message, Role as MessageRole},
    review::{
        ClaimNextRequest, CreateItemRequest, ReviewItem, SubmitDecisionRequest, Verdict,
        review_service_client::ReviewServiceClient,
    },
};
use weir_review::{Config, ReviewApi};

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
        "wtest-review-{}-{nanos}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// Deletes every key under `<prefix>:` (a server or a cluster: `weir_mesh::store::keys_matching`),
/// synchronously so it also runs from Drop: on a thread of its own with its own runtime, since a
/// test's runtime may be the caller.
pub fn delete_prefix(prefix: &str) -> usize {
    let pattern = format!("{prefix}:*");
    let work = move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            let Ok(mut conn) = weir_mesh::store::connect(&redis_url()).await else {
                return 0;
            };
            let keys = weir_mesh::store::keys_matching(&mut conn, &pattern)
                .await
                .unwrap();
            for key in &keys {
                let _: () = redis::cmd("UNLINK")
                    .arg(key)
                    .query_async(&mut conn)
                    .await
                    .unwrap();
            }
            keys.len()
        })
    };
    std::thread::spawn(work).join().unwrap_or(0)
}

/// Deletes every key under its prefix when dropped (even when a test fails).
pub struct Cleanup(pub String);

impl Drop for Cleanup {
    fn drop(&mut self) {
        delete_prefix(&self.0);
    }
}

/// The tenants of the test servers; each has a key with the `reviewer` role.
pub const TENANTS: [&str; 2] = ["acme", "globex"];

/// The reviewer key of `tenant`.
pub fn key(tenant: &str) -> String {
    format!("{tenant}-review-test-key-0123456789abcdef")
}

/// A key of `acme` without any role.
pub const NO_ROLE_KEY: &str = "acme-plain-key-0123456789abcdef";

pub fn authenticator() -> Authenticator {
    let mut keys: Vec<ApiKeySpec> = TENANTS
        .iter()
        .map(|t| ApiKeySpec {
            id: Some(format!("{t}-rev")),
            ..ApiKeySpec::clear(t, &key(t), &[Role::Reviewer])
        })
        .collect();
    keys.push(ApiKeySpec {
        id: Some("acme-plain".to_string()),
        ..ApiKeySpec::clear("acme", NO_ROLE_KEY, &[])
    });
    Authenticator::from_config(&AuthConfig::with_keys(keys), "auth").unwrap()
}

/// A request authenticated with `key`.
pub fn with_key<T>(key: &str, body: T) -> Request<T> {
    let mut request = Request::new(body);
    request
        .metadata_mut()
        .insert(AUTHORIZATION, format!("Bearer {key}").parse().unwrap());
    request
}

/// A request of `tenant` with its reviewer key.
pub fn req<T>(tenant: &str, body: T) -> Request<T> {
    with_key(&key(tenant), body)
}

/// One running review server.
pub struct Server {
    pub client: ReviewServiceClient<Channel>,
    pub api: ReviewApi,
    pub addr: SocketAddr,
    shutdown: CancellationToken,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// Review servers sharing one Redis prefix.
pub struct Harness {
    pub servers: Vec<Server>,
    pub config: Config,
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.servers.clear();
        if self.config.redis_url.is_some() {
            delete_prefix(&self.config.key_prefix);
        }
    }
}

/// The defaults of the tests: real Redis, unique prefix, a fast sweep, long leases and SLAs
/// unless a test shortens them.
pub fn test_config() -> Config {
    Config {
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        redis_url: Some(redis_url()),
        key_prefix: unique_prefix(),
        sweep_interval: Duration::from_millis(50),
        ..Config::default()
    }
}

pub async fn start_server(config: &Config) -> Server {
    let api = weir_review::api(config).await.unwrap();
    let listener = weir_mesh::server::bind(config.listen).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let shutdown = CancellationToken::new();
    let server = weir_review::server_with(api.clone()).with_auth(authenticator());
    let token = shutdown.clone();
    tokio::spawn(async move {
        server.serve(listener, token).await.unwrap();
    });
    let client = ReviewServiceClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    Server {
        client,
        api,
        addr,
        shutdown,
    }
}

impl Harness {
    pub async fn start() -> Self {
        Self::start_with(1, |_| {}).await
    }

    /// `replicas` servers on one Redis prefix; `adjust` edits the config first.
    pub async fn start_with(replicas: usize, adjust: impl FnOnce(&mut Config)) -> Self {
        let mut config = test_config();
        adjust(&mut config);
        let mut servers = Vec::new();
        for _ in 0..replicas {
            servers.push(start_server(&config).await);
        }
        Self { servers, config }
    }

    /// A client of the first server.
    pub fn client(&self) -> ReviewServiceClient<Channel> {
        self.servers[0].client.clone()
    }

    pub async fn create(
        &self,
        tenant: &str,
        body: CreateItemRequest,
    ) -> Result<ReviewItem, Status> {
        let response = self.client().create_item(req(tenant, body)).await?;
        Ok(response.into_inner().item.unwrap())
    }

    /// Creates an item in `queue` with `priority`.
    pub async fn item(&self, tenant: &str, queue: &str, priority: i32) -> ReviewItem {
        self.create(tenant, new_item(queue, priority))
            .await
            .unwrap()
    }

    pub async fn claim(
        &self,
        tenant: &str,
        queue: &str,
        reviewer: &str,
        lease: Option<Duration>,
    ) -> Result<Option<ReviewItem>, Status> {
        let body = ClaimNextRequest {
            queue: queue.to_string(),
            reviewer: reviewer.to_string(),
            lease_duration: lease.map(|d| prost_types::Duration::try_from(d).unwrap()),
            item_id: String::new(),
        };
        Ok(self
            .client()
            .claim_next(req(tenant, body))
            .await?
            .into_inner()
            .item)
    }

    /// Claims the next item of `queue`, polling until there is one (at most 5 s).
    pub async fn claim_eventually(&self, tenant: &str, queue: &str, reviewer: &str) -> ReviewItem {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            if let Some(item) = self.claim(tenant, queue, reviewer, None).await.unwrap() {
                return item;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "nothing to claim in {queue} after 5 s"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub async fn decide(
        &self,
        tenant: &str,
        item: &ReviewItem,
        verdict: Verdict,
    ) -> Result<ReviewItem, Status> {
        let body = SubmitDecisionRequest {
            item_id: item.id.clone(),
            lease_id: item
                .lease
                .as_ref()
                .map(|l| l.lease_id.clone())
                .unwrap_or_default(),
            verdict: verdict as i32,
            ..SubmitDecisionRequest::default()
        };
        let response = self.client().submit_decision(req(tenant, body)).await?;
        Ok(response.into_inner().item.unwrap())
    }
}

/// A CreateItem of one output in `queue`.
pub fn new_item(queue: &str, priority: i32) -> CreateItemRequest {
    CreateItemRequest {
        queue: queue.to_string(),
        output: Some(Message {
            role: MessageRole::Assistant.into(),
            content: "the answer under review".to_string(),
            ..Message::default()
        }),
        model: "sim-small".to_string(),
        reasons: vec!["pii".to_string()],
        priority,
        ..CreateItemRequest::default()
    }
}

/// The ErrorInfo reason of `status`.
pub fn reason(status: &Status) -> String {
    weir_mesh::ApiError::from_status(status)
        .reason()
        .to_string()
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
