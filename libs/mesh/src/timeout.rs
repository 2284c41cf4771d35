//! Per-attempt timeout: bound each attempt by min(attempt timeout, time left before the deadline).
//!
//! # Why a per-attempt timeout, when every call already has a deadline?
//!
//! The deadline bounds the whole call, retries included. If a single attempt may use all of it, a
//! hung backend turns every call into DEADLINE_EXCEEDED with no time left to retry elsewhere or
//! fall back. The attempt timeout cuts a hung attempt early enough for the retry layer above to try
//! again, and the breaker above counts it as a failure (an [`ATTEMPT_TIMEOUT`] is one),
//! so a hanging backend opens the breaker instead of silently eating deadlines. The attempt must
//! also never outlive the call: its bound is
//! `min(attempt_timeout, time remaining before the call's deadline)`.
//!
//! # Semantics and defaults
//!
//! - The call's deadline is the [`Deadline`] that [`crate::deadline::DeadlineLayer::propagate`]
//!   stored in the request's extensions (exact across retries and queueing), else the outgoing
//!   request's `grpc-timeout` measured from the moment this layer receives the request. No
//!   deadline means only the attempt timeout applies. A deadline that has already passed fails the
//!   attempt at once, without calling the backend.
//! - What is bounded is the time to the response **headers** (a unary answer, a trailers-only
//!   error, or the start of a stream). [`attempt_timeout`](TimeoutConfig::attempt_timeout) defaults
//!   to [`DEFAULT_ATTEMPT_TIMEOUT`] = 30 s: comfortably above a healthy time to first token, so
//!   only a hung attempt hits it. Note that a tonic server sends a unary response's headers only
//!   when the handler returns, so a long *unary* generation must fit in it; raise it (or use the
//!   streaming RPC) for routes that generate for longer. `0s` disables it (the deadline still
//!   applies).
//! - For a response that started, the body is bounded by the call's deadline and, if
//!   [`idle_timeout`](TimeoutConfig::idle_timeout) is set (default 0 = off), by the idle time
//!   between two body frames (two streamed tokens), so a stream that stalls mid-way ends instead of
//!   hanging. The attempt timeout does not apply to the body: a stream may legitimately run longer
//!   than one attempt's budget for its headers.
//! - On expiry the attempt fails with DEADLINE_EXCEEDED (ErrorInfo metadata `backend`), from the
//!   future before headers or as the body's error after, and the inner call is dropped (its HTTP/2
//!   stream is reset, so the backend stops working on it). The reason says which bound it was:
//!   [`ATTEMPT_TIMEOUT`] when this layer's own attempt (or idle) timeout fired while the caller
//!   still had time, a backend failure the breaker counts; `DEADLINE_EXCEEDED` when the caller's
//!   deadline was the bound, which the breaker ignores (the caller's impatience says nothing about
//!   the backend; see [`crate::outcome`]).
//!
//! # Metrics
//!
//! Counter `weir_attempt_timeouts_total{backend}`, incremented each time this layer ends an
//! attempt or its body.

use std::{
    future::Future,
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use pin_project_lite::pin_project;
use serde::{Deserialize, Serialize};
use tokio::time::{Instant, Sleep, sleep_until};
use tonic::{Code, Status};
use tower::{BoxError, Layer, Service};

use crate::{
    ApiError,
    backend::BackendKey,
    breaker::{DEFAULT_BACKEND, join_key},
    config::ConfigError,
    deadline::Deadline,
    outcome::{ATTEMPT_TIMEOUT, GRPC_STATUS, Local},
};

/// Longest time to response headers of one attempt.
pub const DEFAULT_ATTEMPT_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest time between two response body frames; zero: no idle timeout.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::ZERO;

/// Per-attempt timeout settings (TOML table such as `[router.timeout]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TimeoutConfig {
    /// Longest time to response headers of one attempt (default [`DEFAULT_ATTEMPT_TIMEOUT`]);
    /// `0s` disables it, leaving only the call's deadline.
    #[serde(with = "humantime_serde")]
    pub attempt_timeout: Duration,
    /// Longest time between two body frames of a started response (default
    /// [`DEFAULT_IDLE_TIMEOUT`], off); `0s` disables it.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
}

impl Default for TimeoutConfig {
    fn default() -> Self {
        Self {
            attempt_timeout: DEFAULT_ATTEMPT_TIMEOUT,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
        }
    }
}

impl TimeoutConfig {
    /// Checks every value; the error names the key as `<key_prefix>.<field>`. A non-zero value
    /// under a millisecond is refused: it is a unit mistake, and would fail every call.
    pub fn validate(&self, key_prefix: &str) -> Result<(), ConfigError> {
        for (field, value) in [
            ("attempt_timeout", self.attempt_timeout),
            ("idle_timeout", self.idle_timeout),
        ] {
            if !value.is_zero() && value < Duration::from_millis(1) {
                return Err(ConfigError::invalid(
                    join_key(key_prefix, field),
                    format!("must be 0 (off) or at least 1ms, got {value:?}"),
                ));
            }
        }
        Ok(())
    }
}

/// Applies the per-attempt timeout (see the [module docs](self)).
#[derive(Debug, Clone)]
pub struct AttemptTimeoutLayer {
    config: TimeoutConfig,
}

impl AttemptTimeoutLayer {
    /// A layer with `config`.
    pub fn new(config: TimeoutConfig) -> Self {
        Self { config }
    }
}

impl<S> Layer<S> for AttemptTimeoutLayer {
    type Service = AttemptTimeout<S>;

    fn layer(&self, inner: S) -> Self::Service {
        AttemptTimeout::new(inner, self.config.clone())
    }
}

/// A service that bounds each attempt; made by [`AttemptTimeoutLayer`].
#[derive(Debug, Clone)]
pub struct AttemptTimeout<S> {
    inner: S,
    config: TimeoutConfig,
}

impl<S> AttemptTimeout<S> {
    /// Wraps `inner`.
    pub fn new(inner: S, config: TimeoutConfig) -> Self {
        Self { inner, config }
    }
}

type GrpcRequest = http::Request<tonic::body::Body>;
type GrpcResponse = http::Response<tonic::body::Body>;

impl<S> Service<GrpcRequest> for AttemptTimeout<S>
where
    S: Service<GrpcRequest, Response = GrpcResponse>,
    S::Error: Into<BoxError>,
{
    type Response = GrpcResponse;
    type Error = BoxError;
    type Future = future::ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, request: GrpcRequest) -> Self::Future {
        let now = Instant::now();
        let backend = BackendKey::of(request.extensions())
            .cloned()
            .unwrap_or_else(|| BackendKey::new(DEFAULT_BACKEND));
        let deadline = Deadline::of_http(&request);
        if deadline.is_some_and(|d| d.is_expired()) {
            return future::ResponseFuture::expired(expired(
                &backend,
                "the call's deadline had passed before the attempt started".to_string(),
                false,
            ));
        }
        let remaining = deadline.map(|d| d.remaining());
        let deadline = deadline.map(|d| d.instant());
        let attempt =
            (!self.config.attempt_timeout.is_zero()).then(|| now + self.config.attempt_timeout);
        // The earlier bound wins; say which one it was.
        let bound = match (attempt, deadline) {
            (Some(a), Some(d)) if d <= a => Some((d, Bound::Deadline(remaining))),
            (Some(a), _) => Some((a, Bound::Attempt(self.config.attempt_timeout))),
            (None, Some(d)) => Some((d, Bound::Deadline(remaining))),
            (None, None) => None,
        };
        future::ResponseFuture::new(
            self.inner.call(request),
            bound,
            BodyBounds {
                deadline,
                idle: (!self.config.idle_timeout.is_zero()).then_some(self.config.idle_timeout),
            },
            backend,
        )
    }
}

/// Which limit an expiry hit: the error's reason and message depend on it.
#[derive(Debug, Clone, Copy)]
enum Bound {
    Attempt(Duration),
    Deadline(Option<Duration>),
}

/// The limits on a started response's body.
#[derive(Debug, Clone, Copy)]
struct BodyBounds {
    deadline: Option<Instant>,
    idle: Option<Duration>,
}

/// The DEADLINE_EXCEEDED error of an expiry, counted in the metric. `own` marks an expiry of
/// this layer's own bound (attempt or idle timeout) while the caller still had time: reason
/// [`ATTEMPT_TIMEOUT`], marked [`Local::AttemptTimeout`], a backend failure
/// ([`crate::outcome`]). An expiry of the caller's deadline keeps reason `DEADLINE_EXCEEDED`.
fn expired(backend: &BackendKey, message: String, own: bool) -> BoxError {
    metrics::counter!("weir_attempt_timeouts_total", "backend" => backend.to_string()).increment(1);
    tracing::debug!(%backend, "{message}");
    if own {
        let error = ApiError::new(Code::DeadlineExceeded, ATTEMPT_TIMEOUT, message)
            .with_metadata("backend", backend.as_str());
        Box::new(Local::AttemptTimeout.attach(Status::from(error)))
    } else {
        Box::new(Status::from(
            ApiError::deadline_exceeded(message).with_metadata("backend", backend.as_str()),
        ))
    }
}

/// The per-attempt timeout's response future and response body.
pub mod future {
    use super::*;

    pin_project! {
        /// Waits for the inner call's response headers until the attempt's bound.
        pub struct ResponseFuture<F> {
            #[pin]
            inner: Option<F>,
            #[pin]
            sleep: Option<Sleep>,
            bound: Option<Bound>,
            body: BodyBounds,
            backend: BackendKey,
            error: Option<BoxError>,
        }
    }

    impl<F> ResponseFuture<F> {
        pub(super) fn new(
            inner: F,
            bound: Option<(Instant, Bound)>,
            body: BodyBounds,
            backend: BackendKey,
        ) -> Self {
            Self {
                inner: Some(inner),
                sleep: bound.map(|(at, _)| sleep_until(at)),
                bound: bound.map(|(_, bound)| bound),
                body,
                backend,
                error: None,
            }
        }

        pub(super) fn expired(error: BoxError) -> Self {
            Self {
                inner: None,
                sleep: None,
                bound: None,
                body: BodyBounds {
                    deadline: None,
                    idle: None,
                },
                backend: BackendKey::new(DEFAULT_BACKEND),
                error: Some(error),
            }
        }
    }

    impl<F, E> Future for ResponseFuture<F>
    where
        F: Future<Output = Result<GrpcResponse, E>>,
        E: Into<BoxError>,
    {
        type Output = Result<GrpcResponse, BoxError>;

        fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
            let mut this = self.project();
            let Some(inner) = this.inner.as_mut().as_pin_mut() else {
                return Poll::Ready(Err(this
                    .error
                    .take()
                    .unwrap_or_else(|| "timeout future polled after completion".into())));
            };
            if let Poll::Ready(result) = inner.poll(cx) {
                let response = result.map_err(Into::into)?;
                let body = *this.body;
                if (body.deadline.is_none() && body.idle.is_none())
                    || response.headers().contains_key(GRPC_STATUS)
                {
                    return Poll::Ready(Ok(response));
                }
                let backend = this.backend.clone();
                return Poll::Ready(Ok(response.map(|inner| {
                    tonic::body::Body::new(TimeoutBody::new(inner, body, backend))
                })));
            }
            if let Some(sleep) = this.sleep.as_pin_mut() {
                std::task::ready!(sleep.poll(cx));
                // Drop the attempt now: its HTTP/2 stream is reset and the backend can stop.
                this.inner.set(None);
                let bound = this.bound.take();
                let message = match bound {
                    Some(Bound::Attempt(limit)) => {
                        format!("attempt to {} timed out after {limit:?}", this.backend)
                    }
                    Some(Bound::Deadline(Some(remaining))) => format!(
                        "deadline exceeded: no response from {} within the call's remaining {remaining:?}",
                        this.backend
                    ),
                    _ => format!("deadline exceeded calling {}", this.backend),
                };
                let own = matches!(bound, Some(Bound::Attempt(_)));
                return Poll::Ready(Err(expired(this.backend, message, own)));
            }
            Poll::Pending
        }
    }

    pin_project! {
        /// A response body bounded by the call's deadline and an idle time between frames.
        pub struct TimeoutBody<B> {
            #[pin]
            inner: B,
            #[pin]
            sleep: Sleep,
            bounds: BodyBounds,
            backend: BackendKey,
            done: bool,
        }
    }

    impl<B> TimeoutBody<B> {
        fn new(inner: B, bounds: BodyBounds, backend: BackendKey) -> Self {
            Self {
                inner,
                sleep: sleep_until(next_expiry(bounds, Instant::now())),
                bounds,
                backend,
                done: false,
            }
        }
    }

    /// When the body times out if no frame arrives: the earlier of the deadline and now + idle.
    fn next_expiry(bounds: BodyBounds, now: Instant) -> Instant {
        let idle = bounds.idle.map(|idle| now + idle);
        match (bounds.deadline, idle) {
            (Some(d), Some(i)) => d.min(i),
            (Some(at), None) | (None, Some(at)) => at,
            // Not wrapped without a bound; a far-away instant keeps this total.
            (None, None) => now + Duration::from_secs(86_400 * 365),
        }
    }

    impl<B> http_body::Body for TimeoutBody<B>
    where
        B: http_body::Body,
        B::Error: Into<BoxError>,
    {
        type Data = B::Data;
        type Error = BoxError;

        fn poll_frame(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
            let mut this = self.project();
            if *this.done {
                return Poll::Ready(None);
            }
            if let Poll::Ready(frame) = this.inner.as_mut().poll_frame(cx) {
                if this.bounds.idle.is_some() {
                    let next = next_expiry(*this.bounds, Instant::now());
                    this.sleep.as_mut().reset(next);
                }
                return Poll::Ready(frame.map(|f| f.map_err(Into::into)));
            }
            std::task::ready!(this.sleep.poll(cx));
            *this.done = true;
            let caller = this.bounds.deadline.is_some_and(|d| d <= Instant::now());
            let message = if caller {
                format!("deadline exceeded while streaming from {}", this.backend)
            } else {
                format!(
                    "stream from {} idle for more than {:?}",
                    this.backend,
                    this.bounds.idle.unwrap_or_default()
                )
            };
            Poll::Ready(Some(Err(expired(this.backend, message, !caller))))
        }

        fn is_end_stream(&self) -> bool {
            self.done || self.inner.is_end_stream()
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
    use tonic::Code;
    use tower::ServiceExt;

    use super::*;
    use crate::{
        breaker::{
            BreakerConfig, BreakerState, CircuitBreakerLayer,
            tests::{backend, request},
        },
        metadata::GRPC_TIMEOUT,
        outcome,
    };

    fn layer(attempt: u64, idle: u64) -> AttemptTimeoutLayer {
        AttemptTimeoutLayer::new(TimeoutConfig {
            attempt_timeout: Duration::from_millis(attempt),
            idle_timeout: Duration::from_millis(idle),
        })
    }

    fn with_deadline(mut request: GrpcRequest, value: &'static str) -> GrpcRequest {
        request
            .headers_mut()
            .insert(GRPC_TIMEOUT, http::HeaderValue::from_static(value));
        request
    }

    fn code_of(result: &Result<GrpcResponse, BoxError>) -> Code {
        outcome::classify(result).code
    }

    #[tokio::test(start_paused = true)]
    async fn the_attempt_timeout_bounds_a_hung_attempt() {
        let (inner, _) = backend();
        let service = layer(1_000, 0).layer(inner);
        let started = Instant::now();
        let result = service
            .oneshot(request(
                Some("gpt-4o"),
                Some(Code::Ok),
                Duration::from_secs(3600),
            ))
            .await;
        assert_eq!(started.elapsed(), Duration::from_secs(1));
        let status = outcome::find_status(&**result.as_ref().err().unwrap()).unwrap();
        assert_eq!(status.code(), Code::DeadlineExceeded);
        let error = ApiError::from_status(status);
        assert_eq!(
            error.reason(),
            ATTEMPT_TIMEOUT,
            "our own bound, not the caller's"
        );
        assert_eq!(
            outcome::classify(&result).class(None),
            outcome::Class::BackendFailure
        );
        assert_eq!(
            error.metadata().get("backend").map(String::as_str),
            Some("gpt-4o")
        );
        assert!(error.message().contains("timed out after 1s"), "{error}");
    }

    #[tokio::test(start_paused = true)]
    async fn the_grpc_timeout_remainder_bounds_the_attempt_when_shorter() {
        let (inner, _) = backend();
        let service = layer(30_000, 0).layer(inner);
        let started = Instant::now();
        let result = service
            .oneshot(with_deadline(
                request(None, Some(Code::Ok), Duration::from_secs(3600)),
                "200m",
            ))
            .await;
        assert_eq!(started.elapsed(), Duration::from_millis(200));
        assert_eq!(code_of(&result), Code::DeadlineExceeded);

        // And the attempt timeout when it is the shorter one.
        let (inner, _) = backend();
        let started = Instant::now();
        let result = layer(300, 0)
            .layer(inner)
            .oneshot(with_deadline(
                request(None, Some(Code::Ok), Duration::from_secs(3600)),
                "5S",
            ))
            .await;
        assert_eq!(started.elapsed(), Duration::from_millis(300));
        assert_eq!(code_of(&result), Code::DeadlineExceeded);
    }

    #[tokio::test(start_paused = true)]
    async fn the_deadline_extension_is_honoured_exactly() {
        // The deadline layer stored an absolute deadline; 100 ms pass (an earlier attempt, a
        // backoff) before this attempt starts, with a stale `grpc-timeout` still saying 5 s.
        let mut request = with_deadline(
            request(None, Some(Code::Ok), Duration::from_secs(3600)),
            "5S",
        );
        request
            .extensions_mut()
            .insert(Deadline::after(Duration::from_millis(300)));
        tokio::time::advance(Duration::from_millis(100)).await;
        let (inner, _) = backend();
        let started = Instant::now();
        let result = layer(30_000, 0).layer(inner).oneshot(request).await;
        assert_eq!(started.elapsed(), Duration::from_millis(200));
        assert_eq!(code_of(&result), Code::DeadlineExceeded);
    }

    #[tokio::test(start_paused = true)]
    async fn no_time_left_fails_at_once_without_calling() {
        let (inner, calls) = backend();
        let result = layer(30_000, 0)
            .layer(inner)
            .oneshot(with_deadline(
                request(None, Some(Code::Ok), Duration::ZERO),
                "0m",
            ))
            .await;
        assert_eq!(code_of(&result), Code::DeadlineExceeded);
        assert_eq!(calls.load(Ordering::SeqCst), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn answers_in_time_pass_through_unchanged() {
        for code in [Code::Ok, Code::NotFound, Code::Unavailable] {
            let (inner, _) = backend();
            let started = Instant::now();
            let result = layer(1_000, 0)
                .layer(inner)
                .oneshot(with_deadline(
                    request(None, Some(code), Duration::from_millis(999)),
                    "1S",
                ))
                .await;
            assert_eq!(started.elapsed(), Duration::from_millis(999));
            assert_eq!(code_of(&result), code);
        }
        // Without any bound, nothing is imposed.
        let (inner, _) = backend();
        let result = layer(0, 0)
            .layer(inner)
            .oneshot(request(None, Some(Code::Ok), Duration::from_secs(3600)))
            .await;
        assert_eq!(code_of(&result), Code::Ok);
    }

    /// A backend whose response body sends one frame per entry of `gaps`, after that gap.
    fn streaming(
        gaps: Vec<Duration>,
    ) -> impl Service<GrpcRequest, Response = GrpcResponse, Error = BoxError> + Clone {
        tower::service_fn(move |_: GrpcRequest| {
            let gaps = gaps.clone();
            async move {
                let (sender, frames) = tokio::sync::mpsc::channel(1);
                tokio::spawn(async move {
                    for gap in gaps {
                        tokio::time::sleep(gap).await;
                        let frame = http_body::Frame::data("token".into());
                        if sender
                            .send(Ok::<_, std::convert::Infallible>(frame))
                            .await
                            .is_err()
                        {
                            return;
                        }
                    }
                });
                let body = http_body_util::StreamBody::new(
                    tokio_stream::wrappers::ReceiverStream::new(frames),
                );
                Ok::<_, BoxError>(http::Response::new(tonic::body::Body::new(body)))
            }
        })
    }

    async fn frames_until_error(response: GrpcResponse) -> (usize, Option<Status>) {
        let mut body = response.into_body();
        let mut frames = 0;
        while let Some(frame) = body.frame().await {
            match frame {
                Ok(_) => frames += 1,
                Err(status) => return (frames, Some(status)),
            }
        }
        (frames, None)
    }

    #[tokio::test(start_paused = true)]
    async fn the_idle_timeout_ends_a_stalled_stream_but_not_a_slow_steady_one() {
        let ms = Duration::from_millis;
        // Steady: a token every 400 ms for 4 s, longer than the 1 s attempt timeout.
        let steady = streaming(vec![ms(400); 10]);
        let response = layer(1_000, 500)
            .layer(steady)
            .oneshot(http::Request::new(tonic::body::Body::empty()))
            .await
            .unwrap();
        let (frames, status) = frames_until_error(response).await;
        assert_eq!(frames, 10);
        assert!(status.is_none(), "{status:?}");

        // Stalls after two tokens.
        let stalled = streaming(vec![ms(100), ms(100), ms(3_600_000)]);
        let response = layer(1_000, 500)
            .layer(stalled)
            .oneshot(http::Request::new(tonic::body::Body::empty()))
            .await
            .unwrap();
        let started = Instant::now();
        let (frames, status) = frames_until_error(response).await;
        assert_eq!(frames, 2);
        assert_eq!(status.map(|s| s.code()), Some(Code::DeadlineExceeded));
        assert_eq!(started.elapsed(), ms(700));
    }

    #[tokio::test(start_paused = true)]
    async fn the_deadline_bounds_a_started_stream() {
        let stream = streaming(vec![Duration::from_millis(400); 10]);
        let started = Instant::now();
        let response = layer(0, 0)
            .layer(stream)
            .oneshot(with_deadline(
                http::Request::new(tonic::body::Body::empty()),
                "1S",
            ))
            .await
            .unwrap();
        let (frames, status) = frames_until_error(response).await;
        assert_eq!(frames, 2);
        assert_eq!(status.map(|s| s.code()), Some(Code::DeadlineExceeded));
        assert_eq!(started.elapsed(), Duration::from_secs(1));
    }

    #[tokio::test(start_paused = true)]
    async fn attempt_timeouts_are_failures_for_the_breaker_above() {
        let breaker = CircuitBreakerLayer::new(BreakerConfig {
            jitter: 0.0,
            ..BreakerConfig::default()
        });
        let (inner, calls) = backend();
        let mut service = tower::ServiceBuilder::new()
            .layer(breaker.clone())
            .layer(layer(100, 0))
            .service(inner);
        for _ in 0..20 {
            let result = service
                .ready()
                .await
                .unwrap()
                .call(request(
                    Some("hung"),
                    Some(Code::Ok),
                    Duration::from_secs(3600),
                ))
                .await;
            assert_eq!(code_of(&result), Code::DeadlineExceeded);
        }
        let key = BackendKey::new("hung");
        assert_eq!(breaker.breakers().state(&key), BreakerState::Open);
        let result = service
            .ready()
            .await
            .unwrap()
            .call(request(Some("hung"), Some(Code::Ok), Duration::ZERO))
            .await;
        assert_eq!(code_of(&result), Code::Unavailable);
        assert_eq!(calls.load(Ordering::SeqCst), 20);
    }

    #[tokio::test(start_paused = true)]
    async fn the_breaker_ignores_callers_out_of_time_but_counts_backend_timeouts() {
        let breaker = CircuitBreakerLayer::new(BreakerConfig {
            jitter: 0.0,
            ..BreakerConfig::default()
        });
        let (inner, _) = backend();
        let mut service = tower::ServiceBuilder::new()
            .layer(breaker.clone())
            .layer(layer(30_000, 0))
            .service(inner);
        let key = BackendKey::new("slow");
        let mut call = async |code: Code, delay: u64, deadline: &'static str| {
            let request = with_deadline(
                request(Some("slow"), Some(code), Duration::from_millis(delay)),
                deadline,
            );
            let result = service.ready().await.unwrap().call(request).await;
            code_of(&result)
        };
        for _ in 0..40 {
            // Our attempt, bound by the caller's 50 ms, expires while the backend takes 200 ms.
            assert_eq!(call(Code::Ok, 200, "50m").await, Code::DeadlineExceeded);
            // The next hop answers DEADLINE_EXCEEDED a few ms before our deadline: the
            // `grpc-timeout` we sent ran out.
            assert_eq!(
                call(Code::DeadlineExceeded, 40, "50m").await,
                Code::DeadlineExceeded
            );
            // The caller cancelled.
            assert_eq!(call(Code::Cancelled, 1, "5S").await, Code::Cancelled);
        }
        assert_eq!(
            breaker.breakers().state(&key),
            BreakerState::Closed,
            "the caller's impatience says nothing about the backend"
        );
        // An upstream that times out on its own while the caller still has seconds: a failure.
        for _ in 0..20 {
            call(Code::DeadlineExceeded, 10, "5S").await;
        }
        assert_eq!(breaker.breakers().state(&key), BreakerState::Open);
    }

    #[test]
    fn config_defaults_and_validation() {
        let config: TimeoutConfig = toml::from_str("").unwrap();
        assert_eq!(config.attempt_timeout, DEFAULT_ATTEMPT_TIMEOUT);
        config.validate("router.timeout").unwrap();
        let config: TimeoutConfig =
            toml::from_str("attempt_timeout = \"0s\"\nidle_timeout = \"2s\"\n").unwrap();
        config.validate("router.timeout").unwrap();
        let error = TimeoutConfig {
            idle_timeout: Duration::from_micros(5),
            ..TimeoutConfig::default()
        }
        .validate("router.timeout")
        .unwrap_err()
        .to_string();
        assert!(error.contains("`router.timeout.idle_timeout`"), "{error}");
    }
}
