//! Connections to Redis, where every piece of Weir state that must outlive a process lives.
//!
//! Each stateful service has a `redis_url` setting: when set, its store is Redis; when unset (the
//! `weir up` default) it uses an in-memory store behind the same trait, which loses everything on
//! restart and is never what production or the integration tests run.
//!
//! # One server or a cluster
//!
//! A store's URL picks the client ([`connect`], [`connect_lazy`], [`RedisConnection`]):
//!
//! | URL | client |
//! |---|---|
//! | `redis://[user:password@]host:port[/db]`, `rediss://...` (TLS) | one server, through a self-reconnecting connection manager. A managed Redis with failover behind one address (or a Sentinel-managed address) is this form. |
//! | `redis+cluster://[user:password@]host:port[,host:port...]`, `rediss+cluster://...` | Redis Cluster: the listed nodes are seeds, the client learns the slot map from them and follows `MOVED`/`ASK` and failovers by itself. |
//!
//! # Key layout
//!
//! Keys are `<prefix>:{<tenant>}:<service>:...`: [`KeySpace`] builds them, so every key carries the
//! tenant and one tenant can never name another's data. The prefix (default [`DEFAULT_PREFIX`])
//! lets several deployments, or several test runs, share one Redis. The braces are a Redis Cluster
//! *hash tag*: the slot of a key is computed from the tenant alone, so all of a tenant's keys live
//! in one slot, and a Lua script or a `MULTI` over several keys of one tenant never fails with
//! `CROSSSLOT`. On a single server the braces change nothing. Keys that are not a tenant's (a
//! queue shared by every tenant, say) are built by [`KeySpace::shared`] with their own tag; a
//! script may never touch a shared key and a tenant's key together (they may be in different
//! slots). docs/redis.md lists every key.

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::{ClusterClient, ClusterConfig};
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, ErrorKind, Pipeline, RedisError, RedisFuture, ServerErrorKind, Value};

use crate::{error::ApiError, tenant::Tenant};

/// Default key prefix.
pub const DEFAULT_PREFIX: &str = "weir";

/// Default time to establish a connection to Redis.
pub const DEFAULT_CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// Default time a single Redis command may take before the call fails with UNAVAILABLE.
pub const DEFAULT_RESPONSE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// ErrorInfo reason of a call that failed because its service's Redis could not be reached
/// (UNAVAILABLE: the caller may retry; nothing was changed or held).
pub const REDIS_UNAVAILABLE: &str = "REDIS_UNAVAILABLE";

/// The retry delay (RetryInfo) a Redis outage advertises.
pub const REDIS_RETRY_AFTER: std::time::Duration = std::time::Duration::from_secs(1);

/// Skips a Redis store for a while after it failed, so that an outage costs each request an
/// immediate fallback (the local rate limiter, a cache miss) instead of a timeout. Not paused
/// until [`OutagePause::trip`]; a pause ends by itself after its interval, and the next call
/// tries Redis again. Uses Tokio's clock, so tests on a paused clock can step through it.
#[derive(Debug)]
pub struct OutagePause {
    interval: std::time::Duration,
    until: std::sync::Mutex<Option<tokio::time::Instant>>,
}

impl OutagePause {
    /// A gate that pauses for `interval` after each failure.
    pub fn new(interval: std::time::Duration) -> Self {
        Self {
            interval,
            until: std::sync::Mutex::new(None),
        }
    }

    /// Whether Redis is to be left alone now.
    pub fn is_paused(&self) -> bool {
        self.until
            .lock()
            .is_ok_and(|until| until.is_some_and(|until| tokio::time::Instant::now() < until))
    }

    /// Starts (or extends) a pause after a failure. True when no pause was running, so a caller
    /// logs an outage once per pause rather than once per failed request.
    pub fn trip(&self) -> bool {
        let now = tokio::time::Instant::now();
        match self.until.lock() {
            Ok(mut until) => {
                let fresh = until.is_none_or(|until| until <= now);
                *until = Some(now + self.interval);
                fresh
            }
            Err(_) => true,
        }
    }
}

/// Whether a Redis error means "Redis cannot be reached right now" (the connection failed,
/// dropped or timed out; the server is loading, read-only, failing over or its cluster is down)
/// rather than a command Redis refused, which is a bug.
pub fn is_outage(error: &RedisError) -> bool {
    error.is_io_error()
        || error.is_timeout()
        || error.is_connection_dropped()
        || error.is_connection_refusal()
        || error.is_cluster_error()
        || matches!(
            error.kind(),
            ErrorKind::Io
                | ErrorKind::Parse
                | ErrorKind::AuthenticationFailed
                | ErrorKind::ClusterConnectionNotFound
                | ErrorKind::Server(
                    ServerErrorKind::BusyLoading
                        | ServerErrorKind::TryAgain
                        | ServerErrorKind::ClusterDown
                        | ServerErrorKind::MasterDown
                        | ServerErrorKind::ReadOnly
                )
        )
}

/// A Redis failure of `store` (`"session"`, `"review"`, ...) as the error its caller gets, logged:
/// an outage ([`is_outage`]) is UNAVAILABLE [`REDIS_UNAVAILABLE`] with RetryInfo
/// [`REDIS_RETRY_AFTER`]; anything else is INTERNAL.
pub fn redis_error(store: &str, error: &RedisError) -> ApiError {
    if is_outage(error) {
        tracing::warn!(%error, store, "redis unavailable");
        ApiError::unavailable(
            REDIS_UNAVAILABLE,
            format!("the {store} store is unavailable; retry"),
        )
        .with_retry_after(REDIS_RETRY_AFTER)
    } else {
        tracing::error!(%error, store, "redis error");
        ApiError::internal(format!("{store} store error: {error}"))
    }
}

/// Why Redis could not be reached.
#[derive(Debug, thiserror::Error)]
#[error("redis at {url}: {source}")]
pub struct ConnectError {
    /// The URL, without its password.
    pub url: String,
    /// The client's error.
    pub source: redis::RedisError,
}

/// A connection to a store's Redis: one server (through a [`ConnectionManager`], which reconnects
/// by itself) or a Redis Cluster (through the cluster client, which follows the slot map and
/// failovers). Cheap to clone: clones share the underlying multiplexed connections. Every store
/// takes this type, so each works on either deployment unchanged.
#[derive(Clone)]
pub enum RedisConnection {
    /// One Redis server (`redis://`, `rediss://`).
    Single(ConnectionManager),
    /// A Redis Cluster (`redis+cluster://`, `rediss+cluster://`). Boxed: the cluster client's
    /// handle is several times the size of the manager's.
    Cluster(Box<ClusterConnection>),
}

impl std::fmt::Debug for RedisConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Single(_) => "RedisConnection::Single",
            Self::Cluster(_) => "RedisConnection::Cluster",
        })
    }
}

impl RedisConnection {
    /// Whether this is a Redis Cluster connection.
    pub fn is_cluster(&self) -> bool {
        matches!(self, Self::Cluster(_))
    }
}

impl ConnectionLike for RedisConnection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Self::Single(connection) => connection.req_packed_command(cmd),
            Self::Cluster(connection) => connection.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Self::Single(connection) => connection.req_packed_commands(pipeline, offset, count),
            Self::Cluster(connection) => connection.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Self::Single(connection) => connection.get_db(),
            Self::Cluster(connection) => connection.get_db(),
        }
    }
}

/// The URL schemes of a Redis Cluster ([module docs](self)).
const CLUSTER_SCHEMES: [(&str, &str); 2] = [
    ("redis+cluster://", "redis://"),
    ("rediss+cluster://", "rediss://"),
];

/// Whether `url` names a Redis Cluster (`redis+cluster://` or `rediss+cluster://`).
pub fn is_cluster_url(url: &str) -> bool {
    CLUSTER_SCHEMES
        .iter()
        .any(|(scheme, _)| url.trim().starts_with(scheme))
}

/// The seed nodes of a cluster URL, each as a plain `redis://` (or `rediss://`) URL carrying the
/// URL's credentials: `redis+cluster://u:p@a:1,b:2` is `redis://u:p@a:1` and `redis://u:p@b:2`.
/// None when `url` is not a cluster URL.
pub fn cluster_nodes(url: &str) -> Option<Vec<String>> {
    let url = url.trim();
    let (scheme, plain) = CLUSTER_SCHEMES
        .iter()
        .find(|(scheme, _)| url.starts_with(scheme))?;
    let rest = &url[scheme.len()..];
    let (credentials, hosts) = match rest.rfind('@') {
        Some(at) => (&rest[..=at], &rest[at + 1..]),
        None => ("", rest),
    };
    Some(
        hosts
            .split(',')
            .map(str::trim)
            .filter(|host| !host.is_empty())
            .map(|host| format!("{plain}{credentials}{host}"))
            .collect(),
    )
}

/// How a store's connection behaves; [`ConnectOptions::default`] gives the documented defaults.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectOptions {
    /// Time to establish a connection (default [`DEFAULT_CONNECT_TIMEOUT`]).
    pub connect_timeout: std::time::Duration,
    /// Time one command may take before it fails (default [`DEFAULT_RESPONSE_TIMEOUT`]).
    pub response_timeout: std::time::Duration,
    /// Reconnection attempts the client makes within one command before failing it (default
    /// `None`: the client's own default). A store that falls back to something local on an
    /// outage sets 0, so an outage costs one attempt and not a series of them.
    pub retries: Option<usize>,
}

impl Default for ConnectOptions {
    fn default() -> Self {
        Self {
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            response_timeout: DEFAULT_RESPONSE_TIMEOUT,
            retries: None,
        }
    }
}

fn cluster_client(url: &str, options: &ConnectOptions) -> Result<ClusterClient, RedisError> {
    let nodes = cluster_nodes(url).unwrap_or_default();
    if nodes.is_empty() {
        return Err(RedisError::from((
            ErrorKind::InvalidClientConfig,
            "a redis+cluster:// URL lists its seed nodes: redis+cluster://host:port,host:port",
        )));
    }
    let mut builder = ClusterClient::builder(nodes)
        .connection_timeout(options.connect_timeout)
        .response_timeout(options.response_timeout);
    if let Some(retries) = options.retries {
        builder = builder.retries(u32::try_from(retries).unwrap_or(u32::MAX));
    }
    builder.build()
}

fn cluster_config(options: &ConnectOptions) -> ClusterConfig {
    ClusterConfig::new()
        .set_connection_timeout(options.connect_timeout)
        .set_response_timeout(options.response_timeout)
}

fn manager_config(options: &ConnectOptions) -> ConnectionManagerConfig {
    let config = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(options.connect_timeout))
        .set_response_timeout(Some(options.response_timeout));
    match options.retries {
        Some(retries) => config.set_number_of_retries(retries),
        None => config,
    }
}

/// Opens a connection to `url` (a server or a cluster, see the [module docs](self)) with the
/// default [`ConnectOptions`]. The first connection is made now, so a wrong URL or an unreachable
/// Redis fails at start-up; later outages make commands fail (the caller maps them to
/// UNAVAILABLE, see [`redis_error`]) and the client reconnects in the background.
pub async fn connect(url: &str) -> Result<RedisConnection, ConnectError> {
    connect_with(url, &ConnectOptions::default()).await
}

/// [`connect`] with `options`.
pub async fn connect_with(
    url: &str,
    options: &ConnectOptions,
) -> Result<RedisConnection, ConnectError> {
    let error = |source| ConnectError {
        url: redact(url),
        source,
    };
    if is_cluster_url(url) {
        let client = cluster_client(url, options).map_err(error)?;
        let connection = client
            .get_async_connection_with_config(cluster_config(options))
            .await
            .map_err(error)?;
        return Ok(RedisConnection::Cluster(Box::new(connection)));
    }
    let client = redis::Client::open(url).map_err(error)?;
    ConnectionManager::new_with_config(client, manager_config(options))
        .await
        .map(RedisConnection::Single)
        .map_err(error)
}

/// [`connect_with`] without waiting for the first connection: only a malformed URL fails here, and
/// a Redis that is down at start-up makes the first commands fail instead (for stores whose
/// outage a service rides out, such as the rate limiter's and the response cache's, or that may
/// start before Redis). Must run inside a Tokio runtime.
pub fn connect_lazy(url: &str, options: &ConnectOptions) -> Result<RedisConnection, ConnectError> {
    let error = |source| ConnectError {
        url: redact(url),
        source,
    };
    if is_cluster_url(url) {
        let client = cluster_client(url, options).map_err(error)?;
        return Ok(RedisConnection::Cluster(Box::new(
            client.get_pending_async_connection_with_config(cluster_config(options)),
        )));
    }
    let client = redis::Client::open(url).map_err(error)?;
    ConnectionManager::new_lazy_with_config(client, manager_config(options))
        .map(RedisConnection::Single)
        .map_err(error)
}

/// Checks that `url` is a usable Redis URL without connecting: a cluster URL must list at least one
/// seed node and every node must parse. For config validation, which names the key on failure.
pub fn check_url(url: &str) -> Result<(), RedisError> {
    if is_cluster_url(url) {
        return cluster_client(url, &ConnectOptions::default()).map(|_| ());
    }
    redis::Client::open(url).map(|_| ())
}

/// Every key matching `pattern` (a Redis glob), with SCAN: unlike KEYS, it never blocks the server
/// for the whole keyspace at once, so it is safe on a large shared Redis. For tests, benchmarks and
/// maintenance; a request path should name its keys instead of searching for them. On a cluster
/// connection SCAN reaches one node only: use [`scan_all_keys`] there.
pub async fn scan_keys<C>(connection: &mut C, pattern: &str) -> redis::RedisResult<Vec<String>>
where
    C: redis::aio::ConnectionLike + Send,
{
    let mut cursor: u64 = 0;
    let mut keys = Vec::new();
    loop {
        let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(pattern)
            .arg("COUNT")
            .arg(10_000)
            .query_async(connection)
            .await?;
        keys.extend(batch);
        if next == 0 {
            return Ok(keys);
        }
        cursor = next;
    }
}

/// Every key matching `pattern` on `connection`, server or cluster: [`scan_keys`] on one server; on
/// a cluster, `KEYS` on every master, merged (SCAN cursors are per node). For tests, benchmarks
/// and maintenance only: `KEYS` blocks each master for the length of its keyspace walk.
pub async fn keys_matching(
    connection: &mut RedisConnection,
    pattern: &str,
) -> redis::RedisResult<Vec<String>> {
    match connection {
        RedisConnection::Single(single) => scan_keys(single, pattern).await,
        RedisConnection::Cluster(cluster) => {
            use redis::cluster_routing::{MultipleNodeRoutingInfo, ResponsePolicy, RoutingInfo};
            let value = cluster
                .route_command(
                    redis::cmd("KEYS").arg(pattern).clone(),
                    RoutingInfo::MultiNode((
                        MultipleNodeRoutingInfo::AllMasters,
                        Some(ResponsePolicy::CombineArrays),
                    )),
                )
                .await?;
            Ok(redis::from_redis_value(value)?)
        }
    }
}

/// `url` with any password replaced by `***`, for logs and errors.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme_end), Some(at)) if at > scheme_end => {
            let credentials = &url[scheme_end + 3..at];
            match credentials.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..scheme_end + 3], &url[at..]),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}

/// Builds the keys of one service for one tenant: `<prefix>:{<tenant>}:<service>:<parts...>`, or
/// of a space shared by every tenant ([`KeySpace::shared`]). The braces are the Redis Cluster hash
/// tag: every key of one space is in one slot, so scripts over them work on a cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeySpace {
    base: String,
}

impl KeySpace {
    /// The key space of `service` (e.g. `"session"`) for `tenant` under `prefix`:
    /// `<prefix>:{<tenant>}:<service>`.
    pub fn new(prefix: &str, tenant: &Tenant, service: &str) -> Self {
        Self {
            base: format!("{prefix}:{{{tenant}}}:{service}"),
        }
    }

    /// A key space shared by every tenant, `<prefix>:{<service>:<name>}`: one slot of its own
    /// (e.g. a job queue, `KeySpace::shared("weir", "jobs", "interactive")`). Tenant ids cannot
    /// contain `:`, so no tenant's tag can equal a shared space's. A script must not touch a
    /// shared key and a tenant's key together: on a cluster they are in different slots.
    pub fn shared(prefix: &str, service: &str, name: &str) -> Self {
        Self {
            base: format!("{prefix}:{{{service}:{name}}}"),
        }
    }

    /// The key `<base>:<part>`.
    pub fn key(&self, part: &str) -> String {
        format!("{}:{part}", self.base)
    }

    /// The key `<base>:<a>:<b>`.
    pub fn key2(&self, a: &str, b: &str) -> String {
        format!("{}:{a}:{b}", self.base)
    }

    /// The common prefix of every key of this space (for SCAN patterns, escape it first).
    pub fn base(&self) -> &str {
        &self.base
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_pause_starts_at_a_failure_and_ends_after_its_interval() {
        let pause = OutagePause::new(std::time::Duration::from_secs(1));
        assert!(!pause.is_paused());
        assert!(pause.trip(), "the first failure starts a pause");
        assert!(pause.is_paused());
        assert!(!pause.trip(), "a failure during a pause extends it");
        tokio::time::advance(std::time::Duration::from_millis(999)).await;
        assert!(pause.is_paused());
        tokio::time::advance(std::time::Duration::from_millis(2)).await;
        assert!(!pause.is_paused());
        assert!(pause.trip(), "a failure after the pause starts a new one");
    }

    #[test]
    fn an_unreachable_redis_is_unavailable_and_a_refused_command_internal() {
        let refused = RedisError::from(std::io::Error::from(std::io::ErrorKind::ConnectionRefused));
        let error = redis_error("review", &refused);
        assert_eq!(error.code(), tonic::Code::Unavailable);
        assert_eq!(error.reason(), REDIS_UNAVAILABLE);
        assert_eq!(error.retry_after(), Some(REDIS_RETRY_AFTER));
        assert!(error.message().contains("review store"), "{error}");

        let bug = RedisError::from((ErrorKind::Client, "bad script"));
        assert!(!is_outage(&bug));
        assert_eq!(redis_error("session", &bug).code(), tonic::Code::Internal);
    }

    #[test]
    fn keys_carry_prefix_tenant_and_service() {
        let tenant = Tenant::new("acme").unwrap_or_default();
        let keys = KeySpace::new("weir", &tenant, "session");
        assert_eq!(keys.key2("s1", "turns"), "weir:{acme}:session:s1:turns");
        let queue = KeySpace::shared("weir", "jobs", "batch");
        assert_eq!(queue.key("stream"), "weir:{jobs:batch}:stream");
    }

    #[test]
    fn cluster_urls_list_their_seed_nodes_with_the_credentials() {
        assert!(is_cluster_url("redis+cluster://a:1,b:2"));
        assert!(!is_cluster_url("redis://a:1"));
        assert_eq!(
            cluster_nodes("redis+cluster://u:p@a:1, b:2").unwrap_or_default(),
            ["redis://u:p@a:1", "redis://u:p@b:2"]
        );
        assert_eq!(
            cluster_nodes("rediss+cluster://a:1").unwrap_or_default(),
            ["rediss://a:1"]
        );
        assert!(cluster_nodes("redis://a:1").is_none());
        assert!(check_url("redis+cluster://").is_err());
        assert!(check_url("redis+cluster://127.0.0.1:7000,127.0.0.1:7001").is_ok());
        assert!(check_url("redis://127.0.0.1:6379").is_ok());
    }

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(
            redact("redis://user:secret@host:6379/0"),
            "redis://user:***@host:6379/0"
        );
        assert_eq!(redact("redis://127.0.0.1:6379"), "redis://127.0.0.1:6379");
    }
}
