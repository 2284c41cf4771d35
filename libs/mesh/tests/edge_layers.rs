//! The server-side layers (auth → admission → rate limit) in a real tonic server over TCP: they
//! fit `Server::builder().layer(...)`, answer before routing, and let health checks through.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use tokio::net::TcpListener;
use tonic::{
    Code, Request,
    transport::{Channel, Server, server::TcpIncoming},
};
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
use tower::ServiceBuilder;
use weir_mesh::{
    admission::{AdmissionConfig, AdmissionLayer},
    auth::{ApiKeySpec, AuthConfig, AuthLayer, Authenticator},
    criticality::Criticality,
    ratelimit::{RateLimitConfig, RateLimitLayer, TenantLimiter},
};
use weir_proto::router::{GetJobRequest, router_service_client::RouterServiceClient};

const KEY: &str = "edge-test-key-0123456789abcdef";

async fn serve() -> Channel {
    let auth = Authenticator::from_config(
        &AuthConfig {
            api_keys: vec![ApiKeySpec {
                tenant: "acme".into(),
                key: Some(KEY.into()),
                ..ApiKeySpec::default()
            }],
            ..AuthConfig::default()
        },
        "auth",
    )
    .unwrap();
    let limiter = TenantLimiter::from_config(
        &RateLimitConfig {
            requests_per_second: 0.05,
            burst: 3,
            ..RateLimitConfig::default()
        },
        "router.rate_limit",
    )
    .unwrap();
    let stack = ServiceBuilder::new()
        // Decide the tenant (the client never names its own) before taking an admission slot.
        .layer(AuthLayer::new(auth))
        // Refuse what the server cannot take before spending anything on it.
        .layer(AdmissionLayer::new(&AdmissionConfig::default()))
        // Hold each tenant to its rate.
        .layer(RateLimitLayer::new(limiter))
        .into_inner();
    let (_reporter, health) = tonic_health::server::health_reporter();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(
        Server::builder()
            .layer(stack)
            .add_service(health)
            .serve_with_incoming(TcpIncoming::from(listener)),
    );
    Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_timeout(Duration::from_secs(2))
        .connect()
        .await
        .unwrap()
}

fn get_job(key: Option<&str>, criticality: Option<&str>) -> Request<GetJobRequest> {
    let mut request = Request::new(GetJobRequest::default());
    if let Some(key) = key {
        request
            .metadata_mut()
            .insert("authorization", format!("Bearer {key}").parse().unwrap());
    }
    if let Some(c) = criticality {
        request
            .metadata_mut()
            .insert("weir-criticality", c.parse().unwrap());
    }
    request
}

#[tokio::test]
async fn layers_answer_in_order_before_routing() {
    let channel = serve().await;
    let mut health = HealthClient::new(channel.clone());
    let mut router = RouterServiceClient::new(channel);

    // Health needs no key and is never limited.
    for _ in 0..5 {
        let serving = health.check(HealthCheckRequest::default()).await;
        assert!(serving.is_ok(), "{serving:?}");
    }
    // No key, a wrong key: UNAUTHENTICATED.
    let status = router.get_job(get_job(None, None)).await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    let status = router
        .get_job(get_job(Some("wrong"), None))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    // Auth answers first: a bad criticality without a key is UNAUTHENTICATED; with one, admission
    // refuses it (it is not counted against the rate limit).
    let status = router
        .get_job(get_job(None, Some("URGENT")))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    let status = router
        .get_job(get_job(Some(KEY), Some("URGENT")))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    // With the key the call reaches routing (this server hosts no router: UNIMPLEMENTED) until the
    // tenant's burst of 3 is spent.
    let mut codes = Vec::new();
    for _ in 0..5 {
        let request = get_job(Some(KEY), Some(Criticality::Sheddable.as_str()));
        codes.push(router.get_job(request).await.unwrap_err().code());
    }
    assert_eq!(
        codes,
        [
            Code::Unimplemented,
            Code::Unimplemented,
            Code::Unimplemented,
            Code::ResourceExhausted,
            Code::ResourceExhausted
        ]
    );
}
