//! RPC metrics on every server: how many calls ended with which code, and how long they took.
//!
//! [`RpcMetricsLayer`] sits just inside the trace layer on every server (docs/architecture.md, section 5), so
//! it counts every call the server answered, including the ones the deadline, admission, auth and
//! rate-limit layers refused:
//!
//! - `weir_rpc_server_requests_total{service, rpc_service, rpc_method, grpc_code}`: calls that
//!   ended, by final code (`OK`, `UNAVAILABLE`, ...; `CANCELLED` when the client went away before
//!   the end);
//! - `weir_rpc_server_duration_seconds{service, rpc_service, rpc_method}`: a histogram of the
//!   time from the request's arrival to the end of the response (a stream's last message, not its
//!   first), in seconds;
//! - `weir_rpc_server_in_flight{service}`: calls started and not yet ended.
//!
//! `service` is the Weir service (`router`, `inference`, ...), `rpc_service` and `rpc_method` the
//! gRPC names. Health and reflection calls are not counted. The values go to the `metrics` facade;
//! [`crate::telemetry`] exports them to Prometheus.

use std::{
    future::Future,
    pin::Pin,
    task::{Context, Poll},
    time::Instant,
};

use pin_project_lite::pin_project;
use tonic::Code;
use tower::{Layer, Service};

use crate::{
    admission::is_exempt_path,
    error::code_name,
    rpc::{ObservedBody, Observer, RpcName},
};

/// Counter of finished server calls.
pub const REQUESTS_TOTAL: &str = "weir_rpc_server_requests_total";
/// Histogram of server call durations, in seconds.
pub const DURATION_SECONDS: &str = "weir_rpc_server_duration_seconds";
/// Gauge of server calls in flight.
pub const IN_FLIGHT: &str = "weir_rpc_server_in_flight";

/// Records the metrics of every call a server answers (see the [module docs](self)).
#[derive(Debug, Clone, Copy)]
pub struct RpcMetricsLayer {
    service: &'static str,
}

impl RpcMetricsLayer {
    /// Labels the metrics with `service` (the Weir service's config name, e.g. `"router"`).
    pub fn new(service: &'static str) -> Self {
        Self { service }
    }
}

impl<S> Layer<S> for RpcMetricsLayer {
    type Service = RpcMetrics<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RpcMetrics {
            inner,
            service: self.service,
        }
    }
}

/// The service of an [`RpcMetricsLayer`].
#[derive(Debug, Clone)]
pub struct RpcMetrics<S> {
    inner: S,
    service: &'static str,
}

/// Records one call's metrics when it ends.
#[derive(Debug)]
pub struct CallMetrics {
    service: &'static str,
    // `None` for calls that are not counted (health, reflection).
    name: Option<RpcName>,
}

impl CallMetrics {
    fn start(service: &'static str, path: &str) -> Self {
        let name = (!is_exempt_path(path)).then(|| RpcName::from_path(path));
        if name.is_some() {
            metrics::gauge!(IN_FLIGHT, "service" => service).increment(1.0);
        }
        Self { service, name }
    }
}

impl CallMetrics {
    fn uncounted() -> Self {
        Self {
            service: "",
            name: None,
        }
    }
}

impl Observer for CallMetrics {
    fn end(self, code: Code, started: Instant) {
        let Some(name) = self.name else {
            return;
        };
        metrics::gauge!(IN_FLIGHT, "service" => self.service).decrement(1.0);
        metrics::counter!(
            REQUESTS_TOTAL,
            "service" => self.service,
            "rpc_service" => name.service.clone(),
            "rpc_method" => name.method.clone(),
            "grpc_code" => code_name(code),
        )
        .increment(1);
        metrics::histogram!(
            DURATION_SECONDS,
            "service" => self.service,
            "rpc_service" => name.service,
            "rpc_method" => name.method,
        )
        .record(started.elapsed().as_secs_f64());
    }
}

impl<S, ReqBody, ResBody> Service<http::Request<ReqBody>> for RpcMetrics<S>
where
    S: Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
{
    type Response = http::Response<ObservedBody<ResBody, CallMetrics>>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<ReqBody>) -> Self::Future {
        let call = CallMetrics::start(self.service, request.uri().path());
        ResponseFuture {
            inner: self.inner.call(request),
            pending: Pending {
                call: Some(call),
                started: Instant::now(),
            },
        }
    }
}

pin_project! {
    /// The response future of [`RpcMetrics`].
    pub struct ResponseFuture<F> {
        #[pin]
        inner: F,
        pending: Pending,
    }
}

/// A call whose response has not come yet: if it is dropped (the client went away before the
/// handler answered), the call ends as CANCELLED.
#[derive(Debug)]
struct Pending {
    call: Option<CallMetrics>,
    started: Instant,
}

impl Drop for Pending {
    fn drop(&mut self) {
        if let Some(call) = self.call.take() {
            call.end(Code::Cancelled, self.started);
        }
    }
}

impl<F, B, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<http::Response<B>, E>>,
{
    type Output = Result<http::Response<ObservedBody<B, CallMetrics>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let result = std::task::ready!(this.inner.poll(cx));
        let started = this.pending.started;
        let Some(call) = this.pending.call.take() else {
            // Polled after completion: a caller bug; the call was already recorded.
            return Poll::Ready(result.map(|response| {
                ObservedBody::wrap(response, CallMetrics::uncounted(), started, Code::Internal)
            }));
        };
        Poll::Ready(match result {
            Ok(response) => Ok(ObservedBody::wrap(response, call, started, Code::Internal)),
            Err(error) => {
                call.end(Code::Internal, started);
                Err(error)
            }
        })
    }
}
