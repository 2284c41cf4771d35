//! Faults that only separate processes can show: an inference process killed in the middle of a
//! streamed answer. The inference service runs as its own `weir serve inference` process; the
//! router and the budget service (on a real Redis) run in this test's process, as `weir serve`
//! would run them, on real sockets.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    io::{BufRead, BufReader},
    net::{IpAddr, Ipv4Addr},
    process::{Child, Command, Stdio},
    sync::mpsc,
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

const WEIR: &str = env!("CARGO_BIN_EXE_weir");

/// 200 tokens at 20 a second: ten seconds of answer, time enough to kill its process mid-way.
/// One micro-USD per token, so a cost is a token count.
const MODELS: &str = r#"
[models.sim-slow]
sim = { output_tokens = 200, tokens_per_second = 20.0 }
price = { input_micros_per_mtok = 1000000, output_micros_per_mtok = 1000000 }
"#;

/// A `weir serve <service>` process on a free port; killed on drop.
struct Serve {
    child: Child,
    url: String,
}

impl Serve {
    fn start(service: &str, toml: &str) -> Self {
        let path = std::env::temp_dir().join(format!(
            "weir-process-faults-{}-{service}.toml",
            std::process::id()
        ));
        std::fs::write(&path, toml).unwrap();
        let mut child = Command::new(WEIR)
            .args(["serve", service, "--config"])
            .arg(&path)
            .env(
                format!("WEIR_{}__LISTEN", service.to_ascii_uppercase()),
                "127.0.0.1:0",
            )
            .env("WEIR_TELEMETRY__METRICS_LISTEN", "")
            .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("weir serve starts");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            match rx.recv_timeout(Duration::from_millis(200)) {
                Ok(line) if line.starts_with(service) => {
                    let addr = line.split("grpc://").nth(1).unwrap().trim().to_string();
                    return Self {
                        child,
                        url: format!("http://{addr}"),
                    };
                }
                Ok(_) | Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
        }
        let _ = child.kill();
        let _ = child.wait();
        panic!("weir serve {service} did not print its address");
    }

    /// SIGKILL: the process dies at once, mid-write, as in a crash or an OOM kill.
    fn kill(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn redis_url() -> String {
    std::env::var("WEIR_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_string())
}

#[tokio::test]
async fn a_killed_inference_process_ends_the_stream_unavailable_and_what_was_relayed_is_paid() {
    let mut inference = Serve::start("inference", MODELS);
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
