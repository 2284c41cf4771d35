//! Leases: a claimed item is never handed to a second reviewer while its lease holds, and a
//! lapsed lease returns it to PENDING (audited as `system`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::{collections::HashSet, time::Duration};

use common::{Harness, reason, req};
use tonic::Code;
use weir_proto::review::{
    AuditAction, ClaimNextRequest, GetItemRequest, GetQueueStatsRequest, ItemState,
    ListAuditEventsRequest,
};

#[tokio::test]
async fn many_concurrent_claims_lease_one_item_once() {
    let h = Harness::start_with(2, |_| {}).await;
    let item = h.item("acme", "one", 0).await;
    let mut calls = Vec::new();
    for i in 0..32 {
        let mut client = h.servers[i % 2].client.clone();
        calls.push(tokio::spawn(async move {
            let body = ClaimNextRequest {
                queue: "one".to_string(),
                reviewer: format!("r{i}"),
                ..ClaimNextRequest::default()
            };
            client
                .claim_next(req("acme", body))
                .await
                .unwrap()
                .into_inner()
                .item
        }));
    }
    let mut winners = Vec::new();
    for call in calls {
        if let Some(claimed) = call.await.unwrap() {
            winners.push(claimed);
        }
    }
    assert_eq!(winners.len(), 1, "one item, one lease");
    assert_eq!(winners[0].id, item.id);
    // Claiming that item by id is refused while the lease holds.
    let status = h
        .client()
        .claim_next(req(
            "acme",
            ClaimNextRequest {
                queue: "one".to_string(),
                reviewer: "late".to_string(),
                item_id: item.id.clone(),
                ..ClaimNextRequest::default()
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(
        (status.code(), reason(&status).as_str()),
        (Code::FailedPrecondition, "ITEM_NOT_PENDING")
    );
}

#[tokio::test]
async fn concurrent_reviewers_drain_a_queue_without_sharing_an_item() {
    let h = Harness::start_with(2, |_| {}).await;
    for p in 0..20 {
        h.item("acme", "busy", p % 3).await;
    }
    let mut calls = Vec::new();
    for i in 0..8 {
        let mut client = h.servers[i % 2].client.clone();
        calls.push(tokio::spawn(async move {
            let mut mine = Vec::new();
            loop {
                let body = ClaimNextRequest {
                    queue: "busy".to_string(),
                    reviewer: format!("r{i}"),
                    ..ClaimNextRequest::default()
                };
                match client
                    .claim_next(req("acme", body))
                    .await
                    .unwrap()
                    .into_inner()
                    .item
                {
                    Some(item) => mine.push(item.id),
                    None => return mine,
                }
            }
        }));
    }
    let mut seen = HashSet::new();
    for call in calls {
        for id in call.await.unwrap() {
            assert!(seen.insert(id), "an item was leased twice");
        }
    }
    assert_eq!(seen.len(), 20);
}

#[tokio::test]
async fn a_lapsed_lease_returns_the_item_to_pending() {
    let h = Harness::start().await;
    let item = h.item("acme", "q", 0).await;
    let claimed = h
        .claim("acme", "q", "alice", Some(Duration::from_millis(300)))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(claimed.state, ItemState::Claimed as i32);
    // Not handed out again while the lease holds.
    assert!(h.claim("acme", "q", "bob", None).await.unwrap().is_none());
    let get = || {
        let mut client = h.client();
        let id = item.id.clone();
        async move {
            client
                .get_item(req("acme", GetItemRequest { item_id: id }))
                .await
                .unwrap()
                .into_inner()
                .item
                .unwrap()
        }
    };
    common::wait_for(
        "the item to return to PENDING",
        Duration::from_secs(5),
        || async { get().await.state == ItemState::Pending as i32 },
    )
    .await;
    let back = get().await;
    assert!(back.lease.is_none());
    let stats = h
        .client()
        .get_queue_stats(req(
            "acme",
            GetQueueStatsRequest {
                queue: "q".to_string(),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((stats.pending, stats.claimed), (1, 0));
    let events = h
        .client()
        .list_audit_events(req(
            "acme",
            ListAuditEventsRequest {
                item_id: item.id.clone(),
                ..ListAuditEventsRequest::default()
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .events;
    let expiries: Vec<&str> = events
        .iter()
        .filter(|e| e.action == AuditAction::LeaseExpired as i32)
        .map(|e| e.actor.as_str())
        .collect();
    assert_eq!(expiries, ["system"]);
    // And it can be claimed again.
    let again = h.claim("acme", "q", "bob", None).await.unwrap().unwrap();
    assert_eq!(again.id, item.id);
}
