//! Cost-aware routing end to end: a route's rules pick one of its tiers per request (prompt
//! length, keywords, regex, requested quality, the tenant's plan, its budget state), through a
//! real router and inference service over real sockets, and the answer names the rule.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use tokio_stream::StreamExt;
use weir::stack::Service;
use weir_proto::{
    budget::{CalendarPeriod, Period, PeriodUnit, Scope, ScopeKind, SetBudgetRequest, period},
    router::{
        CompleteRequest, CompleteResponse, Notice, ServedBy, complete_stream_response::Event,
    },
};
use weir_router::{rules::ROUTE_RULE, spend::BUDGET_STEERED};
use weir_tests::{
    Mesh, complete, complete_stream, delete_prefix, eventually, redis_url, unique_prefix, with_key,
};

/// Key of tenant `acme`, whose plan is `free`.
const FREE_KEY: &str = "rules-free-key-0123456789abcdef0123456789";
/// Key of tenant `beta`, which has no plan.
const BETA_KEY: &str = "rules-beta-key-0123456789abcdef0123456789";
/// The default tier.
const DEFAULT: &str = "sim-default";
/// The `fast` tier.
const FAST: &str = "sim-fast";
/// The `strong` tier's primary.
const STRONG: &str = "sim-strong";

const MODELS: &str = r#"
[models.sim-default]
sim = { output_tokens = 4 }
price = { input_micros_per_mtok = 1000000, output_micros_per_mtok = 1000000 }
[models.sim-fast]
sim = { output_tokens = 4 }
price = { input_micros_per_mtok = 1000000, output_micros_per_mtok = 1000000 }
[models.sim-strong]
sim = { output_tokens = 4 }
price = { input_micros_per_mtok = 100000000, output_micros_per_mtok = 100000000 }
"#;

fn config() -> String {
    format!(
        r#"{MODELS}
[mesh]
secret = "routing-rules-test-secret-0123456789abcdef"

[[auth.api_keys]]
id = "free"
tenant = "acme"
key = "{FREE_KEY}"

[[auth.api_keys]]
id = "beta"
tenant = "beta"
key = "{BETA_KEY}"

[router.rate_limit]
enabled = false

[router.plans]
acme = "free"

[router.routes.auto]
models = ["{DEFAULT}"]
tiers = {{ fast = ["{FAST}"], strong = ["{STRONG}", "{FAST}"] }}

[[router.routes.auto.rules]]
name = "free-plan"
tier = "fast"
plans = ["free"]

[[router.routes.auto.rules]]
name = "hard"
tier = "strong"
prompt_keywords = ["prove", "step by step"]

[[router.routes.auto.rules]]
name = "arithmetic"
tier = "strong"
prompt_regex = "\\d+\\s*[+*/-]\\s*\\d+"

[[router.routes.auto.rules]]
name = "asked-for-quality"
tier = "strong"
quality = ["high"]

[[router.routes.auto.rules]]
name = "short-questions"
tier = "fast"
max_prompt_tokens = 12

[[router.routes.auto.rules]]
name = "long-questions"
tier = "strong"
min_prompt_tokens = 60
"#
    )
}

async fn start() -> Mesh {
    Mesh::start_services(&config(), &[Service::Inference, Service::Router]).await
}

async fn ask(mesh: &Mesh, key: &str, request: CompleteRequest) -> CompleteResponse {
    mesh.router()
        .complete(with_key(request, key))
        .await
        .expect("served")
        .into_inner()
}

fn reasons(notices: &[Notice]) -> Vec<&str> {
    notices.iter().map(|n| n.reason.as_str()).collect()
}

/// Asserts the answer came from `model` as the primary of the tier rule `rule` picked, and that
/// its only notice says so.
#[track_caller]
fn ruled(response: &CompleteResponse, model: &str, rule: &str, tier: &str) {
    assert_eq!(response.model, model, "{response:?}");
    assert_eq!(response.route, "auto");
    assert_eq!(response.requested_model, "auto");
    assert_eq!(response.served_by(), ServedBy::Primary);
    assert_eq!(
        reasons(&response.notices),
        [ROUTE_RULE],
        "{:?}",
        response.notices
    );
    let message = &response.notices[0].message;
    assert!(
        message.contains(&format!("rule {rule} ")) && message.contains(&format!("tier {tier}")),
        "{message}"
    );
}

/// A prompt of 13 to 59 tokens, without keywords or arithmetic: no rule holds for it.
const MEDIUM: &str = "tell me something about the weather in paris in the spring";

#[tokio::test]
async fn each_rule_kind_picks_its_tier_and_says_so() {
    let mesh = start().await;
    // Keywords (any of them, case-insensitive).
    let hard = ask(
        &mesh,
        BETA_KEY,
        complete("auto", "Please PROVE that there are many primes"),
    )
    .await;
    ruled(&hard, STRONG, "hard", "strong");
    let steps = ask(
        &mesh,
        BETA_KEY,
        complete("auto", "explain it step by step to a child"),
    )
    .await;
    ruled(&steps, STRONG, "hard", "strong");
    // The regex.
    let sum = ask(
        &mesh,
        BETA_KEY,
        complete("auto", "what is 12 + 30 in the end"),
    )
    .await;
    ruled(&sum, STRONG, "arithmetic", "strong");
    // The requested quality: a label, or the header.
    let mut labelled = complete("auto", MEDIUM);
    labelled
        .labels
        .insert("quality".to_string(), "high".to_string());
    ruled(
        &ask(&mesh, BETA_KEY, labelled).await,
        STRONG,
        "asked-for-quality",
        "strong",
    );
    let mut headed = with_key(complete("auto", MEDIUM), BETA_KEY);
    headed
        .metadata_mut()
        .insert(weir_mesh::metadata::QUALITY, "high".parse().unwrap());
    let headed = mesh.router().complete(headed).await.unwrap().into_inner();
    ruled(&headed, STRONG, "asked-for-quality", "strong");
    let mut low = complete("auto", MEDIUM);
    low.labels.insert("quality".to_string(), "low".to_string());
    assert_eq!(
        ask(&mesh, BETA_KEY, low).await.model,
        DEFAULT,
        "another quality: no rule"
    );
    // Prompt length, at most and at least.
    let short = ask(&mesh, BETA_KEY, complete("auto", "hi there")).await;
    ruled(&short, FAST, "short-questions", "fast");
    let long_text = "word ".repeat(60);
    let long = ask(&mesh, BETA_KEY, complete("auto", &long_text)).await;
    ruled(&long, STRONG, "long-questions", "strong");
    // The tenant's plan.
    let free = ask(&mesh, FREE_KEY, complete("auto", MEDIUM)).await;
    ruled(&free, FAST, "free-plan", "fast");
    mesh.stop().await;
}

#[tokio::test]
async fn the_first_rule_that_holds_wins_and_none_means_the_default_tier() {
    let mesh = start().await;
    // Both "free-plan" and "hard" hold: the first in config order picks.
    let both = ask(&mesh, FREE_KEY, complete("auto", "prove it")).await;
    ruled(&both, FAST, "free-plan", "fast");
    // "hard" and "short-questions" both hold for beta: "hard" comes first.
    let short_and_hard = ask(&mesh, BETA_KEY, complete("auto", "prove it")).await;
    ruled(&short_and_hard, STRONG, "hard", "strong");
    // No rule holds: the route's own models, no notice.
    let plain = ask(&mesh, BETA_KEY, complete("auto", MEDIUM)).await;
    assert_eq!(plain.model, DEFAULT);
    assert_eq!(plain.route, "auto");
    assert!(plain.notices.is_empty(), "{:?}", plain.notices);
    mesh.stop().await;
}

#[tokio::test]
async fn a_model_named_directly_is_never_ruled() {
    let mesh = start().await;
    for model in [DEFAULT, STRONG] {
        let direct = ask(&mesh, FREE_KEY, complete(model, "prove it")).await;
        assert_eq!(direct.model, model);
        assert_eq!(direct.route, "");
        assert!(direct.notices.is_empty(), "{:?}", direct.notices);
    }
    mesh.stop().await;
}

#[tokio::test]
async fn a_stream_is_ruled_too_and_the_rule_is_counted() {
    let recorder = weir_mesh::telemetry::install_metrics_recorder();
    let mesh = start().await;
    let mut stream = mesh
        .router()
        .complete_stream(with_key(complete_stream("auto", "hi"), BETA_KEY))
        .await
        .unwrap()
        .into_inner();
    let mut events = Vec::new();
    while let Some(event) = stream.next().await {
        events.push(event.unwrap().event.unwrap());
    }
    let Some(Event::Start(start)) = events.first() else {
        panic!("{events:?}");
    };
    assert_eq!(start.model, FAST);
    let Some(Event::Done(done)) = events.last() else {
        panic!("{events:?}");
    };
    assert_eq!(reasons(&done.notices), [ROUTE_RULE]);
    let text = recorder.render();
    assert!(
        text.lines()
            .any(|line| line.starts_with("weir_route_rule_total{")
                && line.contains("route=\"auto\"")
                && line.contains("rule=\"short-questions\"")),
        "{text}"
    );
    mesh.stop().await;
}

fn budget_config(prefix: &str) -> String {
    format!(
        r#"{MODELS}
[router]
budget_url = "http://127.0.0.1:50054"   # replaced by the budget service started with it

[router.rate_limit]
enabled = false

[router.routes.auto]
models = ["{STRONG}"]
tiers = {{ fast = ["{FAST}"] }}

[[router.routes.auto.rules]]
name = "near-budget"
tier = "fast"
budget = "soft_limit_reached"

[budget]
redis_url = "{redis}"
key_prefix = "{prefix}"
"#,
        redis = redis_url()
    )
}

#[tokio::test]
async fn a_budget_rule_steers_a_tenant_above_its_soft_limit() {
    let prefix = unique_prefix();
    let mesh = Mesh::start_services(
        &budget_config(&prefix),
        &[Service::Inference, Service::Budget, Service::Router],
    )
    .await;
    mesh.budget()
        .set_budget(SetBudgetRequest {
            scope: Some(Scope {
                kind: ScopeKind::Tenant.into(),
                id: String::new(),
            }),
            hard_limit_micros: 1_000_000,
            soft_limit_fraction: 0.001,
            period: Some(Period {
                kind: Some(period::Kind::Calendar(CalendarPeriod {
                    unit: PeriodUnit::Daily.into(),
                    time_zone: String::new(),
                })),
            }),
        })
        .await
        .unwrap();
    let mut router = mesh.router();
    let first = router
        .complete(complete("auto", "how much is this"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(first.model, STRONG);
    assert!(first.notices.is_empty(), "{:?}", first.notices);
    // One strong answer (100 micro-USD a token) passes the $0.001 soft limit once committed.
    assert!(
        eventually(Duration::from_secs(10), || {
            let mut router = mesh.router();
            async move {
                router
                    .complete(complete("auto", "and now?"))
                    .await
                    .is_ok_and(|r| r.into_inner().model == FAST)
            }
        })
        .await,
        "steered once above the soft limit"
    );
    let steered = router
        .complete(complete("auto", "once more"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(steered.model, FAST);
    assert_eq!(reasons(&steered.notices), [BUDGET_STEERED]);
    let message = &steered.notices[0].message;
    assert!(
        message.contains("rule near-budget") && message.contains("fast tier"),
        "{message}"
    );
    mesh.stop().await;
    delete_prefix(&prefix).await;
}

#[tokio::test]
async fn the_http_edge_forwards_the_quality_header() {
    let mesh = start().await;
    let http = reqwest::Client::new();
    let ask = |quality: Option<&'static str>| {
        let mut request = http
            .post(format!("{}/chat/completions", mesh.openai_url()))
            .bearer_auth(BETA_KEY)
            .json(&serde_json::json!({
                "model": "auto",
                "messages": [{"role": "user", "content": MEDIUM}],
            }));
        if let Some(quality) = quality {
            request = request.header(weir_mesh::metadata::QUALITY, quality);
        }
        async move {
            let response = request.send().await.unwrap();
            assert_eq!(response.status().as_u16(), 200);
            let body: serde_json::Value = response.json().await.unwrap();
            body["model"].as_str().unwrap().to_string()
        }
    };
    assert_eq!(ask(Some("high")).await, STRONG);
    assert_eq!(ask(None).await, DEFAULT);
    mesh.stop().await;
}
