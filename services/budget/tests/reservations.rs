//! Reserve, Commit, Release and expiry as a caller sees them.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::*;
use tonic::Code;
use weir_proto::budget as pb;

#[tokio::test]
async fn multi_scope_reservation_is_all_or_nothing() {
    let server = start(config()).await;
    let mut c = server.client.clone();
    set_budget(&mut c, "acme", tenant_scope(), 10_000_000, 0.0).await;
    set_budget(&mut c, "acme", user("u1"), 1_000_000, 0.0).await;

    // u1 has room for $0.60 once; the second is refused by the user scope and must hold nothing
    // on the tenant either.
    reserve(&mut c, "acme", "a", vec![user("u1")], 600_000)
        .await
        .unwrap();
    let refused = reserve(
        &mut c,
        "acme",
        "b",
        vec![tenant_scope(), user("u1")],
        600_000,
    )
    .await
    .unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted);
    assert_eq!(refused.quota_violations()[0].0, "user:u1");
    assert_eq!(
        get_budget(&mut c, "acme", tenant_scope()).await.held_micros,
        600_000
    );
    assert_eq!(
        get_budget(&mut c, "acme", user("u1")).await.held_micros,
        600_000
    );

    // A scope without a budget has no limit.
    reserve(&mut c, "acme", "c", vec![user("no-budget")], 5_000_000)
        .await
        .unwrap();
    assert_eq!(
        get_budget(&mut c, "acme", tenant_scope()).await.held_micros,
        5_600_000
    );
    cleanup(&server.prefix).await;
}

#[tokio::test]
async fn retried_reserve_and_commit_charge_once() {
    let server = start(config()).await;
    let mut c = server.client.clone();
    set_budget(&mut c, "acme", tenant_scope(), 1_000_000, 0.0).await;

    let first = reserve(&mut c, "acme", "req-1", vec![tenant_scope()], 400_000)
        .await
        .unwrap();
    let again = reserve(&mut c, "acme", "req-1", vec![tenant_scope()], 400_000)
        .await
        .unwrap();
    assert_eq!(first.id, again.id);
    assert_eq!(
        get_budget(&mut c, "acme", tenant_scope()).await.held_micros,
        400_000
    );

    // The same key with other parameters is refused.
    let reused = reserve(&mut c, "acme", "req-1", vec![tenant_scope()], 1)
        .await
        .unwrap_err();
    assert_eq!(reused.code(), Code::InvalidArgument);

    let committed = commit_cost(&mut c, "acme", &first.id, "commit-1", 300_000)
        .await
        .unwrap();
    let retried = commit_cost(&mut c, "acme", &first.id, "commit-1", 300_000)
        .await
        .unwrap();
    assert_eq!(committed, retried);
    assert_eq!(retried.cost_micros, 300_000);
    let budget = get_budget(&mut c, "acme", tenant_scope()).await;
    assert_eq!((budget.held_micros, budget.spent_micros), (0, 300_000));

    // A different commit of the same reservation does not charge again.
    let other = commit_cost(&mut c, "acme", &first.id, "commit-2", 900_000)
        .await
        .unwrap_err();
    assert_eq!(other.code(), Code::FailedPrecondition);
    assert_eq!(
        get_budget(&mut c, "acme", tenant_scope())
            .await
            .spent_micros,
        300_000
    );
    cleanup(&server.prefix).await;
}

#[tokio::test]
async fn commit_refunds_the_difference_and_records_overruns() {
    let server = start(config()).await;
    let mut c = server.client.clone();
    set_budget(&mut c, "acme", tenant_scope(), 1_000_000, 0.0).await;

    let r = reserve(&mut c, "acme", "small", vec![tenant_scope()], 500_000)
        .await
        .unwrap();
    let settled = commit_cost(&mut c, "acme", &r.id, "", 200_000)
        .await
        .unwrap();
    assert_eq!(
        (
            settled.cost_micros,
            settled.refunded_micros,
            settled.overrun_micros
        ),
        (200_000, 300_000, 0)
    );
    assert_eq!(
        settled.reservation.unwrap().state,
        i32::from(pb::ReservationState::Committed)
    );

    // An overrun is charged in full; later reservations see it.
    let r = reserve(&mut c, "acme", "big", vec![tenant_scope()], 100_000)
        .await
        .unwrap();
    let settled = commit_cost(&mut c, "acme", &r.id, "", 700_000)
        .await
        .unwrap();
    assert_eq!(
        (settled.refunded_micros, settled.overrun_micros),
        (0, 600_000)
    );
    let budget = get_budget(&mut c, "acme", tenant_scope()).await;
    assert_eq!((budget.held_micros, budget.spent_micros), (0, 900_000));
    let refused = reserve(&mut c, "acme", "next", vec![tenant_scope()], 200_000)
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted);
    reserve(&mut c, "acme", "fits", vec![tenant_scope()], 100_000)
        .await
        .unwrap();
    cleanup(&server.prefix).await;
}

#[tokio::test]
async fn release_gives_the_hold_back_and_unknown_reservations_are_not_found() {
    let server = start(config()).await;
    let mut c = server.client.clone();
    set_budget(&mut c, "acme", tenant_scope(), 1_000_000, 0.0).await;
    let r = reserve(&mut c, "acme", "x", vec![tenant_scope()], 1_000_000)
        .await
        .unwrap();
    let released = c
        .release(req(
            "acme",
            pb::ReleaseRequest {
                reservation_id: r.id.clone(),
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .reservation
        .unwrap();
    assert_eq!(released.state, i32::from(pb::ReservationState::Released));
    assert_eq!(
        get_budget(&mut c, "acme", tenant_scope()).await.held_micros,
        0
    );
    // Committing a released reservation is refused and charges nothing.
    let error = commit_cost(&mut c, "acme", &r.id, "", 10)
        .await
        .unwrap_err();
    assert_eq!(error.reason(), "RESERVATION_RELEASED");
    assert_eq!(
        get_budget(&mut c, "acme", tenant_scope())
            .await
            .spent_micros,
        0
    );
    let missing = commit_cost(&mut c, "acme", "nope", "", 10)
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);
    cleanup(&server.prefix).await;
}

#[tokio::test]
async fn expired_hold_is_released_exactly_once() {
    // Two replicas, each with its own sweeper, share one Redis: the hold comes back once.
    let config = config();
    let a = start(config.clone()).await;
    let b = start(config.clone()).await;
    let mut c = a.client.clone();
    set_budget(&mut c, "acme", tenant_scope(), 1_000_000, 0.0).await;
    let mut request = reserve_request("short", vec![tenant_scope()], 700_000, "sim-small");
    request.ttl = Some(prost_types::Duration {
        seconds: 0,
        nanos: 200_000_000,
    });
    let r = c
        .reserve(req("acme", request))
        .await
        .unwrap()
        .into_inner()
        .reservation
        .unwrap();
    reserve(&mut c, "acme", "other", vec![tenant_scope()], 200_000)
        .await
        .unwrap();

    let expired = eventually(Duration::from_secs(5), || {
        let mut c = c.clone();
        async move { get_budget(&mut c, "acme", tenant_scope()).await.held_micros == 200_000 }
    })
    .await;
    assert!(expired, "the expired hold is given back");
    let count = a.api.metrics().snapshot().expired + b.api.metrics().snapshot().expired;
    assert_eq!(count, 1, "one sweeper expired it, once");

    // Release and Commit afterwards see EXPIRED and give nothing back twice.
    let released = c
        .release(req(
            "acme",
            pb::ReleaseRequest {
                reservation_id: r.id.clone(),
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .reservation
        .unwrap();
    assert_eq!(released.state, i32::from(pb::ReservationState::Expired));
    let late = commit_cost(&mut c, "acme", &r.id, "", 100_000)
        .await
        .unwrap();
    assert_eq!(
        late.overrun_micros, 100_000,
        "a late commit is still counted"
    );
    let budget = get_budget(&mut c, "acme", tenant_scope()).await;
    assert_eq!(
        (budget.held_micros, budget.spent_micros),
        (200_000, 100_000)
    );
    cleanup(&config.key_prefix).await;
}

#[tokio::test]
async fn tenants_are_isolated() {
    let server = start(config()).await;
    let mut c = server.client.clone();
    set_budget(&mut c, "acme", tenant_scope(), 100_000, 0.0).await;
    reserve(&mut c, "acme", "same-id", vec![tenant_scope()], 100_000)
        .await
        .unwrap();
    // Another tenant with the same request id and no budget is not affected, and cannot see or
    // settle acme's reservation.
    let globex = reserve(&mut c, "globex", "same-id", vec![tenant_scope()], 100_000)
        .await
        .unwrap();
    let acme = reserve(&mut c, "acme", "same-id", vec![tenant_scope()], 100_000)
        .await
        .unwrap();
    assert_ne!(acme.id, globex.id);
    let error = commit_cost(&mut c, "globex", &acme.id, "", 1)
        .await
        .unwrap_err();
    assert_eq!(error.code(), Code::NotFound);
    let error = c
        .get_budget(req(
            "globex",
            pb::GetBudgetRequest {
                scope: Some(tenant_scope()),
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(error.code(), Code::NotFound);
    assert_eq!(
        get_budget(&mut c, "acme", tenant_scope()).await.held_micros,
        100_000
    );
    cleanup(&server.prefix).await;
}

#[tokio::test]
async fn bad_amounts_are_invalid_arguments() {
    let server = start(config()).await;
    let mut c = server.client.clone();
    for amount in [0, -5, i64::MAX] {
        let error = reserve(&mut c, "acme", "bad", vec![tenant_scope()], amount)
            .await
            .unwrap_err();
        assert_eq!(error.code(), Code::InvalidArgument, "{amount}");
    }
    let error = commit_cost(&mut c, "acme", "x", "", -1).await.unwrap_err();
    assert_eq!(error.code(), Code::InvalidArgument);
    cleanup(&server.prefix).await;
}
