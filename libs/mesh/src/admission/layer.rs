//! The tower layer: parses criticality, admits or sheds, and holds the permit until the response
//! body is finished.

use std::task::{Context, Poll};

use http::{Request, Response};
use tokio::time::Instant;
use tower::{Layer, Service};

use super::{
    config::AdmissionConfig,
    is_exempt_path,
    limit::{AdmissionController, Permit},
};
use crate::{criticality::Criticality, deadline::Deadline};

/// Adds [`Admission`] to a server stack.
#[derive(Debug, Clone)]
pub struct AdmissionLayer {
    controller: AdmissionController,
}

impl AdmissionLayer {
    /// A layer with its own controller built from `config`.
    pub fn new(config: &AdmissionConfig) -> Self {
        Self::with_controller(AdmissionController::new(config))
    }

    /// A layer that uses `controller` (to share it, name its metrics, or inspect it in tests).
    pub fn with_controller(controller: AdmissionController) -> Self {
        Self { controller }
    }

    /// The controller.
    pub fn controller(&self) -> &AdmissionController {
        &self.controller
    }
}

impl<S> Layer<S> for AdmissionLayer {
    type Service = Admission<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Admission {
            inner,
            controller: self.controller.clone(),
        }
    }
}

/// The admission service: parses criticality, admits or sheds, holds the permit until the
/// response body is finished. An admitted request carries its [`Criticality`] and an
/// [`super::Admitted`] handle in its extensions.
#[derive(Debug, Clone)]
pub struct Admission<S> {
    inner: S,
    controller: AdmissionController,
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for Admission<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    ResBody: Default,
{
    type Response = Response<body::ResponseBody<ResBody>>;
    type Error = S::Error;
    type Future = future::ResponseFuture<S::Future, ResBody>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<ReqBody>) -> Self::Future {
        if is_exempt_path(request.uri().path()) {
            return future::ResponseFuture::admitted(self.inner.call(request), None, None);
        }
        let criticality = match Criticality::from_headers(request.headers()) {
            Ok(criticality) => criticality,
            Err(error) => {
                return future::ResponseFuture::rejected(tonic::Status::from(error).into_http());
            }
        };
        request.extensions_mut().insert(criticality);
        match self.controller.try_acquire(criticality) {
            Ok(permit) => {
                request.extensions_mut().insert(permit.admitted().clone());
                let deadline = request
                    .extensions()
                    .get::<Deadline>()
                    .map(Deadline::instant);
                future::ResponseFuture::admitted(self.inner.call(request), Some(permit), deadline)
            }
            Err(shed) => {
                tracing::debug!(%shed, "shed");
                future::ResponseFuture::rejected(self.controller.shed_response(&shed))
            }
        }
    }
}

/// The response future of [`Admission`].
pub mod future {
    use std::{future::Future, pin::Pin};

    use super::*;
    use crate::outcome;

    pin_project_lite::pin_project! {
        /// Resolves to the inner response with a body that holds the permit, or to the shed
        /// answer.
        pub struct ResponseFuture<F, B> {
            #[pin]
            state: State<F, B>,
        }
    }

    pin_project_lite::pin_project! {
        #[project = StateProj]
        enum State<F, B> {
            Rejected { response: Option<Response<body::ResponseBody<B>>> },
            Admitted {
                #[pin] inner: F,
                permit: Option<Permit>,
                deadline: Option<Instant>,
            },
        }
    }

    impl<F, B> ResponseFuture<F, B> {
        pub(super) fn admitted(
            inner: F,
            permit: Option<Permit>,
            deadline: Option<Instant>,
        ) -> Self {
            Self {
                state: State::Admitted {
                    inner,
                    permit,
                    deadline,
                },
            }
        }

        pub(super) fn rejected(response: Response<body::ResponseBody<B>>) -> Self {
            Self {
                state: State::Rejected {
                    response: Some(response),
                },
            }
        }
    }

    impl<F, B, E> Future for ResponseFuture<F, B>
    where
        F: Future<Output = Result<Response<B>, E>>,
        B: Default,
    {
        type Output = Result<Response<body::ResponseBody<B>>, E>;

        fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
            match self.project().state.project() {
                StateProj::Rejected { response } => {
                    Poll::Ready(Ok(response.take().unwrap_or_default()))
                }
                StateProj::Admitted {
                    inner,
                    permit,
                    deadline,
                } => {
                    let result = std::task::ready!(inner.poll(cx));
                    let permit = permit.take();
                    Poll::Ready(match result {
                        Ok(response) => {
                            if let Some(permit) = permit.as_ref() {
                                // Only completed work and backend failures are latency samples.
                                let outcome = outcome::classify_response(&response);
                                permit.sample(outcome.class(*deadline));
                            }
                            Ok(body::holding(response, permit))
                        }
                        // An error of the inner service is no answer: the connection is gone.
                        Err(error) => Err(error),
                    })
                }
            }
        }
    }
}

/// The response body of [`Admission`].
pub mod body {
    use tonic::Code;

    use super::Permit;
    use crate::rpc::{ObservedBody, Observer};

    /// The inner body, holding the request's admission permit until the body ends or is dropped,
    /// so a long stream counts as in flight for as long as it runs.
    pub type ResponseBody<B> = ObservedBody<B, HeldPermit>;

    /// The admission permit a response holds; giving it back is all its end does.
    #[derive(Debug, Default)]
    pub struct HeldPermit(pub(super) Option<Permit>);

    impl Observer for HeldPermit {
        fn end(self, _code: Code, _started: std::time::Instant) {
            // Dropping `self` gives the permit back.
        }
    }

    impl<B> ObservedBody<B, HeldPermit> {
        /// True while the body still holds an admission permit.
        pub fn holds_permit(&self) -> bool {
            self.observer().is_some_and(|held| held.0.is_some())
        }
    }

    /// `response` with a body holding `permit`.
    pub(super) fn holding<B>(
        response: http::Response<B>,
        permit: Option<Permit>,
    ) -> http::Response<ResponseBody<B>> {
        ObservedBody::wrap(
            response,
            HeldPermit(permit),
            std::time::Instant::now(),
            Code::Internal,
        )
    }
}
