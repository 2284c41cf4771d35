//! Faults that only separate processes can show: an inference process killed in the middle of a
//! streamed answer. The inference service runs as its own `weir serve inference` process; the
//! router and the budget service (on a real Redis) run in this test's process, as `weir serve`
//! would run them, on real sockets.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::{
    net::{IpAddr, Ipv4Addr},
    time::{Duration, Instant},
};

use tokio_stream::StreamExt;
use tonic::Code;
use weir::stack::{self, Service, StackConfig};
use weir_mesh::{ApiError, config::Source};
use weir_proto::{
    budget::{GetSpendRequest, Scope, ScopeKind, budget_service_client::BudgetServiceClient},
    common::{Message, Role},
    router::{
        CompleteStreamRequest, complete_stream_response::Event,
        router_service_client::RouterServiceClient,
    },
};

use common::{Serve, redis_url, serve_command};

/// 200 tokens at 20 a second: ten seconds of answer, time enough to kill its process mid-way.
/// One micro-USD per token, so a cost is a token count.
const MODELS: &str = r#"
[models.sim-slow]
sim = { output_tokens = 200, tokens_per_second = 20.0 }
price = { input_micros_per_mtok = 1000000, output_micros_per_mtok = 1000000 }
"#;

#[tokio::test]
async fn a_killed_inference_process_ends_the_stream_unavailable_and_what_was_relayed_is_paid() {
    let config = std::env::temp_dir().join(format!(
        "weir-process-faults-{}-inference.toml",
        std::process::id()
    ));
    std::fs::write(&config, MODELS).unwrap();
    let mut inference = Serve::start(serve_command("inference", &config), "inference");
    let prefix = format!("wtest-faults-{}", std::process::id());
    let toml = format!(
        r#"{MODELS}
[router]
inference_url = "{inference}"
budget_url = "http://127.0.0.1:50054"   # replaced by the budget service started here
session_url = ""

[router.rate_limit]
enabled = false

[budget]
redis_url = "{redis}"
key_prefix = "{prefix}"
"#,
        inference = inference.url,
        redis = redis_url(),
    );
    let mut config = StackConfig::from_source(&Source::from_toml(&toml)).unwrap();
    config.listen_on_any_port(IpAddr::V4(Ipv4Addr::LOCALHOST));
    let running = stack::start(
        config,
        &[Service::Budget, Service::Router],
        Default::default(),
    )
    .await
    .unwrap();
    let channel =
        |service| weir_mesh::client::lazy_channel(&running.url(service).unwrap()).unwrap();
    let mut router = RouterServiceClient::new(channel(Service::Router));
    let mut budget = BudgetServiceClient::new(channel(Service::Budget));

    let mut stream = router
        .complete_stream(CompleteStreamRequest {
            model: "sim-slow".to_string(),
            messages: vec![Message {
                role: Role::User.into(),
                content: "tell me a long story".to_string(),
                ..Message::default()
            }],
            ..CompleteStreamRequest::default()
        })
        .await
        .expect("the stream starts")
        .into_inner();
    let mut deltas = 0;
    while deltas < 3 {
        match stream.next().await.unwrap().unwrap().event.unwrap() {
            Event::Delta(_) => deltas += 1,
            Event::Start(_) => {}
            Event::Done(done) => panic!("the answer ended before the kill: {done:?}"),
        }
    }

    inference.kill();
    let status = loop {
        match stream.next().await {
            Some(Ok(message)) => match message.event.unwrap() {
                Event::Delta(_) => deltas += 1,
                other => panic!("a cut stream must not end cleanly: {other:?}"),
            },
            Some(Err(status)) => break status,
            None => panic!("the stream ended without an error after the kill"),
        }
    };
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert_eq!(
        ApiError::from_status(&status).reason(),
        "STREAM_CUT",
        "{status:?}"
    );

    // The relayed part was committed: at least the prompt and every token the client saw.
    let scope = Scope {
        kind: ScopeKind::Tenant.into(),
        id: String::new(),
    };
    let mut spent = 0;
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        spent = budget
            .get_spend(GetSpendRequest {
                scope: Some(scope.clone()),
                ..GetSpendRequest::default()
            })
            .await
            .unwrap()
            .into_inner()
            .total_micros;
        if spent > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        spent > deltas && spent < 200,
        "charged {spent} micro-USD for a prompt and {deltas} relayed tokens of 200"
    );
    running.stop().await.unwrap();
}
