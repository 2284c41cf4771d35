//! A request retried on another router after the first one died is paid once.
//!
//! A router that dies after its `Commit`, before it recorded the answer under the request's
//! `request_id`, leaves nothing for a retry to replay: the retry, on another replica, runs the
//! request again. Its reservation id derives from the tenant, the `request_id` and the model, so
//! it finds the first attempt's committed reservation and its `Commit` replays the first charge.
//! The test makes that situation without killing anything: two routers share the budget service
//! but not their idempotency records (each keeps its own in memory), so the second router has no
//! record of what the first answered, exactly as after a crash.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use weir::stack::Service;
use weir_proto::{
    budget::{GetSpendRequest, Scope, ScopeKind},
    router::CompleteRequest,
    session::{CreateSessionRequest, ListTurnsRequest},
};
use weir_tests::{Mesh, complete, redis_url, unique_prefix};

/// One micro-USD per token, so a cost is a token count.
fn config(prefix: &str) -> String {
    format!(
        r#"
[models.sim-priced]
sim = {{ output_tokens = 12 }}
price = {{ input_micros_per_mtok = 1000000, output_micros_per_mtok = 1000000 }}

[router]
budget_url = "http://127.0.0.1:50054"   # replaced by the budget service started with it

[router.rate_limit]
enabled = false

[budget]
redis_url = "{redis}"
key_prefix = "{prefix}"

[session]
redis_url = "{redis}"
key_prefix = "{prefix}"
summarize = false
default_model = "sim-priced"
"#,
        redis = redis_url()
    )
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
        .expect("GetSpend")
        .into_inner()
        .total_micros
}

fn with_id(request_id: &str, text: &str) -> CompleteRequest {
    CompleteRequest {
        request_id: request_id.to_string(),
        ..complete("sim-priced", text)
    }
}

/// A router of its own (its own in-memory idempotency records) over `a`'s other services.
async fn second_router(toml: &str, a: &Mesh) -> Mesh {
    let (inference, budget, session) = (
        a.url(Service::Inference),
        a.url(Service::Budget),
        a.url(Service::Session),
    );
    Mesh::start_with(toml, &[Service::Router], move |c| {
        c.router.inference_url = inference;
        c.router.budget_url = budget;
        c.router.session_url = session;
    })
    .await
}

#[tokio::test]
async fn a_request_run_again_by_a_router_without_its_record_is_charged_once() {
    let prefix = unique_prefix();
    let toml = config(&prefix);
    let a = Mesh::start(&toml).await;
    let b = second_router(&toml, &a).await;

    let first = a
        .router()
        .complete(with_id("paid-once", "what does a weir do?"))
        .await
        .expect("answered")
        .into_inner();
    assert!(first.cost_micros > 0, "the model call is priced");
    assert_eq!(spent(&a).await, first.cost_micros);

    // Router b has no record of "paid-once": it runs the request again, and pays nothing more.
    let again = b
        .router()
        .complete(with_id("paid-once", "what does a weir do?"))
        .await
        .expect("answered again")
        .into_inner();
    assert_eq!(
        again.cost_micros, first.cost_micros,
        "the same cost is reported"
    );
    assert_eq!(
        spent(&a).await,
        first.cost_micros,
        "the retry's Commit replayed the first charge"
    );

    // The same text under another request_id is another request, paid again; and so is a
    // request without an id each time it is sent.
    let other = b
        .router()
        .complete(with_id("paid-twice", "what does a weir do?"))
        .await
        .expect("answered")
        .into_inner();
    let anonymous = [
        a.router()
            .complete(complete("sim-priced", "what does a weir do?"))
            .await
            .expect("answered")
            .into_inner(),
        b.router()
            .complete(complete("sim-priced", "what does a weir do?"))
            .await
            .expect("answered")
            .into_inner(),
    ];
    assert_eq!(
        spent(&a).await,
        first.cost_micros + other.cost_micros + anonymous[0].cost_micros + anonymous[1].cost_micros,
        "distinct requests are each paid"
    );

    b.stop().await;
    a.stop().await;
    weir_tests::delete_prefix(&prefix).await;
}

#[tokio::test]
async fn a_session_request_run_again_sees_the_same_context_and_is_charged_once() {
    let prefix = unique_prefix();
    let toml = config(&prefix);
    let a = Mesh::start(&toml).await;
    let b = second_router(&toml, &a).await;
    a.session()
        .create_session(CreateSessionRequest {
            session_id: "conv".to_string(),
            ..CreateSessionRequest::default()
        })
        .await
        .expect("session created");
    let turn = |id: &str, text: &str| CompleteRequest {
        session_id: "conv".to_string(),
        ..with_id(id, text)
    };
    a.router()
        .complete(turn("t1", "what does a weir do?"))
        .await
        .expect("first turn");
    let first = a
        .router()
        .complete(turn("t2", "and a dam?"))
        .await
        .expect("second turn")
        .into_inner();
    let spent_before = spent(&a).await;

    // Router b runs t2 again: its first attempt's turns are stored already, and must not become
    // part of its own context (they would change the prompt, the answer and the price).
    let again = b
        .router()
        .complete(turn("t2", "and a dam?"))
        .await
        .expect("answered again")
        .into_inner();
    assert_eq!(
        again.usage, first.usage,
        "the same prompt as the first attempt's, so the same usage"
    );
    assert_eq!(again.message, first.message, "the same answer");
    assert_eq!(spent(&a).await, spent_before, "nothing charged again");
    let turns = a
        .session()
        .list_turns(ListTurnsRequest {
            session_id: "conv".to_string(),
            ..ListTurnsRequest::default()
        })
        .await
        .expect("turns")
        .into_inner()
        .turns;
    assert_eq!(turns.len(), 4, "two questions and two answers, none twice");

    b.stop().await;
    a.stop().await;
    weir_tests::delete_prefix(&prefix).await;
}
