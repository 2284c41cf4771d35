//! Where cache entries live: Redis shared by the router's replicas, or the process's memory.
//!
//! Both are exact stores behind [`Lookup`]: an entry is found by its [`CacheKey`] only. A Redis
//! failure is never the caller's problem: the walk serves it as a miss (see the module doc of
//! [`super`]); after one, the store is skipped for [`OUTAGE_PAUSE`] so that an outage costs the
//! requests nothing, not one timeout each.

use std::{
    collections::HashMap,
    fmt,
    sync::Mutex,
    time::{Duration, Instant},
};

use redis::AsyncCommands;
use weir_mesh::store::{ConnectOptions, KeySpace, OutagePause, RedisConnection, connect_lazy};

use super::{CacheKey, Query};

/// Longest a cache read or write may take before it is given up as a miss.
pub const OPERATION_TIMEOUT: Duration = Duration::from_millis(250);
/// Time Redis is left alone after a failure: requests in that window are served as misses at
/// once (and counted `error`).
pub const OUTAGE_PAUSE: Duration = Duration::from_secs(1);
/// Most entries the in-memory store keeps; when full, expired entries are dropped and, if none
/// was, nothing new is stored until one expires.
pub const MEMORY_MAX_ENTRIES: usize = 10_000;

/// Why a store could not answer.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct StoreError(pub String);

/// How entries are found: the exact store looks the key up. A semantic cache would implement this
/// too, finding an entry whose prompt is near the query's (it would need the prompt in the
/// [`Query`], and its own index).
#[tonic::async_trait]
pub trait Lookup: Send + Sync + fmt::Debug {
    /// The entry for `query`, if any.
    async fn find(&self, query: &Query) -> Result<Option<Vec<u8>>, StoreError>;
    /// Keeps `entry` for `query` for `ttl`, replacing any entry it had.
    async fn keep(&self, query: &Query, entry: Vec<u8>, ttl: Duration) -> Result<(), StoreError>;
}

/// An in-memory entry: when it expires, and its bytes.
type Entry = (Instant, Vec<u8>);

/// Entries in the process: lost on restart, not shared between replicas.
#[derive(Debug, Default)]
pub struct MemoryStore {
    entries: Mutex<HashMap<(String, CacheKey), Entry>>,
}

#[tonic::async_trait]
impl Lookup for MemoryStore {
    async fn find(&self, query: &Query) -> Result<Option<Vec<u8>>, StoreError> {
        let entries = self.entries.lock().map_err(|_| poisoned())?;
        Ok(entries
            .get(&(query.tenant.to_string(), query.key))
            .filter(|(expires, _)| *expires > Instant::now())
            .map(|(_, entry)| entry.clone()))
    }

    async fn keep(&self, query: &Query, entry: Vec<u8>, ttl: Duration) -> Result<(), StoreError> {
        let mut entries = self.entries.lock().map_err(|_| poisoned())?;
        let now = Instant::now();
        if entries.len() >= MEMORY_MAX_ENTRIES {
            entries.retain(|_, (expires, _)| *expires > now);
        }
        let id = (query.tenant.to_string(), query.key);
        if entries.len() < MEMORY_MAX_ENTRIES || entries.contains_key(&id) {
            entries.insert(id, (now + ttl, entry));
        }
        Ok(())
    }
}

fn poisoned() -> StoreError {
    StoreError("the in-memory cache lock is poisoned".to_string())
}

/// Entries in Redis, shared by every replica: one string per entry,
/// `<prefix>:{<tenant>}:cache:<key hex>`, expiring with the entry's TTL. Single-key commands only,
/// so a Redis Cluster (`redis+cluster://` URL) serves it as one server does.
pub struct RedisStore {
    connection: RedisConnection,
    prefix: String,
    /// Redis is not asked for [`OUTAGE_PAUSE`] after a failure.
    pause: OutagePause,
}

impl fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisStore")
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

impl RedisStore {
    /// A store over a connection made on first use, so Redis may start after the router (and a
    /// router whose Redis is down starts, serving without a cache).
    pub fn lazy(url: &str, prefix: &str) -> Result<Self, String> {
        let options = ConnectOptions {
            connect_timeout: OPERATION_TIMEOUT,
            response_timeout: OPERATION_TIMEOUT,
            retries: Some(0),
        };
        Ok(Self {
            connection: connect_lazy(url, &options).map_err(|error| error.to_string())?,
            prefix: prefix.to_string(),
            pause: OutagePause::new(OUTAGE_PAUSE),
        })
    }

    fn key(&self, query: &Query) -> String {
        KeySpace::new(&self.prefix, &query.tenant, "cache").key(&query.key.hex())
    }

    /// Runs `operation` unless Redis is paused; a failure pauses it, logged once per pause.
    async fn guarded<T>(
        &self,
        operation: impl Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, StoreError> {
        if self.pause.is_paused() {
            return Err(StoreError("paused after a Redis failure".to_string()));
        }
        let error = match tokio::time::timeout(OPERATION_TIMEOUT, operation).await {
            Ok(Ok(value)) => return Ok(value),
            Ok(Err(error)) => error.to_string(),
            Err(_) => format!("no answer within {OPERATION_TIMEOUT:?}"),
        };
        if self.pause.trip() {
            tracing::warn!(%error, pause = ?OUTAGE_PAUSE, "response cache: Redis failed; serving without the cache");
        } else {
            tracing::debug!(%error, "response cache: Redis failed");
        }
        Err(StoreError(error))
    }
}

#[tonic::async_trait]
impl Lookup for RedisStore {
    async fn find(&self, query: &Query) -> Result<Option<Vec<u8>>, StoreError> {
        let mut connection = self.connection.clone();
        let key = self.key(query);
        self.guarded(async move { connection.get::<_, Option<Vec<u8>>>(key).await })
            .await
    }

    async fn keep(&self, query: &Query, entry: Vec<u8>, ttl: Duration) -> Result<(), StoreError> {
        let mut connection = self.connection.clone();
        let key = self.key(query);
        let ttl_ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX);
        self.guarded(async move { connection.pset_ex::<_, _, ()>(key, entry, ttl_ms).await })
            .await
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use weir_mesh::tenant::Tenant;

    use super::*;

    fn query(tenant: &str, byte: u8) -> Query {
        Query {
            tenant: Tenant::new(tenant).unwrap(),
            key: CacheKey([byte; 32]),
        }
    }

    #[tokio::test]
    async fn memory_entries_are_per_tenant_and_expire() {
        let store = MemoryStore::default();
        store
            .keep(&query("a", 1), b"x".to_vec(), Duration::from_millis(50))
            .await
            .unwrap();
        assert_eq!(
            store.find(&query("a", 1)).await.unwrap(),
            Some(b"x".to_vec())
        );
        assert_eq!(store.find(&query("b", 1)).await.unwrap(), None);
        assert_eq!(store.find(&query("a", 2)).await.unwrap(), None);
        tokio::time::sleep(Duration::from_millis(80)).await;
        assert_eq!(store.find(&query("a", 1)).await.unwrap(), None);
    }

    #[tokio::test]
    async fn an_unreachable_redis_fails_fast_and_pauses() {
        let store = RedisStore::lazy("redis://127.0.0.1:1", "weir").unwrap();
        assert!(store.find(&query("a", 1)).await.is_err());
        let started = Instant::now();
        assert!(store.find(&query("a", 1)).await.is_err());
        assert!(
            started.elapsed() < Duration::from_millis(50),
            "paused: Redis is not asked"
        );
    }
}
