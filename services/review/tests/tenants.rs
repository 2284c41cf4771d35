//! Tenant isolation: every RPC acts for the authenticated tenant only; another tenant's item is
//! NOT_FOUND everywhere, and its queues look empty.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::{Harness, NO_ROLE_KEY, reason, req, with_key};
use tonic::{Code, Status};
use weir_proto::review::{
    CancelItemRequest, ClaimNextRequest, GetItemRequest, GetQueueStatsRequest,
    ListAuditEventsRequest, ListItemsRequest, RenewLeaseRequest, SubmitDecisionRequest, Verdict,
    WatchItemRequest, WatchQueueRequest,
};

#[tokio::test]
async fn another_tenants_item_is_not_found_on_every_rpc() {
    let h = Harness::start().await;
    h.item("acme", "shared", 0).await;
    let item = h
        .claim("acme", "shared", "alice", None)
        .await
        .unwrap()
        .unwrap();
    let id = item.id.clone();
    let lease = item.lease.as_ref().unwrap().lease_id.clone();
    let client = h.client();
    type Call = Box<dyn Fn() -> futures::future::BoxFuture<'static, Result<(), Status>>>;
    let calls: Vec<(&str, Call)> = vec![
        ("GetItem", {
            let (c, id) = (client.clone(), id.clone());
            Box::new(move || {
                let (mut c, id) = (c.clone(), id.clone());
                Box::pin(async move {
                    c.get_item(req("globex", GetItemRequest { item_id: id }))
                        .await
                        .map(|_| ())
                })
            })
        }),
        ("ClaimNext(item_id)", {
            let (c, id) = (client.clone(), id.clone());
            Box::new(move || {
                let (mut c, id) = (c.clone(), id.clone());
                Box::pin(async move {
                    let body = ClaimNextRequest {
                        queue: "shared".into(),
                        reviewer: "eve".into(),
                        item_id: id,
                        ..Default::default()
                    };
                    c.claim_next(req("globex", body)).await.map(|_| ())
                })
            })
        }),
        ("RenewLease", {
            let (c, id, lease) = (client.clone(), id.clone(), lease.clone());
            Box::new(move || {
                let (mut c, id, lease) = (c.clone(), id.clone(), lease.clone());
                Box::pin(async move {
                    let body = RenewLeaseRequest {
                        item_id: id,
                        lease_id: lease,
                        lease_duration: None,
                    };
                    c.renew_lease(req("globex", body)).await.map(|_| ())
                })
            })
        }),
        ("SubmitDecision", {
            let (c, id, lease) = (client.clone(), id.clone(), lease.clone());
            Box::new(move || {
                let (mut c, id, lease) = (c.clone(), id.clone(), lease.clone());
                Box::pin(async move {
                    let body = SubmitDecisionRequest {
                        item_id: id,
                        lease_id: lease,
                        verdict: Verdict::Approve as i32,
                        ..Default::default()
                    };
                    c.submit_decision(req("globex", body)).await.map(|_| ())
                })
            })
        }),
        ("CancelItem", {
            let (c, id) = (client.clone(), id.clone());
            Box::new(move || {
                let (mut c, id) = (c.clone(), id.clone());
                Box::pin(async move {
                    c.cancel_item(req(
                        "globex",
                        CancelItemRequest {
                            item_id: id,
                            reason: String::new(),
                        },
                    ))
                    .await
                    .map(|_| ())
                })
            })
        }),
        ("WatchItem", {
            let (c, id) = (client.clone(), id.clone());
            Box::new(move || {
                let (mut c, id) = (c.clone(), id.clone());
                Box::pin(async move {
                    c.watch_item(req("globex", WatchItemRequest { item_id: id }))
                        .await
                        .map(|_| ())
                })
            })
        }),
        ("ListAuditEvents(item_id)", {
            let (c, id) = (client.clone(), id.clone());
            Box::new(move || {
                let (mut c, id) = (c.clone(), id.clone());
                Box::pin(async move {
                    let body = ListAuditEventsRequest {
                        item_id: id,
                        ..Default::default()
                    };
                    c.list_audit_events(req("globex", body)).await.map(|_| ())
                })
            })
        }),
    ];
    for (name, call) in &calls {
        let status = call().await.expect_err(name);
        assert_eq!(
            (status.code(), reason(&status).as_str()),
            (Code::NotFound, "ITEM_NOT_FOUND"),
            "{name}"
        );
    }

    // Queues, stats and the tenant's audit trail show nothing of acme's.
    let mut c = h.client();
    let list = c
        .list_items(req(
            "globex",
            ListItemsRequest {
                queue: "shared".into(),
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(list.items.is_empty());
    let stats = c
        .get_queue_stats(req(
            "globex",
            GetQueueStatsRequest {
                queue: "shared".into(),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((stats.pending, stats.claimed), (0, 0));
    let audit = c
        .list_audit_events(req("globex", ListAuditEventsRequest::default()))
        .await
        .unwrap()
        .into_inner();
    assert!(audit.events.is_empty());
    h.item("acme", "other", 0).await;
    assert!(
        h.claim("globex", "other", "eve", None)
            .await
            .unwrap()
            .is_none()
    );

    // acme's item is untouched and still acme's to decide.
    let decided = h.decide("acme", &item, Verdict::Approve).await.unwrap();
    assert_eq!(decided.decision.unwrap().reviewer, "alice");
}

#[tokio::test]
async fn another_tenants_changes_never_reach_a_queue_watcher() {
    let h = Harness::start().await;
    let mut stream = h
        .client()
        .watch_queue(req("globex", WatchQueueRequest { queue: "q".into() }))
        .await
        .unwrap()
        .into_inner();
    h.item("acme", "q", 0).await;
    let mine = h.item("globex", "q", 0).await;
    let first = tokio::time::timeout(Duration::from_secs(5), stream.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(first.item.unwrap().id, mine.id);
}

#[tokio::test]
async fn decisions_and_the_live_queue_need_the_reviewer_role() {
    let h = Harness::start().await;
    let mut c = h.client();
    let claim = ClaimNextRequest {
        queue: "q".into(),
        reviewer: "x".into(),
        ..Default::default()
    };
    let status = c
        .claim_next(with_key(NO_ROLE_KEY, claim))
        .await
        .unwrap_err();
    assert_eq!(
        (status.code(), reason(&status).as_str()),
        (Code::PermissionDenied, "ROLE_REQUIRED")
    );
    let status = c
        .watch_queue(with_key(NO_ROLE_KEY, WatchQueueRequest::default()))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    // Creating and reading need no role.
    let item = c
        .create_item(with_key(NO_ROLE_KEY, common::new_item("q", 0)))
        .await
        .unwrap()
        .into_inner()
        .item
        .unwrap();
    c.get_item(with_key(NO_ROLE_KEY, GetItemRequest { item_id: item.id }))
        .await
        .unwrap();
}
