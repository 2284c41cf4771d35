//! Where review items live: the [`Store`] trait and its two implementations.
//!
//! - [`RedisStore`] (`redis.rs`): the real one. Every state transition is one Lua script, so it
//!   is atomic across the item, its queue's indexes and the audit trail, and any number of
//!   replicas can serve (and sweep) the same items.
//! - [`MemoryStore`] (`memory.rs`): the same semantics in one process's memory, for `weir up`
//!   without Redis. It loses everything on restart and only one replica can use it.
//!
//! # The model every store implements
//!
//! An item is PENDING, then CLAIMED by one reviewer under a lease, then DECIDED; or CANCELLED;
//! or EXPIRED by its SLA. DECIDED, CANCELLED and EXPIRED are terminal: a terminal item never
//! changes again. Each transition checks its precondition and applies in one atomic step:
//!
//! - `create` with a known `request_id` returns the first item and creates nothing.
//! - `claim` takes the most urgent PENDING item of a queue ([`urgency_key`]: higher priority,
//!   then earlier SLA deadline, then earlier creation), or one named item if it is PENDING.
//! - `renew` and `decide` need the current lease: the item CLAIMED, the same lease id, and the
//!   lease not lapsed (`lease_expire > now`), else [`StoreError::LeaseNotHeld`]; on a terminal
//!   item [`StoreError::Terminal`]. So of concurrent decisions exactly one wins.
//! - `expire_lease` (the sweeper) returns a CLAIMED item whose lease lapsed to PENDING.
//! - `apply_sla` (the sweeper) applies a queue's timeout action to an open item whose SLA
//!   passed, once: it checks the item is still open, in the queue the caller read, and past its
//!   deadline, so a second replica racing it finds nothing to do.
//!
//! Every transition appends exactly one [`AuditRecord`] to the tenant's append-only trail and
//! announces a [`Change`].

use std::{collections::BTreeMap, future::Future};

use tokio::sync::broadcast;
use weir_mesh::tenant::Tenant;
use weir_proto::review::ReviewItem;

use crate::config::TimeoutAction;

pub mod memory;
pub mod redis;

pub use memory::MemoryStore;
pub use redis::RedisStore;

/// `ItemState` values (as stored).
pub mod state {
    /// Waiting for a reviewer.
    pub const PENDING: i32 = 1;
    /// Leased to a reviewer.
    pub const CLAIMED: i32 = 2;
    /// Decided.
    pub const DECIDED: i32 = 3;
    /// Cancelled.
    pub const CANCELLED: i32 = 4;
    /// Expired by its SLA.
    pub const EXPIRED: i32 = 5;

    /// Whether `state` never changes again.
    pub fn is_terminal(state: i32) -> bool {
        matches!(state, DECIDED | CANCELLED | EXPIRED)
    }
}

/// The actor of the sweeper's lease expiries.
pub const SYSTEM_ACTOR: &str = "system";
/// The actor (and reviewer) of SLA timeout actions.
pub const SLA_ACTOR: &str = "system:sla";
/// Window of "decided in the last hour".
pub const DECIDED_WINDOW_MS: i64 = 60 * 60 * 1000;

/// A lease as stored.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LeaseRecord {
    /// Lease id.
    pub lease_id: String,
    /// Reviewer holding it.
    pub reviewer: String,
    /// When it lapses, Unix ms.
    pub expire_ms: i64,
}

/// A decision as stored.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DecisionRecord {
    /// `Verdict` value.
    pub verdict: i32,
    /// Replacement text of an edit.
    pub edited_content: String,
    /// Who decided (the lease's reviewer, or [`SLA_ACTOR`]).
    pub reviewer: String,
    /// Comment.
    pub comment: String,
    /// When, Unix ms.
    pub decide_ms: i64,
}

/// An item as stored: the immutable content (`body`) and the state that transitions change.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ItemRecord {
    /// Item id.
    pub id: String,
    /// Current queue (changes on escalation).
    pub queue: String,
    /// `ItemState` value.
    pub state: i32,
    /// Priority.
    pub priority: i32,
    /// Creation, Unix ms.
    pub create_ms: i64,
    /// SLA deadline, Unix ms (changes on escalation).
    pub sla_ms: i64,
    /// Incremented by every transition.
    pub version: i64,
    /// The lease while CLAIMED.
    pub lease: Option<LeaseRecord>,
    /// The decision once DECIDED.
    pub decision: Option<DecisionRecord>,
    /// The immutable content: conversation, output, model, reasons, labels, mode, trace id,
    /// source request id (the other fields of this message are not stored in it).
    pub body: ReviewItem,
}

/// An item to create.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct NewItem {
    /// Idempotency key (empty: none).
    pub request_id: String,
    /// New random id (used unless `request_id` is known).
    pub id: String,
    /// Queue.
    pub queue: String,
    /// Priority.
    pub priority: i32,
    /// SLA deadline, Unix ms.
    pub sla_ms: i64,
    /// The immutable content.
    pub body: ReviewItem,
    /// Who asked (audit actor).
    pub actor: String,
    /// Now, Unix ms.
    pub now_ms: i64,
}

/// A claim.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Claim {
    /// Queue.
    pub queue: String,
    /// A specific item to claim (else the most urgent pending one).
    pub item_id: Option<String>,
    /// Lease to grant.
    pub lease: LeaseRecord,
    /// Audit actor.
    pub actor: String,
    /// Now, Unix ms.
    pub now_ms: i64,
}

/// A decision to record.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Decide {
    /// Item id.
    pub item_id: String,
    /// The lease the caller holds.
    pub lease_id: String,
    /// `Verdict` value.
    pub verdict: i32,
    /// Replacement text of an edit.
    pub edited_content: String,
    /// Comment.
    pub comment: String,
    /// Label of the authenticated key (`key:<id>`), appended to the reviewer as audit actor.
    pub key_label: String,
    /// Now, Unix ms.
    pub now_ms: i64,
}

/// The SLA timeout action to apply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlaAction {
    /// The action.
    pub action: TimeoutAction,
    /// The queue the caller read the item in (nothing happens if it moved since).
    pub expected_queue: String,
    /// With escalate: the target queue.
    pub escalate_to: String,
    /// With escalate: the new SLA deadline, Unix ms.
    pub new_sla_ms: i64,
    /// Now, Unix ms.
    pub now_ms: i64,
}

/// One audit event as stored.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct AuditRecord {
    /// Event id (increasing per tenant).
    pub id: String,
    /// The item.
    pub item: String,
    /// `AuditAction` value.
    pub action: i32,
    /// Who.
    pub actor: String,
    /// When, Unix ms.
    pub time: i64,
    /// Details as a JSON object.
    pub detail: String,
}

/// Counts of a queue.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct QueueCounts {
    /// PENDING items.
    pub pending: i64,
    /// CLAIMED items.
    pub claimed: i64,
    /// Open items past their SLA deadline.
    pub sla_breached: i64,
    /// Creation of the oldest PENDING item, Unix ms.
    pub oldest_pending_ms: Option<i64>,
    /// Decided in the last hour.
    pub decided_last_hour: i64,
    /// Decided since the queue exists.
    pub decided_total: i64,
    /// Of which approved.
    pub approved_total: i64,
    /// reviewer → (decided, approved).
    pub reviewers: BTreeMap<String, (i64, i64)>,
}

/// A page of items.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ItemPage {
    /// The items.
    pub items: Vec<ItemRecord>,
    /// Where the next page starts (empty: no more).
    pub next: String,
}

/// An item changed: watchers re-read it. `Resync` means changes may have been missed (the
/// change feed reconnected): every watcher re-reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// The item `id` of `tenant` changed while in `queue`.
    Item {
        /// Tenant.
        tenant: String,
        /// Queue (both the old and the new queue are announced on escalation).
        queue: String,
        /// Item id.
        id: String,
    },
    /// Re-read everything.
    Resync,
}

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// No such item for this tenant.
    #[error("item not found")]
    NotFound,
    /// The caller's lease is not the item's current lease (lapsed, renewed by an expiry and a
    /// new claim, or never held).
    #[error("the lease is not held")]
    LeaseNotHeld,
    /// The item is decided, cancelled or expired.
    #[error("item is in terminal state {0}")]
    Terminal(i32),
    /// `claim` of a specific item that is not PENDING in that queue.
    #[error("item is not pending in the queue")]
    NotPending,
    /// Redis failed or could not be reached.
    #[error("redis: {0}")]
    Redis(#[from] ::redis::RedisError),
    /// Stored data could not be read.
    #[error("corrupt review data: {0}")]
    Corrupt(String),
}

/// What is due in a tenant: items with a lapsed lease, and items past their SLA with the queue
/// they are in.
pub type DueItems = (Vec<String>, Vec<(String, String)>);

/// The result of a create: the item, and whether it was created now (false: a replay).
pub type Created = (ItemRecord, bool);

/// Storage of review items. See the module doc for the semantics every implementation keeps.
pub trait Store: Send + Sync + Clone + 'static {
    /// Creates an item (or returns the one created with the same `request_id`).
    fn create(
        &self,
        tenant: &Tenant,
        new: NewItem,
    ) -> impl Future<Output = Result<Created, StoreError>> + Send;

    /// Reads an item.
    fn get(
        &self,
        tenant: &Tenant,
        id: &str,
    ) -> impl Future<Output = Result<ItemRecord, StoreError>> + Send;

    /// Items of `queue` (only those in `state`, unless 0), most urgent first, after `after`.
    fn list(
        &self,
        tenant: &Tenant,
        queue: &str,
        state: i32,
        after: &str,
        limit: usize,
    ) -> impl Future<Output = Result<ItemPage, StoreError>> + Send;

    /// Leases an item; `None` when nothing is pending.
    fn claim(
        &self,
        tenant: &Tenant,
        claim: Claim,
    ) -> impl Future<Output = Result<Option<ItemRecord>, StoreError>> + Send;

    /// Extends the lease `lease_id` of item `id` to `expire_ms` (audited as the lease's
    /// reviewer with `key_label`).
    fn renew(
        &self,
        tenant: &Tenant,
        id: &str,
        lease_id: &str,
        expire_ms: i64,
        key_label: &str,
        now_ms: i64,
    ) -> impl Future<Output = Result<ItemRecord, StoreError>> + Send;

    /// Records a decision.
    fn decide(
        &self,
        tenant: &Tenant,
        decide: Decide,
    ) -> impl Future<Output = Result<ItemRecord, StoreError>> + Send;

    /// Cancels an open item; a terminal one is returned unchanged (false).
    fn cancel(
        &self,
        tenant: &Tenant,
        id: &str,
        reason: &str,
        actor: &str,
        now_ms: i64,
    ) -> impl Future<Output = Result<(ItemRecord, bool), StoreError>> + Send;

    /// Counts of a queue.
    fn stats(
        &self,
        tenant: &Tenant,
        queue: &str,
        now_ms: i64,
    ) -> impl Future<Output = Result<QueueCounts, StoreError>> + Send;

    /// Audit events (of one item, or of the tenant), oldest first, from `offset`; the next
    /// offset when there are more.
    fn audit(
        &self,
        tenant: &Tenant,
        item_id: Option<&str>,
        offset: u64,
        limit: usize,
    ) -> impl Future<Output = Result<(Vec<AuditRecord>, Option<u64>), StoreError>> + Send;

    /// Tenants with a lease or SLA due at `now_ms` (at most `limit`).
    fn due_tenants(
        &self,
        now_ms: i64,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<Tenant>, StoreError>> + Send;

    /// Items of `tenant` with a lapsed lease, and items past their SLA with their queue.
    fn due_items(
        &self,
        tenant: &Tenant,
        now_ms: i64,
        limit: usize,
    ) -> impl Future<Output = Result<DueItems, StoreError>> + Send;

    /// Returns a CLAIMED item whose lease lapsed to PENDING; `None` if there was nothing to do.
    fn expire_lease(
        &self,
        tenant: &Tenant,
        id: &str,
        now_ms: i64,
    ) -> impl Future<Output = Result<Option<ItemRecord>, StoreError>> + Send;

    /// Applies an SLA timeout action; `None` if there was nothing to do (another replica did
    /// it, or the item was decided meanwhile).
    fn apply_sla(
        &self,
        tenant: &Tenant,
        id: &str,
        action: SlaAction,
    ) -> impl Future<Output = Result<Option<ItemRecord>, StoreError>> + Send;

    /// Recomputes when `tenant` is next due (after a sweep found nothing to do).
    fn refresh_due(&self, tenant: &Tenant) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Changes from now on (of every replica, for Redis). Waits (a bounded time) until the
    /// change feed is live, so a change made after this returns is delivered.
    fn subscribe(&self) -> impl Future<Output = broadcast::Receiver<Change>> + Send;
}

/// The store chosen at start-up.
#[derive(Debug, Clone)]
pub enum AnyStore {
    /// Redis.
    Redis(Box<RedisStore>),
    /// In-process memory.
    Memory(MemoryStore),
}

macro_rules! dispatch {
    ($self:ident, $store:ident => $call:expr) => {
        match $self {
            AnyStore::Redis($store) => $call.await,
            AnyStore::Memory($store) => $call.await,
        }
    };
}

impl Store for AnyStore {
    async fn create(&self, tenant: &Tenant, new: NewItem) -> Result<Created, StoreError> {
        dispatch!(self, s => s.create(tenant, new))
    }

    async fn get(&self, tenant: &Tenant, id: &str) -> Result<ItemRecord, StoreError> {
        dispatch!(self, s => s.get(tenant, id))
    }

    async fn list(
        &self,
        tenant: &Tenant,
        queue: &str,
        state: i32,
        after: &str,
        limit: usize,
    ) -> Result<ItemPage, StoreError> {
        dispatch!(self, s => s.list(tenant, queue, state, after, limit))
    }

    async fn claim(&self, tenant: &Tenant, claim: Claim) -> Result<Option<ItemRecord>, StoreError> {
        dispatch!(self, s => s.claim(tenant, claim))
    }

    async fn renew(
        &self,
        tenant: &Tenant,
        id: &str,
        lease_id: &str,
        expire_ms: i64,
        key_label: &str,
        now_ms: i64,
    ) -> Result<ItemRecord, StoreError> {
        dispatch!(self, s => s.renew(tenant, id, lease_id, expire_ms, key_label, now_ms))
    }

    async fn decide(&self, tenant: &Tenant, decide: Decide) -> Result<ItemRecord, StoreError> {
        dispatch!(self, s => s.decide(tenant, decide))
    }

    async fn cancel(
        &self,
        tenant: &Tenant,
        id: &str,
        reason: &str,
        actor: &str,
        now_ms: i64,
    ) -> Result<(ItemRecord, bool), StoreError> {
        dispatch!(self, s => s.cancel(tenant, id, reason, actor, now_ms))
    }

    async fn stats(
        &self,
        tenant: &Tenant,
        queue: &str,
        now_ms: i64,
    ) -> Result<QueueCounts, StoreError> {
        dispatch!(self, s => s.stats(tenant, queue, now_ms))
    }

    async fn audit(
        &self,
        tenant: &Tenant,
        item_id: Option<&str>,
        offset: u64,
        limit: usize,
    ) -> Result<(Vec<AuditRecord>, Option<u64>), StoreError> {
        dispatch!(self, s => s.audit(tenant, item_id, offset, limit))
    }

    async fn due_tenants(&self, now_ms: i64, limit: usize) -> Result<Vec<Tenant>, StoreError> {
        dispatch!(self, s => s.due_tenants(now_ms, limit))
    }

    async fn due_items(
        &self,
        tenant: &Tenant,
        now_ms: i64,
        limit: usize,
    ) -> Result<DueItems, StoreError> {
        dispatch!(self, s => s.due_items(tenant, now_ms, limit))
    }

    async fn expire_lease(
        &self,
        tenant: &Tenant,
        id: &str,
        now_ms: i64,
    ) -> Result<Option<ItemRecord>, StoreError> {
        dispatch!(self, s => s.expire_lease(tenant, id, now_ms))
    }

    async fn apply_sla(
        &self,
        tenant: &Tenant,
        id: &str,
        action: SlaAction,
    ) -> Result<Option<ItemRecord>, StoreError> {
        dispatch!(self, s => s.apply_sla(tenant, id, action))
    }

    async fn refresh_due(&self, tenant: &Tenant) -> Result<(), StoreError> {
        dispatch!(self, s => s.refresh_due(tenant))
    }

    async fn subscribe(&self) -> broadcast::Receiver<Change> {
        match self {
            AnyStore::Redis(s) => s.subscribe().await,
            AnyStore::Memory(s) => s.subscribe().await,
        }
    }
}

/// The sort key of an item in its queue: ascending order is most urgent first (higher priority,
/// then earlier SLA deadline, then earlier creation, then id). The Lua scripts build the same
/// string.
pub fn urgency_key(priority: i32, sla_ms: i64, create_ms: i64, id: &str) -> String {
    let inverted = i64::from(i32::MAX) - i64::from(priority);
    format!(
        "{inverted:010}{:015}{:015}:{id}",
        sla_ms.max(0),
        create_ms.max(0)
    )
}

/// The audit actor of a reviewer (or service) `name` calling with key label `key_label`
/// (`key:<id>`, or empty): `alice (key:ops)`, `alice`, or `key:ops`. The Lua scripts build the
/// same string.
pub fn actor(name: &str, key_label: &str) -> String {
    match (name.is_empty(), key_label.is_empty()) {
        (false, false) => format!("{name} ({key_label})"),
        (false, true) => name.to_string(),
        (true, false) => key_label.to_string(),
        (true, true) => "anonymous".to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urgency_orders_priority_then_deadline_then_creation() {
        let mut keys = [
            urgency_key(0, 5_000, 1, "a"),
            urgency_key(5, 9_000, 1, "b"),
            urgency_key(0, 4_000, 2, "c"),
            urgency_key(-3, 1, 0, "d"),
            urgency_key(0, 4_000, 1, "e"),
        ];
        keys.sort();
        let ids: Vec<&str> = keys.iter().filter_map(|k| k.rsplit(':').next()).collect();
        assert_eq!(ids, ["b", "e", "c", "a", "d"]);
    }

    #[test]
    fn actors_name_the_key() {
        assert_eq!(actor("alice", "key:ops"), "alice (key:ops)");
        assert_eq!(actor("", "key:ops"), "key:ops");
        assert_eq!(actor("alice", ""), "alice");
    }
}
