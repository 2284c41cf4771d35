//! Connections to Redis, where every piece of Weir state that must outlive a process lives.
//!
//! Each stateful service has a `redis_url` setting: when set, its store is Redis; when unset (the
//! `weir up` default) it uses an in-memory store behind the same trait, which loses everything on
//! restart and is never what production or the integration tests run.
//!
//! Keys are `<prefix>:<tenant>:<service>:...`: [`KeySpace`] builds them, so every key carries the
//! tenant and one tenant can never name another's data. The prefix (default [`DEFAULT_PREFIX`])
//! lets several deployments, or several test runs, share one Redis.

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{ErrorKind, RedisError, ServerErrorKind};

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

/// Opens a self-reconnecting connection to `url` (`redis://host:port/db`). The first connection is
/// made now, so a wrong URL fails at start-up; later outages make commands fail (the caller maps
/// them to UNAVAILABLE) and the manager reconnects in the background.
pub async fn connect(url: &str) -> Result<ConnectionManager, ConnectError> {
    let redacted = redact(url);
    let client = redis::Client::open(url).map_err(|source| ConnectError {
        url: redacted.clone(),
        source,
    })?;
    let config = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(DEFAULT_CONNECT_TIMEOUT))
        .set_response_timeout(Some(DEFAULT_RESPONSE_TIMEOUT));
    ConnectionManager::new_with_config(client, config)
        .await
        .map_err(|source| ConnectError {
            url: redacted,
            source,
        })
}

/// Every key matching `pattern` (a Redis glob), with SCAN: unlike KEYS, it never blocks the server
/// for the whole keyspace at once, so it is safe on a large shared Redis. For tests, benchmarks and
/// maintenance; a request path should name its keys instead of searching for them.
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

/// Builds the keys of one service for one tenant: `<prefix>:<tenant>:<service>:<parts...>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeySpace {
    base: String,
}

impl KeySpace {
    /// The key space of `service` (e.g. `"session"`) for `tenant` under `prefix`.
    pub fn new(prefix: &str, tenant: &Tenant, service: &str) -> Self {
        Self {
            base: format!("{prefix}:{tenant}:{service}"),
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
        assert_eq!(keys.key2("s1", "turns"), "weir:acme:session:s1:turns");
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
