//! Shared harness: a budget server on 127.0.0.1:0 against the real Redis, under a key prefix of
//! its own, and a client.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::{net::SocketAddr, sync::Arc, time::Duration};

use tokio_util::sync::CancellationToken;
use tonic::{Request, transport::Channel};
use weir_budget::{BudgetApi, Config};
use weir_mesh::{
    ApiError,
    auth::{ApiKeySpec, AuthConfig, Authenticator, Role},
    catalog::Catalog,
};
use weir_proto::budget::{self as pb, budget_service_client::BudgetServiceClient};

pub type Client = BudgetServiceClient<Channel>;

pub fn redis_url() -> String {
    std::env::var("WEIR_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

/// A config pointing at the test Redis under a fresh prefix.
pub fn config() -> Config {
    Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        redis_url: Some(redis_url()),
        key_prefix: format!("weir-test-budget-{}", uuid::Uuid::new_v4().simple()),
        sweep_interval: Duration::from_millis(50),
        ..Config::default()
    }
}

pub struct Server {
    pub addr: SocketAddr,
    pub api: BudgetApi,
    pub client: Client,
    pub prefix: String,
    shutdown: CancellationToken,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

pub async fn start(config: Config) -> Server {
    start_with(config, Arc::new(Catalog::default())).await
}

pub async fn start_with(config: Config, catalog: Arc<Catalog>) -> Server {
    let api = weir_budget::api(&config, catalog)
        .await
        .expect("budget api");
    let listener = tokio::net::TcpListener::bind(config.listen).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let shutdown = CancellationToken::new();
    let server = weir_budget::server_with(api.clone()).with_auth(authenticator());
    tokio::spawn(server.serve(listener, shutdown.clone()));
    let client = connect(addr).await;
    Server {
        addr,
        api,
        client,
        prefix: config.key_prefix.clone(),
        shutdown,
    }
}

pub async fn connect(addr: SocketAddr) -> Client {
    let channel = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    BudgetServiceClient::new(channel)
}

/// The tenants the test server has admin keys for.
pub const TENANTS: [&str; 2] = ["acme", "globex"];

/// The API key of `tenant` (one of [`TENANTS`]).
pub fn key(tenant: &str) -> String {
    format!("{tenant}-budget-test-key-0123456789abcdef")
}

/// Keys with the `admin` role (for SetBudget) for every tenant of [`TENANTS`].
pub fn authenticator() -> Authenticator {
    let keys = TENANTS.map(|t| ApiKeySpec::clear(t, &key(t), &[Role::Admin]));
    Authenticator::from_config(&AuthConfig::with_keys(keys.to_vec()), "auth").unwrap()
}

/// A request of `tenant`, authenticated with its API key as an external caller would.
pub fn req<T>(tenant: &str, message: T) -> Request<T> {
    let mut request = Request::new(message);
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {}", key(tenant)).parse().unwrap(),
    );
    request
}

pub fn tenant_scope() -> pb::Scope {
    pb::Scope {
        kind: pb::ScopeKind::Tenant.into(),
        id: String::new(),
    }
}

pub fn user(id: &str) -> pb::Scope {
    pb::Scope {
        kind: pb::ScopeKind::User.into(),
        id: id.into(),
    }
}

pub fn daily(tz: &str) -> pb::Period {
    pb::Period {
        kind: Some(pb::period::Kind::Calendar(pb::CalendarPeriod {
            unit: pb::PeriodUnit::Daily.into(),
            time_zone: tz.into(),
        })),
    }
}

pub async fn set_budget(
    client: &mut Client,
    tenant: &str,
    scope: pb::Scope,
    hard: i64,
    soft_fraction: f64,
) -> pb::Budget {
    client
        .set_budget(req(
            tenant,
            pb::SetBudgetRequest {
                scope: Some(scope),
                hard_limit_micros: hard,
                soft_limit_fraction: soft_fraction,
                period: Some(daily("UTC")),
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .budget
        .unwrap()
}

pub async fn get_budget(client: &mut Client, tenant: &str, scope: pb::Scope) -> pb::Budget {
    client
        .get_budget(req(tenant, pb::GetBudgetRequest { scope: Some(scope) }))
        .await
        .unwrap()
        .into_inner()
        .budget
        .unwrap()
}

pub fn reserve_request(
    request_id: &str,
    scopes: Vec<pb::Scope>,
    amount: i64,
    model: &str,
) -> pb::ReserveRequest {
    pb::ReserveRequest {
        request_id: request_id.into(),
        scopes,
        amount_micros: amount,
        ttl: None,
        model: model.into(),
        price_version: String::new(),
    }
}

pub async fn reserve(
    client: &mut Client,
    tenant: &str,
    request_id: &str,
    scopes: Vec<pb::Scope>,
    amount: i64,
) -> Result<pb::Reservation, ApiError> {
    client
        .reserve(req(
            tenant,
            reserve_request(request_id, scopes, amount, "sim-small"),
        ))
        .await
        .map(|r| r.into_inner().reservation.unwrap())
        .map_err(|s| ApiError::from_status(&s))
}

pub async fn commit_cost(
    client: &mut Client,
    tenant: &str,
    reservation_id: &str,
    request_id: &str,
    cost: i64,
) -> Result<pb::CommitResponse, ApiError> {
    client
        .commit(req(
            tenant,
            pb::CommitRequest {
                reservation_id: reservation_id.into(),
                request_id: request_id.into(),
                usage: None,
                tier: 0,
                cost_micros: Some(cost),
            },
        ))
        .await
        .map(|r| r.into_inner())
        .map_err(|s| ApiError::from_status(&s))
}

/// Polls `check` every 20 ms until it returns true, for at most `within`.
pub async fn eventually<F, Fut>(within: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if check().await {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A connection to the test Redis (a server or a cluster, as `WEIR_TEST_REDIS_URL` says).
pub async fn redis() -> weir_mesh::store::RedisConnection {
    weir_mesh::store::connect(&redis_url()).await.unwrap()
}

/// Deletes every key under `prefix` (best effort), one at a time: on a cluster they are in
/// several slots.
pub async fn cleanup(prefix: &str) {
    let mut conn = redis().await;
    let keys = weir_mesh::store::keys_matching(&mut conn, &format!("{prefix}:*"))
        .await
        .unwrap_or_default();
    for key in keys {
        let _: Result<(), _> = redis::cmd("DEL").arg(key).query_async(&mut conn).await;
    }
}
