//! Trace context: one span per RPC, linked across services by W3C `traceparent`/`tracestate` in
//! the gRPC metadata, so that one request is one trace from the router to every service it calls.
//!
//! [`TraceLayer::server`] (outermost on every server) reads the caller's `traceparent`, opens a
//! server span that continues the caller's trace (or starts one, at the router), and runs the
//! handler, and then every poll of the response body, inside it; the span ends when the response
//! does: for a stream, after its last message. [`TraceLayer::client`] (outermost in every
//! [`ClientStack`](crate::client::ClientStack)) opens a client span under the current span and
//! writes its context into the outgoing request, so the callee's server span is its child.
//!
//! Spans follow the OpenTelemetry RPC conventions: named `package.Service/Method`, kind server or
//! client, with `rpc.system = "grpc"`, `rpc.service`, `rpc.method` and, when the call ends,
//! `rpc.grpc.status_code`. A server span is an error for the codes that are the server's fault
//! (UNKNOWN, DEADLINE_EXCEEDED, UNIMPLEMENTED, INTERNAL, UNAVAILABLE, DATA_LOSS); a client span for
//! any code but OK. Client spans carry the call's backend (`weir.backend`, the model for the
//! router's calls to inference) and, when a layer below refused the call, its reason
//! (`weir.error.reason`, e.g. `CIRCUIT_OPEN`). Server spans name the caller's tenant
//! (`weir.tenant`) only as the auth layer authenticated it, never from the raw header. The
//! resilience layers' decisions (a retry, a shed request, a rate-limited tenant) are events inside
//! these spans.
//!
//! The spans are `tracing` spans; [`crate::telemetry`] turns them into OpenTelemetry spans and
//! exports them. Without it (a program that never called `telemetry::init`) the layers cost a
//! disabled span and propagate nothing. Health and reflection calls are not traced.

use std::{
    future::Future,
    pin::Pin,
    task::{Context as TaskContext, Poll},
    time::Instant,
};

use opentelemetry::{
    Context,
    propagation::{Extractor, Injector, TextMapPropagator},
    trace::{Status as SpanStatus, TraceContextExt},
};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tonic::Code;
use tonic_types::StatusExt;
use tower::{BoxError, Layer, Service};
use tracing::{Instrument, Span};
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::{
    admission::is_exempt_path,
    backend::BackendKey,
    error::code_name,
    outcome::find_status,
    rpc::{ObservedBody, Observer, RpcName},
};

/// The W3C trace-context header, `00-<trace id>-<span id>-<flags>`.
pub const TRACEPARENT: &str = "traceparent";
/// The W3C vendor trace-state header.
pub const TRACESTATE: &str = "tracestate";

/// Writes a context into HTTP headers (gRPC metadata).
struct HeaderInjector<'a>(&'a mut http::HeaderMap);

impl Injector for HeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(name), Ok(value)) = (
            http::header::HeaderName::from_bytes(key.as_bytes()),
            http::HeaderValue::from_str(&value),
        ) {
            self.0.insert(name, value);
        }
    }
}

/// Reads a context from HTTP headers (gRPC metadata).
struct HeaderExtractor<'a>(&'a http::HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(http::HeaderName::as_str).collect()
    }
}

/// The trace context a caller sent in `headers` (an empty context when it sent none or a
/// malformed one: the server then starts a new trace).
pub fn extract(headers: &http::HeaderMap) -> Context {
    TraceContextPropagator::new().extract(&HeaderExtractor(headers))
}

/// Writes `span`'s trace context into `headers` as `traceparent` (and `tracestate`), replacing
/// any the caller put there. Nothing is written for a span with no valid context.
pub fn inject(span: &Span, headers: &mut http::HeaderMap) {
    let context = span.context();
    if context.span().span_context().is_valid() {
        TraceContextPropagator::new().inject_context(&context, &mut HeaderInjector(headers));
    }
}

/// The trace id of the current span (32 lowercase hex digits), or `None` when there is no valid
/// trace (telemetry not installed). Services put it in their answers so a user can find the
/// trace of a request.
pub fn current_trace_id() -> Option<String> {
    let context = Span::current().context();
    let span = context.span();
    let span_context = span.span_context();
    span_context
        .is_valid()
        .then(|| span_context.trace_id().to_string())
}

/// Sets an OpenTelemetry attribute on `span` (any time before it ends; a no-op for a disabled
/// span). Values are strings, integers, floats or booleans.
pub fn set_attribute(span: &Span, key: &'static str, value: impl Into<opentelemetry::Value>) {
    if !span.is_disabled() {
        span.set_attribute(key, value);
    }
}

/// Marks `span` failed with `code`: error status and `error.type` = the code's name.
pub fn set_error(span: &Span, code: Code) {
    if !span.is_disabled() {
        span.set_attribute("error.type", code_name(code));
        span.set_status(SpanStatus::error(code_name(code)));
    }
}

/// Whether a server answered with a code that is its own failure (OpenTelemetry's RPC
/// conventions for server spans); the others describe the request.
pub fn is_server_error(code: Code) -> bool {
    matches!(
        code,
        Code::Unknown
            | Code::DeadlineExceeded
            | Code::Unimplemented
            | Code::Internal
            | Code::Unavailable
            | Code::DataLoss
    )
}

/// Which end of a call a [`TraceLayer`] observes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    Server { service: &'static str },
    Client,
}

/// Opens a span per RPC and carries the trace context across the call (see the
/// [module docs](self)).
#[derive(Debug, Clone, Copy)]
pub struct TraceLayer {
    side: Side,
}

impl TraceLayer {
    /// The server side: continues the caller's trace. `service` names the Weir service in the
    /// span (`weir.service`, e.g. `"router"`).
    pub fn server(service: &'static str) -> Self {
        Self {
            side: Side::Server { service },
        }
    }

    /// The client side: a child span of the current one, sent on in `traceparent`.
    pub fn client() -> Self {
        Self { side: Side::Client }
    }
}

impl<S> Layer<S> for TraceLayer {
    type Service = Trace<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Trace {
            inner,
            side: self.side,
        }
    }
}

/// The service of a [`TraceLayer`].
#[derive(Debug, Clone)]
pub struct Trace<S> {
    inner: S,
    side: Side,
}

/// Ends a call's span with its code.
#[derive(Debug)]
pub struct SpanObserver {
    span: Span,
    side: Side,
}

impl Observer for SpanObserver {
    fn scope<R>(&self, poll: impl FnOnce() -> R) -> R {
        self.span.in_scope(poll)
    }

    fn end(self, code: Code, _started: Instant) {
        record_code(&self.span, self.side, code);
    }
}

fn record_code(span: &Span, side: Side, code: Code) {
    if span.is_disabled() {
        return;
    }
    span.set_attribute("rpc.grpc.status_code", i64::from(code as i32));
    let error = match side {
        Side::Server { .. } => is_server_error(code),
        Side::Client => code != Code::Ok,
    };
    if error {
        span.set_status(SpanStatus::error(code_name(code)));
    }
}

/// The response future of [`Trace`].
pub type TraceFuture<B, E> =
    Pin<Box<dyn Future<Output = Result<http::Response<ObservedBody<B, SpanObserver>>, E>> + Send>>;

impl<S, ReqBody, ResBody> Service<http::Request<ReqBody>> for Trace<S>
where
    S: Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
{
    type Response = http::Response<ObservedBody<ResBody, SpanObserver>>;
    type Error = BoxError;
    type Future = TraceFuture<ResBody, BoxError>;

    fn poll_ready(&mut self, cx: &mut TaskContext<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, mut request: http::Request<ReqBody>) -> Self::Future {
        let started = Instant::now();
        let side = self.side;
        let span = if is_exempt_path(request.uri().path()) {
            Span::none()
        } else {
            let name = RpcName::from_path(request.uri().path());
            match side {
                Side::Server { service } => server_span(&name, service, request.headers()),
                Side::Client => {
                    let backend = request
                        .extensions()
                        .get::<BackendKey>()
                        .map(ToString::to_string);
                    let span = client_span(&name, backend.as_deref());
                    inject(&span, request.headers_mut());
                    span
                }
            }
        };
        let future = {
            let _entered = span.enter();
            self.inner.call(request)
        };
        let in_span = span.clone();
        Box::pin(
            async move {
                match future.await {
                    Ok(response) => {
                        let observer = SpanObserver { span, side };
                        let on_error = match side {
                            Side::Server { .. } => Code::Internal,
                            Side::Client => Code::Unavailable,
                        };
                        Ok(ObservedBody::wrap(response, observer, started, on_error))
                    }
                    Err(error) => {
                        let error: BoxError = error.into();
                        let outcome = crate::outcome::classify_error(&*error);
                        if let Some(status) = find_status(&*error)
                            && let Some(info) = status.get_error_details().error_info()
                        {
                            span.set_attribute("weir.error.reason", info.reason.clone());
                        }
                        record_code(&span, side, outcome.code);
                        Err(error)
                    }
                }
            }
            .instrument(in_span),
        )
    }
}

/// The span of one RPC of `kind` (`"server"` or `"client"`), with the RPC conventions
/// attributes.
fn rpc_span(name: &RpcName, kind: &'static str) -> Span {
    let span_name = name.span_name();
    tracing::info_span!(
        "grpc",
        otel.name = span_name.as_str(),
        otel.kind = kind,
        rpc.system = "grpc",
        rpc.service = name.service.as_str(),
        rpc.method = name.method.as_str(),
    )
}

/// The server span of a call: a child of the caller's context from `headers`.
fn server_span(name: &RpcName, service: &'static str, headers: &http::HeaderMap) -> Span {
    let span = rpc_span(name, "server");
    if span.is_disabled() {
        return span;
    }
    span.set_attribute("weir.service", service);
    // No `weir.tenant` here: the header is whatever the client claimed. The auth layer records
    // the tenant it authenticated on this span.
    let parent = extract(headers);
    if parent.span().span_context().is_valid() {
        // Only fails when the span has already started, which it cannot have here.
        let _ = span.set_parent(parent);
    }
    span
}

/// The client span of a call: a child of the current span.
fn client_span(name: &RpcName, backend: Option<&str>) -> Span {
    let span = rpc_span(name, "client");
    if let Some(backend) = backend
        && !span.is_disabled()
    {
        span.set_attribute("weir.backend", backend.to_string());
    }
    span
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn a_traceparent_is_extracted() {
        let mut headers = http::HeaderMap::new();
        headers.insert(
            TRACEPARENT,
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
                .parse()
                .unwrap(),
        );
        let context = extract(&headers);
        let span = context.span();
        let span_context = span.span_context();
        assert!(span_context.is_valid());
        assert!(span_context.is_remote());
        assert!(span_context.is_sampled());
        assert_eq!(
            span_context.trace_id().to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert_eq!(span_context.span_id().to_string(), "00f067aa0ba902b7");
    }

    #[test]
    fn a_malformed_traceparent_starts_a_new_trace() {
        let mut headers = http::HeaderMap::new();
        headers.insert(TRACEPARENT, "00-nonsense-01".parse().unwrap());
        assert!(!extract(&headers).span().span_context().is_valid());
        assert!(
            !extract(&http::HeaderMap::new())
                .span()
                .span_context()
                .is_valid()
        );
    }

    #[test]
    fn without_telemetry_nothing_is_injected() {
        let mut headers = http::HeaderMap::new();
        inject(&Span::none(), &mut headers);
        assert!(headers.get(TRACEPARENT).is_none());
        assert_eq!(current_trace_id(), None);
    }

    #[test]
    fn server_errors_are_the_servers_fault_only() {
        assert!(is_server_error(Code::Unavailable));
        assert!(is_server_error(Code::Internal));
        assert!(is_server_error(Code::DeadlineExceeded));
        assert!(!is_server_error(Code::InvalidArgument));
        assert!(!is_server_error(Code::ResourceExhausted));
        assert!(!is_server_error(Code::Ok));
    }
}
