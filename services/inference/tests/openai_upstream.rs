//! The `openai` backend against a real HTTP server speaking the chat completions protocol, called
//! over real gRPC: answers, usage, error statuses with their `google.rpc` details, deadlines, and
//! cancellation reaching the upstream.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::Duration,
};

use axum::{
    Json, Router,
    body::Body,
    extract::State,
    http::{HeaderMap, StatusCode, header},
    response::{IntoResponse, Response},
    routing::post,
};
use bytes::Bytes;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;
use tonic::{Code, Request, transport::Channel};
use tonic_types::StatusExt;
use weir_inference::{Config, server};
use weir_mesh::{
    catalog::{BackendKind, Catalog, ModelSpec, OpenAiSpec},
    tokens,
};
use weir_proto::{
    common::{FinishReason, GenerationParams, Message, Role},
    inference::{
        GenerateRequest, GenerateStreamRequest, generate_stream_response::Event,
        inference_service_client::InferenceServiceClient,
    },
};

/// An environment variable every `cargo test` run has, standing in for an API key (tests cannot
/// set variables: that is unsafe in edition 2024 and the workspace forbids unsafe code).
const KEY_ENV: &str = "CARGO_PKG_NAME";

/// What the fake upstream saw and did.
#[derive(Default)]
struct Upstream {
    /// Bodies and `Authorization` headers of the requests received.
    requests: Mutex<Vec<(Value, Option<String>)>>,
    /// Set when an endless stream's body is dropped (the client went away).
    endless_dropped: AtomicBool,
    /// Endless streams started.
    endless_started: AtomicUsize,
}

/// Drops with the response body of an endless stream.
struct DropFlag(Arc<Upstream>);

impl Drop for DropFlag {
    fn drop(&mut self) {
        self.0.endless_dropped.store(true, Ordering::SeqCst);
    }
}

fn chunk(content: Option<&str>, finish: Option<&str>) -> String {
    let delta = match content {
        Some(text) => json!({ "content": text }),
        None => json!({ "role": "assistant" }),
    };
    let body = json!({
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "choices": [{ "index": 0, "delta": delta, "finish_reason": finish }],
    });
    format!("data: {body}\r\n\r\n")
}

fn error_body(message: &str, param: Option<&str>) -> Value {
    json!({ "error": { "message": message, "type": "invalid_request_error", "param": param, "code": null } })
}

fn sse(chunks: Vec<String>) -> Response {
    let stream = futures::stream::iter(
        chunks
            .into_iter()
            .map(|c| Ok::<_, std::convert::Infallible>(Bytes::from(c))),
    );
    (
        [(header::CONTENT_TYPE, "text/event-stream")],
        Body::from_stream(stream),
    )
        .into_response()
}

async fn chat(
    State(upstream): State<Arc<Upstream>>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    let auth = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    upstream.requests.lock().unwrap().push((body.clone(), auth));
    let stream = body["stream"].as_bool().unwrap_or(false);
    let usage = json!({
        "prompt_tokens": 9, "completion_tokens": 3, "total_tokens": 12,
        "prompt_tokens_details": { "cached_tokens": 2 }
    });
    match body["model"].as_str().unwrap_or("") {
        "ok" | "no-usage" if !stream => {
            let mut completion = json!({
                "id": "chatcmpl-1",
                "object": "chat.completion",
                "choices": [{
                    "index": 0,
                    "message": { "role": "assistant", "content": "Hello world" },
                    "finish_reason": "stop"
                }],
            });
            if body["model"] == "ok" {
                completion["usage"] = usage;
            }
            Json(completion).into_response()
        }
        model @ ("ok" | "no-usage") => {
            let mut chunks = vec![
                ": connected\n\n".to_string(),
                chunk(None, None),
                chunk(Some("Hel"), None),
                chunk(Some("lo"), None),
                chunk(Some(" world"), Some("stop")),
            ];
            if model == "ok" {
                chunks.push(format!(
                    "data: {}\n\n",
                    json!({ "choices": [], "usage": usage })
                ));
            }
            chunks.push("data: [DONE]\n\n".to_string());
            // Split the body at awkward places: inside `data:`, inside JSON, between \r and \n.
            let body: String = chunks.concat();
            let bytes = body.into_bytes();
            let pieces = [3, 17, 60, 61, 62, 140, 141]
                .into_iter()
                .filter(|&at| at < bytes.len())
                .chain([bytes.len()])
                .scan(0, |start, end| {
                    let piece = String::from_utf8_lossy(&bytes[*start..end]).into_owned();
                    *start = end;
                    Some(piece)
                })
                .collect();
            sse(pieces)
        }
        "cut" => sse(vec![chunk(Some("par"), None), chunk(Some("tial"), None)]),
        "endless" => {
            upstream.endless_started.fetch_add(1, Ordering::SeqCst);
            let flag = DropFlag(upstream.clone());
            let stream = futures::stream::unfold((0u64, flag), |(n, flag)| async move {
                if n > 0 {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                let piece = chunk(Some(&format!(" t{n}")), None);
                Some((
                    Ok::<_, std::convert::Infallible>(Bytes::from(piece)),
                    (n + 1, flag),
                ))
            });
            (
                [(header::CONTENT_TYPE, "text/event-stream")],
                Body::from_stream(stream),
            )
                .into_response()
        }
        "slow" => {
            tokio::time::sleep(Duration::from_secs(30)).await;
            StatusCode::OK.into_response()
        }
        "e500" => (
            StatusCode::INTERNAL_SERVER_ERROR,
            Json(error_body("the upstream fell over", None)),
        )
            .into_response(),
        "e429" => (
            StatusCode::TOO_MANY_REQUESTS,
            [(header::RETRY_AFTER, "2")],
            Json(error_body("Rate limit reached for requests", None)),
        )
            .into_response(),
        "e400" => (
            StatusCode::BAD_REQUEST,
            Json(error_body(
                "temperature is too high for this model",
                Some("temperature"),
            )),
        )
            .into_response(),
        "e401" => (
            StatusCode::UNAUTHORIZED,
            Json(error_body("Incorrect API key provided", None)),
        )
            .into_response(),
        other => (
            StatusCode::NOT_FOUND,
            Json(error_body(
                &format!("The model `{other}` does not exist"),
                None,
            )),
        )
            .into_response(),
    }
}

struct Harness {
    client: InferenceServiceClient<Channel>,
    upstream: Arc<Upstream>,
    shutdown: CancellationToken,
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

fn openai_model(base_url: &str, upstream_model: &str, timeout: Duration) -> ModelSpec {
    ModelSpec {
        backend: BackendKind::Openai,
        openai: Some(OpenAiSpec {
            base_url: base_url.to_string(),
            api_key_env: Some(KEY_ENV.to_string()),
            upstream_model: Some(upstream_model.to_string()),
            timeout,
            ..OpenAiSpec::default()
        }),
        ..ModelSpec::default()
    }
}

async fn start() -> Harness {
    let shutdown = CancellationToken::new();
    let upstream = Arc::new(Upstream::default());
    let app = Router::new()
        .route("/v1/chat/completions", post(chat))
        .with_state(upstream.clone());
    let http = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base_url = format!("http://{}/v1", http.local_addr().unwrap());
    {
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            axum::serve(http, app)
                .with_graceful_shutdown(shutdown.cancelled_owned())
                .await
        });
    }

    // A port nothing listens on: bound, then released.
    let closed = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap()
    };
    let mut models: Vec<(String, ModelSpec)> = [
        "ok", "no-usage", "cut", "endless", "e500", "e429", "e400", "e401", "missing",
    ]
    .into_iter()
    .map(|name| {
        (
            format!("gpt-{name}"),
            openai_model(&base_url, name, Duration::from_secs(30)),
        )
    })
    .collect();
    models.push((
        "gpt-slow".to_string(),
        openai_model(&base_url, "slow", Duration::from_millis(300)),
    ));
    models.push((
        "gpt-closed".to_string(),
        openai_model(&format!("http://{closed}/v1"), "ok", Duration::from_secs(5)),
    ));
    let mut no_key = openai_model(&base_url, "ok", Duration::from_secs(5));
    if let Some(openai) = no_key.openai.as_mut() {
        openai.api_key_env = Some("WEIR_TEST_VARIABLE_THAT_IS_NEVER_SET".to_string());
    }
    models.push(("gpt-no-key".to_string(), no_key));
    let catalog = Arc::new(Catalog::new(models));
    catalog.validate().unwrap();

    let grpc = weir_mesh::server::bind(SocketAddr::from(([127, 0, 0, 1], 0)))
        .await
        .unwrap();
    let addr = grpc.local_addr().unwrap();
    tokio::spawn(server(&Config::default(), catalog).serve(grpc, shutdown.clone()));
    let client = InferenceServiceClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    Harness {
        client,
        upstream,
        shutdown,
    }
}

fn messages() -> Vec<Message> {
    vec![
        Message {
            role: Role::System.into(),
            content: "Be brief.".to_string(),
            ..Message::default()
        },
        Message {
            role: Role::User.into(),
            content: "Say hello".to_string(),
            ..Message::default()
        },
    ]
}

fn unary(model: &str) -> GenerateRequest {
    GenerateRequest {
        model: model.to_string(),
        messages: messages(),
        params: Some(GenerationParams {
            max_tokens: Some(50),
            temperature: Some(0.2),
            ..GenerationParams::default()
        }),
        request_id: "req-1".to_string(),
        ..GenerateRequest::default()
    }
}

fn streamed(model: &str) -> GenerateStreamRequest {
    let request = unary(model);
    GenerateStreamRequest {
        model: request.model,
        messages: request.messages,
        params: request.params,
        request_id: request.request_id,
        labels: request.labels,
    }
}

/// Reads a whole stream: the text, the final event, and the error that ended it, if any.
async fn read_stream(
    client: &mut InferenceServiceClient<Channel>,
    request: impl tonic::IntoRequest<GenerateStreamRequest>,
) -> (
    Vec<String>,
    Option<weir_proto::inference::generate_stream_response::Done>,
    Option<tonic::Status>,
) {
    let mut stream = match client.generate_stream(request).await {
        Ok(response) => response.into_inner(),
        Err(status) => return (Vec::new(), None, Some(status)),
    };
    let mut deltas = Vec::new();
    let mut done = None;
    loop {
        match stream.message().await {
            Ok(Some(message)) => match message.event {
                Some(Event::Delta(delta)) => deltas.push(delta.text),
                Some(Event::Done(d)) => done = Some(d),
                None => panic!("empty event"),
            },
            Ok(None) => return (deltas, done, None),
            Err(status) => return (deltas, done, Some(status)),
        }
    }
}

fn reason(status: &tonic::Status) -> String {
    status
        .get_error_details()
        .error_info()
        .map(|info| info.reason.clone())
        .unwrap_or_default()
}

#[tokio::test]
async fn unary_answers_carry_the_upstreams_usage() {
    let mut h = start().await;
    let response = h
        .client
        .generate(unary("gpt-ok"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(response.message.as_ref().unwrap().content, "Hello world");
    assert_eq!(
        response.message.as_ref().unwrap().role,
        i32::from(Role::Assistant)
    );
    assert_eq!(response.finish_reason(), FinishReason::Stop);
    assert_eq!(response.backend, "openai");
    assert_eq!(response.model, "gpt-ok");
    let usage = response.usage.unwrap();
    assert_eq!(
        (
            usage.input_tokens,
            usage.output_tokens,
            usage.cached_input_tokens,
            usage.total_tokens
        ),
        (9, 3, 2, 12)
    );

    let requests = h.upstream.requests.lock().unwrap().clone();
    let (body, auth) = &requests[0];
    assert_eq!(body["model"], "ok");
    assert_eq!(body["max_tokens"], 50);
    assert_eq!(
        body["messages"][0],
        json!({"role": "system", "content": "Be brief."})
    );
    assert_eq!(body["messages"][1]["role"], "user");
    assert!(body.get("stream").is_none());
    let key = std::env::var(KEY_ENV).unwrap();
    assert_eq!(auth.as_deref(), Some(format!("Bearer {key}").as_str()));
}

#[tokio::test]
async fn streamed_answers_relay_each_delta_and_end_with_usage() {
    let mut h = start().await;
    let (deltas, done, error) = read_stream(&mut h.client, streamed("gpt-ok")).await;
    assert!(error.is_none(), "{error:?}");
    assert_eq!(deltas, ["Hel", "lo", " world"]);
    let done = done.unwrap();
    assert_eq!(done.finish_reason(), FinishReason::Stop);
    assert_eq!(done.backend, "openai");
    let usage = done.usage.unwrap();
    assert_eq!(
        (
            usage.input_tokens,
            usage.output_tokens,
            usage.cached_input_tokens
        ),
        (9, 3, 2)
    );
    let requests = h.upstream.requests.lock().unwrap().clone();
    assert_eq!(requests[0].0["stream"], true);
    assert_eq!(requests[0].0["stream_options"]["include_usage"], true);
}

#[tokio::test]
async fn missing_usage_is_estimated() {
    let mut h = start().await;
    let expected_input = i64::from(tokens::count_messages("o200k", &messages()));
    let expected_output = i64::from(tokens::count_text("o200k", "Hello world"));

    let (deltas, done, error) = read_stream(&mut h.client, streamed("gpt-no-usage")).await;
    assert!(error.is_none(), "{error:?}");
    assert_eq!(deltas.concat(), "Hello world");
    let usage = done.unwrap().usage.unwrap();
    assert_eq!(
        (usage.input_tokens, usage.output_tokens),
        (expected_input, expected_output)
    );

    let response = h
        .client
        .generate(unary("gpt-no-usage"))
        .await
        .unwrap()
        .into_inner();
    let usage = response.usage.unwrap();
    assert_eq!(
        (usage.input_tokens, usage.output_tokens),
        (expected_input, expected_output)
    );
}

#[tokio::test]
async fn upstream_500_is_unavailable() {
    let mut h = start().await;
    let status = h.client.generate(unary("gpt-e500")).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);
    assert_eq!(reason(&status), "UPSTREAM_UNAVAILABLE");
    let info = status.get_error_details().error_info().cloned().unwrap();
    assert_eq!(
        info.metadata.get("http_status").map(String::as_str),
        Some("500")
    );
    assert!(status.message().contains("the upstream fell over"));

    let (_, _, error) = read_stream(&mut h.client, streamed("gpt-e500")).await;
    assert_eq!(error.map(|s| s.code()), Some(Code::Unavailable));
}

#[tokio::test]
async fn upstream_429_is_resource_exhausted_with_its_retry_delay() {
    let mut h = start().await;
    let status = h.client.generate(unary("gpt-e429")).await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted);
    assert_eq!(reason(&status), "UPSTREAM_RATE_LIMITED");
    let details = status.get_error_details();
    assert_eq!(
        details.retry_info().and_then(|r| r.retry_delay),
        Some(Duration::from_secs(2))
    );
    assert_eq!(
        details
            .quota_failure()
            .map(|q| q.violations[0].subject.clone()),
        Some("upstream:gpt-e429".to_string())
    );
    assert_eq!(
        weir_mesh::error::pushback(&status),
        Some(Duration::from_secs(2))
    );

    // A stream refused before its first token fails the same way.
    let (deltas, _, error) = read_stream(&mut h.client, streamed("gpt-e429")).await;
    assert!(deltas.is_empty());
    let error = error.unwrap();
    assert_eq!(error.code(), Code::ResourceExhausted);
    assert_eq!(
        error
            .get_error_details()
            .retry_info()
            .and_then(|r| r.retry_delay),
        Some(Duration::from_secs(2))
    );
}

#[tokio::test]
async fn upstream_400_is_invalid_argument_with_the_upstreams_message() {
    let mut h = start().await;
    let status = h.client.generate(unary("gpt-e400")).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert_eq!(reason(&status), "UPSTREAM_REJECTED");
    assert!(
        status
            .message()
            .contains("temperature is too high for this model"),
        "{}",
        status.message()
    );
    let details = status.get_error_details();
    let violation = details.bad_request().unwrap().field_violations[0].clone();
    assert_eq!(violation.field, "temperature");
    assert_eq!(
        violation.description,
        "temperature is too high for this model"
    );
}

#[tokio::test]
async fn auth_and_model_errors_tell_the_operator() {
    let mut h = start().await;
    let status = h.client.generate(unary("gpt-e401")).await.unwrap_err();
    assert_eq!(
        (status.code(), reason(&status).as_str()),
        (Code::Unavailable, "UPSTREAM_AUTH_FAILED")
    );
    assert!(status.message().contains(KEY_ENV));

    let status = h.client.generate(unary("gpt-missing")).await.unwrap_err();
    assert_eq!(
        (status.code(), reason(&status).as_str()),
        (Code::FailedPrecondition, "UPSTREAM_MODEL_NOT_FOUND")
    );

    let status = h.client.generate(unary("gpt-no-key")).await.unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert!(
        status
            .message()
            .contains("WEIR_TEST_VARIABLE_THAT_IS_NEVER_SET")
    );
}

#[tokio::test]
async fn unreachable_and_slow_upstreams_are_unavailable() {
    let mut h = start().await;
    let status = h.client.generate(unary("gpt-closed")).await.unwrap_err();
    assert_eq!(
        (status.code(), reason(&status).as_str()),
        (Code::Unavailable, "UPSTREAM_UNREACHABLE")
    );

    // The model's 300 ms timeout, with no caller deadline.
    let started = std::time::Instant::now();
    let status = h.client.generate(unary("gpt-slow")).await.unwrap_err();
    assert_eq!(
        (status.code(), reason(&status).as_str()),
        (Code::Unavailable, "UPSTREAM_TIMEOUT")
    );
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[tokio::test]
async fn a_stream_cut_before_its_end_fails_after_its_deltas() {
    let mut h = start().await;
    let (deltas, done, error) = read_stream(&mut h.client, streamed("gpt-cut")).await;
    assert_eq!(deltas, ["par", "tial"]);
    assert!(done.is_none());
    let error = error.unwrap();
    assert_eq!(
        (error.code(), reason(&error).as_str()),
        (Code::Unavailable, "STREAM_CUT")
    );
}

/// Waits up to 5 s for `condition`, polling.
async fn eventually(condition: impl Fn() -> bool) -> bool {
    tokio::time::timeout(Duration::from_secs(5), async {
        while !condition() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .is_ok()
}

#[tokio::test]
async fn cancelling_a_stream_closes_the_upstream_request() {
    let mut h = start().await;
    let mut stream = h
        .client
        .generate_stream(streamed("gpt-endless"))
        .await
        .unwrap()
        .into_inner();
    for expected in [" t0", " t1", " t2"] {
        let message = stream.message().await.unwrap().unwrap();
        let Some(Event::Delta(delta)) = message.event else {
            panic!("expected a delta");
        };
        assert_eq!(delta.text, expected);
    }
    assert!(!h.upstream.endless_dropped.load(Ordering::SeqCst));
    drop(stream);
    assert!(
        eventually(|| h.upstream.endless_dropped.load(Ordering::SeqCst)).await,
        "the upstream kept streaming after the caller cancelled"
    );
}

#[tokio::test]
async fn the_callers_deadline_ends_a_stream_and_its_upstream_request() {
    let mut h = start().await;
    let mut request = Request::new(streamed("gpt-endless"));
    request.set_timeout(Duration::from_millis(300));
    let started = std::time::Instant::now();
    let (deltas, done, error) = read_stream(&mut h.client, request).await;
    assert!(!deltas.is_empty());
    assert!(done.is_none());
    let error = error.unwrap();
    assert_eq!(error.code(), Code::DeadlineExceeded, "{error:?}");
    assert!(started.elapsed() < Duration::from_secs(3));
    assert_eq!(h.upstream.endless_started.load(Ordering::SeqCst), 1);
    assert!(eventually(|| h.upstream.endless_dropped.load(Ordering::SeqCst)).await);
}
