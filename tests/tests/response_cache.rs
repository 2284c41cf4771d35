//! The router's response cache, end to end: real router, inference and budget services on real
//! sockets, cache entries and budgets on a real Redis.
//!
//! "A model call" is a request the inference service's simulated model received
//! (`sim_requests`); a hit is an answer carrying the `CACHE_HIT` notice.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use tokio_stream::StreamExt;
use weir_proto::{
    common::GenerationParams,
    router::{
        CompleteRequest, CompleteResponse, CompleteStreamRequest, complete_stream_response::Event,
    },
};
use weir_tests::{
    Mesh, complete, complete_stream, delete_prefix, eventually, redis_url, tenant_spend,
    unique_prefix, with_key,
};

const ACME: &str = "acme-key-0123456789";
const GLOBEX: &str = "globex-key-0123456789";
const MODEL: &str = "sim-cached";

/// `[router.cache]` on Redis under `prefix`, with `extra` settings, budgets on.
fn config(prefix: &str, extra: &str) -> String {
    config_on(prefix, &redis_url(), extra)
}

fn config_on(prefix: &str, cache_redis: &str, extra: &str) -> String {
    format!(
        r#"
[models.{MODEL}]
sim = {{ output_tokens = 12 }}
price = {{ input_micros_per_mtok = 1000000, output_micros_per_mtok = 1000000 }}

[[auth.api_keys]]
tenant = "acme"
key = "{ACME}"
[[auth.api_keys]]
tenant = "globex"
key = "{GLOBEX}"

[router]
budget_url = "http://127.0.0.1:50054"   # replaced by the budget service started with it
session_url = ""
[router.rate_limit]
enabled = false
[router.cache]
enabled = true
redis_url = "{cache_redis}"
key_prefix = "{prefix}"
{extra}

[budget]
redis_url = "{redis}"
key_prefix = "{prefix}"
"#,
        redis = redis_url()
    )
}

/// A deterministic request (temperature 0).
fn deterministic(text: &str) -> CompleteRequest {
    let mut request = complete(MODEL, text);
    request.params = Some(GenerationParams {
        temperature: Some(0.0),
        ..GenerationParams::default()
    });
    request
}

fn model_calls(mesh: &Mesh) -> usize {
    mesh.inference_api().sim_requests_for(MODEL).len()
}

fn is_hit(response: &CompleteResponse) -> bool {
    response.notices.iter().any(|n| n.reason == "CACHE_HIT")
}

fn text(response: &CompleteResponse) -> String {
    response.message.as_ref().unwrap().content.clone()
}

async fn ask(mesh: &Mesh, key: &str, request: CompleteRequest) -> CompleteResponse {
    ask_with(mesh, key, request, None).await
}

async fn ask_with(
    mesh: &Mesh,
    key: &str,
    request: CompleteRequest,
    control: Option<&str>,
) -> CompleteResponse {
    let mut request = with_key(request, key);
    if let Some(control) = control {
        request
            .metadata_mut()
            .insert("weir-cache", control.parse().unwrap());
    }
    mesh.router()
        .complete(request)
        .await
        .expect("Complete")
        .into_inner()
}

#[tokio::test]
async fn an_identical_deterministic_request_is_answered_without_a_model_call_or_a_charge() {
    let prefix = unique_prefix();
    let mesh = Mesh::start(&config(&prefix, "")).await;

    let first = ask(&mesh, ACME, deterministic("the capital of France?")).await;
    assert!(!is_hit(&first));
    assert!(first.cost_micros > 0);
    assert_eq!(model_calls(&mesh), 1);
    let spent = tenant_spend(&mesh, ACME).await;
    assert_eq!(spent, first.cost_micros);

    let mut again = deterministic("the capital of France?");
    again.request_id = "another-id".to_string(); // not part of the key
    let second = ask(&mesh, ACME, again).await;
    assert!(is_hit(&second), "{:?}", second.notices);
    assert_eq!(model_calls(&mesh), 1, "no model call for a hit");
    assert_eq!(text(&second), text(&first));
    assert_eq!(second.model, first.model);
    assert_eq!(second.usage, first.usage);
    assert_eq!(second.cost_micros, 0);
    assert_eq!(tenant_spend(&mesh, ACME).await, spent, "a hit is free");

    // Another tenant's identical request is its own.
    let other = ask(&mesh, GLOBEX, deterministic("the capital of France?")).await;
    assert!(!is_hit(&other));
    assert_eq!(model_calls(&mesh), 2);
    assert!(is_hit(
        &ask(&mesh, GLOBEX, deterministic("the capital of France?")).await
    ));
    assert_eq!(model_calls(&mesh), 2);

    mesh.stop().await;
    delete_prefix(&prefix).await;
}

#[tokio::test]
async fn non_deterministic_requests_are_not_cached() {
    let prefix = unique_prefix();
    let mesh = Mesh::start(&config(&prefix, "")).await;
    // No temperature: the model's default, not 0.
    for _ in 0..2 {
        assert!(!is_hit(&ask(&mesh, ACME, complete(MODEL, "a poem")).await));
    }
    let mut warm = deterministic("a poem");
    warm.params.as_mut().unwrap().temperature = Some(0.8);
    for _ in 0..2 {
        assert!(!is_hit(&ask(&mesh, ACME, warm.clone()).await));
    }
    assert_eq!(model_calls(&mesh), 4);
    // A fixed seed makes it deterministic.
    warm.params.as_mut().unwrap().seed = Some(42);
    ask(&mesh, ACME, warm.clone()).await;
    assert!(is_hit(&ask(&mesh, ACME, warm).await));
    assert_eq!(model_calls(&mesh), 5);
    mesh.stop().await;
    delete_prefix(&prefix).await;
}

/// The text, the `done` notices and cost of one `CompleteStream`.
async fn stream(mesh: &Mesh, request: CompleteStreamRequest) -> (String, Vec<String>, i64) {
    let mut events = mesh
        .router()
        .complete_stream(with_key(request, ACME))
        .await
        .expect("CompleteStream")
        .into_inner();
    let (mut text, mut notices, mut cost) = (String::new(), Vec::new(), -1);
    while let Some(event) = events.next().await {
        match event.expect("event").event {
            Some(Event::Delta(delta)) => text.push_str(&delta.text),
            Some(Event::Done(done)) => {
                notices = done.notices.into_iter().map(|n| n.reason).collect();
                cost = done.cost_micros;
            }
            _ => {}
        }
    }
    (text, notices, cost)
}

#[tokio::test]
async fn a_stream_hit_replays_the_same_text_as_a_stream() {
    let prefix = unique_prefix();
    let mesh = Mesh::start(&config(&prefix, "")).await;
    let mut request = complete_stream(MODEL, "count to five");
    request.params = Some(GenerationParams {
        temperature: Some(0.0),
        ..GenerationParams::default()
    });
    let (first, notices, cost) = stream(&mesh, request.clone()).await;
    assert!(!first.is_empty());
    assert!(!notices.contains(&"CACHE_HIT".to_string()));
    assert!(cost > 0);
    let (second, notices, cost) = stream(&mesh, request).await;
    assert_eq!(second, first);
    assert_eq!(notices, ["CACHE_HIT"]);
    assert_eq!(cost, 0);
    assert_eq!(model_calls(&mesh), 1);
    mesh.stop().await;
    delete_prefix(&prefix).await;
}

#[tokio::test]
async fn a_cache_on_an_unreachable_redis_serves_normally() {
    let prefix = unique_prefix();
    let mesh = Mesh::start(&config_on(&prefix, "redis://127.0.0.1:1", "")).await;
    for _ in 0..3 {
        let response = ask(&mesh, ACME, deterministic("still there?")).await;
        assert!(!is_hit(&response));
        assert!(!text(&response).is_empty());
    }
    assert_eq!(model_calls(&mesh), 3);
    mesh.stop().await;
    delete_prefix(&prefix).await;
}

#[tokio::test]
async fn bypass_skips_the_cache_and_refresh_replaces_the_entry() {
    let prefix = unique_prefix();
    let mesh = Mesh::start(&config(&prefix, "ttl = \"3s\"")).await;
    let request = deterministic("fresh please");
    ask(&mesh, ACME, request.clone()).await;
    let stored_at = tokio::time::Instant::now();
    assert_eq!(model_calls(&mesh), 1);

    let bypassed = ask_with(&mesh, ACME, request.clone(), Some("bypass")).await;
    assert!(!is_hit(&bypassed));
    assert_eq!(model_calls(&mesh), 2, "bypass asks the model");
    assert!(
        is_hit(&ask(&mesh, ACME, request.clone()).await),
        "entry kept"
    );
    assert_eq!(model_calls(&mesh), 2);

    // Refresh halfway through the entry's life: the model is asked and the entry replaced, so it
    // is still served after the first one would have expired.
    tokio::time::sleep_until(stored_at + Duration::from_millis(1500)).await;
    let refreshed = ask_with(&mesh, ACME, request.clone(), Some("refresh")).await;
    assert!(!is_hit(&refreshed));
    assert_eq!(model_calls(&mesh), 3, "refresh asks the model");
    tokio::time::sleep_until(stored_at + Duration::from_millis(3500)).await;
    assert!(
        is_hit(&ask(&mesh, ACME, request).await),
        "the refreshed entry"
    );
    assert_eq!(model_calls(&mesh), 3);
    mesh.stop().await;
    delete_prefix(&prefix).await;
}

#[tokio::test]
async fn an_entry_over_max_entry_bytes_is_not_stored() {
    let prefix = unique_prefix();
    let mesh = Mesh::start(&config(&prefix, "max_entry_bytes = 64")).await;
    for _ in 0..2 {
        assert!(!is_hit(
            &ask(&mesh, ACME, deterministic("too big to keep")).await
        ));
    }
    assert_eq!(model_calls(&mesh), 2);
    mesh.stop().await;
    delete_prefix(&prefix).await;
}

#[tokio::test]
async fn an_entry_expires_after_its_ttl() {
    let prefix = unique_prefix();
    let mesh = Mesh::start(&config(&prefix, "ttl = \"1s\"")).await;
    let request = deterministic("brief");
    ask(&mesh, ACME, request.clone()).await;
    assert!(is_hit(&ask(&mesh, ACME, request.clone()).await));
    let expired = eventually(Duration::from_secs(5), || {
        let (mesh, request) = (&mesh, request.clone());
        async move {
            tokio::time::sleep(Duration::from_millis(200)).await;
            !is_hit(&ask(mesh, ACME, request).await)
        }
    })
    .await;
    assert!(expired, "the entry is a miss once its ttl passed");
    assert_eq!(model_calls(&mesh), 2);
    mesh.stop().await;
    delete_prefix(&prefix).await;
}

#[tokio::test]
async fn the_http_edge_is_cached_too_and_forwards_the_control_header() {
    let prefix = unique_prefix();
    let mesh = Mesh::start(&config(&prefix, "")).await;
    let http = reqwest::Client::new();
    let body = serde_json::json!({
        "model": MODEL,
        "temperature": 0,
        "messages": [{"role": "user", "content": "over HTTP"}],
    });
    let post = |control: Option<&str>| {
        let mut request = http
            .post(format!("{}/chat/completions", mesh.openai_url()))
            .bearer_auth(ACME)
            .json(&body);
        if let Some(control) = control {
            request = request.header("weir-cache", control);
        }
        async move {
            let answer: serde_json::Value = request.send().await.unwrap().json().await.unwrap();
            answer["weir"]["notices"]
                .as_array()
                .is_some_and(|n| n.iter().any(|n| n["reason"] == "CACHE_HIT"))
        }
    };
    assert!(!post(None).await);
    assert!(post(None).await, "the second is a hit");
    assert_eq!(model_calls(&mesh), 1);
    assert!(!post(Some("bypass")).await);
    assert_eq!(model_calls(&mesh), 2, "the header reached the router");
    mesh.stop().await;
    delete_prefix(&prefix).await;
}

#[tokio::test]
async fn a_hit_is_charged_the_cached_price_fraction_of_its_usage() {
    let prefix = unique_prefix();
    let mesh = Mesh::start(&config(&prefix, "cached_price_fraction = 0.5")).await;
    let first = ask(&mesh, ACME, deterministic("half price")).await;
    let hit = ask(&mesh, ACME, deterministic("half price")).await;
    assert!(is_hit(&hit));
    assert_eq!(model_calls(&mesh), 1);
    let usage = first.usage.unwrap();
    // One micro-USD per token: half the tokens, each half rounded.
    let half = |n: i64| (n as f64 * 0.5).round() as i64;
    assert_eq!(
        hit.cost_micros,
        half(usage.input_tokens) + half(usage.output_tokens)
    );
    assert!(hit.cost_micros > 0 && hit.cost_micros < first.cost_micros);
    assert_eq!(
        tenant_spend(&mesh, ACME).await,
        first.cost_micros + hit.cost_micros
    );
    mesh.stop().await;
    delete_prefix(&prefix).await;
}
