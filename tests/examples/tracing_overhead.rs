//! The latency cost of tracing: `Complete` through router → inference (sim model, zero latency)
//! with telemetry off, with tracing on but no trace sampled, with every trace sampled and
//! exported over OTLP to a real collector endpoint (an in-process OTLP gRPC receiver), and with
//! every trace sampled while the collector is down (a closed port).
//!
//! Telemetry is global to a process, so each setting runs in a child process of this example.
//! Prints figures; asserts nothing (machines are shared and noisy).
//!
//! ```text
//! cargo run --release -p weir-tests --example tracing_overhead -- [calls] [rounds]
//! ```
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;

use weir::stack::Service;
use weir_mesh::telemetry::{self, TelemetryConfig};
use weir_tests::{Mesh, otlp::Collector, percentile, time_completes};

const CONFIG: &str = r#"
[models.sim-zero]
sim = { output_tokens = 16 }

[router.rate_limit]
enabled = false
"#;

/// Child: runs `calls` sequential calls under `mode` and prints `p50_us p99_us spans`.
async fn child(mode: &str, calls: usize) {
    let (receiver, mut endpoint) = Collector::start().await;
    if mode == "down" {
        // A port that was free a moment ago: the collector is down.
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        endpoint = format!("http://{}", closed.local_addr().unwrap());
    }
    let telemetry = match mode {
        "off" => None,
        "unsampled" | "sampled" | "down" => Some(
            telemetry::init(
                &TelemetryConfig {
                    otlp_endpoint: endpoint,
                    sampling_ratio: if mode == "unsampled" { 0.0 } else { 1.0 },
                    metrics_listen: None,
                    log_level: "error".to_string(),
                    ..TelemetryConfig::default()
                },
                "weir-bench",
            )
            .unwrap(),
        ),
        other => panic!("unknown mode {other}"),
    };
    let mesh = Mesh::start_services(CONFIG, &[Service::Inference, Service::Router]).await;
    let mut router = mesh.router();
    let samples = time_completes(&mut router, "sim-zero", 200, calls).await;
    if let Some(telemetry) = &telemetry {
        telemetry.flush().await;
    }
    println!(
        "{} {} {}",
        percentile(&samples, 0.5).as_micros(),
        percentile(&samples, 0.99).as_micros(),
        receiver.len()
    );
    mesh.stop().await;
}

fn main() {
    let mut args = std::env::args().skip(1);
    let first = args.next();
    if first.as_deref() == Some("--child") {
        let mode = args.next().unwrap();
        let calls: usize = args.next().unwrap().parse().unwrap();
        tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(child(&mode, calls));
        return;
    }
    let calls: usize = first.and_then(|n| n.parse().ok()).unwrap_or(3000);
    let rounds: usize = args.next().and_then(|n| n.parse().ok()).unwrap_or(3);
    let exe = std::env::current_exe().unwrap();
    println!(
        "router.Complete → inference (sim, zero latency), {calls} sequential calls per run, \
         {rounds} runs per setting, interleaved; medians of the runs' p50 and p99:"
    );
    let modes = ["off", "unsampled", "sampled", "down"];
    let mut results: Vec<Vec<(u64, u64, u64)>> = vec![Vec::new(); modes.len()];
    for _ in 0..rounds {
        for (i, mode) in modes.iter().enumerate() {
            let output = Command::new(&exe)
                .args(["--child", mode, &calls.to_string()])
                .env("RUST_LOG", "error")
                .output()
                .unwrap();
            assert!(output.status.success(), "{mode} run failed");
            let text = String::from_utf8(output.stdout).unwrap();
            let mut fields = text.split_whitespace().map(|f| f.parse::<u64>().unwrap());
            results[i].push((
                fields.next().unwrap(),
                fields.next().unwrap(),
                fields.next().unwrap(),
            ));
        }
    }
    let median = |mut values: Vec<u64>| {
        values.sort();
        values[values.len() / 2]
    };
    let off = median(results[0].iter().map(|r| r.0).collect());
    for (mode, runs) in modes.iter().zip(results) {
        let p50 = median(runs.iter().map(|r| r.0).collect());
        let p99 = median(runs.iter().map(|r| r.1).collect());
        let spans = median(runs.iter().map(|r| r.2).collect());
        println!(
            "{mode:<10} p50 {p50:>6} µs  p99 {p99:>6} µs  ({:+} µs p50 vs off)  spans exported per run: {spans}",
            p50 as i64 - off as i64
        );
    }
}
