//! Canaries that roll themselves back, across real sockets: a canary that fails (or is too slow)
//! is rolled back within its window while the route keeps answering from the primary, stays
//! off until an operator resumes it through `RouteAdminService`, and callers' own deadlines or
//! cancellations never count against it. A healthy canary may be promoted in steps, and an
//! operator may pause one. The service needs
//! `admin`, and health and reflection list it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    cell::{Cell, RefCell},
    collections::BTreeSet,
    time::Duration,
};

use tokio_stream::StreamExt;
use tonic::{Code, transport::Channel};
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};
use tonic_reflection::pb::v1::{
    ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
    server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
};
use weir::stack::Service;
use weir_proto::{
    router::{
        CanaryCheckResult, CanaryInfo, CanaryState, CompleteResponse, ListRoutesRequest,
        PauseCanaryRequest, ResumeCanaryRequest, ServedBy,
        route_admin_service_client::RouteAdminServiceClient,
    },
    service_names,
};
use weir_tests::{Mesh, complete, eventually, model_calls, reason, with_key};

const ADMIN_KEY: &str = "canary-admin-key-0123456789abcdef";
const USER_KEY: &str = "canary-user-key-0123456789abcdef0";

/// Generous bound for states that take a few intervals of a few hundred milliseconds.
const WAIT: Duration = Duration::from_secs(30);

fn config() -> String {
    format!(
        r#"
[mesh]
secret = "canary-mesh-secret-0123456789abcdef0123"

[[auth.api_keys]]
id = "ops"
tenant = "acme"
key = "{ADMIN_KEY}"
roles = ["admin"]

[[auth.api_keys]]
id = "app"
tenant = "acme"
key = "{USER_KEY}"

[router.rate_limit]
enabled = false

[models.stable-a]
sim = {{ output_tokens = 4 }}
[models.broken-canary]
sim = {{ output_tokens = 4, error_rate = 1.0, error_code = "INTERNAL" }}
[models.stable-b]
sim = {{ output_tokens = 4 }}
[models.healthy-canary]
sim = {{ output_tokens = 4 }}
[models.stable-c]
sim = {{ output_tokens = 4 }}
[models.slow-canary]
sim = {{ output_tokens = 4, added_latency = "250ms" }}
[models.stable-d]
sim = {{ output_tokens = 4 }}
[models.tardy-canary]
sim = {{ output_tokens = 4, added_latency = "2s" }}

[router.routes.failing]
models = ["stable-a"]
canary = {{ model = "broken-canary", weight = 0.5, interval = "300ms", min_requests = 5, failed_checks = 2 }}

[router.routes.healthy]
models = ["stable-b"]
canary = {{ model = "healthy-canary", weight = 0.5, interval = "300ms", min_requests = 5, failed_checks = 2, latency_floor = "250ms" }}

[router.routes.slow]
models = ["stable-c"]
canary = {{ model = "slow-canary", weight = 0.5, interval = "600ms", min_requests = 3, failed_checks = 2 }}

[router.routes.impatient]
models = ["stable-d"]
canary = {{ model = "tardy-canary", weight = 1.0, interval = "300ms", min_requests = 3, failed_checks = 1 }}

[models.stable-e]
sim = {{ output_tokens = 4 }}
[models.growing-canary]
sim = {{ output_tokens = 4 }}

[router.routes.growing]
models = ["stable-e"]
canary = {{ model = "growing-canary", weight = 0.2, interval = "300ms", min_requests = 3, latency_floor = "250ms", step_weight = 0.2, max_weight = 0.6 }}

[router.routes.plain]
models = ["stable-a"]
"#
    )
}

fn admin(mesh: &Mesh) -> RouteAdminServiceClient<Channel> {
    RouteAdminServiceClient::new(mesh.channel(Service::Router))
}

/// The canary of `route`, as `ListRoutes` reports it.
async fn canary(mesh: &Mesh, route: &str) -> CanaryInfo {
    let routes = admin(mesh)
        .list_routes(with_key(ListRoutesRequest {}, ADMIN_KEY))
        .await
        .expect("ListRoutes")
        .into_inner()
        .routes;
    routes
        .into_iter()
        .find(|r| r.alias == route)
        .and_then(|r| r.canary)
        .expect("the route and its canary are listed")
}

/// `ResumeCanary` on `route` with `key`: the canary afterwards, or the refusal.
async fn resume(mesh: &Mesh, route: &str, key: &str) -> Result<CanaryInfo, tonic::Status> {
    let request = with_key(
        ResumeCanaryRequest {
            route: route.to_string(),
        },
        key,
    );
    let route = admin(mesh).resume_canary(request).await?.into_inner().route;
    Ok(route.and_then(|r| r.canary).expect("the route's canary"))
}

/// `PauseCanary` on `route` with `key`: the canary afterwards, or the refusal.
async fn pause(mesh: &Mesh, route: &str, key: &str) -> Result<CanaryInfo, tonic::Status> {
    let request = with_key(
        PauseCanaryRequest {
            route: route.to_string(),
        },
        key,
    );
    let route = admin(mesh).pause_canary(request).await?.into_inner().route;
    Ok(route.and_then(|r| r.canary).expect("the route's canary"))
}

/// One `Complete` on `route`, which must be answered.
async fn ask(mesh: &Mesh, route: &str) -> CompleteResponse {
    mesh.router()
        .complete(with_key(complete(route, "hello"), USER_KEY))
        .await
        .unwrap_or_else(|status| panic!("{route} answers: {status:?}"))
        .into_inner()
}

/// Sends `n` requests on `route` at once, each answered.
async fn burst(mesh: &Mesh, route: &str, n: usize) -> Vec<CompleteResponse> {
    futures::future::join_all((0..n).map(|_| ask(mesh, route))).await
}

fn served_by_canary(response: &CompleteResponse, canary: &str) -> bool {
    response.model == canary
        || response
            .notices
            .iter()
            .any(|n| n.reason == "FALLBACK_USED" && n.message.contains(canary))
}

/// The time of the last check, in milliseconds since the epoch (0 before the first).
fn check_ms(canary: &CanaryInfo) -> i64 {
    canary
        .last_check
        .as_ref()
        .and_then(|c| c.time)
        .map_or(0, |t| t.seconds * 1000 + i64::from(t.nanos) / 1_000_000)
}

#[tokio::test]
async fn a_failing_canary_is_rolled_back_while_the_primary_serves_and_stays_off() {
    model_calls("broken-canary", "INTERNAL");
    let running = Mesh::start(&config()).await;
    let mesh = &running;
    assert_eq!(canary(mesh, "failing").await.current_weight, 0.5);

    // Traffic until the canary is rolled back: every request is answered, by the primary.
    let tried_canary = &Cell::new(false);
    let rolled_back = eventually(WAIT, || async move {
        for response in burst(mesh, "failing", 10).await {
            assert_eq!(response.model, "stable-a");
            if served_by_canary(&response, "broken-canary") {
                tried_canary.set(true);
            }
        }
        canary(mesh, "failing").await.state() == CanaryState::RolledBack
    })
    .await;
    assert!(rolled_back, "rolled back within its window");
    assert!(tried_canary.get(), "the canary had its share before");
    let info = canary(mesh, "failing").await;
    assert_eq!(info.current_weight, 0.0);
    assert_eq!(info.configured_weight, 0.5);
    assert!(
        info.rollback_reason.contains("error rate"),
        "{}",
        info.rollback_reason
    );
    assert!(info.rolled_back_time.is_some());
    let rolled_back_at = check_ms(&info);

    // It stays off across further intervals; the inference service sees no canary call, and
    // every answer comes from the primary without a fallback.
    let canary_calls = model_calls("broken-canary", "INTERNAL");
    let intervals = &RefCell::new(BTreeSet::new());
    let stayed_off = eventually(WAIT, || async move {
        for response in burst(mesh, "failing", 10).await {
            assert_eq!(response.model, "stable-a");
            assert_eq!(response.served_by(), ServedBy::Primary);
            assert!(response.notices.is_empty(), "{:?}", response.notices);
        }
        let info = canary(mesh, "failing").await;
        assert_eq!(info.state(), CanaryState::RolledBack);
        assert_eq!(info.current_weight, 0.0);
        let at = check_ms(&info);
        let mut intervals = intervals.borrow_mut();
        if at > rolled_back_at {
            intervals.insert(at);
        }
        intervals.len() >= 3
    })
    .await;
    assert!(stayed_off, "three more checks ran");
    assert_eq!(model_calls("broken-canary", "INTERNAL"), canary_calls);

    // Resumed: back at its configured weight, and tried again.
    let resumed = resume(mesh, "failing", ADMIN_KEY)
        .await
        .expect("ResumeCanary");
    assert_eq!(resumed.state(), CanaryState::Active);
    assert_eq!((resumed.current_weight, resumed.failed_checks), (0.5, 0));
    let responses = burst(mesh, "failing", 10).await;
    assert!(
        responses
            .iter()
            .any(|r| served_by_canary(r, "broken-canary")),
        "the canary gets requests again"
    );
    running.stop().await;
}

#[tokio::test]
async fn a_healthy_canary_is_not_rolled_back() {
    let mesh = Mesh::start(&config()).await;
    let passed = &RefCell::new(BTreeSet::new());
    let (to_canary, to_primary) = (&Cell::new(0), &Cell::new(0));
    let judged = eventually(WAIT, || {
        let mesh = &mesh;
        async move {
            for response in burst(mesh, "healthy", 10).await {
                match response.model.as_str() {
                    "healthy-canary" => to_canary.set(to_canary.get() + 1),
                    "stable-b" => to_primary.set(to_primary.get() + 1),
                    other => panic!("served by {other}"),
                }
            }
            let info = canary(mesh, "healthy").await;
            assert_eq!(info.state(), CanaryState::Active, "{info:?}");
            assert_eq!(info.current_weight, 0.5);
            if let Some(check) = &info.last_check
                && check.result() == CanaryCheckResult::Passed
            {
                passed.borrow_mut().insert(check_ms(&info));
            }
            passed.borrow().len() >= 4
        }
    })
    .await;
    assert!(judged, "four checks passed");
    let (to_canary, to_primary) = (to_canary.get(), to_primary.get());
    assert!(to_canary > 0 && to_primary > 0, "{to_canary} {to_primary}");
    mesh.stop().await;
}

#[tokio::test]
async fn a_healthy_canary_is_promoted_in_steps_up_to_its_maximum() {
    let running = Mesh::start(&config()).await;
    let mesh = &running;
    let weights = &RefCell::new(Vec::new());
    let promoted = eventually(WAIT, || async move {
        for response in burst(mesh, "growing", 10).await {
            assert!(["growing-canary", "stable-e"].contains(&response.model.as_str()));
        }
        let info = canary(mesh, "growing").await;
        assert_eq!(info.state(), CanaryState::Active, "{info:?}");
        assert_eq!(info.configured_weight, 0.2);
        weights.borrow_mut().push(info.current_weight);
        info.current_weight >= 0.6
    })
    .await;
    let weights = weights.take();
    assert!(promoted, "promoted to 0.6: {weights:?}");
    assert!(weights.windows(2).all(|w| w[0] <= w[1]), "{weights:?}");
    assert!(weights.iter().all(|w| *w <= 0.6), "{weights:?}");
    // It stays at its maximum.
    burst(mesh, "growing", 10).await;
    assert_eq!(canary(mesh, "growing").await.current_weight, 0.6);
    running.stop().await;
}

#[tokio::test]
async fn a_canary_slower_than_the_threshold_is_rolled_back() {
    let mesh = Mesh::start(&config()).await;
    let rolled_back = eventually(WAIT, || async {
        for response in burst(&mesh, "slow", 8).await {
            assert!(["slow-canary", "stable-c"].contains(&response.model.as_str()));
        }
        canary(&mesh, "slow").await.state() == CanaryState::RolledBack
    })
    .await;
    assert!(rolled_back, "rolled back within its window");
    let info = canary(&mesh, "slow").await;
    assert!(
        info.rollback_reason.contains("latency"),
        "{}",
        info.rollback_reason
    );
    for response in burst(&mesh, "slow", 8).await {
        assert_eq!(response.model, "stable-c");
    }
    mesh.stop().await;
}

#[tokio::test]
async fn callers_own_deadlines_and_cancellations_do_not_roll_a_canary_back() {
    let running = Mesh::start(&config()).await;
    let checks = &RefCell::new(BTreeSet::new());
    let deadline_exceeded = &Cell::new(0);
    let mesh = &running;
    let judged = eventually(WAIT, || async move {
        // Every request goes to the (slow) canary first; the callers give up long before it
        // answers: half by their deadline, half by going away.
        let short = (0..6).map(|_| {
            let mut request = with_key(complete("impatient", "hello"), USER_KEY);
            request.set_timeout(Duration::from_millis(40));
            let mut router = mesh.router();
            async move { router.complete(request).await }
        });
        for result in futures::future::join_all(short).await {
            match result {
                // The router's DEADLINE_EXCEEDED, or tonic's own CANCELLED when its timer fires
                // first.
                Err(status) => {
                    assert!(
                        [Code::DeadlineExceeded, Code::Cancelled].contains(&status.code()),
                        "{status:?}"
                    );
                    deadline_exceeded.set(deadline_exceeded.get() + 1);
                }
                // The canary's call ends a few milliseconds before the caller's deadline (the
                // margins of the deadline layers), which can leave the instant primary time to
                // answer.
                Ok(response) => assert_eq!(response.into_inner().model, "stable-d"),
            }
        }
        let gone = (0..6).map(|_| {
            let mut router = mesh.router();
            async move {
                let call = router.complete(with_key(complete("impatient", "hello"), USER_KEY));
                // Dropping the call cancels it.
                let _ = tokio::time::timeout(Duration::from_millis(40), call).await;
            }
        });
        futures::future::join_all(gone).await;
        let info = canary(mesh, "impatient").await;
        assert_eq!(info.state(), CanaryState::Active, "{info:?}");
        assert_eq!(info.current_weight, 1.0);
        if let Some(check) = &info.last_check {
            assert_eq!(check.canary_failures, 0, "{check:?}");
            checks.borrow_mut().insert(check_ms(&info));
        }
        checks.borrow().len() >= 4
    })
    .await;
    assert!(judged, "four checks ran");
    assert!(deadline_exceeded.get() > 0);
    running.stop().await;
}

#[tokio::test]
async fn the_admin_service_needs_admin_and_names_what_is_wrong() {
    let mesh = Mesh::start(&config()).await;
    let denied = admin(&mesh)
        .list_routes(with_key(ListRoutesRequest {}, USER_KEY))
        .await
        .unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied);
    assert_eq!(reason(&denied), "ROLE_REQUIRED");
    let denied = resume(&mesh, "failing", USER_KEY).await.unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied);
    let denied = pause(&mesh, "healthy", USER_KEY).await.unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied);
    let anonymous = admin(&mesh)
        .list_routes(ListRoutesRequest {})
        .await
        .unwrap_err();
    assert_eq!(anonymous.code(), Code::Unauthenticated);

    let refused = |route: &'static str| {
        let mesh = &mesh;
        async move { resume(mesh, route, ADMIN_KEY).await.unwrap_err() }
    };
    let unknown = refused("nope").await;
    assert_eq!(unknown.code(), Code::NotFound);
    assert_eq!(reason(&unknown), "ROUTE_NOT_FOUND");
    assert!(
        unknown.message().contains("\"nope\""),
        "{}",
        unknown.message()
    );
    let no_canary = refused("plain").await;
    assert_eq!(no_canary.code(), Code::FailedPrecondition);
    assert_eq!(reason(&no_canary), "NO_CANARY");
    assert_eq!(refused("").await.code(), Code::InvalidArgument);

    // A paused canary gets no request until resumed.
    let paused = pause(&mesh, "healthy", ADMIN_KEY).await.unwrap();
    assert_eq!(paused.state(), CanaryState::Paused);
    assert_eq!(paused.current_weight, 0.0);
    assert!(paused.rolled_back_time.is_some());
    for response in burst(&mesh, "healthy", 10).await {
        assert_eq!(response.model, "stable-b");
        assert!(response.notices.is_empty(), "{:?}", response.notices);
    }
    let resumed = resume(&mesh, "healthy", ADMIN_KEY).await.unwrap();
    assert_eq!(resumed.state(), CanaryState::Active);
    let models: BTreeSet<String> = burst(&mesh, "healthy", 10)
        .await
        .into_iter()
        .map(|r| r.model)
        .collect();
    assert!(models.contains("healthy-canary"), "{models:?}");

    // The listing: every route, its models and canary, and the cache's counters.
    let listed = admin(&mesh)
        .list_routes(with_key(ListRoutesRequest {}, ADMIN_KEY))
        .await
        .unwrap()
        .into_inner();
    let aliases: Vec<&str> = listed.routes.iter().map(|r| r.alias.as_str()).collect();
    assert_eq!(
        aliases,
        [
            "failing",
            "growing",
            "healthy",
            "impatient",
            "plain",
            "slow"
        ]
    );
    assert_eq!(listed.routes[4].models, ["stable-a"]);
    assert!(listed.routes[4].canary.is_none());
    let cache = listed.cache.unwrap();
    assert!(!cache.enabled);

    // Health and reflection know the service.
    let serving = HealthClient::new(mesh.channel(Service::Router))
        .check(HealthCheckRequest {
            service: service_names::ROUTE_ADMIN.to_string(),
        })
        .await
        .unwrap()
        .into_inner()
        .status();
    assert_eq!(serving, ServingStatus::Serving);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let listed = ServerReflectionClient::new(mesh.channel(Service::Router))
        .server_reflection_info(tokio_stream::once(request))
        .await
        .unwrap()
        .into_inner()
        .next()
        .await
        .unwrap()
        .unwrap()
        .message_response;
    let Some(MessageResponse::ListServicesResponse(listed)) = listed else {
        panic!("unexpected reflection answer: {listed:?}");
    };
    assert!(
        listed
            .service
            .iter()
            .any(|s| s.name == service_names::ROUTE_ADMIN),
        "{listed:?}"
    );
    mesh.stop().await;
}
