//! The tower layer: the front door's check of every call, and the verdict a handler may wait for
//! ([`RateLimitLayer::overlapping`]).

use std::{
    future::Future,
    pin::Pin,
    task::{Context, Poll},
};

use http::{Request, Response};
use tower::{Layer, Service};

use crate::{
    admission::is_exempt_path, auth::ApiKeyId, error::ApiError, metadata::TENANT, tenant::Tenant,
};

use super::*;

/// Adds [`RateLimit`] to a server stack.
#[derive(Debug, Clone)]
pub struct RateLimitLayer {
    limiter: TenantLimiter,
    overlap: &'static [&'static str],
}

impl RateLimitLayer {
    /// A layer that checks every request against `limiter`.
    pub fn new(limiter: TenantLimiter) -> Self {
        Self {
            limiter,
            overlap: &[],
        }
    }

    /// Lets requests to `paths` start while their Redis check runs, instead of after it, when
    /// the tenant's last check left headroom ([`OVERLAP_MIN_HEADROOM`]). The handler finds a
    /// [`PendingVerdict`] in the request's extensions and must wait for it before anything it
    /// cannot undo (the router waits before its model call and before claiming a `request_id`;
    /// a reservation made meanwhile is released). The limit stays exact: every request is still
    /// decided by the same Redis check, and a refused one is answered with the same refusal,
    /// whatever its handler did. Only for handlers that wait: any other path is checked first.
    pub fn overlapping(mut self, paths: &'static [&'static str]) -> Self {
        self.overlap = paths;
        self
    }
}

impl<S> Layer<S> for RateLimitLayer {
    type Service = RateLimit<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RateLimit {
            inner,
            limiter: self.limiter.clone(),
            overlap: self.overlap,
        }
    }
}

/// The rate limit service (see the module doc).
#[derive(Debug, Clone)]
pub struct RateLimit<S> {
    inner: S,
    limiter: TenantLimiter,
    overlap: &'static [&'static str],
}

/// The rate limit decision of a request that started before it was known
/// ([`RateLimitLayer::overlapping`]), in the request's extensions.
#[derive(Debug, Clone)]
pub struct PendingVerdict(tokio::sync::watch::Receiver<Option<bool>>);

impl PendingVerdict {
    /// A verdict and the sender that decides it.
    fn channel() -> (tokio::sync::watch::Sender<Option<bool>>, Self) {
        let (sender, receiver) = tokio::sync::watch::channel(None);
        (sender, Self(receiver))
    }

    /// The pending verdict of a request, if its check had not decided when it started.
    pub fn of(extensions: &http::Extensions) -> Option<Self> {
        extensions.get::<Self>().cloned()
    }

    /// Waits for the decision: true when the request may go on. False when refused, or when the
    /// check was abandoned (the request is being dropped).
    pub async fn admitted(&self) -> bool {
        let mut receiver = self.0.clone();
        loop {
            if let Some(allowed) = *receiver.borrow_and_update() {
                return allowed;
            }
            if receiver.changed().await.is_err() {
                return (*receiver.borrow()).unwrap_or(false);
            }
        }
    }
}

/// The tenant of a request: from the auth layer's extensions, else the `weir-tenant` header.
fn tenant_of<B>(request: &Request<B>) -> Result<Tenant, ApiError> {
    if let Some(tenant) = request.extensions().get::<Tenant>() {
        return Ok(tenant.clone());
    }
    match request.headers().get(TENANT) {
        None => Ok(Tenant::default()),
        Some(value) => Tenant::new(
            value
                .to_str()
                .map_err(|_| ApiError::invalid_argument(TENANT, "tenant metadata must be ASCII"))?,
        ),
    }
}

fn refuse<B: Default>(decision: &Decision, tenant: &Tenant) -> Option<Response<B>> {
    let error = decision.refusal()?;
    metrics::counter!("weir_rate_limited_total", "tenant" => tenant.to_string()).increment(1);
    tracing::debug!(%tenant, retry_after = ?decision.retry_after, "rate limited");
    Some(tonic::Status::from(error).into_http())
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for RateLimit<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Clone,
    ResBody: Default,
{
    type Response = Response<ResBody>;
    type Error = S::Error;
    type Future = future::ResponseFuture<S, ReqBody, ResBody>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<ReqBody>) -> Self::Future {
        if !self.limiter.is_enabled() || is_exempt_path(request.uri().path()) {
            return future::ResponseFuture::calling(self.inner.call(request));
        }
        let tenant = match tenant_of(&request) {
            Ok(tenant) => tenant,
            Err(error) => {
                return future::ResponseFuture::rejected(tonic::Status::from(error).into_http());
            }
        };
        let key = ApiKeyId::of(request.extensions()).cloned();
        if let Some(decision) = self.limiter.try_check_now(&tenant, key.as_ref()) {
            return match refuse(&decision, &tenant) {
                Some(response) => future::ResponseFuture::rejected(response),
                None => future::ResponseFuture::calling(self.inner.call(request)),
            };
        }
        // The check needs a Redis round trip: take the service that was polled ready, and leave
        // a clone for the next call (tower's usual pattern).
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let overlap =
            self.overlap.contains(&request.uri().path()) && self.limiter.has_headroom(&tenant);
        let limiter = self.limiter.clone();
        let check = Box::pin(async move {
            let decision = limiter.check(&tenant, key.as_ref()).await;
            (decision, tenant)
        });
        if overlap {
            let (verdict, pending) = PendingVerdict::channel();
            let mut request = request;
            request.extensions_mut().insert(pending);
            return future::ResponseFuture::overlapped(check, verdict, inner.call(request));
        }
        future::ResponseFuture::checking(check, inner, request)
    }
}

/// The response future of [`RateLimit`].
pub mod future {
    use super::*;

    type Check = Pin<Box<dyn Future<Output = (Decision, Tenant)> + Send>>;

    pin_project_lite::pin_project! {
        /// Waits for the limiter's decision, then for the inner service, or answers the refusal.
        pub struct ResponseFuture<S, R, B>
        where
            S: Service<Request<R>>,
        {
            #[pin]
            state: State<S, S::Future, R, B, S::Error>,
        }
    }

    pin_project_lite::pin_project! {
        #[project = StateProj]
        enum State<S, F, R, B, E> {
            Checking { check: Check, inner: Option<S>, request: Option<Request<R>> },
            Calling { #[pin] future: F },
            Rejected { response: Option<Response<B>> },
            // The handler runs while the check does; both must end before the answer (the
            // handler undoes what it did when refused: a hold is released, not charged).
            Overlapped {
                check: Option<Check>,
                verdict: tokio::sync::watch::Sender<Option<bool>>,
                refusal: Option<Response<B>>,
                #[pin] future: F,
                output: Option<Result<Response<B>, E>>,
            },
        }
    }

    impl<S: Service<Request<R>>, R, B> ResponseFuture<S, R, B> {
        pub(super) fn calling(future: S::Future) -> Self {
            Self {
                state: State::Calling { future },
            }
        }

        pub(super) fn rejected(response: Response<B>) -> Self {
            Self {
                state: State::Rejected {
                    response: Some(response),
                },
            }
        }

        pub(super) fn overlapped(
            check: Check,
            verdict: tokio::sync::watch::Sender<Option<bool>>,
            future: S::Future,
        ) -> Self {
            Self {
                state: State::Overlapped {
                    check: Some(check),
                    verdict,
                    refusal: None,
                    future,
                    output: None,
                },
            }
        }

        pub(super) fn checking(check: Check, inner: S, request: Request<R>) -> Self {
            Self {
                state: State::Checking {
                    check,
                    inner: Some(inner),
                    request: Some(request),
                },
            }
        }
    }

    impl<S, R, B> Future for ResponseFuture<S, R, B>
    where
        S: Service<Request<R>, Response = Response<B>>,
        B: Default,
    {
        type Output = Result<Response<B>, S::Error>;

        fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
            let mut state = self.project().state;
            loop {
                match state.as_mut().project() {
                    StateProj::Checking {
                        check,
                        inner,
                        request,
                    } => {
                        let (decision, tenant) = std::task::ready!(check.as_mut().poll(cx));
                        if let Some(response) = refuse(&decision, &tenant) {
                            return Poll::Ready(Ok(response));
                        }
                        let (Some(mut inner), Some(request)) = (inner.take(), request.take())
                        else {
                            return Poll::Ready(Ok(Response::new(B::default())));
                        };
                        let future = inner.call(request);
                        state.set(State::Calling { future });
                    }
                    StateProj::Calling { future } => return future.poll(cx),
                    StateProj::Rejected { response } => {
                        return Poll::Ready(Ok(response.take().unwrap_or_default()));
                    }
                    StateProj::Overlapped {
                        check,
                        verdict,
                        refusal,
                        future,
                        output,
                    } => {
                        if let Some(pending) = check.as_mut()
                            && let Poll::Ready((decision, tenant)) = pending.as_mut().poll(cx)
                        {
                            *refusal = refuse(&decision, &tenant);
                            verdict.send_replace(Some(refusal.is_none()));
                            *check = None;
                        }
                        if output.is_none()
                            && let Poll::Ready(result) = future.poll(cx)
                        {
                            *output = Some(result);
                        }
                        if check.is_some() || output.is_none() {
                            return Poll::Pending;
                        }
                        if let Some(response) = refusal.take() {
                            return Poll::Ready(Ok(response));
                        }
                        return match output.take() {
                            Some(result) => Poll::Ready(result),
                            None => Poll::Ready(Ok(Response::new(B::default()))),
                        };
                    }
                }
            }
        }
    }
}
