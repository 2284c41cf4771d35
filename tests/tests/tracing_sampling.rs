//! Parent-based sampling, seen from a real OTLP collector endpoint: with `sampling_ratio = 0` no
//! new trace is exported (answers still name their trace), but a caller that sends a sampled W3C
//! `traceparent` gets its trace continued and exported, the router's span under the caller's.
//!
//! The telemetry of a process is global, so this binary holds a single test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{collections::HashSet, time::Duration};

use tonic::metadata::MetadataValue;
use weir::stack::Service;
use weir_mesh::telemetry::{self, TelemetryConfig};
use weir_tests::{
    Mesh, complete, eventually,
    otlp::{Collector, unhex},
};

const CALLER_TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CALLER_SPAN: &str = "00f067aa0ba902b7";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_traces_follow_the_ratio_and_callers_decisions_are_kept() {
    let (collector, endpoint) = Collector::start().await;
    let telemetry = telemetry::init(
        &TelemetryConfig {
            otlp_endpoint: endpoint,
            sampling_ratio: 0.0,
            metrics_listen: None,
            ..TelemetryConfig::default()
        },
        "weir-tests",
    )
    .unwrap();
    let mesh = Mesh::start_services(
        "[models.sim-zero]\nsim = { output_tokens = 8 }\n[router.rate_limit]\nenabled = false\n",
        &[Service::Router, Service::Inference],
    )
    .await;
    let mut router = mesh.router();

    // New traces: none kept, each answer names its own.
    let mut trace_ids = HashSet::new();
    for i in 0..20 {
        let answer = router
            .complete(complete("sim-zero", &format!("unsampled {i}")))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(answer.trace_id.len(), 32);
        trace_ids.insert(answer.trace_id);
    }
    assert_eq!(trace_ids.len(), 20, "every request is its own trace");

    // A caller's sampled trace: continued, and exported whatever the ratio says.
    let mut request = tonic::Request::new(complete("sim-zero", "sampled by my caller"));
    request.metadata_mut().insert(
        "traceparent",
        MetadataValue::try_from(format!("00-{CALLER_TRACE}-{CALLER_SPAN}-01")).unwrap(),
    );
    let answer = router.complete(request).await.unwrap().into_inner();
    assert_eq!(
        answer.trace_id, CALLER_TRACE,
        "the caller's trace is continued"
    );
    let trace = unhex(CALLER_TRACE);
    let exported = eventually(Duration::from_secs(15), || async {
        telemetry.flush().await;
        collector
            .trace(&trace)
            .iter()
            .any(|s| s.name == "chat sim-zero")
    })
    .await;
    assert!(exported, "the caller's sampled trace was exported");
    let spans = collector.trace(&trace);
    let router_span = spans
        .iter()
        .find(|s| s.name == "weir.router.v1.RouterService/Complete")
        .expect("the router's span");
    assert_eq!(
        router_span.parent_span_id,
        unhex(CALLER_SPAN),
        "the router's span is the caller's child"
    );
    // Nothing of the unsampled traces was exported: every span received is the caller's trace.
    assert!(!collector.is_empty());
    assert_eq!(collector.trace(&trace).len(), collector.len());

    mesh.stop().await;
    telemetry.shutdown().await;
}
