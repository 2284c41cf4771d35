//! One trace per request: the spans the services export over OTLP, received by a real OTLP gRPC
//! collector endpoint in this process (opentelemetry-proto's `TraceService` on 127.0.0.1:0).
//!
//! Telemetry is global to a process, so this binary installs it once, pointed at the receiver, and
//! holds a single test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use opentelemetry_proto::tonic::{
    common::v1::any_value::Value,
    trace::v1::{Span, span::SpanKind, status::StatusCode},
};
use tokio_stream::StreamExt;
use weir::stack::Service;
use weir_mesh::telemetry::{self, TelemetryConfig};
use weir_proto::{router::complete_stream_response::Event, session::CreateSessionRequest};
use weir_tests::{
    Mesh, complete, complete_stream, eventually,
    otlp::{Collector, attribute, unhex},
};

fn string(span: &Span, key: &str) -> String {
    match attribute(span, key) {
        Some(Value::StringValue(s)) => s.clone(),
        other => panic!("{}: attribute {key} is {other:?}", span.name),
    }
}

fn int(span: &Span, key: &str) -> i64 {
    match attribute(span, key) {
        Some(Value::IntValue(i)) => *i,
        other => panic!("{}: attribute {key} is {other:?}", span.name),
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The spans of one trace, once spans named `names` have all arrived.
async fn spans_of(
    collector: &Collector,
    telemetry: &telemetry::Telemetry,
    trace_id: &[u8],
    names: &[&str],
) -> Vec<Span> {
    let complete = eventually(Duration::from_secs(15), || async {
        telemetry.flush().await;
        let spans = collector.trace(trace_id);
        names.iter().all(|n| spans.iter().any(|s| s.name == *n))
    })
    .await;
    let spans = collector.trace(trace_id);
    assert!(
        complete,
        "trace {} has {:?}, expected {names:?}",
        hex(trace_id),
        spans.iter().map(|s| &s.name).collect::<Vec<_>>()
    );
    spans
}

/// The one span of `spans` with this name and kind.
fn one<'a>(spans: &'a [Span], name: &str, kind: SpanKind) -> &'a Span {
    let found: Vec<&Span> = spans
        .iter()
        .filter(|s| s.name == name && s.kind == kind as i32)
        .collect();
    assert_eq!(
        found.len(),
        1,
        "{name} ({kind:?}) spans: {}; the trace holds {:?}",
        found.len(),
        spans.iter().map(|s| (&s.name, s.kind)).collect::<Vec<_>>()
    );
    found[0]
}

fn assert_rpc(span: &Span, kind: SpanKind, service: &str, method: &str) {
    assert_eq!(span.kind, kind as i32, "{} kind", span.name);
    assert_eq!(string(span, "rpc.system"), "grpc");
    assert_eq!(string(span, "rpc.service"), service);
    assert_eq!(string(span, "rpc.method"), method);
    assert_eq!(int(span, "rpc.grpc.status_code"), 0, "{} status", span.name);
    let status = span.status.clone().unwrap_or_default();
    assert_ne!(
        status.code,
        StatusCode::Error as i32,
        "{} failed",
        span.name
    );
}

fn assert_child(child: &Span, parent: &Span) {
    assert_eq!(
        hex(&child.parent_span_id),
        hex(&parent.span_id),
        "{} should be a child of {}",
        child.name,
        parent.name
    );
    assert!(child.start_time_unix_nano >= parent.start_time_unix_nano);
}

const ROUTER: &str = "weir.router.v1.RouterService";
const GENERATE: &str = "weir.inference.v1.InferenceService/Generate";
const INFERENCE: &str = "weir.inference.v1.InferenceService";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_trace_per_request_from_the_router_to_the_model() {
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
    assert!(telemetry.is_exporting());
    // Sessions and budgets on (the stack points the router at its in-process services).
    let mesh = Mesh::start_services(
        "[router]\nbudget_url = \"http://budget\"\n[router.rate_limit]\nenabled = false\n",
        &[
            Service::Router,
            Service::Inference,
            Service::Session,
            Service::Budget,
        ],
    )
    .await;
    let mut router = mesh.router();

    // Complete: router server → router client (Generate) → inference server → model call.
    let answer = router
        .complete(complete("sim-small", "trace me"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(answer.trace_id.len(), 32, "the answer names its trace");
    let trace_id = unhex(&answer.trace_id);
    let spans = spans_of(
        &collector,
        &telemetry,
        &trace_id,
        &[
            "weir.router.v1.RouterService/Complete",
            "weir.inference.v1.InferenceService/Generate",
            "chat sim-small",
        ],
    )
    .await;
    let server = one(
        &spans,
        "weir.router.v1.RouterService/Complete",
        SpanKind::Server,
    );
    assert!(
        server.parent_span_id.is_empty(),
        "the router's server span is the root"
    );
    assert_rpc(server, SpanKind::Server, ROUTER, "Complete");
    assert_eq!(string(server, "weir.service"), "router");
    // The router's client span and inference's server span are both named after the method.
    let client = one(&spans, GENERATE, SpanKind::Client);
    let inference = one(&spans, GENERATE, SpanKind::Server);
    assert_rpc(client, SpanKind::Client, INFERENCE, "Generate");
    assert_eq!(string(client, "weir.backend"), "sim-small");
    assert_child(client, server);
    assert_rpc(inference, SpanKind::Server, INFERENCE, "Generate");
    assert_child(inference, client);
    let model = one(&spans, "chat sim-small", SpanKind::Client);
    assert_child(model, inference);
    assert_eq!(string(model, "gen_ai.operation.name"), "chat");
    assert_eq!(string(model, "gen_ai.provider.name"), "weir.sim");
    assert_eq!(string(model, "gen_ai.request.model"), "sim-small");
    assert_eq!(string(model, "gen_ai.response.model"), "sim-small");
    let usage = answer.usage.unwrap();
    assert_eq!(int(model, "gen_ai.usage.input_tokens"), usage.input_tokens);
    assert_eq!(
        int(model, "gen_ai.usage.output_tokens"),
        usage.output_tokens
    );
    assert!(usage.output_tokens > 0);

    // CompleteStream: the same chain, the spans ending with the stream, and time to first token.
    let mut stream = router
        .complete_stream(complete_stream("sim-small", "stream and trace me"))
        .await
        .unwrap()
        .into_inner();
    let mut trace_id = Vec::new();
    let mut output_tokens = None;
    while let Some(event) = stream.next().await {
        match event.unwrap().event.unwrap() {
            Event::Start(start) => trace_id = unhex(&start.trace_id),
            Event::Done(done) => output_tokens = done.usage.map(|u| u.output_tokens),
            _ => {}
        }
    }
    assert_eq!(trace_id.len(), 16, "the start event names the trace");
    let spans = spans_of(
        &collector,
        &telemetry,
        &trace_id,
        &[
            "weir.router.v1.RouterService/CompleteStream",
            "chat sim-small",
        ],
    )
    .await;
    const GENERATE_STREAM: &str = "weir.inference.v1.InferenceService/GenerateStream";
    let server = one(
        &spans,
        "weir.router.v1.RouterService/CompleteStream",
        SpanKind::Server,
    );
    assert!(server.parent_span_id.is_empty());
    assert_rpc(server, SpanKind::Server, ROUTER, "CompleteStream");
    let client = one(&spans, GENERATE_STREAM, SpanKind::Client);
    let inference = one(&spans, GENERATE_STREAM, SpanKind::Server);
    assert_rpc(client, SpanKind::Client, INFERENCE, "GenerateStream");
    assert_child(client, server);
    assert_rpc(inference, SpanKind::Server, INFERENCE, "GenerateStream");
    assert_child(inference, client);
    // The router's server span lasts as long as the stream: it ends after inference's.
    assert!(server.end_time_unix_nano >= inference.end_time_unix_nano);
    let model = one(&spans, "chat sim-small", SpanKind::Client);
    assert_child(model, inference);
    assert_eq!(
        int(model, "gen_ai.usage.output_tokens"),
        output_tokens.unwrap()
    );
    match attribute(model, "gen_ai.server.time_to_first_token") {
        Some(Value::DoubleValue(seconds)) => assert!(*seconds >= 0.0),
        other => panic!("time to first token is {other:?}"),
    }

    // With a session: the router's calls to session and budget are in the same trace, each
    // callee's server span under the router's client span, every client span under the router's
    // server span (the settlement after the answer included).
    mesh.session()
        .create_session(CreateSessionRequest {
            session_id: "traced".to_string(),
            model: "sim-small".to_string(),
            ..CreateSessionRequest::default()
        })
        .await
        .unwrap();
    let mut request = complete("sim-small", "remember me");
    request.session_id = "traced".to_string();
    let answer = router.complete(request).await.unwrap().into_inner();
    assert!(answer.cost_micros > 0, "the answer was metered");
    let trace_id = unhex(&answer.trace_id);
    let calls = [
        ("weir.session.v1.SessionService", "GetContext"),
        ("weir.budget.v1.BudgetService", "Reserve"),
        ("weir.inference.v1.InferenceService", "Generate"),
        ("weir.budget.v1.BudgetService", "Commit"),
        ("weir.session.v1.SessionService", "AppendTurns"),
    ];
    let names: Vec<String> = calls.iter().map(|(s, m)| format!("{s}/{m}")).collect();
    let mut wanted: Vec<&str> = names.iter().map(String::as_str).collect();
    // The router's own span ends last (after the answer is sent): wait for it too.
    wanted.push("weir.router.v1.RouterService/Complete");
    let spans = spans_of(&collector, &telemetry, &trace_id, &wanted).await;
    let server = one(
        &spans,
        "weir.router.v1.RouterService/Complete",
        SpanKind::Server,
    );
    assert!(server.parent_span_id.is_empty());
    for ((service, method), name) in calls.iter().zip(&names) {
        let callee = one(&spans, name, SpanKind::Server);
        assert_rpc(callee, SpanKind::Server, service, method);
        // The client span may sit under a span of the router's own (a settlement task), but it
        // belongs to the router's server span's subtree and is the callee's parent.
        let client = spans
            .iter()
            .find(|s| s.span_id == callee.parent_span_id)
            .unwrap_or_else(|| panic!("{name}: the callee's parent is not in the trace"));
        assert_eq!(client.kind, SpanKind::Client as i32, "{name}");
        assert_rpc(client, SpanKind::Client, service, method);
        let mut ancestor = client;
        while !ancestor.parent_span_id.is_empty() {
            ancestor = spans
                .iter()
                .find(|s| s.span_id == ancestor.parent_span_id)
                .unwrap_or_else(|| panic!("{name}: a broken parent link"));
        }
        assert_eq!(
            ancestor.span_id, server.span_id,
            "{name} is under the router"
        );
    }

    mesh.stop().await;

    // The resilience layers' decisions are in the trace: a model that always fails is retried
    // (events on its client span, which ends UNAVAILABLE), and the router falls back (an event on
    // its server span) to a model that answers.
    let mesh = Mesh::start_services(
        r#"
        [models.sim-broken]
        sim = { error_rate = 1.0 }
        [models.sim-ok]
        sim = { output_tokens = 8 }
        [router.routes.flaky]
        models = ["sim-broken", "sim-ok"]
        [router.rate_limit]
        enabled = false
        "#,
        &[Service::Router, Service::Inference],
    )
    .await;
    let answer = mesh
        .router()
        .complete(complete("flaky", "fall back"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(answer.model, "sim-ok");
    let trace_id = unhex(&answer.trace_id);
    // The router's server span ends after its answer is sent, so after the model's span: wait
    // for both.
    let spans = spans_of(
        &collector,
        &telemetry,
        &trace_id,
        &["chat sim-ok", "weir.router.v1.RouterService/Complete"],
    )
    .await;
    let server = one(
        &spans,
        "weir.router.v1.RouterService/Complete",
        SpanKind::Server,
    );
    let failed: Vec<&Span> = spans
        .iter()
        .filter(|s| s.name == GENERATE && s.kind == SpanKind::Client as i32)
        .filter(|s| string(s, "weir.backend") == "sim-broken")
        .collect();
    assert_eq!(failed.len(), 1, "one client span for the failing model");
    let failed = failed[0];
    assert_child(failed, server);
    assert_eq!(int(failed, "rpc.grpc.status_code"), 14, "UNAVAILABLE");
    assert_eq!(
        failed.status.clone().unwrap_or_default().code,
        StatusCode::Error as i32
    );
    let retries = failed
        .events
        .iter()
        .filter(|e| e.name == "retrying")
        .count();
    assert!(retries >= 1, "retries are events on the client span");
    // Each attempt reached inference: its server spans are children of the one client span.
    let attempts = spans
        .iter()
        .filter(|s| s.kind == SpanKind::Server as i32 && s.parent_span_id == failed.span_id)
        .count();
    assert_eq!(attempts, retries + 1, "every attempt is traced");
    assert!(
        server.events.iter().any(|e| e.name == "model call failed"),
        "the fallback decision is an event on the router's span: {:?}",
        server.events.iter().map(|e| &e.name).collect::<Vec<_>>()
    );

    mesh.stop().await;
    telemetry.shutdown().await;
}
