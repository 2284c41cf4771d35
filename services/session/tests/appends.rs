//! Appends over real gRPC and Redis: contiguous sequence numbers, idempotent retries, optimistic
//! concurrency, validation, and paging through the history.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashMap;

use common::{Harness, reason_and_field, req, user};
use tonic::Code;
use weir_proto::{
    common::Message,
    session::{
        AppendTurnsRequest, CreateSessionRequest, GetContextRequest, GetSessionRequest,
        ListTurnsRequest,
    },
};

const T: &str = "acme";

#[tokio::test]
async fn retried_appends_add_nothing_and_stale_expectations_abort() {
    let h = Harness::start().await;
    let session = h
        .create(
            T,
            CreateSessionRequest {
                session_id: "conv-1".into(),
                user_id: "alice".into(),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!((session.id.as_str(), session.last_seq), ("conv-1", 0));
    assert_eq!(session.model, "sim-small");

    let first = h
        .append(T, "conv-1", vec![user("one"), user("two")])
        .await
        .unwrap();
    assert_eq!((first.first_seq, first.last_seq), (1, 2));

    let mut client = h.client.clone();
    let retried = AppendTurnsRequest {
        session_id: "conv-1".into(),
        messages: vec![user("three")],
        request_id: "req-3".into(),
        expected_last_seq: Some(2),
    };
    let a = client
        .append_turns(req(T, retried.clone()))
        .await
        .unwrap()
        .into_inner();
    // The retry (same request_id, stale expected_last_seq) returns the first answer's seqs.
    let b = client
        .append_turns(req(T, retried.clone()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((a.first_seq, a.last_seq), (3, 3));
    assert_eq!((b.first_seq, b.last_seq), (3, 3));
    assert_eq!(b.session.unwrap().last_seq, 3, "the retry added nothing");

    let reused = AppendTurnsRequest {
        messages: vec![user("something else")],
        ..retried.clone()
    };
    let status = client.append_turns(req(T, reused)).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert_eq!(reason_and_field(&status).1, "request_id");

    let stale = AppendTurnsRequest {
        session_id: "conv-1".into(),
        messages: vec![user("four")],
        request_id: String::new(),
        expected_last_seq: Some(2),
    };
    let status = client
        .append_turns(req(T, stale.clone()))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Aborted);
    assert_eq!(reason_and_field(&status).0, "LAST_SEQ_MISMATCH");

    let fresh = AppendTurnsRequest {
        expected_last_seq: Some(3),
        ..stale
    };
    let c = client
        .append_turns(req(T, fresh))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((c.first_seq, c.last_seq), (4, 4));

    let turns = h.all_turns(T, "conv-1").await;
    let contents: Vec<(i64, String)> = turns
        .iter()
        .map(|t| (t.seq, t.message.clone().unwrap().content))
        .collect();
    assert_eq!(
        contents,
        [
            (1, "one".to_string()),
            (2, "two".to_string()),
            (3, "three".to_string()),
            (4, "four".to_string())
        ]
    );
    // Token counts are the sim family's exact counts: 1 word + 4 per message.
    assert!(turns.iter().all(|t| t.token_count == 5));
}

#[tokio::test]
async fn bad_input_is_invalid_argument_naming_the_field() {
    let h = Harness::start().await;
    let mut client = h.client.clone();
    h.create(
        T,
        CreateSessionRequest {
            session_id: "ok-1".into(),
            ..Default::default()
        },
    )
    .await
    .unwrap();

    let cases: Vec<(CreateSessionRequest, &str)> = vec![
        (
            CreateSessionRequest {
                session_id: "has space".into(),
                ..Default::default()
            },
            "session_id",
        ),
        (
            CreateSessionRequest {
                model: "gpt-9".into(),
                ..Default::default()
            },
            "model",
        ),
        (
            CreateSessionRequest {
                ttl: Some(prost_types::Duration {
                    seconds: 365 * 86_400,
                    nanos: 0,
                }),
                ..Default::default()
            },
            "ttl",
        ),
        (
            CreateSessionRequest {
                metadata: (0..33)
                    .map(|i| (format!("k{i}"), String::new()))
                    .collect::<HashMap<_, _>>(),
                ..Default::default()
            },
            "metadata",
        ),
    ];
    for (body, field) in cases {
        let status = client.create_session(req(T, body)).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{field}: {status:?}");
        assert_eq!(reason_and_field(&status).1, field);
    }

    let append = |messages: Vec<Message>, id: &str| AppendTurnsRequest {
        session_id: id.to_string(),
        messages,
        ..Default::default()
    };
    for (body, field) in [
        (append(vec![], "ok-1"), "messages"),
        (
            append(
                vec![
                    user("x"),
                    Message {
                        content: "no role".into(),
                        ..Default::default()
                    },
                ],
                "ok-1",
            ),
            "messages[1].role",
        ),
        (append(vec![user("x")], ""), "session_id"),
        (
            AppendTurnsRequest {
                expected_last_seq: Some(-1),
                ..append(vec![user("x")], "ok-1")
            },
            "expected_last_seq",
        ),
    ] {
        let status = client.append_turns(req(T, body)).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{field}: {status:?}");
        assert_eq!(reason_and_field(&status).1, field);
    }

    let status = client
        .list_turns(req(
            T,
            ListTurnsRequest {
                session_id: "ok-1".into(),
                page_token: "garbage".into(),
                ..Default::default()
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(
        (status.code(), reason_and_field(&status).1.as_str()),
        (Code::InvalidArgument, "page_token")
    );
    let status = client
        .get_context(req(
            T,
            GetContextRequest {
                session_id: "ok-1".into(),
                max_tokens: -5,
                ..Default::default()
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(
        (status.code(), reason_and_field(&status).1.as_str()),
        (Code::InvalidArgument, "max_tokens")
    );

    // A taken id, and unknown sessions.
    let status = client
        .create_session(req(
            T,
            CreateSessionRequest {
                session_id: "ok-1".into(),
                ..Default::default()
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::AlreadyExists);
    let status = client
        .get_session(req(
            T,
            GetSessionRequest {
                session_id: "nope".into(),
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(
        (status.code(), reason_and_field(&status).0.as_str()),
        (Code::NotFound, "SESSION_NOT_FOUND")
    );
    let status = h.append(T, "nope", vec![user("x")]).await.unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    // Server-chosen ids are unguessable and usable.
    let chosen = h.create(T, CreateSessionRequest::default()).await.unwrap();
    assert!(
        chosen.id.starts_with("s_") && chosen.id.len() == 34,
        "{}",
        chosen.id
    );
    h.append(T, &chosen.id, vec![user("hi")]).await.unwrap();
}

#[tokio::test]
async fn list_turns_pages_through_the_history_oldest_first() {
    let h = Harness::start().await;
    h.create(
        T,
        CreateSessionRequest {
            session_id: "paged".into(),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let messages: Vec<Message> = (1..=25).map(|i| user(&format!("turn {i}"))).collect();
    h.append(T, "paged", messages).await.unwrap();
    let mut client = h.client.clone();
    let mut token = String::new();
    let mut pages = Vec::new();
    loop {
        let page = client
            .list_turns(req(
                T,
                ListTurnsRequest {
                    session_id: "paged".into(),
                    page_size: 10,
                    page_token: token.clone(),
                },
            ))
            .await
            .unwrap()
            .into_inner();
        pages.push(page.turns.iter().map(|t| t.seq).collect::<Vec<_>>());
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(pages.len(), 3);
    assert_eq!(pages.concat(), (1..=25).collect::<Vec<i64>>());
}
