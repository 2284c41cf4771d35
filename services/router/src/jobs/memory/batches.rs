//! Batches in memory: the same model as the Redis scripts (see [`crate::jobs::batch`]), under the
//! store's one lock. A closing batch ends all its items at once (no chunks: nothing else waits on
//! Redis here).

use std::collections::{HashSet, VecDeque};

use weir_mesh::tenant::Tenant;
use weir_proto::router::{Job, JobError};

use super::{MemoryJobs, State};
use crate::jobs::{
    JobRecord, JobsConfig, JobsError, Queue,
    batch::{
        BATCH_CANCELLED, BATCH_EXPIRED, BatchPage, BatchRecord, Created, NewBatch, ResultsPage,
        state,
    },
    state as job_state,
};

/// A batch and its items.
#[derive(Debug, Default)]
pub(super) struct MemBatch {
    record: BatchRecord,
    /// Items not yet queued.
    todo: VecDeque<Job>,
    /// Ids of its items queued or running.
    active: HashSet<String>,
    /// Ids of its ended items, in the order they ended.
    done: Vec<String>,
    concurrency: u32,
    started: bool,
    /// The item state a closing batch ends its items in (CANCELLED or EXPIRED).
    ending: Option<i32>,
}

/// The error of an item ended by its batch closing in `ending`.
fn closing_error(ending: i32) -> JobError {
    if ending == job_state::CANCELLED {
        JobError {
            code: tonic::Code::Cancelled as i32,
            message: "the batch was cancelled before this item ran".to_string(),
            reason: BATCH_CANCELLED.to_string(),
        }
    } else {
        JobError {
            code: tonic::Code::DeadlineExceeded as i32,
            message: "the batch's completion window ended before this item ran".to_string(),
            reason: BATCH_EXPIRED.to_string(),
        }
    }
}

impl State {
    fn batch_mut(&mut self, tenant: &Tenant, id: &str) -> Option<&mut MemBatch> {
        self.batches.get_mut(&(tenant.clone(), id.to_string()))
    }

    /// Queues up to `n` of the batch's todo items.
    fn feed(&mut self, tenant: &Tenant, batch_id: &str, n: u32) {
        for _ in 0..n {
            let Some(batch) = self.batch_mut(tenant, batch_id) else {
                return;
            };
            let Some(job) = batch.todo.pop_front() else {
                return;
            };
            batch.active.insert(job.id.clone());
            let id = job.id.clone();
            let create_ms = batch.record.create_ms;
            let entry = self.add_entry(Queue::Batch, tenant, &id);
            let record = JobRecord {
                id: id.clone(),
                state: job_state::QUEUED,
                create_ms,
                entry,
                body: job,
                ..JobRecord::default()
            };
            self.jobs.insert((tenant.clone(), id), record);
        }
    }

    /// An item of the batch ended in `to`: counted, listed, its place given to the next item, and
    /// the batch ended after its last.
    pub(super) fn item_ended(
        &mut self,
        tenant: &Tenant,
        batch_id: &str,
        id: &str,
        to: i32,
        now_ms: i64,
    ) {
        let Some(batch) = self.batch_mut(tenant, batch_id) else {
            return;
        };
        match to {
            job_state::SUCCEEDED => batch.record.succeeded += 1,
            job_state::FAILED => batch.record.failed += 1,
            _ => batch.record.cancelled += 1,
        }
        batch.done.push(id.to_string());
        batch.active.remove(id);
        let feed = batch.record.state == state::IN_PROGRESS && batch.started;
        if feed {
            self.feed(tenant, batch_id, 1);
        }
        self.settle(tenant, batch_id, now_ms);
    }

    fn settle(&mut self, tenant: &Tenant, batch_id: &str, now_ms: i64) {
        let Some(batch) = self.batch_mut(tenant, batch_id) else {
            return;
        };
        let record = &mut batch.record;
        if record.is_terminal()
            || record.succeeded + record.failed + record.cancelled < record.total
        {
            return;
        }
        record.state = match batch.ending {
            Some(job_state::CANCELLED) => state::CANCELLED,
            Some(_) => state::EXPIRED,
            None => state::COMPLETED,
        };
        record.end_ms = now_ms;
    }

    /// Closes a batch whose `ending` is set: queued items end now, running ones too when it
    /// expired, todo items end without running.
    fn close(&mut self, tenant: &Tenant, batch_id: &str, now_ms: i64) {
        let Some(batch) = self.batch_mut(tenant, batch_id) else {
            return;
        };
        let Some(ending) = batch.ending else {
            return;
        };
        let todo = std::mem::take(&mut batch.todo);
        let active: Vec<String> = batch.active.iter().cloned().collect();
        for id in active {
            let running = self
                .job(tenant, &id)
                .is_some_and(|job| job.state == job_state::RUNNING);
            let open = self.job(tenant, &id).is_some_and(|job| !job.is_terminal());
            if open && (!running || ending == job_state::EXPIRED) {
                self.close_item(tenant, &id, ending, now_ms);
            }
        }
        for job in todo {
            let id = job.id.clone();
            self.batch_open = self.batch_open.saturating_sub(1);
            let record = JobRecord {
                id: id.clone(),
                state: ending,
                create_ms: now_ms,
                end_ms: now_ms,
                error: Some(closing_error(ending)),
                body: job,
                ..JobRecord::default()
            };
            self.jobs.insert((tenant.clone(), id.clone()), record);
            if let Some(batch) = self.batch_mut(tenant, batch_id) {
                batch.record.cancelled += 1;
                batch.done.push(id);
            }
        }
        self.settle(tenant, batch_id, now_ms);
    }

    fn close_item(&mut self, tenant: &Tenant, id: &str, ending: i32, now_ms: i64) {
        if let Some(job) = self.jobs.get_mut(&(tenant.clone(), id.to_string())) {
            job.error = Some(closing_error(ending));
        }
        self.finish(tenant, id, ending, now_ms);
    }

    /// Whether the item's batch is closing; ends the item if so.
    pub(super) fn closed_by_batch(
        &mut self,
        tenant: &Tenant,
        batch_id: &str,
        id: &str,
        now_ms: i64,
    ) -> bool {
        let Some(ending) = self.batch_mut(tenant, batch_id).and_then(|b| b.ending) else {
            return false;
        };
        self.close_item(tenant, id, ending, now_ms);
        true
    }

    /// Starts the batches whose not-before time has come and expires those whose window ended;
    /// true when items were queued.
    pub(super) fn tick_batches(&mut self, now_ms: i64) -> bool {
        let due: Vec<(Tenant, String, bool)> = self
            .batches
            .iter()
            .filter(|(_, b)| !b.record.is_terminal() && b.ending.is_none())
            .filter_map(|((tenant, id), b)| {
                if b.record.expire_ms <= now_ms {
                    Some((tenant.clone(), id.clone(), true))
                } else if !b.started && b.record.not_before_ms <= now_ms {
                    Some((tenant.clone(), id.clone(), false))
                } else {
                    None
                }
            })
            .collect();
        let mut queued = false;
        for (tenant, id, expired) in due {
            if expired {
                if let Some(batch) = self.batch_mut(&tenant, &id) {
                    batch.ending = Some(job_state::EXPIRED);
                }
                self.close(&tenant, &id, now_ms);
            } else {
                queued |= self.start_batch(&tenant, &id);
            }
        }
        queued
    }

    fn start_batch(&mut self, tenant: &Tenant, id: &str) -> bool {
        let Some(batch) = self.batch_mut(tenant, id) else {
            return false;
        };
        batch.started = true;
        let concurrency = batch.concurrency;
        self.feed(tenant, id, concurrency);
        true
    }
}

impl MemoryJobs {
    pub(in crate::jobs) async fn create_batch(
        &self,
        tenant: &Tenant,
        new: NewBatch,
        config: &JobsConfig,
        now_ms: i64,
    ) -> Result<Created, JobsError> {
        let mut st = self.lock()?;
        if !new.request_id.is_empty()
            && let Some(id) = st
                .batch_requests
                .get(&(tenant.clone(), new.request_id.clone()))
            && let Some(batch) = st.batches.get(&(tenant.clone(), id.clone()))
        {
            return Ok(Created {
                batch: batch.record.clone(),
                created: false,
            });
        }
        let total = new.items.len() as u64;
        if st.batch_open + total > config.batches.capacity {
            return Err(JobsError::BatchesFull(config.batches.capacity));
        }
        st.batch_open += total;
        let index = st.batch_index.entry(tenant.clone()).or_default();
        let seq = index.keys().next_back().map_or(1, |last| last + 1);
        index.insert(seq, new.id.clone());
        if !new.request_id.is_empty() {
            st.batch_requests
                .insert((tenant.clone(), new.request_id.clone()), new.id.clone());
        }
        let record = BatchRecord {
            id: new.id.clone(),
            state: state::IN_PROGRESS,
            total: i64::try_from(total).unwrap_or(i64::MAX),
            create_ms: now_ms,
            expire_ms: new.expire_ms,
            not_before_ms: new.not_before_ms,
            body: new.body,
            ..BatchRecord::default()
        };
        st.batches.insert(
            (tenant.clone(), new.id.clone()),
            MemBatch {
                record,
                todo: new.items.into(),
                concurrency: config.batches.concurrency,
                ..MemBatch::default()
            },
        );
        let queued = new.not_before_ms <= now_ms && st.start_batch(tenant, &new.id);
        let batch = st
            .batches
            .get(&(tenant.clone(), new.id))
            .map(|b| b.record.clone())
            .unwrap_or_default();
        drop(st);
        if queued {
            self.inner.arrived.notify_waiters();
        }
        Ok(Created {
            batch,
            created: true,
        })
    }

    pub(in crate::jobs) async fn get_batch(
        &self,
        tenant: &Tenant,
        id: &str,
    ) -> Result<Option<BatchRecord>, JobsError> {
        Ok(self
            .lock()?
            .batches
            .get(&(tenant.clone(), id.to_string()))
            .map(|b| b.record.clone()))
    }

    pub(in crate::jobs) async fn cancel_batch(
        &self,
        tenant: &Tenant,
        id: &str,
        _config: &JobsConfig,
        now_ms: i64,
    ) -> Result<Option<BatchRecord>, JobsError> {
        let mut st = self.lock()?;
        let Some(batch) = st.batch_mut(tenant, id) else {
            return Ok(None);
        };
        if !batch.record.is_terminal() && batch.ending.is_none() {
            batch.ending = Some(job_state::CANCELLED);
            batch.record.state = state::CANCELLING;
            st.close(tenant, id, now_ms);
        }
        Ok(st.batch_mut(tenant, id).map(|b| b.record.clone()))
    }

    pub(in crate::jobs) async fn batch_results(
        &self,
        tenant: &Tenant,
        id: &str,
        from: u64,
        limit: usize,
    ) -> Result<ResultsPage, JobsError> {
        let st = self.lock()?;
        let Some(batch) = st.batches.get(&(tenant.clone(), id.to_string())) else {
            return Ok(ResultsPage {
                jobs: Vec::new(),
                next: from,
            });
        };
        let start = usize::try_from(from)
            .unwrap_or(usize::MAX)
            .min(batch.done.len());
        let ids = &batch.done[start..(start + limit.max(1)).min(batch.done.len())];
        Ok(ResultsPage {
            jobs: ids
                .iter()
                .filter_map(|id| st.job(tenant, id).cloned())
                .collect(),
            next: from + ids.len() as u64,
        })
    }

    pub(in crate::jobs) async fn list_batches(
        &self,
        tenant: &Tenant,
        limit: usize,
        before: Option<u64>,
    ) -> Result<BatchPage, JobsError> {
        let st = self.lock()?;
        let mut page = BatchPage::default();
        let Some(index) = st.batch_index.get(tenant) else {
            return Ok(page);
        };
        for (&seq, id) in index.range(..before.unwrap_or(u64::MAX)).rev() {
            if let Some(batch) = st.batches.get(&(tenant.clone(), id.clone())) {
                page.batches.push(batch.record.clone());
                if page.batches.len() == limit {
                    page.next = Some(seq);
                    break;
                }
            }
        }
        Ok(page)
    }

    pub(in crate::jobs) async fn batch_active(
        &self,
        tenant: &Tenant,
        id: &str,
    ) -> Result<Vec<JobRecord>, JobsError> {
        let st = self.lock()?;
        Ok(st
            .batches
            .get(&(tenant.clone(), id.to_string()))
            .map(|b| {
                b.active
                    .iter()
                    .filter_map(|id| st.job(tenant, id).cloned())
                    .collect()
            })
            .unwrap_or_default())
    }
}
