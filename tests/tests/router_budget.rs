//! Budgets through the router, end to end: routers → budget service (on a real Redis) → the
//! inference service, with real `Complete` and `CompleteStream` calls.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use tokio_stream::StreamExt;
use tonic::Code;
use tonic_types::StatusExt;
use weir::stack::Service;
use weir_proto::{
    budget::{
        Budget, CalendarPeriod, GetBudgetRequest, GetSpendRequest, GetSpendResponse, Period,
        PeriodUnit, Scope, ScopeKind, SetBudgetRequest, period,
    },
    common::GenerationParams,
    router::{
        CompleteRequest, CompleteResponse, CompleteStreamRequest, Notice, ServedBy,
        complete_stream_response::Event,
    },
    session::{CreateSessionRequest, ListTurnsRequest},
};
use weir_router::{
    TenantBudgetPolicy,
    spend::{BUDGET_STEERED, BUDGET_UNAVAILABLE},
};
use weir_tests::{Mesh, complete, eventually, redis_url, unique_prefix, user};

/// One micro-USD per token, in and out, so a cost is its token count.
const PRICED: &str = "sim-priced";
/// A hundred micro-USD per token: the expensive tier.
const PREMIUM: &str = "sim-premium";
/// One micro-USD per token: the economy tier.
const CHEAP: &str = "sim-cheap";
/// Always fails (UNAVAILABLE), so its route falls back.
const BROKEN: &str = "sim-broken";
/// 200 tokens at 20 tokens/s: a stream there is time to cancel.
const SLOW: &str = "sim-slow";

fn config(prefix: &str) -> String {
    format!(
        r#"
[models.sim-priced]
sim = {{ output_tokens = 12 }}
price = {{ input_micros_per_mtok = 1000000, output_micros_per_mtok = 1000000 }}
[models.sim-premium]
sim = {{ output_tokens = 12 }}
price = {{ input_micros_per_mtok = 100000000, output_micros_per_mtok = 100000000 }}
[models.sim-cheap]
sim = {{ output_tokens = 12 }}
price = {{ input_micros_per_mtok = 1000000, output_micros_per_mtok = 1000000 }}
[models.sim-broken]
sim = {{ error_rate = 1.0 }}
price = {{ input_micros_per_mtok = 1000000, output_micros_per_mtok = 1000000 }}
[models.sim-slow]
sim = {{ output_tokens = 200, tokens_per_second = 20.0 }}
price = {{ input_micros_per_mtok = 1000000, output_micros_per_mtok = 1000000 }}

[router]
budget_url = "http://127.0.0.1:50054"   # replaced by the budget service started with it

[router.rate_limit]
enabled = false

[router.routes.auto]
models = ["sim-premium"]
economy = ["sim-cheap"]

[router.routes.fallback]
models = ["sim-broken", "sim-priced"]

[router.routes.down]
models = ["sim-broken"]
degraded = {{ kind = "fixed", text = "later" }}

[budget]
redis_url = "{redis}"
key_prefix = "{prefix}"

[session]
redis_url = "{redis}"
key_prefix = "{prefix}"
default_ttl = "10m"
"#,
        redis = redis_url()
    )
}

fn tenant_scope() -> Scope {
    Scope {
        kind: ScopeKind::Tenant.into(),
        id: String::new(),
    }
}

/// Sets the default tenant's daily budget.
async fn set_budget(mesh: &Mesh, hard_limit_micros: i64, soft_limit_fraction: f64) {
    mesh.budget()
        .set_budget(SetBudgetRequest {
            scope: Some(tenant_scope()),
            hard_limit_micros,
            soft_limit_fraction,
            period: Some(Period {
                kind: Some(period::Kind::Calendar(CalendarPeriod {
                    unit: PeriodUnit::Daily.into(),
                    time_zone: String::new(),
                })),
            }),
        })
        .await
        .expect("budget set");
}

async fn budget(mesh: &Mesh) -> Budget {
    mesh.budget()
        .get_budget(GetBudgetRequest {
            scope: Some(tenant_scope()),
        })
        .await
        .unwrap()
        .into_inner()
        .budget
        .unwrap()
}

async fn spend(mesh: &Mesh) -> GetSpendResponse {
    mesh.budget()
        .get_spend(GetSpendRequest {
            scope: Some(tenant_scope()),
            ..GetSpendRequest::default()
        })
        .await
        .unwrap()
        .into_inner()
}

/// Waits until no reservation is held any more (every request settled).
async fn settled(mesh: &Mesh) -> Budget {
    assert!(
        eventually(Duration::from_secs(10), || async {
            budget(mesh).await.held_micros == 0
        })
        .await,
        "every hold was committed or released"
    );
    budget(mesh).await
}

fn reasons(notices: &[Notice]) -> Vec<&str> {
    notices.iter().map(|n| n.reason.as_str()).collect()
}

/// The cost of an answer's usage at one micro-USD per token.
fn cost_at_one_per_token(response: &CompleteResponse) -> i64 {
    let usage = response.usage.unwrap();
    usage.input_tokens + usage.output_tokens
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_routers_sharing_one_budget_never_overspend() {
    const LIMIT: i64 = 500;
    const PER_ROUTER: usize = 40;
    let prefix = unique_prefix();
    let toml = config(&prefix);
    let a = Mesh::start(&toml).await;
    let (inference_url, budget_url) = (a.url(Service::Inference), a.url(Service::Budget));
    let b = Mesh::start_with(&toml, &[Service::Router], |c| {
        c.router.inference_url = inference_url;
        c.router.budget_url = budget_url;
    })
    .await;
    set_budget(&a, LIMIT, 0.0).await;

    // 80 requests at once, 40 through each router. Each reserves 31 micro-USD (11 prompt tokens
    // + max_tokens 20) and spends 23 (11 + 12), so the $0.0005 limit serves at most 21.
    let mut tasks = Vec::new();
    for (r, router) in [a.router(), b.router()].into_iter().enumerate() {
        for i in 0..PER_ROUTER {
            let mut router = router.clone();
            let mut request = complete(PRICED, "how much is this");
            request.params = Some(GenerationParams {
                max_tokens: Some(20),
                ..GenerationParams::default()
            });
            // Distinct ids: the same id through both routers would be one request, paid once.
            request.request_id = format!("r-{r}-{i}");
            tasks.push(tokio::spawn(async move { router.complete(request).await }));
        }
    }
    let mut served = Vec::new();
    let mut refused = 0;
    for task in tasks {
        match task.await.unwrap() {
            Ok(response) => served.push(response.into_inner()),
            Err(status) => {
                assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
                let details = status.get_error_details();
                assert_eq!(
                    details.error_info().map(|i| i.reason.as_str()),
                    Some("BUDGET_EXHAUSTED")
                );
                let subjects: Vec<&str> = details
                    .quota_failure()
                    .map(|q| q.violations.iter().map(|v| v.subject.as_str()).collect())
                    .unwrap_or_default();
                assert_eq!(subjects, ["tenant:default"], "QuotaFailure names the scope");
                assert!(
                    details.retry_info().is_some(),
                    "RetryInfo until the period resets"
                );
                refused += 1;
            }
        }
    }
    assert!(!served.is_empty() && refused > 0, "{} served", served.len());
    assert_eq!(served.len() + refused, 2 * PER_ROUTER);
    for response in &served {
        assert_eq!(response.cost_micros, cost_at_one_per_token(response));
        assert_eq!(response.cost_micros, 23, "{:?}", response.usage);
    }

    let state = settled(&a).await;
    let charged: i64 = served.iter().map(|r| r.cost_micros).sum();
    assert!(state.spent_micros <= LIMIT, "spent {}", state.spent_micros);
    assert_eq!(state.spent_micros, charged);
    let report = spend(&a).await;
    assert_eq!(report.total_micros, charged);
    assert_eq!(report.by_model.len(), 1);
    assert_eq!(report.by_model[0].model, PRICED);
    assert_eq!(report.by_model[0].requests, served.len() as i64);
    // Refused requests never reached a model.
    assert_eq!(
        a.inference_api().sim_requests_for(PRICED).len(),
        served.len()
    );
    b.stop().await;
    a.stop().await;
    weir_tests::delete_prefix(&prefix).await;
}

#[tokio::test]
async fn above_its_soft_limit_a_tenant_is_served_by_the_economy_tier() {
    let prefix = unique_prefix();
    let mesh = Mesh::start(&config(&prefix)).await;
    // Soft limit at $0.001: one premium answer (23 tokens at 100 micro-USD) passes it.
    set_budget(&mesh, 1_000_000, 0.001).await;
    let mut router = mesh.router();
    let first = router
        .complete(complete("auto", "how much is this"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(first.model, PREMIUM);
    assert!(first.notices.is_empty(), "{:?}", first.notices);
    assert_eq!(first.cost_micros, 100 * cost_at_one_per_token(&first));
    assert!(settled(&mesh).await.soft_limit_reached);

    let second = router
        .complete(complete("auto", "and now?"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(second.model, CHEAP);
    assert_eq!(second.route, "auto");
    assert_eq!(second.served_by(), ServedBy::Primary);
    assert_eq!(reasons(&second.notices), [BUDGET_STEERED]);
    assert_eq!(second.cost_micros, cost_at_one_per_token(&second));

    let mut stream = router
        .complete_stream(weir_tests::complete_stream("auto", "stream it"))
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
    assert_eq!(start.model, CHEAP);
    let Some(Event::Done(done)) = events.last() else {
        panic!("{events:?}");
    };
    assert_eq!(reasons(&done.notices), [BUDGET_STEERED]);
    assert!(done.cost_micros > 0);

    // A model named directly is what the client asked for: never steered.
    let direct = router
        .complete(complete(PREMIUM, "the good one"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(direct.model, PREMIUM);
    assert!(direct.notices.is_empty());
    mesh.stop().await;
    weir_tests::delete_prefix(&prefix).await;
}

#[tokio::test]
async fn a_budget_service_that_is_down_fails_closed_unless_the_tenant_fails_open() {
    let prefix = unique_prefix();
    let toml = config(&prefix);
    let closed = Mesh::start_with(&toml, &[Service::Inference, Service::Router], |c| {
        c.router.budget_url = "http://127.0.0.1:1".to_string();
    })
    .await;
    let status = closed
        .router()
        .complete(complete(PRICED, "hello"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    let details = status.get_error_details();
    assert_eq!(
        details.error_info().map(|i| i.reason.as_str()),
        Some(BUDGET_UNAVAILABLE)
    );
    assert!(details.retry_info().is_some());
    let status = closed
        .router()
        .complete_stream(weir_tests::complete_stream(PRICED, "hello"))
        .await
        .err()
        .unwrap();
    assert_eq!(status.code(), Code::Unavailable);
    assert!(
        closed.inference_api().sim_requests_for(PRICED).is_empty(),
        "no model ran unpaid"
    );
    closed.stop().await;

    let open = Mesh::start_with(&toml, &[Service::Inference, Service::Router], |c| {
        c.router.budget_url = "http://127.0.0.1:1".to_string();
        c.router.budget.tenants.insert(
            "default".to_string(),
            TenantBudgetPolicy {
                fail_open: Some(true),
            },
        );
    })
    .await;
    let response = open
        .router()
        .complete(complete(PRICED, "hello"))
        .await
        .expect("a fail-open tenant is served")
        .into_inner();
    assert_eq!(response.model, PRICED);
    assert_eq!(reasons(&response.notices), [BUDGET_UNAVAILABLE]);
    assert_eq!(response.cost_micros, 0, "nothing was recorded");
    open.stop().await;
    weir_tests::delete_prefix(&prefix).await;
}

#[tokio::test]
async fn a_cancelled_stream_commits_what_was_relayed_and_is_not_appended() {
    let prefix = unique_prefix();
    let mesh = Mesh::start(&config(&prefix)).await;
    set_budget(&mesh, 1_000_000, 0.0).await;
    mesh.session()
        .create_session(CreateSessionRequest {
            session_id: "cancelled".to_string(),
            model: SLOW.to_string(),
            ..CreateSessionRequest::default()
        })
        .await
        .unwrap();
    let mut stream = mesh
        .router()
        .complete_stream(CompleteStreamRequest {
            model: SLOW.to_string(),
            messages: vec![user("tell me everything")],
            session_id: "cancelled".to_string(),
            ..CompleteStreamRequest::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut deltas = 0;
    while deltas < 3 {
        match stream.next().await.unwrap().unwrap().event.unwrap() {
            Event::Delta(_) => deltas += 1,
            Event::Start(_) => {}
            Event::Done(done) => panic!("finished early: {done:?}"),
        }
    }
    assert!(budget(&mesh).await.held_micros > 0, "held while streaming");
    // The client goes away mid-answer.
    drop(stream);

    let state = settled(&mesh).await;
    assert!(state.spent_micros > 0, "what was generated is paid for");
    let report = spend(&mesh).await;
    let usage = report.by_model[0].usage.unwrap();
    assert_eq!(report.by_model[0].model, SLOW);
    assert!(usage.input_tokens > 0);
    assert!(
        (3..200).contains(&usage.output_tokens),
        "the relayed tokens, not the whole answer: {usage:?}"
    );
    assert_eq!(
        report.total_micros,
        usage.input_tokens + usage.output_tokens
    );
    // Settled, and nothing was appended: a cancelled answer stays out of the history.
    let turns = mesh
        .session()
        .list_turns(ListTurnsRequest {
            session_id: "cancelled".to_string(),
            ..ListTurnsRequest::default()
        })
        .await
        .unwrap()
        .into_inner()
        .turns;
    assert!(turns.is_empty(), "{turns:?}");
    mesh.stop().await;
    weir_tests::delete_prefix(&prefix).await;
}

#[tokio::test]
async fn a_fallback_is_charged_at_the_model_that_served_and_a_degraded_answer_is_free() {
    let prefix = unique_prefix();
    let mesh = Mesh::start(&config(&prefix)).await;
    set_budget(&mesh, 1_000_000, 0.0).await;
    let mut router = mesh.router();
    let response = router
        .complete(complete("fallback", "first try"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(response.model, PRICED);
    assert_eq!(response.served_by(), ServedBy::Fallback);
    assert_eq!(reasons(&response.notices), ["FALLBACK_USED"]);
    assert_eq!(response.cost_micros, cost_at_one_per_token(&response));
    let state = settled(&mesh).await;
    assert_eq!(
        state.spent_micros, response.cost_micros,
        "the failed model's hold was released"
    );
    let report = spend(&mesh).await;
    let models: Vec<&str> = report.by_model.iter().map(|m| m.model.as_str()).collect();
    assert_eq!(models, [PRICED]);

    let degraded = router
        .complete(complete("down", "anyone?"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(degraded.served_by(), ServedBy::Degraded);
    assert_eq!(degraded.cost_micros, 0);
    let state = settled(&mesh).await;
    assert_eq!(state.spent_micros, response.cost_micros, "nothing charged");
    assert!(
        !mesh.inference_api().sim_requests_for(BROKEN).is_empty(),
        "the broken model was tried, and cost nothing"
    );
    mesh.stop().await;
    weir_tests::delete_prefix(&prefix).await;
}

#[tokio::test]
async fn an_exhausted_budget_refuses_before_any_model_runs() {
    let prefix = unique_prefix();
    let mesh = Mesh::start(&config(&prefix)).await;
    set_budget(&mesh, 10, 0.0).await;
    let mut request: CompleteRequest = complete(PRICED, "too expensive");
    request.params = Some(GenerationParams {
        max_tokens: Some(20),
        ..GenerationParams::default()
    });
    let status = mesh.router().complete(request).await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted);
    assert!(mesh.inference_api().sim_requests_for(PRICED).is_empty());
    assert_eq!(settled(&mesh).await.spent_micros, 0);
    mesh.stop().await;
    weir_tests::delete_prefix(&prefix).await;
}
