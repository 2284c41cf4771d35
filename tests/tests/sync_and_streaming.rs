//! Router → inference (sim) over real gRPC: a unary and a streamed answer, and what they report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use tokio_stream::StreamExt;
use weir_proto::{
    common::FinishReason,
    router::{ReviewStatus, ServedBy, complete_stream_response::Event},
};
use weir_tests::{Mesh, complete, complete_stream};

const CONFIG: &str = r#"
[models.sim-a]
sim = { output_tokens = 12 }
[models.sim-b]
sim = { output_tokens = 20 }

[router.routes.auto]
models = ["sim-a", "sim-b"]
"#;

#[tokio::test]
async fn unary_answer_through_a_route() {
    let mesh = Mesh::start(CONFIG).await;
    let response = mesh
        .router()
        .complete(complete("auto", "hello there"))
        .await
        .expect("complete succeeds")
        .into_inner();

    assert_eq!(response.model, "sim-a");
    assert_eq!(response.requested_model, "auto");
    assert_eq!(response.route, "auto");
    assert_eq!(response.served_by(), ServedBy::Primary);
    assert_eq!(response.finish_reason(), FinishReason::Stop);
    assert_eq!(response.review_status(), ReviewStatus::NotRequired);
    let usage = response.usage.expect("usage is always set");
    assert_eq!(usage.output_tokens, 12);
    assert!(usage.input_tokens > 0);
    assert_eq!(usage.total_tokens, usage.input_tokens + usage.output_tokens);
    let text = response.message.expect("message").content;
    assert_eq!(
        weir_mesh::tokens::count_text("sim", &text),
        12,
        "usage counts the answer's tokens: {text:?}"
    );
    mesh.stop().await;
}

#[tokio::test]
async fn same_request_same_answer_and_model_names_bypass_routes() {
    let mesh = Mesh::start(CONFIG).await;
    let mut router = mesh.router();
    let first = router
        .complete(complete("sim-b", "same"))
        .await
        .unwrap()
        .into_inner();
    let second = router
        .complete(complete("sim-b", "same"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        first.message, second.message,
        "the sim model is deterministic"
    );
    assert_eq!(first.model, "sim-b");
    assert_eq!(first.route, "", "a model named directly resolves no route");
    let other = router
        .complete(complete("sim-b", "different"))
        .await
        .unwrap()
        .into_inner();
    assert_ne!(first.message, other.message);
    mesh.stop().await;
}

#[tokio::test]
async fn streamed_answer_matches_the_unary_one() {
    let mesh = Mesh::start(CONFIG).await;
    let mut router = mesh.router();
    let unary = router
        .complete(complete("auto", "stream me"))
        .await
        .unwrap()
        .into_inner();

    let mut stream = router
        .complete_stream(complete_stream("auto", "stream me"))
        .await
        .expect("stream opens")
        .into_inner();
    let mut events = Vec::new();
    while let Some(event) = stream.next().await {
        events.push(event.expect("no stream error").event.expect("event set"));
    }

    let Some(Event::Start(start)) = events.first() else {
        panic!("first event must be start: {events:?}");
    };
    assert_eq!(start.model, "sim-a");
    assert_eq!(start.served_by(), ServedBy::Primary);
    let Some(Event::Done(done)) = events.last() else {
        panic!("last event must be done: {events:?}");
    };
    let deltas: Vec<&str> = events
        .iter()
        .filter_map(|e| match e {
            Event::Delta(d) => Some(d.text.as_str()),
            _ => None,
        })
        .collect();
    assert_eq!(
        deltas.len(),
        12,
        "tokens are relayed one by one, not buffered"
    );
    assert_eq!(deltas.concat(), unary.message.unwrap().content);
    assert_eq!(done.usage, unary.usage);
    assert_eq!(done.finish_reason(), FinishReason::Stop);
    mesh.stop().await;
}

#[tokio::test]
async fn max_tokens_cuts_the_answer_with_finish_reason_length() {
    let mesh = Mesh::start(CONFIG).await;
    let mut request = complete("sim-b", "short please");
    request.params = Some(weir_proto::common::GenerationParams {
        max_tokens: Some(5),
        ..Default::default()
    });
    let response = mesh.router().complete(request).await.unwrap().into_inner();
    assert_eq!(response.finish_reason(), FinishReason::Length);
    assert_eq!(response.usage.unwrap().output_tokens, 5);
    mesh.stop().await;
}
