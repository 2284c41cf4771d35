//! Fallback chains, degraded answers and canaries, across real processes: the router walks a
//! route's models when one fails, says which one served, and never falls back on the caller's own
//! mistakes.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use tokio_stream::StreamExt;
use tonic::Code;
use weir_proto::{
    common::GenerationParams,
    router::{ServedBy, complete_stream_response::Event},
};
use weir_tests::{Mesh, complete, complete_stream, reason};

const CONFIG: &str = r#"
[models.broken]
max_output_tokens = 16
sim = { error_rate = 1.0, error_code = "UNAVAILABLE" }
[models.also-broken]
sim = { error_rate = 1.0, error_code = "RESOURCE_EXHAUSTED", retry_after = "1s" }
[models.healthy]
sim = { output_tokens = 8 }
[models.new]
sim = { output_tokens = 4 }
[models.cut]
sim = { output_tokens = 20, cut_after_tokens = 3 }

[router.routes.chain]
models = ["broken", "also-broken", "healthy"]

[router.routes.degraded]
models = ["broken", "also-broken"]
degraded = { kind = "fixed", text = "We are busy; please try again shortly." }

[router.routes.echo]
models = ["broken"]
degraded = { kind = "echo" }

[router.routes.bare]
models = ["broken", "also-broken"]

[router.routes.cut-first]
models = ["cut", "healthy"]

[router.routes.canary]
models = ["healthy"]
canary = { model = "new", weight = 0.5 }
"#;

#[tokio::test]
async fn failing_models_fall_back_down_the_chain_and_say_so() {
    let mesh = Mesh::start(CONFIG).await;
    let response = mesh
        .router()
        .complete(complete("chain", "hello"))
        .await
        .expect("the third model answers")
        .into_inner();
    assert_eq!(response.model, "healthy");
    assert_eq!(response.served_by(), ServedBy::Fallback);
    let reasons: Vec<&str> = response.notices.iter().map(|n| n.reason.as_str()).collect();
    assert_eq!(reasons, ["FALLBACK_USED", "FALLBACK_USED"]);
    assert!(response.notices[0].message.contains("broken"));
    assert_eq!(response.usage.unwrap().output_tokens, 8);
    mesh.stop().await;
}

#[tokio::test]
async fn streams_fall_back_before_the_first_token() {
    let mesh = Mesh::start(CONFIG).await;
    let mut stream = mesh
        .router()
        .complete_stream(complete_stream("chain", "hello"))
        .await
        .unwrap()
        .into_inner();
    let Some(Ok(first)) = stream.next().await else {
        panic!("a start event");
    };
    let Some(Event::Start(start)) = first.event else {
        panic!("start first");
    };
    assert_eq!(start.model, "healthy");
    assert_eq!(start.served_by(), ServedBy::Fallback);
    let mut done = None;
    while let Some(event) = stream.next().await {
        if let Some(Event::Done(d)) = event.unwrap().event {
            done = Some(d);
        }
    }
    assert_eq!(done.unwrap().notices.len(), 2);
    mesh.stop().await;
}

#[tokio::test]
async fn a_stream_cut_after_its_first_token_ends_with_an_error_not_a_switch() {
    let mesh = Mesh::start(CONFIG).await;
    let mut stream = mesh
        .router()
        .complete_stream(complete_stream("cut-first", "hello"))
        .await
        .unwrap()
        .into_inner();
    let mut deltas = 0;
    let mut error = None;
    while let Some(event) = stream.next().await {
        match event {
            Ok(event) => {
                if let Some(Event::Start(start)) = &event.event {
                    assert_eq!(start.model, "cut");
                }
                if let Some(Event::Delta(_)) = event.event {
                    deltas += 1;
                }
            }
            Err(status) => error = Some(status),
        }
    }
    assert_eq!(deltas, 3);
    let error = error.expect("the stream ends with an explicit error");
    assert_eq!(error.code(), Code::Unavailable);
    assert_eq!(reason(&error), "STREAM_CUT");
    mesh.stop().await;
}

#[tokio::test]
async fn every_model_failing_serves_the_degraded_answer_marked_as_such() {
    let mesh = Mesh::start(CONFIG).await;
    let mut router = mesh.router();
    let response = router
        .complete(complete("degraded", "hello"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(response.served_by(), ServedBy::Degraded);
    assert_eq!(
        response.message.unwrap().content,
        "We are busy; please try again shortly."
    );
    assert_eq!(response.model, "");
    assert_eq!(response.notices.last().unwrap().reason, "DEGRADED");

    let echoed = router
        .complete(complete("echo", "translate me"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(echoed.served_by(), ServedBy::Degraded);
    assert_eq!(echoed.message.unwrap().content, "translate me");

    let mut stream = router
        .complete_stream(complete_stream("degraded", "hello"))
        .await
        .unwrap()
        .into_inner();
    let mut text = String::new();
    let mut served_by = None;
    while let Some(event) = stream.next().await {
        match event.unwrap().event {
            Some(Event::Start(start)) => served_by = Some(start.served_by()),
            Some(Event::Delta(delta)) => text.push_str(&delta.text),
            _ => {}
        }
    }
    assert_eq!(served_by, Some(ServedBy::Degraded));
    assert_eq!(text, "We are busy; please try again shortly.");
    mesh.stop().await;
}

#[tokio::test]
async fn without_a_degraded_answer_the_last_error_is_returned() {
    let mesh = Mesh::start(CONFIG).await;
    let status = mesh
        .router()
        .complete(complete("bare", "hello"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert_eq!(reason(&status), "SIMULATED_FAULT");
    mesh.stop().await;
}

#[tokio::test]
async fn the_callers_own_mistakes_do_not_fall_back() {
    let mesh = Mesh::start(CONFIG).await;
    let mut request = complete("chain", "hello");
    // Larger than the primary's max_output_tokens (16): the request is wrong, not the backend.
    request.params = Some(GenerationParams {
        max_tokens: Some(100),
        ..Default::default()
    });
    let status = mesh.router().complete(request).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    mesh.stop().await;
}

#[tokio::test]
async fn a_canary_serves_its_share_and_reports_the_served_model() {
    let mesh = Mesh::start(CONFIG).await;
    let mut router = mesh.router();
    let mut served = std::collections::BTreeMap::new();
    for i in 0..20 {
        let response = router
            .complete(complete("canary", &format!("request {i}")))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(response.served_by(), ServedBy::Primary);
        *served.entry(response.model).or_insert(0) += 1;
    }
    assert_eq!(served.get("new"), Some(&10), "{served:?}");
    assert_eq!(served.get("healthy"), Some(&10), "{served:?}");
    mesh.stop().await;
}
