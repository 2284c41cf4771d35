//! Decisions: exactly one of concurrent decisions wins, a stale lease is refused, an edit needs
//! its text, and every transition leaves exactly one audit event.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::{Harness, reason, req};
use tonic::Code;
use weir_proto::review::{
    AuditAction, ItemState, ListAuditEventsRequest, RenewLeaseRequest, SubmitDecisionRequest,
    Verdict,
};

#[tokio::test]
async fn of_concurrent_decisions_exactly_one_wins() {
    let h = Harness::start_with(2, |_| {}).await;
    for round in 0..5 {
        let queue = format!("q{round}");
        h.item("acme", &queue, 0).await;
        let item = h
            .claim("acme", &queue, "alice", None)
            .await
            .unwrap()
            .unwrap();
        let mut calls = Vec::new();
        for i in 0..16 {
            let mut client = h.servers[i % 2].client.clone();
            let body = SubmitDecisionRequest {
                item_id: item.id.clone(),
                lease_id: item.lease.as_ref().unwrap().lease_id.clone(),
                verdict: if i % 2 == 0 {
                    Verdict::Approve
                } else {
                    Verdict::Reject
                } as i32,
                ..SubmitDecisionRequest::default()
            };
            calls.push(tokio::spawn(async move {
                client.submit_decision(req("acme", body)).await
            }));
        }
        let mut wins = 0;
        for call in calls {
            match call.await.unwrap() {
                Ok(_) => wins += 1,
                Err(status) => {
                    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
                    assert_eq!(reason(&status), "ALREADY_DECIDED");
                }
            }
        }
        assert_eq!(wins, 1, "exactly one decision wins");
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
        let decided = events
            .iter()
            .filter(|e| e.action == AuditAction::Decided as i32)
            .count();
        assert_eq!(decided, 1);
    }
}

#[tokio::test]
async fn a_stale_or_foreign_lease_is_refused() {
    let h = Harness::start_with(1, |c| c.max_lease = Duration::from_secs(3600)).await;
    h.item("acme", "q", 0).await;
    let item = h
        .claim("acme", "q", "alice", Some(Duration::from_millis(300)))
        .await
        .unwrap()
        .unwrap();
    // A made-up lease id.
    let mut foreign = item.clone();
    foreign.lease.as_mut().unwrap().lease_id = "ls_not_mine".to_string();
    let status = h
        .decide("acme", &foreign, Verdict::Approve)
        .await
        .unwrap_err();
    assert_eq!(
        (status.code(), reason(&status).as_str()),
        (Code::FailedPrecondition, "LEASE_NOT_HELD")
    );
    // The lease lapses, someone else claims: the first lease is stale.
    let second = h.claim_eventually("acme", "q", "bob").await;
    assert_eq!(second.id, item.id);
    let status = h.decide("acme", &item, Verdict::Approve).await.unwrap_err();
    assert_eq!(reason(&status), "LEASE_NOT_HELD");
    let renew = h
        .client()
        .renew_lease(req(
            "acme",
            RenewLeaseRequest {
                item_id: item.id.clone(),
                lease_id: item.lease.as_ref().unwrap().lease_id.clone(),
                lease_duration: None,
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(
        (renew.code(), reason(&renew).as_str()),
        (Code::FailedPrecondition, "LEASE_NOT_HELD")
    );
    // Bob's lease works, and an edit needs its text.
    let mut edit = SubmitDecisionRequest {
        item_id: second.id.clone(),
        lease_id: second.lease.as_ref().unwrap().lease_id.clone(),
        verdict: Verdict::Edit as i32,
        ..SubmitDecisionRequest::default()
    };
    let status = h
        .client()
        .submit_decision(req("acme", edit.clone()))
        .await
        .unwrap_err();
    assert_eq!(
        (status.code(), reason(&status).as_str()),
        (Code::InvalidArgument, "EDIT_WITHOUT_CONTENT")
    );
    edit.edited_content = "a safer answer".to_string();
    let decided = h
        .client()
        .submit_decision(req("acme", edit))
        .await
        .unwrap()
        .into_inner()
        .item
        .unwrap();
    assert_eq!(decided.state, ItemState::Decided as i32);
    let decision = decided.decision.unwrap();
    assert_eq!(
        (
            decision.verdict,
            decision.reviewer.as_str(),
            decision.edited_content.as_str()
        ),
        (Verdict::Edit as i32, "bob", "a safer answer")
    );
}

#[tokio::test]
async fn every_transition_leaves_exactly_one_audit_event() {
    let h = Harness::start().await;
    let item = h.item("acme", "q", 0).await;
    let claimed = h
        .claim("acme", "q", "alice", Some(Duration::from_millis(200)))
        .await
        .unwrap()
        .unwrap();
    let renewed = h
        .client()
        .renew_lease(req(
            "acme",
            RenewLeaseRequest {
                item_id: item.id.clone(),
                lease_id: claimed.lease.as_ref().unwrap().lease_id.clone(),
                lease_duration: Some(prost_types::Duration {
                    seconds: 0,
                    nanos: 300_000_000,
                }),
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .lease
        .unwrap();
    assert_eq!(renewed.reviewer, "alice");
    // Lapses (system), claimed again, decided; further decisions change nothing.
    let again = h.claim_eventually("acme", "q", "bob").await;
    h.decide("acme", &again, Verdict::Reject).await.unwrap();
    assert!(h.decide("acme", &again, Verdict::Approve).await.is_err());
    let page = |token: String| {
        let mut client = h.client();
        let id = item.id.clone();
        async move {
            client
                .list_audit_events(req(
                    "acme",
                    ListAuditEventsRequest {
                        item_id: id,
                        page_size: 2,
                        page_token: token,
                    },
                ))
                .await
                .unwrap()
                .into_inner()
        }
    };
    let mut events = Vec::new();
    let mut token = String::new();
    loop {
        let p = page(token).await;
        events.extend(p.events);
        if p.next_page_token.is_empty() {
            break;
        }
        token = p.next_page_token;
    }
    let actions: Vec<(i32, &str)> = events
        .iter()
        .map(|e| (e.action, e.actor.as_str()))
        .collect();
    assert_eq!(
        actions,
        [
            (AuditAction::Created as i32, "key:acme-rev"),
            (AuditAction::Claimed as i32, "alice (key:acme-rev)"),
            (AuditAction::LeaseRenewed as i32, "alice (key:acme-rev)"),
            (AuditAction::LeaseExpired as i32, "system"),
            (AuditAction::Claimed as i32, "bob (key:acme-rev)"),
            (AuditAction::Decided as i32, "bob (key:acme-rev)"),
        ]
    );
    assert!(events.windows(2).all(|w| w[0].id < w[1].id && {
        let t = |e: &weir_proto::review::AuditEvent| e.time.map(|t| (t.seconds, t.nanos));
        t(&w[0]) <= t(&w[1])
    }));
    let detail: serde_json::Value = serde_json::from_str(&events[5].detail_json).unwrap();
    assert_eq!(detail["verdict"], Verdict::Reject as i32);
}
