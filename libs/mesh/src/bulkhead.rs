//! Bulkhead: a concurrency limit per backend, so one slow backend cannot take every slot.
//!
//! # Why per backend?
//!
//! A caller has a finite number of things it can wait on at once (tasks, connections, memory,
//! the patience of its own callers). Without a partition, a backend that slows down from 1 s to
//! 30 s per call soon holds every in-flight call of the router, and calls to perfectly healthy
//! backends queue behind it: one slow model becomes a full outage. A ship's bulkheads keep one
//! flooded compartment from sinking the hull; here each [`BackendKey`] gets its own
//! [`Compartment`] with its own limit, and when a compartment is full a call to that backend is
//! refused **at once** with UNAVAILABLE, reason `BULKHEAD_FULL` (ErrorInfo metadata `backend`),
//! which the router answers with a fallback, while every other backend is unaffected.
//!
//! # Semantics and defaults
//!
//! - The limit is [`max_concurrent`](BulkheadConfig::max_concurrent) (default
//!   [`DEFAULT_MAX_CONCURRENT`] = 64) per backend, overridable per backend name in
//!   [`backends`](BulkheadConfig::backends).
//! - No queue by default ([`max_queue`](BulkheadConfig::max_queue) = 0): a full compartment
//!   refuses immediately, because a queue in front of a saturated backend only adds latency and
//!   hides the overload from the layers above (breaker, fallback). A small bounded queue can smooth
//!   bursts: up to `max_queue` calls per backend then wait (first come, first served) at most
//!   [`max_queue_wait`](BulkheadConfig::max_queue_wait) (default 250 ms), and never past the
//!   call's deadline ([`Deadline::of_http`]: the deadline layer's extension, else
//!   `grpc-timeout`); a call that had to wait goes on with its `grpc-timeout` reduced by the time
//!   it waited. A full queue or a wait that runs out is `BULKHEAD_FULL` too.
//! - A slot is a [`BulkheadPermit`], released when dropped, so a call that fails, errors, or is
//!   cancelled (its future dropped) gives its slot back. For a response that started (HTTP 200
//!   without `grpc-status` in the headers) the permit moves into the response body and is released
//!   when the body ends, fails or is dropped: a stream of tokens occupies the backend until the
//!   last token, not just until its headers. Trailers-only (error) responses release it at once.
//! - Requests without a [`BackendKey`] share the registry's default key
//!   ([`crate::breaker::DEFAULT_BACKEND`] unless set).
//!
//! The circuit breaker above this layer ignores `BULKHEAD_FULL` rejections: they say we sent too
//! much, not that the backend failed.
//!
//! # Metrics
//!
//! Counter `weir_bulkhead_rejected_total{backend}` and gauge `weir_bulkhead_in_flight{backend}`,
//! registered when a backend's compartment is created (install the recorder before serving).

use std::{
    collections::BTreeMap,
    future::Future,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use pin_project_lite::pin_project;
use serde::{Deserialize, Serialize};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::Status;
use tower::{BoxError, Layer, Service};

use crate::{
    ApiError,
    backend::{BackendKey, PerBackend},
    breaker::{DEFAULT_BACKEND, join_key},
    config::ConfigError,
    deadline::{Deadline, set_header_timeout},
    outcome::GRPC_STATUS,
};

/// Calls in flight per backend.
pub const DEFAULT_MAX_CONCURRENT: usize = 64;
/// Calls that may wait for a slot per backend (0: refuse at once when full).
pub const DEFAULT_MAX_QUEUE: usize = 0;
/// Longest a queued call waits for a slot.
pub const DEFAULT_MAX_QUEUE_WAIT: Duration = Duration::from_millis(250);

/// Bulkhead settings (TOML table such as `[router.bulkhead]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BulkheadConfig {
    /// Calls in flight per backend (default [`DEFAULT_MAX_CONCURRENT`]).
    pub max_concurrent: usize,
    /// Calls that may wait for a slot, per backend (default [`DEFAULT_MAX_QUEUE`] = none).
    pub max_queue: usize,
    /// Longest a queued call waits (default [`DEFAULT_MAX_QUEUE_WAIT`]); also bounded by the
    /// call's deadline.
    #[serde(with = "humantime_serde")]
    pub max_queue_wait: Duration,
    /// Per-backend `max_concurrent` overrides, by backend name (e.g. `gpt-4o = 16`).
    pub backends: BTreeMap<String, usize>,
}

impl Default for BulkheadConfig {
    fn default() -> Self {
        Self {
            max_concurrent: DEFAULT_MAX_CONCURRENT,
            max_queue: DEFAULT_MAX_QUEUE,
            max_queue_wait: DEFAULT_MAX_QUEUE_WAIT,
            backends: BTreeMap::new(),
        }
    }
}

impl BulkheadConfig {
    /// Checks every value; the error names the key as `<key_prefix>.<field>`.
    pub fn validate(&self, key_prefix: &str) -> Result<(), ConfigError> {
        if self.max_concurrent == 0 {
            return Err(ConfigError::invalid(
                join_key(key_prefix, "max_concurrent"),
                "must be at least 1",
            ));
        }
        if self.max_queue > 0 && self.max_queue_wait.is_zero() {
            return Err(ConfigError::invalid(
                join_key(key_prefix, "max_queue_wait"),
                "must be positive when max_queue > 0",
            ));
        }
        for (backend, limit) in &self.backends {
            if *limit == 0 {
                return Err(ConfigError::invalid(
                    join_key(key_prefix, &format!("backends.{backend}")),
                    "must be at least 1",
                ));
            }
        }
        Ok(())
    }

    /// The limit of `backend`: its override, or `max_concurrent`.
    pub fn limit_of(&self, backend: &BackendKey) -> usize {
        self.backends
            .get(backend.as_str())
            .copied()
            .unwrap_or(self.max_concurrent)
    }
}

/// A call refused because its backend's compartment (and queue, if any) is full.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("bulkhead full for backend {backend}: {limit} calls in flight")]
pub struct BulkheadFull {
    /// The backend whose compartment is full.
    pub backend: BackendKey,
    /// Its concurrency limit.
    pub limit: usize,
}

pub use crate::outcome::BULKHEAD_FULL;

impl From<BulkheadFull> for ApiError {
    fn from(full: BulkheadFull) -> Self {
        ApiError::unavailable(BULKHEAD_FULL, full.to_string())
            .with_metadata("backend", full.backend.as_str())
    }
}

impl BulkheadFull {
    /// The `Status` a gRPC caller gets (UNAVAILABLE, reason `BULKHEAD_FULL`, metadata `backend`),
    /// marked [`crate::outcome::Local::Rejected`] so layers above recognise it as a local refusal.
    pub fn into_status(self) -> Status {
        crate::outcome::Local::Rejected(BULKHEAD_FULL).attach(Status::from(ApiError::from(self)))
    }
}

/// The concurrency limit of one backend: the transport-agnostic core.
#[derive(Debug)]
pub struct Compartment {
    backend: BackendKey,
    limit: usize,
    max_queue: usize,
    max_queue_wait: Duration,
    semaphore: Arc<Semaphore>,
    queued: AtomicUsize,
    rejected: metrics::Counter,
    in_flight: metrics::Gauge,
}

impl Compartment {
    /// A compartment of `limit` slots for `backend`, with a queue of `max_queue` calls waiting at
    /// most `max_queue_wait`.
    pub fn new(
        backend: BackendKey,
        limit: usize,
        max_queue: usize,
        max_queue_wait: Duration,
    ) -> Self {
        let limit = limit.clamp(1, Semaphore::MAX_PERMITS);
        Self {
            rejected: metrics::counter!("weir_bulkhead_rejected_total", "backend" => backend.to_string()),
            in_flight: metrics::gauge!("weir_bulkhead_in_flight", "backend" => backend.to_string()),
            backend,
            limit,
            max_queue,
            max_queue_wait,
            semaphore: Arc::new(Semaphore::new(limit)),
            queued: AtomicUsize::new(0),
        }
    }

    /// The backend.
    pub fn backend(&self) -> &BackendKey {
        &self.backend
    }

    /// The concurrency limit.
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// Free slots.
    pub fn available(&self) -> usize {
        self.semaphore.available_permits()
    }

    /// Calls holding a slot.
    pub fn in_flight(&self) -> usize {
        self.limit - self.available()
    }

    /// Takes a slot if one is free, without waiting.
    pub fn try_acquire(self: &Arc<Self>) -> Result<BulkheadPermit, BulkheadFull> {
        match self.semaphore.clone().try_acquire_owned() {
            Ok(permit) => Ok(self.permit(permit)),
            Err(_) => Err(self.reject()),
        }
    }

    /// Takes a slot, waiting in the queue (if configured) at most `max_wait` or the configured
    /// queue wait, whichever is shorter.
    pub async fn acquire(
        self: Arc<Self>,
        max_wait: Option<Duration>,
    ) -> Result<BulkheadPermit, BulkheadFull> {
        if let Ok(permit) = self.try_acquire_quiet() {
            return Ok(permit);
        }
        if self.queued.fetch_add(1, Ordering::AcqRel) >= self.max_queue {
            self.queued.fetch_sub(1, Ordering::AcqRel);
            return Err(self.reject());
        }
        // Leaves the queue however the wait ends, including when the caller drops this future.
        struct Queued<'a>(&'a AtomicUsize);
        impl Drop for Queued<'_> {
            fn drop(&mut self) {
                self.0.fetch_sub(1, Ordering::AcqRel);
            }
        }
        let queued = Queued(&self.queued);
        let wait = max_wait.map_or(self.max_queue_wait, |w| w.min(self.max_queue_wait));
        let acquired = tokio::time::timeout(wait, self.semaphore.clone().acquire_owned()).await;
        drop(queued);
        match acquired {
            Ok(Ok(permit)) => Ok(self.permit(permit)),
            _ => Err(self.reject()),
        }
    }

    fn try_acquire_quiet(self: &Arc<Self>) -> Result<BulkheadPermit, ()> {
        self.semaphore
            .clone()
            .try_acquire_owned()
            .map(|permit| self.permit(permit))
            .map_err(drop)
    }

    fn permit(self: &Arc<Self>, permit: OwnedSemaphorePermit) -> BulkheadPermit {
        self.in_flight.increment(1.0);
        BulkheadPermit {
            _permit: permit,
            compartment: self.clone(),
        }
    }

    fn reject(&self) -> BulkheadFull {
        self.rejected.increment(1);
        BulkheadFull {
            backend: self.backend.clone(),
            limit: self.limit,
        }
    }
}

/// One slot in a [`Compartment`], given back when dropped.
#[derive(Debug)]
pub struct BulkheadPermit {
    _permit: OwnedSemaphorePermit,
    compartment: Arc<Compartment>,
}

impl Drop for BulkheadPermit {
    fn drop(&mut self) {
        self.compartment.in_flight.decrement(1.0);
    }
}

/// The compartments of every backend a client calls, created on first use.
#[derive(Debug, Clone)]
pub struct Bulkheads {
    inner: Arc<Registry>,
}

#[derive(Debug)]
struct Registry {
    config: BulkheadConfig,
    compartments: PerBackend<Compartment>,
}

impl Bulkheads {
    /// An empty registry; requests without a [`BackendKey`] use [`DEFAULT_BACKEND`].
    pub fn new(config: BulkheadConfig) -> Self {
        Self::with_default_key(config, BackendKey::new(DEFAULT_BACKEND))
    }

    /// An empty registry whose untagged requests use `default_key`.
    pub fn with_default_key(config: BulkheadConfig, default_key: BackendKey) -> Self {
        Self {
            inner: Arc::new(Registry {
                config,
                compartments: PerBackend::new(default_key),
            }),
        }
    }

    /// The key of untagged requests.
    pub fn default_key(&self) -> &BackendKey {
        self.inner.compartments.default_key()
    }

    /// Whether calls may wait in a queue (so the tower service must be able to call later).
    fn queues(&self) -> bool {
        self.inner.config.max_queue > 0
    }

    /// The compartment of `key`, created on first use.
    pub fn get(&self, key: &BackendKey) -> Arc<Compartment> {
        let config = &self.inner.config;
        self.inner.compartments.get_or_create(key, || {
            Compartment::new(
                key.clone(),
                config.limit_of(key),
                config.max_queue,
                config.max_queue_wait,
            )
        })
    }

    /// The compartment of a request: its [`BackendKey`] extension, or the default key.
    pub fn for_request<B>(&self, request: &http::Request<B>) -> Arc<Compartment> {
        self.get(self.inner.compartments.key_of(request))
    }
}

/// Applies a concurrency limit per backend to gRPC calls (see the [module docs](self)).
#[derive(Debug, Clone)]
pub struct BulkheadLayer {
    bulkheads: Bulkheads,
}

impl BulkheadLayer {
    /// A layer with a fresh registry using `config`.
    pub fn new(config: BulkheadConfig) -> Self {
        Self::with_bulkheads(Bulkheads::new(config))
    }

    /// A layer over an existing registry (to share it or inspect it).
    pub fn with_bulkheads(bulkheads: Bulkheads) -> Self {
        Self { bulkheads }
    }

    /// The registry.
    pub fn bulkheads(&self) -> &Bulkheads {
        &self.bulkheads
    }
}

impl<S> Layer<S> for BulkheadLayer {
    type Service = Bulkhead<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Bulkhead::new(inner, self.bulkheads.clone())
    }
}

/// A service that limits concurrent calls per backend; made by [`BulkheadLayer`].
#[derive(Debug, Clone)]
pub struct Bulkhead<S> {
    inner: S,
    bulkheads: Bulkheads,
}

impl<S> Bulkhead<S> {
    /// Wraps `inner`, keeping compartments in `bulkheads`.
    pub fn new(inner: S, bulkheads: Bulkheads) -> Self {
        Self { inner, bulkheads }
    }

    /// The registry.
    pub fn bulkheads(&self) -> &Bulkheads {
        &self.bulkheads
    }
}

type GrpcRequest = http::Request<tonic::body::Body>;
type GrpcResponse = http::Response<tonic::body::Body>;

impl<S> Service<GrpcRequest> for Bulkhead<S>
where
    S: Service<GrpcRequest, Response = GrpcResponse> + Clone,
    S::Error: Into<BoxError>,
{
    type Response = GrpcResponse;
    type Error = BoxError;
    type Future = future::ResponseFuture<S>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, request: GrpcRequest) -> Self::Future {
        let compartment = self.bulkheads.for_request(&request);
        match compartment.try_acquire_quiet() {
            Ok(permit) => future::ResponseFuture::called(self.inner.call(request), permit),
            Err(()) if !self.bulkheads.queues() => {
                future::ResponseFuture::rejected(compartment.reject())
            }
            Err(()) => {
                // Wait for a slot, then call the service that was made ready for this request
                // (a clone takes its place here).
                let clone = self.inner.clone();
                let inner = std::mem::replace(&mut self.inner, clone);
                let deadline = Deadline::of_http(&request);
                future::ResponseFuture::queued(
                    Box::pin(compartment.acquire(deadline.map(|d| d.remaining()))),
                    inner,
                    request,
                    deadline,
                )
            }
        }
    }
}

/// The bulkhead's response future and response body.
pub mod future {
    use super::*;

    type Acquire = Pin<Box<dyn Future<Output = Result<BulkheadPermit, BulkheadFull>> + Send>>;

    pin_project! {
        /// Waits for a slot (when queueing), then for the inner call's response headers, and
        /// moves the slot into the response body of a response that started.
        pub struct ResponseFuture<S: Service<GrpcRequest>> {
            #[pin]
            kind: Kind<S>,
        }
    }

    pin_project! {
        #[project = KindProj]
        enum Kind<S: Service<GrpcRequest>> {
            Queued {
                acquire: Acquire,
                service: Option<S>,
                request: Option<GrpcRequest>,
                deadline: Option<Deadline>,
            },
            Called { #[pin] future: S::Future, permit: Option<BulkheadPermit> },
            Rejected { error: Option<BulkheadFull> },
        }
    }

    impl<S: Service<GrpcRequest>> ResponseFuture<S> {
        pub(super) fn called(future: S::Future, permit: BulkheadPermit) -> Self {
            Self {
                kind: Kind::Called {
                    future,
                    permit: Some(permit),
                },
            }
        }

        pub(super) fn rejected(error: BulkheadFull) -> Self {
            Self {
                kind: Kind::Rejected { error: Some(error) },
            }
        }

        pub(super) fn queued(
            acquire: Acquire,
            service: S,
            request: GrpcRequest,
            deadline: Option<Deadline>,
        ) -> Self {
            Self {
                kind: Kind::Queued {
                    acquire,
                    service: Some(service),
                    request: Some(request),
                    deadline,
                },
            }
        }
    }

    impl<S> Future for ResponseFuture<S>
    where
        S: Service<GrpcRequest, Response = GrpcResponse>,
        S::Error: Into<BoxError>,
    {
        type Output = Result<GrpcResponse, BoxError>;

        fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
            let mut kind = self.project().kind;
            loop {
                match kind.as_mut().project() {
                    KindProj::Queued {
                        acquire,
                        service,
                        request,
                        deadline,
                    } => {
                        let permit = match std::task::ready!(acquire.as_mut().poll(cx)) {
                            Ok(permit) => permit,
                            Err(full) => return Poll::Ready(Err(Box::new(full.into_status()))),
                        };
                        let (Some(mut service), Some(mut request)) =
                            (service.take(), request.take())
                        else {
                            return Poll::Ready(Err(
                                "bulkhead future polled after completion".into()
                            ));
                        };
                        if let Some(deadline) = deadline {
                            // The next hop must not count the time spent waiting here as its own.
                            set_header_timeout(request.headers_mut(), deadline.remaining());
                        }
                        let future = service.call(request);
                        kind.set(Kind::Called {
                            future,
                            permit: Some(permit),
                        });
                    }
                    KindProj::Called { future, permit } => {
                        let result = std::task::ready!(future.poll(cx)).map_err(Into::into);
                        let permit = permit.take();
                        return Poll::Ready(result.map(|response| match permit {
                            Some(permit) if !response.headers().contains_key(GRPC_STATUS) => {
                                response.map(|body| {
                                    tonic::body::Body::new(PermitBody {
                                        inner: body,
                                        permit: Some(permit),
                                    })
                                })
                            }
                            // Trailers-only (an error answer): nothing more will flow.
                            _ => response,
                        }));
                    }
                    KindProj::Rejected { error } => {
                        return Poll::Ready(Err(match error.take() {
                            Some(full) => Box::new(full.into_status()),
                            None => "bulkhead future polled after completion".into(),
                        }));
                    }
                }
            }
        }
    }

    pin_project! {
        /// A response body that holds its call's bulkhead slot until the body ends, fails or is
        /// dropped.
        pub struct PermitBody<B> {
            #[pin]
            inner: B,
            permit: Option<BulkheadPermit>,
        }
    }

    impl<B: http_body::Body> http_body::Body for PermitBody<B> {
        type Data = B::Data;
        type Error = B::Error;

        fn poll_frame(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
            let mut this = self.project();
            let frame = std::task::ready!(this.inner.as_mut().poll_frame(cx));
            let done = match &frame {
                Some(Ok(_)) => this.inner.is_end_stream(),
                Some(Err(_)) | None => true,
            };
            if done {
                this.permit.take();
            }
            Poll::Ready(frame)
        }

        fn is_end_stream(&self) -> bool {
            self.inner.is_end_stream()
        }

        fn size_hint(&self) -> http_body::SizeHint {
            self.inner.size_hint()
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use std::sync::atomic::Ordering;

    use http_body_util::BodyExt;
    use tokio::time::Instant;
    use tonic::Code;
    use tower::ServiceExt;

    use super::*;
    use crate::{
        breaker::tests::{backend, request},
        metadata::GRPC_TIMEOUT,
        outcome,
    };

    fn config(max_concurrent: usize) -> BulkheadConfig {
        BulkheadConfig {
            max_concurrent,
            ..BulkheadConfig::default()
        }
    }

    fn code_of(result: &Result<GrpcResponse, BoxError>) -> Code {
        outcome::classify(result).code
    }

    #[tokio::test(start_paused = true)]
    async fn full_compartment_refuses_at_once_and_isolates_backends() {
        let layer = BulkheadLayer::new(config(2));
        let (inner, calls) = backend();
        let mut service = layer.layer(inner);
        let slow = || request(Some("slow"), Some(Code::Ok), Duration::from_secs(30));
        let mut held = Vec::new();
        for _ in 0..2 {
            held.push(tokio::spawn(service.ready().await.unwrap().call(slow())));
        }
        let started = Instant::now();
        let refused = service.ready().await.unwrap().call(slow()).await;
        assert_eq!(started.elapsed(), Duration::ZERO);
        let status = outcome::find_status(&**refused.as_ref().err().unwrap()).unwrap();
        assert_eq!(status.code(), Code::Unavailable);
        let error = ApiError::from_status(status);
        assert_eq!(error.reason(), "BULKHEAD_FULL");
        assert_eq!(
            error.metadata().get("backend").map(String::as_str),
            Some("slow")
        );
        // Another backend has its own slots.
        let fast = service
            .ready()
            .await
            .unwrap()
            .call(request(Some("fast"), Some(Code::Ok), Duration::ZERO))
            .await;
        assert_eq!(code_of(&fast), Code::Ok);
        tokio::task::yield_now().await;
        assert_eq!(calls.load(Ordering::SeqCst), 3);
        for handle in held {
            handle.abort();
        }
    }

    #[tokio::test(start_paused = true)]
    async fn permits_all_return_after_cancellations_and_failures() {
        let layer = BulkheadLayer::new(config(8));
        let (inner, _) = backend();
        let mut service = layer.layer(inner);
        let compartment = layer.bulkheads().get(&BackendKey::new("b"));
        let mut handles = Vec::new();
        for _ in 0..100 {
            let future = service.ready().await.unwrap().call(request(
                Some("b"),
                Some(Code::Ok),
                Duration::from_secs(3600),
            ));
            handles.push(tokio::spawn(future));
        }
        tokio::task::yield_now().await;
        assert_eq!(compartment.in_flight(), 8);
        for handle in &handles {
            handle.abort();
        }
        for handle in handles {
            let _ = handle.await;
        }
        assert_eq!(compartment.available(), 8);

        // Failed calls (transport error, trailers-only error) give their slots back as well.
        for code in [None, Some(Code::Internal), Some(Code::Unavailable)] {
            for _ in 0..20 {
                let result = service
                    .ready()
                    .await
                    .unwrap()
                    .call(request(Some("b"), code, Duration::from_millis(5)))
                    .await;
                assert_eq!(code_of(&result), code.unwrap_or(Code::Unavailable));
            }
        }
        assert_eq!(compartment.available(), 8);
    }

    #[tokio::test(start_paused = true)]
    async fn a_stream_holds_its_permit_until_the_body_ends_or_drops() {
        let layer = BulkheadLayer::new(config(1));
        let mut senders = Vec::new();
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let inner = tower::service_fn(move |_: GrpcRequest| {
            let (sender, frames) = tokio::sync::mpsc::channel(4);
            let body = http_body_util::StreamBody::new(
                tokio_stream::wrappers::ReceiverStream::new(frames),
            );
            let _ = tx.send(sender);
            async move { Ok::<_, BoxError>(http::Response::new(tonic::body::Body::new(body))) }
        });
        let mut rx = rx;
        let mut service = layer.layer(inner);
        let compartment = layer.bulkheads().get(&BackendKey::new(DEFAULT_BACKEND));
        let grpc_request = || http::Request::new(tonic::body::Body::empty());

        // Read to the end: the permit is released with the last frame.
        let response = service
            .ready()
            .await
            .unwrap()
            .call(grpc_request())
            .await
            .unwrap();
        let sender = rx.recv().await.unwrap();
        assert_eq!(compartment.in_flight(), 1, "held after the headers");
        let refused = service.ready().await.unwrap().call(grpc_request()).await;
        assert_eq!(code_of(&refused), Code::Unavailable);
        let mut body = response.into_body();
        sender
            .send(Ok::<_, std::convert::Infallible>(http_body::Frame::data(
                "token".into(),
            )))
            .await
            .unwrap();
        let frame = body.frame().await.unwrap().unwrap();
        assert!(frame.is_data());
        assert_eq!(compartment.in_flight(), 1, "held while streaming");
        drop(sender);
        assert!(body.frame().await.is_none());
        assert_eq!(
            compartment.in_flight(),
            0,
            "released at the end of the stream"
        );
        drop(body);

        // Drop the body mid-stream: released.
        let response = service
            .ready()
            .await
            .unwrap()
            .call(grpc_request())
            .await
            .unwrap();
        senders.push(rx.recv().await.unwrap());
        assert_eq!(compartment.in_flight(), 1);
        drop(response);
        assert_eq!(
            compartment.in_flight(),
            0,
            "released when the body is dropped"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn bounded_queue_waits_for_a_slot_within_its_limits() {
        let layer = BulkheadLayer::new(BulkheadConfig {
            max_concurrent: 1,
            max_queue: 1,
            max_queue_wait: Duration::from_millis(250),
            ..BulkheadConfig::default()
        });
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let record = seen.clone();
        let (fake, _) = backend();
        let inner = tower::service_fn(move |request: GrpcRequest| {
            let timeout = request
                .headers()
                .get(GRPC_TIMEOUT)
                .map(|v| v.to_str().unwrap().to_string());
            record.lock().unwrap().push(timeout);
            fake.clone().oneshot(request)
        });
        let mut service = layer.layer(inner);
        let held_for = |d: u64| request(None, Some(Code::Ok), Duration::from_millis(d));

        // One call holds the slot for 100 ms; the next waits in the queue and gets it.
        let first = tokio::spawn(service.ready().await.unwrap().call(held_for(100)));
        let mut queued_request = held_for(0);
        queued_request
            .headers_mut()
            .insert(GRPC_TIMEOUT, "1000m".parse().unwrap());
        let queued = tokio::spawn(service.ready().await.unwrap().call(queued_request));
        tokio::task::yield_now().await;
        // The queue (one place) is taken: a third call is refused at once.
        let refused = service.ready().await.unwrap().call(held_for(0)).await;
        assert_eq!(code_of(&refused), Code::Unavailable);
        let started = Instant::now();
        assert_eq!(code_of(&queued.await.unwrap()), Code::Ok);
        assert_eq!(started.elapsed(), Duration::from_millis(100));
        assert_eq!(code_of(&first.await.unwrap()), Code::Ok);
        // It went on with its deadline reduced by the 100 ms it waited.
        assert_eq!(
            seen.lock().unwrap().last().cloned().flatten().as_deref(),
            Some("900000u")
        );

        // A wait longer than max_queue_wait is refused when it runs out.
        let first = tokio::spawn(service.ready().await.unwrap().call(held_for(1000)));
        tokio::task::yield_now().await;
        let started = Instant::now();
        let timed_out = service.ready().await.unwrap().call(held_for(0)).await;
        assert_eq!(code_of(&timed_out), Code::Unavailable);
        assert_eq!(started.elapsed(), Duration::from_millis(250));
        first.abort();
    }

    #[test]
    fn per_backend_overrides_and_validation() {
        let config: BulkheadConfig =
            toml::from_str("max_concurrent = 10\n[backends]\ngpt-4o = 2\n").unwrap();
        config.validate("router.bulkhead").unwrap();
        assert_eq!(config.limit_of(&BackendKey::new("gpt-4o")), 2);
        assert_eq!(config.limit_of(&BackendKey::new("sim-small")), 10);
        let bulkheads = Bulkheads::new(config.clone());
        assert_eq!(bulkheads.get(&BackendKey::new("gpt-4o")).limit(), 2);

        let bad = BulkheadConfig {
            backends: BTreeMap::from([("gpt-4o".to_string(), 0)]),
            ..config
        };
        let error = bad.validate("router.bulkhead").unwrap_err().to_string();
        assert!(
            error.contains("`router.bulkhead.backends.gpt-4o`"),
            "{error}"
        );
        let error = BulkheadConfig {
            max_concurrent: 0,
            ..BulkheadConfig::default()
        }
        .validate("router.bulkhead")
        .unwrap_err()
        .to_string();
        assert!(
            error.contains("`router.bulkhead.max_concurrent`"),
            "{error}"
        );
        assert_eq!(
            toml::from_str::<BulkheadConfig>("").unwrap(),
            BulkheadConfig::default()
        );
    }
}
