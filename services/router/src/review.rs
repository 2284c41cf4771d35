//! `[router.review]`: the review policies (step 7 of the walk), and the matcher that applies them.
//!
//! ```toml
//! [router.review]
//! review_url = "http://127.0.0.1:50055"  # WEIR_ROUTER__REVIEW__REVIEW_URL; "" (default) = off
//!
//! [[router.review.policies]]
//! name = "medical-advice"              # required, unique; becomes the item's reason
//! mode = "blocking"                    # "blocking" (default) | "post_hoc"
//! queue = "clinical"                   # default "default"
//! priority = 10                        # higher is more urgent (default 0)
//! sla = "15m"                          # time to decide (default: the queue's)
//! prompt_keywords = ["dosage", "overdose"]   # any of them, case-insensitive substring
//! answer_regex = "(?i)\\b\\d+\\s*mg\\b"      # the regex crate's syntax
//! tenants = ["acme"]                   # only these tenants (default all)
//!
//! [[router.review.policies]]
//! name = "audit"
//! mode = "post_hoc"
//! sample_rate = 0.01                   # 1% of requests, at random
//! ```
//!
//! # Matching
//!
//! A policy matches an answer when **every condition it gives holds** (a condition left out always
//! holds, so a policy with none matches every answer):
//!
//! | condition | holds when |
//! |---|---|
//! | `prompt_keywords` | the request's new messages contain any of them (case-insensitive) |
//! | `prompt_regex` | the regex finds a match in the request's new messages |
//! | `answer_keywords` | the answer contains any of them (case-insensitive) |
//! | `answer_regex` | the regex finds a match in the answer |
//! | `min_cost_micros` | the answer's cost (its usage at the catalog price of the serving model) is at least this; a model with no price never reaches it |
//! | `tenants`, `models`, `routes` | the request's tenant, the serving model, the route alias (empty when a model was named directly) is one of the list |
//! | `sample_rate` | a random draw, once per request and model call, falls below it (0 to 1) |
//!
//! The "prompt" is the text of the request's own `messages`, one per line, not the session
//! history it continues (that was reviewed, or not, when it was answered). Regexes are compiled
//! once at start-up; a keyword or regex never sees the tokens one by one, only the whole answer.
//!
//! Every condition but the answer's (`answer_keywords`, `answer_regex`, `min_cost_micros`) is
//! known before the model is called: [`Policies::candidates`] keeps the policies those admit
//! (**candidates**), and [`Policies::judge`] decides among them once the answer is known. A stream
//! is held back exactly when a blocking policy is a candidate (see [`crate::review_gate`]).
//!
//! When several policies match, the answer is held (blocking) if any blocking policy matches, and
//! sampled (post-hoc) otherwise. The item's `reasons` name every matching policy in config order;
//! its queue is the first matching policy's of the deciding mode, its priority the highest and
//! its SLA the shortest among them.
//!
//! # Validation
//!
//! At start-up ([`Policies::new`]), naming the key (`router.review.policies[2].prompt_regex`):
//! names non-empty and unique, queue names valid (1 to 64 letters, digits, `-`, `_`, `.`), `sla`
//! above zero and at most 30 days, regexes that compile, `min_cost_micros` not negative,
//! `sample_rate` within 0..=1, `tenants` valid tenant ids, `models` in the catalog and `routes`
//! configured route aliases. Policies without a
//! `review_url` are refused (naming `router.review.review_url`) rather than silently ignored.

use std::time::Duration;

use regex::Regex;
use serde::{Deserialize, Serialize};
use weir_mesh::{catalog::Catalog, config::ConfigError};

use crate::{
    matching::{PromptMatch, compile_keywords, compile_regex, contains_any, listed},
    route::RouteTable,
};

/// Queue of a policy that names none.
pub const DEFAULT_QUEUE: &str = "default";

/// Longest `sla` a policy may set: the most the review service accepts (30 days).
pub const MAX_SLA: Duration = Duration::from_secs(30 * 24 * 60 * 60);

/// `[router.review]`: where the review service is and which answers go to it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ReviewConfig {
    /// The review service (`http://host:port`). Empty (the default) turns review off. `weir up`
    /// points it at the review service it runs, when set.
    pub review_url: String,
    /// The policies (`[[router.review.policies]]`), in order.
    pub policies: Vec<PolicySpec>,
}

impl ReviewConfig {
    /// The review service URL, or `None` when review is off.
    pub fn review_url(&self) -> Option<&str> {
        Some(self.review_url.trim()).filter(|url| !url.is_empty())
    }

    /// Checks the URL (when set) and that policies have a service to go to.
    pub fn validate(&self) -> Result<(), ConfigError> {
        match self.review_url() {
            Some(url) => crate::config::validate_service_url("router.review.review_url", url),
            None if !self.policies.is_empty() => Err(ConfigError::invalid(
                "router.review.review_url",
                "review policies are configured but review_url is empty: set it to the review \
                 service (weir up sets it to its own), or remove the policies",
            )),
            None => Ok(()),
        }
    }
}

/// Whether an answer waits for its review.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// The answer is withheld until a reviewer decides (`"blocking"`, the default).
    #[default]
    Blocking,
    /// The answer is delivered at once and queued for audit (`"post_hoc"`).
    PostHoc,
}

impl Mode {
    /// The name used in config and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Blocking => "blocking",
            Mode::PostHoc => "post_hoc",
        }
    }
}

/// One policy, as written: `[[router.review.policies]]` (see the module documentation).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PolicySpec {
    /// Unique name, given to the review item as its reason (required).
    pub name: String,
    /// Blocking (default) or post-hoc.
    pub mode: Mode,
    /// Review queue (default [`DEFAULT_QUEUE`]).
    pub queue: String,
    /// Item priority; higher is more urgent (default 0).
    pub priority: i32,
    /// Time to decide; unset means the queue's configured SLA.
    #[serde(with = "humantime_serde")]
    pub sla: Option<Duration>,
    /// The prompt contains any of these (case-insensitive).
    pub prompt_keywords: Vec<String>,
    /// The answer contains any of these (case-insensitive).
    pub answer_keywords: Vec<String>,
    /// The prompt matches this regex.
    pub prompt_regex: Option<String>,
    /// The answer matches this regex.
    pub answer_regex: Option<String>,
    /// The answer cost at least this many micro-USD.
    pub min_cost_micros: Option<i64>,
    /// The request's tenant is one of these.
    pub tenants: Vec<String>,
    /// The serving model is one of these.
    pub models: Vec<String>,
    /// The request's route alias is one of these.
    pub routes: Vec<String>,
    /// Share of requests selected at random, 0 to 1.
    pub sample_rate: Option<f64>,
}

impl Default for PolicySpec {
    fn default() -> Self {
        Self {
            name: String::new(),
            mode: Mode::default(),
            queue: DEFAULT_QUEUE.to_string(),
            priority: 0,
            sla: None,
            prompt_keywords: Vec::new(),
            answer_keywords: Vec::new(),
            prompt_regex: None,
            answer_regex: None,
            min_cost_micros: None,
            tenants: Vec::new(),
            models: Vec::new(),
            routes: Vec::new(),
            sample_rate: None,
        }
    }
}

/// A compiled policy.
#[derive(Debug, Clone)]
pub struct Policy {
    name: String,
    mode: Mode,
    queue: String,
    priority: i32,
    sla: Option<Duration>,
    /// `prompt_keywords` and `prompt_regex` (the matcher routing rules share).
    prompt: PromptMatch,
    /// Lower-cased.
    answer_keywords: Vec<String>,
    answer_regex: Option<Regex>,
    min_cost_micros: Option<i64>,
    tenants: Vec<String>,
    models: Vec<String>,
    routes: Vec<String>,
    sample_rate: Option<f64>,
}

/// What is known of a request before its model is called: what a policy's early conditions test.
#[derive(Debug, Clone, Copy)]
pub struct Facts<'a> {
    /// The tenant.
    pub tenant: &'a str,
    /// The model about to be called.
    pub model: &'a str,
    /// The route alias (empty when a model was named directly).
    pub route: &'a str,
    /// The text of the request's new messages.
    pub prompt: &'a str,
}

/// The answer, for a policy's late conditions.
#[derive(Debug, Clone, Copy)]
pub struct AnswerFacts<'a> {
    /// The answer's text.
    pub text: &'a str,
    /// Its cost in micro-USD at the catalog price; `None` when the model has no price.
    pub cost_micros: Option<i64>,
}

impl Policy {
    /// The policy's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its mode.
    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// Whether the conditions known before the model call hold; `draw` gives a uniform number in
    /// `[0, 1)` and is only called for a policy with a `sample_rate` whose other early conditions
    /// hold.
    pub fn admits(&self, facts: &Facts<'_>, draw: &mut dyn FnMut() -> f64) -> bool {
        if !listed(&self.tenants, facts.tenant)
            || !listed(&self.models, facts.model)
            || !listed(&self.routes, facts.route)
            || !self.prompt.holds(facts.prompt)
        {
            return false;
        }
        match self.sample_rate {
            Some(rate) => draw() < rate,
            None => true,
        }
    }

    /// Whether the answer's conditions hold (true for a policy that has none).
    pub fn matches_answer(&self, answer: &AnswerFacts<'_>) -> bool {
        if !self.answer_keywords.is_empty() && !contains_any(answer.text, &self.answer_keywords) {
            return false;
        }
        if let Some(regex) = &self.answer_regex
            && !regex.is_match(answer.text)
        {
            return false;
        }
        match self.min_cost_micros {
            Some(min) => answer.cost_micros.is_some_and(|cost| cost >= min),
            None => true,
        }
    }
}

/// Why an answer goes to review: what the review item is created with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Flag {
    /// Blocking if any matching policy is.
    pub mode: Mode,
    /// The names of every matching policy, in config order.
    pub reasons: Vec<String>,
    /// The queue of the first matching policy of `mode`.
    pub queue: String,
    /// The highest priority among the matching policies of `mode`.
    pub priority: i32,
    /// The shortest SLA among the matching policies of `mode`, if any sets one.
    pub sla: Option<Duration>,
}

/// The compiled, validated policies, in config order.
#[derive(Debug, Clone, Default)]
pub struct Policies {
    policies: Vec<Policy>,
}

impl Policies {
    /// Validates and compiles the policies of `config` against the `catalog` and the `routes`
    /// (see the module documentation), naming the first bad key.
    pub fn new(
        config: &ReviewConfig,
        catalog: &Catalog,
        routes: &RouteTable,
    ) -> Result<Self, ConfigError> {
        config.validate()?;
        let mut policies: Vec<Policy> = Vec::with_capacity(config.policies.len());
        for (index, spec) in config.policies.iter().enumerate() {
            let key = |field: &str| format!("router.review.policies[{index}].{field}");
            let policy = compile(spec, &key, catalog, routes)?;
            if policies.iter().any(|p| p.name == policy.name) {
                return Err(ConfigError::invalid(
                    key("name"),
                    format!("\"{}\" names another policy too", policy.name),
                ));
            }
            policies.push(policy);
        }
        Ok(Self { policies })
    }

    /// Whether there is any policy (review is on).
    pub fn is_empty(&self) -> bool {
        self.policies.is_empty()
    }

    /// The policy at `index`.
    pub fn get(&self, index: usize) -> Option<&Policy> {
        self.policies.get(index)
    }

    /// The indices of the policies whose early conditions hold for `facts` (see
    /// [`Policy::admits`]).
    pub fn candidates(&self, facts: &Facts<'_>, draw: &mut dyn FnMut() -> f64) -> Vec<usize> {
        (0..self.policies.len())
            .filter(|&index| self.policies[index].admits(facts, draw))
            .collect()
    }

    /// Whether any of `candidates` is blocking: a stream must then be held back until its end.
    pub fn any_blocking(&self, candidates: &[usize]) -> bool {
        candidates
            .iter()
            .filter_map(|&index| self.get(index))
            .any(|policy| policy.mode == Mode::Blocking)
    }

    /// Which of `candidates` match `answer`, as a [`Flag`]; `None` when none does.
    pub fn judge(&self, candidates: &[usize], answer: &AnswerFacts<'_>) -> Option<Flag> {
        let matching: Vec<&Policy> = candidates
            .iter()
            .filter_map(|&index| self.get(index))
            .filter(|policy| policy.matches_answer(answer))
            .collect();
        let mode = if matching.iter().any(|p| p.mode == Mode::Blocking) {
            Mode::Blocking
        } else {
            Mode::PostHoc
        };
        let deciding: Vec<&&Policy> = matching.iter().filter(|p| p.mode == mode).collect();
        let first = deciding.first()?;
        Some(Flag {
            mode,
            reasons: matching.iter().map(|p| p.name.clone()).collect(),
            queue: first.queue.clone(),
            priority: deciding.iter().map(|p| p.priority).max().unwrap_or(0),
            sla: deciding.iter().filter_map(|p| p.sla).min(),
        })
    }
}

/// Checks and compiles one policy; `key` names its fields.
fn compile(
    spec: &PolicySpec,
    key: &dyn Fn(&str) -> String,
    catalog: &Catalog,
    routes: &RouteTable,
) -> Result<Policy, ConfigError> {
    let name = spec.name.trim();
    if name.is_empty() {
        return Err(ConfigError::invalid(
            key("name"),
            "every policy needs a name",
        ));
    }
    let queue = spec.queue.trim();
    if queue.is_empty() {
        return Err(ConfigError::invalid(
            key("queue"),
            format!("must not be empty (leave it out for \"{DEFAULT_QUEUE}\")"),
        ));
    }
    if queue.len() > 64
        || !queue
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    {
        return Err(ConfigError::invalid(
            key("queue"),
            format!("\"{queue}\": queue names are 1 to 64 letters, digits, '-', '_' or '.'"),
        ));
    }
    if spec.sla.is_some_and(|sla| sla.is_zero() || sla > MAX_SLA) {
        return Err(ConfigError::invalid(
            key("sla"),
            "must be above zero and at most 30 days (leave it out for the queue's SLA)",
        ));
    }
    if spec.min_cost_micros.is_some_and(|min| min < 0) {
        return Err(ConfigError::invalid(
            key("min_cost_micros"),
            "must not be negative",
        ));
    }
    if let Some(rate) = spec.sample_rate
        && !(0.0..=1.0).contains(&rate)
    {
        return Err(ConfigError::invalid(
            key("sample_rate"),
            format!("must be within 0 and 1, got {rate}"),
        ));
    }
    for tenant in &spec.tenants {
        if weir_mesh::tenant::Tenant::new(tenant).is_err() {
            return Err(ConfigError::invalid(
                key("tenants"),
                format!(
                    "\"{tenant}\" is not a tenant id (1 to 64 letters, digits, '-', '_' or '.')"
                ),
            ));
        }
    }
    for model in &spec.models {
        if catalog.get(model).is_none() {
            return Err(ConfigError::invalid(
                key("models"),
                format!("\"{model}\" is not a model in the catalog"),
            ));
        }
    }
    for route in &spec.routes {
        if routes.get(route).is_none() {
            return Err(ConfigError::invalid(
                key("routes"),
                format!("\"{route}\" is not a route alias of [router.routes]"),
            ));
        }
    }
    Ok(Policy {
        name: name.to_string(),
        mode: spec.mode,
        queue: queue.to_string(),
        priority: spec.priority,
        sla: spec.sla,
        prompt: PromptMatch::new(key, &spec.prompt_keywords, spec.prompt_regex.as_deref())?,
        answer_keywords: compile_keywords(&key("answer_keywords"), &spec.answer_keywords)?,
        answer_regex: compile_regex(&key("answer_regex"), spec.answer_regex.as_deref())?,
        min_cost_micros: spec.min_cost_micros,
        tenants: spec.tenants.clone(),
        models: spec.models.clone(),
        routes: spec.routes.clone(),
        sample_rate: spec.sample_rate,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use std::sync::Arc;

    use weir_mesh::config::Source;

    use super::*;
    use crate::Config;

    const URL: &str = "review_url = \"http://127.0.0.1:50055\"\n";

    fn config(toml: &str) -> Config {
        Source::from_toml(toml).section("router").unwrap()
    }

    fn compile_toml(toml: &str) -> Result<Policies, ConfigError> {
        let config = config(toml);
        let catalog = Arc::new(Catalog::default());
        let routes = RouteTable::new(&config, catalog.clone())?;
        Policies::new(&config.review, &catalog, &routes)
    }

    fn policies(toml: &str) -> Policies {
        compile_toml(&format!("[router.review]\n{URL}{toml}")).unwrap()
    }

    fn config_error(toml: &str) -> String {
        compile_toml(&format!("[router.review]\n{URL}{toml}"))
            .unwrap_err()
            .to_string()
    }

    fn facts<'a>(prompt: &'a str) -> Facts<'a> {
        Facts {
            tenant: "acme",
            model: "sim-large",
            route: "auto",
            prompt,
        }
    }

    fn answer(text: &str) -> AnswerFacts<'_> {
        AnswerFacts {
            text,
            cost_micros: Some(100),
        }
    }

    fn never() -> f64 {
        panic!("no policy here samples")
    }

    /// The flag for `prompt` then `text`, with no sampling.
    fn judge(policies: &Policies, facts: &Facts<'_>, answer: &AnswerFacts<'_>) -> Option<Flag> {
        let candidates = policies.candidates(facts, &mut never);
        policies.judge(&candidates, answer)
    }

    #[test]
    fn the_table_parses_with_its_defaults() {
        let config = config(&format!(
            "[router.review]\n{URL}[[router.review.policies]]\nname = \"a\"\nsla = \"15m\"\n\
             [[router.review.policies]]\nname = \"b\"\nmode = \"post_hoc\"\nqueue = \"q\"\n"
        ));
        let [a, b] = &config.review.policies[..] else {
            panic!("two policies expected");
        };
        assert_eq!(a.mode, Mode::Blocking);
        assert_eq!(a.queue, DEFAULT_QUEUE);
        assert_eq!(a.sla, Some(Duration::from_secs(900)));
        assert_eq!(b.mode, Mode::PostHoc);
        assert_eq!(b.queue, "q");
        assert_eq!(config.review.review_url(), Some("http://127.0.0.1:50055"));
        assert_eq!(Config::default().review.review_url(), None);
        assert!(
            Source::from_toml("[[router.review.policies]]\nname = \"a\"\nmode = \"later\"\n")
                .section::<Config>("router")
                .is_err()
        );
        assert!(
            Source::from_toml("[[router.review.policies]]\nnme = \"a\"\n")
                .section::<Config>("router")
                .is_err()
        );
    }

    #[test]
    fn keywords_match_case_insensitive_substrings_of_prompt_or_answer() {
        let policies = policies(
            "[[router.review.policies]]\nname = \"p\"\nprompt_keywords = [\"Dosage\", \"poison\"]\n\
             [[router.review.policies]]\nname = \"a\"\nanswer_keywords = [\"REFUND\"]\n",
        );
        let flag = judge(&policies, &facts("what DOSAGE of x?"), &answer("none")).unwrap();
        assert_eq!(flag.reasons, ["p"]);
        let flag = judge(&policies, &facts("hello"), &answer("a full refund.")).unwrap();
        assert_eq!(flag.reasons, ["a"]);
        assert_eq!(
            judge(&policies, &facts("poisonous dosage"), &answer("refunds"))
                .unwrap()
                .reasons,
            ["p", "a"]
        );
        assert_eq!(judge(&policies, &facts("hello"), &answer("hi")), None);
    }

    #[test]
    fn regexes_match_prompt_or_answer() {
        let policies = policies(
            "[[router.review.policies]]\nname = \"ssn\"\nprompt_regex = '\\d{3}-\\d{2}-\\d{4}'\n\
             [[router.review.policies]]\nname = \"mg\"\nanswer_regex = '(?i)\\b\\d+\\s*mg\\b'\n",
        );
        let flag = judge(&policies, &facts("mine is 123-45-6789"), &answer("ok")).unwrap();
        assert_eq!(flag.reasons, ["ssn"]);
        let flag = judge(&policies, &facts("how much?"), &answer("take 500 MG daily")).unwrap();
        assert_eq!(flag.reasons, ["mg"]);
        assert_eq!(judge(&policies, &facts("12-3"), &answer("500mgs")), None);
    }

    #[test]
    fn cost_rules_need_the_answer_to_cost_at_least_the_minimum() {
        let policies =
            policies("[[router.review.policies]]\nname = \"dear\"\nmin_cost_micros = 100\n");
        let cost = |cost_micros| AnswerFacts {
            text: "x",
            cost_micros,
        };
        assert!(judge(&policies, &facts("p"), &cost(Some(100))).is_some());
        assert!(judge(&policies, &facts("p"), &cost(Some(5_000))).is_some());
        assert!(judge(&policies, &facts("p"), &cost(Some(99))).is_none());
        assert!(
            judge(&policies, &facts("p"), &cost(None)).is_none(),
            "a model with no price never reaches a minimum"
        );
    }

    #[test]
    fn tenant_model_and_route_scopes_are_lists_of_which_any_holds() {
        let policies = policies(
            "[[router.review.policies]]\nname = \"t\"\ntenants = [\"acme\", \"globex\"]\n\
             [[router.review.policies]]\nname = \"m\"\nmodels = [\"sim-small\"]\n\
             [[router.review.policies]]\nname = \"r\"\nroutes = [\"auto\"]\n",
        );
        let mut f = facts("p");
        assert_eq!(
            judge(&policies, &f, &answer("x")).unwrap().reasons,
            ["t", "r"]
        );
        f.tenant = "initech";
        f.model = "sim-small";
        assert_eq!(
            judge(&policies, &f, &answer("x")).unwrap().reasons,
            ["m", "r"]
        );
        f.route = "";
        assert_eq!(judge(&policies, &f, &answer("x")).unwrap().reasons, ["m"]);
        f.model = "sim-large";
        assert_eq!(judge(&policies, &f, &answer("x")), None);
    }

    #[test]
    fn every_condition_of_a_policy_must_hold() {
        let policies = policies(
            "[[router.review.policies]]\nname = \"both\"\ntenants = [\"acme\"]\n\
             prompt_keywords = [\"refund\"]\nanswer_keywords = [\"approved\"]\n",
        );
        assert!(judge(&policies, &facts("refund?"), &answer("Approved!")).is_some());
        assert!(judge(&policies, &facts("refund?"), &answer("denied")).is_none());
        assert!(judge(&policies, &facts("hi"), &answer("approved")).is_none());
        let mut other = facts("refund?");
        other.tenant = "globex";
        assert!(judge(&policies, &other, &answer("approved")).is_none());
    }

    #[test]
    fn sampling_draws_once_per_request_and_selects_below_the_rate() {
        let policies = policies(
            "[[router.review.policies]]\nname = \"audit\"\nmode = \"post_hoc\"\nsample_rate = 0.25\n",
        );
        for (draw, sampled) in [(0.0, true), (0.2499, true), (0.25, false), (0.9, false)] {
            let mut draws = 0;
            let candidates = policies.candidates(&facts("p"), &mut || {
                draws += 1;
                draw
            });
            assert_eq!(draws, 1);
            assert_eq!(
                policies.judge(&candidates, &answer("x")).is_some(),
                sampled,
                "{draw}"
            );
        }
        // With real randomness, about the rate is sampled.
        let sampled = (0..4000)
            .filter(|_| {
                !policies
                    .candidates(&facts("p"), &mut rand::random::<f64>)
                    .is_empty()
            })
            .count();
        assert!((800..1200).contains(&sampled), "{sampled} of 4000");
        // 0 never samples, 1 always does.
        let edges = self::policies(
            "[[router.review.policies]]\nname = \"none\"\nsample_rate = 0.0\n\
             [[router.review.policies]]\nname = \"all\"\nsample_rate = 1.0\n",
        );
        for _ in 0..100 {
            let candidates = edges.candidates(&facts("p"), &mut rand::random::<f64>);
            assert_eq!(candidates, [1]);
        }
    }

    #[test]
    fn a_blocking_match_wins_and_takes_its_queue_priority_and_sla() {
        let policies = policies(
            "[[router.review.policies]]\nname = \"audit\"\nmode = \"post_hoc\"\nqueue = \"audit\"\n\
             priority = 99\n\
             [[router.review.policies]]\nname = \"legal\"\nqueue = \"legal\"\npriority = 1\n\
             sla = \"1h\"\nanswer_keywords = [\"lawsuit\"]\n\
             [[router.review.policies]]\nname = \"urgent\"\nqueue = \"other\"\npriority = 5\n\
             sla = \"10m\"\nanswer_keywords = [\"lawsuit\"]\n",
        );
        let candidates = policies.candidates(&facts("p"), &mut never);
        assert_eq!(candidates, [0, 1, 2]);
        assert!(policies.any_blocking(&candidates));
        let flag = policies.judge(&candidates, &answer("a lawsuit")).unwrap();
        assert_eq!(
            flag,
            Flag {
                mode: Mode::Blocking,
                reasons: vec!["audit".into(), "legal".into(), "urgent".into()],
                queue: "legal".into(),
                priority: 5,
                sla: Some(Duration::from_secs(600)),
            }
        );
        let flag = policies.judge(&candidates, &answer("fine")).unwrap();
        assert_eq!(flag.mode, Mode::PostHoc);
        assert_eq!((flag.queue.as_str(), flag.priority), ("audit", 99));
        assert!(!policies.any_blocking(&candidates[..1]));
    }

    #[test]
    fn a_bad_regex_fails_naming_its_key() {
        let error = config_error(
            "[[router.review.policies]]\nname = \"ok\"\n[[router.review.policies]]\nname = \"x\"\nprompt_regex = \"(unclosed\"\n",
        );
        assert!(
            error.contains("router.review.policies[1].prompt_regex"),
            "{error}"
        );
        let error =
            config_error("[[router.review.policies]]\nname = \"x\"\nanswer_regex = \"[z-a]\"\n");
        assert!(
            error.contains("router.review.policies[0].answer_regex"),
            "{error}"
        );
    }

    #[test]
    fn bad_values_fail_naming_their_key() {
        for (toml, key) in [
            ("name = \"\"", "policies[0].name"),
            ("name = \"a\"\nqueue = \"\"", "policies[0].queue"),
            ("name = \"a\"\nqueue = \"a queue\"", "policies[0].queue"),
            ("name = \"a\"\nsla = \"0s\"", "policies[0].sla"),
            ("name = \"a\"\nsla = \"31days\"", "policies[0].sla"),
            (
                "name = \"a\"\nmin_cost_micros = -1",
                "policies[0].min_cost_micros",
            ),
            ("name = \"a\"\nsample_rate = 1.5", "policies[0].sample_rate"),
            (
                "name = \"a\"\nsample_rate = -0.1",
                "policies[0].sample_rate",
            ),
            (
                "name = \"a\"\nprompt_keywords = [\"\"]",
                "policies[0].prompt_keywords",
            ),
            ("name = \"a\"\ntenants = [\"a b\"]", "policies[0].tenants"),
            ("name = \"a\"\nmodels = [\"gpt-9\"]", "policies[0].models"),
            ("name = \"a\"\nroutes = [\"nope\"]", "policies[0].routes"),
        ] {
            let error = config_error(&format!("[[router.review.policies]]\n{toml}\n"));
            assert!(
                error.contains(&format!("router.review.{key}")),
                "{toml}: {error}"
            );
        }
        let error = config_error(
            "[[router.review.policies]]\nname = \"a\"\n[[router.review.policies]]\nname = \"a\"\n",
        );
        assert!(error.contains("router.review.policies[1].name"), "{error}");
    }

    #[test]
    fn policies_need_a_review_url_and_a_url_must_be_usable() {
        let error = compile_toml("[[router.review.policies]]\nname = \"a\"\n")
            .unwrap_err()
            .to_string();
        assert!(error.contains("router.review.review_url"), "{error}");
        let error = compile_toml("[router.review]\nreview_url = \"review:50055\"\n")
            .unwrap_err()
            .to_string();
        assert!(error.contains("router.review.review_url"), "{error}");
        assert!(compile_toml("").unwrap().is_empty());
    }
}
