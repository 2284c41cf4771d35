//! The in-memory store of `weir up` without Redis: the same semantics as the Redis scripts, each
//! operation under one mutex. Everything is lost on restart, and one process is one budget: never
//! what production or the integration tests run.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    sync::{Arc, Mutex, MutexGuard},
};

use weir_mesh::tenant::Tenant;

use super::{
    BudgetRecord, CommitInput, CommitOutcome, CounterState, ModelSpendRow, ReservationRecord,
    ReserveInput, ReserveOutcome, SoftCrossing, State, StoreError, merge_rows,
};
use crate::{period::Window, scope::Scope};

/// The in-memory store.
#[derive(Debug, Clone, Default)]
pub struct MemoryStore {
    state: Arc<Mutex<Inner>>,
}

#[derive(Debug, Default)]
struct Counter {
    held: i64,
    spent: i64,
    buckets: BTreeMap<i64, i64>,
    soft_fired: bool,
}

impl Counter {
    /// Spend in the window; drops buckets that left it.
    fn window_spent(&mut self, bucket_ms: i64, buckets: i64, now_ms: i64) -> (i64, Option<i64>) {
        if bucket_ms == 0 {
            return (self.spent, None);
        }
        let first = now_ms.div_euclid(bucket_ms) - buckets + 1;
        self.buckets = self.buckets.split_off(&first);
        let oldest = self.buckets.iter().find(|(_, v)| **v != 0).map(|(b, _)| *b);
        (self.buckets.values().copied().sum(), oldest)
    }

    fn add_spent(&mut self, bucket_ms: i64, now_ms: i64, delta: i64) {
        if bucket_ms == 0 {
            self.spent = self.spent.saturating_add(delta);
        } else {
            let slot = self
                .buckets
                .entry(now_ms.div_euclid(bucket_ms))
                .or_default();
            *slot = slot.saturating_add(delta);
        }
    }
}

#[derive(Debug)]
struct Held {
    scope: Scope,
    /// (counter key, bucket ms, buckets) when the scope had a budget.
    counter: Option<(String, i64, i64)>,
}

#[derive(Debug)]
struct Res {
    record: ReservationRecord,
    held: Vec<Held>,
    request_id: String,
    settled_ms: i64,
}

#[derive(Debug, Default)]
struct Inner {
    budgets: HashMap<(Tenant, Scope), BudgetRecord>,
    counters: HashMap<(Tenant, String), Counter>,
    reservations: HashMap<(Tenant, String), Res>,
    idempotency: HashMap<(Tenant, String), (String, String, i64)>,
    usage: HashMap<(Tenant, Scope, i64), BTreeMap<String, ModelSpendRow>>,
    expiries: BTreeSet<(i64, Tenant, String)>,
}

impl Inner {
    fn expire(&mut self, tenant: &Tenant, id: &str, now_ms: i64) {
        let Some(res) = self.reservations.get_mut(&(tenant.clone(), id.to_string())) else {
            return;
        };
        if res.record.state != State::Held {
            return;
        }
        res.record.state = State::Expired;
        res.settled_ms = now_ms;
        let amount = res.record.amount;
        let key = (res.record.expire_ms, tenant.clone(), id.to_string());
        for held in &res.held {
            if let Some((counter, _, _)) = &held.counter
                && let Some(c) = self.counters.get_mut(&(tenant.clone(), counter.clone()))
            {
                c.held -= amount;
            }
        }
        self.expiries.remove(&key);
    }
}

fn counter_id(scope: &Scope, window: &Window) -> String {
    format!("{}:{}", scope.key(), window.counter_id)
}

impl MemoryStore {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave a half-applied change that matters more
        // than losing the whole in-memory store would.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(super) async fn budgets(
        &self,
        tenant: &Tenant,
        scopes: &[Scope],
    ) -> Result<Vec<Option<BudgetRecord>>, StoreError> {
        let inner = self.lock();
        Ok(scopes
            .iter()
            .map(|s| inner.budgets.get(&(tenant.clone(), s.clone())).cloned())
            .collect())
    }

    pub(super) async fn reserve(
        &self,
        tenant: &Tenant,
        input: &ReserveInput,
    ) -> Result<ReserveOutcome, StoreError> {
        let mut inner = self.lock();
        let idem_key = (tenant.clone(), input.request_id.clone());
        if let Some((id, fingerprint, expires)) = inner.idempotency.get(&idem_key).cloned()
            && expires > input.now_ms
        {
            if fingerprint != input.fingerprint {
                return Ok(ReserveOutcome::Mismatch);
            }
            return Ok(match inner.reservations.get(&(tenant.clone(), id)) {
                Some(res) => ReserveOutcome::Held(res.record.clone()),
                None => ReserveOutcome::Gone,
            });
        }
        for (index, plan) in input.scopes.iter().enumerate() {
            let budget = inner.budgets.get(&(tenant.clone(), plan.scope.clone()));
            if budget.map_or(0, |b| b.generation) != plan.generation {
                return Ok(ReserveOutcome::Stale);
            }
            let (Some(budget), Some(window)) = (budget.cloned(), &plan.window) else {
                continue;
            };
            let counter = inner
                .counters
                .entry((tenant.clone(), counter_id(&plan.scope, window)))
                .or_default();
            let (spent, oldest) =
                counter.window_spent(window.bucket_ms, window.buckets, input.now_ms);
            let total = counter
                .held
                .saturating_add(spent)
                .saturating_add(input.amount);
            if total > budget.hard {
                return Ok(ReserveOutcome::Exhausted {
                    index,
                    oldest_bucket: oldest,
                    held: counter.held,
                    spent,
                    hard: budget.hard,
                });
            }
        }
        let mut held = Vec::new();
        for plan in &input.scopes {
            let counter = plan.window.as_ref().map(|window| {
                let id = counter_id(&plan.scope, window);
                let c = inner
                    .counters
                    .entry((tenant.clone(), id.clone()))
                    .or_default();
                c.held += input.amount;
                (id, window.bucket_ms, window.buckets)
            });
            held.push(Held {
                scope: plan.scope.clone(),
                counter,
            });
        }
        let record = ReservationRecord {
            id: input.id.clone(),
            state: State::Held,
            amount: input.amount,
            committed: None,
            refunded: 0,
            overrun: 0,
            model: input.model.clone(),
            created_ms: input.now_ms,
            expire_ms: input.expire_ms,
            scopes: input.scopes.iter().map(|p| p.scope.clone()).collect(),
        };
        inner.reservations.insert(
            (tenant.clone(), input.id.clone()),
            Res {
                record: record.clone(),
                held,
                request_id: String::new(),
                settled_ms: 0,
            },
        );
        inner
            .expiries
            .insert((input.expire_ms, tenant.clone(), input.id.clone()));
        // Idempotency records are kept as long as the reservation can be replayed.
        inner.idempotency.insert(
            idem_key,
            (
                input.id.clone(),
                input.fingerprint.clone(),
                input.expire_ms.saturating_add(24 * 3600 * 1000),
            ),
        );
        Ok(ReserveOutcome::Held(record))
    }

    pub(super) async fn reservation(
        &self,
        tenant: &Tenant,
        id: &str,
    ) -> Result<Option<ReservationRecord>, StoreError> {
        let inner = self.lock();
        Ok(inner
            .reservations
            .get(&(tenant.clone(), id.to_string()))
            .map(|r| r.record.clone()))
    }

    pub(super) async fn commit(
        &self,
        tenant: &Tenant,
        input: &CommitInput,
    ) -> Result<CommitOutcome, StoreError> {
        let mut inner = self.lock();
        let key = (tenant.clone(), input.id.clone());
        let Some(res) = inner.reservations.get(&key) else {
            return Ok(CommitOutcome::NotFound);
        };
        if res.record.state == State::Held && res.record.expire_ms <= input.now_ms {
            inner.expire(tenant, &input.id, input.now_ms);
        }
        let Inner {
            reservations,
            counters,
            budgets,
            usage,
            expiries,
            ..
        } = &mut *inner;
        let Some(res) = reservations.get_mut(&key) else {
            return Ok(CommitOutcome::NotFound);
        };
        if res.record.state == State::Released {
            return Ok(CommitOutcome::Released(res.record.clone()));
        }
        if res.record.committed.is_some() {
            if !input.request_id.is_empty()
                && !res.request_id.is_empty()
                && input.request_id != res.request_id
            {
                return Ok(CommitOutcome::Conflict(res.record.clone()));
            }
            return Ok(CommitOutcome::Replayed(res.record.clone()));
        }
        let amount = res.record.amount;
        let was_held = res.record.state == State::Held;
        let (refunded, overrun) = if !was_held {
            (0, input.cost)
        } else if input.cost <= amount {
            (amount - input.cost, 0)
        } else {
            (0, input.cost - amount)
        };
        let mut crossings = Vec::new();
        let hour = input.now_ms.div_euclid(3_600_000) * 3600;
        for held in &res.held {
            if let Some((id, bucket_ms, buckets)) = &held.counter {
                let c = counters.entry((tenant.clone(), id.clone())).or_default();
                if was_held {
                    c.held -= amount;
                }
                c.add_spent(*bucket_ms, input.now_ms, input.cost);
                let soft = budgets
                    .get(&(tenant.clone(), held.scope.clone()))
                    .map_or(0, |b| b.soft);
                if soft > 0 {
                    let (spent, _) = c.window_spent(*bucket_ms, *buckets, input.now_ms);
                    if spent >= soft {
                        if !c.soft_fired {
                            c.soft_fired = true;
                            crossings.push(SoftCrossing {
                                scope: held.scope.clone(),
                                spent,
                                soft,
                            });
                        }
                    } else if *bucket_ms > 0 {
                        c.soft_fired = false;
                    }
                }
            }
            let row = usage
                .entry((tenant.clone(), held.scope.clone(), hour))
                .or_default()
                .entry(res.record.model.clone())
                .or_insert_with(|| ModelSpendRow {
                    model: res.record.model.clone(),
                    ..ModelSpendRow::default()
                });
            row.cost = row.cost.saturating_add(input.cost);
            row.requests += 1;
            row.input = row.input.saturating_add(input.tokens.input);
            row.output = row.output.saturating_add(input.tokens.output);
            row.cached_input = row.cached_input.saturating_add(input.tokens.cached_input);
        }
        res.record.committed = Some(input.cost);
        res.record.refunded = refunded;
        res.record.overrun = overrun;
        res.request_id = input.request_id.clone();
        res.settled_ms = input.now_ms;
        if was_held {
            res.record.state = State::Committed;
            expiries.remove(&(res.record.expire_ms, tenant.clone(), input.id.clone()));
        }
        Ok(CommitOutcome::Charged(res.record.clone(), crossings))
    }

    pub(super) async fn release(
        &self,
        tenant: &Tenant,
        id: &str,
        now_ms: i64,
    ) -> Result<Option<ReservationRecord>, StoreError> {
        let mut inner = self.lock();
        let key = (tenant.clone(), id.to_string());
        let Some(res) = inner.reservations.get(&key) else {
            return Ok(None);
        };
        if res.record.state == State::Held {
            if res.record.expire_ms <= now_ms {
                inner.expire(tenant, id, now_ms);
            } else {
                let Inner {
                    reservations,
                    counters,
                    expiries,
                    ..
                } = &mut *inner;
                if let Some(res) = reservations.get_mut(&key) {
                    for held in &res.held {
                        if let Some((counter, _, _)) = &held.counter
                            && let Some(c) = counters.get_mut(&(tenant.clone(), counter.clone()))
                        {
                            c.held -= res.record.amount;
                        }
                    }
                    res.record.state = State::Released;
                    res.settled_ms = now_ms;
                    expiries.remove(&(res.record.expire_ms, tenant.clone(), id.to_string()));
                }
            }
        }
        Ok(inner.reservations.get(&key).map(|r| r.record.clone()))
    }

    pub(super) async fn sweep(
        &self,
        now_ms: i64,
        limit: usize,
    ) -> Result<(usize, usize), StoreError> {
        let mut inner = self.lock();
        let due: Vec<(i64, Tenant, String)> = inner
            .expiries
            .iter()
            .take_while(|(at, _, _)| *at <= now_ms)
            .take(limit)
            .cloned()
            .collect();
        let mut expired = 0;
        for (at, tenant, id) in &due {
            let held = inner
                .reservations
                .get(&(tenant.clone(), id.clone()))
                .is_some_and(|r| r.record.state == State::Held);
            if held {
                inner.expire(tenant, id, now_ms);
                expired += 1;
            }
            inner.expiries.remove(&(*at, tenant.clone(), id.clone()));
        }
        // Forget what no retry can ask about any more: settled a day ago.
        let horizon = now_ms - 24 * 3600 * 1000;
        inner
            .reservations
            .retain(|_, r| r.record.state == State::Held || r.settled_ms > horizon);
        inner
            .idempotency
            .retain(|_, (_, _, expires)| *expires > now_ms);
        Ok((due.len(), expired))
    }

    pub(super) async fn set_budget(
        &self,
        tenant: &Tenant,
        scope: &Scope,
        budget: &BudgetRecord,
    ) -> Result<i64, StoreError> {
        let mut inner = self.lock();
        let key = (tenant.clone(), scope.clone());
        let generation = inner.budgets.get(&key).map_or(0, |b| b.generation) + 1;
        inner.budgets.insert(
            key,
            BudgetRecord {
                generation,
                ..budget.clone()
            },
        );
        Ok(generation)
    }

    pub(super) async fn counter(
        &self,
        tenant: &Tenant,
        scope: &Scope,
        window: &Window,
        now_ms: i64,
    ) -> Result<CounterState, StoreError> {
        let mut inner = self.lock();
        let Some(c) = inner
            .counters
            .get_mut(&(tenant.clone(), counter_id(scope, window)))
        else {
            return Ok(CounterState::default());
        };
        let (spent, oldest) = c.window_spent(window.bucket_ms, window.buckets, now_ms);
        Ok(CounterState {
            held: c.held,
            spent,
            soft_reached: c.soft_fired,
            oldest_bucket: oldest,
        })
    }

    pub(super) async fn spend(
        &self,
        tenant: &Tenant,
        scope: &Scope,
        hours: &[i64],
    ) -> Result<Vec<ModelSpendRow>, StoreError> {
        let inner = self.lock();
        let rows = hours
            .iter()
            .filter_map(|h| inner.usage.get(&(tenant.clone(), scope.clone(), *h)))
            .flat_map(|m| m.values().cloned())
            .collect::<Vec<_>>();
        Ok(merge_rows(rows))
    }
}
