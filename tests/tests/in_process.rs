//! In-process calls between co-located services (`[mesh] in_process`, weir_mesh::local): the
//! router reaches the budget and inference services hosted by its own process through their whole
//! server stacks, minus the socket. The other end-to-end tests turn this off so that they drive
//! real sockets between services; this file runs the walk with it on (the default of `weir up`)
//! and checks that it answers, charges and cancels exactly as over sockets, and that the calls
//! really stay in the process.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{net::SocketAddr, time::Duration};

use tokio_stream::StreamExt;
use tonic::Code;
use weir::stack::Service;
use weir_proto::router::{CompleteResponse, complete_stream_response::Event};
use weir_tests::{
    Mesh, complete, complete_stream, eventually, model_calls, redis_url, tenant_spend,
    unique_prefix, with_key,
};

const ACME_KEY: &str = "wk_acme_in_process_test_key_0001";
const GLOBEX_KEY: &str = "wk_globex_in_process_test_key_01";

fn config(prefix: &str) -> String {
    format!(
        r#"
[models.sim-priced]
sim = {{ output_tokens = 12 }}
price = {{ input_micros_per_mtok = 1000000, output_micros_per_mtok = 2000000 }}
[models.sim-drip]
sim = {{ output_tokens = 400, tokens_per_second = 20.0 }}
price = {{ input_micros_per_mtok = 1000000, output_micros_per_mtok = 1000000 }}

[router]
budget_url = "http://127.0.0.1:50054"   # replaced by the budget service started with it
session_url = ""

[router.rate_limit]
enabled = false

[router.routes.auto]
models = ["sim-priced"]

[budget]
redis_url = "{redis}"
key_prefix = "{prefix}"

[mesh]
secret = "in-process-test-mesh-secret-0123456789abcdef"

[[auth.api_keys]]
id = "acme"
tenant = "acme"
key = "{ACME_KEY}"

[[auth.api_keys]]
id = "globex"
tenant = "globex"
key = "{GLOBEX_KEY}"
"#,
        redis = redis_url()
    )
}

const SERVICES: [Service; 3] = [Service::Router, Service::Inference, Service::Budget];

async fn start(prefix: &str, in_process: bool) -> Mesh {
    Mesh::start_with(&config(prefix), &SERVICES, |config| {
        config.mesh.in_process = in_process;
    })
    .await
}

/// Established TCP connections whose local end is `addr`'s port on 127.0.0.1: the server side of
/// every connection made to the service listening there (Linux's /proc/net/tcp).
fn connections_to(addr: SocketAddr) -> usize {
    let table = std::fs::read_to_string("/proc/net/tcp").expect("/proc/net/tcp (Linux)");
    let local = format!("0100007F:{:04X}", addr.port());
    table
        .lines()
        .skip(1)
        .filter(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            // sl, local_address, rem_address, st: 01 is ESTABLISHED.
            fields.len() > 3 && fields[1] == local && fields[3] == "01"
        })
        .count()
}

async fn ask(mesh: &Mesh, key: &str, text: &str) -> CompleteResponse {
    mesh.router()
        .complete(with_key(complete("auto", text), key))
        .await
        .unwrap()
        .into_inner()
}

#[tokio::test]
async fn calls_stay_in_the_process_and_answer_and_charge_as_over_sockets() {
    let (local_prefix, socket_prefix) = (unique_prefix(), unique_prefix());
    let local = start(&local_prefix, true).await;
    let socket = start(&socket_prefix, false).await;

    let mut answers = Vec::new();
    for mesh in [&local, &socket] {
        let mut costs = 0;
        let mut texts = Vec::new();
        for i in 0..5 {
            let answer = ask(mesh, ACME_KEY, &format!("question {i}")).await;
            assert!(answer.cost_micros > 0, "{answer:?}");
            costs += answer.cost_micros;
            texts.push((answer.message.map(|m| m.content), answer.usage));
        }
        answers.push((texts, costs));
    }
    assert_eq!(answers[0], answers[1], "the same answers, usage and cost");

    // The router's calls to budget and inference took no socket in the in-process mesh (the
    // test itself has not called either service yet), and one connection each in the other.
    for service in [Service::Budget, Service::Inference] {
        assert_eq!(
            connections_to(local.addr(service)),
            0,
            "{service}: in-process calls open no connection"
        );
        assert!(
            connections_to(socket.addr(service)) >= 1,
            "{service}: the socket mesh's router is connected"
        );
    }

    // The budget recorded what the answers said they cost, for the tenant that asked.
    for (mesh, (_, costs)) in [&local, &socket].into_iter().zip(&answers) {
        assert_eq!(tenant_spend(mesh, ACME_KEY).await, *costs);
        assert_eq!(
            tenant_spend(mesh, GLOBEX_KEY).await,
            0,
            "nothing charged to another tenant"
        );
    }

    local.stop().await;
    socket.stop().await;
    weir_tests::delete_prefix(&local_prefix).await;
    weir_tests::delete_prefix(&socket_prefix).await;
}

#[tokio::test]
async fn a_caller_that_hangs_up_or_runs_out_of_time_stops_the_model_in_process() {
    weir_mesh::telemetry::install_metrics_recorder();
    let prefix = unique_prefix();
    let mesh = start(&prefix, true).await;
    let before = model_calls("sim-drip", "CANCELLED");

    // A stream read for a few tokens, then dropped.
    let mut stream = mesh
        .router()
        .complete_stream(with_key(
            complete_stream("sim-drip", "a long answer"),
            ACME_KEY,
        ))
        .await
        .unwrap()
        .into_inner();
    let mut tokens = 0;
    while tokens < 3 {
        match stream.next().await.unwrap().unwrap().event {
            Some(Event::Delta(_)) => tokens += 1,
            Some(_) => {}
            None => panic!("an event without a body"),
        }
    }
    drop(stream);
    assert!(
        eventually(Duration::from_secs(5), || async {
            model_calls("sim-drip", "CANCELLED") > before
        })
        .await,
        "the model call was cancelled"
    );

    // A unary call whose deadline (300 ms) passes long before the 20 s answer.
    let mut request = with_key(complete("sim-drip", "another long answer"), ACME_KEY);
    request.set_timeout(Duration::from_millis(300));
    let status = mesh.router().complete(request).await.unwrap_err();
    // The router answers DEADLINE_EXCEEDED; the test's own tonic client may give up first on the
    // same deadline, which it reports as CANCELLED "Timeout expired".
    assert!(
        matches!(status.code(), Code::DeadlineExceeded | Code::Cancelled),
        "{status:?}"
    );
    assert!(
        eventually(Duration::from_secs(5), || async {
            model_calls("sim-drip", "CANCELLED") + model_calls("sim-drip", "DEADLINE_EXCEEDED")
                > before + 1.0
        })
        .await,
        "the model call ended with the deadline"
    );
    // 400 tokens at 20/s would take 20 s: neither call ran to the end.
    assert_eq!(model_calls("sim-drip", "OK"), 0.0);
    // What ran is charged (the prompt and the tokens relayed), to the tenant that asked.
    assert!(
        eventually(Duration::from_secs(5), || async {
            tenant_spend(&mesh, ACME_KEY).await > 0
        })
        .await
    );
    mesh.stop().await;
    weir_tests::delete_prefix(&prefix).await;
}
