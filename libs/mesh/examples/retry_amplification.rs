//! How much extra load retries put on a backend that fails every call, with and without the
//! retry budget.
//!
//! Sends 10,000 calls at a steady rate through `RetryLayer` (default policy: 3 attempts,
//! full-jitter backoff) to a fake backend that answers every call UNAVAILABLE, on tokio's paused
//! clock (the simulated minutes take well under a second), and prints the upstream request
//! amplification: requests the backend received / calls made.
//!
//! ```text
//! cargo run -p weir-mesh --example retry_amplification
//! ```

use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use tonic::{Status, body::Body};
use tower::{BoxError, Layer, ServiceExt, service_fn};
use weir_mesh::{
    ApiError,
    retry::{RetryBudget, RetryLayer, RetryPolicy},
};

const CALLS: usize = 10_000;

fn main() -> Result<(), BoxError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()?;
    runtime.block_on(async {
        println!("{CALLS} calls to a backend that fails every one (default policy: 3 attempts)");
        println!(
            "{:<22} {:>10} {:>18} {:>14} {:>14}",
            "budget", "calls/s", "upstream requests", "amplification", "simulated time"
        );
        for per_second in [1_000, 100] {
            for (name, budget) in [
                ("none", RetryBudget::unlimited()),
                ("TpsBudget(10s,10,0.2)", RetryBudget::default()),
            ] {
                let (requests, elapsed) = run(budget, per_second).await?;
                println!(
                    "{name:<22} {per_second:>10} {requests:>18} {:>14.3} {:>13.1}s",
                    requests as f64 / CALLS as f64,
                    elapsed.as_secs_f64()
                );
            }
        }
        Ok(())
    })
}

/// Sends `CALLS` calls at `per_second`; returns the requests the backend received and the
/// simulated time until the last call finished.
async fn run(budget: RetryBudget, per_second: u32) -> Result<(usize, Duration), BoxError> {
    let requests = Arc::new(AtomicUsize::new(0));
    let backend = {
        let requests = requests.clone();
        service_fn(move |_request: http::Request<Body>| {
            requests.fetch_add(1, Ordering::Relaxed);
            async {
                let status = Status::from(ApiError::unavailable("DOWN", "the backend is down"));
                Ok::<_, BoxError>(status.into_http::<Body>())
            }
        })
    };
    let service = RetryLayer::new(RetryPolicy::default(), budget)
        .with_seed(42)
        .layer(backend);

    let start = tokio::time::Instant::now();
    let gap = Duration::from_secs(1) / per_second;
    let mut calls = Vec::with_capacity(CALLS);
    for _ in 0..CALLS {
        let request = http::Request::builder()
            .uri("http://backend.test/weir.inference.v1.Inference/Generate")
            .body(Body::empty())?;
        // Every call ends UNAVAILABLE, as the retry layer hands back the last attempt's answer.
        calls.push(tokio::spawn(service.clone().oneshot(request)));
        tokio::time::sleep(gap).await;
    }
    for call in calls {
        call.await??;
    }
    Ok((requests.load(Ordering::Relaxed), start.elapsed()))
}
