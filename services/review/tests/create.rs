//! CreateItem and ListItems: idempotency, validation, urgency order, paging; and the in-memory
//! store behind the same API.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashSet;

use common::{Harness, new_item, req};
use tonic::Code;
use weir_proto::review::{
    GetQueueStatsRequest, ItemState, ListAuditEventsRequest, ListItemsRequest, ReviewMode, Verdict,
};

#[tokio::test]
async fn create_is_idempotent_by_request_id() {
    let h = Harness::start_with(2, |_| {}).await;
    let mut body = new_item("q", 1);
    body.request_id = "req-42".to_string();
    let mut calls = Vec::new();
    for i in 0..8 {
        let mut client = h.servers[i % 2].client.clone();
        let body = body.clone();
        calls.push(tokio::spawn(async move {
            client
                .create_item(req("acme", body))
                .await
                .unwrap()
                .into_inner()
                .item
                .unwrap()
        }));
    }
    let mut ids = HashSet::new();
    for call in calls {
        ids.insert(call.await.unwrap().id);
    }
    assert_eq!(ids.len(), 1, "same request_id, same item");
    let events = h
        .client()
        .list_audit_events(req("acme", ListAuditEventsRequest::default()))
        .await
        .unwrap()
        .into_inner()
        .events;
    assert_eq!(events.len(), 1, "one creation");
    let item = h.create("acme", body).await.unwrap();
    assert_eq!(item.mode, ReviewMode::Blocking as i32);
    assert_eq!(item.state, ItemState::Pending as i32);
    assert_eq!(item.queue, "q");
}

#[tokio::test]
async fn bad_input_is_invalid_argument() {
    let h = Harness::start().await;
    let mut no_output = new_item("q", 0);
    no_output.output = None;
    let mut bad_queue = new_item("a b", 0);
    bad_queue.request_id = "x".into();
    let mut bad_sla = new_item("q", 0);
    bad_sla.sla = Some(prost_types::Duration {
        seconds: -1,
        nanos: 0,
    });
    for body in [no_output, bad_queue, bad_sla] {
        let status = h.create("acme", body).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    }
    let status = h.claim("acme", "q", "", None).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    let too_long = h
        .claim(
            "acme",
            "q",
            "alice",
            Some(std::time::Duration::from_secs(7200)),
        )
        .await
        .unwrap_err();
    assert_eq!(too_long.code(), Code::InvalidArgument);
}

#[tokio::test]
async fn list_items_is_most_urgent_first_and_paged() {
    let h = Harness::start().await;
    let mut expected = Vec::new();
    for priority in [0, 3, 1, 3, 2, 0, 1] {
        let item = h.item("acme", "q", priority).await;
        expected.push((-priority, item.id));
    }
    // Same priority: same SLA length, so earlier deadline = earlier creation.
    expected.sort_by_key(|(p, _)| *p);
    let expected: Vec<String> = expected.into_iter().map(|(_, id)| id).collect();
    let mut got = Vec::new();
    let mut token = String::new();
    loop {
        let page = h
            .client()
            .list_items(req(
                "acme",
                ListItemsRequest {
                    queue: "q".into(),
                    page_size: 3,
                    page_token: token,
                    ..Default::default()
                },
            ))
            .await
            .unwrap()
            .into_inner();
        assert!(page.items.len() <= 3);
        got.extend(page.items.into_iter().map(|i| i.id));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(got, expected);
    // A state filter.
    h.claim("acme", "q", "alice", None).await.unwrap().unwrap();
    let claimed = h
        .client()
        .list_items(req(
            "acme",
            ListItemsRequest {
                queue: "q".into(),
                state: ItemState::Claimed as i32,
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .items;
    assert_eq!(
        claimed.iter().map(|i| i.id.clone()).collect::<Vec<_>>(),
        [expected[0].clone()]
    );
}

#[tokio::test]
async fn the_memory_store_serves_the_same_api() {
    let h = Harness::start_with(1, |c| c.redis_url = None).await;
    h.item("acme", "q", 0).await;
    let urgent = h.item("acme", "q", 9).await;
    let claimed = h.claim("acme", "q", "alice", None).await.unwrap().unwrap();
    assert_eq!(claimed.id, urgent.id);
    h.decide("acme", &claimed, Verdict::Approve).await.unwrap();
    assert!(h.decide("acme", &claimed, Verdict::Approve).await.is_err());
    let stats = h
        .client()
        .get_queue_stats(req("acme", GetQueueStatsRequest { queue: "q".into() }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (stats.pending, stats.decided_last_hour, stats.decided_total),
        (1, 1, 1)
    );
    assert!((stats.approval_rate - 1.0).abs() < f64::EPSILON);
    assert_eq!(stats.reviewers[0].reviewer, "alice");
}
