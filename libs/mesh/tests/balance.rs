//! Load balancing and outlier ejection over real gRPC servers on 127.0.0.1 (tonic's health
//! service, each replica counting the calls it served), through the whole client stack.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use tokio::{net::TcpListener, sync::oneshot, task::JoinHandle};
use tonic::{
    Code,
    transport::{Server, server::TcpIncoming},
};
use tonic_health::{
    ServingStatus,
    pb::{HealthCheckRequest, health_client::HealthClient},
    server::HealthReporter,
};
use tower::{Layer, Service};
use weir_mesh::{
    ApiError,
    backend::BackendKey,
    balance::{BalanceConfig, Balancer, Resolve, Target},
    breaker::BreakerState,
    client::{ClientConfig, ClientStack},
    local::{Dialer, Transport},
    transport::UPSTREAM_UNREACHABLE,
};

/// Counts the calls a replica's server receives.
#[derive(Clone)]
struct Count(Arc<AtomicUsize>);

impl<S> Layer<S> for Count {
    type Service = Counted<S>;
    fn layer(&self, inner: S) -> Counted<S> {
        Counted(inner, self.0.clone())
    }
}

#[derive(Clone)]
struct Counted<S>(S, Arc<AtomicUsize>);

impl<S: Service<R>, R> Service<R> for Counted<S> {
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.0.poll_ready(cx)
    }
    fn call(&mut self, request: R) -> S::Future {
        self.1.fetch_add(1, Ordering::Relaxed);
        self.0.call(request)
    }
}

/// A real gRPC server (health service) on 127.0.0.1.
struct Replica {
    addr: SocketAddr,
    served: Arc<AtomicUsize>,
    reporter: HealthReporter,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

impl Replica {
    async fn start() -> Self {
        Self::start_on("127.0.0.1:0".parse().unwrap(), Arc::default()).await
    }

    async fn start_on(addr: SocketAddr, served: Arc<AtomicUsize>) -> Self {
        let listener = TcpListener::bind(addr).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (reporter, health) = tonic_health::server::health_reporter();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn({
            let served = served.clone();
            async move {
                Server::builder()
                    .layer(Count(served))
                    .add_service(health)
                    .serve_with_incoming_shutdown(TcpIncoming::from(listener), async {
                        let _ = stopped.await;
                    })
                    .await
                    .unwrap();
            }
        });
        Self {
            addr,
            served,
            reporter,
            stop: Some(stop),
            task,
        }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn served(&self) -> usize {
        self.served.load(Ordering::Relaxed)
    }

    /// Stops the server; its port refuses connections afterwards.
    async fn stop(mut self) -> (SocketAddr, Arc<AtomicUsize>) {
        let _ = self.stop.take().unwrap().send(());
        self.task.await.unwrap();
        (self.addr, self.served)
    }
}

fn stack(transport: Transport) -> ClientStack {
    ClientStack::new(transport, &ClientConfig::default())
}

async fn check(stack: &ClientStack) -> Result<(), tonic::Status> {
    let mut client = HealthClient::new(stack.service());
    let answer = client.check(HealthCheckRequest::default()).await?;
    assert_eq!(answer.into_inner().status, ServingStatus::Serving as i32);
    Ok(())
}

/// Calls until `done` holds, at most `limit` calls (each must succeed).
async fn call_until(stack: &ClientStack, limit: usize, mut done: impl FnMut() -> bool) -> bool {
    for _ in 0..limit {
        check(stack).await.unwrap();
        if done() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    false
}

fn list(replicas: &[&Replica]) -> String {
    let urls: Vec<String> = replicas.iter().map(|r| r.url()).collect();
    urls.join(",")
}

#[tokio::test]
async fn calls_spread_over_every_endpoint_of_a_list() {
    let replicas = [
        Replica::start().await,
        Replica::start().await,
        Replica::start().await,
    ];
    let urls = list(&replicas.iter().collect::<Vec<_>>());
    let transport = Dialer::default()
        .dial_balanced(&urls, &BalanceConfig::default(), "spread")
        .unwrap();
    assert_eq!(transport.balancer().unwrap().endpoints().len(), 3);
    let stack = stack(transport);
    for _ in 0..60 {
        check(&stack).await.unwrap();
    }
    let served: Vec<usize> = replicas.iter().map(Replica::served).collect();
    assert_eq!(served.iter().sum::<usize>(), 60);
    assert!(served.iter().all(|&n| n > 0), "{served:?}");
}

#[tokio::test]
async fn a_single_ip_url_is_one_plain_channel_and_a_name_is_resolved() {
    let replica = Replica::start().await;
    let dialer = Dialer::default();
    let plain = dialer
        .dial_balanced(&replica.url(), &BalanceConfig::default(), "plain")
        .unwrap();
    assert!(plain.balancer().is_none(), "no balancer for one IP address");
    check(&stack(plain)).await.unwrap();

    let by_name = format!("http://localhost:{}", replica.addr.port());
    let named = dialer
        .dial_balanced(&by_name, &BalanceConfig::default(), "named")
        .unwrap();
    let balancer = named.balancer().unwrap().clone();
    let stack = stack(named);
    check(&stack).await.unwrap();
    assert!(balancer.endpoints().contains(&replica.addr), "{balancer:?}");
    assert_eq!(replica.served(), 2);

    let error = dialer
        .dial_balanced(
            &format!("{by_name},localhost:1"),
            &BalanceConfig::default(),
            "bad",
        )
        .unwrap_err();
    assert_eq!(error.url, "localhost:1", "{error}");
}

#[tokio::test]
async fn a_stopped_endpoint_is_ejected_without_a_failed_call_and_comes_back_after_its_ejection() {
    let live = Replica::start().await;
    let dying = Replica::start().await;
    let config = BalanceConfig {
        base_ejection_time: Duration::from_millis(300),
        ..BalanceConfig::default()
    };
    let transport = Dialer::default()
        .dial_balanced(&list(&[&live, &dying]), &config, "eject")
        .unwrap();
    let balancer = transport.balancer().unwrap().clone();
    let stack = stack(transport);
    assert!(call_until(&stack, 200, || dying.served() > 0 && live.served() > 0).await);

    let (dead_addr, dead_served) = dying.stop().await;
    let served_before = dead_served.load(Ordering::Relaxed);
    // Every call succeeds (the retry layer takes a failed attempt to the other endpoint) until
    // the dead one is ejected.
    assert!(
        call_until(&stack, 200, || balancer.ejected() == [dead_addr]).await,
        "never ejected: {balancer:?}"
    );
    for _ in 0..30 {
        check(&stack).await.unwrap();
    }
    assert_eq!(dead_served.load(Ordering::Relaxed), served_before);
    // The breaker above (one backend here, as one model) saw a handful of failed attempts among
    // many successes: it stays closed.
    let key = BackendKey::new(weir_mesh::breaker::DEFAULT_BACKEND);
    assert_eq!(stack.breakers().state(&key), BreakerState::Closed);

    // Restarted on the same address: once its ejection is over, it serves again.
    let back = Replica::start_on(dead_addr, dead_served.clone()).await;
    assert!(
        call_until(&stack, 1000, || back.served() > served_before).await,
        "the restarted endpoint never got a call again: {balancer:?}"
    );
    assert!(balancer.ejected().is_empty());
}

#[tokio::test]
async fn at_most_half_the_endpoints_are_ejected_and_calls_keep_succeeding() {
    let live = Replica::start().await;
    let mut dead = Vec::new();
    let mut urls = vec![live.url()];
    for _ in 0..3 {
        let replica = Replica::start().await;
        urls.push(replica.url());
        dead.push(replica.stop().await.0);
    }
    let transport = Dialer::default()
        .dial_balanced(&urls.join(","), &BalanceConfig::default(), "cap")
        .unwrap();
    let balancer = transport.balancer().unwrap().clone();
    // Three of four dead is an outage the breaker would (rightly) cut off; this test is about
    // the balancer alone.
    let mut config = ClientConfig::default();
    config.breaker.window = 10_000;
    config.breaker.minimum_calls = 10_000;
    let stack = ClientStack::new(transport, &config);
    // With three of four dead, a call may meet dead endpoints on all of its 3 attempts until
    // two are ejected: that phase may fail calls.
    for _ in 0..300 {
        if balancer.ejected().len() == 2 {
            break;
        }
        let _ = check(&stack).await;
    }
    // Then every call succeeds: the third dead endpoint (not ejected: the cap) fails a first
    // attempt now and then, and the retry goes to the endpoint without a failure streak.
    for _ in 0..50 {
        check(&stack).await.unwrap();
    }
    let ejected = balancer.ejected();
    assert_eq!(ejected.len(), 2, "50 % of 4: {ejected:?}");
    assert!(
        ejected.iter().all(|addr| dead.contains(addr)),
        "{ejected:?}"
    );
}

/// A resolver whose answer the test sets.
fn resolver(answer: &Arc<Mutex<Vec<SocketAddr>>>) -> Resolve {
    let answer = answer.clone();
    Arc::new(move |host: String, _port: u16| {
        assert_eq!(host, "inference.test");
        let addrs = answer.lock().unwrap().clone();
        Box::pin(async move { Ok(addrs) })
    })
}

fn lazy(addr: SocketAddr) -> Result<Transport, tonic::transport::Error> {
    weir_mesh::client::lazy_channel(&format!("http://{addr}")).map(Transport::from)
}

#[tokio::test]
async fn re_resolution_adds_and_removes_endpoints_and_calls_in_flight_finish() {
    let first = Replica::start().await;
    let second = Replica::start().await;
    let answer = Arc::new(Mutex::new(vec![first.addr]));
    let config = BalanceConfig {
        resolve_interval: Duration::from_millis(20),
        ..BalanceConfig::default()
    };
    let targets = Target::parse_list("http://inference.test:50052").unwrap();
    let balancer = Balancer::new("dns", targets, &config, resolver(&answer), lazy);
    balancer.resolved().await;
    assert_eq!(balancer.endpoints(), [first.addr]);
    let stack = stack(balancer.clone().into());
    check(&stack).await.unwrap();
    // A stream in flight on the first endpoint.
    let mut watch = HealthClient::new(stack.service())
        .watch(HealthCheckRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        watch.message().await.unwrap().unwrap().status,
        ServingStatus::Serving as i32
    );

    *answer.lock().unwrap() = vec![first.addr, second.addr];
    assert!(call_until(&stack, 500, || second.served() > 0).await);

    *answer.lock().unwrap() = vec![second.addr];
    assert!(call_until(&stack, 500, || balancer.endpoints() == [second.addr]).await);
    let first_served = first.served();
    for _ in 0..20 {
        check(&stack).await.unwrap();
    }
    assert_eq!(first.served(), first_served, "removed: no new calls");
    // The stream on the removed endpoint is still served.
    first
        .reporter
        .set_service_status("", tonic_health::ServingStatus::NotServing)
        .await;
    assert_eq!(
        watch.message().await.unwrap().unwrap().status,
        ServingStatus::NotServing as i32
    );
}

#[tokio::test]
async fn a_name_with_no_address_fails_as_unreachable() {
    let answer = Arc::new(Mutex::new(Vec::new()));
    let targets = Target::parse_list("http://inference.test:50052").unwrap();
    let balancer = Balancer::new(
        "none",
        targets,
        &BalanceConfig::default(),
        resolver(&answer),
        lazy,
    );
    let status = check(&stack(balancer.into())).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);
    assert_eq!(
        ApiError::from_status(&status).reason(),
        UPSTREAM_UNREACHABLE
    );
}
