//! What an idempotency key costs a `Complete`: sequential calls through router → inference (sim
//! model, no latency) without a `request_id`, and with a fresh one per call, recorded in Redis
//! (`WEIR_TEST_REDIS_URL`, default `redis://127.0.0.1:6379`) and in the router's process; then
//! the replays of recorded ids.
//!
//! Prints figures; asserts nothing (machines are shared and noisy).
//!
//! ```text
//! cargo run --release -p weir-tests --example idempotency_latency -- [calls]
//! ```
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use weir::stack::Service;
use weir_tests::{Mesh, complete, redis_url, report, unique_prefix};

fn config(redis: bool) -> String {
    let store = if redis {
        format!(
            "redis_url = \"{}\"\nkey_prefix = \"{}\"",
            redis_url(),
            unique_prefix()
        )
    } else {
        String::new()
    };
    format!(
        r#"
[models.sim-zero]
sim = {{ output_tokens = 16 }}

[router.rate_limit]
enabled = false

[router.idempotency]
{store}
"#
    )
}

async fn run(mesh: &Mesh, calls: usize, id: impl Fn(usize) -> Option<String>) -> Vec<Duration> {
    let mut router = mesh.router();
    let mut samples = Vec::with_capacity(calls);
    for i in 0..calls {
        let mut request = complete("sim-zero", "the same question");
        if let Some(id) = id(i) {
            request.request_id = id;
        }
        let start = Instant::now();
        router.complete(request).await.unwrap();
        samples.push(start.elapsed());
    }
    samples
}

#[tokio::main]
async fn main() {
    let calls: usize = std::env::args()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or(2000);
    println!("sequential Complete calls over loopback gRPC, sim model with zero latency:");
    for (store, redis) in [("Redis", true), ("in process", false)] {
        let mesh =
            Mesh::start_services(&config(redis), &[Service::Inference, Service::Router]).await;
        run(&mesh, 200, |_| None).await;
        // Interleaved in blocks so that both settings see the same machine.
        let (mut without, mut with, mut replay) = (Vec::new(), Vec::new(), Vec::new());
        for block in 0..4 {
            without.extend(run(&mesh, calls / 4, |_| None).await);
            with.extend(run(&mesh, calls / 4, |i| Some(format!("b{block}-{i}"))).await);
            replay.extend(run(&mesh, calls / 4, |i| Some(format!("b{block}-{i}"))).await);
        }
        report("no request_id", without);
        report(&format!("new request_id each call ({store})"), with);
        report(
            &format!("replay of a recorded request_id ({store})"),
            replay,
        );
        mesh.stop().await;
    }
}
