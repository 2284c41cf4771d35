//! Routes: turning the `model` a client names into the ordered models that may serve it.
//!
//! A request names either a catalog model or a route alias from `[router.routes.<alias>]`:
//!
//! - a **model** (`sim-small`) is served by that model alone; the response's `route` is empty;
//! - a **route alias** (`auto`) resolves to the route's candidates, in configured order: the first
//!   is the primary, the others form its fallback chain;
//! - an empty name is INVALID_ARGUMENT (field `model`); any other name is NOT_FOUND
//!   (`MODEL_NOT_FOUND`), with a message listing the known routes and models.
//!
//! Model names and aliases share one namespace, which start-up validation keeps unambiguous: an
//! alias may not equal a model name.
//!
//! The result of resolution is a [`Plan`]: the requested name, the route (if any), the ordered
//! [`Candidate`]s and the route's degraded answer. The walk tries the candidates in order (see
//! [`crate::fallback`]); a route's canary, when chosen for a request, goes first and the route's
//! own models follow it as its fallbacks. A plan is a value the later steps (budget steering) can
//! reorder without touching the route table.
//!
//! # Tiers and rules
//!
//! A route may declare named tiers (`tiers = { fast = ["sim-small"] }`), each its own ordered
//! candidates, and rules that pick one per request ([`crate::rules`]). The walk asks
//! [`Plan::ruled`] once the request's facts are known: the first rule that holds gives a plan
//! over its tier, which keeps the requested name and the route alias, has no canary (a canary
//! belongs to the default tier only), and reports the tier's first model as the primary. A model
//! named directly is never ruled: the client asked for that model.
//!
//! The economy tier (`economy = ["sim-small"]`) is one such tier: it becomes the tier `economy`
//! and a last rule `economy` that holds when the tenant is above its soft budget limit (see
//! [`crate::spend`]).

use std::{collections::BTreeMap, fmt, sync::Arc};

use tonic::Code;
use weir_mesh::{ApiError, catalog::Catalog, config::ConfigError};
use weir_proto::router::ServedBy;

use weir_proto::common::{Message, Role};

use crate::{
    canary::Canary,
    config::{Config, DEFAULT_ROUTE, DEFAULT_ROUTE_MODELS, DegradedSpec, RouteSpec},
    rules::{self, ECONOMY, Rule, RuleFacts},
};

/// Longest route alias accepted in config (the same limit as model names).
pub const MAX_ALIAS_LEN: usize = 128;
/// Longest requested name echoed back in an error message; longer names are cut.
const MAX_ECHOED_NAME_LEN: usize = 128;

/// One model a route may send a request to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    model: String,
}

impl Candidate {
    /// A candidate for the catalog model `model` (assumed checked against the catalog).
    pub(crate) fn new(model: String) -> Self {
        Self { model }
    }

    /// The catalog name of the model.
    pub fn model(&self) -> &str {
        &self.model
    }
}

/// A route's answer of last resort, when every candidate failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Degraded {
    /// A fixed text (also used for refusals).
    Text(String),
    /// The request's last user message, echoed back.
    Echo,
}

impl Degraded {
    /// The degraded answer's text for a request with these messages.
    pub fn text(&self, messages: &[Message]) -> String {
        match self {
            Degraded::Text(text) => text.clone(),
            Degraded::Echo => messages
                .iter()
                .rev()
                .find(|m| m.role == Role::User as i32)
                .map(|m| m.content.clone())
                .unwrap_or_default(),
        }
    }
}

/// A validated route alias: its name, description, candidates (primary first), canary and
/// degraded answer.
#[derive(Debug)]
pub struct Route {
    alias: String,
    description: String,
    /// Never empty: [`RouteTable::new`] refuses an empty list.
    candidates: Vec<Candidate>,
    canary: Option<Arc<Canary>>,
    degraded: Option<Degraded>,
    /// Named tiers (the economy tier among them), each never empty.
    tiers: BTreeMap<String, Vec<Candidate>>,
    /// The rules picking a tier, in order (the economy rule last).
    rules: Vec<Rule>,
}

impl Route {
    /// The alias clients name in `model`.
    pub fn alias(&self) -> &str {
        &self.alias
    }

    /// The description from config.
    pub fn description(&self) -> &str {
        &self.description
    }

    /// The candidates in order: the primary first, then the fallback chain.
    pub fn candidates(&self) -> &[Candidate] {
        &self.candidates
    }

    /// The canary split of the default tier, with its analysis state ([`crate::canary`]).
    pub fn canary(&self) -> Option<&Canary> {
        self.canary.as_deref()
    }

    /// The canary, shared, for its check task.
    pub(crate) fn shared_canary(&self) -> Option<&Arc<Canary>> {
        self.canary.as_ref()
    }

    /// The named tiers (the economy tier among them), by name.
    pub fn tiers(&self) -> impl Iterator<Item = (&str, &[Candidate])> {
        self.tiers
            .iter()
            .map(|(name, tier)| (name.as_str(), tier.as_slice()))
    }

    /// The degraded answer, if configured.
    pub fn degraded(&self) -> Option<&Degraded> {
        self.degraded.as_ref()
    }

    /// The candidates of tier `name`, in order.
    pub fn tier(&self, name: &str) -> Option<&[Candidate]> {
        self.tiers.get(name).map(Vec::as_slice)
    }

    /// The rules, in order.
    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    /// Whether a rule tests the tenant's budget, so that the walk must read it first.
    pub fn needs_budget(&self) -> bool {
        self.rules.iter().any(Rule::needs_budget)
    }
}

/// How a request's `model` resolved: the ordered candidates that may serve it.
#[derive(Debug, Clone)]
pub struct Plan {
    requested_model: String,
    route: Option<Arc<Route>>,
    /// Never empty.
    candidates: Vec<Candidate>,
    /// The index in the route's rules of the rule that picked the candidates' tier, if one did.
    rule: Option<usize>,
}

impl Plan {
    /// The name the request asked for (a model or an alias), for `requested_model`.
    pub fn requested_model(&self) -> &str {
        &self.requested_model
    }

    /// The route that resolved the request, or `None` when a model was named directly.
    pub fn route(&self) -> Option<&Route> {
        self.route.as_deref()
    }

    /// The route alias for responses: empty when a model was named directly.
    pub fn route_alias(&self) -> &str {
        self.route().map_or("", Route::alias)
    }

    /// The candidates in order, primary (or the chosen canary) first. Never empty.
    pub fn candidates(&self) -> &[Candidate] {
        &self.candidates
    }

    /// The first choice.
    pub fn primary(&self) -> &Candidate {
        // Plans are never empty: a model plan has one candidate, routes are checked at start-up.
        &self.candidates[0]
    }

    /// The route's degraded answer, if it has one.
    pub fn degraded(&self) -> Option<&Degraded> {
        self.route().and_then(Route::degraded)
    }

    /// Whether rules may still pick a tier for this plan (it came from a route with rules and no
    /// rule has picked yet).
    pub fn has_rules(&self) -> bool {
        self.rule.is_none() && self.route().is_some_and(|r| !r.rules.is_empty())
    }

    /// Whether ruling this plan needs the tenant's budget state.
    pub fn needs_budget(&self) -> bool {
        self.rule.is_none() && self.route().is_some_and(Route::needs_budget)
    }

    /// The rule that picked this plan's tier, if one did.
    pub fn rule(&self) -> Option<&Rule> {
        let index = self.rule?;
        self.route()?.rules.get(index)
    }

    /// The same request served from the tier of the first rule that holds for `facts` (see the
    /// module documentation), or `None` when no rule holds (or the plan is already ruled or has
    /// no route).
    pub fn ruled(&self, facts: &RuleFacts<'_>) -> Option<Plan> {
        if self.rule.is_some() {
            return None;
        }
        let route = self.route.clone()?;
        let index = route.rules.iter().position(|rule| rule.holds(facts))?;
        let candidates = route.tiers.get(route.rules[index].tier())?.clone();
        Some(Plan {
            requested_model: self.requested_model.clone(),
            candidates,
            route: Some(route),
            rule: Some(index),
        })
    }

    /// What the candidate at `position` in [`Plan::candidates`] is, for `served_by`.
    pub fn served_by(&self, position: usize) -> ServedBy {
        if position == 0 {
            ServedBy::Primary
        } else {
            ServedBy::Fallback
        }
    }
}

/// Why a request's `model` does not resolve.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResolveError {
    /// `model` is empty.
    #[error("required: name a model from the catalog or a route alias")]
    Missing,
    /// `model` names neither a model nor a route.
    #[error(
        "model \"{name}\" not found: it is neither a model in the catalog nor a route alias \
         (routes: {routes}; models: {models})"
    )]
    Unknown {
        /// The requested name (cut to a readable length).
        name: String,
        /// The known route aliases, comma-separated.
        routes: String,
        /// The catalog's models, comma-separated.
        models: String,
    },
}

impl From<ResolveError> for ApiError {
    fn from(error: ResolveError) -> Self {
        match error {
            ResolveError::Missing => ApiError::invalid_argument("model", error.to_string()),
            ResolveError::Unknown { ref name, .. } => {
                let name = name.clone();
                ApiError::new(Code::NotFound, "MODEL_NOT_FOUND", error.to_string())
                    .with_metadata("model", name)
            }
        }
    }
}

/// Every route alias, validated against the catalog; resolves request names into [`Plan`]s.
#[derive(Debug, Clone)]
pub struct RouteTable {
    catalog: Arc<Catalog>,
    routes: BTreeMap<String, Arc<Route>>,
    /// Each tenant's plan (`[router.plans]`).
    plans: BTreeMap<String, String>,
}

impl RouteTable {
    /// Validates `config.routes` against `catalog` (or builds the default route when there are
    /// none; see [`crate::config`]), naming the key at fault: `router.routes` for a bad alias,
    /// `router.routes.<alias>` for an alias that is also a model name, and
    /// `router.routes.<alias>.models` for an empty list, an unknown model or a duplicate.
    pub fn new(config: &Config, catalog: Arc<Catalog>) -> Result<Self, ConfigError> {
        rules::validate_plans(&config.plans)?;
        let specs: Vec<(String, RouteSpec)> = if config.routes.is_empty() {
            default_route(&catalog).into_iter().collect()
        } else {
            config
                .routes
                .iter()
                .map(|(alias, spec)| (alias.clone(), spec.clone()))
                .collect()
        };
        let mut routes = BTreeMap::new();
        for (alias, spec) in specs {
            let route = validate(&catalog, alias, spec)?;
            routes.insert(route.alias.clone(), Arc::new(route));
        }
        Ok(Self {
            catalog,
            routes,
            plans: config.plans.clone(),
        })
    }

    /// The route named `alias`.
    pub fn get(&self, alias: &str) -> Option<&Route> {
        self.routes.get(alias).map(Arc::as_ref)
    }

    /// The routes, by alias.
    pub fn routes(&self) -> impl Iterator<Item = &Route> {
        self.routes.values().map(Arc::as_ref)
    }

    /// The plan of `tenant` (`[router.plans]`), if it has one.
    pub fn plan(&self, tenant: &str) -> Option<&str> {
        self.plans.get(tenant).map(String::as_str)
    }

    /// The model catalog the routes were checked against.
    pub fn catalog(&self) -> &Catalog {
        &self.catalog
    }

    /// A shared handle on the catalog.
    pub fn shared_catalog(&self) -> Arc<Catalog> {
        Arc::clone(&self.catalog)
    }

    /// Resolves a request's `model` (see the module documentation). `sticky` (the session id, if
    /// any) keeps a conversation on one side of a canary split.
    pub fn resolve(&self, name: &str, sticky: Option<&str>) -> Result<Plan, ResolveError> {
        if name.is_empty() {
            return Err(ResolveError::Missing);
        }
        let (route, candidates) = if self.catalog.get(name).is_some() {
            let candidate = Candidate {
                model: name.to_string(),
            };
            (None, vec![candidate])
        } else if let Some(route) = self.routes.get(name) {
            let mut candidates = Vec::with_capacity(route.candidates.len() + 1);
            if let Some(canary) = route.canary.as_ref().filter(|c| c.chosen(sticky)) {
                candidates.push(canary.candidate().clone());
            }
            candidates.extend(route.candidates.iter().cloned());
            (Some(Arc::clone(route)), candidates)
        } else {
            return Err(ResolveError::Unknown {
                name: shorten(name),
                routes: list(self.routes.keys().map(String::as_str)),
                models: list(self.catalog.iter().map(|(model, _)| model)),
            });
        };
        Ok(Plan {
            requested_model: name.to_string(),
            route,
            candidates,
            rule: None,
        })
    }
}

/// The route provided when config defines none: `auto` over the default models the catalog has,
/// unless none is there or a model is itself called `auto`.
fn default_route(catalog: &Catalog) -> Option<(String, RouteSpec)> {
    let models: Vec<String> = DEFAULT_ROUTE_MODELS
        .iter()
        .filter(|model| catalog.get(model).is_some())
        .map(|model| (*model).to_string())
        .collect();
    if models.is_empty() || catalog.get(DEFAULT_ROUTE).is_some() {
        return None;
    }
    Some((
        DEFAULT_ROUTE.to_string(),
        RouteSpec {
            models,
            description: "Default route: the strongest built-in model first, then the faster one"
                .to_string(),
            ..RouteSpec::default()
        },
    ))
}

fn validate(catalog: &Catalog, alias: String, spec: RouteSpec) -> Result<Route, ConfigError> {
    if alias.is_empty() || alias.len() > MAX_ALIAS_LEN {
        return Err(ConfigError::invalid(
            "router.routes",
            format!("route aliases must be 1 to {MAX_ALIAS_LEN} characters, got {alias:?}"),
        ));
    }
    if catalog.get(&alias).is_some() {
        return Err(ConfigError::invalid(
            format!("router.routes.{alias}"),
            format!(
                "\"{alias}\" is also a model name; a route alias must differ from every model \
                 name so that a request's `model` has one meaning"
            ),
        ));
    }
    let key = format!("router.routes.{alias}.models");
    if spec.models.is_empty() {
        return Err(ConfigError::invalid(key, "must list at least one model"));
    }
    let candidates = validate_models(catalog, &key, spec.models)?;
    let mut tiers = BTreeMap::new();
    for (tier, models) in &spec.tiers {
        let key = format!("router.routes.{alias}.tiers.{tier}");
        if tier.trim().is_empty() {
            return Err(ConfigError::invalid(
                format!("router.routes.{alias}.tiers"),
                "tier names must not be empty",
            ));
        }
        if models.is_empty() {
            return Err(ConfigError::invalid(key, "must list at least one model"));
        }
        tiers.insert(
            tier.clone(),
            validate_models(catalog, &key, models.clone())?,
        );
    }
    let economy_key = format!("router.routes.{alias}.economy");
    let economy = validate_models(catalog, &economy_key, spec.economy)?;
    let mut rules = rules::compile(&alias, &spec.rules, &spec.tiers)?;
    if !economy.is_empty() {
        if tiers.contains_key(ECONOMY) {
            return Err(ConfigError::invalid(
                economy_key,
                format!(
                    "the route also declares a tier \"{ECONOMY}\": give the economy models in one \
                     place (`economy` is sugar for that tier and a budget rule)"
                ),
            ));
        }
        if rules.iter().any(|rule| rule.name() == ECONOMY) {
            return Err(ConfigError::invalid(
                economy_key,
                format!("a rule is already named \"{ECONOMY}\", the name this list's rule takes"),
            ));
        }
        tiers.insert(ECONOMY.to_string(), economy);
        rules.push(rules::economy_rule());
    }
    let canary = match spec.canary {
        None => None,
        Some(canary) => Some(Arc::new(Canary::new(catalog, &alias, &candidates, canary)?)),
    };
    let degraded = match spec.degraded {
        None => None,
        Some(DegradedSpec::Echo) => Some(Degraded::Echo),
        Some(DegradedSpec::Fixed { text } | DegradedSpec::Refusal { text }) => {
            if text.trim().is_empty() {
                return Err(ConfigError::invalid(
                    format!("router.routes.{alias}.degraded.text"),
                    "must not be empty",
                ));
            }
            Some(Degraded::Text(text))
        }
    };
    Ok(Route {
        alias,
        description: spec.description,
        candidates,
        canary,
        degraded,
        tiers,
        rules,
    })
}

/// Catalog models in order, each at most once; the error names `key`.
fn validate_models(
    catalog: &Catalog,
    key: &str,
    models: Vec<String>,
) -> Result<Vec<Candidate>, ConfigError> {
    let mut candidates: Vec<Candidate> = Vec::with_capacity(models.len());
    for model in models {
        if catalog.get(&model).is_none() {
            return Err(ConfigError::invalid(
                key,
                format!(
                    "\"{model}\" is not a model in the catalog (models: {})",
                    list(catalog.iter().map(|(name, _)| name))
                ),
            ));
        }
        if candidates.iter().any(|c| c.model == model) {
            return Err(ConfigError::invalid(
                key,
                format!("\"{model}\" is listed more than once"),
            ));
        }
        candidates.push(Candidate { model });
    }
    Ok(candidates)
}

/// Names joined for a message, or `none`.
fn list<'a>(names: impl Iterator<Item = &'a str>) -> String {
    let joined = names.collect::<Vec<_>>().join(", ");
    if joined.is_empty() {
        "none".to_string()
    } else {
        joined
    }
}

/// A client-supplied name cut to a length fit for an error message.
fn shorten(name: &str) -> String {
    if name.len() <= MAX_ECHOED_NAME_LEN {
        return name.to_string();
    }
    let mut end = MAX_ECHOED_NAME_LEN;
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &name[..end])
}

impl fmt::Display for Candidate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.model)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use tonic::Status;
    use tonic_types::StatusExt;
    use weir_mesh::catalog::ModelSpec;

    use super::*;
    use crate::config::CanarySpec;

    fn catalog(names: &[&str]) -> Arc<Catalog> {
        Arc::new(Catalog::new(
            names
                .iter()
                .map(|name| (name.to_string(), ModelSpec::default())),
        ))
    }

    fn config(routes: &[(&str, &[&str])]) -> Config {
        Config {
            routes: routes
                .iter()
                .map(|(alias, models)| {
                    (
                        alias.to_string(),
                        RouteSpec {
                            models: models.iter().map(|m| m.to_string()).collect(),
                            ..RouteSpec::default()
                        },
                    )
                })
                .collect(),
            ..Config::default()
        }
    }

    fn models(plan: &Plan) -> Vec<&str> {
        plan.candidates().iter().map(Candidate::model).collect()
    }

    #[test]
    fn default_route_is_auto_over_the_default_sim_models() {
        let table = RouteTable::new(&Config::default(), Arc::new(Catalog::default())).unwrap();
        let plan = table.resolve("auto", None).unwrap();
        assert_eq!(models(&plan), ["sim-large", "sim-small"]);
        assert_eq!(plan.route_alias(), "auto");
        assert_eq!(plan.requested_model(), "auto");
        assert_eq!(plan.primary().model(), "sim-large");
    }

    #[test]
    fn default_route_keeps_only_catalog_models() {
        let table = RouteTable::new(&Config::default(), catalog(&["sim-small", "x"])).unwrap();
        assert_eq!(models(&table.resolve("auto", None).unwrap()), ["sim-small"]);
    }

    #[test]
    fn default_route_is_omitted_without_default_models() {
        let table = RouteTable::new(&Config::default(), catalog(&["gpt"])).unwrap();
        assert_eq!(table.routes().count(), 0);
        assert!(matches!(
            table.resolve("auto", None),
            Err(ResolveError::Unknown { .. })
        ));
    }

    #[test]
    fn default_route_yields_to_a_model_named_auto() {
        let table = RouteTable::new(&Config::default(), catalog(&["auto", "sim-small"])).unwrap();
        assert_eq!(table.routes().count(), 0);
        let plan = table.resolve("auto", None).unwrap();
        assert!(plan.route().is_none());
        assert_eq!(models(&plan), ["auto"]);
    }

    #[test]
    fn configured_routes_replace_the_default() {
        let config = config(&[("cheap", &["sim-small", "sim-large"])]);
        let table = RouteTable::new(&config, Arc::new(Catalog::default())).unwrap();
        assert!(table.get("auto").is_none());
        let plan = table.resolve("cheap", None).unwrap();
        assert_eq!(models(&plan), ["sim-small", "sim-large"]);
        assert_eq!(plan.served_by(0), ServedBy::Primary);
        assert_eq!(plan.served_by(1), ServedBy::Fallback);
    }

    #[test]
    fn a_model_name_is_served_directly() {
        let table = RouteTable::new(&Config::default(), Arc::new(Catalog::default())).unwrap();
        let plan = table.resolve("sim-small", None).unwrap();
        assert!(plan.route().is_none());
        assert_eq!(plan.route_alias(), "");
        assert_eq!(plan.requested_model(), "sim-small");
        assert_eq!(models(&plan), ["sim-small"]);
        assert_eq!(plan.served_by(0), ServedBy::Primary);
    }

    #[test]
    fn empty_model_is_invalid_argument_on_field_model() {
        let table = RouteTable::new(&Config::default(), Arc::new(Catalog::default())).unwrap();
        let error = table.resolve("", None).unwrap_err();
        let status = Status::from(ApiError::from(error));
        assert_eq!(status.code(), Code::InvalidArgument);
        let details = status.get_error_details();
        let field = details
            .bad_request()
            .map(|b| b.field_violations[0].field.clone());
        assert_eq!(field.as_deref(), Some("model"));
    }

    #[test]
    fn unknown_model_is_not_found_and_lists_routes_and_models() {
        let table = RouteTable::new(&Config::default(), Arc::new(Catalog::default())).unwrap();
        let status = Status::from(ApiError::from(table.resolve("gpt-9", None).unwrap_err()));
        assert_eq!(status.code(), Code::NotFound);
        let message = status.message();
        assert!(message.contains("\"gpt-9\""), "{message}");
        assert!(message.contains("routes: auto"), "{message}");
        assert!(
            message.contains("models: sim-large, sim-small"),
            "{message}"
        );
        let details = status.get_error_details();
        let info = details.error_info().unwrap();
        assert_eq!(info.reason, "MODEL_NOT_FOUND");
        assert_eq!(
            info.metadata.get("model").map(String::as_str),
            Some("gpt-9")
        );
    }

    #[test]
    fn a_huge_unknown_name_is_cut_in_the_message() {
        let table = RouteTable::new(&Config::default(), Arc::new(Catalog::default())).unwrap();
        let name = "é".repeat(10_000);
        let error = table.resolve(&name, None).unwrap_err();
        assert!(error.to_string().len() < 1_000);
    }

    #[test]
    fn bad_routes_name_their_key() {
        type Routes<'a> = &'a [(&'a str, &'a [&'a str])];
        let cases: [(Routes<'_>, &str); 6] = [
            (&[("auto", &[])], "router.routes.auto.models"),
            (&[("auto", &["gpt-9"])], "router.routes.auto.models"),
            (
                &[("auto", &["sim-small", "sim-small"])],
                "router.routes.auto.models",
            ),
            (&[("sim-small", &["sim-large"])], "router.routes.sim-small"),
            (&[("", &["sim-large"])], "router.routes"),
            (
                &[("ok", &["sim-large"]), ("broken", &["nope"])],
                "router.routes.broken.models",
            ),
        ];
        for (routes, key) in cases {
            let error =
                RouteTable::new(&config(routes), Arc::new(Catalog::default())).expect_err(key);
            match &error {
                ConfigError::Invalid { key: got, .. } => assert_eq!(got, key, "{error}"),
                other => panic!("expected Invalid for {key}, got {other}"),
            }
        }
    }

    #[test]
    fn bad_route_messages_say_what_is_wrong() {
        let error = RouteTable::new(
            &config(&[("auto", &["sim-small", "gpt-9"])]),
            Arc::new(Catalog::default()),
        )
        .unwrap_err()
        .to_string();
        assert!(error.contains("\"gpt-9\" is not a model"), "{error}");
        assert!(error.contains("sim-large, sim-small"), "{error}");
    }

    fn with_extras(canary: Option<CanarySpec>, degraded: Option<DegradedSpec>) -> Config {
        let mut config = config(&[("auto", &["a", "b"])]);
        if let Some(spec) = config.routes.get_mut("auto") {
            spec.canary = canary;
            spec.degraded = degraded;
        }
        config
    }

    #[test]
    fn a_canary_gets_exactly_its_share_and_falls_back_to_the_route() {
        let canary = CanarySpec {
            model: "c".to_string(),
            weight: 0.25,
            ..CanarySpec::default()
        };
        let table =
            RouteTable::new(&with_extras(Some(canary), None), catalog(&["a", "b", "c"])).unwrap();
        let mut chosen = 0;
        for _ in 0..100 {
            let plan = table.resolve("auto", None).unwrap();
            if plan.primary().model() == "c" {
                chosen += 1;
                assert_eq!(models(&plan), ["c", "a", "b"]);
            } else {
                assert_eq!(models(&plan), ["a", "b"]);
            }
        }
        assert_eq!(chosen, 25);
    }

    #[test]
    fn a_session_stays_on_one_side_of_the_canary() {
        let canary = CanarySpec {
            model: "c".to_string(),
            weight: 0.5,
            ..CanarySpec::default()
        };
        let table =
            RouteTable::new(&with_extras(Some(canary), None), catalog(&["a", "b", "c"])).unwrap();
        let mut sides = std::collections::BTreeSet::new();
        for session in 0..64 {
            let key = format!("session-{session}");
            let first = table
                .resolve("auto", Some(&key))
                .unwrap()
                .primary()
                .model()
                .to_string();
            for _ in 0..5 {
                let again = table.resolve("auto", Some(&key)).unwrap();
                assert_eq!(again.primary().model(), first);
            }
            sides.insert(first);
        }
        assert_eq!(sides.len(), 2, "both sides get sessions");
    }

    #[test]
    fn bad_canaries_name_their_key() {
        for (model, weight, key) in [
            ("zzz", 0.1, "router.routes.auto.canary.model"),
            ("a", 0.1, "router.routes.auto.canary.model"),
            ("c", 1.5, "router.routes.auto.canary.weight"),
            ("c", -0.1, "router.routes.auto.canary.weight"),
        ] {
            let canary = CanarySpec {
                model: model.to_string(),
                weight,
                ..CanarySpec::default()
            };
            let error =
                RouteTable::new(&with_extras(Some(canary), None), catalog(&["a", "b", "c"]))
                    .unwrap_err()
                    .to_string();
            assert!(error.contains(key), "{model} {weight}: {error}");
        }
    }

    #[test]
    fn an_economy_tier_replaces_the_candidates_and_the_canary() {
        let mut config = config(&[("auto", &["a", "b"])]);
        if let Some(spec) = config.routes.get_mut("auto") {
            spec.economy = vec!["c".to_string(), "b".to_string()];
            spec.canary = Some(CanarySpec {
                model: "d".to_string(),
                weight: 1.0,
                ..CanarySpec::default()
            });
        }
        let table = RouteTable::new(&config, catalog(&["a", "b", "c", "d"])).unwrap();
        let plan = table.resolve("auto", None).unwrap();
        assert_eq!(models(&plan), ["d", "a", "b"]);
        assert!(plan.needs_budget() && plan.rule().is_none());
        let over = RuleFacts {
            soft_limit_reached: true,
            ..RuleFacts::default()
        };
        assert!(plan.ruled(&RuleFacts::default()).is_none());
        let steered = plan.ruled(&over).unwrap();
        assert_eq!(models(&steered), ["c", "b"]);
        assert_eq!(steered.rule().map(Rule::name), Some(ECONOMY));
        assert!(!steered.needs_budget());
        assert!(steered.ruled(&over).is_none(), "steering happens once");
        assert_eq!(steered.route_alias(), "auto");
        assert_eq!(steered.requested_model(), "auto");
        assert_eq!(steered.served_by(0), ServedBy::Primary);

        let direct = table.resolve("a", None).unwrap();
        assert!(!direct.needs_budget());
        assert!(
            direct.ruled(&over).is_none(),
            "a model named directly is never steered"
        );
        let plain = RouteTable::new(&self::config(&[("auto", &["a"])]), catalog(&["a"])).unwrap();
        assert!(plain.resolve("auto", None).unwrap().ruled(&over).is_none());
    }

    #[test]
    fn bad_economy_tiers_name_their_key() {
        for economy in [vec!["zzz"], vec!["a", "a"]] {
            let mut config = config(&[("auto", &["a", "b"])]);
            if let Some(spec) = config.routes.get_mut("auto") {
                spec.economy = economy.iter().map(|m| m.to_string()).collect();
            }
            let error = RouteTable::new(&config, catalog(&["a", "b"]))
                .unwrap_err()
                .to_string();
            assert!(error.contains("router.routes.auto.economy"), "{error}");
        }
    }

    fn parse(toml: &str) -> Config {
        weir_mesh::config::Source::from_toml(toml)
            .section("router")
            .unwrap()
    }

    const TIERED: &str = "[router.routes.auto]\nmodels = [\"a\"]\n\
                          tiers = { fast = [\"b\"], strong = [\"c\", \"b\"] }\n";

    #[test]
    fn rules_pick_their_tier_in_order() {
        let config = parse(&format!(
            "{TIERED}[[router.routes.auto.rules]]\nname = \"short\"\ntier = \"fast\"\n\
             max_prompt_tokens = 10\n\
             [[router.routes.auto.rules]]\nname = \"hard\"\ntier = \"strong\"\n\
             prompt_keywords = [\"prove\"]\n"
        ));
        let table = RouteTable::new(&config, catalog(&["a", "b", "c"])).unwrap();
        let plan = table.resolve("auto", None).unwrap();
        assert!(plan.has_rules() && !plan.needs_budget());
        let facts = |prompt, prompt_tokens| RuleFacts {
            prompt,
            prompt_tokens,
            ..RuleFacts::default()
        };
        let short = plan.ruled(&facts("prove it", 5)).unwrap();
        assert_eq!(models(&short), ["b"]);
        assert_eq!(short.rule().map(Rule::name), Some("short"), "first wins");
        let hard = plan.ruled(&facts("Prove it", 50)).unwrap();
        assert_eq!(models(&hard), ["c", "b"]);
        assert_eq!(hard.rule().map(Rule::tier), Some("strong"));
        assert!(plan.ruled(&facts("hello", 50)).is_none());
        assert!(!hard.has_rules(), "ruled once");
    }

    #[test]
    fn bad_rules_and_tiers_name_their_key() {
        let rule = |body: &str| format!("{TIERED}[[router.routes.auto.rules]]\n{body}\n");
        let ok = "name = \"ok\"\ntier = \"fast\"\nquality = [\"high\"]\n\
                  [[router.routes.auto.rules]]\n";
        let cases = [
            (
                rule(&format!(
                    "{ok}name = \"x\"\ntier = \"nope\"\nplans = [\"free\"]"
                )),
                "router.routes.auto.rules[1].tier",
            ),
            (
                rule("name = \"x\"\ntier = \"fast\"\nprompt_regex = \"(\""),
                "router.routes.auto.rules[0].prompt_regex",
            ),
            (
                rule("name = \"x\"\ntier = \"fast\"\nprompt_keywords = [\"\"]"),
                "router.routes.auto.rules[0].prompt_keywords",
            ),
            (
                rule("name = \"x\"\ntier = \"fast\""),
                "router.routes.auto.rules[0]",
            ),
            (
                rule("tier = \"fast\"\nquality = [\"high\"]"),
                "router.routes.auto.rules[0].name",
            ),
            (
                rule(&format!(
                    "{ok}name = \"ok\"\ntier = \"fast\"\nplans = [\"a\"]"
                )),
                "router.routes.auto.rules[1].name",
            ),
            (
                rule("name = \"x\"\ntier = \"fast\"\nmin_prompt_tokens = 9\nmax_prompt_tokens = 3"),
                "router.routes.auto.rules[0].min_prompt_tokens",
            ),
            (
                "[router.routes.auto]\nmodels = [\"a\"]\ntiers = { fast = [] }\n".to_string(),
                "router.routes.auto.tiers.fast",
            ),
            (
                "[router.routes.auto]\nmodels = [\"a\"]\ntiers = { fast = [\"zzz\"] }\n"
                    .to_string(),
                "router.routes.auto.tiers.fast",
            ),
            (
                "[router.routes.auto]\nmodels = [\"a\"]\neconomy = [\"b\"]\n\
                 tiers = { economy = [\"b\"] }\n"
                    .to_string(),
                "router.routes.auto.economy",
            ),
            (
                "[router.plans]\nacme = \"\"\n[router.routes.auto]\nmodels = [\"a\"]\n".to_string(),
                "router.plans.acme",
            ),
        ];
        for (toml, key) in cases {
            let error = RouteTable::new(&parse(&toml), catalog(&["a", "b", "c"])).expect_err(key);
            match &error {
                ConfigError::Invalid { key: got, .. } => assert_eq!(got, key, "{error}"),
                other => panic!("expected Invalid for {key}, got {other}"),
            }
        }
    }

    #[test]
    fn the_routing_docs_examples_are_valid_config() {
        let docs = include_str!("../../../docs/routing.md");
        let blocks: Vec<&str> = docs
            .split("```toml\n")
            .skip(1)
            .filter_map(|rest| rest.split("```\n").next())
            .filter(|block| block.contains("models ="))
            .collect();
        assert!(blocks.len() >= 3, "{}", blocks.len());
        for block in blocks {
            let config = parse(block);
            let table = RouteTable::new(&config, Arc::new(Catalog::default()))
                .unwrap_or_else(|error| panic!("{error}\n{block}"));
            assert!(!table.get("auto").unwrap().rules().is_empty(), "{block}");
            if !block.contains("hard-words") {
                continue;
            }
            // What the docs say of the small/large example.
            let plan = table.resolve("auto", None).unwrap();
            let pick = |prompt: &str| {
                let facts = RuleFacts {
                    prompt,
                    prompt_tokens: 15,
                    ..RuleFacts::default()
                };
                plan.ruled(&facts).map(|p| p.primary().model().to_string())
            };
            assert_eq!(
                pick("What is the capital of France?").as_deref(),
                Some("sim-small")
            );
            assert_eq!(
                pick("Prove that √2 is irrational, step by step").as_deref(),
                Some("sim-large")
            );
        }
    }

    #[test]
    fn degraded_answers() {
        let echo = RouteTable::new(
            &with_extras(None, Some(DegradedSpec::Echo)),
            catalog(&["a", "b"]),
        )
        .unwrap();
        let messages = [
            Message {
                role: Role::User.into(),
                content: "bonjour".to_string(),
                ..Message::default()
            },
            Message {
                role: Role::Assistant.into(),
                content: "hello".to_string(),
                ..Message::default()
            },
        ];
        let plan = echo.resolve("auto", None).unwrap();
        assert_eq!(plan.degraded().unwrap().text(&messages), "bonjour");

        let empty = DegradedSpec::Fixed {
            text: " ".to_string(),
        };
        let error = RouteTable::new(&with_extras(None, Some(empty)), catalog(&["a", "b"]))
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("router.routes.auto.degraded.text"),
            "{error}"
        );

        let parsed: Config = weir_mesh::config::Source::from_toml(
            "[router.routes.auto]\nmodels = [\"a\"]\ndegraded = { kind = \"refusal\" }\n",
        )
        .section("router")
        .unwrap();
        let table = RouteTable::new(&parsed, catalog(&["a"])).unwrap();
        let plan = table.resolve("auto", None).unwrap();
        assert_eq!(
            plan.degraded().unwrap().text(&[]),
            crate::config::DEFAULT_REFUSAL
        );
        assert!(table.resolve("a", None).unwrap().degraded().is_none());
    }
}
