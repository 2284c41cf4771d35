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
//! The result of resolution is a [`Plan`]: the requested name, the route (if any) and the ordered
//! [`Candidate`]s. Today the primary serves every request. Candidates are a type of their own so
//! that tiers, canary weights and per-candidate settings can join them, and a plan is a value the
//! later steps (fallback, budget steering) can walk or reorder without touching the route table.

use std::{collections::BTreeMap, fmt, sync::Arc};

use tonic::Code;
use weir_mesh::{ApiError, catalog::Catalog, config::ConfigError};
use weir_proto::router::ServedBy;

use crate::config::{Config, DEFAULT_ROUTE, DEFAULT_ROUTE_MODELS, RouteSpec};

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
    /// The catalog name of the model.
    pub fn model(&self) -> &str {
        &self.model
    }
}

/// A validated route alias: its name, description and candidates, primary first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    alias: String,
    description: String,
    /// Never empty: [`RouteTable::new`] refuses an empty list.
    candidates: Vec<Candidate>,
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
}

/// How a request's `model` resolved: the ordered candidates that may serve it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    requested_model: String,
    target: Target,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Target {
    /// A catalog model named directly.
    Model(Candidate),
    /// A route alias.
    Route(Arc<Route>),
}

impl Plan {
    /// The name the request asked for (a model or an alias), for `requested_model`.
    pub fn requested_model(&self) -> &str {
        &self.requested_model
    }

    /// The route that resolved the request, or `None` when a model was named directly.
    pub fn route(&self) -> Option<&Route> {
        match &self.target {
            Target::Model(_) => None,
            Target::Route(route) => Some(route),
        }
    }

    /// The route alias for responses: empty when a model was named directly.
    pub fn route_alias(&self) -> &str {
        self.route().map_or("", Route::alias)
    }

    /// The candidates in order, primary first. Never empty.
    pub fn candidates(&self) -> &[Candidate] {
        match &self.target {
            Target::Model(candidate) => std::slice::from_ref(candidate),
            Target::Route(route) => route.candidates(),
        }
    }

    /// The first choice.
    pub fn primary(&self) -> &Candidate {
        match &self.target {
            Target::Model(candidate) => candidate,
            // Routes are never empty (checked at start-up), so the index is in bounds.
            Target::Route(route) => &route.candidates[0],
        }
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
}

impl RouteTable {
    /// Validates `config.routes` against `catalog` (or builds the default route when there are
    /// none; see [`crate::config`]), naming the key at fault: `router.routes` for a bad alias,
    /// `router.routes.<alias>` for an alias that is also a model name, and
    /// `router.routes.<alias>.models` for an empty list, an unknown model or a duplicate.
    pub fn new(config: &Config, catalog: Arc<Catalog>) -> Result<Self, ConfigError> {
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
        Ok(Self { catalog, routes })
    }

    /// The route named `alias`.
    pub fn get(&self, alias: &str) -> Option<&Route> {
        self.routes.get(alias).map(Arc::as_ref)
    }

    /// The routes, by alias.
    pub fn routes(&self) -> impl Iterator<Item = &Route> {
        self.routes.values().map(Arc::as_ref)
    }

    /// The model catalog the routes were checked against.
    pub fn catalog(&self) -> &Catalog {
        &self.catalog
    }

    /// Resolves a request's `model` (see the module documentation).
    pub fn resolve(&self, name: &str) -> Result<Plan, ResolveError> {
        if name.is_empty() {
            return Err(ResolveError::Missing);
        }
        let target = if self.catalog.get(name).is_some() {
            Target::Model(Candidate {
                model: name.to_string(),
            })
        } else if let Some(route) = self.routes.get(name) {
            Target::Route(Arc::clone(route))
        } else {
            return Err(ResolveError::Unknown {
                name: shorten(name),
                routes: list(self.routes.keys().map(String::as_str)),
                models: list(self.catalog.iter().map(|(model, _)| model)),
            });
        };
        Ok(Plan {
            requested_model: name.to_string(),
            target,
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
    let mut candidates: Vec<Candidate> = Vec::with_capacity(spec.models.len());
    for model in spec.models {
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
    Ok(Route {
        alias,
        description: spec.description,
        candidates,
    })
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
                            description: String::new(),
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
        let plan = table.resolve("auto").unwrap();
        assert_eq!(models(&plan), ["sim-large", "sim-small"]);
        assert_eq!(plan.route_alias(), "auto");
        assert_eq!(plan.requested_model(), "auto");
        assert_eq!(plan.primary().model(), "sim-large");
    }

    #[test]
    fn default_route_keeps_only_catalog_models() {
        let table = RouteTable::new(&Config::default(), catalog(&["sim-small", "x"])).unwrap();
        assert_eq!(models(&table.resolve("auto").unwrap()), ["sim-small"]);
    }

    #[test]
    fn default_route_is_omitted_without_default_models() {
        let table = RouteTable::new(&Config::default(), catalog(&["gpt"])).unwrap();
        assert_eq!(table.routes().count(), 0);
        assert!(matches!(
            table.resolve("auto"),
            Err(ResolveError::Unknown { .. })
        ));
    }

    #[test]
    fn default_route_yields_to_a_model_named_auto() {
        let table = RouteTable::new(&Config::default(), catalog(&["auto", "sim-small"])).unwrap();
        assert_eq!(table.routes().count(), 0);
        let plan = table.resolve("auto").unwrap();
        assert_eq!(plan.route(), None);
        assert_eq!(models(&plan), ["auto"]);
    }

    #[test]
    fn configured_routes_replace_the_default() {
        let config = config(&[("cheap", &["sim-small", "sim-large"])]);
        let table = RouteTable::new(&config, Arc::new(Catalog::default())).unwrap();
        assert!(table.get("auto").is_none());
        let plan = table.resolve("cheap").unwrap();
        assert_eq!(models(&plan), ["sim-small", "sim-large"]);
        assert_eq!(plan.served_by(0), ServedBy::Primary);
        assert_eq!(plan.served_by(1), ServedBy::Fallback);
    }

    #[test]
    fn a_model_name_is_served_directly() {
        let table = RouteTable::new(&Config::default(), Arc::new(Catalog::default())).unwrap();
        let plan = table.resolve("sim-small").unwrap();
        assert_eq!(plan.route(), None);
        assert_eq!(plan.route_alias(), "");
        assert_eq!(plan.requested_model(), "sim-small");
        assert_eq!(models(&plan), ["sim-small"]);
        assert_eq!(plan.served_by(0), ServedBy::Primary);
    }

    #[test]
    fn empty_model_is_invalid_argument_on_field_model() {
        let table = RouteTable::new(&Config::default(), Arc::new(Catalog::default())).unwrap();
        let error = table.resolve("").unwrap_err();
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
        let status = Status::from(ApiError::from(table.resolve("gpt-9").unwrap_err()));
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
        let error = table.resolve(&name).unwrap_err();
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
}
