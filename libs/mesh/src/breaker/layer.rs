//! The tower layer: every call asks its backend's breaker for a permit and reports its outcome.

use std::{
    pin::Pin,
    task::{Context, Poll},
};

use pin_project_lite::pin_project;
use tokio::time::Instant;
use tower::{BoxError, Layer, Service};

use crate::{deadline::Deadline, outcome};

use super::*;

/// Applies a circuit breaker per backend to gRPC calls (see the [module docs](super)).
#[derive(Debug, Clone)]
pub struct CircuitBreakerLayer {
    breakers: Breakers,
}

impl CircuitBreakerLayer {
    /// A layer with a fresh registry using `config` for every backend.
    pub fn new(config: BreakerConfig) -> Self {
        Self::with_breakers(Breakers::new(config))
    }

    /// A layer over an existing registry (to share it, or read states from it).
    pub fn with_breakers(breakers: Breakers) -> Self {
        Self { breakers }
    }

    /// The registry, for state queries.
    pub fn breakers(&self) -> &Breakers {
        &self.breakers
    }
}

impl<S> Layer<S> for CircuitBreakerLayer {
    type Service = CircuitBreaker<S>;

    fn layer(&self, inner: S) -> Self::Service {
        CircuitBreaker::new(inner, self.breakers.clone())
    }
}

/// A service that refuses calls to backends whose circuit is open; made by [`CircuitBreakerLayer`].
#[derive(Debug, Clone)]
pub struct CircuitBreaker<S> {
    inner: S,
    breakers: Breakers,
}

impl<S> CircuitBreaker<S> {
    /// Wraps `inner`, keeping breaker state in `breakers`.
    pub fn new(inner: S, breakers: Breakers) -> Self {
        Self { inner, breakers }
    }

    /// The registry, for state queries.
    pub fn breakers(&self) -> &Breakers {
        &self.breakers
    }
}

impl<S> Service<GrpcRequest> for CircuitBreaker<S>
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
        match self.breakers.for_request(&request).try_acquire() {
            Ok(permit) => {
                let deadline = Deadline::of_http(&request).map(|d| d.instant());
                future::ResponseFuture::called(self.inner.call(request), permit, deadline)
            }
            Err(open) => future::ResponseFuture::rejected(Box::new(open.into_status())),
        }
    }
}

/// The circuit breaker's response future.
pub mod future {
    use super::*;

    pin_project! {
        /// Waits for the inner call's response headers and records the outcome with the breaker.
        pub struct ResponseFuture<F> {
            #[pin]
            kind: Kind<F>,
        }
    }

    pin_project! {
        #[project = KindProj]
        enum Kind<F> {
            Called { #[pin] future: F, permit: Option<Permit>, deadline: Option<Instant> },
            Rejected { error: Option<BoxError> },
        }
    }

    impl<F> ResponseFuture<F> {
        pub(super) fn called(future: F, permit: Permit, deadline: Option<Instant>) -> Self {
            Self {
                kind: Kind::Called {
                    future,
                    permit: Some(permit),
                    deadline,
                },
            }
        }

        pub(super) fn rejected(error: BoxError) -> Self {
            Self {
                kind: Kind::Rejected { error: Some(error) },
            }
        }
    }

    impl<F, E> std::future::Future for ResponseFuture<F>
    where
        F: std::future::Future<Output = Result<GrpcResponse, E>>,
        E: Into<BoxError>,
    {
        type Output = Result<GrpcResponse, BoxError>;

        fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
            match self.project().kind.project() {
                KindProj::Called {
                    future,
                    permit,
                    deadline,
                } => {
                    let result = std::task::ready!(future.poll(cx)).map_err(Into::into);
                    if let Some(permit) = permit.take() {
                        // Only backend failures and successes count: a caller whose deadline
                        // passed, or our own bulkhead's refusal, says nothing about the backend
                        // (the permit is dropped unrecorded).
                        let outcome = outcome::classify(&result);
                        if outcome.class(*deadline).feeds_breaker() {
                            permit.record(outcome.code);
                        }
                    }
                    Poll::Ready(result)
                }
                KindProj::Rejected { error } => Poll::Ready(Err(error
                    .take()
                    .unwrap_or_else(|| "circuit breaker future polled after completion".into()))),
            }
        }
    }
}
