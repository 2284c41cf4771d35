//! Replicas: a router over two inference servers and two budget servers (real gRPC servers, the
//! budgets on one Redis), balanced per call. One inference server is stopped in the middle of a
//! steady load and started again on its address: no request fails, the model's breaker never
//! opens, and the restarted server takes calls again once its ejection is over.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::Duration,
};

use tonic::Code;
use weir::stack::Service;
use weir_tests::{Mesh, complete, eventually, reason, redis_url, unique_prefix};

const MODEL: &str = "sim-priced";
/// Requests in flight at any time.
const CONCURRENCY: usize = 4;

fn config(prefix: &str) -> String {
    format!(
        r#"
[server]
drain_delay = "100ms"

[models.sim-priced]
sim = {{ output_tokens = 4, added_latency = "10ms" }}
price = {{ input_micros_per_mtok = 1000000, output_micros_per_mtok = 1000000 }}

[router]
session_url = ""

[router.rate_limit]
enabled = false

[router.routes.auto]
models = ["sim-priced"]

[router.client.inference.balance]
base_ejection_time = "500ms"

[budget]
redis_url = "{redis}"
key_prefix = "{prefix}"
"#,
        redis = redis_url()
    )
}

/// What the load saw.
#[derive(Default)]
struct Tally {
    served: AtomicUsize,
    failures: Mutex<Vec<tonic::Status>>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stopped_inference_replica_fails_no_request_and_serves_again_after_restart() {
    // Before the router makes its endpoints, so their counters are recorded.
    let metrics = weir_mesh::telemetry::install_metrics_recorder();
    let prefix = unique_prefix();
    let toml = config(&prefix);
    let first = Mesh::start_services(&toml, &[Service::Inference, Service::Budget]).await;
    let second = Mesh::start_services(&toml, &[Service::Inference, Service::Budget]).await;
    let second_inference = second.addr(Service::Inference);
    let list = |service| format!("{},{}", first.url(service), second.url(service));
    let (inference_urls, budget_urls) = (list(Service::Inference), list(Service::Budget));
    let router = Mesh::start_with(&toml, &[Service::Router], |c| {
        c.router.inference_url = inference_urls;
        c.router.budget_url = budget_urls;
    })
    .await;

    let tally = Arc::new(Tally::default());
    let stop = Arc::new(AtomicBool::new(false));
    let mut load = Vec::new();
    for _ in 0..CONCURRENCY {
        let (mut client, tally, stop) = (router.router(), tally.clone(), stop.clone());
        load.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                match client.complete(complete(MODEL, "hello replicas")).await {
                    Ok(_) => {
                        tally.served.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(status) => tally.failures.lock().unwrap().push(status),
                }
            }
        }));
    }
    let served_by = |mesh: &Mesh| mesh.inference_api().sim_requests_for(MODEL).len();
    assert!(
        eventually(Duration::from_secs(10), || async {
            served_by(&first) > 10 && served_by(&second) > 10
        })
        .await,
        "both replicas serve"
    );

    second.stop().await;
    let at_stop = tally.served.load(Ordering::Relaxed);
    let first_at_stop = served_by(&first);
    assert!(
        eventually(Duration::from_secs(20), || async {
            tally.served.load(Ordering::Relaxed) > at_stop + 100
        })
        .await,
        "the load goes on over the remaining replica"
    );
    assert!(served_by(&first) > first_at_stop + 100);
    // The stopped replica was ejected, not just retried around.
    let ejections = format!(
        "weir_endpoint_ejections_total{{service=\"inference\",endpoint=\"{second_inference}\"}}"
    );
    let exposition = metrics.render();
    let ejected = exposition
        .lines()
        .find_map(|line| line.strip_prefix(ejections.as_str()))
        .and_then(|value| value.trim().parse::<f64>().ok());
    assert!(
        ejected.is_some_and(|n| n >= 1.0),
        "{ejections} in:\n{exposition}"
    );

    // A new process on the stopped one's address: back in the set after its ejection.
    let restarted = Mesh::start_with(&toml, &[Service::Inference], |c| {
        c.inference.listen = second_inference;
    })
    .await;
    assert!(
        eventually(Duration::from_secs(20), || async {
            served_by(&restarted) > 10
        })
        .await,
        "the restarted replica takes calls again"
    );

    stop.store(true, Ordering::Relaxed);
    for task in load {
        task.await.unwrap();
    }
    let served = tally.served.load(Ordering::Relaxed);
    let failures = std::mem::take(&mut *tally.failures.lock().unwrap());
    println!(
        "served {served} requests, {} failed ({:?})",
        failures.len(),
        failures.iter().map(reason).collect::<Vec<_>>()
    );
    // Calls in flight on the stopped server are drained (or retried on its sibling by the
    // router): at most those could fail, as UNAVAILABLE, never for an open circuit.
    assert!(failures.len() <= CONCURRENCY, "{failures:?}");
    for status in failures.iter() {
        assert_eq!(status.code(), Code::Unavailable, "{status:?}");
        assert_ne!(reason(status), "CIRCUIT_OPEN", "{status:?}");
    }

    for mesh in [router, restarted, first] {
        mesh.stop().await;
    }
    weir_tests::delete_prefix(&prefix).await;
}
