//! Latency of one `Complete` through router → inference (sim model, zero latency), against a
//! direct `Generate` on the inference service, over real gRPC on loopback.
//!
//! Prints figures; asserts nothing (machines are shared and noisy).
//!
//! ```text
//! cargo run --release -p weir-tests --example complete_latency -- [calls]
//! ```
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Instant;

use weir::stack::Service;
use weir_proto::inference::GenerateRequest;
use weir_tests::{Mesh, report, time_completes, user};

const CONFIG: &str = r#"
[models.sim-zero]
sim = { output_tokens = 16 }

# The benchmark measures the path, not the default per-tenant limit of 100 requests/s.
[router.rate_limit]
enabled = false
"#;

#[tokio::main]
async fn main() {
    let calls: usize = std::env::args()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or(2000);
    let mesh = Mesh::start_services(CONFIG, &[Service::Inference, Service::Router]).await;
    let mut router = mesh.router();
    let mut inference = mesh.inference();

    // Warm up connections and code paths on both paths.
    time_completes(&mut router, "sim-zero", 100, 0).await;

    let mut direct = Vec::with_capacity(calls);
    for i in 0..calls {
        let request = GenerateRequest {
            model: "sim-zero".into(),
            messages: vec![user(&format!("direct {i}"))],
            ..Default::default()
        };
        let start = Instant::now();
        inference.generate(request).await.unwrap();
        direct.push(start.elapsed());
    }

    let routed = time_completes(&mut router, "sim-zero", 0, calls).await;

    println!("sequential calls over loopback gRPC, sim model with zero latency:");
    report("inference.Generate (direct)", direct);
    report("router.Complete (router→inference)", routed);
    mesh.stop().await;
}
