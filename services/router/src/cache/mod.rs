//! The response cache: an identical deterministic request is answered from a stored answer,
//! without a model call, budget hold or charge (docs/caching.md).
//!
//! - **Key**: SHA-256 over a length-prefixed encoding of the RPC (unary and stream entries are
//!   separate), the tenant (tenants never share an entry), the requested model or route, the
//!   messages (with their tool calls), the generation parameters and the labels (sorted; review
//!   policies match on them). Not `request_id` nor `criticality`.
//! - **Cacheable**: only deterministic requests (`params.temperature` set to 0, or `params.seed`
//!   set; an unset temperature is the model's default, not 0) without a `session_id` (a session's
//!   context is part of the prompt and changes with every turn: such requests are not cached).
//! - **Control**: the `weir-cache` metadata (the HTTP edge forwards the header): `bypass` neither
//!   reads nor writes the cache; `refresh` asks the model and replaces the entry.
//! - **Stored**: an answer served by the route's primary model (not a fallback, not the degraded
//!   answer) whose review status is NOT_REQUIRED or APPROVED (nothing held or sampled for review),
//!   encoded as [`crate::replay`] records it, up to `max_entry_bytes`. A stream is stored at its
//!   `done`, all its events, and replayed as the same events.
//! - **Hit**: the stored answer with `cost_micros` 0 (hits are free unless
//!   `cached_price_fraction` is set: then that share of its usage), the current trace id and
//!   the one notice [`CACHE_HIT`]; `usage` is the original answer's.
//! - **Store failures** (Redis down or slow) are misses, counted `error`, never errors.
//!
//! Every request the cache looks at is counted in `weir_cache_requests_total{result}`: `hit`,
//! `miss`, `bypass`, `refresh`, `skip` (not cacheable) or `error`; every answer offered to it in
//! `weir_cache_stores_total{result}`: `stored`, `not_stored` (fallback, degraded, reviewed),
//! `too_large` or `error`.

pub mod store;

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use prost::Message as _;
use serde::{Deserialize, Serialize};
use tonic::metadata::MetadataMap;
use weir_mesh::{ApiError, config::ConfigError, store::DEFAULT_PREFIX, tenant::Tenant};
use weir_proto::common::Usage;
use weir_proto::router::{
    CompleteRequest, CompleteResponse, CompleteStreamResponse, Notice, ReviewStatus, ServedBy,
    complete_stream_response::Event,
};

use crate::{relay::CompleteStream, replay, replay::Rpc, request::Completion};
pub use store::{Lookup, MemoryStore, RedisStore, StoreError};

/// Default of `enabled`: the cache is off.
pub const DEFAULT_ENABLED: bool = false;
/// Default time an entry is served.
pub const DEFAULT_TTL: Duration = Duration::from_secs(60 * 60);
/// Default largest entry stored (the encoded answer or stream), in bytes.
pub const DEFAULT_MAX_ENTRY_BYTES: usize = 256 * 1024;
/// Default share of an answer's token usage a hit is charged: nothing, hits are free.
pub const DEFAULT_CACHED_PRICE_FRACTION: f64 = 0.0;
/// Notice reason of an answer served from the cache.
pub const CACHE_HIT: &str = "CACHE_HIT";

/// The `[router.cache]` table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CacheConfig {
    /// Whether the cache is on (default false; `WEIR_ROUTER__CACHE__ENABLED`).
    pub enabled: bool,
    /// How long an entry is served (default 1h; `WEIR_ROUTER__CACHE__TTL`).
    #[serde(with = "humantime_serde")]
    pub ttl: Duration,
    /// Largest entry stored, in bytes; larger answers are not stored (default 256 KiB;
    /// `WEIR_ROUTER__CACHE__MAX_ENTRY_BYTES`).
    pub max_entry_bytes: usize,
    /// Redis shared by the replicas; unset keeps entries in the process (default unset;
    /// `WEIR_ROUTER__CACHE__REDIS_URL`).
    pub redis_url: Option<String>,
    /// First part of every Redis key (default `weir`; `WEIR_ROUTER__CACHE__KEY_PREFIX`).
    pub key_prefix: String,
    /// Share (0 to 1) of the stored answer's token usage a hit is charged, at the served model's
    /// price, through the budget service like a model call (default 0: hits are free;
    /// `WEIR_ROUTER__CACHE__CACHED_PRICE_FRACTION`).
    pub cached_price_fraction: f64,
}

impl Default for CacheConfig {
    fn default() -> Self {
        Self {
            enabled: DEFAULT_ENABLED,
            ttl: DEFAULT_TTL,
            max_entry_bytes: DEFAULT_MAX_ENTRY_BYTES,
            redis_url: None,
            key_prefix: DEFAULT_PREFIX.to_string(),
            cached_price_fraction: DEFAULT_CACHED_PRICE_FRACTION,
        }
    }
}

impl CacheConfig {
    /// Checks the settings, naming the bad key (`router.cache.<key>`).
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.ttl < Duration::from_secs(1) {
            return Err(ConfigError::invalid(
                "router.cache.ttl",
                "must be at least 1s",
            ));
        }
        if self.max_entry_bytes == 0 {
            return Err(ConfigError::invalid(
                "router.cache.max_entry_bytes",
                "must be positive",
            ));
        }
        if !(0.0..=1.0).contains(&self.cached_price_fraction) {
            return Err(ConfigError::invalid(
                "router.cache.cached_price_fraction",
                "must be between 0 and 1",
            ));
        }
        if self.key_prefix.trim().is_empty() {
            return Err(ConfigError::invalid(
                "router.cache.key_prefix",
                "must not be empty",
            ));
        }
        if let Some(url) = &self.redis_url {
            weir_mesh::store::check_url(url).map_err(|error| {
                ConfigError::invalid(
                    "router.cache.redis_url",
                    format!("{}: {error}", weir_mesh::store::redact(url)),
                )
            })?;
        }
        Ok(())
    }
}

/// A cache key: the SHA-256 of what changes a request's answer (see the module doc).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CacheKey(pub [u8; 32]);

impl CacheKey {
    /// The key of `completion`, sent to `rpc` by `tenant`.
    pub(crate) fn of(rpc: Rpc, tenant: &Tenant, completion: &Completion) -> Self {
        let body = CompleteRequest {
            model: completion.model.clone(),
            messages: completion.messages.clone(),
            params: completion.params.clone(),
            ..CompleteRequest::default()
        }
        .encode_to_vec();
        let mut labels: Vec<_> = completion.labels.iter().collect();
        labels.sort();
        let labels: Vec<u8> = labels
            .into_iter()
            .flat_map(|(k, v)| [k.as_bytes(), b"\0", v.as_bytes(), b"\0"].concat())
            .collect();
        let rpc: &[u8] = match rpc {
            Rpc::Complete => b"complete",
            Rpc::CompleteStream => b"stream",
        };
        let parts: [&[u8]; 5] = [
            b"weir-cache-v1",
            rpc,
            tenant.as_str().as_bytes(),
            &body,
            &labels,
        ];
        let mut context = ring::digest::Context::new(&ring::digest::SHA256);
        for part in parts {
            context.update(&(part.len() as u64).to_be_bytes());
            context.update(part);
        }
        let mut out = [0u8; 32];
        out.copy_from_slice(context.finish().as_ref());
        Self(out)
    }

    /// Lower-case hex.
    pub fn hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }
}

/// What a [`Lookup`] is asked: the tenant and the exact key.
#[derive(Debug, Clone)]
pub struct Query {
    /// The caller's tenant (also in the key; a store keeps tenants apart by it too).
    pub tenant: Tenant,
    /// The exact key.
    pub key: CacheKey,
}

/// The per-request control, from the `weir-cache` metadata.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) enum Control {
    /// The cache applies.
    #[default]
    Normal,
    /// Neither read nor written.
    Bypass,
    /// Not read; the answer replaces the entry.
    Refresh,
}

impl Control {
    /// The control `metadata` asks for; INVALID_ARGUMENT for an unknown value.
    pub(crate) fn from_metadata(metadata: &MetadataMap) -> Result<Self, ApiError> {
        let Some(value) = metadata.get(weir_mesh::metadata::CACHE_CONTROL) else {
            return Ok(Self::Normal);
        };
        match value.to_str().map(str::trim) {
            Ok(v) if v.eq_ignore_ascii_case("bypass") => Ok(Self::Bypass),
            Ok(v) if v.eq_ignore_ascii_case("refresh") => Ok(Self::Refresh),
            _ => Err(ApiError::invalid_argument(
                weir_mesh::metadata::CACHE_CONTROL,
                "must be bypass or refresh",
            )),
        }
    }
}

/// Whether `completion` may be cached: deterministic and without a session.
pub(crate) fn cacheable(completion: &Completion) -> bool {
    if !completion.session_id.is_empty() {
        return false;
    }
    completion
        .params
        .as_ref()
        .is_some_and(|p| p.temperature == Some(0.0) || p.seed.is_some())
}

/// The router's response cache; off unless `[router.cache] enabled`.
#[derive(Debug, Clone, Default)]
pub(crate) struct ResponseCache {
    inner: Option<Arc<Inner>>,
}

#[derive(Debug)]
struct Inner {
    lookup: Box<dyn Lookup>,
    ttl: Duration,
    max_entry_bytes: usize,
    price_fraction: f64,
    /// Hits and misses since start, for `RouteAdminService/ListRoutes`.
    hits: AtomicU64,
    misses: AtomicU64,
}

/// What the cache said about a request.
pub(crate) enum Looked {
    /// The stored entry (in [`crate::replay`]'s form).
    Hit(Vec<u8>),
    /// Not answered from the cache; `Some` when its answer is to be offered to it.
    Miss(Option<Pending>),
}

/// A miss whose answer may be stored.
pub(crate) struct Pending {
    inner: Arc<Inner>,
    query: Query,
}

impl ResponseCache {
    /// The cache `config` describes (validated), or the off cache.
    pub(crate) fn from_config(config: &CacheConfig) -> Result<Self, ConfigError> {
        config.validate()?;
        if !config.enabled {
            return Ok(Self::default());
        }
        let lookup: Box<dyn Lookup> = match &config.redis_url {
            Some(url) => Box::new(
                RedisStore::lazy(url, &config.key_prefix)
                    .map_err(|error| ConfigError::invalid("router.cache.redis_url", error))?,
            ),
            None => Box::new(MemoryStore::default()),
        };
        Ok(Self {
            inner: Some(Arc::new(Inner {
                lookup,
                ttl: config.ttl,
                max_entry_bytes: config.max_entry_bytes,
                price_fraction: config.cached_price_fraction,
                hits: AtomicU64::new(0),
                misses: AtomicU64::new(0),
            })),
        })
    }

    /// Whether the cache is on.
    pub(crate) fn is_on(&self) -> bool {
        self.inner.is_some()
    }

    /// Hits and misses since start (both 0 when the cache is off).
    pub(crate) fn hits_and_misses(&self) -> (u64, u64) {
        self.inner.as_ref().map_or((0, 0), |inner| {
            let read = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
            (read(&inner.hits), read(&inner.misses))
        })
    }

    /// The share of a stored answer's usage a hit is charged (0 when the cache is off).
    pub(crate) fn price_fraction(&self) -> f64 {
        self.inner
            .as_ref()
            .map_or(0.0, |inner| inner.price_fraction)
    }

    /// Looks `completion` up (unless the cache is off, it is not cacheable, or `control` says
    /// otherwise). A store failure is a miss.
    pub(crate) async fn look(
        &self,
        control: Control,
        rpc: Rpc,
        tenant: &Tenant,
        completion: &Completion,
    ) -> Looked {
        let Some(inner) = &self.inner else {
            return Looked::Miss(None);
        };
        if !cacheable(completion) {
            count("skip");
            return Looked::Miss(None);
        }
        let query = Query {
            tenant: tenant.clone(),
            key: CacheKey::of(rpc, tenant, completion),
        };
        let pending = Pending {
            inner: inner.clone(),
            query,
        };
        match control {
            Control::Bypass => {
                count("bypass");
                return Looked::Miss(None);
            }
            Control::Refresh => {
                count("refresh");
                return Looked::Miss(Some(pending));
            }
            Control::Normal => {}
        }
        match inner.lookup.find(&pending.query).await {
            Ok(Some(entry)) => {
                count("hit");
                inner.hits.fetch_add(1, Ordering::Relaxed);
                Looked::Hit(entry)
            }
            Ok(None) => {
                count("miss");
                inner.misses.fetch_add(1, Ordering::Relaxed);
                Looked::Miss(Some(pending))
            }
            Err(error) => {
                tracing::debug!(%error, "response cache lookup failed; a miss");
                count("error");
                Looked::Miss(Some(pending))
            }
        }
    }
}

impl Pending {
    /// Offers a unary answer to the cache (see the module doc for what is stored).
    pub(crate) async fn store_answer(self, response: &CompleteResponse) {
        if !storable(response.served_by, response.review_status) {
            return stored("not_stored");
        }
        let entry = replay::encode_answer(&CompleteResponse {
            trace_id: String::new(),
            cost_micros: 0,
            notices: Vec::new(),
            ..response.clone()
        });
        self.keep(entry).await;
    }

    /// Offers a stream's events, `start` to `done`, to the cache.
    async fn store_events(self, mut events: Vec<CompleteStreamResponse>) {
        let (mut served_by, mut review_status) = (ServedBy::Unspecified as i32, 0);
        for event in &mut events {
            match &mut event.event {
                Some(Event::Start(start)) => {
                    served_by = start.served_by;
                    start.trace_id.clear();
                }
                Some(Event::Done(done)) => {
                    review_status = done.review_status;
                    done.cost_micros = 0;
                    done.notices.clear();
                }
                _ => {}
            }
        }
        if !storable(served_by, review_status) {
            return stored("not_stored");
        }
        self.keep(replay::encode_events(events)).await;
    }

    async fn keep(self, entry: Vec<u8>) {
        if entry.len() > self.inner.max_entry_bytes {
            return stored("too_large");
        }
        match self
            .inner
            .lookup
            .keep(&self.query, entry, self.inner.ttl)
            .await
        {
            Ok(()) => stored("stored"),
            Err(error) => {
                tracing::debug!(%error, "response cache store failed");
                stored("error");
            }
        }
    }

    /// `upstream`, offering its events to the cache when `done` is about to go out.
    pub(crate) fn storing(self, upstream: CompleteStream) -> CompleteStream {
        use futures::{StreamExt, stream};
        let state = (upstream, Some(self), Vec::new());
        Box::pin(stream::unfold(
            state,
            |(mut upstream, mut pending, mut events)| async move {
                let item = upstream.next().await?;
                match &item {
                    Ok(event) if pending.is_some() => {
                        events.push(event.clone());
                        if matches!(event.event, Some(Event::Done(_)))
                            && let Some(pending) = pending.take()
                        {
                            pending.store_events(std::mem::take(&mut events)).await;
                        }
                    }
                    // Cut mid-way: nothing is stored.
                    _ => pending = None,
                }
                Some((item, (upstream, pending, events)))
            },
        ))
    }
}

/// Whether an answer served so, with that review status, may be stored.
fn storable(served_by: i32, review_status: i32) -> bool {
    served_by == ServedBy::Primary as i32
        && (review_status == ReviewStatus::NotRequired as i32
            || review_status == ReviewStatus::Approved as i32)
}

/// A stored unary answer as a hit: free, with the current trace id and the [`CACHE_HIT`] notice.
pub(crate) fn hit_answer(entry: &[u8], trace_id: String) -> Option<CompleteResponse> {
    let mut response = replay::decode_answer(entry)?;
    response.trace_id = trace_id;
    response.cost_micros = 0;
    response.notices = vec![hit_notice()];
    Some(response)
}

/// `usage` scaled by `fraction` (rounded), what a hit is charged for.
pub(crate) fn scaled(usage: Usage, fraction: f64) -> Usage {
    let scale = |tokens: i64| (tokens as f64 * fraction).round() as i64;
    let (input, output) = (scale(usage.input_tokens), scale(usage.output_tokens));
    Usage {
        input_tokens: input,
        output_tokens: output,
        cached_input_tokens: scale(usage.cached_input_tokens).min(input),
        total_tokens: input + output,
    }
}

/// The model that served a stored stream and its usage (from `start` and `done`).
pub(crate) fn served(events: &[CompleteStreamResponse]) -> (String, Option<Usage>) {
    let (mut model, mut usage) = (String::new(), None);
    for event in events {
        match &event.event {
            Some(Event::Start(start)) => model.clone_from(&start.model),
            Some(Event::Done(done)) => usage = done.usage,
            _ => {}
        }
    }
    (model, usage)
}

/// Sets what a hit of `events` was charged, and the notices charging it added, in its `done`.
pub(crate) fn set_cost(
    events: &mut [CompleteStreamResponse],
    cost_micros: i64,
    notices: Vec<Notice>,
) {
    for event in events {
        if let Some(Event::Done(done)) = &mut event.event {
            done.cost_micros = cost_micros;
            done.notices.extend(notices);
            return;
        }
    }
}

/// `events` as a stream.
pub(crate) fn replayed(events: Vec<CompleteStreamResponse>) -> CompleteStream {
    Box::pin(futures::stream::iter(events.into_iter().map(Ok)))
}

/// A stored stream's events as a hit (see [`hit_answer`]).
pub(crate) fn hit_events(entry: &[u8], trace_id: String) -> Option<Vec<CompleteStreamResponse>> {
    let mut events = replay::decode_events(entry)?;
    for event in &mut events {
        match &mut event.event {
            Some(Event::Start(start)) => start.trace_id.clone_from(&trace_id),
            Some(Event::Done(done)) => {
                done.cost_micros = 0;
                done.notices = vec![hit_notice()];
            }
            _ => {}
        }
    }
    Some(events)
}

fn hit_notice() -> Notice {
    Notice {
        reason: CACHE_HIT.to_string(),
        message:
            "answered from the response cache: no model was called (see cost_micros for the charge)"
                .to_string(),
    }
}

fn count(result: &'static str) {
    metrics::counter!("weir_cache_requests_total", "result" => result).increment(1);
}

fn stored(result: &'static str) {
    metrics::counter!("weir_cache_stores_total", "result" => result).increment(1);
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use std::collections::HashMap;

    use weir_proto::common::{GenerationParams, Message, Role};

    use super::*;

    fn completion() -> Completion {
        Completion::from(CompleteRequest {
            model: "auto".to_string(),
            messages: vec![Message {
                role: Role::User.into(),
                content: "hi".to_string(),
                ..Message::default()
            }],
            params: Some(GenerationParams {
                temperature: Some(0.0),
                ..GenerationParams::default()
            }),
            labels: HashMap::from([
                ("a".to_string(), "1".to_string()),
                ("b".to_string(), "2".to_string()),
            ]),
            request_id: "r-1".to_string(),
            ..CompleteRequest::default()
        })
    }

    fn key(completion: &Completion) -> CacheKey {
        CacheKey::of(Rpc::Complete, &Tenant::new("acme").unwrap(), completion)
    }

    #[test]
    fn the_key_covers_what_changes_the_answer_and_the_tenant() {
        let base = key(&completion());
        let mut same = completion();
        same.request_id = "r-2".to_string();
        same.criticality = 1;
        // Another map order of the same labels.
        same.labels = HashMap::from([
            ("b".to_string(), "2".to_string()),
            ("a".to_string(), "1".to_string()),
        ]);
        assert_eq!(
            key(&same),
            base,
            "id, criticality and label order do not count"
        );

        let other_tenant =
            CacheKey::of(Rpc::Complete, &Tenant::new("other").unwrap(), &completion());
        assert_ne!(other_tenant, base, "tenants never share an entry");
        assert_ne!(
            CacheKey::of(
                Rpc::CompleteStream,
                &Tenant::new("acme").unwrap(),
                &completion()
            ),
            base
        );
        let mut other = completion();
        other.model = "sim-small".to_string();
        assert_ne!(key(&other), base);
        let mut other = completion();
        other.messages[0].content = "ho".to_string();
        assert_ne!(key(&other), base);
        let mut other = completion();
        other.messages[0].role = Role::System.into();
        assert_ne!(key(&other), base);
        let mut other = completion();
        other.params.as_mut().unwrap().max_tokens = Some(5);
        assert_ne!(key(&other), base);
        let mut other = completion();
        other.labels.insert("c".to_string(), "3".to_string());
        assert_ne!(key(&other), base);
        // Two messages in another order are another conversation.
        let mut two = completion();
        two.messages.push(Message {
            role: Role::User.into(),
            content: "there".to_string(),
            ..Message::default()
        });
        let mut swapped = two.clone();
        swapped.messages.reverse();
        assert_ne!(key(&two), key(&swapped));
    }

    #[test]
    fn only_deterministic_requests_without_a_session_are_cacheable() {
        assert!(cacheable(&completion()));
        let mut seeded = completion();
        seeded.params = Some(GenerationParams {
            temperature: Some(0.7),
            seed: Some(7),
            ..GenerationParams::default()
        });
        assert!(cacheable(&seeded));
        let mut warm = completion();
        warm.params.as_mut().unwrap().temperature = Some(0.7);
        assert!(!cacheable(&warm));
        let mut unset = completion();
        unset.params = None;
        assert!(
            !cacheable(&unset),
            "an unset temperature is the model's default"
        );
        let mut session = completion();
        session.session_id = "s-1".to_string();
        assert!(!cacheable(&session));
    }

    #[test]
    fn the_control_header_is_read_and_checked() {
        let mut metadata = MetadataMap::new();
        assert_eq!(Control::from_metadata(&metadata).unwrap(), Control::Normal);
        metadata.insert("weir-cache", "bypass".parse().unwrap());
        assert_eq!(Control::from_metadata(&metadata).unwrap(), Control::Bypass);
        metadata.insert("weir-cache", "Refresh".parse().unwrap());
        assert_eq!(Control::from_metadata(&metadata).unwrap(), Control::Refresh);
        metadata.insert("weir-cache", "sometimes".parse().unwrap());
        assert!(Control::from_metadata(&metadata).is_err());
    }

    #[test]
    fn bad_settings_name_their_key() {
        CacheConfig::default().validate().unwrap();
        for (config, key) in [
            (
                CacheConfig {
                    ttl: Duration::ZERO,
                    ..CacheConfig::default()
                },
                "router.cache.ttl",
            ),
            (
                CacheConfig {
                    max_entry_bytes: 0,
                    ..CacheConfig::default()
                },
                "router.cache.max_entry_bytes",
            ),
            (
                CacheConfig {
                    cached_price_fraction: 1.5,
                    ..CacheConfig::default()
                },
                "router.cache.cached_price_fraction",
            ),
            (
                CacheConfig {
                    redis_url: Some("not a url".to_string()),
                    ..CacheConfig::default()
                },
                "router.cache.redis_url",
            ),
            (
                CacheConfig {
                    redis_url: Some("redis+cluster://".to_string()),
                    ..CacheConfig::default()
                },
                "router.cache.redis_url",
            ),
        ] {
            let error = config.validate().unwrap_err().to_string();
            assert!(error.contains(key), "{error}");
        }
        let cluster = CacheConfig {
            redis_url: Some("redis+cluster://127.0.0.1:7000,127.0.0.1:7001".to_string()),
            ..CacheConfig::default()
        };
        assert!(
            cluster.validate().is_ok(),
            "a Redis Cluster URL is accepted"
        );
    }

    #[test]
    fn only_primary_unreviewed_or_approved_answers_are_stored() {
        let primary = ServedBy::Primary as i32;
        assert!(storable(primary, ReviewStatus::NotRequired as i32));
        assert!(storable(primary, ReviewStatus::Approved as i32));
        assert!(!storable(primary, ReviewStatus::Pending as i32));
        assert!(!storable(primary, ReviewStatus::Sampled as i32));
        assert!(!storable(
            ServedBy::Fallback as i32,
            ReviewStatus::NotRequired as i32
        ));
        assert!(!storable(
            ServedBy::Degraded as i32,
            ReviewStatus::NotRequired as i32
        ));
    }
}
