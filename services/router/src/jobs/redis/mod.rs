//! The job store on Redis: job records in hashes, deliveries in a stream with a consumer group.
//!
//! The key layout is documented at the top of `lua/prelude.lua`. Every key of the job store
//! (every tenant's jobs and batches, and the queues they share) starts with
//! `<prefix>:{router:jobs}`, one Redis Cluster hash slot: a transition moves a tenant's job and
//! a shared queue's entry together, atomically, so on a cluster they must be in one slot. The
//! trade-off: the job store is served by one master of a cluster (and fails over to its
//! replica), it does not spread over the masters; the other stores, per tenant, do.
//! Uploaded files are per tenant (`<prefix>:{<tenant>}:file:...`), outside that slot. Every transition is one Lua
//! script (`lua/*.lua`, each starting with the prelude) that checks the job's state and applies
//! atomically: moving the job, counting the queue's open jobs, acknowledging (XACK, then XDEL)
//! the delivery and publishing the change. Reads of the stream (XREADGROUP, XAUTOCLAIM) are plain
//! commands: a delivery read twice is harmless, because `start` checks the job.
//!
//! A worker's blocking XREADGROUP runs on a connection of its own (one per consumer name, made
//! like the store's: to the server, or a cluster connection of its own), so it never holds up
//! the scripts on the shared connection: Redis answers one connection's commands in order, so a
//! BLOCK on a shared connection would delay every command queued behind it on that node.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex as StdMutex},
    time::Duration,
};

use prost::Message as _;
use redis::{
    Script, Value,
    streams::{StreamAutoClaimReply, StreamId, StreamReadReply},
};
use weir_mesh::{
    store::{
        ConnectOptions, KeySpace, RedisConnection, check_url, connect_lazy, connect_with, redact,
    },
    tenant::Tenant,
};
use weir_proto::router::{CompleteResponse, Job, JobError};

use super::{
    Delivery, JobPage, JobRecord, JobsConfig, JobsError, ListQuery, NewJob, Queue, Submitted,
};

mod batches;
mod files;

/// Both queues, the async one first.
const QUEUES: [Queue; 2] = [Queue::Async, Queue::Batch];

const PRELUDE: &str = include_str!("../lua/prelude.lua");
/// The consumer group of the workers.
pub const GROUP: &str = "workers";
/// The job store's connections: the store defaults' timeouts, one reconnection per command.
const OPTIONS: ConnectOptions = ConnectOptions {
    connect_timeout: weir_mesh::store::DEFAULT_CONNECT_TIMEOUT,
    response_timeout: weir_mesh::store::DEFAULT_RESPONSE_TIMEOUT,
    retries: Some(1),
};
/// Most jobs moved from the delayed set to the stream per reclaim.
const PROMOTE_BATCH: u32 = 100;
/// Most index entries one `ListJobs` call reads.
const LIST_SCAN_LIMIT: usize = 10_000;
/// Most deliveries reclaimed at once.
const RECLAIM_BATCH: u32 = 16;
/// Longest one blocking read waits (a longer wait asked for returns early, empty): a reader's
/// connection allows a command this long plus [`OPTIONS`]' response timeout.
const MAX_BLOCK: Duration = Duration::from_secs(10);

struct Scripts {
    submit: Script,
    start: Script,
    succeed: Script,
    fail: Script,
    retry: Script,
    cancel: Script,
    promote: Script,
    lost: Script,
    expire: Script,
    callback_claim: Script,
    callback_outcome: Script,
    batch_begin: Script,
    batch_add: Script,
    batch_open: Script,
    batch_cancel: Script,
    batch_tick: Script,
}

impl Scripts {
    fn new() -> Self {
        let script = |body: &str| Script::new(&format!("{PRELUDE}\n{body}"));
        Self {
            submit: script(include_str!("../lua/submit.lua")),
            start: script(include_str!("../lua/start.lua")),
            succeed: script(include_str!("../lua/succeed.lua")),
            fail: script(include_str!("../lua/fail.lua")),
            retry: script(include_str!("../lua/retry.lua")),
            cancel: script(include_str!("../lua/cancel.lua")),
            promote: script(include_str!("../lua/promote.lua")),
            lost: script(include_str!("../lua/lost.lua")),
            expire: script(include_str!("../lua/expire.lua")),
            callback_claim: script(include_str!("../lua/callback_claim.lua")),
            callback_outcome: script(include_str!("../lua/callback_outcome.lua")),
            batch_begin: script(include_str!("../lua/batch_begin.lua")),
            batch_add: script(include_str!("../lua/batch_add.lua")),
            batch_open: script(include_str!("../lua/batch_open.lua")),
            batch_cancel: script(include_str!("../lua/batch_cancel.lua")),
            batch_tick: script(include_str!("../lua/batch_tick.lua")),
        }
    }
}

/// The job store on Redis. Cheap to clone (clones share the connections).
#[derive(Clone)]
pub struct RedisJobs {
    /// The store's URL, for the readers' connections.
    url: Arc<str>,
    conn: RedisConnection,
    prefix: Arc<str>,
    /// `<prefix>:{router:jobs}`, the start of every key of the job store (its one hash slot).
    root: Arc<str>,
    scripts: Arc<Scripts>,
    /// Each consumer's connection for blocking reads.
    readers: Arc<StdMutex<HashMap<String, RedisConnection>>>,
}

impl std::fmt::Debug for RedisJobs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisJobs")
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

impl RedisJobs {
    /// A store connecting on first use, so Redis may start after the router.
    pub fn lazy(url: &str, prefix: &str) -> Result<Self, String> {
        check_url(url).map_err(|error| format!("{}: {error}", redact(url)))?;
        let conn = connect_lazy(url, &OPTIONS).map_err(|error| error.to_string())?;
        Ok(Self {
            url: url.into(),
            conn,
            prefix: prefix.into(),
            root: KeySpace::shared(prefix, "router", "jobs").base().into(),
            scripts: Arc::new(Scripts::new()),
            readers: Arc::default(),
        })
    }

    /// `<prefix>:{router:jobs}:<queue>`, a queue's stream.
    pub fn stream_key(&self, queue: Queue) -> String {
        format!("{}:{}", self.root, queue.as_str())
    }

    fn invocation<'a>(
        &self,
        script: &'a Script,
        tenant: &str,
        now_ms: i64,
    ) -> redis::ScriptInvocation<'a> {
        let mut invocation = script.prepare_invoke();
        invocation
            .key(&*self.root)
            .arg(&*self.prefix)
            .arg(tenant)
            .arg(now_ms);
        invocation
    }

    async fn run(&self, invocation: &redis::ScriptInvocation<'_>) -> Result<Reply, JobsError> {
        let mut conn = self.conn.clone();
        let value: Value = invocation.invoke_async(&mut conn).await?;
        Reply::parse(value)
    }

    pub(super) async fn submit(
        &self,
        tenant: &Tenant,
        new: NewJob,
        config: &JobsConfig,
        now_ms: i64,
    ) -> Result<Submitted, JobsError> {
        let mut invocation = self.invocation(&self.scripts.submit, tenant.as_str(), now_ms);
        invocation
            .arg(&new.id)
            .arg(&new.request_id)
            .arg(new.body.encode_to_vec())
            .arg(new.expire_ms)
            .arg(config.capacity)
            .arg(millis(config.retention))
            .arg(if new.body.callback.is_some() {
                "1"
            } else {
                "0"
            });
        let reply = self.run(&invocation).await?;
        match reply.status.as_str() {
            "full" => Err(JobsError::Full(config.capacity)),
            "ok" | "exists" => Ok(Submitted {
                created: reply.status == "ok",
                job: reply.record()?,
            }),
            other => Err(unexpected(other)),
        }
    }

    pub(super) async fn get(
        &self,
        tenant: &Tenant,
        id: &str,
    ) -> Result<Option<JobRecord>, JobsError> {
        let mut conn = self.conn.clone();
        let flat: HashMap<String, Vec<u8>> = redis::cmd("HGETALL")
            .arg(self.job_key(tenant, id))
            .query_async(&mut conn)
            .await?;
        if flat.is_empty() {
            return Ok(None);
        }
        record(flat).map(Some)
    }

    fn job_key(&self, tenant: &Tenant, id: &str) -> String {
        format!("{}:{tenant}:job:{id}", self.root)
    }

    pub(super) async fn list(
        &self,
        tenant: &Tenant,
        query: ListQuery,
    ) -> Result<JobPage, JobsError> {
        let index = format!("{}:{tenant}:job:_index", self.root);
        let mut conn = self.conn.clone();
        let mut page = JobPage::default();
        let mut max = query.before.map_or("+inf".to_string(), |b| format!("({b}"));
        let mut scanned = 0;
        loop {
            if scanned >= LIST_SCAN_LIMIT {
                // A rare state filter must not read the whole history in one call: the caller
                // continues from here.
                page.next = max.trim_start_matches('(').parse().ok();
                return Ok(page);
            }
            let batch: Vec<(String, u64)> = redis::cmd("ZRANGE")
                .arg(&index)
                .arg(&max)
                .arg("-inf")
                .arg("BYSCORE")
                .arg("REV")
                .arg("LIMIT")
                .arg(0)
                .arg(query.limit.max(1))
                .arg("WITHSCORES")
                .query_async(&mut conn)
                .await?;
            let Some(&(_, last)) = batch.last() else {
                return Ok(page);
            };
            scanned += batch.len();
            for (id, seq) in batch {
                let Some(job) = self.get(tenant, &id).await? else {
                    // Expired past its retention: drop it from the index too.
                    let _: i64 = redis::cmd("ZREM")
                        .arg(&index)
                        .arg(&id)
                        .query_async(&mut conn)
                        .await?;
                    continue;
                };
                if query.state == 0 || job.state == query.state {
                    page.jobs.push(job);
                    if page.jobs.len() == query.limit {
                        page.next = Some(seq);
                        return Ok(page);
                    }
                }
            }
            max = format!("({last}");
        }
    }

    pub(super) async fn cancel(
        &self,
        tenant: &Tenant,
        id: &str,
        config: &JobsConfig,
        now_ms: i64,
    ) -> Result<Option<JobRecord>, JobsError> {
        let mut invocation = self.invocation(&self.scripts.cancel, tenant.as_str(), now_ms);
        invocation.arg(id).arg(millis(config.retention));
        let reply = self.run(&invocation).await?;
        match reply.status.as_str() {
            "not_found" => Ok(None),
            "ok" => reply.record().map(Some),
            other => Err(unexpected(other)),
        }
    }

    /// The consumer's own connection for blocking reads.
    async fn reader(&self, consumer: &str) -> Result<RedisConnection, JobsError> {
        if let Some(conn) = self.readers.lock().map_err(poisoned)?.get(consumer) {
            return Ok(conn.clone());
        }
        let options = ConnectOptions {
            response_timeout: MAX_BLOCK + OPTIONS.response_timeout,
            ..OPTIONS
        };
        let conn = connect_with(&self.url, &options)
            .await
            .map_err(|error| JobsError::from(error.source))?;
        self.readers
            .lock()
            .map_err(poisoned)?
            .insert(consumer.to_string(), conn.clone());
        Ok(conn)
    }

    /// Creates the streams and their group, if they do not exist yet.
    async fn ensure_groups(&self) -> Result<(), JobsError> {
        let mut conn = self.conn.clone();
        for queue in QUEUES {
            let created: redis::RedisResult<()> = redis::cmd("XGROUP")
                .arg("CREATE")
                .arg(self.stream_key(queue))
                .arg(GROUP)
                .arg("0")
                .arg("MKSTREAM")
                .query_async(&mut conn)
                .await;
            if let Err(error) = created
                && error.code() != Some("BUSYGROUP")
            {
                return Err(error.into());
            }
        }
        Ok(())
    }

    /// One blocking read of both streams for `consumer`: at most one new entry of each.
    async fn read(
        &self,
        conn: &mut RedisConnection,
        consumer: &str,
        wait: Duration,
    ) -> redis::RedisResult<Option<StreamReadReply>> {
        redis::cmd("XREADGROUP")
            .arg("GROUP")
            .arg(GROUP)
            .arg(consumer)
            .arg("COUNT")
            .arg(1)
            .arg("BLOCK")
            .arg(millis(wait.min(MAX_BLOCK)))
            .arg("STREAMS")
            .arg(self.stream_key(Queue::Async))
            .arg(self.stream_key(Queue::Batch))
            .arg(">")
            .arg(">")
            .query_async(conn)
            .await
    }

    pub(super) async fn next(
        &self,
        consumer: &str,
        wait: Duration,
    ) -> Result<Vec<Delivery>, JobsError> {
        let mut conn = self.reader(consumer).await?;
        let mut read = self.read(&mut conn, consumer, wait).await;
        if let Err(error) = &read
            && error.code() == Some("NOGROUP")
        {
            // A stream (or its group) does not exist yet: create both, then read.
            self.ensure_groups().await?;
            read = self.read(&mut conn, consumer, wait).await;
        }
        let reply = match read {
            Err(error) => {
                // Forget a reader whose read failed, so the next read connects afresh (and, on a
                // cluster, learns the slot map again) instead of failing on a broken connection.
                self.readers.lock().map_err(poisoned)?.remove(consumer);
                return Err(error.into());
            }
            Ok(reply) => reply,
        };
        let batch_stream = self.stream_key(Queue::Batch);
        let mut deliveries: Vec<Delivery> = reply
            .into_iter()
            .flat_map(|r| r.keys)
            .flat_map(|k| {
                let queue = if k.key == batch_stream {
                    Queue::Batch
                } else {
                    Queue::Async
                };
                k.ids
                    .into_iter()
                    .filter_map(move |entry| delivery(&entry, queue))
            })
            .collect();
        deliveries.sort_by_key(|d| d.queue == Queue::Batch);
        Ok(deliveries)
    }

    pub(super) async fn reclaim(
        &self,
        consumer: &str,
        idle: Duration,
        config: &JobsConfig,
        now_ms: i64,
    ) -> Result<Vec<Delivery>, JobsError> {
        let mut invocation = self.invocation(&self.scripts.promote, "", now_ms);
        invocation.arg(PROMOTE_BATCH);
        let mut conn = self.conn.clone();
        let _: Value = invocation.invoke_async(&mut conn).await?;
        self.tick_batches(config, now_ms).await?;
        let mut reclaimed = Vec::new();
        for queue in QUEUES {
            let claimed: redis::RedisResult<StreamAutoClaimReply> = redis::cmd("XAUTOCLAIM")
                .arg(self.stream_key(queue))
                .arg(GROUP)
                .arg(consumer)
                .arg(u64::try_from(idle.as_millis()).unwrap_or(u64::MAX))
                .arg("0-0")
                .arg("COUNT")
                .arg(RECLAIM_BATCH)
                .query_async(&mut conn)
                .await;
            let claimed = match claimed {
                Err(error) if error.code() == Some("NOGROUP") => {
                    self.ensure_groups().await?;
                    continue;
                }
                other => other?,
            };
            // An entry deleted since it was read (its job ended) has nothing left to run.
            reclaimed.extend(
                claimed
                    .claimed
                    .iter()
                    .filter_map(|entry| delivery(entry, queue)),
            );
        }
        Ok(reclaimed)
    }

    pub(super) async fn expire(
        &self,
        tenant: &Tenant,
        id: &str,
        config: &JobsConfig,
        now_ms: i64,
    ) -> Result<Option<JobRecord>, JobsError> {
        let mut invocation = self.invocation(&self.scripts.expire, tenant.as_str(), now_ms);
        invocation.arg(id).arg(millis(config.retention));
        let reply = self.run(&invocation).await?;
        match reply.status.as_str() {
            "not_found" => Ok(None),
            "ok" => reply.record().map(Some),
            other => Err(unexpected(other)),
        }
    }

    pub(super) async fn lost(
        &self,
        delivery: &Delivery,
        consumer: &str,
        now_ms: i64,
    ) -> Result<(), JobsError> {
        let mut invocation = self.invocation(&self.scripts.lost, delivery.tenant.as_str(), now_ms);
        invocation.arg(&delivery.id).arg(consumer);
        self.run(&invocation).await.map(|_| ())
    }

    pub(super) async fn start(
        &self,
        delivery: &Delivery,
        consumer: &str,
        config: &JobsConfig,
        now_ms: i64,
    ) -> Result<Option<JobRecord>, JobsError> {
        let mut invocation = self.invocation(&self.scripts.start, delivery.tenant.as_str(), now_ms);
        invocation
            .arg(&delivery.id)
            .arg(&delivery.entry)
            .arg(consumer)
            .arg(config.max_deliveries)
            .arg(millis(config.retention))
            .arg(delivery.queue.as_str());
        let reply = self.run(&invocation).await?;
        match reply.status.as_str() {
            "skip" => Ok(None),
            "ok" => reply.record().map(Some),
            other => Err(unexpected(other)),
        }
    }

    pub(super) async fn succeed(
        &self,
        delivery: &Delivery,
        result: &CompleteResponse,
        config: &JobsConfig,
        now_ms: i64,
    ) -> Result<bool, JobsError> {
        let mut invocation =
            self.invocation(&self.scripts.succeed, delivery.tenant.as_str(), now_ms);
        invocation
            .arg(&delivery.id)
            .arg(&delivery.entry)
            .arg(result.encode_to_vec())
            .arg(millis(config.retention))
            .arg(delivery.queue.as_str());
        Ok(self.run(&invocation).await?.status == "ok")
    }

    pub(super) async fn fail(
        &self,
        delivery: &Delivery,
        error: &JobError,
        config: &JobsConfig,
        now_ms: i64,
    ) -> Result<bool, JobsError> {
        let mut invocation = self.invocation(&self.scripts.fail, delivery.tenant.as_str(), now_ms);
        invocation
            .arg(&delivery.id)
            .arg(&delivery.entry)
            .arg(error.code)
            .arg(&error.message)
            .arg(&error.reason)
            .arg(millis(config.retention))
            .arg(delivery.queue.as_str());
        Ok(self.run(&invocation).await?.status == "ok")
    }

    pub(super) async fn retry(
        &self,
        delivery: &Delivery,
        error: &JobError,
        backoff: Duration,
        config: &JobsConfig,
        now_ms: i64,
    ) -> Result<(), JobsError> {
        let due = now_ms.saturating_add(i64::try_from(backoff.as_millis()).unwrap_or(i64::MAX));
        let mut invocation = self.invocation(&self.scripts.retry, delivery.tenant.as_str(), now_ms);
        invocation
            .arg(&delivery.id)
            .arg(&delivery.entry)
            .arg(error.code)
            .arg(&error.message)
            .arg(&error.reason)
            .arg(due)
            .arg(config.max_deliveries)
            .arg(millis(config.retention))
            .arg(delivery.queue.as_str());
        self.run(&invocation).await.map(|_| ())
    }

    pub(super) async fn claim_callbacks(
        &self,
        lease: Duration,
        limit: usize,
        now_ms: i64,
    ) -> Result<Vec<(Tenant, String)>, JobsError> {
        let mut invocation = self.invocation(&self.scripts.callback_claim, "", now_ms);
        invocation.arg(millis(lease)).arg(limit.max(1));
        let mut conn = self.conn.clone();
        let members: Vec<String> = invocation.invoke_async(&mut conn).await?;
        Ok(members
            .iter()
            .filter_map(|member| {
                let (tenant, id) = member.split_once(' ')?;
                Some((Tenant::new(tenant).ok()?, id.to_string()))
            })
            .collect())
    }

    pub(super) async fn callback_outcome(
        &self,
        tenant: &Tenant,
        id: &str,
        outcome: super::callbacks::Outcome,
    ) -> Result<(), JobsError> {
        let due = match outcome {
            super::callbacks::Outcome::Retry(due) => due,
            _ => 0,
        };
        let mut invocation = self.invocation(
            &self.scripts.callback_outcome,
            tenant.as_str(),
            super::now_ms(),
        );
        invocation.arg(id).arg(outcome.status()).arg(due);
        self.run(&invocation).await.map(|_| ())
    }

    pub(super) async fn pending(&self) -> Result<u64, JobsError> {
        let mut conn = self.conn.clone();
        let mut pending = 0;
        for queue in QUEUES {
            let reply: redis::RedisResult<Value> = redis::cmd("XPENDING")
                .arg(self.stream_key(queue))
                .arg(GROUP)
                .query_async(&mut conn)
                .await;
            pending += match reply {
                Err(error) if error.code() == Some("NOGROUP") => 0,
                Ok(Value::Array(items)) => match items.first() {
                    Some(Value::Int(count)) => u64::try_from(*count).unwrap_or(0),
                    _ => 0,
                },
                Ok(_) => 0,
                Err(error) => return Err(error.into()),
            };
        }
        Ok(pending)
    }

    pub(super) async fn dead_letters(&self) -> Result<Vec<(String, String)>, JobsError> {
        let mut conn = self.conn.clone();
        let mut dead = Vec::new();
        for queue in QUEUES {
            let reply: redis::streams::StreamRangeReply = redis::cmd("XRANGE")
                .arg(format!("{}:dead", self.stream_key(queue)))
                .arg("-")
                .arg("+")
                .query_async(&mut conn)
                .await?;
            dead.extend(reply.ids.iter().filter_map(|entry| {
                let tenant: String = entry.get("tenant")?;
                let id: String = entry.get("id")?;
                Some((tenant, id))
            }));
        }
        Ok(dead)
    }
}

/// The delivery of a stream entry `{tenant, id}` of `queue` (None for a malformed entry).
fn delivery(entry: &StreamId, queue: Queue) -> Option<Delivery> {
    let tenant: String = entry.get("tenant")?;
    let id: String = entry.get("id")?;
    Some(Delivery {
        queue,
        tenant: Tenant::new(&tenant).ok()?,
        id,
        entry: entry.id.clone(),
    })
}

/// A script's answer: a status and, for most, the job's hash.
struct Reply {
    status: String,
    fields: Option<HashMap<String, Vec<u8>>>,
}

impl Reply {
    fn parse(value: Value) -> Result<Self, JobsError> {
        let Value::Array(mut items) = value else {
            return Err(JobsError::Corrupt(format!("unexpected reply {value:?}")));
        };
        let fields = if items.len() > 1 {
            Some(
                redis::from_redis_value::<HashMap<String, Vec<u8>>>(items.remove(1))
                    .map_err(parsing)?,
            )
        } else {
            None
        };
        let status = items
            .into_iter()
            .next()
            .map(redis::from_redis_value::<String>)
            .transpose()
            .map_err(parsing)?
            .unwrap_or_default();
        Ok(Self { status, fields })
    }

    fn record(self) -> Result<JobRecord, JobsError> {
        match self.fields {
            Some(fields) => record(fields),
            None => Err(JobsError::Corrupt(format!("{} without a job", self.status))),
        }
    }
}

/// A job record from its hash.
fn record(mut fields: HashMap<String, Vec<u8>>) -> Result<JobRecord, JobsError> {
    let text = |fields: &HashMap<String, Vec<u8>>, name: &str| {
        fields
            .get(name)
            .map(|v| String::from_utf8_lossy(v).into_owned())
            .unwrap_or_default()
    };
    let number = |fields: &HashMap<String, Vec<u8>>, name: &str| -> i64 {
        text(fields, name).parse().unwrap_or(0)
    };
    let corrupt = |error: prost::DecodeError| JobsError::Corrupt(error.to_string());
    let body =
        Job::decode(fields.remove("body").unwrap_or_default().as_slice()).map_err(corrupt)?;
    let result = fields
        .remove("result")
        .map(|bytes| CompleteResponse::decode(bytes.as_slice()))
        .transpose()
        .map_err(corrupt)?;
    let error_of = |code: &str, message: &str, reason: &str| {
        fields.contains_key(code).then(|| JobError {
            code: i32::try_from(number(&fields, code)).unwrap_or(2),
            message: text(&fields, message),
            reason: text(&fields, reason),
        })
    };
    let error = error_of("err_code", "err_msg", "err_reason");
    let last_error = error_of("last_code", "last_msg", "last_reason");
    Ok(JobRecord {
        id: text(&fields, "id"),
        state: i32::try_from(number(&fields, "state")).unwrap_or(0),
        attempts: u32::try_from(number(&fields, "attempts")).unwrap_or(0),
        create_ms: number(&fields, "created"),
        start_ms: number(&fields, "started"),
        end_ms: number(&fields, "ended"),
        expire_ms: number(&fields, "expire"),
        seq: u64::try_from(number(&fields, "seq")).unwrap_or(0),
        entry: text(&fields, "entry"),
        lease: text(&fields, "lease"),
        body,
        result,
        error,
        last_error,
        callback_attempts: u32::try_from(number(&fields, "cb_attempts")).unwrap_or(0),
        callback_status: text(&fields, "cb_status"),
    })
}

fn parsing(error: impl std::fmt::Display) -> JobsError {
    JobsError::Corrupt(error.to_string())
}

fn unexpected(status: &str) -> JobsError {
    JobsError::Corrupt(format!("unexpected script status {status:?}"))
}

fn poisoned<T>(_: T) -> JobsError {
    JobsError::Corrupt("a lock was poisoned".to_string())
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis())
        .unwrap_or(u64::MAX)
        .max(1)
}
