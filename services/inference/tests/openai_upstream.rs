//! The `openai` backend against a real HTTP server speaking the chat completions protocol, called
//! over real gRPC: answers, usage, error statuses with their `google.rpc` details, deadlines, and
//! cancellation reaching the upstream.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{net::SocketAddr, sync::Arc, time::Duration};

use serde_json::json;
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
use weir_test_upstream::{Reply, Upstream, Usage, split_at};

/// An environment variable every `cargo test` run has, standing in for an API key (tests cannot
/// set variables: that is unsafe in edition 2024 and the workspace forbids unsafe code).
const KEY_ENV: &str = "CARGO_PKG_NAME";

/// The usage the upstream reports when it reports any.
const USAGE: Usage = Usage {
    prompt_tokens: 9,
    completion_tokens: 3,
    cached_tokens: Some(2),
};

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

/// A unary "Hello world", with [`USAGE`] or without usage.
fn hello(usage: bool) -> Reply {
    Reply::Answer {
        content: "Hello world".to_string(),
        usage: usage.then_some(USAGE),
    }
}

/// A streamed "Hello world" ("Hel", "lo", " world"), with [`USAGE`] or without usage: a comment
/// line, a role-only chunk, `\r\n` and `\n` line ends, and the body split at awkward places.
fn hello_stream(usage: bool) -> Reply {
    let mut chunks = vec![
        ": connected\n\n".to_string(),
        chunk(None, None),
        chunk(Some("Hel"), None),
        chunk(Some("lo"), None),
        chunk(Some(" world"), Some("stop")),
    ];
    if usage {
        chunks.push(format!(
            "data: {}\n\n",
            json!({
                "choices": [],
                "usage": {
                    "prompt_tokens": 9, "completion_tokens": 3, "total_tokens": 12,
                    "prompt_tokens_details": { "cached_tokens": 2 }
                }
            })
        ));
    }
    chunks.push("data: [DONE]\n\n".to_string());
    // Split the body at awkward places: inside `data:`, inside JSON, between \r and \n.
    Reply::sse(split_at(chunks.concat(), &[3, 17, 60, 61, 62, 140, 141]))
}

/// An OpenAI-style error without `Retry-After`.
fn error(status: u16, message: &str, param: Option<&str>) -> Reply {
    Reply::Error {
        status,
        message: message.to_string(),
        param: param.map(str::to_string),
        retry_after_secs: None,
    }
}

/// An endless stream: " t0", " t1", ... every 20 ms.
fn endless() -> Reply {
    Reply::EndlessStream {
        interval: Duration::from_millis(20),
    }
}

struct Harness {
    client: InferenceServiceClient<Channel>,
    upstream: Upstream,
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

/// Starts the inference service with every model of the catalog pointing at one fake upstream
/// (except `gpt-closed`), which answers `default` unless a test queues other replies.
async fn start(default: Reply) -> Harness {
    let shutdown = CancellationToken::new();
    let upstream = Upstream::start(default).await.unwrap();
    let base_url = upstream.base_url();

    // A port nothing listens on: bound, then released.
    let closed = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap()
    };
    // The upstream answers whatever the test queued, whichever model is asked for; the upstream
    // model names only show that the configured name is the one sent.
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
    let mut h = start(hello(true)).await;
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

    let body = &h.upstream.received()[0];
    let headers = &h.upstream.received_headers()[0];
    let auth = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
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
    let mut h = start(hello_stream(true)).await;
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
    let requests = h.upstream.received();
    assert_eq!(requests[0]["stream"], true);
    assert_eq!(requests[0]["stream_options"]["include_usage"], true);
}

#[tokio::test]
async fn missing_usage_is_estimated() {
    let mut h = start(hello(false)).await;
    h.upstream.push(hello_stream(false));
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
    let mut h = start(error(500, "the upstream fell over", None)).await;
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
    let mut h = start(Reply::Error {
        status: 429,
        message: "Rate limit reached for requests".to_string(),
        param: None,
        retry_after_secs: Some(2),
    })
    .await;
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
    let mut h = start(error(
        400,
        "temperature is too high for this model",
        Some("temperature"),
    ))
    .await;
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
    let mut h = start(hello(true)).await;
    h.upstream
        .push(error(401, "Incorrect API key provided", None));
    h.upstream
        .push(error(404, "The model `missing` does not exist", None));
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
    // Both queued errors were used, and the request without a key never left.
    assert_eq!(h.upstream.requests(), 2);
}

#[tokio::test]
async fn unreachable_and_slow_upstreams_are_unavailable() {
    // `gpt-closed` never reaches the upstream; `gpt-slow` answers after 30 s.
    let mut h = start(hello(true).delayed(Duration::from_secs(30))).await;
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
    // Two deltas, then the body ends: no finish reason, no `[DONE]`.
    let mut h = start(Reply::sse([
        chunk(Some("par"), None),
        chunk(Some("tial"), None),
    ]))
    .await;
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
    let mut h = start(endless()).await;
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
    assert_eq!(h.upstream.streams_dropped(), 0);
    drop(stream);
    assert!(
        eventually(|| h.upstream.streams_dropped() == 1).await,
        "the upstream kept streaming after the caller cancelled"
    );
}

#[tokio::test]
async fn the_callers_deadline_ends_a_stream_and_its_upstream_request() {
    let mut h = start(endless()).await;
    let mut request = Request::new(streamed("gpt-endless"));
    request.set_timeout(Duration::from_millis(300));
    let started = std::time::Instant::now();
    let (deltas, done, error) = read_stream(&mut h.client, request).await;
    assert!(!deltas.is_empty());
    assert!(done.is_none());
    let error = error.unwrap();
    assert_eq!(error.code(), Code::DeadlineExceeded, "{error:?}");
    assert!(started.elapsed() < Duration::from_secs(3));
    assert_eq!(h.upstream.streams_started(), 1);
    assert!(eventually(|| h.upstream.streams_dropped() == 1).await);
}
