//! Traces never cost a request its answer: with the OTLP endpoint pointing at a closed port,
//! every call succeeds, and none waits for the exporter.
//!
//! The telemetry of a process is global, so this binary holds a single test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use weir::stack::Service;
use weir_mesh::telemetry::{self, TelemetryConfig};
use weir_tests::{Mesh, complete};

/// The median and the slowest of `calls` sequential `Complete` calls.
async fn time_calls(mesh: &Mesh, calls: usize) -> (Duration, Duration) {
    let mut router = mesh.router();
    let mut times = Vec::with_capacity(calls);
    for i in 0..calls {
        let started = Instant::now();
        let answer = router
            .complete(complete("sim-zero", &format!("call {i}")))
            .await
            .expect("the call succeeds whatever the collector does");
        times.push(started.elapsed());
        assert_eq!(
            answer.into_inner().trace_id.len(),
            32,
            "the answer names its trace"
        );
    }
    times.sort();
    (times[times.len() / 2], times[times.len() - 1])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_collector_that_is_down_costs_requests_nothing() {
    // A port that was free a moment ago and has no listener now.
    let closed = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap()
    };
    const EXPORT_TIMEOUT: Duration = Duration::from_secs(3);
    let telemetry = telemetry::init(
        &TelemetryConfig {
            otlp_endpoint: format!("http://{closed}"),
            metrics_listen: None,
            export_timeout: EXPORT_TIMEOUT,
            ..TelemetryConfig::default()
        },
        "weir-tests",
    )
    .unwrap();
    assert!(telemetry.is_exporting());
    // A model that answers at once, so the calls measure the path, not a simulated model.
    let mesh = Mesh::start_services(
        "[models.sim-zero]\nsim = { output_tokens = 16 }\n[router.rate_limit]\nenabled = false\n",
        &[Service::Router, Service::Inference],
    )
    .await;

    // Enough calls to fill several export batches (4 spans each) while every export fails.
    let (median, slowest) = time_calls(&mesh, 600).await;
    // Forcing an export against the closed port fails in the exporter's thread, not here.
    telemetry.flush().await;
    let (median_after, slowest_after) = time_calls(&mesh, 200).await;
    println!(
        "collector down: median {median:?} (slowest {slowest:?}); after a failed flush: median \
         {median_after:?} (slowest {slowest_after:?})"
    );
    // A call that waited on an export would take at least the export timeout.
    assert!(slowest < EXPORT_TIMEOUT / 2, "slowest call {slowest:?}");
    assert!(
        slowest_after < EXPORT_TIMEOUT / 2,
        "slowest call {slowest_after:?}"
    );

    mesh.stop().await;
    telemetry.shutdown().await;
}
