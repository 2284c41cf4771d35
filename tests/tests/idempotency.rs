//! Idempotency and exact settlement through the router, end to end: real router, inference and
//! budget services on real sockets, idempotency records and budgets on a real Redis.
//!
//! "One model call" is what the inference service's simulated model received; "one charge" is
//! what the budget service recorded.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use tokio_stream::StreamExt;
use tonic::Code;
use weir::stack::Service;
use weir_proto::{
    budget::{GetSpendRequest, Scope, ScopeKind},
    router::{
        CompleteRequest, CompleteResponse, CompleteStreamResponse, complete_stream_response::Event,
    },
};
use weir_tests::{Mesh, complete, complete_stream, eventually, reason, redis_url, unique_prefix};

/// One micro-USD per token, so a cost is a token count.
const PRICE: &str = "price = { input_micros_per_mtok = 1000000, output_micros_per_mtok = 1000000 }";

fn config(prefix: &str) -> String {
    format!(
        r#"
[models.sim-priced]
sim = {{ output_tokens = 12, time_to_first_token = "50ms" }}
{PRICE}
[models.sim-slow]
sim = {{ output_tokens = 40, tokens_per_second = 20.0 }}
{PRICE}
[models.sim-late]
sim = {{ output_tokens = 12, time_to_first_token = "400ms" }}
{PRICE}

[router]
budget_url = "http://127.0.0.1:50054"   # replaced by the budget service started with it
session_url = ""

[router.rate_limit]
enabled = false

[router.idempotency]
redis_url = "{redis}"
key_prefix = "{prefix}"

[budget]
redis_url = "{redis}"
key_prefix = "{prefix}"
"#,
        redis = redis_url()
    )
}

fn with_id(request_id: &str, text: &str) -> CompleteRequest {
    let mut request = complete("sim-priced", text);
    request.request_id = request_id.to_string();
    request
}

/// The model calls the simulated model has received with this `request_id`.
fn model_calls(mesh: &Mesh, request_id: &str) -> usize {
    mesh.inference_api()
        .sim_requests()
        .iter()
        .filter(|r| r.request_id == request_id)
        .count()
}

async fn spent(mesh: &Mesh) -> i64 {
    mesh.budget()
        .get_spend(GetSpendRequest {
            scope: Some(Scope {
                kind: ScopeKind::Tenant.into(),
                id: String::new(),
            }),
            ..GetSpendRequest::default()
        })
        .await
        .unwrap()
        .into_inner()
        .total_micros
}

/// An answer without its notices (a replay adds one).
fn without_notices(mut response: CompleteResponse) -> CompleteResponse {
    response.notices.clear();
    response
}

fn reasons(response: &CompleteResponse) -> Vec<&str> {
    response.notices.iter().map(|n| n.reason.as_str()).collect()
}

#[tokio::test]
async fn the_same_request_id_twice_runs_once_is_charged_once_and_answers_the_same() {
    let mesh = Mesh::start(&config(&unique_prefix())).await;
    let mut router = mesh.router();
    let first = router
        .complete(with_id("twice", "how much"))
        .await
        .unwrap()
        .into_inner();
    let second = router
        .complete(with_id("twice", "how much"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(model_calls(&mesh, "twice"), 1, "one model call");
    assert!(first.cost_micros > 0);
    assert_eq!(spent(&mesh).await, first.cost_micros, "one charge");
    assert_eq!(reasons(&second), ["IDEMPOTENT_REPLAY"]);
    assert_eq!(without_notices(second), without_notices(first));

    // The same id with another request is refused, and runs nothing.
    let status = router
        .complete(with_id("twice", "something else"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert_eq!(reason(&status), "IDEMPOTENCY_KEY_REUSED");
    assert_eq!(model_calls(&mesh, "twice"), 1);

    // A malformed id is refused before anything else happens.
    let status = router
        .complete(with_id("has spaces", "how much"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert_eq!(mesh.inference_api().sim_requests().len(), 1);
    mesh.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_concurrent_duplicates_make_one_model_call_and_get_one_answer() {
    let mesh = Mesh::start(&config(&unique_prefix())).await;
    let mut tasks = Vec::new();
    for _ in 0..50 {
        let mut router = mesh.router();
        tasks.push(tokio::spawn(async move {
            router.complete(with_id("fifty", "all at once")).await
        }));
    }
    let mut answers = Vec::new();
    for task in tasks {
        answers.push(without_notices(task.await.unwrap().unwrap().into_inner()));
    }
    assert_eq!(model_calls(&mesh, "fifty"), 1);
    assert!(
        answers.windows(2).all(|pair| pair[0] == pair[1]),
        "one answer"
    );
    assert_eq!(spent(&mesh).await, answers[0].cost_micros);
    mesh.stop().await;
}

#[tokio::test]
async fn two_routers_sharing_redis_run_a_duplicate_once_and_a_restarted_router_replays_it() {
    let toml = config(&unique_prefix());
    let a = Mesh::start(&toml).await;
    let (inference_url, budget_url) = (a.url(Service::Inference), a.url(Service::Budget));
    let second_router = |inference_url: String, budget_url: String| {
        Mesh::start_with(&toml, &[Service::Router], move |c| {
            c.router.inference_url = inference_url;
            c.router.budget_url = budget_url;
        })
    };
    let b = second_router(inference_url.clone(), budget_url.clone()).await;
    let (mut router_a, mut router_b) = (a.router(), b.router());
    let (first, second) = tokio::join!(
        router_a.complete(with_id("shared", "one of two")),
        router_b.complete(with_id("shared", "one of two")),
    );
    let (first, second) = (first.unwrap().into_inner(), second.unwrap().into_inner());
    assert_eq!(
        model_calls(&a, "shared"),
        1,
        "one model call across two routers"
    );
    assert_eq!(without_notices(first.clone()), without_notices(second));

    // A router started after both are gone still has the record.
    b.stop().await;
    let c = second_router(inference_url, budget_url).await;
    let replayed = c
        .router()
        .complete(with_id("shared", "one of two"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reasons(&replayed), ["IDEMPOTENT_REPLAY"]);
    assert_eq!(without_notices(replayed), without_notices(first));
    assert_eq!(model_calls(&a, "shared"), 1);
    c.stop().await;
    a.stop().await;
}

async fn collect(mesh: &Mesh, request_id: &str) -> Vec<CompleteStreamResponse> {
    let mut request = complete_stream("sim-slow", "stream it");
    request.request_id = request_id.to_string();
    let mut stream = mesh
        .router()
        .complete_stream(request)
        .await
        .unwrap()
        .into_inner();
    let mut events = Vec::new();
    while let Some(event) = stream.next().await {
        events.push(event.unwrap());
    }
    events
}

#[tokio::test]
async fn a_streamed_request_is_replayed_event_for_event() {
    let mesh = Mesh::start(&config(&unique_prefix())).await;
    let first = collect(&mesh, "stream-1").await;
    let mut second = collect(&mesh, "stream-1").await;
    assert_eq!(model_calls(&mesh, "stream-1"), 1);
    assert_eq!(first.len(), 42, "start, 40 deltas, done");
    // The replay's done carries one notice more; everything else is the same, in order.
    let Some(Event::Done(done)) = second.last_mut().and_then(|e| e.event.as_mut()) else {
        panic!("the replay ends with done");
    };
    let notice = done.notices.pop().unwrap();
    assert_eq!(notice.reason, "IDEMPOTENT_REPLAY");
    assert_eq!(second, first);
    let Some(Event::Done(done)) = first.last().and_then(|e| e.event.as_ref()) else {
        panic!()
    };
    assert_eq!(spent(&mesh).await, done.cost_micros, "charged once");
    mesh.stop().await;
}

#[tokio::test]
async fn a_deadline_that_passes_after_the_model_ran_still_charges_the_prompt() {
    let mesh = Mesh::start(&config(&unique_prefix())).await;
    // The model takes 400 ms to its first token; the caller gives it 200 ms: long enough to reach
    // the model on a loaded machine, far too short for an answer.
    let mut request = tonic::Request::new(complete("sim-late", "too impatient"));
    request.set_timeout(Duration::from_millis(200));
    let status = mesh.router().complete(request).await.unwrap_err();
    // The router's DEADLINE_EXCEEDED, or the client's own timer if it fires first.
    assert!(
        matches!(status.code(), Code::DeadlineExceeded | Code::Cancelled),
        "{status:?}"
    );
    assert!(
        eventually(Duration::from_secs(5), || async {
            mesh.inference_api().sim_requests().len() == 1
        })
        .await,
        "the model was called"
    );
    assert!(
        eventually(Duration::from_secs(10), || async { spent(&mesh).await > 0 }).await,
        "the prompt is charged"
    );
    let charged = spent(&mesh).await;
    // What the same prompt costs when it is answered: its input tokens, and output on top.
    let answered = mesh
        .router()
        .complete(complete("sim-late", "too impatient"))
        .await
        .unwrap()
        .into_inner();
    let usage = answered.usage.unwrap();
    assert_eq!(
        charged, usage.input_tokens,
        "the prompt's tokens at one micro-USD each, and nothing generated in time"
    );
    mesh.stop().await;
}

#[tokio::test]
async fn a_model_the_budget_service_cannot_price_is_refused_before_it_runs() {
    let prefix = unique_prefix();
    // The budget service's catalog lacks sim-new (a roll-out in progress); the router's has it.
    let budget = Mesh::start_services(&config(&prefix), &[Service::Budget]).await;
    let budget_url = budget.url(Service::Budget);
    let router_toml = format!(
        "{}\n[models.sim-new]\nsim = {{ output_tokens = 12 }}\n{PRICE}\n",
        config(&prefix)
    );
    let front = Mesh::start_with(&router_toml, &[Service::Inference, Service::Router], |c| {
        c.router.budget_url = budget_url;
    })
    .await;
    let status = front
        .router()
        .complete(complete("sim-new", "new model"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert_eq!(reason(&status), "PRICE_UNKNOWN");
    assert!(status.message().contains("sim-new"), "{status:?}");
    assert!(
        front.inference_api().sim_requests().is_empty(),
        "no model ran"
    );
    assert_eq!(spent(&budget).await, 0);
    front.stop().await;
    budget.stop().await;
}
