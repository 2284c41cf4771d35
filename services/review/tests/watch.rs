//! WatchItem and WatchQueue: live changes, across replicas (Redis pub/sub).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::{Harness, req};
use tonic::codec::Streaming;
use weir_proto::review::{
    CancelItemRequest, ItemState, Verdict, WatchItemRequest, WatchItemResponse, WatchQueueRequest,
    WatchQueueResponse,
};

async fn next(stream: &mut Streaming<WatchItemResponse>) -> Option<i32> {
    tokio::time::timeout(Duration::from_secs(5), stream.message())
        .await
        .expect("a change within 5 s")
        .unwrap()
        .map(|r| r.item.unwrap().state)
}

#[tokio::test]
async fn watch_item_sees_pending_claimed_decided_and_ends() {
    // The watcher is on the second replica; every change is made through the first.
    let h = Harness::start_with(2, |_| {}).await;
    let item = h.item("acme", "q", 0).await;
    let mut watcher = h.servers[1].client.clone();
    let mut stream = watcher
        .watch_item(req(
            "acme",
            WatchItemRequest {
                item_id: item.id.clone(),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(next(&mut stream).await, Some(ItemState::Pending as i32));
    let claimed = h.claim("acme", "q", "alice", None).await.unwrap().unwrap();
    assert_eq!(next(&mut stream).await, Some(ItemState::Claimed as i32));
    h.decide("acme", &claimed, Verdict::Approve).await.unwrap();
    assert_eq!(next(&mut stream).await, Some(ItemState::Decided as i32));
    assert_eq!(
        next(&mut stream).await,
        None,
        "the stream ends after a terminal state"
    );
}

#[tokio::test]
async fn watch_item_of_a_terminal_item_sends_it_and_ends() {
    let h = Harness::start().await;
    let item = h.item("acme", "q", 0).await;
    h.client()
        .cancel_item(req(
            "acme",
            CancelItemRequest {
                item_id: item.id.clone(),
                reason: "dup".into(),
            },
        ))
        .await
        .unwrap();
    let mut stream = h
        .client()
        .watch_item(req(
            "acme",
            WatchItemRequest {
                item_id: item.id.clone(),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(next(&mut stream).await, Some(ItemState::Cancelled as i32));
    assert_eq!(next(&mut stream).await, None);
}

#[tokio::test]
async fn watch_queue_streams_every_change_of_the_queue() {
    let h = Harness::start_with(2, |_| {}).await;
    let mut stream = h.servers[1]
        .client
        .clone()
        .watch_queue(req(
            "acme",
            WatchQueueRequest {
                queue: "live".into(),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    let item = h.item("acme", "live", 0).await;
    h.item("acme", "elsewhere", 0).await;
    let mut seen = Vec::new();
    seen.push(expect(&mut stream, ItemState::Pending).await);
    let claimed = h
        .claim("acme", "live", "alice", None)
        .await
        .unwrap()
        .unwrap();
    seen.push(expect(&mut stream, ItemState::Claimed).await);
    h.decide("acme", &claimed, Verdict::Reject).await.unwrap();
    seen.push(expect(&mut stream, ItemState::Decided).await);
    assert!(seen.iter().all(|id| *id == item.id));
}

async fn expect(stream: &mut Streaming<WatchQueueResponse>, state: ItemState) -> String {
    let change = tokio::time::timeout(Duration::from_secs(5), stream.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap()
        .item
        .unwrap();
    assert_eq!(change.state, state as i32);
    change.id
}
