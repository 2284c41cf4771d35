//! Per-tenant rate limits, local or shared by every router replica through Redis.
//!
//! # Why GCRA
//!
//! A tenant gets `requests_per_second` on average with bursts of up to `burst` requests, enforced
//! by the generic cell rate algorithm: each subject keeps one timestamp, the *theoretical arrival
//! time* (TAT) of its next request at the sustained rate, and a request is allowed when it arrives
//! no earlier than `TAT − burst × interval`. That is a token bucket (bursts, then the rate) with
//! one number of state instead of a counter and a refill timer, so the check is exact at any
//! arrival pattern, needs no background refill, and tells a refused caller exactly when the next
//! token comes (`retry-after`).
//!
//! # Local and distributed
//!
//! - Without `redis_url`, limits are kept in the process with `governor` (one keyed limiter by
//!   tenant, plus one limiter per tenant or API key with an override).
//! - With `redis_url`, N router replicas share **one** limit: [`GCRA_SCRIPT`] runs the same
//!   algorithm atomically inside Redis, reading the time from Redis' own `TIME`, so replicas whose
//!   clocks disagree still agree on the limit. It returns limited / remaining / retry-after /
//!   reset-after. Keys are `<key_prefix>:<tenant>:ratelimit` (and
//!   `<key_prefix>:<tenant>:ratelimit:key:<api key id>` for a key with its own limit) and expire
//!   once idle, so an idle tenant costs nothing. When a request is subject to both a tenant and a
//!   key limit, the script checks both and charges both or neither.
//! - A limiter must never take the service down with it: if Redis fails or does not answer within
//!   `redis_timeout` (50 ms), the request is decided by the local limiter at the limit ÷
//!   `replicas` (each replica's fair share of the global limit), the fallback is counted in
//!   `weir_rate_limit_fallback_total`, and a warning is logged at most every
//!   [`FALLBACK_WARN_INTERVAL`]. For `redis_retry_interval` (1 s) after a failure, requests go
//!   straight to the local limiter instead of paying the timeout again; then Redis is tried again.
//!   The request itself is never failed because the limiter's store is down.
//!
//! The tenant's and the key's buckets are two keys of one script call, so on a Redis Cluster
//! they would have to share a hash slot; Weir runs one Redis (possibly with replicas).
//!
//! The configured rate is always the **global** rate of the tenant. Without Redis each replica
//! enforces its share, rate ÷ `replicas` (so with the default `replicas = 1`, a single router
//! enforces exactly the configured rate).
//!
//! # Answers
//!
//! A refused request gets RESOURCE_EXHAUSTED, reason `RATE_LIMITED`, with a QuotaFailure whose
//! subject is `tenant:<id>` (or `api_key:<id>` when a key's own limit refused it) and RetryInfo /
//! `grpc-retry-pushback-ms` = the time until the next token. The tenant is the one the auth layer
//! put in the request's extensions, or the `weir-tenant` header when no auth layer ran. Health
//! checks and reflection are never limited.
//!
//! # Defaults
//!
//! Enabled, 100 requests per second per tenant with bursts of 200, local; override per tenant
//! (`[router.rate_limit.tenants.<tenant>]`) and per API key id (`[router.rate_limit.api_keys.<id>]`,
//! in addition to the tenant's limit).
//!
//! ```toml
//! [router.rate_limit]
//! requests_per_second = 50.0
//! burst = 100
//! redis_url = "redis://127.0.0.1:6379"   # share the limit between replicas
//! replicas = 3                           # each replica's fallback share is 1/3
//!
//! [router.rate_limit.tenants.acme]
//! requests_per_second = 500.0           # burst stays 100 (the global value)
//!
//! [router.rate_limit.api_keys.acme-batch]
//! requests_per_second = 5.0
//! burst = 5
//! ```
//!
//! # Details beyond docs/resilience.md
//!
//! - Per-key limits exist only for the key ids listed under `api_keys`, and apply on top of the
//!   tenant's limit (a key cannot raise its tenant's limit).
//! - Without Redis the local limit is also the configured rate ÷ `replicas`, so `replicas` means
//!   the same thing with and without Redis (default 1: no change).
//! - After a Redis failure the limiter skips Redis for `redis_retry_interval`, so an outage costs
//!   one timeout per second instead of 50 ms on every request.
//!
//! Metrics: `weir_rate_limited_total{tenant}`, `weir_rate_limit_fallback_total`.

use std::{
    collections::{BTreeMap, HashMap},
    fmt,
    future::Future,
    num::NonZeroU32,
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use governor::{
    Quota,
    clock::Clock,
    middleware::NoOpMiddleware,
    nanos::Nanos,
    state::{InMemoryState, NotKeyed, keyed::DashMapStateStore},
};
use http::{Request, Response};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use serde::{Deserialize, Serialize};
use tokio::time::Instant;
use tower::{Layer, Service};

use crate::{
    admission::is_exempt_path,
    auth::ApiKeyId,
    config::ConfigError,
    error::ApiError,
    metadata::TENANT,
    store::{DEFAULT_PREFIX, KeySpace, redact},
    tenant::Tenant,
};

/// Default sustained rate per tenant.
pub const DEFAULT_REQUESTS_PER_SECOND: f64 = 100.0;
/// Default burst per tenant.
pub const DEFAULT_BURST: u32 = 200;
/// Default number of router replicas sharing the limit.
pub const DEFAULT_REPLICAS: u32 = 1;
/// Default time a Redis check may take before the local limiter decides.
pub const DEFAULT_REDIS_TIMEOUT: Duration = Duration::from_millis(50);
/// Default time requests skip Redis after it failed.
pub const DEFAULT_REDIS_RETRY_INTERVAL: Duration = Duration::from_secs(1);
/// Shortest interval between two "Redis unreachable" warnings.
pub const FALLBACK_WARN_INTERVAL: Duration = Duration::from_secs(10);
/// Fewest requests a tenant's last Redis check must have left in its burst for its next request
/// to start while its check runs ([`RateLimitLayer::overlapping`]): a tenant at its limit is
/// checked first, so a flood of refused requests costs no handler work.
pub const OVERLAP_MIN_HEADROOM: u64 = 8;
/// Most tenants whose headroom is remembered (the map is emptied when full).
const MAX_HEADROOM_ENTRIES: usize = 100_000;
/// Time to establish a connection to Redis for rate limiting.
pub const REDIS_CONNECT_TIMEOUT: Duration = Duration::from_millis(500);

/// The Redis GCRA script (see the module doc).
///
/// `KEYS[i]` holds subject i's TAT in microseconds since the epoch. `ARGV[1]` is the cost in
/// tokens; `ARGV[2i]` and `ARGV[2i+1]` are subject i's emission interval (microseconds per token)
/// and burst. Returns `{limited, remaining, retry_after_us, reset_after_us, limiting_index}`.
pub const GCRA_SCRIPT: &str = r#"
if redis.replicate_commands then redis.replicate_commands() end
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000000 + tonumber(clock[2])
local cost = tonumber(ARGV[1])
local remaining = -1
local retry_after = 0
local reset_after = 0
local limiting = 0
local new_tats = {}
for i, key in ipairs(KEYS) do
  local interval = tonumber(ARGV[2 * i])
  local burst = tonumber(ARGV[2 * i + 1])
  local tat = tonumber(redis.call('GET', key) or now)
  if tat < now then tat = now end
  local new_tat = tat + interval * cost
  local diff = now - (new_tat - interval * burst)
  if diff < 0 then
    if limiting == 0 or -diff > retry_after then
      retry_after = -diff
      limiting = i
    end
    remaining = 0
    if tat - now > reset_after then reset_after = tat - now end
  else
    new_tats[i] = new_tat
    local left = math.floor(diff / interval)
    if remaining < 0 or left < remaining then remaining = left end
    if new_tat - now > reset_after then reset_after = new_tat - now end
  end
end
if limiting == 0 then
  for i, key in ipairs(KEYS) do
    local ttl = math.ceil((new_tats[i] - now) / 1000)
    if ttl < 1 then ttl = 1 end
    redis.call('SET', key, string.format('%.0f', new_tats[i]), 'PX', ttl)
  end
end
if remaining < 0 then remaining = 0 end
return {limiting == 0 and 0 or 1, remaining, math.ceil(retry_after), math.ceil(reset_after), limiting}
"#;

/// A rate override: omitted fields keep the table's global value.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitOverride {
    /// Sustained rate.
    pub requests_per_second: Option<f64>,
    /// Burst.
    pub burst: Option<u32>,
}

/// Settings of the rate limit layer (the `[<service>.rate_limit]` table).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RateLimitConfig {
    /// Limit at all (default true).
    pub enabled: bool,
    /// Global sustained rate per tenant (default 100).
    pub requests_per_second: f64,
    /// Global burst per tenant (default 200).
    pub burst: u32,
    /// Per-tenant overrides, by tenant id.
    pub tenants: BTreeMap<String, LimitOverride>,
    /// Per-API-key limits, by key id, checked in addition to the tenant's.
    pub api_keys: BTreeMap<String, LimitOverride>,
    /// Redis shared by the replicas (default none: local limits).
    pub redis_url: Option<String>,
    /// Redis key prefix (default `weir`).
    pub key_prefix: String,
    /// Replicas sharing the limit; the local share is the limit ÷ replicas (default 1).
    pub replicas: u32,
    /// Longest wait for Redis before deciding locally (default 50 ms).
    #[serde(with = "humantime_serde")]
    pub redis_timeout: Duration,
    /// How long to skip Redis after it failed (default 1 s).
    #[serde(with = "humantime_serde")]
    pub redis_retry_interval: Duration,
}

impl Default for RateLimitConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            requests_per_second: DEFAULT_REQUESTS_PER_SECOND,
            burst: DEFAULT_BURST,
            tenants: BTreeMap::new(),
            api_keys: BTreeMap::new(),
            redis_url: None,
            key_prefix: DEFAULT_PREFIX.to_string(),
            replicas: DEFAULT_REPLICAS,
            redis_timeout: DEFAULT_REDIS_TIMEOUT,
            redis_retry_interval: DEFAULT_REDIS_RETRY_INTERVAL,
        }
    }
}

impl RateLimitConfig {
    /// Checks the settings; `key_prefix` is the table's path (e.g. `router.rate_limit`).
    pub fn validate(&self, key_prefix: &str) -> Result<(), ConfigError> {
        let key = |field: &str| format!("{key_prefix}.{field}");
        check_rate(self.requests_per_second, &key("requests_per_second"))?;
        if self.burst == 0 {
            return Err(ConfigError::invalid(key("burst"), "must be at least 1"));
        }
        if self.replicas == 0 {
            return Err(ConfigError::invalid(key("replicas"), "must be at least 1"));
        }
        if self.redis_timeout.is_zero() {
            return Err(ConfigError::invalid(
                key("redis_timeout"),
                "must be positive",
            ));
        }
        if self.key_prefix.is_empty() || self.key_prefix.contains(char::is_whitespace) {
            return Err(ConfigError::invalid(
                key("key_prefix"),
                "must be non-empty, without spaces",
            ));
        }
        if let Some(url) = &self.redis_url {
            redis::Client::open(url.as_str()).map_err(|error| {
                ConfigError::invalid(key("redis_url"), format!("{}: {error}", redact(url)))
            })?;
        }
        for (tenant, limit) in &self.tenants {
            let at = format!("{key_prefix}.tenants.{tenant}");
            Tenant::new(tenant).map_err(|_| ConfigError::invalid(&at, "not a valid tenant id"))?;
            limit.validate(&at)?;
        }
        for (id, limit) in &self.api_keys {
            let at = format!("{key_prefix}.api_keys.{id}");
            Tenant::new(id).map_err(|_| {
                ConfigError::invalid(&at, "key ids are 1 to 64 letters, digits, '-', '_' or '.'")
            })?;
            limit.validate(&at)?;
        }
        Ok(())
    }

    fn global(&self) -> Rate {
        Rate {
            per_second: self.requests_per_second,
            burst: self.burst,
        }
    }
}

impl LimitOverride {
    fn validate(&self, key_prefix: &str) -> Result<(), ConfigError> {
        if let Some(rate) = self.requests_per_second {
            check_rate(rate, &format!("{key_prefix}.requests_per_second"))?;
        }
        if self.burst == Some(0) {
            return Err(ConfigError::invalid(
                format!("{key_prefix}.burst"),
                "must be at least 1",
            ));
        }
        Ok(())
    }

    fn over(&self, global: Rate) -> Rate {
        Rate {
            per_second: self.requests_per_second.unwrap_or(global.per_second),
            burst: self.burst.unwrap_or(global.burst),
        }
    }
}

fn check_rate(rate: f64, key: &str) -> Result<(), ConfigError> {
    if rate.is_finite() && rate > 0.0 && rate <= 1e9 {
        Ok(())
    } else {
        Err(ConfigError::invalid(
            key,
            "must be a number above 0 and at most 1e9",
        ))
    }
}

/// A sustained rate and a burst.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate {
    /// Requests per second.
    pub per_second: f64,
    /// Requests allowed at once.
    pub burst: u32,
}

impl Rate {
    /// This rate split between `replicas`: each replica's share (burst at least 1).
    pub fn share(self, replicas: u32) -> Rate {
        let replicas = replicas.max(1);
        Rate {
            per_second: self.per_second / f64::from(replicas),
            burst: (self.burst / replicas).max(1),
        }
    }

    fn interval(self) -> Duration {
        Duration::from_secs_f64(1.0 / self.per_second).max(Duration::from_nanos(1))
    }

    fn quota(self) -> Quota {
        let burst = NonZeroU32::new(self.burst).unwrap_or(NonZeroU32::MIN);
        Quota::with_period(self.interval())
            .unwrap_or_else(|| Quota::per_second(NonZeroU32::MAX))
            .allow_burst(burst)
    }
}

impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/s (burst {})", self.per_second, self.burst)
    }
}

/// What a limit applies to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Subject {
    /// A tenant's limit.
    Tenant(Tenant),
    /// An API key's own limit.
    ApiKey(ApiKeyId),
}

impl fmt::Display for Subject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Tenant(tenant) => write!(f, "tenant:{tenant}"),
            Self::ApiKey(id) => write!(f, "api_key:{id}"),
        }
    }
}

/// Who decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecidedBy {
    /// The local limiter (no Redis configured).
    Local,
    /// The shared Redis limit.
    Redis,
    /// The local limiter at the replica's share, because Redis was unreachable.
    Fallback,
}

/// The outcome of one check.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    /// `Some` when refused: the subject whose limit refused it, and that limit.
    pub limited_by: Option<(Subject, Rate)>,
    /// Time until the next token (zero when allowed).
    pub retry_after: Duration,
    /// Requests left in the burst after this one (Redis only).
    pub remaining: Option<u64>,
    /// Time until the subject's bucket is full again (Redis only).
    pub reset_after: Option<Duration>,
    /// Who decided.
    pub decided_by: DecidedBy,
}

impl Decision {
    /// True when the request may go on.
    pub fn allowed(&self) -> bool {
        self.limited_by.is_none()
    }

    /// The refusal to answer with, if refused.
    pub fn refusal(&self) -> Option<ApiError> {
        let (subject, rate) = self.limited_by.as_ref()?;
        let retry_after = self.retry_after.max(Duration::from_millis(1));
        Some(
            ApiError::resource_exhausted(
                "RATE_LIMITED",
                subject.to_string(),
                format!(
                    "rate limit of {rate} for {subject} exceeded; retry in {} ms",
                    retry_after.as_millis()
                ),
            )
            .with_retry_after(retry_after)
            .with_metadata("limit", rate.to_string()),
        )
    }
}

/// governor's clock on tokio's time, so paused-clock tests drive the limiter.
#[derive(Debug, Clone)]
struct TokioClock {
    start: Instant,
}

impl Clock for TokioClock {
    type Instant = Nanos;

    fn now(&self) -> Nanos {
        Nanos::from(u64::try_from(self.start.elapsed().as_nanos()).unwrap_or(u64::MAX))
    }
}

type KeyedLimiter =
    governor::RateLimiter<Tenant, DashMapStateStore<Tenant>, TokioClock, NoOpMiddleware<Nanos>>;
type DirectLimiter =
    governor::RateLimiter<NotKeyed, InMemoryState, TokioClock, NoOpMiddleware<Nanos>>;

/// The in-process limits at one rate share.
struct Local {
    clock: TokioClock,
    global: Rate,
    tenants: KeyedLimiter,
    overrides: HashMap<Tenant, (Rate, DirectLimiter)>,
    keys: HashMap<ApiKeyId, (Rate, DirectLimiter)>,
    checks: AtomicU64,
}

/// How often the keyed limiter forgets idle tenants, in checks.
const RETAIN_EVERY: u64 = 4096;

impl Local {
    fn new(config: &RateLimitConfig, replicas: u32) -> Self {
        let clock = TokioClock {
            start: Instant::now(),
        };
        let global = config.global().share(replicas);
        let direct = |rate: Rate| {
            (
                rate,
                DirectLimiter::direct_with_clock(rate.quota(), clock.clone()),
            )
        };
        Self {
            tenants: KeyedLimiter::dashmap_with_clock(global.quota(), clock.clone()),
            overrides: config
                .tenants
                .iter()
                .filter_map(|(id, limit)| {
                    let rate = limit.over(config.global()).share(replicas);
                    Some((Tenant::new(id).ok()?, direct(rate)))
                })
                .collect(),
            keys: config
                .api_keys
                .iter()
                .map(|(id, limit)| {
                    let rate = limit.over(config.global()).share(replicas);
                    (ApiKeyId::new(id), direct(rate))
                })
                .collect(),
            global,
            clock,
            checks: AtomicU64::new(0),
        }
    }

    fn check(&self, tenant: &Tenant, key: Option<&ApiKeyId>, decided_by: DecidedBy) -> Decision {
        if self.checks.fetch_add(1, Ordering::Relaxed) % RETAIN_EVERY == RETAIN_EVERY - 1 {
            self.tenants.retain_recent();
        }
        let refused = |subject: Subject, rate: Rate, wait: Duration| Decision {
            limited_by: Some((subject, rate)),
            retry_after: wait,
            remaining: None,
            reset_after: None,
            decided_by,
        };
        // The narrower limit first, so a key over its own limit does not spend its tenant's.
        if let Some(key) = key
            && let Some((rate, limiter)) = self.keys.get(key)
            && let Err(not_until) = limiter.check()
        {
            let wait = not_until.wait_time_from(self.clock.now());
            return refused(Subject::ApiKey(key.clone()), *rate, wait);
        }
        let result = match self.overrides.get(tenant) {
            Some((rate, limiter)) => limiter.check().map_err(|e| (*rate, e)),
            None => self.tenants.check_key(tenant).map_err(|e| (self.global, e)),
        };
        match result {
            Ok(()) => Decision {
                limited_by: None,
                retry_after: Duration::ZERO,
                remaining: None,
                reset_after: None,
                decided_by,
            },
            Err((rate, not_until)) => refused(
                Subject::Tenant(tenant.clone()),
                rate,
                not_until.wait_time_from(self.clock.now()),
            ),
        }
    }
}

/// The shared Redis limit.
struct Redis {
    url: String,
    connection: ConnectionManager,
    script: redis::Script,
    prefix: String,
    timeout: Duration,
    retry_interval: Duration,
    global: Rate,
    tenants: HashMap<Tenant, Rate>,
    keys: HashMap<ApiKeyId, Rate>,
    /// Skip Redis until then (after a failure).
    down_until: Mutex<Option<Instant>>,
}

/// Why the Redis check did not decide.
#[derive(Debug, thiserror::Error)]
enum RedisFailure {
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error(transparent)]
    Redis(#[from] redis::RedisError),
    #[error("unexpected script reply {0:?}")]
    Reply(Vec<i64>),
}

impl Redis {
    fn is_down(&self) -> bool {
        match self.down_until.lock() {
            Ok(until) => until.is_some_and(|until| Instant::now() < until),
            Err(_) => false,
        }
    }

    fn set_down(&self, down: bool) {
        if let Ok(mut until) = self.down_until.lock() {
            *until = down.then(|| Instant::now() + self.retry_interval);
        }
    }

    async fn check(
        &self,
        tenant: &Tenant,
        key: Option<&ApiKeyId>,
    ) -> Result<Decision, RedisFailure> {
        let space = KeySpace::new(&self.prefix, tenant, "ratelimit");
        let tenant_rate = self.tenants.get(tenant).copied().unwrap_or(self.global);
        let mut subjects = Vec::with_capacity(2);
        if let Some((key, rate)) = key.and_then(|key| Some((key, *self.keys.get(key)?))) {
            subjects.push((
                space.key2("key", key.as_str()),
                Subject::ApiKey(key.clone()),
                rate,
            ));
        }
        subjects.push((
            space.base().to_string(),
            Subject::Tenant(tenant.clone()),
            tenant_rate,
        ));

        let mut invocation = self.script.prepare_invoke();
        invocation.arg(1);
        for (redis_key, _, rate) in &subjects {
            let interval_us = 1e6 / rate.per_second;
            invocation.key(redis_key).arg(interval_us).arg(rate.burst);
        }
        let mut connection = self.connection.clone();
        let reply: Vec<i64> =
            tokio::time::timeout(self.timeout, invocation.invoke_async(&mut connection))
                .await
                .map_err(|_| RedisFailure::Timeout(self.timeout))??;
        let [limited, remaining, retry_after_us, reset_after_us, limiting] = reply[..] else {
            return Err(RedisFailure::Reply(reply));
        };
        let micros = |us: i64| Duration::from_micros(u64::try_from(us).unwrap_or(0));
        let limited_by = if limited == 0 {
            None
        } else {
            let index = usize::try_from(limiting).unwrap_or(0).saturating_sub(1);
            let (_, subject, rate) = subjects
                .get(index)
                .cloned()
                .ok_or_else(|| RedisFailure::Reply(reply.clone()))?;
            Some((subject, rate))
        };
        Ok(Decision {
            limited_by,
            retry_after: micros(retry_after_us),
            remaining: u64::try_from(remaining).ok(),
            reset_after: Some(micros(reset_after_us)),
            decided_by: DecidedBy::Redis,
        })
    }
}

/// The limiter shared by every clone of the layer: local limits, and the Redis limit when
/// configured. Cheap to clone.
#[derive(Clone)]
pub struct TenantLimiter {
    inner: Arc<LimiterInner>,
}

struct LimiterInner {
    enabled: bool,
    local: Local,
    redis: Option<Redis>,
    fallbacks: AtomicU64,
    degraded: AtomicBool,
    last_warning: Mutex<Option<(Instant, u64)>>,
    /// Requests left in each tenant's burst after its last Redis check (see
    /// [`RateLimitLayer::overlapping`]).
    headroom: Mutex<HashMap<Tenant, u64>>,
}

impl fmt::Debug for TenantLimiter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TenantLimiter")
            .field("enabled", &self.inner.enabled)
            .field("local", &self.inner.local.global)
            .field("redis", &self.inner.redis.as_ref().map(|r| &r.url))
            .field("fallbacks", &self.fallback_count())
            .finish()
    }
}

impl TenantLimiter {
    /// Validates `config` (errors name keys under `key_prefix`, e.g. `router.rate_limit`) and
    /// builds the limiter. With `redis_url`, the connection is made lazily, so a Redis that is down
    /// at start-up only means local limits until it is back. Must run inside a Tokio runtime.
    pub fn from_config(config: &RateLimitConfig, key_prefix: &str) -> Result<Self, ConfigError> {
        config.validate(key_prefix)?;
        let connection = match &config.redis_url {
            None => None,
            Some(url) => {
                let invalid = |error: redis::RedisError| {
                    ConfigError::invalid(
                        format!("{key_prefix}.redis_url"),
                        format!("{}: {error}", redact(url)),
                    )
                };
                let client = redis::Client::open(url.as_str()).map_err(invalid)?;
                let manager_config = ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(REDIS_CONNECT_TIMEOUT))
                    .set_response_timeout(Some(config.redis_timeout))
                    .set_number_of_retries(0);
                Some(
                    ConnectionManager::new_lazy_with_config(client, manager_config)
                        .map_err(invalid)?,
                )
            }
        };
        Ok(Self::build(config, connection))
    }

    /// A limiter that shares its limit through an existing Redis connection (`redis_url` is
    /// ignored). `config` is assumed validated.
    pub fn with_connection(config: &RateLimitConfig, connection: ConnectionManager) -> Self {
        Self::build(config, Some(connection))
    }

    /// A local-only limiter (`redis_url` is ignored). `config` is assumed validated.
    pub fn local(config: &RateLimitConfig) -> Self {
        Self::build(config, None)
    }

    fn build(config: &RateLimitConfig, connection: Option<ConnectionManager>) -> Self {
        let global = config.global();
        let redis = connection.map(|connection| Redis {
            url: config.redis_url.as_deref().map(redact).unwrap_or_default(),
            connection,
            script: redis::Script::new(GCRA_SCRIPT),
            prefix: config.key_prefix.clone(),
            timeout: config.redis_timeout,
            retry_interval: config.redis_retry_interval,
            global,
            tenants: config
                .tenants
                .iter()
                .filter_map(|(id, limit)| Some((Tenant::new(id).ok()?, limit.over(global))))
                .collect(),
            keys: config
                .api_keys
                .iter()
                .map(|(id, limit)| (ApiKeyId::new(id), limit.over(global)))
                .collect(),
            down_until: Mutex::new(None),
        });
        Self {
            inner: Arc::new(LimiterInner {
                enabled: config.enabled,
                // Without Redis, or when it is down, each replica enforces its share.
                local: Local::new(config, config.replicas),
                redis,
                fallbacks: AtomicU64::new(0),
                degraded: AtomicBool::new(false),
                last_warning: Mutex::new(None),
                headroom: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// Requests decided by the local fallback because Redis was unreachable, since start.
    pub fn fallback_count(&self) -> u64 {
        self.inner.fallbacks.load(Ordering::Relaxed)
    }

    /// True while the last Redis check failed (the limit is local, per replica).
    pub fn is_degraded(&self) -> bool {
        self.inner.degraded.load(Ordering::Relaxed)
    }

    /// Decides at once when no Redis round trip is needed (no Redis, or Redis known to be down);
    /// `None` means [`TenantLimiter::check`] must ask Redis.
    pub fn try_check_now(&self, tenant: &Tenant, key: Option<&ApiKeyId>) -> Option<Decision> {
        let inner = &self.inner;
        match &inner.redis {
            None => Some(inner.local.check(tenant, key, DecidedBy::Local)),
            Some(redis) if redis.is_down() => Some(self.fallback(tenant, key, None)),
            Some(_) => None,
        }
    }

    /// Decides whether a request of `tenant` (authenticated with `key`) may go on. Never fails:
    /// when Redis cannot answer, the local fallback decides.
    pub async fn check(&self, tenant: &Tenant, key: Option<&ApiKeyId>) -> Decision {
        if let Some(decision) = self.try_check_now(tenant, key) {
            return decision;
        }
        let Some(redis) = &self.inner.redis else {
            return self.inner.local.check(tenant, key, DecidedBy::Local);
        };
        match redis.check(tenant, key).await {
            Ok(decision) => {
                self.keep_headroom(tenant, &decision);
                if self.inner.degraded.swap(false, Ordering::Relaxed) {
                    tracing::info!(redis = %redis.url, "rate limit store is back: limits are shared again");
                }
                decision
            }
            Err(failure) => {
                redis.set_down(true);
                self.fallback(tenant, key, Some(&failure))
            }
        }
    }

    /// Remembers how much of `tenant`'s burst its last Redis check left.
    fn keep_headroom(&self, tenant: &Tenant, decision: &Decision) {
        let left = if decision.allowed() {
            decision.remaining.unwrap_or(0)
        } else {
            0
        };
        if let Ok(mut headroom) = self.inner.headroom.lock() {
            if headroom.len() >= MAX_HEADROOM_ENTRIES && !headroom.contains_key(tenant) {
                headroom.clear();
            }
            headroom.insert(tenant.clone(), left);
        }
    }

    /// Whether `tenant`'s last Redis check left at least [`OVERLAP_MIN_HEADROOM`] requests in its
    /// burst, so that its next check is very likely to allow (see [`RateLimitLayer::overlapping`]).
    pub fn has_headroom(&self, tenant: &Tenant) -> bool {
        self.inner.headroom.lock().is_ok_and(|headroom| {
            headroom
                .get(tenant)
                .is_some_and(|left| *left >= OVERLAP_MIN_HEADROOM)
        })
    }

    fn fallback(
        &self,
        tenant: &Tenant,
        key: Option<&ApiKeyId>,
        failure: Option<&RedisFailure>,
    ) -> Decision {
        let inner = &self.inner;
        let total = inner.fallbacks.fetch_add(1, Ordering::Relaxed) + 1;
        inner.degraded.store(true, Ordering::Relaxed);
        metrics::counter!("weir_rate_limit_fallback_total").increment(1);
        if let Ok(mut last) = inner.last_warning.lock() {
            let due = last.is_none_or(|(at, _)| at.elapsed() >= FALLBACK_WARN_INTERVAL);
            if due {
                let since = total - last.map_or(0, |(_, count)| count);
                let url = inner.redis.as_ref().map(|r| r.url.as_str()).unwrap_or("");
                match failure {
                    Some(failure) => tracing::warn!(
                        redis = url, error = %failure, fallbacks = since,
                        "rate limit store unreachable: enforcing local limits (limit / replicas)"
                    ),
                    None => tracing::warn!(
                        redis = url,
                        fallbacks = since,
                        "rate limit store still unreachable: enforcing local limits (limit / replicas)"
                    ),
                }
                *last = Some((Instant::now(), total));
            }
        }
        inner.local.check(tenant, key, DecidedBy::Fallback)
    }
}

/// Adds [`RateLimit`] to a server stack.
#[derive(Debug, Clone)]
pub struct RateLimitLayer {
    limiter: TenantLimiter,
    overlap: &'static [&'static str],
}

impl RateLimitLayer {
    /// A layer that checks every request against `limiter`.
    pub fn new(limiter: TenantLimiter) -> Self {
        Self {
            limiter,
            overlap: &[],
        }
    }

    /// Lets requests to `paths` start while their Redis check runs, instead of after it, when
    /// the tenant's last check left headroom ([`OVERLAP_MIN_HEADROOM`]). The handler finds a
    /// [`PendingVerdict`] in the request's extensions and must wait for it before anything it
    /// cannot undo (the router waits before its model call and before claiming a `request_id`;
    /// a reservation made meanwhile is released). The limit stays exact: every request is still
    /// decided by the same Redis check, and a refused one is answered with the same refusal,
    /// whatever its handler did. Only for handlers that wait: any other path is checked first.
    pub fn overlapping(mut self, paths: &'static [&'static str]) -> Self {
        self.overlap = paths;
        self
    }
}

impl<S> Layer<S> for RateLimitLayer {
    type Service = RateLimit<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RateLimit {
            inner,
            limiter: self.limiter.clone(),
            overlap: self.overlap,
        }
    }
}

/// The rate limit service (see the module doc).
#[derive(Debug, Clone)]
pub struct RateLimit<S> {
    inner: S,
    limiter: TenantLimiter,
    overlap: &'static [&'static str],
}

/// The rate limit decision of a request that started before it was known
/// ([`RateLimitLayer::overlapping`]), in the request's extensions.
#[derive(Debug, Clone)]
pub struct PendingVerdict(tokio::sync::watch::Receiver<Option<bool>>);

impl PendingVerdict {
    /// A verdict and the sender that decides it.
    fn channel() -> (tokio::sync::watch::Sender<Option<bool>>, Self) {
        let (sender, receiver) = tokio::sync::watch::channel(None);
        (sender, Self(receiver))
    }

    /// The pending verdict of a request, if its check had not decided when it started.
    pub fn of(extensions: &http::Extensions) -> Option<Self> {
        extensions.get::<Self>().cloned()
    }

    /// Waits for the decision: true when the request may go on. False when refused, or when the
    /// check was abandoned (the request is being dropped).
    pub async fn admitted(&self) -> bool {
        let mut receiver = self.0.clone();
        loop {
            if let Some(allowed) = *receiver.borrow_and_update() {
                return allowed;
            }
            if receiver.changed().await.is_err() {
                return (*receiver.borrow()).unwrap_or(false);
            }
        }
    }
}

/// The tenant of a request: from the auth layer's extensions, else the `weir-tenant` header.
fn tenant_of<B>(request: &Request<B>) -> Result<Tenant, ApiError> {
    if let Some(tenant) = request.extensions().get::<Tenant>() {
        return Ok(tenant.clone());
    }
    match request.headers().get(TENANT) {
        None => Ok(Tenant::default()),
        Some(value) => Tenant::new(
            value
                .to_str()
                .map_err(|_| ApiError::invalid_argument(TENANT, "tenant metadata must be ASCII"))?,
        ),
    }
}

fn refuse<B: Default>(decision: &Decision, tenant: &Tenant) -> Option<Response<B>> {
    let error = decision.refusal()?;
    metrics::counter!("weir_rate_limited_total", "tenant" => tenant.to_string()).increment(1);
    tracing::debug!(%tenant, retry_after = ?decision.retry_after, "rate limited");
    Some(tonic::Status::from(error).into_http())
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for RateLimit<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Clone,
    ResBody: Default,
{
    type Response = Response<ResBody>;
    type Error = S::Error;
    type Future = future::ResponseFuture<S, ReqBody, ResBody>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<ReqBody>) -> Self::Future {
        if !self.limiter.inner.enabled || is_exempt_path(request.uri().path()) {
            return future::ResponseFuture::calling(self.inner.call(request));
        }
        let tenant = match tenant_of(&request) {
            Ok(tenant) => tenant,
            Err(error) => {
                return future::ResponseFuture::rejected(tonic::Status::from(error).into_http());
            }
        };
        let key = ApiKeyId::of(request.extensions()).cloned();
        if let Some(decision) = self.limiter.try_check_now(&tenant, key.as_ref()) {
            return match refuse(&decision, &tenant) {
                Some(response) => future::ResponseFuture::rejected(response),
                None => future::ResponseFuture::calling(self.inner.call(request)),
            };
        }
        // The check needs a Redis round trip: take the service that was polled ready, and leave
        // a clone for the next call (tower's usual pattern).
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let overlap =
            self.overlap.contains(&request.uri().path()) && self.limiter.has_headroom(&tenant);
        let limiter = self.limiter.clone();
        let check = Box::pin(async move {
            let decision = limiter.check(&tenant, key.as_ref()).await;
            (decision, tenant)
        });
        if overlap {
            let (verdict, pending) = PendingVerdict::channel();
            let mut request = request;
            request.extensions_mut().insert(pending);
            return future::ResponseFuture::overlapped(check, verdict, inner.call(request));
        }
        future::ResponseFuture::checking(check, inner, request)
    }
}

/// The response future of [`RateLimit`].
pub mod future {
    use super::*;

    type Check = Pin<Box<dyn Future<Output = (Decision, Tenant)> + Send>>;

    pin_project_lite::pin_project! {
        /// Waits for the limiter's decision, then for the inner service, or answers the refusal.
        pub struct ResponseFuture<S, R, B>
        where
            S: Service<Request<R>>,
        {
            #[pin]
            state: State<S, S::Future, R, B, S::Error>,
        }
    }

    pin_project_lite::pin_project! {
        #[project = StateProj]
        enum State<S, F, R, B, E> {
            Checking { check: Check, inner: Option<S>, request: Option<Request<R>> },
            Calling { #[pin] future: F },
            Rejected { response: Option<Response<B>> },
            // The handler runs while the check does; both must end before the answer (the
            // handler undoes what it did when refused: a hold is released, not charged).
            Overlapped {
                check: Option<Check>,
                verdict: tokio::sync::watch::Sender<Option<bool>>,
                refusal: Option<Response<B>>,
                #[pin] future: F,
                output: Option<Result<Response<B>, E>>,
            },
        }
    }

    impl<S: Service<Request<R>>, R, B> ResponseFuture<S, R, B> {
        pub(super) fn calling(future: S::Future) -> Self {
            Self {
                state: State::Calling { future },
            }
        }

        pub(super) fn rejected(response: Response<B>) -> Self {
            Self {
                state: State::Rejected {
                    response: Some(response),
                },
            }
        }

        pub(super) fn overlapped(
            check: Check,
            verdict: tokio::sync::watch::Sender<Option<bool>>,
            future: S::Future,
        ) -> Self {
            Self {
                state: State::Overlapped {
                    check: Some(check),
                    verdict,
                    refusal: None,
                    future,
                    output: None,
                },
            }
        }

        pub(super) fn checking(check: Check, inner: S, request: Request<R>) -> Self {
            Self {
                state: State::Checking {
                    check,
                    inner: Some(inner),
                    request: Some(request),
                },
            }
        }
    }

    impl<S, R, B> Future for ResponseFuture<S, R, B>
    where
        S: Service<Request<R>, Response = Response<B>>,
        B: Default,
    {
        type Output = Result<Response<B>, S::Error>;

        fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
            let mut state = self.project().state;
            loop {
                match state.as_mut().project() {
                    StateProj::Checking {
                        check,
                        inner,
                        request,
                    } => {
                        let (decision, tenant) = std::task::ready!(check.as_mut().poll(cx));
                        if let Some(response) = refuse(&decision, &tenant) {
                            return Poll::Ready(Ok(response));
                        }
                        let (Some(mut inner), Some(request)) = (inner.take(), request.take())
                        else {
                            return Poll::Ready(Ok(Response::new(B::default())));
                        };
                        let future = inner.call(request);
                        state.set(State::Calling { future });
                    }
                    StateProj::Calling { future } => return future.poll(cx),
                    StateProj::Rejected { response } => {
                        return Poll::Ready(Ok(response.take().unwrap_or_default()));
                    }
                    StateProj::Overlapped {
                        check,
                        verdict,
                        refusal,
                        future,
                        output,
                    } => {
                        if let Some(pending) = check.as_mut()
                            && let Poll::Ready((decision, tenant)) = pending.as_mut().poll(cx)
                        {
                            *refusal = refuse(&decision, &tenant);
                            verdict.send_replace(Some(refusal.is_none()));
                            *check = None;
                        }
                        if output.is_none()
                            && let Poll::Ready(result) = future.poll(cx)
                        {
                            *output = Some(result);
                        }
                        if check.is_some() || output.is_none() {
                            return Poll::Pending;
                        }
                        if let Some(response) = refusal.take() {
                            return Poll::Ready(Ok(response));
                        }
                        return match output.take() {
                            Some(result) => Poll::Ready(result),
                            None => Poll::Ready(Ok(Response::new(B::default()))),
                        };
                    }
                }
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use std::convert::Infallible;

    use tonic::{Code, Status};
    use tonic_types::StatusExt;
    use tower::ServiceExt;

    use super::*;

    fn config(rate: f64, burst: u32) -> RateLimitConfig {
        RateLimitConfig {
            requests_per_second: rate,
            burst,
            ..RateLimitConfig::default()
        }
    }

    fn ok_service()
    -> impl Service<Request<()>, Response = Response<tonic::body::Body>, Error = Infallible>
    + Clone
    + Send
    + 'static {
        tower::service_fn(|_request: Request<()>| async {
            Ok::<_, Infallible>(Response::new(tonic::body::Body::default()))
        })
    }

    fn request(tenant: Option<&str>) -> Request<()> {
        let mut request = Request::builder().uri("/weir.Test/Run").body(()).unwrap();
        if let Some(tenant) = tenant {
            request
                .extensions_mut()
                .insert(Tenant::new(tenant).unwrap());
        }
        request
    }

    fn status<B>(response: &Response<B>) -> Option<Status> {
        Status::from_header_map(response.headers())
    }

    #[tokio::test(start_paused = true)]
    async fn gcra_bursts_then_holds_the_rate() {
        let limiter = TenantLimiter::local(&config(10.0, 5));
        let service = RateLimitLayer::new(limiter).layer(ok_service());
        // The burst goes through at once.
        for i in 0..5 {
            let response = service
                .clone()
                .oneshot(request(Some("acme")))
                .await
                .unwrap();
            assert!(status(&response).is_none(), "request {i} of the burst");
        }
        // Then the next is refused with the time until the next token.
        let response = service
            .clone()
            .oneshot(request(Some("acme")))
            .await
            .unwrap();
        let refused = status(&response).unwrap();
        assert_eq!(refused.code(), Code::ResourceExhausted);
        let details = refused.get_error_details();
        assert_eq!(
            details
                .quota_failure()
                .map(|q| q.violations[0].subject.clone()),
            Some("tenant:acme".to_string())
        );
        let retry = details.retry_info().and_then(|r| r.retry_delay).unwrap();
        assert!(
            retry > Duration::from_millis(90) && retry <= Duration::from_millis(100),
            "{retry:?}"
        );
        assert_eq!(ApiError::from_status(&refused).reason(), "RATE_LIMITED");
        // Another tenant has its own bucket.
        let response = service
            .clone()
            .oneshot(request(Some("globex")))
            .await
            .unwrap();
        assert!(status(&response).is_none());

        // Offered 100/s for 3 s, it holds 10/s.
        let mut admitted = 0;
        for _ in 0..300 {
            tokio::time::advance(Duration::from_millis(10)).await;
            let response = service
                .clone()
                .oneshot(request(Some("acme")))
                .await
                .unwrap();
            if status(&response).is_none() {
                admitted += 1;
            }
        }
        assert!(
            (30..=31).contains(&admitted),
            "admitted {admitted} in 3 s at 10/s"
        );

        // After an idle second the burst is back... up to its size, not more.
        tokio::time::advance(Duration::from_secs(10)).await;
        let mut burst = 0;
        for _ in 0..20 {
            let response = service
                .clone()
                .oneshot(request(Some("acme")))
                .await
                .unwrap();
            if status(&response).is_none() {
                burst += 1;
            }
        }
        assert_eq!(burst, 5);
    }

    #[tokio::test(start_paused = true)]
    async fn overrides_per_tenant_and_per_key() {
        let mut config = config(100.0, 10);
        config.tenants.insert(
            "small".into(),
            LimitOverride {
                burst: Some(2),
                requests_per_second: Some(1.0),
            },
        );
        config.api_keys.insert(
            "acme-batch".into(),
            LimitOverride {
                burst: Some(3),
                requests_per_second: Some(1.0),
            },
        );
        config.validate("router.rate_limit").unwrap();
        let limiter = TenantLimiter::local(&config);
        let tenant = |id: &str| Tenant::new(id).unwrap();
        let admitted = |tenant: Tenant, key: Option<ApiKeyId>, n: usize| {
            let limiter = limiter.clone();
            async move {
                let mut count = 0;
                for _ in 0..n {
                    if limiter.check(&tenant, key.as_ref()).await.allowed() {
                        count += 1;
                    }
                }
                count
            }
        };
        assert_eq!(admitted(tenant("small"), None, 20).await, 2);
        // The batch key stops at its own limit...
        let batch = Some(ApiKeyId::new("acme-batch"));
        assert_eq!(admitted(tenant("acme"), batch.clone(), 20).await, 3);
        let refused = limiter.check(&tenant("acme"), batch.as_ref()).await;
        assert_eq!(
            refused.refusal().map(|e| e.quota_violations()[0].0.clone()),
            Some("api_key:acme-batch".to_string())
        );
        // ...without spending its tenant's: other keys of acme still get the tenant's burst.
        assert_eq!(
            admitted(tenant("acme"), Some(ApiKeyId::new("other")), 20).await,
            7
        );
    }

    #[tokio::test(start_paused = true)]
    async fn tenant_header_health_bypass_and_disabled() {
        let service =
            RateLimitLayer::new(TenantLimiter::local(&config(1.0, 1))).layer(ok_service());
        let with_header = |tenant: &'static str| {
            let mut request = Request::builder().uri("/weir.Test/Run").body(()).unwrap();
            request
                .headers_mut()
                .insert(TENANT, http::HeaderValue::from_static(tenant));
            request
        };
        assert!(status(&service.clone().oneshot(with_header("acme")).await.unwrap()).is_none());
        let second = service.clone().oneshot(with_header("acme")).await.unwrap();
        assert_eq!(
            status(&second).map(|s| s.code()),
            Some(Code::ResourceExhausted)
        );
        let bad = service.clone().oneshot(with_header("a b")).await.unwrap();
        assert_eq!(status(&bad).map(|s| s.code()), Some(Code::InvalidArgument));
        for _ in 0..5 {
            let health = Request::builder()
                .uri("/grpc.health.v1.Health/Check")
                .body(())
                .unwrap();
            assert!(status(&service.clone().oneshot(health).await.unwrap()).is_none());
        }

        let disabled = RateLimitConfig {
            enabled: false,
            ..config(1.0, 1)
        };
        let service = RateLimitLayer::new(TenantLimiter::local(&disabled)).layer(ok_service());
        for _ in 0..5 {
            assert!(status(&service.clone().oneshot(request(None)).await.unwrap()).is_none());
        }
    }

    #[test]
    fn config_parses_and_validation_names_the_key() {
        let text = "requests_per_second = 5.0\nredis_timeout = \"20ms\"\nreplicas = 3\n\
                    [tenants.acme]\nburst = 50\n[api_keys.acme-batch]\nrequests_per_second = 1.0\n";
        let config: RateLimitConfig = toml::from_str(text).unwrap();
        assert!(config.validate("router.rate_limit").is_ok());
        assert_eq!(config.redis_timeout, Duration::from_millis(20));
        assert_eq!(config.burst, DEFAULT_BURST);
        assert_eq!(
            config.tenants["acme"].over(config.global()),
            Rate {
                per_second: 5.0,
                burst: 50
            }
        );
        assert_eq!(config.global().share(3).burst, DEFAULT_BURST / 3);

        let cases = [
            (
                config_with(|c| c.requests_per_second = 0.0),
                "router.rate_limit.requests_per_second",
            ),
            (
                config_with(|c| c.replicas = 0),
                "router.rate_limit.replicas",
            ),
            (
                config_with(|c| c.redis_url = Some("nope://x".into())),
                "router.rate_limit.redis_url",
            ),
            (
                config_with(|c| {
                    c.tenants.insert("a:b".into(), LimitOverride::default());
                }),
                "router.rate_limit.tenants.a:b",
            ),
            (
                config_with(|c| {
                    c.api_keys.insert(
                        "k".into(),
                        LimitOverride {
                            burst: Some(0),
                            ..LimitOverride::default()
                        },
                    );
                }),
                "router.rate_limit.api_keys.k.burst",
            ),
        ];
        for (config, key) in cases {
            let error = config
                .validate("router.rate_limit")
                .err()
                .map(|e| e.to_string());
            assert!(
                error.as_deref().is_some_and(|e| e.contains(key)),
                "{key}: {error:?}"
            );
        }
    }

    fn config_with(change: impl FnOnce(&mut RateLimitConfig)) -> RateLimitConfig {
        let mut config = RateLimitConfig::default();
        change(&mut config);
        config
    }
}
