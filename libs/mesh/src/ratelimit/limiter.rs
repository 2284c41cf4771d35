//! The limiter itself: GCRA per tenant (and API key), locally and in Redis.

use std::{
    collections::HashMap,
    fmt,
    num::NonZeroU32,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use governor::{
    Quota,
    clock::Clock,
    middleware::NoOpMiddleware,
    nanos::Nanos,
    state::{InMemoryState, NotKeyed, keyed::DashMapStateStore},
};
use tokio::time::Instant;

use crate::{
    auth::ApiKeyId,
    config::ConfigError,
    error::ApiError,
    store::{ConnectOptions, KeySpace, OutagePause, RedisConnection, connect_lazy, redact},
    tenant::Tenant,
};

use super::*;

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
    connection: RedisConnection,
    script: redis::Script,
    prefix: String,
    timeout: Duration,
    global: Rate,
    tenants: HashMap<Tenant, Rate>,
    keys: HashMap<ApiKeyId, Rate>,
    /// Skips Redis for `redis_retry_interval` after a failure.
    pause: OutagePause,
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
    /// Whether the limiter checks anything (`enabled` in its table).
    pub(super) fn is_enabled(&self) -> bool {
        self.inner.enabled
    }

    /// Validates `config` (errors name keys under `key_prefix`, e.g. `router.rate_limit`) and
    /// builds the limiter. With `redis_url`, the connection is made lazily, so a Redis that is down
    /// at start-up only means local limits until it is back. Must run inside a Tokio runtime.
    pub fn from_config(config: &RateLimitConfig, key_prefix: &str) -> Result<Self, ConfigError> {
        config.validate(key_prefix)?;
        let connection = match &config.redis_url {
            None => None,
            Some(url) => {
                let options = ConnectOptions {
                    connect_timeout: REDIS_CONNECT_TIMEOUT,
                    response_timeout: config.redis_timeout,
                    retries: Some(0),
                };
                Some(connect_lazy(url, &options).map_err(|error| {
                    ConfigError::invalid(format!("{key_prefix}.redis_url"), error.to_string())
                })?)
            }
        };
        Ok(Self::build(config, connection))
    }

    /// A limiter that shares its limit through an existing Redis connection (`redis_url` is
    /// ignored). `config` is assumed validated.
    pub fn with_connection(config: &RateLimitConfig, connection: RedisConnection) -> Self {
        Self::build(config, Some(connection))
    }

    /// A local-only limiter (`redis_url` is ignored). `config` is assumed validated.
    pub fn local(config: &RateLimitConfig) -> Self {
        Self::build(config, None)
    }

    fn build(config: &RateLimitConfig, connection: Option<RedisConnection>) -> Self {
        let global = config.global();
        let redis = connection.map(|connection| Redis {
            url: config.redis_url.as_deref().map(redact).unwrap_or_default(),
            connection,
            script: redis::Script::new(GCRA_SCRIPT),
            prefix: config.key_prefix.clone(),
            timeout: config.redis_timeout,
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
            pause: OutagePause::new(config.redis_retry_interval),
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
            Some(redis) if redis.pause.is_paused() => Some(self.fallback(tenant, key, None)),
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
                redis.pause.trip();
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
