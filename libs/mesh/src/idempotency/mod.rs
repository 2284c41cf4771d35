//! Idempotency keys: a request retried with the same key is run once and answered the same way
//! every time.
//!
//! # Why
//!
//! Clients retry: gRPC retry policies, the OpenAI SDKs, job workers, a user pressing the button
//! twice. Without a key, every retry of a model call runs the model and is paid again, and a
//! conversation gets the answer twice. With one, the first request runs and its outcome is
//! recorded; every repeat gets that outcome.
//!
//! # Semantics (Stripe's, and the IETF `Idempotency-Key` draft's)
//!
//! A key is scoped by tenant, so two tenants never share one. [`Idempotency::claim`] takes the key
//! and a [`Fingerprint`] of the request (a hash of everything that changes its answer) and says:
//!
//! | the key is | answer |
//! |---|---|
//! | new | [`Claim::Run`]: run the request, then [`Guard::complete`] with its answer (or [`Guard::release`]) |
//! | completed, same fingerprint | [`Claim::Replay`] with the stored answer, byte for byte |
//! | in progress, same fingerprint | wait for its outcome (polling, bounded by the caller's deadline); past the deadline ABORTED `IDEMPOTENCY_KEY_IN_PROGRESS` with RetryInfo |
//! | in progress or completed, other fingerprint | INVALID_ARGUMENT `IDEMPOTENCY_KEY_REUSED` |
//! | released (the first attempt failed transiently) | the waiter claims it and runs |
//!
//! The answer is recorded **before** it is sent, so an answer lost on the wire is replayed, never
//! run (and paid) again. A completed record is kept for [`IdempotencyConfig::retention`] (default
//! 24 h). A request that failed transiently releases its key so that its retry runs; a guard
//! dropped without an outcome (the handler was dropped) releases it too, on a spawned task. An
//! in-progress record whose owner died (a killed process) expires after its lease: the caller's
//! remaining deadline plus [`LEASE_MARGIN`], so a retry after that runs.
//!
//! Keys are 1 to [`MAX_KEY_LEN`] printable ASCII characters without spaces ([`validate_key`]),
//! checked before anything else happens to the request.
//!
//! # Stores
//!
//! With `redis_url`, records are shared by every replica through Redis: one hash per key,
//! `<prefix>:{<tenant>}:<service>:idem:<key>`, claimed and completed by Lua scripts that compare
//! the owner's token, so a slow owner whose lease expired cannot overwrite the record of the
//! request that took over. Each script touches that one key, so a Redis Cluster
//! (`redis+cluster://` URL) runs them as one server does. Without it (the `weir up` default) records live in the process. When Redis
//! cannot answer, a request with a key fails with UNAVAILABLE `IDEMPOTENCY_UNAVAILABLE`: running it
//! unrecorded could run it twice, which is what the key was sent to prevent.

mod memory;
mod redis;

use std::{fmt, sync::Arc, time::Duration};

use serde::{Deserialize, Serialize};
use tokio::time::Instant;
use tonic::Code;

use crate::{
    ApiError,
    config::ConfigError,
    deadline::Deadline,
    store::{DEFAULT_PREFIX, KeySpace},
    tenant::Tenant,
};

/// Default time a completed request's answer is kept and replayed.
pub const DEFAULT_RETENTION: Duration = Duration::from_secs(24 * 60 * 60);
/// Longest idempotency key, in bytes (Stripe's limit).
pub const MAX_KEY_LEN: usize = 255;
/// Time an in-progress record outlives its caller's deadline, for the settlement that follows an
/// answer (commit, append, recording) to finish.
pub const LEASE_MARGIN: Duration = Duration::from_secs(15);
/// Lease of an in-progress record whose caller set no deadline.
pub const DEFAULT_LEASE: Duration = Duration::from_secs(120);
/// First and longest pause between two looks at a record another request is working on.
const POLL_FIRST: Duration = Duration::from_millis(5);
const POLL_MAX: Duration = Duration::from_millis(50);
/// Time a caller refused with `IDEMPOTENCY_KEY_IN_PROGRESS` is told to wait.
const IN_PROGRESS_RETRY: Duration = Duration::from_secs(1);
/// Time a caller refused with `IDEMPOTENCY_UNAVAILABLE` is told to wait.
const UNAVAILABLE_RETRY: Duration = Duration::from_secs(1);

/// ErrorInfo reason: the key was used before for a different request.
pub const KEY_REUSED: &str = "IDEMPOTENCY_KEY_REUSED";
/// ErrorInfo reason: the request with this key is still running and did not finish in time.
pub const KEY_IN_PROGRESS: &str = "IDEMPOTENCY_KEY_IN_PROGRESS";
/// ErrorInfo reason: the idempotency store could not answer.
pub const STORE_UNAVAILABLE: &str = "IDEMPOTENCY_UNAVAILABLE";

/// The idempotency table of a service (e.g. `[router.idempotency]`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct IdempotencyConfig {
    /// How long a completed request's answer is replayed (default 24 h).
    #[serde(with = "humantime_serde")]
    pub retention: Duration,
    /// Redis shared by the replicas; unset keeps records in the process (default unset).
    pub redis_url: Option<String>,
    /// First part of every Redis key (default `weir`).
    pub key_prefix: String,
}

impl Default for IdempotencyConfig {
    fn default() -> Self {
        Self {
            retention: DEFAULT_RETENTION,
            redis_url: None,
            key_prefix: DEFAULT_PREFIX.to_string(),
        }
    }
}

impl IdempotencyConfig {
    /// Checks the settings, naming the bad key under `key_prefix` (e.g. `router.idempotency`).
    pub fn validate(&self, key_prefix: &str) -> Result<(), ConfigError> {
        if self.retention < Duration::from_secs(1) {
            return Err(ConfigError::invalid(
                format!("{key_prefix}.retention"),
                "must be at least 1s",
            ));
        }
        if self.key_prefix.trim().is_empty() {
            return Err(ConfigError::invalid(
                format!("{key_prefix}.key_prefix"),
                "must not be empty",
            ));
        }
        Ok(())
    }
}

/// Checks an idempotency key: 1 to [`MAX_KEY_LEN`] printable ASCII characters, no spaces.
/// `field` names the request field in the error (e.g. `request_id`).
pub fn validate_key(field: &str, key: &str) -> Result<(), ApiError> {
    match key_problem(key) {
        None => Ok(()),
        Some(problem) => Err(ApiError::invalid_argument(field, problem)),
    }
}

/// What is wrong with an idempotency key, if anything (see [`validate_key`]).
pub fn key_problem(key: &str) -> Option<String> {
    if key.is_empty() || key.len() > MAX_KEY_LEN {
        return Some(format!(
            "must be 1 to {MAX_KEY_LEN} characters, got {}",
            key.len()
        ));
    }
    if !key.bytes().all(|b| b.is_ascii_graphic()) {
        return Some(
            "must be printable ASCII without spaces (a UUID is a good choice)".to_string(),
        );
    }
    None
}

/// A hash of everything that changes a request's answer: two requests with one key and different
/// fingerprints are different requests.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Fingerprint([u8; 32]);

impl Fingerprint {
    /// The SHA-256 of `parts`, each length-prefixed so that no two lists of parts collide.
    pub fn of(parts: &[&[u8]]) -> Self {
        let mut context = ring::digest::Context::new(&ring::digest::SHA256);
        for part in parts {
            context.update(&(part.len() as u64).to_be_bytes());
            context.update(part);
        }
        let mut out = [0u8; 32];
        out.copy_from_slice(context.finish().as_ref());
        Self(out)
    }

    fn hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Fingerprint({})", self.hex())
    }
}

/// A stored record, as a store returns it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Record {
    done: bool,
    fingerprint: String,
    answer: Vec<u8>,
}

/// Why a store could not answer.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct StoreError(String);

/// What [`Idempotency::claim`] decided.
#[derive(Debug)]
pub enum Claim {
    /// The key is this request's: run it, then complete or release the guard.
    Run(Guard),
    /// The key's request already completed: its recorded answer.
    Replay(Vec<u8>),
}

/// The records of one service: claims, waits and replays (see the module doc). Cheap to clone.
#[derive(Clone)]
pub struct Idempotency {
    inner: Arc<Inner>,
}

struct Inner {
    store: Store,
    retention: Duration,
    prefix: String,
    service: &'static str,
}

enum Store {
    Memory(memory::MemoryStore),
    Redis(redis::RedisStore),
}

impl fmt::Debug for Idempotency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Idempotency")
            .field("shared", &matches!(self.inner.store, Store::Redis(_)))
            .field("retention", &self.inner.retention)
            .finish()
    }
}

impl Idempotency {
    /// Validates `config` (naming keys under `key_prefix`) and builds the records of `service`
    /// (the key-space name, e.g. `"router"`). With `redis_url` the connection is made lazily, so
    /// this needs a Tokio runtime but not a running Redis.
    pub fn from_config(
        config: &IdempotencyConfig,
        key_prefix: &str,
        service: &'static str,
    ) -> Result<Self, ConfigError> {
        config.validate(key_prefix)?;
        let store =
            match &config.redis_url {
                None => Store::Memory(memory::MemoryStore::default()),
                Some(url) => Store::Redis(redis::RedisStore::lazy(url).map_err(|error| {
                    ConfigError::invalid(format!("{key_prefix}.redis_url"), error)
                })?),
            };
        Ok(Self {
            inner: Arc::new(Inner {
                store,
                retention: config.retention,
                prefix: config.key_prefix.clone(),
                service,
            }),
        })
    }

    /// In-process records with the default retention (tests, `weir up`).
    pub fn in_memory(service: &'static str) -> Self {
        Self {
            inner: Arc::new(Inner {
                store: Store::Memory(memory::MemoryStore::default()),
                retention: DEFAULT_RETENTION,
                prefix: DEFAULT_PREFIX.to_string(),
                service,
            }),
        }
    }

    /// Claims `key` of `tenant` for a request with `fingerprint`, waiting (until `deadline`) for a
    /// request that holds it; see the module doc for the answers. `key` must have passed
    /// [`validate_key`].
    pub async fn claim(
        &self,
        tenant: &Tenant,
        key: &str,
        fingerprint: Fingerprint,
        deadline: Option<Deadline>,
    ) -> Result<Claim, ApiError> {
        let redis_key = KeySpace::new(&self.inner.prefix, tenant, self.inner.service)
            .key(&format!("idem:{key}"));
        let fingerprint = fingerprint.hex();
        let mut pause = POLL_FIRST;
        loop {
            let token = format!("{:032x}", rand::random::<u128>());
            let lease = deadline.map_or(DEFAULT_LEASE, |d| d.remaining() + LEASE_MARGIN);
            let existing = self
                .inner
                .store
                .try_claim(&redis_key, &token, &fingerprint, lease)
                .await
                .map_err(unavailable)?;
            let Some(record) = existing else {
                return Ok(Claim::Run(Guard {
                    inner: Some(GuardState {
                        records: self.clone(),
                        key: redis_key,
                        token,
                    }),
                }));
            };
            if record.fingerprint != fingerprint {
                let why = format!(
                    "{key:?} was already used for a different request; use a new id for a new \
                     request (a retry must repeat the request exactly)"
                );
                return Err(ApiError::new(
                    Code::InvalidArgument,
                    KEY_REUSED,
                    format!("request_id: {why}"),
                )
                .with_field_violation("request_id", why));
            }
            if record.done {
                return Ok(Claim::Replay(record.answer));
            }
            // Another request holds the key: wait for its outcome, within our own deadline.
            let wake = Instant::now() + pause;
            if deadline.is_some_and(|d| d.instant() <= wake) {
                return Err(ApiError::new(
                    Code::Aborted,
                    KEY_IN_PROGRESS,
                    format!(
                        "a request with request_id {key:?} is still running; retry to get its \
                         answer"
                    ),
                )
                .with_retry_after(IN_PROGRESS_RETRY));
            }
            tokio::time::sleep_until(wake).await;
            pause = (pause * 2).min(POLL_MAX);
        }
    }
}

/// The answer to a request whose record could not be read or written.
fn unavailable(error: StoreError) -> ApiError {
    tracing::warn!(%error, "idempotency store unavailable");
    ApiError::unavailable(
        STORE_UNAVAILABLE,
        format!("the idempotency record could not be read or written ({error}); retry later"),
    )
    .with_retry_after(UNAVAILABLE_RETRY)
}

impl Store {
    async fn try_claim(
        &self,
        key: &str,
        token: &str,
        fingerprint: &str,
        lease: Duration,
    ) -> Result<Option<Record>, StoreError> {
        match self {
            Store::Memory(store) => Ok(store.try_claim(key, token, fingerprint, lease)),
            Store::Redis(store) => store.try_claim(key, token, fingerprint, lease).await,
        }
    }

    async fn complete(
        &self,
        key: &str,
        token: &str,
        answer: &[u8],
        retention: Duration,
    ) -> Result<bool, StoreError> {
        match self {
            Store::Memory(store) => Ok(store.complete(key, token, answer, retention)),
            Store::Redis(store) => store.complete(key, token, answer, retention).await,
        }
    }

    async fn release(&self, key: &str, token: &str) -> Result<(), StoreError> {
        match self {
            Store::Memory(store) => {
                store.release(key, token);
                Ok(())
            }
            Store::Redis(store) => store.release(key, token).await,
        }
    }
}

/// A claimed key: complete it with the request's answer, or release it. Dropped without either,
/// it releases the key on a spawned task (the request was abandoned: its retry should run).
#[derive(Debug)]
pub struct Guard {
    inner: Option<GuardState>,
}

struct GuardState {
    records: Idempotency,
    key: String,
    token: String,
}

impl fmt::Debug for GuardState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Guard").field("key", &self.key).finish()
    }
}

impl Guard {
    /// Records `answer` as the key's outcome, kept for the retention, before the caller sends it.
    /// Fails with UNAVAILABLE when the store cannot record it (the answer may still be sent; a
    /// retry would then run again). `Ok(false)` when the key was no longer this request's (its
    /// lease expired and another request took over).
    pub async fn complete(mut self, answer: &[u8]) -> Result<bool, ApiError> {
        let Some(state) = self.inner.take() else {
            return Ok(false);
        };
        let retention = state.records.inner.retention;
        state
            .records
            .inner
            .store
            .complete(&state.key, &state.token, answer, retention)
            .await
            .map_err(unavailable)
    }

    /// Gives the key up (the request failed transiently): a retry, or a request waiting on it,
    /// runs. Failures only leave the record to expire with its lease.
    pub async fn release(mut self) {
        if let Some(state) = self.inner.take() {
            state.release().await;
        }
    }
}

impl GuardState {
    async fn release(self) {
        if let Err(error) = self
            .records
            .inner
            .store
            .release(&self.key, &self.token)
            .await
        {
            tracing::warn!(%error, key = %self.key, "idempotency key not released; it expires with its lease");
        }
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(state) = self.inner.take()
            && let Ok(handle) = tokio::runtime::Handle::try_current()
        {
            handle.spawn(state.release());
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests;
