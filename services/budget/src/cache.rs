//! What a replica remembers between calls so that Reserve and Commit each cost one Redis round
//! trip instead of two (docs/performance.md).
//!
//! - **Budgets, for planning a Reserve.** A reservation is planned from each scope's budget (its
//!   generation and period). The Reserve script checks the generation the plan was made with and
//!   answers STALE when a SetBudget (on any replica) changed it, and the API then re-reads the
//!   budgets from the store; so a remembered budget can only cost a retry, never apply a stale
//!   limit or period. Entries are also forgotten after [`BUDGET_TTL`], so even a budget key
//!   replaced outside the API (deleted and set again, restarting its generation) is seen within
//!   that time. The limit itself is never taken from here: the script reads it from Redis.
//! - **Models, for pricing a Commit.** A Commit is priced at its reservation's model, which is
//!   written once by Reserve and never changes. The replica that made a reservation remembers its
//!   model until it is committed or released; another replica (or one that forgot it) reads the
//!   reservation as before.
//!
//! Both maps are bounded: when one is full it is emptied, which only costs the reads above.

use std::{
    collections::HashMap,
    sync::Mutex,
    time::{Duration, Instant},
};

use weir_mesh::tenant::Tenant;

use crate::{scope::Scope, store::BudgetRecord};

/// How long a remembered budget is used to plan reservations: 1 s.
pub const BUDGET_TTL: Duration = Duration::from_secs(1);
/// Most budgets remembered at once.
const MAX_BUDGETS: usize = 10_000;
/// Most reservation models remembered at once.
const MAX_MODELS: usize = 100_000;

/// A replica's memory of budgets and reservation models (see the module documentation).
#[derive(Debug, Default)]
pub(crate) struct Cache {
    budgets: Mutex<HashMap<String, (Instant, Option<BudgetRecord>)>>,
    models: Mutex<HashMap<String, String>>,
}

fn key(tenant: &Tenant, item: &str) -> String {
    format!("{tenant}\n{item}")
}

impl Cache {
    /// The budgets of `scopes` (`None` for a scope without one), if every one of them was read
    /// less than [`BUDGET_TTL`] ago.
    pub fn budgets(&self, tenant: &Tenant, scopes: &[Scope]) -> Option<Vec<Option<BudgetRecord>>> {
        let budgets = self.budgets.lock().ok()?;
        scopes
            .iter()
            .map(|scope| match budgets.get(&key(tenant, &scope.key())) {
                Some((read, budget)) if read.elapsed() < BUDGET_TTL => Some(budget.clone()),
                _ => None,
            })
            .collect()
    }

    /// Remembers the budgets of `scopes` as just read from the store.
    pub fn keep_budgets(&self, tenant: &Tenant, scopes: &[Scope], read: &[Option<BudgetRecord>]) {
        let Ok(mut budgets) = self.budgets.lock() else {
            return;
        };
        if budgets.len() + scopes.len() > MAX_BUDGETS {
            budgets.clear();
        }
        let now = Instant::now();
        for (scope, budget) in scopes.iter().zip(read) {
            budgets.insert(key(tenant, &scope.key()), (now, budget.clone()));
        }
    }

    /// Forgets the budget of `scope` (this replica just changed it).
    pub fn forget_budget(&self, tenant: &Tenant, scope: &Scope) {
        if let Ok(mut budgets) = self.budgets.lock() {
            budgets.remove(&key(tenant, &scope.key()));
        }
    }

    /// The model of reservation `id`, if this replica remembers it.
    pub fn model(&self, tenant: &Tenant, id: &str) -> Option<String> {
        self.models.lock().ok()?.get(&key(tenant, id)).cloned()
    }

    /// Remembers the model of reservation `id`.
    pub fn keep_model(&self, tenant: &Tenant, id: &str, model: &str) {
        let Ok(mut models) = self.models.lock() else {
            return;
        };
        if models.len() >= MAX_MODELS {
            models.clear();
        }
        models.insert(key(tenant, id), model.to_string());
    }

    /// Forgets the model of reservation `id` (it was settled).
    pub fn forget_model(&self, tenant: &Tenant, id: &str) {
        if let Ok(mut models) = self.models.lock() {
            models.remove(&key(tenant, id));
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::period::Period;

    fn budget(generation: i64) -> BudgetRecord {
        BudgetRecord {
            generation,
            hard: 100,
            soft: 0,
            fraction: 0.0,
            period: Period::Rolling {
                window: Duration::from_secs(60),
            },
        }
    }

    #[test]
    fn budgets_are_all_or_none_and_per_tenant() {
        let cache = Cache::default();
        let (acme, other) = (Tenant::new("acme").unwrap(), Tenant::new("other").unwrap());
        let scopes = [Scope::tenant(), Scope::from_key("api_key:k1").unwrap()];
        assert_eq!(cache.budgets(&acme, &scopes), None);
        cache.keep_budgets(&acme, &scopes[..1], &[Some(budget(3))]);
        assert_eq!(cache.budgets(&acme, &scopes), None, "one scope unknown");
        assert_eq!(
            cache.budgets(&acme, &scopes[..1]),
            Some(vec![Some(budget(3))])
        );
        assert_eq!(cache.budgets(&other, &scopes[..1]), None);
        cache.keep_budgets(&acme, &scopes, &[Some(budget(4)), None]);
        assert_eq!(
            cache.budgets(&acme, &scopes),
            Some(vec![Some(budget(4)), None])
        );
        cache.forget_budget(&acme, &scopes[0]);
        assert_eq!(cache.budgets(&acme, &scopes), None);
    }

    #[test]
    fn models_are_kept_until_settled() {
        let cache = Cache::default();
        let acme = Tenant::new("acme").unwrap();
        cache.keep_model(&acme, "r1", "sim-small");
        assert_eq!(cache.model(&acme, "r1").as_deref(), Some("sim-small"));
        assert_eq!(cache.model(&Tenant::new("other").unwrap(), "r1"), None);
        cache.forget_model(&acme, "r1");
        assert_eq!(cache.model(&acme, "r1"), None);
    }
}
