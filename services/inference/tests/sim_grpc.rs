//! The simulated backend over real gRPC: validation statuses, streamed and unary answers agreeing,
//! listing models, injected faults, deadlines, and what the model received.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{net::SocketAddr, sync::Arc, time::Duration};

use tokio_util::sync::CancellationToken;
use tonic::{Code, Request, transport::Channel};
use tonic_types::StatusExt;
use weir_inference::{Config, InferenceApi, server_with};
use weir_mesh::{
    catalog::{Catalog, ModelSpec, SimSpec},
    tokens,
};
use weir_proto::{
    common::{FinishReason, GenerationParams, Message, Role},
    inference::{
        GenerateRequest, GenerateStreamRequest, ListModelsRequest, generate_stream_response::Event,
        inference_service_client::InferenceServiceClient,
    },
};

struct Harness {
    client: InferenceServiceClient<Channel>,
    api: InferenceApi,
    shutdown: CancellationToken,
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

async fn start() -> Harness {
    let mut models: Vec<(String, ModelSpec)> = Catalog::default()
        .iter()
        .map(|(name, spec)| (name.to_string(), spec.clone()))
        .collect();
    models.push((
        "sim-flaky".to_string(),
        ModelSpec {
            sim: SimSpec {
                error_rate: 0.5,
                retry_after: Some(Duration::from_millis(250)),
                ..SimSpec::default()
            },
            ..ModelSpec::default()
        },
    ));
    models.push((
        "sim-hang".to_string(),
        ModelSpec {
            sim: SimSpec {
                hang: true,
                ..SimSpec::default()
            },
            ..ModelSpec::default()
        },
    ));
    let api = InferenceApi::new(Arc::new(Catalog::new(models)));
    let shutdown = CancellationToken::new();
    let listener = weir_mesh::server::bind(SocketAddr::from(([127, 0, 0, 1], 0)))
        .await
        .unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(server_with(&Config::default(), api.clone()).serve(listener, shutdown.clone()));
    let client = InferenceServiceClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    Harness {
        client,
        api,
        shutdown,
    }
}

fn user(text: &str) -> Message {
    Message {
        role: Role::User.into(),
        content: text.to_string(),
        ..Message::default()
    }
}

fn unary(model: &str, messages: Vec<Message>, max_tokens: Option<i32>) -> GenerateRequest {
    GenerateRequest {
        model: model.to_string(),
        messages,
        params: Some(GenerationParams {
            max_tokens,
            ..GenerationParams::default()
        }),
        ..GenerateRequest::default()
    }
}

fn streamed(request: GenerateRequest) -> GenerateStreamRequest {
    GenerateStreamRequest {
        model: request.model,
        messages: request.messages,
        params: request.params,
        request_id: request.request_id,
        labels: request.labels,
    }
}

fn bad_field(status: &tonic::Status) -> String {
    status
        .get_error_details()
        .bad_request()
        .and_then(|b| b.field_violations.first().map(|v| v.field.clone()))
        .unwrap_or_default()
}

#[tokio::test]
async fn invalid_requests_are_refused_with_the_field_named() {
    let mut h = start().await;

    let status = h
        .client
        .generate(unary("sim-small", vec![], None))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert_eq!(bad_field(&status), "messages");
    assert!(
        status
            .message()
            .contains("at least one message is required")
    );

    let status = h
        .client
        .generate(unary("gpt-9", vec![user("hi")], None))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    assert!(status.message().contains("gpt-9"));

    let status = h
        .client
        .generate(unary("sim-small", vec![user("hi")], Some(-1)))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert_eq!(bad_field(&status), "params.max_tokens");
    assert!(status.message().contains("-1"));

    // sim-small's window is 8192 tokens: 9000 words do not fit.
    let huge = "word ".repeat(9000);
    let status = h
        .client
        .generate(unary("sim-small", vec![user(&huge)], None))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert_eq!(bad_field(&status), "messages");
    assert!(
        status
            .message()
            .contains("prompt is 9007 tokens; model sim-small accepts 8192 including max_tokens"),
        "{}",
        status.message()
    );

    // Streams are validated the same way, before any token.
    let status = h
        .client
        .generate_stream(streamed(unary("sim-small", vec![], None)))
        .await
        .unwrap_err();
    assert_eq!(bad_field(&status), "messages");

    // None of them reached the model.
    assert!(h.api.sim_requests().is_empty());
}

#[tokio::test]
async fn a_streamed_answer_equals_the_unary_answer() {
    let mut h = start().await;
    let conversation = vec![
        Message {
            role: Role::System.into(),
            content: "You are terse.".to_string(),
            ..Message::default()
        },
        user("What is a service mesh, in one sentence?"),
    ];
    for max_tokens in [None, Some(10)] {
        let request = unary("sim-small", conversation.clone(), max_tokens);
        let response = h
            .client
            .generate(request.clone())
            .await
            .unwrap()
            .into_inner();
        let content = response.message.as_ref().unwrap().content.clone();
        assert!(
            content.starts_with("You said \"What is a service mesh,"),
            "{content}"
        );

        let mut stream = h
            .client
            .generate_stream(streamed(request))
            .await
            .unwrap()
            .into_inner();
        let mut text = String::new();
        let mut indexes = Vec::new();
        let mut done = None;
        while let Some(message) = stream.message().await.unwrap() {
            match message.event.unwrap() {
                Event::Delta(delta) => {
                    indexes.push(delta.index);
                    text.push_str(&delta.text);
                }
                Event::Done(d) => done = Some(d),
            }
        }
        let done = done.unwrap();
        assert_eq!(text, content);
        assert_eq!(done.usage, response.usage);
        assert_eq!(done.finish_reason, response.finish_reason);
        assert_eq!(done.backend, "sim");
        assert_eq!(done.model, "sim-small");
        assert_eq!(indexes, (0..indexes.len() as i64).collect::<Vec<_>>());

        let usage = response.usage.unwrap();
        let expected_output = max_tokens.map_or(24, i64::from);
        assert_eq!(usage.output_tokens, expected_output);
        assert_eq!(
            i64::from(tokens::count_text("sim", &content)),
            expected_output
        );
        assert_eq!(
            usage.input_tokens,
            i64::from(tokens::count_messages("sim", &conversation))
        );
        let expected_reason = if max_tokens.is_some() {
            FinishReason::Length
        } else {
            FinishReason::Stop
        };
        assert_eq!(response.finish_reason(), expected_reason);
        // sim-small: 20 ms to the first token.
        let ttft = response.time_to_first_token.unwrap();
        assert!(ttft.seconds > 0 || ttft.nanos >= 20_000_000, "{ttft:?}");
    }

    let received = h.api.sim_requests_for("sim-small");
    assert_eq!(received.len(), 4);
    assert_eq!(received[0].messages, conversation);
    assert_eq!(
        received.iter().map(|r| r.streamed).collect::<Vec<_>>(),
        [false, true, false, true]
    );
}

#[tokio::test]
async fn list_models_shows_the_catalog() {
    let mut h = start().await;
    let page = h
        .client
        .list_models(ListModelsRequest {
            page_size: 2,
            page_token: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let names: Vec<_> = page.models.iter().map(|m| m.name.as_str()).collect();
    assert_eq!(names, ["sim-flaky", "sim-hang"]);
    let rest = h
        .client
        .list_models(ListModelsRequest {
            page_size: 0,
            page_token: page.next_page_token,
        })
        .await
        .unwrap()
        .into_inner();
    let names: Vec<_> = rest.models.iter().map(|m| m.name.as_str()).collect();
    assert_eq!(names, ["sim-large", "sim-small"]);
    assert_eq!(rest.next_page_token, "");
    assert_eq!(rest.models[0].context_window, 32768);

    let status = h
        .client
        .list_models(ListModelsRequest {
            page_size: 1,
            page_token: "not-a-token".to_string(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert_eq!(bad_field(&status), "page_token");
}

#[tokio::test]
async fn injected_faults_carry_their_retry_delay() {
    let mut h = start().await;
    let mut codes = Vec::new();
    for _ in 0..4 {
        let result = h
            .client
            .generate(unary("sim-flaky", vec![user("hi")], None))
            .await;
        codes.push(result.as_ref().err().map(tonic::Status::code));
        if let Err(status) = result {
            let details = status.get_error_details();
            assert_eq!(
                details.error_info().map(|i| i.reason.as_str()),
                Some("SIMULATED_FAULT")
            );
            assert_eq!(
                details.retry_info().and_then(|r| r.retry_delay),
                Some(Duration::from_millis(250))
            );
        }
    }
    assert_eq!(
        codes,
        [None, Some(Code::Unavailable), None, Some(Code::Unavailable)]
    );
}

#[tokio::test]
async fn a_hanging_model_is_ended_by_the_callers_deadline() {
    let mut h = start().await;
    let mut request = Request::new(unary("sim-hang", vec![user("hi")], None));
    request.set_timeout(Duration::from_millis(200));
    let started = std::time::Instant::now();
    let status = h.client.generate(request).await.unwrap_err();
    // tonic's own server timeout may answer first, with CANCELLED.
    assert!(
        matches!(status.code(), Code::DeadlineExceeded | Code::Cancelled),
        "{status:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(3));

    let mut request = Request::new(streamed(unary("sim-hang", vec![user("hi")], None)));
    request.set_timeout(Duration::from_millis(200));
    let status = h.client.generate_stream(request).await.unwrap_err();
    assert!(
        matches!(status.code(), Code::DeadlineExceeded | Code::Cancelled),
        "{status:?}"
    );
}
