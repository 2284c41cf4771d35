//! One store-level suite, run against the Redis store and the in-memory store: both keep the
//! same state machine (see `weir_review::store`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use weir_mesh::tenant::Tenant;
use weir_proto::review::{AuditAction, ReviewItem, Verdict};
use weir_review::{
    config::TimeoutAction,
    store::{
        Claim, Decide, LeaseRecord, MemoryStore, NewItem, RedisStore, SlaAction, Store, StoreError,
        state,
    },
};

const NOW: i64 = 1_700_000_000_000;

fn tenant(name: &str) -> Tenant {
    Tenant::new(name).unwrap()
}

fn new_item(id: &str, queue: &str, priority: i32, sla_ms: i64) -> NewItem {
    NewItem {
        request_id: String::new(),
        id: id.to_string(),
        queue: queue.to_string(),
        priority,
        sla_ms,
        body: ReviewItem {
            model: "m".to_string(),
            ..ReviewItem::default()
        },
        actor: "key:test".to_string(),
        now_ms: NOW,
    }
}

fn claim(queue: &str, item: Option<&str>, lease: &str, reviewer: &str, expire_ms: i64) -> Claim {
    Claim {
        queue: queue.to_string(),
        item_id: item.map(str::to_string),
        lease: LeaseRecord {
            lease_id: lease.to_string(),
            reviewer: reviewer.to_string(),
            expire_ms,
        },
        actor: reviewer.to_string(),
        now_ms: NOW,
    }
}

fn decide(id: &str, lease: &str, verdict: Verdict, now_ms: i64) -> Decide {
    Decide {
        item_id: id.to_string(),
        lease_id: lease.to_string(),
        verdict: verdict as i32,
        comment: "ok".to_string(),
        key_label: "key:k".to_string(),
        now_ms,
        ..Decide::default()
    }
}

async fn suite(store: impl Store) {
    let acme = tenant("acme");
    let globex = tenant("globex");
    let far = NOW + 3_600_000;

    // Idempotent create.
    let mut first = new_item("i1", "q", 0, far);
    first.request_id = "req-1".to_string();
    let (a, created) = store.create(&acme, first.clone()).await.unwrap();
    assert!(created);
    first.id = "other".to_string();
    let (again, created) = store.create(&acme, first).await.unwrap();
    assert!(!created);
    assert_eq!(again.id, a.id);
    assert_eq!(a.state, state::PENDING);

    // Urgency: priority, then deadline, then creation.
    store
        .create(&acme, new_item("i2", "q", 5, far + 10))
        .await
        .unwrap();
    store
        .create(&acme, new_item("i3", "q", 0, far - 10))
        .await
        .unwrap();
    let page = store.list(&acme, "q", 0, "", 2).await.unwrap();
    let ids: Vec<&str> = page.items.iter().map(|i| i.id.as_str()).collect();
    assert_eq!(ids, ["i2", "i3"]);
    assert!(!page.next.is_empty());
    let rest = store.list(&acme, "q", 0, &page.next, 10).await.unwrap();
    assert_eq!(
        rest.items.iter().map(|i| i.id.as_str()).collect::<Vec<_>>(),
        ["i1"]
    );
    assert!(rest.next.is_empty());

    // Claims take the most urgent first; a claimed item is not handed out again.
    let c1 = store
        .claim(&acme, claim("q", None, "l1", "alice", NOW + 1000))
        .await
        .unwrap()
        .unwrap();
    assert_eq!((c1.id.as_str(), c1.state), ("i2", state::CLAIMED));
    let c2 = store
        .claim(&acme, claim("q", None, "l2", "bob", NOW + 1000))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(c2.id, "i3");
    assert!(matches!(
        store
            .claim(&acme, claim("q", Some("i2"), "l3", "carol", NOW + 1000))
            .await,
        Err(StoreError::NotPending)
    ));

    // Renew and decide need the current, unlapsed lease.
    assert!(matches!(
        store.renew(&acme, "i2", "wrong", NOW + 2000, "", NOW).await,
        Err(StoreError::LeaseNotHeld)
    ));
    let renewed = store
        .renew(&acme, "i2", "l1", NOW + 2000, "key:k", NOW)
        .await
        .unwrap();
    assert_eq!(renewed.lease.unwrap().expire_ms, NOW + 2000);
    assert!(matches!(
        store
            .decide(&acme, decide("i2", "l1", Verdict::Approve, NOW + 2000))
            .await,
        Err(StoreError::LeaseNotHeld)
    ));
    let decided = store
        .decide(&acme, decide("i2", "l1", Verdict::Approve, NOW + 10))
        .await
        .unwrap();
    assert_eq!(decided.state, state::DECIDED);
    assert_eq!(decided.decision.as_ref().unwrap().reviewer, "alice");
    assert!(matches!(
        store
            .decide(&acme, decide("i2", "l1", Verdict::Reject, NOW + 11))
            .await,
        Err(StoreError::Terminal(state::DECIDED))
    ));
    // A terminal item is not cancelled.
    let (unchanged, changed) = store.cancel(&acme, "i2", "x", "k", NOW).await.unwrap();
    assert!(!changed);
    assert_eq!(unchanged.state, state::DECIDED);

    // A lapsed lease returns the item to PENDING, once.
    assert!(
        store
            .expire_lease(&acme, "i3", NOW + 999)
            .await
            .unwrap()
            .is_none()
    );
    let (leases, _) = store.due_items(&acme, NOW + 1000, 10).await.unwrap();
    assert_eq!(leases, ["i3"]);
    assert!(
        store
            .due_tenants(NOW + 1000, 10)
            .await
            .unwrap()
            .contains(&acme)
    );
    let back = store
        .expire_lease(&acme, "i3", NOW + 1000)
        .await
        .unwrap()
        .unwrap();
    assert_eq!((back.state, back.lease.is_none()), (state::PENDING, true));
    assert!(
        store
            .expire_lease(&acme, "i3", NOW + 1000)
            .await
            .unwrap()
            .is_none()
    );
    assert!(matches!(
        store
            .decide(&acme, decide("i3", "l2", Verdict::Approve, NOW + 1000))
            .await,
        Err(StoreError::LeaseNotHeld)
    ));

    // Stats.
    let stats = store.stats(&acme, "q", NOW + 20).await.unwrap();
    assert_eq!((stats.pending, stats.claimed), (2, 0));
    assert_eq!(
        (
            stats.decided_last_hour,
            stats.decided_total,
            stats.approved_total
        ),
        (1, 1, 1)
    );
    assert_eq!(stats.reviewers.get("alice"), Some(&(1, 1)));
    assert_eq!(stats.oldest_pending_ms, Some(NOW));

    // SLA actions apply once, and only past the deadline in the expected queue.
    store
        .create(&acme, new_item("s1", "q2", 0, NOW + 50))
        .await
        .unwrap();
    store
        .create(&acme, new_item("s2", "q2", 0, NOW + 50))
        .await
        .unwrap();
    store
        .create(&acme, new_item("s3", "q2", 0, NOW + 50))
        .await
        .unwrap();
    let sla = |action, now_ms| SlaAction {
        action,
        expected_queue: "q2".to_string(),
        escalate_to: "senior".to_string(),
        new_sla_ms: now_ms + 1000,
        now_ms,
    };
    assert!(
        store
            .apply_sla(&acme, "s1", sla(TimeoutAction::Reject, NOW + 49))
            .await
            .unwrap()
            .is_none()
    );
    assert_eq!(
        store
            .stats(&acme, "q2", NOW + 50)
            .await
            .unwrap()
            .sla_breached,
        3
    );
    let expired = store
        .apply_sla(&acme, "s1", sla(TimeoutAction::Reject, NOW + 50))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(expired.state, state::EXPIRED);
    assert!(
        store
            .apply_sla(&acme, "s1", sla(TimeoutAction::Reject, NOW + 60))
            .await
            .unwrap()
            .is_none()
    );
    let approved = store
        .apply_sla(&acme, "s2", sla(TimeoutAction::Approve, NOW + 50))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(approved.state, state::DECIDED);
    assert_eq!(approved.decision.unwrap().reviewer, "system:sla");
    let escalated = store
        .apply_sla(&acme, "s3", sla(TimeoutAction::Escalate, NOW + 50))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (escalated.state, escalated.queue.as_str(), escalated.sla_ms),
        (state::PENDING, "senior", NOW + 1050)
    );
    assert!(
        store
            .apply_sla(&acme, "s3", sla(TimeoutAction::Escalate, NOW + 60))
            .await
            .unwrap()
            .is_none()
    );
    let senior = store
        .claim(&acme, claim("senior", None, "l9", "boss", NOW + 2000))
        .await
        .unwrap();
    assert_eq!(senior.map(|i| i.id), Some("s3".to_string()));

    // Cancel.
    let (cancelled, changed) = store
        .cancel(&acme, "i1", "dup", "key:k", NOW)
        .await
        .unwrap();
    assert!(changed);
    assert_eq!(cancelled.state, state::CANCELLED);

    // One audit event per transition, oldest first, paged.
    let (events, next) = store.audit(&acme, Some("i2"), 0, 10).await.unwrap();
    let actions: Vec<i32> = events.iter().map(|e| e.action).collect();
    assert_eq!(
        actions,
        [
            AuditAction::Created as i32,
            AuditAction::Claimed as i32,
            AuditAction::LeaseRenewed as i32,
            AuditAction::Decided as i32
        ]
    );
    assert!(next.is_none());
    assert_eq!(events[3].actor, "alice (key:k)");
    assert_eq!(events[2].actor, "alice (key:k)");
    let (i3_events, _) = store.audit(&acme, Some("i3"), 0, 10).await.unwrap();
    assert_eq!(
        i3_events.last().map(|e| (e.action, e.actor.as_str())),
        Some((AuditAction::LeaseExpired as i32, "system"))
    );
    let (page1, next) = store.audit(&acme, None, 0, 3).await.unwrap();
    assert_eq!(page1.len(), 3);
    let (page2, _) = store.audit(&acme, None, next.unwrap(), 3).await.unwrap();
    assert!(page2[0].id > page1[2].id);

    // Another tenant sees nothing of acme's.
    assert!(matches!(
        store.get(&globex, "i1").await,
        Err(StoreError::NotFound)
    ));
    assert!(matches!(
        store.audit(&globex, Some("i1"), 0, 10).await,
        Err(StoreError::NotFound)
    ));
    assert!(matches!(
        store.cancel(&globex, "i3", "", "", NOW).await,
        Err(StoreError::NotFound)
    ));
    assert!(
        store
            .list(&globex, "q", 0, "", 10)
            .await
            .unwrap()
            .items
            .is_empty()
    );
    assert!(
        store
            .claim(&globex, claim("q", None, "g", "eve", NOW + 10))
            .await
            .unwrap()
            .is_none()
    );
    assert_eq!(store.stats(&globex, "q", NOW).await.unwrap().pending, 0);
}

#[tokio::test]
async fn memory_store_keeps_the_state_machine() {
    suite(MemoryStore::new()).await;
}

#[tokio::test]
async fn redis_store_keeps_the_state_machine() {
    let prefix = common::unique_prefix();
    let _cleanup = common::Cleanup(prefix.clone());
    let store = RedisStore::connect(&common::redis_url(), &prefix)
        .await
        .unwrap();
    suite(store).await;
}
