//! Trace attributes name the authenticated tenant only: a caller with a key that also claims
//! another tenant in `weir-tenant` shows up as its key's tenant on the router's server span and on
//! the inference server span of the router's (mesh-token) call.
//!
//! Telemetry is global to a process, so this binary installs it once and holds a single test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use opentelemetry_proto::tonic::{
    common::v1::any_value::Value,
    trace::v1::{Span, span::SpanKind},
};
use weir_mesh::{
    metadata::TENANT,
    telemetry::{self, TelemetryConfig},
};
use weir_tests::{
    Mesh, complete, eventually,
    otlp::{Collector, attribute, unhex},
    with_key,
};

const KEY: &str = "tracing-tenant-key-0123456789abcdef";

fn tenant_of(spans: &[Span], name: &str) -> Option<String> {
    let span = spans
        .iter()
        .find(|s| s.name == name && s.kind == SpanKind::Server as i32)?;
    attribute(span, "weir.tenant").map(|value| match value {
        Value::StringValue(s) => s.clone(),
        other => format!("{other:?}"),
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_name_the_tenant_the_key_says_not_the_header() {
    let (collector, endpoint) = Collector::start().await;
    let telemetry = telemetry::init(
        &TelemetryConfig {
            otlp_endpoint: endpoint,
            metrics_listen: None,
            ..TelemetryConfig::default()
        },
        "weir-tests",
    )
    .unwrap();
    let mesh = Mesh::start(&format!(
        "[router.rate_limit]\nenabled = false\n\
         [[auth.api_keys]]\ntenant = \"acme\"\nkey = \"{KEY}\"\n"
    ))
    .await;
    let mut request = with_key(complete("sim-small", "whose call is this?"), KEY);
    request
        .metadata_mut()
        .insert(TENANT, "victim".parse().unwrap());
    let answer = mesh.router().complete(request).await.unwrap().into_inner();
    let trace_id = unhex(&answer.trace_id);

    const COMPLETE: &str = "weir.router.v1.RouterService/Complete";
    const GENERATE: &str = "weir.inference.v1.InferenceService/Generate";
    let arrived = eventually(Duration::from_secs(15), || async {
        telemetry.flush().await;
        let spans = collector.trace(&trace_id);
        tenant_of(&spans, COMPLETE).is_some() && tenant_of(&spans, GENERATE).is_some()
    })
    .await;
    let spans = collector.trace(&trace_id);
    assert!(arrived, "server spans with weir.tenant: {spans:?}");
    assert_eq!(tenant_of(&spans, COMPLETE).as_deref(), Some("acme"));
    assert_eq!(
        tenant_of(&spans, GENERATE).as_deref(),
        Some("acme"),
        "inference believes the router's mesh token, not the client's header"
    );

    // A refused call names no tenant at all, whatever it claimed. (It continues a trace of ours,
    // since it gets no answer to read a trace id from.)
    let refused_trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let mut refused = tonic::Request::new(complete("sim-small", "let me in"));
    refused
        .metadata_mut()
        .insert(TENANT, "victim".parse().unwrap());
    refused.metadata_mut().insert(
        "traceparent",
        format!("00-{refused_trace}-00f067aa0ba902b7-01")
            .parse()
            .unwrap(),
    );
    let status = mesh.router().complete(refused).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unauthenticated);
    let refused_id = unhex(refused_trace);
    let server_span = |spans: &[Span]| {
        spans
            .iter()
            .any(|s| s.name == COMPLETE && s.kind == SpanKind::Server as i32)
    };
    let arrived = eventually(Duration::from_secs(15), || async {
        telemetry.flush().await;
        server_span(&collector.trace(&refused_id))
    })
    .await;
    assert!(arrived, "the refused call's server span arrived");
    assert_eq!(tenant_of(&collector.trace(&refused_id), COMPLETE), None);
    mesh.stop().await;
    telemetry.shutdown().await;
}
