//! What the OpenAI-compatible HTTP edge adds over calling the router over gRPC: sequential calls
//! to the same router (sim model, zero latency), alternating between gRPC `Complete` and
//! `POST /v1/chat/completions` on the edge, so both see the same machine at the same moment.
//! Streams too: time to the first token, `CompleteStream` against the SSE edge.
//!
//! A third figure splits the edge's cost: `GET /v1/models` is an HTTP round trip to the same
//! edge that makes no gRPC call, so what remains of the difference is the loopback gRPC hop.
//!
//! Prints figures; asserts nothing (machines are shared and noisy). The target (issue 14): the
//! edge adds at most 0.2 ms p50 over gRPC `Complete`.
//!
//! ```text
//! cargo run --release -p weir-tests --example openai_edge_latency -- [calls]
//! ```
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::json;
use weir::stack::Service;
use weir_tests::{Mesh, complete, complete_stream, percentile, report};

const CONFIG: &str = r#"
[models.sim-zero]
sim = { output_tokens = 16 }

[router]
session_url = ""

# The benchmark measures the path, not the default per-tenant limit of 100 requests/s.
[router.rate_limit]
enabled = false
"#;

fn body(i: usize, stream: bool) -> serde_json::Value {
    json!({
        "model": "sim-zero",
        "messages": [{"role": "user", "content": format!("call {i}")}],
        "stream": stream,
    })
}

type Router =
    weir_proto::router::router_service_client::RouterServiceClient<tonic::transport::Channel>;

async fn time_grpc(router: &mut Router, i: usize) -> Duration {
    let start = Instant::now();
    router
        .complete(complete("sim-zero", &format!("call {i}")))
        .await
        .unwrap();
    start.elapsed()
}

async fn time_edge(http: &reqwest::Client, url: &str, i: usize) -> Duration {
    let start = Instant::now();
    let response = http.post(url).json(&body(i, false)).send().await.unwrap();
    assert_eq!(response.status(), 200);
    response.bytes().await.unwrap();
    start.elapsed()
}

/// Until the first token arrives (`start`, then the first delta).
async fn time_grpc_stream(router: &mut Router, i: usize) -> Duration {
    let start = Instant::now();
    let mut events = router
        .complete_stream(complete_stream("sim-zero", &format!("call {i}")))
        .await
        .unwrap()
        .into_inner();
    events.message().await.unwrap();
    events.message().await.unwrap();
    let first = start.elapsed();
    while events.message().await.unwrap().is_some() {}
    first
}

/// Until the first token arrives (the second event: the first chunk only names the role).
async fn time_edge_stream(http: &reqwest::Client, url: &str, i: usize) -> Duration {
    let start = Instant::now();
    let response = http.post(url).json(&body(i, true)).send().await.unwrap();
    let mut stream = response.bytes_stream();
    let mut seen = String::new();
    let mut first = Duration::ZERO;
    while let Some(bytes) = stream.next().await {
        seen.push_str(std::str::from_utf8(&bytes.unwrap()).unwrap());
        if first.is_zero() && seen.matches("data: ").count() >= 2 {
            first = start.elapsed();
        }
    }
    assert!(seen.contains("[DONE]"));
    first
}

#[tokio::main]
async fn main() {
    let calls: usize = std::env::args()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or(2000);
    let mesh = Mesh::start_services(CONFIG, &[Service::Inference, Service::Router]).await;
    let mut router = mesh.router();
    let http = reqwest::Client::builder()
        .tcp_nodelay(true)
        .build()
        .unwrap();
    let url = format!("{}/chat/completions", mesh.openai_url());

    let (mut grpc, mut edge) = (Vec::with_capacity(calls), Vec::with_capacity(calls));
    let (mut grpc_ttft, mut edge_ttft) = (Vec::new(), Vec::new());
    let mut http_only = Vec::with_capacity(calls);
    let models_url = format!("{}/models", mesh.openai_url());
    let warm_up = calls / 10 + 50;
    for i in 0..warm_up + calls {
        // Which door goes first alternates, so neither always follows the other's work.
        let (grpc_time, edge_time, grpc_first, edge_first) = if i % 2 == 0 {
            let grpc_time = time_grpc(&mut router, i).await;
            let edge_time = time_edge(&http, &url, i).await;
            let grpc_first = time_grpc_stream(&mut router, i).await;
            let edge_first = time_edge_stream(&http, &url, i).await;
            (grpc_time, edge_time, grpc_first, edge_first)
        } else {
            let edge_time = time_edge(&http, &url, i).await;
            let grpc_time = time_grpc(&mut router, i).await;
            let edge_first = time_edge_stream(&http, &url, i).await;
            let grpc_first = time_grpc_stream(&mut router, i).await;
            (grpc_time, edge_time, grpc_first, edge_first)
        };
        let start = Instant::now();
        http.get(&models_url)
            .send()
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap();
        let models_time = start.elapsed();
        if i >= warm_up {
            http_only.push(models_time);
            grpc.push(grpc_time);
            edge.push(edge_time);
            grpc_ttft.push(grpc_first);
            edge_ttft.push(edge_first);
        }
    }
    for samples in [
        &mut grpc,
        &mut edge,
        &mut grpc_ttft,
        &mut edge_ttft,
        &mut http_only,
    ] {
        samples.sort();
    }
    println!("sequential calls over loopback, sim model with zero latency, alternating doors:");
    let added = |a: &[Duration], b: &[Duration], p: f64| {
        (percentile(b, p).as_secs_f64() - percentile(a, p).as_secs_f64()) * 1e3
    };
    println!(
        "edge adds: unary p50 {:+.3} ms, p99 {:+.3} ms; stream first token p50 {:+.3} ms, p99 {:+.3} ms",
        added(&grpc, &edge, 0.5),
        added(&grpc, &edge, 0.99),
        added(&grpc_ttft, &edge_ttft, 0.5),
        added(&grpc_ttft, &edge_ttft, 0.99),
    );
    report("router.Complete (gRPC)", grpc);
    report("POST /v1/chat/completions (HTTP edge)", edge);
    report("GET /v1/models (HTTP only, no gRPC call)", http_only);
    report("CompleteStream, first token (gRPC)", grpc_ttft);
    report("stream: true, first token (HTTP edge)", edge_ttft);
    mesh.stop().await;
}
