//! What the layers that observe whole RPCs share ([`crate::trace`], [`crate::rpc_metrics`]): the
//! method's name, read from the request path, and a response body that reports how the call
//! ended.
//!
//! A gRPC call is not over when its handler returns: a unary answer's status travels in the
//! trailers after the message, and a stream's after its last message, seconds later. An
//! [`ObservedBody`] wraps the response body and tells its [`Observer`] exactly once, with the
//! final code:
//!
//! - the `grpc-status` of a *trailers-only* response (an error answered before any message), read
//!   from the headers;
//! - else the `grpc-status` of the trailers, when the body ends;
//! - INTERNAL if the body ended with an error or without a status (a broken peer), UNAVAILABLE for
//!   a transport error on the client side;
//! - CANCELLED if the body was dropped before its end (the client went away, or stopped reading a
//!   stream), unless it was a trailers-only response: its code was sent with the headers, and a
//!   server drops such an empty body without polling it.

use std::{
    fmt,
    pin::Pin,
    task::{Context, Poll},
    time::Instant,
};

use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tonic::Code;

/// The fully qualified service and the method of a call, from its `:path`
/// (`/weir.router.v1.RouterService/Complete`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RpcName {
    /// `weir.router.v1.RouterService`.
    pub service: String,
    /// `Complete`.
    pub method: String,
}

impl RpcName {
    /// Parses `/package.Service/Method`; any other path (not gRPC) gives the whole path as the
    /// service and an empty method.
    pub fn from_path(path: &str) -> Self {
        let trimmed = path.strip_prefix('/').unwrap_or(path);
        match trimmed.split_once('/') {
            Some((service, method)) if !service.is_empty() && !method.contains('/') => Self {
                service: service.to_string(),
                method: method.to_string(),
            },
            _ => Self {
                service: path.to_string(),
                method: String::new(),
            },
        }
    }

    /// The name of a call's span: `package.Service/Method`, as the OpenTelemetry RPC conventions
    /// name it.
    pub fn span_name(&self) -> String {
        format!("{}/{}", self.service, self.method)
    }
}

/// Told once how a call ended (see the [module docs](self)).
pub trait Observer {
    /// Runs `poll` (one poll of the wrapped body). The default just runs it; a tracing observer
    /// enters its span, so what the body does while streaming is recorded under the call.
    fn scope<R>(&self, poll: impl FnOnce() -> R) -> R {
        poll()
    }

    /// The call ended with `code`, `started.elapsed()` after it began.
    fn end(self, code: Code, started: Instant);
}

pub use crate::outcome::grpc_status;

/// Calls the observer when the body is dropped before it ended: with the code of a trailers-only
/// response (whose status was sent with the headers: a server does not even poll its empty body),
/// CANCELLED otherwise.
struct Guard<O: Observer> {
    observer: Option<O>,
    started: Instant,
    // The code of a trailers-only response, known from the headers.
    early: Option<Code>,
}

impl<O: Observer> Guard<O> {
    fn end(&mut self, code: Code) {
        if let Some(observer) = self.observer.take() {
            observer.end(code, self.started);
        }
    }
}

impl<O: Observer> Drop for Guard<O> {
    fn drop(&mut self) {
        self.end(self.early.unwrap_or(Code::Cancelled));
    }
}

pin_project! {
    /// A response body that tells its [`Observer`] how the call ended (see the
    /// [module docs](self)). Frames pass through unchanged.
    pub struct ObservedBody<B, O: Observer> {
        #[pin]
        inner: B,
        guard: Guard<O>,
        // The code when the inner body fails (INTERNAL on a server, UNAVAILABLE on a client).
        on_error: Code,
    }
}

impl<B, O: Observer> ObservedBody<B, O> {
    /// Wraps the body of `response` (whose headers give a trailers-only status), for a call that
    /// began at `started`. `on_error` is the code reported if the body itself fails.
    pub fn wrap(
        response: http::Response<B>,
        observer: O,
        started: Instant,
        on_error: Code,
    ) -> http::Response<Self> {
        let early = grpc_status(response.headers()).or_else(|| {
            // Not a gRPC answer at all (a proxy spoke): gRPC's HTTP-to-code mapping.
            (response.status() != http::StatusCode::OK)
                .then(|| crate::outcome::classify_response(&response).code)
        });
        response.map(|inner| Self {
            inner,
            guard: Guard {
                observer: Some(observer),
                started,
                early,
            },
            on_error,
        })
    }
}

impl<B, O: Observer> ObservedBody<B, O> {
    /// The observer, until the call has ended.
    pub fn observer(&self) -> Option<&O> {
        self.guard.observer.as_ref()
    }
}

impl<B: Default, O: Observer + Default> Default for ObservedBody<B, O> {
    /// An empty body whose end tells a default observer nothing is left (for answers built
    /// before any call, such as a refusal).
    fn default() -> Self {
        Self {
            inner: B::default(),
            guard: Guard {
                observer: Some(O::default()),
                started: Instant::now(),
                early: None,
            },
            on_error: Code::Internal,
        }
    }
}

impl<B: fmt::Debug, O: Observer> fmt::Debug for ObservedBody<B, O> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ObservedBody")
            .field("inner", &self.inner)
            .field("ended", &self.guard.observer.is_none())
            .finish()
    }
}

impl<B: Body, O: Observer> Body for ObservedBody<B, O> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        let inner = this.inner;
        let polled = match this.guard.observer.as_ref() {
            Some(observer) => observer.scope(|| inner.poll_frame(cx)),
            None => inner.poll_frame(cx),
        };
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(code) = frame.trailers_ref().and_then(grpc_status) {
                    this.guard.end(code);
                }
            }
            Poll::Ready(Some(Err(_))) => this.guard.end(*this.on_error),
            Poll::Ready(None) => {
                let code = this.guard.early.unwrap_or(Code::Internal);
                this.guard.end(code);
            }
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use std::sync::{Arc, Mutex};

    use bytes::Bytes;
    use http_body_util::{BodyExt, Empty, StreamBody};

    use super::*;
    use crate::outcome::GRPC_STATUS;

    #[derive(Clone, Default)]
    struct Seen(Arc<Mutex<Vec<Code>>>);

    impl Observer for Seen {
        fn end(self, code: Code, _started: Instant) {
            self.0.lock().unwrap().push(code);
        }
    }

    fn trailers(code: i32) -> http::HeaderMap {
        let mut map = http::HeaderMap::new();
        map.insert(GRPC_STATUS, code.to_string().parse().unwrap());
        map
    }

    type Item = Result<Frame<Bytes>, std::convert::Infallible>;
    type Frames = Vec<Item>;
    type Streamed = StreamBody<futures::stream::Iter<std::vec::IntoIter<Item>>>;

    fn streamed(frames: Frames) -> http::Response<Streamed> {
        http::Response::new(StreamBody::new(futures::stream::iter(frames)))
    }

    #[test]
    fn names_come_from_the_path() {
        let name = RpcName::from_path("/weir.router.v1.RouterService/Complete");
        assert_eq!(name.service, "weir.router.v1.RouterService");
        assert_eq!(name.method, "Complete");
        assert_eq!(name.span_name(), "weir.router.v1.RouterService/Complete");
        let odd = RpcName::from_path("/metrics");
        assert_eq!(
            (odd.service.as_str(), odd.method.as_str()),
            ("/metrics", "")
        );
    }

    #[tokio::test]
    async fn the_trailers_status_is_reported_once_at_the_end() {
        let seen = Seen::default();
        let response = streamed(vec![
            Ok(Frame::data(Bytes::from_static(b"msg"))),
            Ok(Frame::trailers(trailers(0))),
        ]);
        let body =
            ObservedBody::wrap(response, seen.clone(), Instant::now(), Code::Internal).into_body();
        let collected = body.collect().await.unwrap();
        assert_eq!(collected.to_bytes(), Bytes::from_static(b"msg"));
        assert_eq!(*seen.0.lock().unwrap(), [Code::Ok]);
    }

    #[tokio::test]
    async fn a_trailers_only_error_is_read_from_the_headers() {
        let seen = Seen::default();
        let mut response = http::Response::new(Empty::<Bytes>::new());
        response
            .headers_mut()
            .insert(GRPC_STATUS, "14".parse().unwrap());
        let body =
            ObservedBody::wrap(response, seen.clone(), Instant::now(), Code::Internal).into_body();
        body.collect().await.unwrap();
        assert_eq!(*seen.0.lock().unwrap(), [Code::Unavailable]);
    }

    #[test]
    fn a_trailers_only_response_dropped_unpolled_keeps_its_code() {
        let seen = Seen::default();
        let mut response = http::Response::new(Empty::<Bytes>::new());
        response
            .headers_mut()
            .insert(GRPC_STATUS, "3".parse().unwrap());
        drop(ObservedBody::wrap(
            response,
            seen.clone(),
            Instant::now(),
            Code::Internal,
        ));
        assert_eq!(*seen.0.lock().unwrap(), [Code::InvalidArgument]);
    }

    #[tokio::test]
    async fn a_body_dropped_before_its_end_is_cancelled() {
        let seen = Seen::default();
        let response = streamed(vec![
            Ok(Frame::data(Bytes::from_static(b"token"))),
            Ok(Frame::trailers(trailers(0))),
        ]);
        let mut body =
            ObservedBody::wrap(response, seen.clone(), Instant::now(), Code::Internal).into_body();
        body.frame().await.unwrap().unwrap();
        drop(body);
        assert_eq!(*seen.0.lock().unwrap(), [Code::Cancelled]);
    }

    #[tokio::test]
    async fn a_body_ending_without_status_is_internal() {
        let seen = Seen::default();
        let response = streamed(vec![Ok(Frame::data(Bytes::from_static(b"x")))]);
        let body =
            ObservedBody::wrap(response, seen.clone(), Instant::now(), Code::Internal).into_body();
        body.collect().await.unwrap();
        assert_eq!(*seen.0.lock().unwrap(), [Code::Internal]);
    }
}
