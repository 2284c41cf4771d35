//! The sweeper: returns lapsed leases to PENDING and applies SLA timeout actions.
//!
//! Every replica sweeps every [`Config::sweep_interval`]. It finds the tenants with something
//! due in one index (`weir_mesh::due::DueTenants` on Redis), then each tenant's lapsed leases and
//! breached SLAs, and applies each transition with its own atomic step
//! ([`Store::expire_lease`], [`Store::apply_sla`]) that re-checks the item: when two replicas
//! race for the same item, one applies the transition and the other finds nothing to do, so an
//! SLA action happens exactly once.
//!
//! An item whose SLA passes while CLAIMED is taken from its reviewer: the timeout action wins
//! (a late decision then gets FAILED_PRECONDITION `ALREADY_DECIDED`).

use std::{sync::Weak, time::Duration};

use weir_mesh::tenant::Tenant;

use crate::{
    api::{Inner, millis, now_ms},
    config::{Config, TimeoutAction},
    metrics,
    store::{AnyStore, SlaAction, Store, StoreError},
};

/// Most tenants, and items per tenant, one sweep handles (the next sweep takes the rest).
pub const SWEEP_BATCH: usize = 200;

/// What one sweep did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Swept {
    /// Leases returned to PENDING.
    pub leases: usize,
    /// SLA actions applied.
    pub sla_actions: usize,
}

/// One sweep at `now` over every tenant.
pub async fn sweep(store: &AnyStore, config: &Config, now: i64) -> Result<Swept, StoreError> {
    let mut swept = Swept::default();
    for tenant in store.due_tenants(now, SWEEP_BATCH).await? {
        match sweep_tenant(store, config, &tenant, now).await {
            Ok(s) => {
                swept.leases += s.leases;
                swept.sla_actions += s.sla_actions;
            }
            Err(error) => tracing::warn!(%tenant, %error, "review sweep failed for a tenant"),
        }
    }
    Ok(swept)
}

async fn sweep_tenant(
    store: &AnyStore,
    config: &Config,
    tenant: &Tenant,
    now: i64,
) -> Result<Swept, StoreError> {
    let (leases, slas) = store.due_items(tenant, now, SWEEP_BATCH).await?;
    let mut swept = Swept::default();
    if leases.is_empty() && slas.is_empty() {
        store.refresh_due(tenant).await?;
        return Ok(swept);
    }
    for id in leases {
        if let Some(item) = store.expire_lease(tenant, &id, now).await? {
            metrics::lease_expired();
            swept.leases += 1;
            tracing::info!(%tenant, item = %item.id, queue = %item.queue, "review lease lapsed");
        }
    }
    for (id, queue) in slas {
        let (mut action, escalate_to) = config.timeout_action(&queue);
        let escalate_to = escalate_to.unwrap_or_default().to_string();
        if action == TimeoutAction::Escalate && escalate_to.is_empty() {
            action = TimeoutAction::Reject;
        }
        let new_sla_ms = now.saturating_add(millis(config.sla(&escalate_to)));
        let applied = store
            .apply_sla(
                tenant,
                &id,
                SlaAction {
                    action,
                    expected_queue: queue,
                    escalate_to,
                    new_sla_ms,
                    now_ms: now,
                },
            )
            .await?;
        if let Some(item) = applied {
            metrics::sla_action(action);
            swept.sla_actions += 1;
            tracing::info!(
                %tenant, item = %item.id, action = action.as_str(), "review SLA passed"
            );
        }
    }
    Ok(swept)
}

/// Sweeps every `interval` until every clone of the API is dropped.
pub(crate) fn spawn(inner: Weak<Inner>, interval: Duration) {
    tokio::spawn(async move {
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticker.tick().await;
            let Some(inner) = inner.upgrade() else {
                return;
            };
            if let Err(error) = sweep(&inner.store, &inner.config, now_ms()).await {
                tracing::warn!(%error, "review sweep failed; retrying next tick");
            }
        }
    });
}
