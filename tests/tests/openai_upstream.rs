//! Router → inference → a real HTTP server speaking the OpenAI chat completions protocol: answers,
//! streams, the upstream's errors mapped to gRPC statuses with details, and cancellation.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use tokio_stream::StreamExt;
use tonic::Code;
use tonic_types::StatusExt;
use weir_proto::router::complete_stream_response::Event;
use weir_tests::{
    Mesh, complete, complete_stream, eventually, reason,
    upstream::{Reply, Upstream},
};

fn config(upstream: &Upstream) -> String {
    format!(
        r#"
[models.gpt-test]
backend = "openai"
context_window = 128000
openai = {{ base_url = "{}", upstream_model = "upstream-model" }}
"#,
        upstream.base_url()
    )
}

#[tokio::test]
async fn unary_answer_from_the_upstream() {
    let upstream = Upstream::start(Reply::answer("Paris is the capital of France."))
        .await
        .unwrap();
    let mesh = Mesh::start(&config(&upstream)).await;
    let response = mesh
        .router()
        .complete(complete("gpt-test", "capital of France?"))
        .await
        .expect("answer")
        .into_inner();
    assert_eq!(
        response.message.unwrap().content,
        "Paris is the capital of France."
    );
    assert_eq!(response.model, "gpt-test");
    let usage = response.usage.unwrap();
    assert_eq!((usage.input_tokens, usage.output_tokens), (10, 6));

    let sent = upstream.received();
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0]["model"], "upstream-model");
    assert_eq!(sent[0]["messages"][0]["role"], "user");
    assert_eq!(sent[0]["messages"][0]["content"], "capital of France?");
    mesh.stop().await;
}

#[tokio::test]
async fn streamed_answer_from_the_upstream_sse() {
    let upstream = Upstream::start(Reply::answer("one two three four"))
        .await
        .unwrap();
    let mesh = Mesh::start(&config(&upstream)).await;
    let mut stream = mesh
        .router()
        .complete_stream(complete_stream("gpt-test", "count"))
        .await
        .expect("stream opens")
        .into_inner();
    let mut text = String::new();
    let mut deltas = 0;
    let mut done = None;
    while let Some(event) = stream.next().await {
        match event.expect("no error").event {
            Some(Event::Delta(delta)) => {
                deltas += 1;
                text.push_str(&delta.text);
            }
            Some(Event::Done(d)) => done = Some(d),
            _ => {}
        }
    }
    assert_eq!(text, "one two three four");
    assert_eq!(deltas, 4, "each SSE chunk is relayed as its own delta");
    let usage = done.expect("done event").usage.unwrap();
    assert_eq!((usage.input_tokens, usage.output_tokens), (10, 4));
    assert_eq!(upstream.received()[0]["stream"], true);
    mesh.stop().await;
}

#[tokio::test]
async fn upstream_5xx_is_unavailable_with_details() {
    let upstream = Upstream::start(Reply::Error {
        status: 503,
        message: "overloaded".into(),
        param: None,
        retry_after_secs: None,
    })
    .await
    .unwrap();
    let mesh = Mesh::start(&config(&upstream)).await;
    let status = mesh
        .router()
        .complete(complete("gpt-test", "hi"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert_eq!(reason(&status), "UPSTREAM_UNAVAILABLE");
    let info = status.get_error_details().error_info().cloned().unwrap();
    assert_eq!(info.domain, "weir.dev");
    assert_eq!(
        info.metadata.get("http_status").map(String::as_str),
        Some("503")
    );
    mesh.stop().await;
}

#[tokio::test]
async fn upstream_429_is_resource_exhausted_with_retry_info() {
    let upstream = Upstream::start(Reply::Error {
        status: 429,
        message: "rate limited".into(),
        param: None,
        retry_after_secs: Some(2),
    })
    .await
    .unwrap();
    let mesh = Mesh::start(&config(&upstream)).await;
    let status = mesh
        .router()
        .complete(complete("gpt-test", "hi"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert_eq!(reason(&status), "UPSTREAM_RATE_LIMITED");
    let details = status.get_error_details();
    assert_eq!(
        details.retry_info().and_then(|r| r.retry_delay),
        Some(Duration::from_secs(2))
    );
    assert!(
        details.quota_failure().is_some(),
        "QuotaFailure names the upstream"
    );
    mesh.stop().await;
}

#[tokio::test]
async fn upstream_400_is_invalid_argument_with_its_message() {
    let upstream = Upstream::start(Reply::Error {
        status: 400,
        message: "temperature is not supported by this model".into(),
        param: None,
        retry_after_secs: None,
    })
    .await
    .unwrap();
    let mesh = Mesh::start(&config(&upstream)).await;
    let status = mesh
        .router()
        .complete(complete("gpt-test", "hi"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert_eq!(reason(&status), "UPSTREAM_REJECTED");
    assert!(
        status.message().contains("temperature is not supported"),
        "{}",
        status.message()
    );
    mesh.stop().await;
}

#[tokio::test]
async fn malformed_upstream_body_is_unavailable_not_a_panic() {
    let upstream = Upstream::start(Reply::Malformed).await.unwrap();
    let mesh = Mesh::start(&config(&upstream)).await;
    let status = mesh
        .router()
        .complete(complete("gpt-test", "hi"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert_eq!(reason(&status), "UPSTREAM_MALFORMED_RESPONSE");
    // The service is still answering afterwards.
    upstream.set_default(Reply::answer("fine"));
    let ok = mesh.router().complete(complete("gpt-test", "hi")).await;
    assert!(ok.is_ok(), "{ok:?}");
    mesh.stop().await;
}

#[tokio::test]
async fn cancelled_client_stream_cancels_the_upstream_request() {
    let upstream = Upstream::start(Reply::EndlessStream {
        interval: Duration::from_millis(20),
    })
    .await
    .unwrap();
    let mesh = Mesh::start(&config(&upstream)).await;
    let mut stream = mesh
        .router()
        .complete_stream(complete_stream("gpt-test", "go on forever"))
        .await
        .expect("stream opens")
        .into_inner();
    // Read a few tokens so the whole chain is streaming.
    let mut deltas = 0;
    while deltas < 3 {
        if let Some(Event::Delta(_)) = stream.next().await.unwrap().unwrap().event {
            deltas += 1;
        }
    }
    assert_eq!(upstream.streams_dropped(), 0);
    drop(stream);
    let cancelled = eventually(Duration::from_secs(5), || async {
        upstream.streams_dropped() == 1
    })
    .await;
    assert!(
        cancelled,
        "the upstream saw its stream dropped after the client cancelled"
    );
    mesh.stop().await;
}

#[tokio::test]
async fn without_max_tokens_the_reserved_limit_is_sent_upstream_and_spend_stays_within_the_limit() {
    const LIMIT: i64 = 300;
    // Each answer reports 10 prompt tokens and 8 completion tokens: 18 micro-USD at one per token.
    let upstream = Upstream::start(Reply::answer("one two three four five six seven eight"))
        .await
        .unwrap();
    let prefix = weir_tests::unique_prefix();
    let toml = format!(
        r#"
[models.gpt-priced]
backend = "openai"
context_window = 4096
max_output_tokens = 64
openai = {{ base_url = "{url}", upstream_model = "upstream-model" }}
price = {{ input_micros_per_mtok = 1000000, output_micros_per_mtok = 1000000 }}

[router]
budget_url = "http://127.0.0.1:50054"
session_url = ""

[router.rate_limit]
enabled = false

[budget]
redis_url = "{redis}"
key_prefix = "{prefix}"
"#,
        url = upstream.base_url(),
        redis = weir_tests::redis_url(),
    );
    let mesh = Mesh::start(&toml).await;
    let tenant = weir_proto::budget::Scope {
        kind: weir_proto::budget::ScopeKind::Tenant.into(),
        id: String::new(),
    };
    mesh.budget()
        .set_budget(weir_proto::budget::SetBudgetRequest {
            scope: Some(tenant.clone()),
            hard_limit_micros: LIMIT,
            soft_limit_fraction: 0.0,
            period: Some(weir_proto::budget::Period {
                kind: Some(weir_proto::budget::period::Kind::Calendar(
                    weir_proto::budget::CalendarPeriod {
                        unit: weir_proto::budget::PeriodUnit::Daily.into(),
                        time_zone: String::new(),
                    },
                )),
            }),
        })
        .await
        .unwrap();

    // No max_tokens from the client: each request reserves the model's 64 output tokens, and
    // exactly that limit goes upstream, so no answer can cost more than its hold.
    let mut served = 0;
    let mut refused = 0;
    for i in 0..30 {
        match mesh
            .router()
            .complete(complete("gpt-priced", &format!("question {i}")))
            .await
        {
            Ok(_) => served += 1,
            Err(status) => {
                assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
                refused += 1;
            }
        }
    }
    let sent = upstream.received();
    assert_eq!(
        sent.len(),
        served,
        "only served requests reached the upstream"
    );
    assert!(
        sent.iter().all(|body| body["max_tokens"] == 64),
        "the reserved limit is sent: {:?}",
        sent.iter().map(|b| &b["max_tokens"]).collect::<Vec<_>>()
    );
    assert!(
        served > 0 && refused > 0,
        "served {served}, refused {refused}"
    );
    let budget = mesh
        .budget()
        .get_budget(weir_proto::budget::GetBudgetRequest {
            scope: Some(tenant),
        })
        .await
        .unwrap()
        .into_inner()
        .budget
        .unwrap();
    assert!(
        budget.spent_micros + budget.held_micros <= LIMIT,
        "spent {} + held {} within {LIMIT}",
        budget.spent_micros,
        budget.held_micros
    );
    mesh.stop().await;
}
