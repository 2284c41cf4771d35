//! The in-memory store: one mutex over every tenant's items, so each operation is atomic as a
//! Redis script is. Queues are scanned linearly (`weir up` holds a handful of items), and
//! everything is lost on restart.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, Mutex, MutexGuard},
};

use tokio::sync::broadcast;
use weir_mesh::tenant::Tenant;
use weir_proto::review::{AuditAction, Verdict};

use super::{
    AuditRecord, Change, Claim, Created, DECIDED_WINDOW_MS, Decide, DecisionRecord, DueItems,
    ItemPage, ItemRecord, NewItem, QueueCounts, SLA_ACTOR, SYSTEM_ACTOR, SlaAction, Store,
    StoreError, actor, state, urgency_key,
};
use crate::config::TimeoutAction;

/// The in-memory store. Cheap to clone (clones share the data).
#[derive(Debug, Clone)]
pub struct MemoryStore {
    inner: Arc<Mutex<BTreeMap<Tenant, TenantData>>>,
    changes: broadcast::Sender<Change>,
}

#[derive(Debug, Default)]
struct TenantData {
    items: HashMap<String, ItemRecord>,
    requests: HashMap<String, String>,
    audit: Vec<AuditRecord>,
    /// queue → (decision times, decided, approved, reviewer → (decided, approved)).
    decisions: HashMap<String, QueueDecisions>,
}

#[derive(Debug, Default)]
struct QueueDecisions {
    times: Vec<i64>,
    total: i64,
    approved: i64,
    reviewers: BTreeMap<String, (i64, i64)>,
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new()
    }
}

impl TenantData {
    fn audit(&mut self, item: &str, action: AuditAction, actor: &str, now: i64, detail: String) {
        let id = format!("{:012}", self.audit.len() + 1);
        self.audit.push(AuditRecord {
            id,
            item: item.to_string(),
            action: action as i32,
            actor: actor.to_string(),
            time: now,
            detail,
        });
    }

    fn record_decision(&mut self, queue: &str, reviewer: &str, verdict: i32, now: i64) {
        let entry = self.decisions.entry(queue.to_string()).or_default();
        let approved = i64::from(verdict == Verdict::Approve as i32);
        entry.times.retain(|t| *t > now - DECIDED_WINDOW_MS);
        entry.times.push(now);
        entry.total += 1;
        entry.approved += approved;
        let stats = entry.reviewers.entry(reviewer.to_string()).or_default();
        stats.0 += 1;
        stats.1 += approved;
    }
}

fn json(value: serde_json::Value) -> String {
    value.to_string()
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self {
            inner: Arc::new(Mutex::new(BTreeMap::new())),
            changes: broadcast::channel(1024).0,
        }
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<Tenant, TenantData>> {
        // A panic while holding the lock cannot leave an item half-changed (each change is a
        // few assignments), so a poisoned lock is still usable.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn announce(&self, tenant: &Tenant, queue: &str, id: &str) {
        // No receivers is fine.
        let _ = self.changes.send(Change::Item {
            tenant: tenant.to_string(),
            queue: queue.to_string(),
            id: id.to_string(),
        });
    }

    /// Applies `change` to item `id` of `tenant` under the lock.
    fn with_item<T>(
        &self,
        tenant: &Tenant,
        id: &str,
        change: impl FnOnce(&mut ItemRecord) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let mut all = self.lock();
        let item = all
            .get_mut(tenant)
            .and_then(|t| t.items.get_mut(id))
            .ok_or(StoreError::NotFound)?;
        change(item)
    }
}

fn check_lease(item: &ItemRecord, lease_id: &str, now: i64) -> Result<(), StoreError> {
    if state::is_terminal(item.state) {
        return Err(StoreError::Terminal(item.state));
    }
    match &item.lease {
        Some(lease)
            if item.state == state::CLAIMED
                && lease.lease_id == lease_id
                && lease.expire_ms > now =>
        {
            Ok(())
        }
        _ => Err(StoreError::LeaseNotHeld),
    }
}

fn urgency(item: &ItemRecord) -> String {
    urgency_key(item.priority, item.sla_ms, item.create_ms, &item.id)
}

impl Store for MemoryStore {
    async fn create(&self, tenant: &Tenant, new: NewItem) -> Result<Created, StoreError> {
        let mut all = self.lock();
        let data = all.entry(tenant.clone()).or_default();
        if !new.request_id.is_empty()
            && let Some(id) = data.requests.get(&new.request_id)
            && let Some(item) = data.items.get(id)
        {
            return Ok((item.clone(), false));
        }
        let item = ItemRecord {
            id: new.id.clone(),
            queue: new.queue.clone(),
            state: state::PENDING,
            priority: new.priority,
            create_ms: new.now_ms,
            sla_ms: new.sla_ms,
            version: 1,
            lease: None,
            decision: None,
            body: new.body,
        };
        data.items.insert(new.id.clone(), item.clone());
        if !new.request_id.is_empty() {
            data.requests.insert(new.request_id, new.id.clone());
        }
        let detail = json(serde_json::json!({"queue": new.queue, "priority": new.priority}));
        data.audit(
            &new.id,
            AuditAction::Created,
            &new.actor,
            new.now_ms,
            detail,
        );
        drop(all);
        self.announce(tenant, &item.queue, &item.id);
        Ok((item, true))
    }

    async fn get(&self, tenant: &Tenant, id: &str) -> Result<ItemRecord, StoreError> {
        self.with_item(tenant, id, |item| Ok(item.clone()))
    }

    async fn list(
        &self,
        tenant: &Tenant,
        queue: &str,
        state: i32,
        after: &str,
        limit: usize,
    ) -> Result<ItemPage, StoreError> {
        let all = self.lock();
        let Some(data) = all.get(tenant) else {
            return Ok(ItemPage::default());
        };
        let mut matching: Vec<(String, &ItemRecord)> = data
            .items
            .values()
            .filter(|i| i.queue == queue && (state == 0 || i.state == state))
            .map(|i| (urgency(i), i))
            .filter(|(key, _)| after.is_empty() || key.as_str() > after)
            .collect();
        matching.sort_by(|a, b| a.0.cmp(&b.0));
        let more = matching.len() > limit;
        matching.truncate(limit);
        let next = match (more, matching.last()) {
            (true, Some((key, _))) => key.clone(),
            _ => String::new(),
        };
        Ok(ItemPage {
            items: matching.into_iter().map(|(_, i)| i.clone()).collect(),
            next,
        })
    }

    async fn claim(&self, tenant: &Tenant, claim: Claim) -> Result<Option<ItemRecord>, StoreError> {
        let mut all = self.lock();
        let data = all.entry(tenant.clone()).or_default();
        let id = match &claim.item_id {
            Some(id) => {
                let item = data.items.get(id).ok_or(StoreError::NotFound)?;
                if state::is_terminal(item.state) {
                    return Err(StoreError::Terminal(item.state));
                }
                if item.state != state::PENDING || item.queue != claim.queue {
                    return Err(StoreError::NotPending);
                }
                id.clone()
            }
            None => {
                let next = data
                    .items
                    .values()
                    .filter(|i| i.queue == claim.queue && i.state == state::PENDING)
                    .min_by_key(|i| urgency(i));
                match next {
                    Some(item) => item.id.clone(),
                    None => return Ok(None),
                }
            }
        };
        let Some(item) = data.items.get_mut(&id) else {
            return Err(StoreError::NotFound);
        };
        item.state = state::CLAIMED;
        item.lease = Some(claim.lease.clone());
        item.version += 1;
        let item = item.clone();
        let detail = json(serde_json::json!({
            "reviewer": claim.lease.reviewer,
            "lease_expire_ms": claim.lease.expire_ms,
        }));
        data.audit(
            &id,
            AuditAction::Claimed,
            &claim.actor,
            claim.now_ms,
            detail,
        );
        drop(all);
        self.announce(tenant, &item.queue, &item.id);
        Ok(Some(item))
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
        let mut all = self.lock();
        let data = all.get_mut(tenant).ok_or(StoreError::NotFound)?;
        let item = data.items.get_mut(id).ok_or(StoreError::NotFound)?;
        check_lease(item, lease_id, now_ms)?;
        let mut reviewer = String::new();
        if let Some(lease) = item.lease.as_mut() {
            lease.expire_ms = expire_ms;
            reviewer.clone_from(&lease.reviewer);
        }
        item.version += 1;
        let item = item.clone();
        let detail = json(serde_json::json!({"lease_expire_ms": expire_ms}));
        let who = actor(&reviewer, key_label);
        data.audit(id, AuditAction::LeaseRenewed, &who, now_ms, detail);
        drop(all);
        self.announce(tenant, &item.queue, id);
        Ok(item)
    }

    async fn decide(&self, tenant: &Tenant, decide: Decide) -> Result<ItemRecord, StoreError> {
        let mut all = self.lock();
        let data = all.get_mut(tenant).ok_or(StoreError::NotFound)?;
        let item = data
            .items
            .get_mut(&decide.item_id)
            .ok_or(StoreError::NotFound)?;
        check_lease(item, &decide.lease_id, decide.now_ms)?;
        let reviewer = item.lease.take().map(|l| l.reviewer).unwrap_or_default();
        item.state = state::DECIDED;
        item.version += 1;
        item.decision = Some(DecisionRecord {
            verdict: decide.verdict,
            edited_content: decide.edited_content.clone(),
            reviewer: reviewer.clone(),
            comment: decide.comment.clone(),
            decide_ms: decide.now_ms,
        });
        let item = item.clone();
        data.record_decision(&item.queue, &reviewer, decide.verdict, decide.now_ms);
        let detail = json(serde_json::json!({
            "verdict": decide.verdict,
            "comment": decide.comment,
            "edited": !decide.edited_content.is_empty(),
        }));
        let who = actor(&reviewer, &decide.key_label);
        data.audit(&item.id, AuditAction::Decided, &who, decide.now_ms, detail);
        drop(all);
        self.announce(tenant, &item.queue, &item.id);
        Ok(item)
    }

    async fn cancel(
        &self,
        tenant: &Tenant,
        id: &str,
        reason: &str,
        actor: &str,
        now_ms: i64,
    ) -> Result<(ItemRecord, bool), StoreError> {
        let mut all = self.lock();
        let data = all.get_mut(tenant).ok_or(StoreError::NotFound)?;
        let item = data.items.get_mut(id).ok_or(StoreError::NotFound)?;
        if state::is_terminal(item.state) {
            return Ok((item.clone(), false));
        }
        item.state = state::CANCELLED;
        item.lease = None;
        item.version += 1;
        let item = item.clone();
        let detail = json(serde_json::json!({"reason": reason}));
        data.audit(id, AuditAction::Cancelled, actor, now_ms, detail);
        drop(all);
        self.announce(tenant, &item.queue, id);
        Ok((item, true))
    }

    async fn stats(
        &self,
        tenant: &Tenant,
        queue: &str,
        now_ms: i64,
    ) -> Result<QueueCounts, StoreError> {
        let all = self.lock();
        let Some(data) = all.get(tenant) else {
            return Ok(QueueCounts::default());
        };
        let mut counts = QueueCounts::default();
        for item in data.items.values().filter(|i| i.queue == queue) {
            match item.state {
                state::PENDING => {
                    counts.pending += 1;
                    counts.oldest_pending_ms = Some(
                        counts
                            .oldest_pending_ms
                            .map_or(item.create_ms, |o| o.min(item.create_ms)),
                    );
                }
                state::CLAIMED => counts.claimed += 1,
                _ => {}
            }
            if !state::is_terminal(item.state) && item.sla_ms <= now_ms {
                counts.sla_breached += 1;
            }
        }
        if let Some(decisions) = data.decisions.get(queue) {
            counts.decided_last_hour = decisions
                .times
                .iter()
                .filter(|t| **t > now_ms - DECIDED_WINDOW_MS)
                .count()
                .try_into()
                .unwrap_or(i64::MAX);
            counts.decided_total = decisions.total;
            counts.approved_total = decisions.approved;
            counts.reviewers = decisions.reviewers.clone();
        }
        Ok(counts)
    }

    async fn audit(
        &self,
        tenant: &Tenant,
        item_id: Option<&str>,
        offset: u64,
        limit: usize,
    ) -> Result<(Vec<AuditRecord>, Option<u64>), StoreError> {
        let all = self.lock();
        let data = all.get(tenant);
        if let Some(id) = item_id
            && !data.is_some_and(|d| d.items.contains_key(id))
        {
            return Err(StoreError::NotFound);
        }
        let Some(data) = data else {
            return Ok((Vec::new(), None));
        };
        let events: Vec<&AuditRecord> = data
            .audit
            .iter()
            .filter(|e| item_id.is_none_or(|id| e.item == id))
            .collect();
        let start = usize::try_from(offset).unwrap_or(usize::MAX);
        let page: Vec<AuditRecord> = events
            .iter()
            .skip(start)
            .take(limit)
            .map(|e| (*e).clone())
            .collect();
        let end = start.saturating_add(page.len());
        let next = (end < events.len()).then(|| u64::try_from(end).unwrap_or(u64::MAX));
        Ok((page, next))
    }

    async fn due_tenants(&self, now_ms: i64, limit: usize) -> Result<Vec<Tenant>, StoreError> {
        let all = self.lock();
        Ok(all
            .iter()
            .filter(|(_, data)| data.items.values().any(|i| is_due(i, now_ms)))
            .map(|(tenant, _)| tenant.clone())
            .take(limit)
            .collect())
    }

    async fn due_items(
        &self,
        tenant: &Tenant,
        now_ms: i64,
        limit: usize,
    ) -> Result<DueItems, StoreError> {
        let all = self.lock();
        let Some(data) = all.get(tenant) else {
            return Ok((Vec::new(), Vec::new()));
        };
        let leases = data
            .items
            .values()
            .filter(|i| {
                i.state == state::CLAIMED && i.lease.as_ref().is_some_and(|l| l.expire_ms <= now_ms)
            })
            .map(|i| i.id.clone())
            .take(limit)
            .collect();
        let slas = data
            .items
            .values()
            .filter(|i| !state::is_terminal(i.state) && i.sla_ms <= now_ms)
            .map(|i| (i.id.clone(), i.queue.clone()))
            .take(limit)
            .collect();
        Ok((leases, slas))
    }

    async fn expire_lease(
        &self,
        tenant: &Tenant,
        id: &str,
        now_ms: i64,
    ) -> Result<Option<ItemRecord>, StoreError> {
        let mut all = self.lock();
        let data = all.get_mut(tenant).ok_or(StoreError::NotFound)?;
        let item = data.items.get_mut(id).ok_or(StoreError::NotFound)?;
        let lapsed = item.state == state::CLAIMED
            && item.lease.as_ref().is_some_and(|l| l.expire_ms <= now_ms);
        if !lapsed {
            return Ok(None);
        }
        let reviewer = item.lease.take().map(|l| l.reviewer).unwrap_or_default();
        item.state = state::PENDING;
        item.version += 1;
        let item = item.clone();
        let detail = json(serde_json::json!({"reviewer": reviewer}));
        data.audit(id, AuditAction::LeaseExpired, SYSTEM_ACTOR, now_ms, detail);
        drop(all);
        self.announce(tenant, &item.queue, id);
        Ok(Some(item))
    }

    async fn apply_sla(
        &self,
        tenant: &Tenant,
        id: &str,
        action: SlaAction,
    ) -> Result<Option<ItemRecord>, StoreError> {
        let now = action.now_ms;
        let mut all = self.lock();
        let data = all.get_mut(tenant).ok_or(StoreError::NotFound)?;
        let item = data.items.get_mut(id).ok_or(StoreError::NotFound)?;
        if state::is_terminal(item.state)
            || item.queue != action.expected_queue
            || item.sla_ms > now
        {
            return Ok(None);
        }
        let from = item.queue.clone();
        item.lease = None;
        item.version += 1;
        let (audit_action, detail, decision) = match action.action {
            TimeoutAction::Reject => {
                item.state = state::EXPIRED;
                let detail =
                    serde_json::json!({"timeout_action": "reject", "sla_deadline_ms": item.sla_ms});
                (AuditAction::Expired, detail, false)
            }
            TimeoutAction::Approve => {
                item.state = state::DECIDED;
                item.decision = Some(DecisionRecord {
                    verdict: Verdict::Approve as i32,
                    reviewer: SLA_ACTOR.to_string(),
                    decide_ms: now,
                    ..DecisionRecord::default()
                });
                let detail = serde_json::json!({"timeout_action": "approve", "verdict": Verdict::Approve as i32});
                (AuditAction::Decided, detail, true)
            }
            TimeoutAction::Escalate => {
                item.state = state::PENDING;
                item.queue = action.escalate_to.clone();
                item.sla_ms = action.new_sla_ms;
                let detail = serde_json::json!({"timeout_action": "escalate", "from": from, "to": action.escalate_to});
                (AuditAction::Escalated, detail, false)
            }
        };
        let item = item.clone();
        if decision {
            data.record_decision(&item.queue, SLA_ACTOR, Verdict::Approve as i32, now);
        }
        data.audit(id, audit_action, SLA_ACTOR, now, json(detail));
        drop(all);
        self.announce(tenant, &from, id);
        if from != item.queue {
            self.announce(tenant, &item.queue, id);
        }
        Ok(Some(item))
    }

    async fn refresh_due(&self, _tenant: &Tenant) -> Result<(), StoreError> {
        Ok(())
    }

    async fn subscribe(&self) -> broadcast::Receiver<Change> {
        self.changes.subscribe()
    }
}

fn is_due(item: &ItemRecord, now_ms: i64) -> bool {
    !state::is_terminal(item.state)
        && (item.sla_ms <= now_ms || item.lease.as_ref().is_some_and(|l| l.expire_ms <= now_ms))
}
