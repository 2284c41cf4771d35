//! What a response cache hit costs against a model call: sequential `Complete` calls through the
//! router to the instant sim model, with the budget service on (a model call reserves and
//! commits; a hit does neither), real gRPC on loopback, Redis at `WEIR_TEST_REDIS_URL`.
//!
//! Rows: the model call with the cache off (the same deterministic prompt each time); the cache
//! on Redis, a miss (a new prompt each time: lookup, model call, store); a hit on Redis; a hit in
//! memory. Prints p50/p90/p99 per row. Asserts only that the hit rows were hits (machines are
//! shared and noisy).
//!
//! ```text
//! cargo run --release -p weir-tests --example cache_hit -- [calls]
//! ```
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

/// The weir binary's allocator (services/weir/src/main.rs), so the services here cost what they
/// cost in `weir up`.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use weir_proto::{common::GenerationParams, router::CompleteRequest};
use weir_tests::{Mesh, complete, delete_prefix, redis_url, report, unique_prefix};

const MODEL: &str = "sim-zero";

fn config(prefix: &str, cache: &str) -> String {
    let redis = redis_url();
    format!(
        r#"
[models.{MODEL}]
sim = {{ output_tokens = 16 }}
price = {{ input_micros_per_mtok = 1000000, output_micros_per_mtok = 1000000 }}
[router]
budget_url = "http://127.0.0.1:50054"
session_url = ""
[router.rate_limit]
enabled = false
[router.cache]
{cache}
[budget]
redis_url = "{redis}"
key_prefix = "{prefix}"
"#
    )
}

fn deterministic(text: &str) -> CompleteRequest {
    let mut request = complete(MODEL, text);
    request.params = Some(GenerationParams {
        temperature: Some(0.0),
        ..GenerationParams::default()
    });
    request
}

/// `calls` sequential calls after 50 of warm-up; `prompt(i)` is the i-th call's prompt. Returns
/// the latencies and how many answers were hits.
async fn run(
    mesh: &Mesh,
    calls: usize,
    prompt: impl Fn(usize) -> String,
) -> (Vec<Duration>, usize) {
    let mut router = mesh.router();
    let mut samples = Vec::with_capacity(calls);
    let mut hits = 0;
    for i in 0..calls + 50 {
        let request = deterministic(&prompt(i));
        let start = Instant::now();
        let response = router
            .complete(request)
            .await
            .expect("Complete")
            .into_inner();
        let elapsed = start.elapsed();
        if i >= 50 {
            samples.push(elapsed);
            hits += usize::from(response.notices.iter().any(|n| n.reason == "CACHE_HIT"));
        }
    }
    (samples, hits)
}

#[tokio::main]
async fn main() {
    let calls: usize = std::env::args()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or(2000);
    let prefix = unique_prefix();
    let redis = redis_url();
    let rows = [
        (
            "model call (cache off)",
            "enabled = false".to_string(),
            false,
        ),
        (
            "miss on Redis (lookup + model call + store)",
            format!("enabled = true\nredis_url = \"{redis}\"\nkey_prefix = \"{prefix}\""),
            false,
        ),
        (
            "hit on Redis",
            format!("enabled = true\nredis_url = \"{redis}\"\nkey_prefix = \"{prefix}\""),
            true,
        ),
        ("hit in memory", "enabled = true".to_string(), true),
    ];
    println!("response cache: {calls} sequential Complete calls per row, instant sim, budgets on");
    for (row, (name, cache, hit)) in rows.into_iter().enumerate() {
        let mesh = Mesh::start(&config(&prefix, &cache)).await;
        let (samples, hits) = if hit {
            run(&mesh, calls, |_| "the same question".to_string()).await
        } else {
            run(&mesh, calls, |i| format!("row {row} question {i}")).await
        };
        if hit {
            assert_eq!(hits, calls, "{name}: every timed call is a hit");
        } else {
            assert_eq!(hits, 0, "{name}: no timed call is a hit");
        }
        report(name, samples);
        mesh.stop().await;
    }
    delete_prefix(&prefix).await;
}
