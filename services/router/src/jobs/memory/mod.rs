//! The job store in one process's memory, for `weir up` without Redis: the same model as
//! [`super::RedisJobs`] (a stream of deliveries with a pending list, reclaim by idle time, a
//! delayed set, a dead-letter list), under one lock. It loses everything on restart and only
//! workers in this process can use it.

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    sync::{Arc, Mutex, MutexGuard},
    time::Duration,
};

use tokio::{sync::Notify, time::Instant};
use weir_mesh::tenant::Tenant;
use weir_proto::router::{CompleteResponse, JobError};

use super::{
    Delivery, JobPage, JobRecord, JobsConfig, JobsError, ListQuery, NewJob, Queue, Submitted, state,
};

mod batches;
mod files;

/// The in-memory job store. Cheap to clone (clones share the jobs).
#[derive(Debug, Clone, Default)]
pub struct MemoryJobs {
    inner: Arc<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    state: Mutex<State>,
    arrived: Notify,
}

#[derive(Debug, Default)]
struct State {
    jobs: HashMap<(Tenant, String), JobRecord>,
    /// By tenant: sequence → id.
    index: HashMap<Tenant, BTreeMap<u64, String>>,
    seq: HashMap<Tenant, u64>,
    requests: HashMap<(Tenant, String), String>,
    /// Entries not yet read, of the async queue.
    stream: VecDeque<Delivery>,
    /// Entries not yet read, of the batch queue.
    batch_stream: VecDeque<Delivery>,
    /// Batches by (tenant, id).
    batches: HashMap<(Tenant, String), batches::MemBatch>,
    /// By tenant: batch sequence → batch id.
    batch_index: HashMap<Tenant, BTreeMap<u64, String>>,
    /// Batch ids by (tenant, request_id).
    batch_requests: HashMap<(Tenant, String), String>,
    /// Items of open batches that have not ended.
    batch_open: u64,
    /// Entries read and not acknowledged: entry → (delivery, consumer, last delivered).
    pending: HashMap<String, (Delivery, String, Instant)>,
    /// Jobs waiting out a backoff: (due ms, tenant, id).
    delayed: Vec<(i64, Tenant, String)>,
    dead: Vec<(String, String)>,
    /// The callback outbox: (tenant, id) → due ms.
    callbacks: HashMap<(Tenant, String), i64>,
    open: u64,
    next_entry: u64,
    /// Uploaded files by (tenant, id).
    files: HashMap<(Tenant, String), crate::jobs::files::StoredFile>,
}

impl State {
    fn add_entry(&mut self, queue: Queue, tenant: &Tenant, id: &str) -> String {
        self.next_entry += 1;
        let entry = format!("{}-0", self.next_entry);
        let delivery = Delivery {
            queue,
            tenant: tenant.clone(),
            id: id.to_string(),
            entry: entry.clone(),
        };
        match queue {
            Queue::Async => self.stream.push_back(delivery),
            Queue::Batch => self.batch_stream.push_back(delivery),
        }
        entry
    }

    fn ack(&mut self, entry: &str) {
        self.pending.remove(entry);
        self.stream.retain(|d| d.entry != entry);
        self.batch_stream.retain(|d| d.entry != entry);
    }

    /// Moves an open job to a terminal state (once); a batch item is counted in its batch.
    fn finish(&mut self, tenant: &Tenant, id: &str, to: i32, now_ms: i64) {
        let mut batch = None;
        if let Some(job) = self.jobs.get_mut(&(tenant.clone(), id.to_string())) {
            job.state = to;
            job.end_ms = now_ms;
            job.lease.clear();
            if job.body.batch_id.is_empty() {
                self.open = self.open.saturating_sub(1);
            } else {
                self.batch_open = self.batch_open.saturating_sub(1);
                batch = Some(job.body.batch_id.clone());
            }
            if job.body.callback.is_some() {
                // In the same step as the result: nothing is sent before it is stored.
                self.callbacks
                    .insert((tenant.clone(), id.to_string()), now_ms);
            }
        }
        self.delayed.retain(|(_, t, i)| !(t == tenant && i == id));
        if let Some(batch) = batch {
            self.item_ended(tenant, &batch, id, to, now_ms);
        }
    }

    fn dead_letter(&mut self, delivery: &Delivery, now_ms: i64) {
        let key = (delivery.tenant.clone(), delivery.id.clone());
        if let Some(job) = self.jobs.get_mut(&key) {
            let last = job.last_error.clone().unwrap_or_default();
            let mut message = format!("gave up after {} deliveries", job.attempts);
            if !last.message.is_empty() {
                message.push_str(&format!("; last error: {}", last.message));
            }
            job.error = Some(JobError {
                code: if job.last_error.is_some() {
                    last.code
                } else {
                    4
                },
                message,
                reason: super::MAX_DELIVERIES.to_string(),
            });
        }
        self.dead
            .push((delivery.tenant.to_string(), delivery.id.clone()));
        self.finish(&delivery.tenant, &delivery.id, state::FAILED, now_ms);
        self.ack(&delivery.entry);
    }

    fn job(&self, tenant: &Tenant, id: &str) -> Option<&JobRecord> {
        self.jobs.get(&(tenant.clone(), id.to_string()))
    }

    /// The job if it is open, else acknowledges the delivery.
    fn open_job(&mut self, delivery: &Delivery) -> Option<&mut JobRecord> {
        let key = (delivery.tenant.clone(), delivery.id.clone());
        let open = self.jobs.get(&key).is_some_and(|j| !j.is_terminal());
        if !open {
            self.ack(&delivery.entry);
            return None;
        }
        self.jobs.get_mut(&key)
    }
}

impl MemoryJobs {
    fn lock(&self) -> Result<MutexGuard<'_, State>, JobsError> {
        self.inner
            .state
            .lock()
            .map_err(|_| JobsError::Corrupt("a lock was poisoned".to_string()))
    }

    pub(super) async fn submit(
        &self,
        tenant: &Tenant,
        new: NewJob,
        config: &JobsConfig,
        now_ms: i64,
    ) -> Result<Submitted, JobsError> {
        let mut st = self.lock()?;
        if !new.request_id.is_empty()
            && let Some(id) = st.requests.get(&(tenant.clone(), new.request_id.clone()))
            && let Some(job) = st.job(tenant, id)
        {
            return Ok(Submitted {
                job: job.clone(),
                created: false,
            });
        }
        if st.open >= config.capacity {
            return Err(JobsError::Full(config.capacity));
        }
        if !new.request_id.is_empty() {
            st.requests
                .insert((tenant.clone(), new.request_id.clone()), new.id.clone());
        }
        let seq = {
            let seq = st.seq.entry(tenant.clone()).or_default();
            *seq += 1;
            *seq
        };
        st.index
            .entry(tenant.clone())
            .or_default()
            .insert(seq, new.id.clone());
        st.open += 1;
        let entry = st.add_entry(Queue::Async, tenant, &new.id);
        let job = JobRecord {
            id: new.id.clone(),
            state: state::QUEUED,
            create_ms: now_ms,
            expire_ms: new.expire_ms,
            seq,
            entry,
            body: new.body,
            ..JobRecord::default()
        };
        st.jobs.insert((tenant.clone(), new.id), job.clone());
        drop(st);
        self.inner.arrived.notify_waiters();
        Ok(Submitted { job, created: true })
    }

    pub(super) async fn get(
        &self,
        tenant: &Tenant,
        id: &str,
    ) -> Result<Option<JobRecord>, JobsError> {
        Ok(self.lock()?.job(tenant, id).cloned())
    }

    pub(super) async fn list(
        &self,
        tenant: &Tenant,
        query: ListQuery,
    ) -> Result<JobPage, JobsError> {
        let st = self.lock()?;
        let mut page = JobPage::default();
        let Some(index) = st.index.get(tenant) else {
            return Ok(page);
        };
        let below = query.before.unwrap_or(u64::MAX);
        for (&seq, id) in index.range(..below).rev() {
            let Some(job) = st.job(tenant, id) else {
                continue;
            };
            if query.state == 0 || job.state == query.state {
                page.jobs.push(job.clone());
                if page.jobs.len() == query.limit {
                    page.next = Some(seq);
                    break;
                }
            }
        }
        Ok(page)
    }

    pub(super) async fn cancel(
        &self,
        tenant: &Tenant,
        id: &str,
        _config: &JobsConfig,
        now_ms: i64,
    ) -> Result<Option<JobRecord>, JobsError> {
        let mut st = self.lock()?;
        let Some(job) = st.job(tenant, id) else {
            return Ok(None);
        };
        if !job.is_terminal() {
            st.finish(tenant, id, state::CANCELLED, now_ms);
        }
        Ok(st.job(tenant, id).cloned())
    }

    pub(super) async fn next(
        &self,
        consumer: &str,
        wait: Duration,
    ) -> Result<Vec<Delivery>, JobsError> {
        let deadline = Instant::now() + wait;
        loop {
            let arrived = self.inner.arrived.notified();
            {
                let mut st = self.lock()?;
                // The async queue first: one delivery at a time.
                let next = match st.stream.pop_front() {
                    Some(delivery) => Some(delivery),
                    None => st.batch_stream.pop_front(),
                };
                if let Some(delivery) = next {
                    st.pending.insert(
                        delivery.entry.clone(),
                        (delivery.clone(), consumer.to_string(), Instant::now()),
                    );
                    return Ok(vec![delivery]);
                }
            }
            if tokio::time::timeout_at(deadline, arrived).await.is_err() {
                return Ok(Vec::new());
            }
        }
    }

    pub(super) async fn reclaim(
        &self,
        consumer: &str,
        idle: Duration,
        _config: &JobsConfig,
        now_ms: i64,
    ) -> Result<Vec<Delivery>, JobsError> {
        let mut st = self.lock()?;
        let delayed = std::mem::take(&mut st.delayed);
        let mut promoted = false;
        for (due, tenant, id) in delayed {
            if due > now_ms {
                st.delayed.push((due, tenant, id));
                continue;
            }
            let queue = match st.job(&tenant, &id) {
                Some(job) if job.state == state::QUEUED => {
                    if job.body.batch_id.is_empty() {
                        Queue::Async
                    } else {
                        Queue::Batch
                    }
                }
                _ => continue,
            };
            let entry = st.add_entry(queue, &tenant, &id);
            if let Some(job) = st.jobs.get_mut(&(tenant, id)) {
                job.entry = entry;
            }
            promoted = true;
        }
        promoted |= st.tick_batches(now_ms);
        let now = Instant::now();
        let mut reclaimed = Vec::new();
        for (delivery, owner, since) in st.pending.values_mut() {
            if now.duration_since(*since) >= idle {
                *owner = consumer.to_string();
                *since = now;
                reclaimed.push(delivery.clone());
            }
        }
        drop(st);
        if promoted {
            self.inner.arrived.notify_waiters();
        }
        Ok(reclaimed)
    }

    pub(super) async fn expire(
        &self,
        tenant: &Tenant,
        id: &str,
        _config: &JobsConfig,
        now_ms: i64,
    ) -> Result<Option<JobRecord>, JobsError> {
        let mut st = self.lock()?;
        let Some(job) = st.job(tenant, id) else {
            return Ok(None);
        };
        if job.is_expired(now_ms) {
            st.finish(tenant, id, state::EXPIRED, now_ms);
        }
        Ok(st.job(tenant, id).cloned())
    }

    pub(super) async fn lost(
        &self,
        delivery: &Delivery,
        consumer: &str,
        _now_ms: i64,
    ) -> Result<(), JobsError> {
        let mut st = self.lock()?;
        if let Some(job) = st
            .jobs
            .get_mut(&(delivery.tenant.clone(), delivery.id.clone()))
            && job.state == state::RUNNING
            && job.lease != consumer
        {
            job.state = state::QUEUED;
            job.lease.clear();
        }
        Ok(())
    }

    pub(super) async fn start(
        &self,
        delivery: &Delivery,
        consumer: &str,
        config: &JobsConfig,
        now_ms: i64,
    ) -> Result<Option<JobRecord>, JobsError> {
        let mut st = self.lock()?;
        let Some(job) = st.open_job(delivery) else {
            return Ok(None);
        };
        if job.is_expired(now_ms) {
            st.finish(&delivery.tenant, &delivery.id, state::EXPIRED, now_ms);
            st.ack(&delivery.entry);
            return Ok(None);
        }
        let batch = job.body.batch_id.clone();
        if !batch.is_empty() && st.closed_by_batch(&delivery.tenant, &batch, &delivery.id, now_ms) {
            st.ack(&delivery.entry);
            return Ok(None);
        }
        let Some(job) = st.open_job(delivery) else {
            return Ok(None);
        };
        if job.attempts >= config.max_deliveries {
            st.dead_letter(delivery, now_ms);
            return Ok(None);
        }
        job.state = state::RUNNING;
        job.attempts += 1;
        job.start_ms = now_ms;
        job.lease = consumer.to_string();
        job.entry.clone_from(&delivery.entry);
        Ok(Some(job.clone()))
    }

    pub(super) async fn succeed(
        &self,
        delivery: &Delivery,
        result: &CompleteResponse,
        _config: &JobsConfig,
        now_ms: i64,
    ) -> Result<bool, JobsError> {
        let mut st = self.lock()?;
        let Some(job) = st.open_job(delivery) else {
            return Ok(false);
        };
        job.result = Some(result.clone());
        st.finish(&delivery.tenant, &delivery.id, state::SUCCEEDED, now_ms);
        st.ack(&delivery.entry);
        Ok(true)
    }

    pub(super) async fn fail(
        &self,
        delivery: &Delivery,
        error: &JobError,
        _config: &JobsConfig,
        now_ms: i64,
    ) -> Result<bool, JobsError> {
        let mut st = self.lock()?;
        let Some(job) = st.open_job(delivery) else {
            return Ok(false);
        };
        job.error = Some(error.clone());
        st.finish(&delivery.tenant, &delivery.id, state::FAILED, now_ms);
        st.ack(&delivery.entry);
        Ok(true)
    }

    pub(super) async fn retry(
        &self,
        delivery: &Delivery,
        error: &JobError,
        backoff: Duration,
        config: &JobsConfig,
        now_ms: i64,
    ) -> Result<(), JobsError> {
        let mut st = self.lock()?;
        let Some(job) = st.open_job(delivery) else {
            return Ok(());
        };
        job.last_error = Some(error.clone());
        if job.attempts >= config.max_deliveries {
            st.dead_letter(delivery, now_ms);
            return Ok(());
        }
        job.state = state::QUEUED;
        job.lease.clear();
        job.entry.clear();
        let due = now_ms.saturating_add(i64::try_from(backoff.as_millis()).unwrap_or(i64::MAX));
        st.delayed
            .push((due, delivery.tenant.clone(), delivery.id.clone()));
        st.ack(&delivery.entry);
        Ok(())
    }

    pub(super) async fn claim_callbacks(
        &self,
        lease: Duration,
        limit: usize,
        now_ms: i64,
    ) -> Result<Vec<(Tenant, String)>, JobsError> {
        let mut st = self.lock()?;
        let until = now_ms.saturating_add(i64::try_from(lease.as_millis()).unwrap_or(i64::MAX));
        let mut due: Vec<_> = st
            .callbacks
            .iter()
            .filter(|(_, due)| **due <= now_ms)
            .map(|(key, due)| (*due, key.clone()))
            .collect();
        due.sort();
        due.truncate(limit);
        for (_, key) in &due {
            st.callbacks.insert(key.clone(), until);
        }
        Ok(due.into_iter().map(|(_, key)| key).collect())
    }

    pub(super) async fn callback_outcome(
        &self,
        tenant: &Tenant,
        id: &str,
        outcome: super::callbacks::Outcome,
    ) -> Result<(), JobsError> {
        let mut st = self.lock()?;
        let key = (tenant.clone(), id.to_string());
        if let Some(job) = st.jobs.get_mut(&key) {
            job.callback_attempts += 1;
            job.callback_status = outcome.status().to_string();
        }
        match outcome {
            super::callbacks::Outcome::Retry(due) => {
                st.callbacks.insert(key, due);
            }
            _ => {
                st.callbacks.remove(&key);
            }
        }
        Ok(())
    }

    pub(super) async fn pending(&self) -> Result<u64, JobsError> {
        Ok(self.lock()?.pending.len() as u64)
    }

    pub(super) async fn dead_letters(&self) -> Result<Vec<(String, String)>, JobsError> {
        Ok(self.lock()?.dead.clone())
    }
}
