//! SLAs: the queue's timeout action applies exactly once, even with two review servers sweeping
//! the same Redis prefix.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::{Harness, new_item, reason, req};
use weir_proto::review::{
    AuditAction, GetItemRequest, GetQueueStatsRequest, ItemState, ListAuditEventsRequest,
    ReviewItem, Verdict,
};
use weir_review::config::{QueueConfig, TimeoutAction};

fn short(action: TimeoutAction, escalate_to: Option<&str>) -> QueueConfig {
    QueueConfig {
        sla: Some(Duration::from_millis(300)),
        timeout_action: action,
        escalate_to: escalate_to.map(str::to_string),
    }
}

async fn two_replicas() -> Harness {
    Harness::start_with(2, |c| {
        c.sweep_interval = Duration::from_millis(20);
        c.queues
            .insert("rej".into(), short(TimeoutAction::Reject, None));
        c.queues
            .insert("app".into(), short(TimeoutAction::Approve, None));
        c.queues
            .insert("esc".into(), short(TimeoutAction::Escalate, Some("senior")));
    })
    .await
}

async fn get(h: &Harness, id: &str) -> ReviewItem {
    h.client()
        .get_item(req(
            "acme",
            GetItemRequest {
                item_id: id.to_string(),
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .item
        .unwrap()
}

async fn audit(h: &Harness, id: &str) -> Vec<(i32, String)> {
    h.client()
        .list_audit_events(req(
            "acme",
            ListAuditEventsRequest {
                item_id: id.to_string(),
                ..ListAuditEventsRequest::default()
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .events
        .into_iter()
        .map(|e| (e.action, e.actor))
        .collect()
}

async fn wait_state(h: &Harness, id: &str, state: ItemState, queue: &str) -> ReviewItem {
    common::wait_for("the SLA action", Duration::from_secs(10), || async {
        let item = get(h, id).await;
        item.state == state as i32 && item.queue == queue
    })
    .await;
    get(h, id).await
}

#[tokio::test]
async fn reject_fires_once_with_two_replicas_and_fails_closed() {
    let h = two_replicas().await;
    let mut ids = Vec::new();
    for _ in 0..10 {
        ids.push(h.item("acme", "rej", 0).await.id);
    }
    // One is claimed: the SLA takes it from the reviewer too.
    let claimed = h
        .claim("acme", "rej", "alice", None)
        .await
        .unwrap()
        .unwrap();
    for id in &ids {
        let item = wait_state(&h, id, ItemState::Expired, "rej").await;
        assert!(item.decision.is_none() && item.lease.is_none());
    }
    // Give the sweepers a few more rounds to do it twice, if they could.
    tokio::time::sleep(Duration::from_millis(200)).await;
    for id in &ids {
        let expired: Vec<_> = audit(&h, id)
            .await
            .into_iter()
            .filter(|(a, _)| *a == AuditAction::Expired as i32)
            .collect();
        assert_eq!(
            expired,
            [(AuditAction::Expired as i32, "system:sla".to_string())],
            "item {id}"
        );
    }
    let late = h
        .decide("acme", &claimed, Verdict::Approve)
        .await
        .unwrap_err();
    assert_eq!(reason(&late), "ALREADY_DECIDED");
    let stats = h
        .client()
        .get_queue_stats(req(
            "acme",
            GetQueueStatsRequest {
                queue: "rej".into(),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (stats.pending, stats.claimed, stats.sla_breached),
        (0, 0, 0)
    );
}

#[tokio::test]
async fn approve_fires_once_with_two_replicas() {
    let h = two_replicas().await;
    let item = h.item("acme", "app", 0).await;
    let decided = wait_state(&h, &item.id, ItemState::Decided, "app").await;
    let decision = decided.decision.unwrap();
    assert_eq!(
        (decision.verdict, decision.reviewer.as_str()),
        (Verdict::Approve as i32, "system:sla")
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    let decisions = audit(&h, &item.id)
        .await
        .into_iter()
        .filter(|(a, _)| *a == AuditAction::Decided as i32)
        .count();
    assert_eq!(decisions, 1);
    let stats = h
        .client()
        .get_queue_stats(req(
            "acme",
            GetQueueStatsRequest {
                queue: "app".into(),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(stats.decided_total, 1);
    assert_eq!(
        stats.reviewers.first().map(|r| r.reviewer.as_str()),
        Some("system:sla")
    );
}

#[tokio::test]
async fn escalate_moves_the_item_once_with_a_new_sla() {
    let h = two_replicas().await;
    let mut body = new_item("esc", 0);
    body.request_id = "esc-1".to_string();
    let item = h.create("acme", body).await.unwrap();
    let moved = wait_state(&h, &item.id, ItemState::Pending, "senior").await;
    let old = item.sla_deadline_time.unwrap().seconds;
    // The default SLA (1 h) of the unconfigured `senior` queue.
    assert!(moved.sla_deadline_time.unwrap().seconds >= old + 3000);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let escalations: Vec<_> = audit(&h, &item.id)
        .await
        .into_iter()
        .filter(|(a, _)| *a == AuditAction::Escalated as i32)
        .collect();
    assert_eq!(
        escalations,
        [(AuditAction::Escalated as i32, "system:sla".to_string())]
    );
    let claimed = h
        .claim("acme", "senior", "boss", None)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(claimed.id, item.id);
    assert!(
        h.claim("acme", "esc", "alice", None)
            .await
            .unwrap()
            .is_none()
    );
}
