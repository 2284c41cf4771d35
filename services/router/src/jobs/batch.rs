//! Batches: many requests at once, run in the background at the lowest criticality and priced at
//! the batch tier.
//!
//! A batch is a set of items, each a `CompleteRequest` with a caller-chosen `custom_id`. Its items
//! become jobs of the `batch` queue (their ids are `<batch id>-<n>`, their `batch_id` and
//! `custom_id` set), run by the same workers as asynchronous jobs, with the same leases, reclaim,
//! retries and dead-letter stream. What batches add:
//!
//! - **A concurrency cap per batch.** Items wait in the batch's todo list; at most `concurrency`
//!   of them are on the queue or running at once. The step that ends an item queues the next one,
//!   so a batch of 50,000 neither floods the stream nor starves another batch.
//! - **A completion window and a not-before time.** Nothing starts before `not_before`; when the
//!   window ends, every item that has not ended (queued, running or never started) is EXPIRED,
//!   and the results of the ended ones are kept.
//! - **Counts and results.** Every item that ends is counted (succeeded, failed, cancelled or
//!   expired) and its id appended to the batch's results, in the same atomic step, so
//!   `StreamBatchResults` gives every `custom_id` exactly once.
//! - **Cancellation.** `CancelBatch` makes it CANCELLING: items not running end CANCELLED, running
//!   ones may finish, and the batch is CANCELLED when the last has ended.
//!
//! States follow OpenAI's batch statuses where Weir has them: IN_PROGRESS (`in_progress`, also
//! while waiting for `not_before`), COMPLETED, CANCELLING, CANCELLED, EXPIRED. OpenAI's
//! `validating` and `failed` (a bad input file) have no state here: a bad batch is refused by
//! `CreateBatch` with INVALID_ARGUMENT naming the item.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use weir_mesh::config::ConfigError;
use weir_proto::router::{Batch, BatchCounts, Job};

use super::timestamp;

/// `BatchState` values as stored.
pub mod state {
    /// Being created (items being added); never returned.
    pub const CREATING: i32 = 0;
    /// Items are waiting, queued or running.
    pub const IN_PROGRESS: i32 = 1;
    /// Every item ended.
    pub const COMPLETED: i32 = 2;
    /// Cancelled; running items are finishing.
    pub const CANCELLING: i32 = 3;
    /// Cancelled, every item ended.
    pub const CANCELLED: i32 = 4;
    /// The completion window ended first.
    pub const EXPIRED: i32 = 5;

    /// Whether `state` never changes again.
    pub fn is_terminal(state: i32) -> bool {
        matches!(state, COMPLETED | CANCELLED | EXPIRED)
    }
}

/// Reason of the error of an item that never ran because its batch was cancelled.
pub const BATCH_CANCELLED: &str = "BATCH_CANCELLED";
/// Reason of the error of an item that had not ended when its batch's window closed.
pub const BATCH_EXPIRED: &str = "BATCH_EXPIRED";
/// Reason of a `CreateBatch` refused because the batch queue holds `capacity` open items.
pub const BATCH_QUEUE_FULL: &str = "BATCH_QUEUE_FULL";

/// The `[router.jobs.batches]` table.
///
/// ```toml
/// [router.jobs.batches]
/// max_items = 50000          # items one CreateBatch may hold
/// concurrency = 64           # items of one batch queued or running at once
/// capacity = 1000000         # items of open batches the queue holds; beyond: BATCH_QUEUE_FULL
/// default_window = "24h"     # completion window when CreateBatch gives none
/// max_window = "7d"
/// max_not_before = "30d"     # how far ahead not_before may be
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BatchesConfig {
    /// Most items in one batch.
    pub max_items: usize,
    /// Items of one batch queued or running at once.
    pub concurrency: u32,
    /// Items of open batches (not yet ended) the batch queue holds.
    pub capacity: u64,
    /// Completion window of a `CreateBatch` that gives none.
    #[serde(with = "humantime_serde")]
    pub default_window: Duration,
    /// Longest completion window.
    #[serde(with = "humantime_serde")]
    pub max_window: Duration,
    /// How far in the future `not_before` may be.
    #[serde(with = "humantime_serde")]
    pub max_not_before: Duration,
}

impl Default for BatchesConfig {
    fn default() -> Self {
        Self {
            max_items: 50_000,
            concurrency: 64,
            capacity: 1_000_000,
            default_window: Duration::from_secs(24 * 3600),
            max_window: Duration::from_secs(7 * 24 * 3600),
            max_not_before: Duration::from_secs(30 * 24 * 3600),
        }
    }
}

impl BatchesConfig {
    /// Checks the values, naming the bad key under `key` (`router.jobs.batches`).
    pub fn validate(&self, key: &str) -> Result<(), ConfigError> {
        let positive = |name: &str, ok: bool| {
            if ok {
                Ok(())
            } else {
                Err(ConfigError::invalid(format!("{key}.{name}"), "must be > 0"))
            }
        };
        positive("max_items", self.max_items > 0)?;
        positive("concurrency", self.concurrency > 0)?;
        positive("capacity", self.capacity > 0)?;
        positive("default_window", !self.default_window.is_zero())?;
        if self.max_window < self.default_window {
            return Err(ConfigError::invalid(
                format!("{key}.max_window"),
                "must be at least default_window",
            ));
        }
        Ok(())
    }
}

/// A batch as stored.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct BatchRecord {
    /// Batch id.
    pub id: String,
    /// `BatchState` value.
    pub state: i32,
    /// Items in all.
    pub total: i64,
    /// Items that succeeded.
    pub succeeded: i64,
    /// Items that failed.
    pub failed: i64,
    /// Items cancelled or expired.
    pub cancelled: i64,
    /// Creation, Unix ms.
    pub create_ms: i64,
    /// End of the completion window, Unix ms.
    pub expire_ms: i64,
    /// No item starts before this, Unix ms (0: at once).
    pub not_before_ms: i64,
    /// End, Unix ms (0: not ended).
    pub end_ms: i64,
    /// The batch as created: callback and labels.
    pub body: Batch,
}

impl BatchRecord {
    /// The batch as the API returns it.
    pub fn to_batch(&self) -> Batch {
        let mut batch = self.body.clone();
        batch.id.clone_from(&self.id);
        batch.state = self.state;
        let ended = self.succeeded + self.failed + self.cancelled;
        batch.counts = Some(BatchCounts {
            total: self.total,
            succeeded: self.succeeded,
            failed: self.failed,
            cancelled: self.cancelled,
            pending: (self.total - ended).max(0),
        });
        batch.create_time = timestamp(self.create_ms);
        batch.expire_time = timestamp(self.expire_ms);
        batch.not_before = timestamp(self.not_before_ms);
        batch.end_time = timestamp(self.end_ms);
        batch
    }

    /// Whether the batch has ended.
    pub fn is_terminal(&self) -> bool {
        state::is_terminal(self.state)
    }
}

/// A batch to create.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct NewBatch {
    /// New id (used unless `request_id` is known).
    pub id: String,
    /// Idempotency key ("" = none).
    pub request_id: String,
    /// Callback and labels.
    pub body: Batch,
    /// The items' jobs, in order: ids `<id>-<n>`, each with its request, `batch_id` and
    /// `custom_id`.
    pub items: Vec<Job>,
    /// End of the completion window, Unix ms.
    pub expire_ms: i64,
    /// No item starts before this, Unix ms (0: at once).
    pub not_before_ms: i64,
}

/// What `create_batch` did.
#[derive(Debug, Clone, PartialEq)]
pub struct Created {
    /// The batch.
    pub batch: BatchRecord,
    /// False when `request_id` named an existing batch, returned instead.
    pub created: bool,
}

/// A slice of a batch's results: the jobs of the items that ended, in the order they ended.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ResultsPage {
    /// The ended items' jobs (an item whose job has passed its retention is left out).
    pub jobs: Vec<super::JobRecord>,
    /// Position after the last result read: where the next read starts.
    pub next: u64,
}

/// A page of `ListBatches`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct BatchPage {
    /// The batches, newest first.
    pub batches: Vec<BatchRecord>,
    /// The sequence to continue below (None: last page).
    pub next: Option<u64>,
}

/// The id of a batch's `n`th item's job.
pub fn item_job_id(batch_id: &str, n: usize) -> String {
    format!("{batch_id}-{n}")
}
