//! Where budgets, holds and spend live: Redis in production, memory for `weir up` without Redis.
//!
//! Both stores implement the same operations with the same semantics; the Redis one does every
//! state change in a Lua script (see [`redis`] for the key layout and each script's invariant),
//! the memory one under a mutex. The API layer resolves periods and prices before it calls a store,
//! so the stores only move integers.

pub mod memory;
pub mod redis;

use weir_mesh::{ApiError, tenant::Tenant};

use crate::{
    period::{Period, Window},
    pricing::Tokens,
    scope::Scope,
};

/// A scope's budget as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct BudgetRecord {
    /// Bumped by every SetBudget; Reserve checks it so it never applies a stale plan.
    pub generation: i64,
    /// Hard limit, micro-USD.
    pub hard: i64,
    /// Soft limit, micro-USD (0: disabled).
    pub soft: i64,
    /// Soft limit as given, a fraction of the hard limit.
    pub fraction: f64,
    /// When spend resets.
    pub period: Period,
}

/// One scope of a reservation, as planned by the API layer.
#[derive(Debug, Clone)]
pub struct ScopePlan {
    /// The scope.
    pub scope: Scope,
    /// Generation of the budget the plan was made with (0: no budget).
    pub generation: i64,
    /// The budget's current period; `None` when the scope has no budget (no limit, no hold).
    pub window: Option<Window>,
}

/// Input of [`Store::reserve`].
#[derive(Debug, Clone)]
pub struct ReserveInput {
    /// Id for a new reservation.
    pub id: String,
    /// Idempotency key.
    pub request_id: String,
    /// What the request asked for; a retry with another fingerprint is refused.
    pub fingerprint: String,
    /// Amount to hold, micro-USD.
    pub amount: i64,
    /// Model, for spend reports.
    pub model: String,
    /// Now, Unix ms.
    pub now_ms: i64,
    /// Expiry, Unix ms.
    pub expire_ms: i64,
    /// The scopes, deduplicated.
    pub scopes: Vec<ScopePlan>,
}

/// Life of a reservation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Holding its amount.
    Held,
    /// Settled with the actual cost.
    Committed,
    /// Released without spending.
    Released,
    /// Not settled in time; released by the sweeper.
    Expired,
}

impl State {
    fn from_code(code: &str) -> Option<Self> {
        match code {
            "H" => Some(Self::Held),
            "C" => Some(Self::Committed),
            "R" => Some(Self::Released),
            "E" => Some(Self::Expired),
            _ => None,
        }
    }
}

/// A reservation as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReservationRecord {
    /// Id.
    pub id: String,
    /// State.
    pub state: State,
    /// Amount held, micro-USD.
    pub amount: i64,
    /// Cost charged, once charged.
    pub committed: Option<i64>,
    /// Held amount given back by the commit.
    pub refunded: i64,
    /// Cost beyond the hold.
    pub overrun: i64,
    /// Model.
    pub model: String,
    /// Creation, Unix ms.
    pub created_ms: i64,
    /// Expiry, Unix ms.
    pub expire_ms: i64,
    /// Scopes.
    pub scopes: Vec<Scope>,
}

/// Result of [`Store::reserve`].
#[derive(Debug, Clone)]
pub enum ReserveOutcome {
    /// Held (new) or the earlier reservation of the same request (replay).
    Held(ReservationRecord),
    /// The scope at `index` has no room.
    Exhausted {
        /// Index into the scopes.
        index: usize,
        /// For a rolling window, the oldest bucket with spend.
        oldest_bucket: Option<i64>,
        /// Held in the scope.
        held: i64,
        /// Spent in the scope's period.
        spent: i64,
        /// Its hard limit.
        hard: i64,
    },
    /// A budget changed since it was read: plan again.
    Stale,
    /// The request id was used with other parameters.
    Mismatch,
    /// The request id is known but its reservation is gone (past retention).
    Gone,
}

/// Input of [`Store::commit`].
#[derive(Debug, Clone)]
pub struct CommitInput {
    /// Reservation id.
    pub id: String,
    /// Idempotency key (may be empty).
    pub request_id: String,
    /// Actual cost, micro-USD.
    pub cost: i64,
    /// Actual usage, for spend reports.
    pub tokens: Tokens,
    /// Now, Unix ms.
    pub now_ms: i64,
}

/// A soft limit crossed by a commit, claimed once per period.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SoftCrossing {
    /// The scope.
    pub scope: Scope,
    /// Its spend after the commit.
    pub spent: i64,
    /// Its soft limit.
    pub soft: i64,
}

/// Result of [`Store::commit`].
#[derive(Debug, Clone)]
pub enum CommitOutcome {
    /// Charged now; with the soft limits this charge crossed.
    Charged(ReservationRecord, Vec<SoftCrossing>),
    /// Charged before (a retry): nothing changed.
    Replayed(ReservationRecord),
    /// The reservation was released: nothing to charge against.
    Released(ReservationRecord),
    /// Charged before under another request id.
    Conflict(ReservationRecord),
    /// No such reservation.
    NotFound,
}

/// A counter's state in the current period.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CounterState {
    /// Held by reservations.
    pub held: i64,
    /// Spent in the period (window).
    pub spent: i64,
    /// The soft-limit event fired in this period.
    pub soft_reached: bool,
    /// For a rolling window, the oldest bucket with spend.
    pub oldest_bucket: Option<i64>,
}

/// Spend of one model, summed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ModelSpendRow {
    /// Model.
    pub model: String,
    /// Cost, micro-USD.
    pub cost: i64,
    /// Commits.
    pub requests: i64,
    /// Input tokens.
    pub input: i64,
    /// Output tokens.
    pub output: i64,
    /// Cached input tokens.
    pub cached_input: i64,
}

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Redis failed or could not be reached.
    #[error("redis: {0}")]
    Redis(#[from] ::redis::RedisError),
    /// Stored data did not have the expected shape.
    #[error("corrupt budget data: {0}")]
    Corrupt(String),
}

impl From<StoreError> for ApiError {
    fn from(error: StoreError) -> Self {
        match &error {
            // Unreachable Redis: UNAVAILABLE with the retry delay every store advertises.
            StoreError::Redis(e) if weir_mesh::store::is_outage(e) => ApiError::unavailable(
                weir_mesh::store::REDIS_UNAVAILABLE,
                format!("the budget store is unavailable: {e}"),
            )
            .with_retry_after(weir_mesh::store::REDIS_RETRY_AFTER),
            StoreError::Redis(_) => ApiError::new(
                tonic::Code::Internal,
                "REDIS_ERROR",
                format!("budget store error: {error}"),
            ),
            StoreError::Corrupt(_) => ApiError::internal(error.to_string()),
        }
    }
}

/// The store behind the service.
#[derive(Debug, Clone)]
pub enum Store {
    /// Redis (production, tests).
    Redis(redis::RedisStore),
    /// Memory (`weir up` without Redis).
    Memory(memory::MemoryStore),
}

macro_rules! dispatch {
    ($self:ident, $store:ident => $call:expr) => {
        match $self {
            Store::Redis($store) => $call,
            Store::Memory($store) => $call,
        }
    };
}

impl Store {
    /// The budgets of `scopes` (None where a scope has none).
    pub async fn budgets(
        &self,
        tenant: &Tenant,
        scopes: &[Scope],
    ) -> Result<Vec<Option<BudgetRecord>>, StoreError> {
        dispatch!(self, s => s.budgets(tenant, scopes).await)
    }

    /// Holds an amount against every scope, or none (see [`ReserveOutcome`]).
    pub async fn reserve(
        &self,
        tenant: &Tenant,
        input: &ReserveInput,
    ) -> Result<ReserveOutcome, StoreError> {
        dispatch!(self, s => s.reserve(tenant, input).await)
    }

    /// A reservation.
    pub async fn reservation(
        &self,
        tenant: &Tenant,
        id: &str,
    ) -> Result<Option<ReservationRecord>, StoreError> {
        dispatch!(self, s => s.reservation(tenant, id).await)
    }

    /// Settles a reservation.
    pub async fn commit(
        &self,
        tenant: &Tenant,
        input: &CommitInput,
    ) -> Result<CommitOutcome, StoreError> {
        dispatch!(self, s => s.commit(tenant, input).await)
    }

    /// Releases a reservation; None if unknown.
    pub async fn release(
        &self,
        tenant: &Tenant,
        id: &str,
        now_ms: i64,
    ) -> Result<Option<ReservationRecord>, StoreError> {
        dispatch!(self, s => s.release(tenant, id, now_ms).await)
    }

    /// Expires up to `limit` due reservations (of every tenant); returns (looked at, expired).
    pub async fn sweep(&self, now_ms: i64, limit: usize) -> Result<(usize, usize), StoreError> {
        dispatch!(self, s => s.sweep(now_ms, limit).await)
    }

    /// Replaces a scope's budget; returns its new generation.
    pub async fn set_budget(
        &self,
        tenant: &Tenant,
        scope: &Scope,
        budget: &BudgetRecord,
    ) -> Result<i64, StoreError> {
        dispatch!(self, s => s.set_budget(tenant, scope, budget).await)
    }

    /// A scope's counter in `window`.
    pub async fn counter(
        &self,
        tenant: &Tenant,
        scope: &Scope,
        window: &Window,
        now_ms: i64,
    ) -> Result<CounterState, StoreError> {
        dispatch!(self, s => s.counter(tenant, scope, window, now_ms).await)
    }

    /// Spend of a scope by model over the hours starting in `[first_hour, end_ms)` (Unix seconds
    /// of hour starts, ms end).
    pub async fn spend(
        &self,
        tenant: &Tenant,
        scope: &Scope,
        hours: &[i64],
    ) -> Result<Vec<ModelSpendRow>, StoreError> {
        dispatch!(self, s => s.spend(tenant, scope, hours).await)
    }
}

/// Adds rows of the same model.
fn merge_rows(rows: impl IntoIterator<Item = ModelSpendRow>) -> Vec<ModelSpendRow> {
    let mut by_model: std::collections::BTreeMap<String, ModelSpendRow> = Default::default();
    for row in rows {
        let entry = by_model
            .entry(row.model.clone())
            .or_insert_with(|| ModelSpendRow {
                model: row.model.clone(),
                ..ModelSpendRow::default()
            });
        entry.cost = entry.cost.saturating_add(row.cost);
        entry.requests = entry.requests.saturating_add(row.requests);
        entry.input = entry.input.saturating_add(row.input);
        entry.output = entry.output.saturating_add(row.output);
        entry.cached_input = entry.cached_input.saturating_add(row.cached_input);
    }
    by_model.into_values().collect()
}
