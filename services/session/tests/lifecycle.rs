//! A session's life on a real Redis: TTL refresh and expiry, deletion (late writes refused,
//! nothing reappears), deleting a user's sessions, tenant isolation, and service restarts.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::{Harness, SLOW, TINY, req, session_ref, user, wait_for};
use tonic::Code;
use weir_proto::session::{
    AppendTurnsRequest, CreateSessionRequest, DeleteSessionRequest, DeleteUserSessionsRequest,
    GetContextRequest, GetSessionRequest, ListTurnsRequest,
};
use weir_session::store::{Store, StoreError, SummaryCommit};

const A: &str = "tenant-a";
const B: &str = "tenant-b";

fn create(id: &str, user: &str, ttl_secs: i64, model: &str) -> CreateSessionRequest {
    CreateSessionRequest {
        session_id: id.into(),
        user_id: user.into(),
        model: model.into(),
        ttl: (ttl_secs > 0).then_some(prost_types::Duration {
            seconds: ttl_secs,
            nanos: 0,
        }),
        ..Default::default()
    }
}

#[tokio::test]
async fn appends_refresh_the_ttl_of_every_key_and_idle_sessions_expire() {
    let h = Harness::start().await;
    // 3 s TTL, on the tiny model so a summary (and its key) exists too.
    h.create(A, create("ttl", "alice", 3, TINY)).await.unwrap();
    for i in 0..40 {
        let body = AppendTurnsRequest {
            session_id: "ttl".into(),
            messages: vec![user(&format!("message {i} with several words in it"))],
            request_id: format!("r{i}"),
            ..Default::default()
        };
        h.client.clone().append_turns(req(A, body)).await.unwrap();
    }
    h.summarizer_idle().await;
    let keys = h.keys(A, "ttl");
    let data = [
        &keys.meta,
        &keys.turns,
        &keys.summary,
        &keys.reqs,
        &keys.reqord,
    ];
    for key in data {
        assert!(h.exists(key).await, "{key} exists");
    }
    // Let the TTLs run down, then append: every key is back near the full TTL, together.
    wait_for("the TTL to run down", Duration::from_secs(5), || async {
        h.pttl(&keys.meta).await < 2200
    })
    .await;
    h.append(A, "ttl", vec![user("still here")]).await.unwrap();
    for key in data {
        let ttl = h.pttl(key).await;
        assert!((2800..=3000).contains(&ttl), "{key}: {ttl} ms");
    }
    let index = weir_session::store::redis::user_index_key(
        &h.config.key_prefix,
        &session_ref(A, "ttl").tenant,
        "alice",
    );
    assert!(
        h.pttl(&index).await >= 2800,
        "the user index outlives its sessions"
    );

    // Idle: it expires, and then it is NOT_FOUND for reads and writes alike.
    let mut client = h.client.clone();
    wait_for("the session to expire", Duration::from_secs(6), || async {
        let mut client = h.client.clone();
        client
            .get_session(req(
                A,
                GetSessionRequest {
                    session_id: "ttl".into(),
                },
            ))
            .await
            .is_err_and(|s| s.code() == Code::NotFound)
    })
    .await;
    let status = h.append(A, "ttl", vec![user("late")]).await.unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    let status = client
        .get_context(req(
            A,
            GetContextRequest {
                session_id: "ttl".into(),
                ..Default::default()
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    for key in data {
        assert!(!h.exists(key).await, "{key} expired with the session");
    }
}

#[tokio::test]
async fn deleted_sessions_refuse_late_appends_and_summaries_and_nothing_reappears() {
    let h = Harness::start_with(|c| c.summary_model = SLOW.to_string()).await;
    h.create(A, create("gone", "alice", 0, TINY)).await.unwrap();
    h.append(
        A,
        "gone",
        vec![user("first"), user("second"), user("third")],
    )
    .await
    .unwrap();
    // What a summarizer would have read before the delete.
    let session = session_ref(A, "gone");
    let before = h.store.read_after(&session, 0, 10).await.unwrap();

    let mut client = h.client.clone();
    client
        .delete_session(req(
            A,
            DeleteSessionRequest {
                session_id: "gone".into(),
            },
        ))
        .await
        .unwrap();
    let keys = h.keys(A, "gone");
    assert_eq!(
        h.scan_session_keys(A, "gone").await,
        std::slice::from_ref(&keys.tomb)
    );

    // A late append and a late summary commit are refused.
    let status = h.append(A, "gone", vec![user("late")]).await.unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    let late = SummaryCommit {
        incarnation: before.session.incarnation.clone(),
        expected_version: 0,
        covers_through_seq: 2,
        text: "late summary".into(),
        token_count: 5,
        dropped_tokens: 10,
        now_ms: 0,
    };
    assert!(matches!(
        h.store.commit_summary(&session, late).await,
        Err(StoreError::NotFound)
    ));
    assert!(matches!(
        h.store
            .try_lock(&session, "late", Duration::from_secs(5))
            .await,
        Err(StoreError::NotFound)
    ));
    for status in [
        client
            .get_session(req(
                A,
                GetSessionRequest {
                    session_id: "gone".into(),
                },
            ))
            .await
            .unwrap_err(),
        client
            .list_turns(req(
                A,
                ListTurnsRequest {
                    session_id: "gone".into(),
                    ..Default::default()
                },
            ))
            .await
            .unwrap_err(),
        client
            .delete_session(req(
                A,
                DeleteSessionRequest {
                    session_id: "gone".into(),
                },
            ))
            .await
            .unwrap_err(),
    ] {
        assert_eq!(status.code(), Code::NotFound);
    }
    // The id stays reserved while the tombstone lives.
    let status = h
        .create(A, create("gone", "alice", 0, TINY))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::AlreadyExists);
    assert_eq!(
        h.scan_session_keys(A, "gone").await,
        std::slice::from_ref(&keys.tomb),
        "nothing reappeared"
    );

    // A summary in flight while the session is deleted: its commit is refused too.
    h.create(A, create("inflight", "alice", 0, TINY))
        .await
        .unwrap();
    for i in 0..40 {
        h.append(
            A,
            "inflight",
            vec![user(&format!("message {i} with several words in it"))],
        )
        .await
        .unwrap();
    }
    let inference = h.inference.as_ref().unwrap().api.clone();
    wait_for("the summary request", Duration::from_secs(5), || {
        let inference = inference.clone();
        async move { !inference.sim_requests_for(SLOW).is_empty() }
    })
    .await;
    let gone_before = h.api.summary_stats().gone;
    client
        .delete_session(req(
            A,
            DeleteSessionRequest {
                session_id: "inflight".into(),
            },
        ))
        .await
        .unwrap();
    wait_for(
        "the in-flight summary to be refused",
        Duration::from_secs(5),
        || async { h.api.summary_stats().gone > gone_before },
    )
    .await;
    h.summarizer_idle().await;
    assert_eq!(h.api.summary_stats().committed, 0);
    assert_eq!(
        h.scan_session_keys(A, "inflight").await,
        [h.keys(A, "inflight").tomb],
        "no summary, turn or lock key reappeared"
    );
}

#[tokio::test]
async fn deleting_a_users_sessions_deletes_only_theirs() {
    let h = Harness::start().await;
    for (tenant, id, user) in [
        (A, "a1", "alice"),
        (A, "a2", "alice"),
        (A, "b1", "bob"),
        (B, "x1", "alice"),
    ] {
        h.create(tenant, create(id, user, 0, "")).await.unwrap();
        h.append(tenant, id, vec![user_msg()]).await.unwrap();
    }
    let mut client = h.client.clone();
    let deleted = client
        .delete_user_sessions(req(
            A,
            DeleteUserSessionsRequest {
                user_id: "alice".into(),
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .deleted_count;
    assert_eq!(deleted, 2);
    for (tenant, id, live) in [
        (A, "a1", false),
        (A, "a2", false),
        (A, "b1", true),
        (B, "x1", true),
    ] {
        let found = client
            .get_session(req(
                tenant,
                GetSessionRequest {
                    session_id: id.into(),
                },
            ))
            .await
            .is_ok();
        assert_eq!(found, live, "{tenant}/{id}");
    }
    let index = weir_session::store::redis::user_index_key(
        &h.config.key_prefix,
        &session_ref(A, "a1").tenant,
        "alice",
    );
    assert!(!h.exists(&index).await);
    let status = client
        .delete_user_sessions(req(
            A,
            DeleteUserSessionsRequest {
                user_id: String::new(),
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
}

fn user_msg() -> weir_proto::common::Message {
    user("hello")
}

#[tokio::test]
async fn another_tenant_cannot_read_append_to_or_delete_a_session() {
    let h = Harness::start().await;
    h.create(A, create("private", "alice", 0, ""))
        .await
        .unwrap();
    h.append(A, "private", vec![user("secret plans")])
        .await
        .unwrap();
    let mut client = h.client.clone();
    let statuses = [
        client
            .get_session(req(
                B,
                GetSessionRequest {
                    session_id: "private".into(),
                },
            ))
            .await
            .unwrap_err(),
        client
            .get_context(req(
                B,
                GetContextRequest {
                    session_id: "private".into(),
                    ..Default::default()
                },
            ))
            .await
            .unwrap_err(),
        client
            .list_turns(req(
                B,
                ListTurnsRequest {
                    session_id: "private".into(),
                    ..Default::default()
                },
            ))
            .await
            .unwrap_err(),
        h.append(B, "private", vec![user("intrusion")])
            .await
            .unwrap_err(),
        client
            .delete_session(req(
                B,
                DeleteSessionRequest {
                    session_id: "private".into(),
                },
            ))
            .await
            .unwrap_err(),
    ];
    for status in statuses {
        assert_eq!(status.code(), Code::NotFound, "{status:?}");
    }
    // Tenant B may have its own session with the same id; they are separate.
    h.create(B, create("private", "bob", 0, "")).await.unwrap();
    h.append(B, "private", vec![user("b's own")]).await.unwrap();
    let turns = h.all_turns(A, "private").await;
    assert_eq!(turns.len(), 1);
    assert_eq!(turns[0].message.as_ref().unwrap().content, "secret plans");
}

#[tokio::test]
async fn restarting_the_service_loses_nothing() {
    let mut h = Harness::start().await;
    h.create(A, create("durable", "alice", 0, TINY))
        .await
        .unwrap();
    for i in 0..40 {
        let body = AppendTurnsRequest {
            session_id: "durable".into(),
            messages: vec![user(&format!("message {i} with several words in it"))],
            request_id: format!("r{i}"),
            ..Default::default()
        };
        h.client.clone().append_turns(req(A, body)).await.unwrap();
    }
    h.summarizer_idle().await;
    let mut client = h.client.clone();
    let get = GetSessionRequest {
        session_id: "durable".into(),
    };
    let session = client
        .get_session(req(A, get.clone()))
        .await
        .unwrap()
        .into_inner();
    let turns = h.all_turns(A, "durable").await;
    let context = client
        .get_context(req(
            A,
            GetContextRequest {
                session_id: "durable".into(),
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner();

    h.restart().await;

    let mut client = h.client.clone();
    assert_eq!(
        client.get_session(req(A, get)).await.unwrap().into_inner(),
        session
    );
    assert_eq!(h.all_turns(A, "durable").await, turns);
    let after = client
        .get_context(req(
            A,
            GetContextRequest {
                session_id: "durable".into(),
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(after, context);
    // A retry of an append made before the restart is still recognised; new turns continue.
    let retry = AppendTurnsRequest {
        session_id: "durable".into(),
        messages: vec![user("message 39 with several words in it")],
        request_id: "r39".into(),
        ..Default::default()
    };
    let replay = client
        .append_turns(req(A, retry))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((replay.first_seq, replay.last_seq), (40, 40));
    let next = h
        .append(A, "durable", vec![user("after the restart")])
        .await
        .unwrap();
    assert_eq!(next.first_seq, 41);
}
