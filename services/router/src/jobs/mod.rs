//! Asynchronous jobs: `SubmitJob` queues a `CompleteRequest`, a worker pool runs it through the
//! router's own `Complete`, and `GetJob`, `WatchJob`, `CancelJob` and `ListJobs` read it back.
//!
//! - [`JobStore`] keeps the jobs and their queue: on Redis Streams ([`redis`]) or, for `weir up`
//!   without Redis, in the process ([`memory`]). Both implement the model below, and one test
//!   suite runs against both.
//! - [`api`] serves the five RPCs; [`worker`] runs jobs.
//! - [`JobsConfig`] is the `[router.jobs]` table.
//!
//! docs/jobs.md explains the design (streams, leases, reclaim, idempotency, why the result is
//! written before the delivery is acknowledged).
//!
//! # The model every store implements
//!
//! A job is QUEUED, then RUNNING under one worker's lease, then SUCCEEDED, FAILED, CANCELLED or
//! EXPIRED. Terminal states never change: every transition checks the state and applies in one
//! atomic step (one Lua script on Redis, one lock in memory), so of a cancel racing a completion
//! exactly one wins.
//!
//! - `submit` with a known `request_id` returns the first job and queues nothing; a queue holding
//!   `capacity` open jobs refuses with [`JobsError::Full`].
//! - `next` reads a new delivery for a consumer; `reclaim` takes over deliveries another consumer
//!   has held longer than the handler limit (its worker died or hangs).
//! - `lost` returns the RUNNING job of a reclaimed delivery to QUEUED.
//! - `start` runs a delivery: RUNNING with `attempts + 1`, or the delivery is dropped because the
//!   job is terminal, EXPIRED (it waited past its ttl) or dead-lettered (it had `max_deliveries`).
//! - `succeed` and `fail` end the job and acknowledge its delivery in the same step; `retry`
//!   queues it again after a backoff (or dead-letters it).
//! - `cancel` ends a job that has not ended; `expire` ends one that waited past its ttl without
//!   starting, when a read finds it before a worker does.
//! - A job with a callback that ends gets an entry in the callback outbox in the same step;
//!   `claim_callbacks` and `callback_outcome` serve the [`callbacks::Dispatcher`].
//! - Batches ([`batch`]) are jobs of a second queue ([`Queue::Batch`]) that a batch record feeds
//!   a few at a time; `create_batch`, `get_batch`, `cancel_batch` and `batch_results` serve the
//!   batch RPCs, and `reclaim` also starts, expires and closes the batches that are due.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use weir_mesh::{ApiError, config::ConfigError, tenant::Tenant};
use weir_proto::router::{CompleteResponse, Job, JobError, JobState};

pub mod api;
pub mod batch;
pub mod batch_api;
pub mod callbacks;
pub mod files;
pub mod memory;
pub mod redis;
pub mod schedule;
pub mod worker;

#[cfg(test)]
mod tests;

pub use memory::MemoryJobs;
pub use redis::RedisJobs;

/// `JobState` values as stored.
pub mod state {
    /// Waiting for a worker.
    pub const QUEUED: i32 = 1;
    /// A worker is running it.
    pub const RUNNING: i32 = 2;
    /// Finished with a result.
    pub const SUCCEEDED: i32 = 3;
    /// Failed with an error.
    pub const FAILED: i32 = 4;
    /// Cancelled by the client.
    pub const CANCELLED: i32 = 5;
    /// Not started before its ttl.
    pub const EXPIRED: i32 = 6;

    /// Whether `state` never changes again.
    pub fn is_terminal(state: i32) -> bool {
        state >= SUCCEEDED
    }
}

/// Reason of the error of a job given up after `max_deliveries`.
pub const MAX_DELIVERIES: &str = "MAX_DELIVERIES";
/// Reason of a `SubmitJob` refused because the queue holds `capacity` open jobs.
pub const QUEUE_FULL: &str = "QUEUE_FULL";
/// Reason of a job RPC on a router whose jobs are off.
pub const JOBS_DISABLED: &str = "JOBS_DISABLED";

/// A queue of deliveries: one stream (on Redis) per tier.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum Queue {
    /// `SubmitJob`'s jobs, run at SHEDDABLE_PLUS.
    #[default]
    Async,
    /// Batch items, run at SHEDDABLE and priced at the batch tier.
    Batch,
}

impl Queue {
    /// The name in keys (`<prefix>:{router:jobs}:<name>`) and scripts.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Async => "async",
            Self::Batch => "batch",
        }
    }
}

/// The `[router.jobs]` table.
///
/// ```toml
/// [router.jobs]
/// enabled = true            # false: the job RPCs answer FAILED_PRECONDITION JOBS_DISABLED
/// redis_url = "redis://127.0.0.1:6379"  # unset: the queue lives in this process (weir up)
/// key_prefix = "weir"
/// workers = 2               # workers in the router process (0: only `weir serve worker` runs jobs)
/// capacity = 10000          # open jobs the queue holds; beyond: RESOURCE_EXHAUSTED QUEUE_FULL
/// max_deliveries = 5        # deliveries before a job is dead-lettered
/// handler_limit = "5m"      # longest a job may run; a delivery idle longer is reclaimed
/// backoff = "1s"            # first retry delay, doubled per attempt, at most `max_backoff`
/// max_backoff = "1m"
/// default_ttl = "24h"       # how long a job may wait when SubmitJob's ttl is 0
/// retention = "7d"          # how long an ended job (and batch) is kept
/// [router.jobs.callbacks]   # see callbacks::CallbacksConfig
/// [router.jobs.batches]     # see batch::BatchesConfig
/// [[router.jobs.schedules]] # recurring batches, see schedule::ScheduleConfig
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct JobsConfig {
    /// Whether the job RPCs are served (default true).
    pub enabled: bool,
    /// Redis holding the queue (shared by every router replica and `weir serve worker`); unset
    /// keeps it in this process, lost on restart.
    pub redis_url: Option<String>,
    /// Prefix of every key.
    pub key_prefix: String,
    /// Workers run by this router process.
    pub workers: usize,
    /// Open (not terminal) jobs the queue holds.
    pub capacity: u64,
    /// Deliveries of a job before it is dead-lettered.
    pub max_deliveries: u32,
    /// Longest a job's `Complete` call may take; a delivery held longer is reclaimed.
    #[serde(with = "humantime_serde")]
    pub handler_limit: Duration,
    /// Delay before the first retry of a failed attempt; doubled for each further attempt.
    #[serde(with = "humantime_serde")]
    pub backoff: Duration,
    /// Longest retry delay.
    #[serde(with = "humantime_serde")]
    pub max_backoff: Duration,
    /// How long a job may wait for a worker when its request sets no ttl.
    #[serde(with = "humantime_serde")]
    pub default_ttl: Duration,
    /// How long an ended job (and a `request_id`) is kept.
    #[serde(with = "humantime_serde")]
    pub retention: Duration,
    /// Job callbacks (webhooks).
    pub callbacks: callbacks::CallbacksConfig,
    /// Batches.
    pub batches: batch::BatchesConfig,
    /// Recurring batches, created by every process that runs workers.
    pub schedules: Vec<schedule::ScheduleConfig>,
}

impl Default for JobsConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            redis_url: None,
            key_prefix: weir_mesh::store::DEFAULT_PREFIX.to_string(),
            workers: 2,
            capacity: 10_000,
            max_deliveries: 5,
            handler_limit: Duration::from_secs(300),
            backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(60),
            default_ttl: Duration::from_secs(24 * 3600),
            retention: Duration::from_secs(7 * 24 * 3600),
            callbacks: callbacks::CallbacksConfig::default(),
            batches: batch::BatchesConfig::default(),
            schedules: Vec::new(),
        }
    }
}

impl JobsConfig {
    /// Checks the values, naming the bad key under `key` (`router.jobs`).
    pub fn validate(&self, key: &str) -> Result<(), ConfigError> {
        if self.capacity == 0 {
            return Err(ConfigError::invalid(
                format!("{key}.capacity"),
                "must be > 0",
            ));
        }
        if self.max_deliveries == 0 {
            return Err(ConfigError::invalid(
                format!("{key}.max_deliveries"),
                "must be > 0",
            ));
        }
        if self.handler_limit.is_zero() {
            return Err(ConfigError::invalid(
                format!("{key}.handler_limit"),
                "must be > 0",
            ));
        }
        if self.retention.is_zero() || self.default_ttl.is_zero() {
            return Err(ConfigError::invalid(
                format!("{key}.retention"),
                "retention and default_ttl must be > 0",
            ));
        }
        if self.key_prefix.is_empty() || self.key_prefix.contains(char::is_whitespace) {
            return Err(ConfigError::invalid(
                format!("{key}.key_prefix"),
                "must be non-empty, without spaces",
            ));
        }
        self.callbacks.validate(&format!("{key}.callbacks"))?;
        self.batches.validate(&format!("{key}.batches"))?;
        schedule::parse_all(&self.schedules, &format!("{key}.schedules")).map(|_| ())
    }

    /// The retry delay after `attempts` attempts.
    pub fn backoff_after(&self, attempts: u32) -> Duration {
        let factor = 2u32.saturating_pow(attempts.saturating_sub(1).min(16));
        self.backoff.saturating_mul(factor).min(self.max_backoff)
    }

    /// How long a delivery may be held before another worker reclaims it.
    pub fn reclaim_after(&self) -> Duration {
        self.handler_limit + Duration::from_secs(1)
    }
}

/// A job as stored: the submitted content (`body`) and the state transitions change.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct JobRecord {
    /// Job id.
    pub id: String,
    /// `JobState` value.
    pub state: i32,
    /// Deliveries started.
    pub attempts: u32,
    /// Submission, Unix ms.
    pub create_ms: i64,
    /// Start of the latest attempt, Unix ms (0: never).
    pub start_ms: i64,
    /// End, Unix ms (0: not ended).
    pub end_ms: i64,
    /// When a job that never started expires, Unix ms.
    pub expire_ms: i64,
    /// Submission sequence of the tenant (ListJobs order).
    pub seq: u64,
    /// The stream entry of its current delivery ("" when none).
    pub entry: String,
    /// The consumer running it, while RUNNING.
    pub lease: String,
    /// The submitted job: id, request, callback, create time.
    pub body: Job,
    /// The answer, once SUCCEEDED.
    pub result: Option<CompleteResponse>,
    /// The failure, once FAILED.
    pub error: Option<JobError>,
    /// The error of the latest failed attempt.
    pub last_error: Option<JobError>,
    /// Callback attempts made.
    pub callback_attempts: u32,
    /// The callback's end: "delivered", "gone" (HTTP 410), "failed" (given up), "" (pending or
    /// none).
    pub callback_status: String,
}

impl JobRecord {
    /// The job as the API returns it.
    pub fn to_job(&self) -> Job {
        let mut job = self.body.clone();
        job.id.clone_from(&self.id);
        job.state = self.state;
        job.attempts = i32::try_from(self.attempts).unwrap_or(i32::MAX);
        job.create_time = timestamp(self.create_ms);
        job.start_time = timestamp(self.start_ms);
        job.end_time = timestamp(self.end_ms);
        job.result.clone_from(&self.result);
        job.error.clone_from(&self.error);
        job.callback_delivered = self.callback_status == "delivered";
        job
    }

    /// Whether the job has ended.
    pub fn is_terminal(&self) -> bool {
        state::is_terminal(self.state)
    }

    /// Whether the job waited past its ttl without ever starting (it is due to be EXPIRED).
    pub fn is_expired(&self, now_ms: i64) -> bool {
        self.state == state::QUEUED
            && self.attempts == 0
            && self.expire_ms > 0
            && self.expire_ms <= now_ms
    }
}

/// A job to submit.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct NewJob {
    /// New random id (used unless `request_id` is known).
    pub id: String,
    /// Idempotency key ("" = none).
    pub request_id: String,
    /// The job's content.
    pub body: Job,
    /// When it expires if no worker started it, Unix ms.
    pub expire_ms: i64,
}

/// What `submit` did.
#[derive(Debug, Clone, PartialEq)]
pub struct Submitted {
    /// The job.
    pub job: JobRecord,
    /// False when `request_id` named an existing job, returned instead.
    pub created: bool,
}

/// One delivery of a job to a worker (a stream entry).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    /// The queue (stream) it came from.
    pub queue: Queue,
    /// The job's tenant.
    pub tenant: Tenant,
    /// The job id.
    pub id: String,
    /// The stream entry id.
    pub entry: String,
}

/// A page of `ListJobs`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct JobPage {
    /// The jobs, newest first.
    pub jobs: Vec<JobRecord>,
    /// The sequence to continue below (None: last page).
    pub next: Option<u64>,
}

/// A `ListJobs` query.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ListQuery {
    /// Most jobs.
    pub limit: usize,
    /// Only jobs with a sequence below this.
    pub before: Option<u64>,
    /// Only jobs in this state (0: all).
    pub state: i32,
}

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum JobsError {
    /// The queue holds `capacity` open jobs.
    #[error("the job queue is full ({0} open jobs); retry later")]
    Full(u64),
    /// The batch queue cannot hold another batch of this size (`capacity` open items).
    #[error(
        "the batch queue is full (at most {0} items of open batches); retry later or send fewer items"
    )]
    BatchesFull(u64),
    /// Redis failed.
    #[error("job store: {0}")]
    Redis(#[from] ::redis::RedisError),
    /// A stored value could not be read.
    #[error("job store: {0}")]
    Corrupt(String),
}

impl From<JobsError> for ApiError {
    fn from(error: JobsError) -> Self {
        match error {
            JobsError::Full(_) => ApiError::new(
                tonic::Code::ResourceExhausted,
                QUEUE_FULL,
                error.to_string(),
            )
            .with_retry_after(Duration::from_secs(5)),
            JobsError::BatchesFull(_) => ApiError::new(
                tonic::Code::ResourceExhausted,
                batch::BATCH_QUEUE_FULL,
                error.to_string(),
            )
            .with_retry_after(Duration::from_secs(60)),
            JobsError::Redis(_) | JobsError::Corrupt(_) => {
                ApiError::unavailable("JOB_STORE_UNAVAILABLE", error.to_string())
                    .with_retry_after(Duration::from_secs(1))
            }
        }
    }
}

/// Where jobs live: Redis, or this process's memory. Cheap to clone.
#[derive(Debug, Clone)]
pub enum JobStore {
    /// Redis Streams.
    Redis(RedisJobs),
    /// In memory (`weir up` without Redis).
    Memory(MemoryJobs),
}

/// Calls the same method on either store.
macro_rules! each {
    ($self:expr, $store:ident => $call:expr) => {
        match $self {
            JobStore::Redis($store) => $call,
            JobStore::Memory($store) => $call,
        }
    };
}

impl JobStore {
    /// The store `config` names (Redis connects on first use). None when jobs are off.
    pub fn from_config(config: &JobsConfig, key: &str) -> Result<Option<Self>, ConfigError> {
        if !config.enabled {
            return Ok(None);
        }
        config.validate(key)?;
        Ok(Some(match &config.redis_url {
            Some(url) => Self::Redis(
                RedisJobs::lazy(url, &config.key_prefix)
                    .map_err(|error| ConfigError::invalid(format!("{key}.redis_url"), error))?,
            ),
            None => Self::Memory(MemoryJobs::default()),
        }))
    }

    /// Queues `new` for `tenant`, unless the queue is full or `request_id` is known.
    pub async fn submit(
        &self,
        tenant: &Tenant,
        new: NewJob,
        config: &JobsConfig,
    ) -> Result<Submitted, JobsError> {
        each!(self, s => s.submit(tenant, new, config, now_ms()).await)
    }

    /// The job, if `tenant` has it.
    pub async fn get(&self, tenant: &Tenant, id: &str) -> Result<Option<JobRecord>, JobsError> {
        each!(self, s => s.get(tenant, id).await)
    }

    /// `job` as a reader should see it: EXPIRED (stored so) when it waited past its ttl without
    /// starting, before any worker reached it; else unchanged.
    pub async fn fresh(
        &self,
        tenant: &Tenant,
        job: JobRecord,
        config: &JobsConfig,
    ) -> Result<JobRecord, JobsError> {
        let now = now_ms();
        if !job.is_expired(now) {
            return Ok(job);
        }
        let expired = each!(self, s => s.expire(tenant, &job.id, config, now).await)?;
        Ok(expired.unwrap_or(job))
    }

    /// A page of the tenant's jobs, newest first.
    pub async fn list(&self, tenant: &Tenant, query: ListQuery) -> Result<JobPage, JobsError> {
        each!(self, s => s.list(tenant, query).await)
    }

    /// Cancels the job unless it has ended; None when `tenant` has no such job.
    pub async fn cancel(
        &self,
        tenant: &Tenant,
        id: &str,
        config: &JobsConfig,
    ) -> Result<Option<JobRecord>, JobsError> {
        each!(self, s => s.cancel(tenant, id, config, now_ms()).await)
    }

    /// New deliveries for `consumer`, waiting at most `wait`: at most one per queue, the async
    /// one first. They are the consumer's (pending) until acknowledged.
    pub async fn next(&self, consumer: &str, wait: Duration) -> Result<Vec<Delivery>, JobsError> {
        each!(self, s => s.next(consumer, wait).await)
    }

    /// The janitor's round: moves jobs whose retry backoff is over back onto their queue; starts,
    /// expires and goes on closing the batches that are due; and returns the deliveries held by
    /// any consumer longer than `idle` (workers use [`JobsConfig::reclaim_after`]), now
    /// `consumer`'s (XAUTOCLAIM).
    pub async fn reclaim(
        &self,
        consumer: &str,
        idle: Duration,
        config: &JobsConfig,
    ) -> Result<Vec<Delivery>, JobsError> {
        each!(self, s => s.reclaim(consumer, idle, config, now_ms()).await)
    }

    /// Creates a batch (or returns the one created with the same `request_id`): IN_PROGRESS, its
    /// first items queued at once unless `not_before` is ahead. [`JobsError::Full`] when the
    /// batch queue cannot hold its items.
    pub async fn create_batch(
        &self,
        tenant: &Tenant,
        new: batch::NewBatch,
        config: &JobsConfig,
    ) -> Result<batch::Created, JobsError> {
        each!(self, s => s.create_batch(tenant, new, config, now_ms()).await)
    }

    /// The batch, if `tenant` has it.
    pub async fn get_batch(
        &self,
        tenant: &Tenant,
        id: &str,
    ) -> Result<Option<batch::BatchRecord>, JobsError> {
        each!(self, s => s.get_batch(tenant, id).await)
    }

    /// Cancels the batch unless it has ended (see [`batch`]); None when `tenant` has no such
    /// batch.
    pub async fn cancel_batch(
        &self,
        tenant: &Tenant,
        id: &str,
        config: &JobsConfig,
    ) -> Result<Option<batch::BatchRecord>, JobsError> {
        each!(self, s => s.cancel_batch(tenant, id, config, now_ms()).await)
    }

    /// Up to `limit` results of the batch from position `from` (0: the first item that ended).
    pub async fn batch_results(
        &self,
        tenant: &Tenant,
        id: &str,
        from: u64,
        limit: usize,
    ) -> Result<batch::ResultsPage, JobsError> {
        each!(self, s => s.batch_results(tenant, id, from, limit).await)
    }

    /// A page of the tenant's batches, newest first: at most `limit`, created before the
    /// sequence `before` (None: from the newest).
    pub async fn list_batches(
        &self,
        tenant: &Tenant,
        limit: usize,
        before: Option<u64>,
    ) -> Result<batch::BatchPage, JobsError> {
        each!(self, s => s.list_batches(tenant, limit, before).await)
    }

    /// The jobs of the batch's items queued or running now.
    pub async fn batch_active(
        &self,
        tenant: &Tenant,
        id: &str,
    ) -> Result<Vec<JobRecord>, JobsError> {
        each!(self, s => s.batch_active(tenant, id).await)
    }

    /// Returns the RUNNING job of a `delivery` just reclaimed by `consumer` to QUEUED: the worker
    /// that held it stopped ([`JobStore::start`] then counts the next attempt).
    pub async fn lost(&self, delivery: &Delivery, consumer: &str) -> Result<(), JobsError> {
        each!(self, s => s.lost(delivery, consumer, now_ms()).await)
    }

    /// Starts `delivery` for `consumer`: the job to run, or None when the delivery was dropped.
    pub async fn start(
        &self,
        delivery: &Delivery,
        consumer: &str,
        config: &JobsConfig,
    ) -> Result<Option<JobRecord>, JobsError> {
        each!(self, s => s.start(delivery, consumer, config, now_ms()).await)
    }

    /// Stores the result (SUCCEEDED) and acknowledges the delivery; false when the job had
    /// already ended (cancelled, or finished by another worker).
    pub async fn succeed(
        &self,
        delivery: &Delivery,
        result: &CompleteResponse,
        config: &JobsConfig,
    ) -> Result<bool, JobsError> {
        each!(self, s => s.succeed(delivery, result, config, now_ms()).await)
    }

    /// Ends the job FAILED with `error` and acknowledges the delivery; false when it had already
    /// ended.
    pub async fn fail(
        &self,
        delivery: &Delivery,
        error: &JobError,
        config: &JobsConfig,
    ) -> Result<bool, JobsError> {
        each!(self, s => s.fail(delivery, error, config, now_ms()).await)
    }

    /// Queues the job again after `backoff`, or dead-letters it after `max_deliveries`.
    pub async fn retry(
        &self,
        delivery: &Delivery,
        error: &JobError,
        backoff: Duration,
        config: &JobsConfig,
    ) -> Result<(), JobsError> {
        each!(self, s => s.retry(delivery, error, backoff, config, now_ms()).await)
    }

    /// Claims up to `limit` due callback deliveries for `lease` (they are due again after it
    /// unless an outcome is recorded first).
    pub async fn claim_callbacks(
        &self,
        lease: Duration,
        limit: usize,
    ) -> Result<Vec<(Tenant, String)>, JobsError> {
        each!(self, s => s.claim_callbacks(lease, limit, now_ms()).await)
    }

    /// Records a callback attempt's outcome (a final one removes the outbox entry).
    pub async fn callback_outcome(
        &self,
        tenant: &Tenant,
        id: &str,
        outcome: callbacks::Outcome,
    ) -> Result<(), JobsError> {
        each!(self, s => s.callback_outcome(tenant, id, outcome).await)
    }

    /// Stores an uploaded file for `tenant` (see [`files`]); it is dropped at `meta.expires_ms`.
    pub async fn put_file(
        &self,
        tenant: &Tenant,
        file: files::StoredFile,
    ) -> Result<(), JobsError> {
        each!(self, s => s.put_file(tenant, file, now_ms()).await)
    }

    /// The tenant's file with its content, if it has one by that id.
    pub async fn get_file(
        &self,
        tenant: &Tenant,
        id: &str,
    ) -> Result<Option<files::StoredFile>, JobsError> {
        each!(self, s => s.get_file(tenant, id, now_ms()).await)
    }

    /// The tenant's files, newest first.
    pub async fn list_files(&self, tenant: &Tenant) -> Result<Vec<files::FileMeta>, JobsError> {
        each!(self, s => s.list_files(tenant, now_ms()).await)
    }

    /// Deletes the tenant's file; false when it had none by that id.
    pub async fn delete_file(&self, tenant: &Tenant, id: &str) -> Result<bool, JobsError> {
        each!(self, s => s.delete_file(tenant, id, now_ms()).await)
    }

    /// Deliveries read but not acknowledged (the stream's pending list).
    pub async fn pending(&self) -> Result<u64, JobsError> {
        each!(self, s => s.pending().await)
    }

    /// `(tenant, id)` of the dead-lettered jobs, oldest first.
    pub async fn dead_letters(&self) -> Result<Vec<(String, String)>, JobsError> {
        each!(self, s => s.dead_letters().await)
    }
}

/// Now, Unix ms.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// A protobuf timestamp of Unix ms (None for 0).
pub(crate) fn timestamp(ms: i64) -> Option<prost_types::Timestamp> {
    (ms > 0).then(|| prost_types::Timestamp {
        seconds: ms.div_euclid(1000),
        nanos: i32::try_from(ms.rem_euclid(1000) * 1_000_000).unwrap_or(0),
    })
}

/// The `JobState` name of a stored value, for messages.
pub fn state_name(value: i32) -> &'static str {
    JobState::try_from(value).map_or("UNKNOWN", |s| s.as_str_name())
}
