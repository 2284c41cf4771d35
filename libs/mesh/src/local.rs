//! In-process calls between services hosted by the same process.
//!
//! `weir up`, and `weir serve router budget inference` in a deployment that co-locates services,
//! run several Weir services in one process. Their calls to each other used to cross a loopback
//! socket anyway: on the router's full policy path that is three calls per request (budget
//! `Reserve`, the model call, budget `Commit`), each paying HTTP/2 framing, two hyper tasks and the
//! kernel's TCP, about 0.1 ms per call on the 2-core development machine, and a quarter of the
//! CPU under load (docs/performance.md).
//!
//! A [`LocalChannel`] is the callee server's **whole stack** (trace, metrics, deadline, auth,
//! admission, rate limit, then the routes; see [`crate::server`]) as a tower service, so an
//! in-process call is still a gRPC call: encoded and decoded by tonic, authenticated by its mesh
//! token, admitted, traced and counted exactly as a socket caller's. Only the socket is skipped.
//! [`Dialer`] picks the transport for a URL: a [`LocalChannel`] when the URL is the address of a
//! server hosted in this process, else a lazy socket channel ([`crate::client::lazy_channel`]).
//! [`crate::client::ClientStack`] runs its layers (retry, breaker, bulkhead, timeouts, signing)
//! over either [`Transport`].
//!
//! # What stays the same, and what differs
//!
//! - **A call carries only what a socket carries**: the request's headers and body. The
//!   request's extensions (the caller's own tenant, deadline, backend key) are dropped before
//!   the callee's stack, so the callee decides the caller from its metadata alone, as it would
//!   from the wire ([`crate::server`] does this for every in-process handle).
//! - **Cancellation and deadlines**: dropping the call drops the callee's handler, as a reset
//!   stream would; the deadline travels in `grpc-timeout` and the callee's deadline layer enforces
//!   it.
//! - **Lifecycle**: a call made before the callee serves waits until it does; once the callee's
//!   server stops accepting (after its drain delay), new calls fail with UNAVAILABLE
//!   `UPSTREAM_UNREACHABLE`, as a refused connection would, and calls already running finish.
//!   A server started again in the same process is a new server: dial it again.
//! - **Isolation**: the callee's handler runs on the caller's task instead of a task of its own,
//!   which is what saves the hand-offs. Handlers do not panic (a panic is a bug), but if one did
//!   it would end the caller's request rather than only the callee's connection.
//!
//! Turned off with `[mesh] in_process = false` (every call then takes a socket, as between
//! separate processes), which the end-to-end tests do so that they drive real sockets between
//! services; `tests/tests/in_process.rs` drives the walk over in-process calls.

use std::{
    collections::HashMap,
    fmt,
    net::SocketAddr,
    sync::Arc,
    task::{Context, Poll},
};

use futures::future::{BoxFuture, Either};
use tokio::sync::watch;
use tonic::{body::Body, transport::Channel};
use tower::{BoxError, Service, ServiceExt};

use crate::{
    balance::{BadUrl, BalanceConfig, Balancer, Target},
    server::{LocalError, LocalService},
};

/// Where a [`LocalChannel`]'s server is in its life.
#[derive(Clone, Default)]
pub(crate) enum LocalState {
    /// Built, not serving yet: calls wait.
    #[default]
    Starting,
    /// Serving: calls go through this stack.
    Serving(LocalService),
    /// Stopped accepting: calls fail as a refused connection would.
    Stopped,
}

/// The server side of a [`LocalChannel`]: [`crate::server::GrpcServer`] publishes its stack here
/// when it starts serving and withdraws it when it stops accepting.
#[derive(Clone)]
pub(crate) struct LocalPublisher(Arc<watch::Sender<LocalState>>);

impl fmt::Debug for LocalPublisher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LocalPublisher")
            .field("channels", &self.0.receiver_count())
            .finish()
    }
}

impl LocalPublisher {
    pub(crate) fn new() -> Self {
        Self(Arc::new(watch::Sender::new(LocalState::Starting)))
    }

    pub(crate) fn channel(&self) -> LocalChannel {
        LocalChannel {
            state: self.0.subscribe(),
        }
    }

    pub(crate) fn serve(&self, stack: LocalService) {
        self.0.send_replace(LocalState::Serving(stack));
    }

    pub(crate) fn stop(&self) {
        self.0.send_replace(LocalState::Stopped);
    }
}

/// A channel to a server hosted in this process (see the [module docs](self)), from
/// [`crate::server::GrpcServer::local_channel`]. Cheap to clone; usable before the server serves
/// (calls wait for it).
#[derive(Clone)]
pub struct LocalChannel {
    state: watch::Receiver<LocalState>,
}

impl fmt::Debug for LocalChannel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match &*self.state.borrow() {
            LocalState::Starting => "starting",
            LocalState::Serving(_) => "serving",
            LocalState::Stopped => "stopped",
        };
        f.debug_struct("LocalChannel")
            .field("state", &state)
            .finish()
    }
}

/// Why an in-process call could not be made: the server it was for has stopped accepting calls
/// (or was dropped without serving). Read as UPSTREAM_UNREACHABLE by the client stack
/// ([`crate::transport::call_error`]): the request was never handled.
#[derive(Debug, thiserror::Error)]
#[error("the in-process server is not serving")]
pub struct NotServing;

impl Service<http::Request<Body>> for LocalChannel {
    type Response = http::Response<Body>;
    type Error = LocalError;
    type Future = BoxFuture<'static, Result<http::Response<Body>, LocalError>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // Admission and limits are the callee's stack's, applied per call, as on a socket.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let mut state = self.state.clone();
        Box::pin(async move {
            let stack = {
                let ready = state
                    .wait_for(|state| !matches!(state, LocalState::Starting))
                    .await
                    .map_err(|_| LocalError::new(NotServing))?;
                match &*ready {
                    LocalState::Serving(stack) => stack.clone(),
                    LocalState::Starting | LocalState::Stopped => {
                        return Err(LocalError::new(NotServing));
                    }
                }
            };
            stack.oneshot(request).await
        })
    }
}

/// The transport under a [`crate::client::ClientStack`]: a socket [`Channel`], a
/// [`LocalChannel`], or a [`Balancer`] over several endpoints of either kind. Made by
/// [`Dialer::dial`], or from any of them with `into()`.
#[derive(Debug, Clone)]
pub struct Transport(Route);

#[derive(Debug, Clone)]
enum Route {
    Socket(Channel),
    Local(LocalChannel),
    Balanced(Balancer),
}

impl Transport {
    /// Whether calls stay in the process.
    pub fn is_local(&self) -> bool {
        matches!(self.0, Route::Local(_))
    }

    /// The balancer, when this transport spreads calls over several endpoints.
    pub fn balancer(&self) -> Option<&Balancer> {
        match &self.0 {
            Route::Balanced(balancer) => Some(balancer),
            Route::Socket(_) | Route::Local(_) => None,
        }
    }
}

impl From<Balancer> for Transport {
    fn from(balancer: Balancer) -> Self {
        Self(Route::Balanced(balancer))
    }
}

impl From<Channel> for Transport {
    fn from(channel: Channel) -> Self {
        Self(Route::Socket(channel))
    }
}

impl From<LocalChannel> for Transport {
    fn from(channel: LocalChannel) -> Self {
        Self(Route::Local(channel))
    }
}

/// The future of a socket call, its error boxed.
type SocketFuture = futures::future::MapErr<
    <Channel as Service<http::Request<Body>>>::Future,
    fn(tonic::transport::Error) -> BoxError,
>;
/// The future of an in-process call, its error boxed.
type LocalFuture = futures::future::MapErr<
    <LocalChannel as Service<http::Request<Body>>>::Future,
    fn(LocalError) -> BoxError,
>;
/// The future of a balanced call.
type BalancedFuture = <Balancer as Service<http::Request<Body>>>::Future;

impl Service<http::Request<Body>> for Transport {
    type Response = http::Response<Body>;
    type Error = BoxError;
    type Future = Either<Either<SocketFuture, LocalFuture>, BalancedFuture>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        match &mut self.0 {
            Route::Socket(channel) => channel.poll_ready(cx).map_err(BoxError::from),
            Route::Local(channel) => channel.poll_ready(cx).map_err(BoxError::from),
            Route::Balanced(balancer) => balancer.poll_ready(cx),
        }
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        use futures::TryFutureExt;
        match &mut self.0 {
            Route::Socket(channel) => Either::Left(Either::Left(
                channel
                    .call(request)
                    .map_err(BoxError::from as fn(tonic::transport::Error) -> BoxError),
            )),
            Route::Local(channel) => Either::Left(Either::Right(
                channel
                    .call(request)
                    .map_err(BoxError::from as fn(LocalError) -> BoxError),
            )),
            Route::Balanced(balancer) => Either::Right(balancer.call(request)),
        }
    }
}

/// Picks the transport for a service URL: the in-process server listening at that address when
/// this process hosts one, else a socket. The default dialer knows no local servers (every call
/// takes a socket). Cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct Dialer {
    local: Arc<HashMap<SocketAddr, LocalChannel>>,
}

impl Dialer {
    /// A dialer that also knows the server listening on `addr` in this process.
    pub fn with_local(mut self, addr: SocketAddr, channel: LocalChannel) -> Self {
        Arc::make_mut(&mut self.local).insert(addr, channel);
        self
    }

    /// The transport to `url` (`http://host:port`): in process when `host:port` is the address of
    /// a server given to [`Dialer::with_local`] (an IP address, as the stack writes its URLs;
    /// names are never resolved here), else a lazy socket channel.
    pub fn dial(&self, url: &str) -> Result<Transport, tonic::transport::Error> {
        if let Some(channel) = self.local_for(url) {
            return Ok(channel.clone().into());
        }
        crate::client::lazy_channel(url).map(Transport::from)
    }

    /// The transport to `urls`, a comma-separated list of `http://host[:port]` URLs: what
    /// [`Dialer::dial`] gives for a single URL whose host is an IP address (one channel, or the
    /// in-process server), else a [`Balancer`] over every address of every element, resolved
    /// again every [`BalanceConfig::resolve_interval`] (see [`crate::balance`]). `service` names
    /// the dependency in the balancer's metrics (`inference`, `session`, ...). An endpoint whose
    /// address a server of this process listens on is called in process. Needs a Tokio runtime.
    pub fn dial_balanced(
        &self,
        urls: &str,
        config: &BalanceConfig,
        service: &str,
    ) -> Result<Transport, BadUrl> {
        let targets = Target::parse_list(urls)?;
        if let [target] = targets.as_slice()
            && target.ip.is_some()
        {
            return self.dial(urls.trim()).map_err(|error| BadUrl {
                url: urls.trim().to_string(),
                reason: error.to_string(),
            });
        }
        let local = self.local.clone();
        let connect = move |addr: SocketAddr| match local.get(&addr) {
            Some(channel) => Ok(Transport::from(channel.clone())),
            None => crate::client::lazy_channel(&format!("http://{addr}")).map(Transport::from),
        };
        Ok(Balancer::new(
            service,
            targets,
            config,
            crate::balance::resolver(),
            connect,
        )
        .into())
    }

    fn local_for(&self, url: &str) -> Option<&LocalChannel> {
        if self.local.is_empty() {
            return None;
        }
        let uri: http::Uri = url.trim().parse().ok()?;
        let authority = uri.authority()?;
        let host = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']');
        let addr = SocketAddr::new(host.parse().ok()?, authority.port_u16()?);
        self.local.get(&addr)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn publisher() -> (LocalPublisher, LocalChannel) {
        let publisher = LocalPublisher::new();
        let channel = publisher.channel();
        (publisher, channel)
    }

    fn echo() -> LocalService {
        LocalService::new(tower::service_fn(
            |request: http::Request<Body>| async move {
                let path = request.uri().path().to_string();
                Ok(http::Response::builder()
                    .header("path", path)
                    .body(Body::empty())
                    .unwrap())
            },
        ))
    }

    fn request() -> http::Request<Body> {
        http::Request::builder()
            .uri("http://x/pkg.Svc/Method")
            .body(Body::empty())
            .unwrap()
    }

    #[tokio::test]
    async fn a_call_before_the_server_serves_waits_for_it() {
        let (publisher, channel) = publisher();
        let call = tokio::spawn(channel.oneshot(request()));
        tokio::task::yield_now().await;
        assert!(!call.is_finished());
        publisher.serve(echo());
        let response = call.await.unwrap().unwrap();
        assert_eq!(response.headers()["path"], "/pkg.Svc/Method");
    }

    #[tokio::test]
    async fn a_stopped_server_refuses_new_calls_as_not_serving() {
        let (publisher, channel) = publisher();
        publisher.serve(echo());
        assert!(channel.clone().oneshot(request()).await.is_ok());
        publisher.stop();
        let error = channel.oneshot(request()).await.unwrap_err();
        assert!(
            std::error::Error::source(&error).is_some_and(|e| e.is::<NotServing>()),
            "{error}"
        );
    }

    #[tokio::test]
    async fn a_server_dropped_without_serving_refuses_calls() {
        let (publisher, channel) = publisher();
        drop(publisher);
        let error = channel.oneshot(request()).await.unwrap_err();
        assert!(
            std::error::Error::source(&error).is_some_and(|e| e.is::<NotServing>()),
            "{error}"
        );
    }

    #[tokio::test]
    async fn the_dialer_keeps_calls_to_hosted_addresses_in_process() {
        let (_publisher, channel) = publisher();
        let dialer = Dialer::default()
            .with_local("127.0.0.1:50055".parse().unwrap(), channel.clone())
            .with_local("[::1]:50056".parse().unwrap(), channel);
        assert!(dialer.dial("http://127.0.0.1:50055").unwrap().is_local());
        assert!(dialer.dial(" http://127.0.0.1:50055 ").unwrap().is_local());
        assert!(dialer.dial("http://[::1]:50056").unwrap().is_local());
        // Another port, a name (never resolved here), no port: a socket.
        assert!(!dialer.dial("http://127.0.0.1:50054").unwrap().is_local());
        assert!(!dialer.dial("http://localhost:50055").unwrap().is_local());
        assert!(!dialer.dial("http://127.0.0.1").unwrap().is_local());
        assert!(
            !Dialer::default()
                .dial("http://127.0.0.1:50055")
                .unwrap()
                .is_local()
        );
        assert!(dialer.dial("not a url").is_err());
    }

    #[tokio::test]
    async fn a_balanced_list_calls_its_hosted_endpoints_in_process() {
        let (publisher, channel) = publisher();
        publisher.serve(echo());
        let dialer = Dialer::default().with_local("127.0.0.1:1".parse().unwrap(), channel);
        let config = BalanceConfig::default();
        let single = dialer
            .dial_balanced("http://127.0.0.1:1", &config, "t")
            .unwrap();
        assert!(
            single.is_local(),
            "one hosted address: the local channel itself"
        );
        // Nothing listens on ports 1 and 9 of loopback: only the in-process server can answer.
        let list = dialer
            .dial_balanced("http://127.0.0.1:1,http://127.0.0.1:9", &config, "t")
            .unwrap();
        assert_eq!(list.balancer().unwrap().endpoints().len(), 2);
        let mut answered = 0;
        for _ in 0..20 {
            if let Ok(response) = list.clone().oneshot(request()).await {
                assert_eq!(response.headers()["path"], "/pkg.Svc/Method");
                answered += 1;
            }
        }
        assert!(answered > 0);
        let error = dialer
            .dial_balanced("http://127.0.0.1:1,ftp://x", &config, "t")
            .unwrap_err();
        assert_eq!(error.url, "ftp://x");
    }
}
