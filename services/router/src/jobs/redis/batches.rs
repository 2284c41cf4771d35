//! Batches on Redis: the batch record, its todo list, active set and results list (layout in
//! `lua/prelude.lua`), changed only by the `batch_*` scripts and by the job scripts' `finish`.
//!
//! A batch is created in three steps, so that no single script holds Redis for long with a
//! 50,000-item batch: `batch_begin` (the record, state 0, or the batch of a known `request_id`),
//! `batch_add` in chunks of [`ADD_CHUNK`] items, and `batch_open` (capacity, `request_id`,
//! IN_PROGRESS, first items queued). A creator that dies half-way leaves a state-0 record that
//! expires after [`CREATING`] and is never run; a retry with the same `request_id` creates the
//! batch afresh.

use std::collections::HashMap;

use prost::Message as _;
use weir_mesh::tenant::Tenant;
use weir_proto::router::Batch;

use super::{JobsConfig, JobsError, RedisJobs, Reply, millis, parsing, record, unexpected};
use crate::jobs::{
    JobRecord,
    batch::{BatchPage, BatchRecord, Created, NewBatch, ResultsPage, state},
};

/// Items added per `batch_add` call.
const ADD_CHUNK: usize = 500;
/// Items a closing batch ends per script call (the janitor goes on with the rest).
pub(super) const CLOSE_CHUNK: u32 = 1000;
/// How long a batch being created may take before its partial record expires (ms).
const CREATING: u64 = 10 * 60 * 1000;
/// Batches the janitor looks at per round.
const TICK_BATCHES: u32 = 100;

impl RedisJobs {
    fn batch_key(&self, tenant: &Tenant, id: &str) -> String {
        format!("{}:{tenant}:batch:{id}", self.root)
    }

    pub(in crate::jobs) async fn create_batch(
        &self,
        tenant: &Tenant,
        new: NewBatch,
        config: &JobsConfig,
        now_ms: i64,
    ) -> Result<Created, JobsError> {
        let mut begin = self.invocation(&self.scripts.batch_begin, tenant.as_str(), now_ms);
        begin
            .arg(&new.id)
            .arg(&new.request_id)
            .arg(new.body.encode_to_vec())
            .arg(CREATING);
        let reply = self.run(&begin).await?;
        match reply.status.as_str() {
            "new" => {}
            "ok" => {
                return Ok(Created {
                    batch: reply.batch()?,
                    created: false,
                });
            }
            other => return Err(unexpected(other)),
        }
        for chunk in new.items.chunks(ADD_CHUNK) {
            let mut add = self.invocation(&self.scripts.batch_add, tenant.as_str(), now_ms);
            add.arg(&new.id).arg(CREATING);
            for job in chunk {
                let mut item = Vec::with_capacity(job.id.len() + 1 + job.encoded_len());
                item.extend_from_slice(job.id.as_bytes());
                item.push(b' ');
                job.encode(&mut item)
                    .map_err(|error| JobsError::Corrupt(error.to_string()))?;
                add.arg(item);
            }
            let reply = self.run(&add).await?;
            if reply.status != "ok" {
                return Err(JobsError::Corrupt(format!(
                    "batch {} was dropped while its items were added",
                    new.id
                )));
            }
        }
        let batches = &config.batches;
        let mut open = self.invocation(&self.scripts.batch_open, tenant.as_str(), now_ms);
        open.arg(&new.id)
            .arg(&new.request_id)
            .arg(new.expire_ms)
            .arg(new.not_before_ms)
            .arg(batches.concurrency)
            .arg(batches.capacity)
            .arg(millis(config.retention))
            .arg(millis(config.retention))
            .arg(CLOSE_CHUNK);
        let reply = self.run(&open).await?;
        match reply.status.as_str() {
            "full" => Err(JobsError::BatchesFull(batches.capacity)),
            "ok" => {
                let batch = reply.batch()?;
                Ok(Created {
                    created: batch.id == new.id,
                    batch,
                })
            }
            "gone" => Err(JobsError::Corrupt(format!(
                "batch {} was dropped before it opened",
                new.id
            ))),
            other => Err(unexpected(other)),
        }
    }

    pub(in crate::jobs) async fn get_batch(
        &self,
        tenant: &Tenant,
        id: &str,
    ) -> Result<Option<BatchRecord>, JobsError> {
        let mut conn = self.conn.clone();
        let flat: HashMap<String, Vec<u8>> = redis::cmd("HGETALL")
            .arg(self.batch_key(tenant, id))
            .query_async(&mut conn)
            .await?;
        if flat.is_empty() {
            return Ok(None);
        }
        let batch = batch_record(flat)?;
        Ok((batch.state != state::CREATING).then_some(batch))
    }

    pub(in crate::jobs) async fn cancel_batch(
        &self,
        tenant: &Tenant,
        id: &str,
        config: &JobsConfig,
        now_ms: i64,
    ) -> Result<Option<BatchRecord>, JobsError> {
        let mut invocation = self.invocation(&self.scripts.batch_cancel, tenant.as_str(), now_ms);
        invocation
            .arg(id)
            .arg(millis(config.retention))
            .arg(CLOSE_CHUNK);
        let reply = self.run(&invocation).await?;
        match reply.status.as_str() {
            "not_found" => Ok(None),
            "ok" => reply.batch().map(Some),
            other => Err(unexpected(other)),
        }
    }

    pub(in crate::jobs) async fn batch_results(
        &self,
        tenant: &Tenant,
        id: &str,
        from: u64,
        limit: usize,
    ) -> Result<ResultsPage, JobsError> {
        let mut conn = self.conn.clone();
        let last = from.saturating_add(u64::try_from(limit.max(1)).unwrap_or(u64::MAX)) - 1;
        let ids: Vec<String> = redis::cmd("LRANGE")
            .arg(format!("{}:done", self.batch_key(tenant, id)))
            .arg(from)
            .arg(last)
            .query_async(&mut conn)
            .await?;
        let next = from + u64::try_from(ids.len()).unwrap_or(0);
        Ok(ResultsPage {
            jobs: self.jobs_of(tenant, &ids).await?,
            next,
        })
    }

    pub(in crate::jobs) async fn list_batches(
        &self,
        tenant: &Tenant,
        limit: usize,
        before: Option<u64>,
    ) -> Result<BatchPage, JobsError> {
        let index = format!("{}:{tenant}:batch:_index", self.root);
        let mut conn = self.conn.clone();
        let mut page = BatchPage::default();
        let mut max = before.map_or("+inf".to_string(), |b| format!("({b}"));
        loop {
            let chunk: Vec<(String, u64)> = redis::cmd("ZRANGE")
                .arg(&index)
                .arg(&max)
                .arg("-inf")
                .arg("BYSCORE")
                .arg("REV")
                .arg("LIMIT")
                .arg(0)
                .arg(limit.max(1))
                .arg("WITHSCORES")
                .query_async(&mut conn)
                .await?;
            let Some(&(_, last)) = chunk.last() else {
                return Ok(page);
            };
            for (id, seq) in chunk {
                match self.get_batch(tenant, &id).await? {
                    Some(batch) => {
                        page.batches.push(batch);
                        if page.batches.len() == limit {
                            page.next = Some(seq);
                            return Ok(page);
                        }
                    }
                    None => {
                        // Past its retention: drop it from the index too.
                        let _: i64 = redis::cmd("ZREM")
                            .arg(&index)
                            .arg(&id)
                            .query_async(&mut conn)
                            .await?;
                    }
                }
            }
            max = format!("({last}");
        }
    }

    pub(in crate::jobs) async fn batch_active(
        &self,
        tenant: &Tenant,
        id: &str,
    ) -> Result<Vec<JobRecord>, JobsError> {
        let mut conn = self.conn.clone();
        let ids: Vec<String> = redis::cmd("SMEMBERS")
            .arg(format!("{}:active", self.batch_key(tenant, id)))
            .query_async(&mut conn)
            .await?;
        self.jobs_of(tenant, &ids).await
    }

    /// The jobs `ids` of `tenant`, read in one round trip; jobs past their retention are left out.
    async fn jobs_of(&self, tenant: &Tenant, ids: &[String]) -> Result<Vec<JobRecord>, JobsError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for id in ids {
            pipe.cmd("HGETALL").arg(self.job_key(tenant, id));
        }
        let mut conn = self.conn.clone();
        let hashes: Vec<HashMap<String, Vec<u8>>> = pipe.query_async(&mut conn).await?;
        hashes
            .into_iter()
            .filter(|fields| !fields.is_empty())
            .map(record)
            .collect()
    }

    /// The janitor's round of the batches due now (any tenant).
    pub(super) async fn tick_batches(
        &self,
        config: &JobsConfig,
        now_ms: i64,
    ) -> Result<(), JobsError> {
        let mut invocation = self.invocation(&self.scripts.batch_tick, "", now_ms);
        invocation
            .arg(TICK_BATCHES)
            .arg(CLOSE_CHUNK)
            .arg(millis(config.retention));
        let mut conn = self.conn.clone();
        let _: redis::Value = invocation.invoke_async(&mut conn).await?;
        Ok(())
    }
}

impl Reply {
    fn batch(self) -> Result<BatchRecord, JobsError> {
        match self.fields {
            Some(fields) => batch_record(fields),
            None => Err(JobsError::Corrupt(format!(
                "{} without a batch",
                self.status
            ))),
        }
    }
}

/// A batch record from its hash.
fn batch_record(mut fields: HashMap<String, Vec<u8>>) -> Result<BatchRecord, JobsError> {
    let number = |fields: &HashMap<String, Vec<u8>>, name: &str| -> i64 {
        fields
            .get(name)
            .and_then(|v| std::str::from_utf8(v).ok())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    let body =
        Batch::decode(fields.remove("body").unwrap_or_default().as_slice()).map_err(parsing)?;
    Ok(BatchRecord {
        id: fields
            .get("id")
            .map(|v| String::from_utf8_lossy(v).into_owned())
            .unwrap_or_default(),
        state: i32::try_from(number(&fields, "state")).unwrap_or(0),
        total: number(&fields, "total"),
        succeeded: number(&fields, "succeeded"),
        failed: number(&fields, "failed"),
        cancelled: number(&fields, "cancelled"),
        create_ms: number(&fields, "created"),
        expire_ms: number(&fields, "expire"),
        not_before_ms: number(&fields, "not_before"),
        end_ms: number(&fields, "ended"),
        body,
    })
}
