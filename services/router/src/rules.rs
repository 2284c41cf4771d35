//! Routing rules: which of a route's tiers serves a request (see docs/routing.md).
//!
//! ```toml
//! [router.plans]                                  # the tenant's plan, for `plans` conditions
//! acme = "pro"
//!
//! [router.routes.auto]
//! models = ["sim-large", "sim-small"]             # the default tier
//! tiers = { fast = ["sim-small"], strong = ["sim-large", "sim-small"] }
//! [[router.routes.auto.rules]]
//! name = "short-questions"
//! tier = "fast"
//! max_prompt_tokens = 200
//! ```
//!
//! A route's rules are evaluated in order; the first whose **every** condition holds picks its
//! tier, whose models then serve the request in order (primary first, then its fallbacks, like
//! `models`). When no rule holds, the default tier (`models`, with the canary) serves. A model
//! named directly is never ruled.
//!
//! | condition | holds when |
//! |---|---|
//! | `min_prompt_tokens`, `max_prompt_tokens` | the request's new messages count at least / at most this many tokens (counted for the route's first model) |
//! | `prompt_keywords`, `prompt_regex` | as for review policies ([`crate::matching`]) |
//! | `quality` | the request's `quality` label, or else its `weir-quality` header, is one of the list |
//! | `plans` | the tenant's plan (`[router.plans]`) is one of the list |
//! | `tenants` | the tenant is one of the list |
//! | `budget = "soft_limit_reached"` | budgets are on and the tenant's spend is above its soft limit |
//!
//! A rule must give at least one condition. A route's `economy = [...]` is sugar for a tier named
//! `economy` and a last rule `economy` with `budget = "soft_limit_reached"`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use weir_mesh::config::ConfigError;

use crate::matching::{PromptMatch, listed};

/// Notice reason: a rule of the route picked the tier that served (its message names the rule
/// and the tier; see [`crate::rules`]).
pub const ROUTE_RULE: &str = "ROUTE_RULE";
/// The request label giving the quality a request asks for (as the `weir-quality` header does;
/// the label wins when both are given).
pub const QUALITY_LABEL: &str = "quality";
/// Name of the tier and of the rule an `economy = [...]` list becomes.
pub const ECONOMY: &str = "economy";

/// A budget state a rule may require.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BudgetState {
    /// The tenant's spend in the current period is above its soft limit.
    SoftLimitReached,
}

/// One rule, as written: `[[router.routes.<alias>.rules]]`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RuleSpec {
    /// Unique within the route; named in the answer's `ROUTE_RULE` notice and the metric.
    pub name: String,
    /// The tier it picks: a key of the route's `tiers` (or `economy`).
    pub tier: String,
    /// The prompt has at least this many tokens.
    pub min_prompt_tokens: Option<u32>,
    /// The prompt has at most this many tokens.
    pub max_prompt_tokens: Option<u32>,
    /// The prompt contains any of these (case-insensitive).
    pub prompt_keywords: Vec<String>,
    /// The prompt matches this regex.
    pub prompt_regex: Option<String>,
    /// The requested quality (label `quality` or header `weir-quality`) is one of these.
    pub quality: Vec<String>,
    /// The tenant's plan is one of these.
    pub plans: Vec<String>,
    /// The tenant is one of these.
    pub tenants: Vec<String>,
    /// The tenant's budget is in this state.
    pub budget: Option<BudgetState>,
}

/// A compiled rule.
#[derive(Debug, Clone)]
pub struct Rule {
    name: String,
    tier: String,
    min_prompt_tokens: Option<u32>,
    max_prompt_tokens: Option<u32>,
    prompt: PromptMatch,
    quality: Vec<String>,
    plans: Vec<String>,
    tenants: Vec<String>,
    budget: Option<BudgetState>,
}

/// What a rule tests of a request.
#[derive(Debug, Clone, Copy, Default)]
pub struct RuleFacts<'a> {
    /// The text of the request's new messages.
    pub prompt: &'a str,
    /// Their tokens, counted for the route's first model.
    pub prompt_tokens: u32,
    /// The requested quality, if any.
    pub quality: Option<&'a str>,
    /// The tenant.
    pub tenant: &'a str,
    /// The tenant's plan, if it has one.
    pub plan: Option<&'a str>,
    /// Whether the tenant is above its soft budget limit (false when budgets are off or the
    /// budget was not read).
    pub soft_limit_reached: bool,
}

impl Rule {
    /// The rule's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The tier it picks.
    pub fn tier(&self) -> &str {
        &self.tier
    }

    /// Whether it tests the tenant's budget (the budget is then read before the rules run).
    pub fn needs_budget(&self) -> bool {
        self.budget.is_some()
    }

    /// Whether every condition the rule gives holds for `facts`.
    pub fn holds(&self, facts: &RuleFacts<'_>) -> bool {
        self.min_prompt_tokens
            .is_none_or(|min| facts.prompt_tokens >= min)
            && self
                .max_prompt_tokens
                .is_none_or(|max| facts.prompt_tokens <= max)
            && (self.quality.is_empty() || facts.quality.is_some_and(|q| listed(&self.quality, q)))
            && (self.plans.is_empty() || facts.plan.is_some_and(|p| listed(&self.plans, p)))
            && listed(&self.tenants, facts.tenant)
            && self.budget.is_none_or(|state| match state {
                BudgetState::SoftLimitReached => facts.soft_limit_reached,
            })
            && self.prompt.holds(facts.prompt)
    }
}

/// The rule an `economy = [...]` list stands for.
pub fn economy_rule() -> Rule {
    Rule {
        name: ECONOMY.to_string(),
        tier: ECONOMY.to_string(),
        min_prompt_tokens: None,
        max_prompt_tokens: None,
        prompt: PromptMatch::default(),
        quality: Vec::new(),
        plans: Vec::new(),
        tenants: Vec::new(),
        budget: Some(BudgetState::SoftLimitReached),
    }
}

/// Checks and compiles a route's rules against its `tiers`; keys are
/// `router.routes.<alias>.rules[<i>].<field>`.
pub fn compile(
    alias: &str,
    specs: &[RuleSpec],
    tiers: &BTreeMap<String, Vec<String>>,
) -> Result<Vec<Rule>, ConfigError> {
    let mut rules: Vec<Rule> = Vec::with_capacity(specs.len());
    for (index, spec) in specs.iter().enumerate() {
        let key = |field: &str| format!("router.routes.{alias}.rules[{index}].{field}");
        let name = spec.name.trim();
        if name.is_empty() {
            return Err(ConfigError::invalid(key("name"), "every rule needs a name"));
        }
        if rules.iter().any(|rule| rule.name == name) {
            return Err(ConfigError::invalid(
                key("name"),
                format!("\"{name}\" names another rule of the route too"),
            ));
        }
        if !tiers.contains_key(&spec.tier) {
            return Err(ConfigError::invalid(
                key("tier"),
                format!(
                    "\"{}\" is not a tier of the route (tiers: {})",
                    spec.tier,
                    tiers.keys().cloned().collect::<Vec<_>>().join(", ")
                ),
            ));
        }
        if let (Some(min), Some(max)) = (spec.min_prompt_tokens, spec.max_prompt_tokens)
            && min > max
        {
            return Err(ConfigError::invalid(
                key("min_prompt_tokens"),
                format!("{min} is above max_prompt_tokens {max}: the rule could never hold"),
            ));
        }
        for (field, list) in [("quality", &spec.quality), ("plans", &spec.plans)] {
            if list.iter().any(|value| value.trim().is_empty()) {
                return Err(ConfigError::invalid(key(field), "values must not be empty"));
            }
        }
        for tenant in &spec.tenants {
            if weir_mesh::tenant::Tenant::new(tenant).is_err() {
                return Err(ConfigError::invalid(
                    key("tenants"),
                    format!("\"{tenant}\" is not a tenant id"),
                ));
            }
        }
        let prompt = PromptMatch::new(&key, &spec.prompt_keywords, spec.prompt_regex.as_deref())?;
        let rule = Rule {
            name: name.to_string(),
            tier: spec.tier.clone(),
            min_prompt_tokens: spec.min_prompt_tokens,
            max_prompt_tokens: spec.max_prompt_tokens,
            prompt,
            quality: spec.quality.clone(),
            plans: spec.plans.clone(),
            tenants: spec.tenants.clone(),
            budget: spec.budget,
        };
        if rule.min_prompt_tokens.is_none()
            && rule.max_prompt_tokens.is_none()
            && rule.prompt.is_empty()
            && rule.quality.is_empty()
            && rule.plans.is_empty()
            && rule.tenants.is_empty()
            && rule.budget.is_none()
        {
            return Err(ConfigError::invalid(
                format!("router.routes.{alias}.rules[{index}]"),
                "a rule needs at least one condition (a rule that always holds would hide the \
                 default tier: list those models in `models` instead)",
            ));
        }
        rules.push(rule);
    }
    Ok(rules)
}

/// Checks `[router.plans]`: tenant ids to non-empty plan names.
pub fn validate_plans(plans: &BTreeMap<String, String>) -> Result<(), ConfigError> {
    for (tenant, plan) in plans {
        if weir_mesh::tenant::Tenant::new(tenant).is_err() {
            return Err(ConfigError::invalid(
                "router.plans",
                format!("\"{tenant}\" is not a tenant id"),
            ));
        }
        if plan.trim().is_empty() {
            return Err(ConfigError::invalid(
                format!("router.plans.{tenant}"),
                "must name a plan",
            ));
        }
    }
    Ok(())
}
