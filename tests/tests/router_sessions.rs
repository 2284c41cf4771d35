//! Sessions through the router, end to end: router → session service (on a real Redis) → the
//! inference service. What the simulated model received is the proof of what the router sent.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use tokio_stream::StreamExt;
use tonic::Code;
use tonic_types::StatusExt;
use weir::stack::Service;
use weir_proto::{
    common::{Message, Role},
    router::{CompleteRequest, CompleteStreamRequest, complete_stream_response::Event},
    session::{CreateSessionRequest, GetSessionRequest, ListTurnsRequest, Session, Turn},
};
use weir_router::session::{SESSION_UNAVAILABLE, SESSIONS_DISABLED};
use weir_session::context::summary_message;
use weir_tests::{Mesh, eventually, redis_url, unique_prefix, user};

/// The conversation model: a 600-token window and at most 100 tokens of answer, so the session's
/// context budget is 500 tokens; answers are 12 tokens.
const CHAT: &str = "sim-chat";

/// `sim-chat` conversations summarized by `sim-summary` once their raw turns pass 20% of the
/// budget (100 tokens), keeping about 50 raw. Each turn below is 29 tokens (a 9-token question
/// and a 12-token answer, plus 4 per message), so the first summary starts after the fourth turn,
/// and the fifth turn does not start another.
fn config(prefix: &str) -> String {
    format!(
        r#"
[models.sim-chat]
context_window = 600
max_output_tokens = 100
sim = {{ output_tokens = 12 }}
[models.sim-summary]
sim = {{ output_tokens = 16 }}

[router.rate_limit]
enabled = false

[session]
redis_url = "{redis}"
key_prefix = "{prefix}"
default_model = "sim-chat"
summarize_threshold = 0.2
summary_model = "sim-summary"
default_ttl = "10m"
tombstone_ttl = "10m"
"#,
        redis = redis_url()
    )
}

/// The user's message of turn `n`: 9 tokens.
fn question(n: usize) -> String {
    format!("turn {n}: tell me about rivers and boats")
}

fn turn(session: &str, n: usize) -> CompleteRequest {
    CompleteRequest {
        model: CHAT.to_string(),
        messages: vec![user(&question(n))],
        session_id: session.to_string(),
        ..CompleteRequest::default()
    }
}

async fn create(mesh: &Mesh, id: &str) {
    mesh.session()
        .create_session(CreateSessionRequest {
            session_id: id.to_string(),
            model: CHAT.to_string(),
            ..CreateSessionRequest::default()
        })
        .await
        .expect("session created");
}

async fn session(mesh: &Mesh, id: &str) -> Session {
    mesh.session()
        .get_session(GetSessionRequest {
            session_id: id.to_string(),
        })
        .await
        .unwrap()
        .into_inner()
        .session
        .unwrap()
}

/// Every raw (not yet summarized) turn of a session, oldest first.
async fn raw_turns(mesh: &Mesh, id: &str) -> Vec<Turn> {
    mesh.session()
        .list_turns(ListTurnsRequest {
            session_id: id.to_string(),
            page_size: 1000,
            ..ListTurnsRequest::default()
        })
        .await
        .unwrap()
        .into_inner()
        .turns
}

fn messages(turns: &[Turn]) -> Vec<Message> {
    turns.iter().map(|t| t.message.clone().unwrap()).collect()
}

fn reasons(notices: &[weir_proto::router::Notice]) -> Vec<&str> {
    notices.iter().map(|n| n.reason.as_str()).collect()
}

#[tokio::test]
async fn the_fifth_turn_reaches_the_model_with_the_summary_and_the_recent_turns() {
    let mesh = Mesh::start(&config(&unique_prefix())).await;
    create(&mesh, "conv").await;
    let mut router = mesh.router();
    let mut answers = Vec::new();
    for n in 1..=4 {
        let response = router.complete(turn("conv", n)).await.unwrap().into_inner();
        assert!(response.notices.is_empty(), "{:?}", response.notices);
        assert_eq!(response.model, CHAT);
        answers.push(response.message.unwrap());
    }
    // The second turn was sent with the first exchange before it.
    let sent = mesh.inference_api().sim_requests_for(CHAT);
    assert_eq!(sent.len(), 4, "summaries are written by another model");
    assert_eq!(
        sent[1].messages,
        [user(&question(1)), answers[0].clone(), user(&question(2))]
    );

    // The fourth append pushed the raw turns past the threshold: wait for the summary.
    assert!(
        eventually(Duration::from_secs(10), || async {
            session(&mesh, "conv").await.summary.is_some()
        })
        .await,
        "the session service summarized the oldest turns"
    );
    let before = session(&mesh, "conv").await;
    let summary = before.summary.clone().unwrap();
    assert_eq!(before.last_seq, 8);
    assert!((1..8).contains(&summary.covers_through_seq), "{summary:?}");
    let recent = messages(&raw_turns(&mesh, "conv").await);
    assert_eq!(recent.len() as i64, 8 - summary.covers_through_seq);

    let fifth = router.complete(turn("conv", 5)).await.unwrap().into_inner();
    assert!(fifth.notices.is_empty(), "{:?}", fifth.notices);
    let sent = mesh.inference_api().sim_requests_for(CHAT);
    assert_eq!(sent.len(), 5);
    let mut expected = vec![summary_message(&summary.text)];
    expected.extend(recent);
    expected.push(user(&question(5)));
    assert_eq!(
        sent[4].messages, expected,
        "summary, then the turns it does not cover, then the new message"
    );
    assert_eq!(sent[4].messages[0].role, i32::from(Role::System));

    // The fifth exchange was appended after the turns that were there.
    let after = session(&mesh, "conv").await;
    assert_eq!(after.last_seq, 10);
    let tail = messages(&raw_turns(&mesh, "conv").await);
    assert_eq!(
        tail[tail.len() - 2..],
        [user(&question(5)), fifth.message.unwrap()]
    );
    mesh.stop().await;
}

#[tokio::test]
async fn a_completed_stream_is_appended() {
    let mesh = Mesh::start(&config(&unique_prefix())).await;
    create(&mesh, "streamed").await;
    let request = CompleteStreamRequest {
        model: CHAT.to_string(),
        messages: vec![user("stream me a story")],
        session_id: "streamed".to_string(),
        ..CompleteStreamRequest::default()
    };
    let mut stream = mesh
        .router()
        .complete_stream(request)
        .await
        .unwrap()
        .into_inner();
    let mut text = String::new();
    let mut done = None;
    while let Some(event) = stream.next().await {
        match event.unwrap().event.unwrap() {
            Event::Delta(delta) => text.push_str(&delta.text),
            Event::Done(d) => done = Some(d),
            Event::Start(_) => {}
        }
    }
    let done = done.expect("the stream finished");
    assert!(done.notices.is_empty(), "{:?}", done.notices);
    let turns = messages(&raw_turns(&mesh, "streamed").await);
    assert_eq!(
        turns,
        [
            user("stream me a story"),
            Message {
                role: Role::Assistant.into(),
                content: text,
                ..Message::default()
            }
        ],
        "appended when the relay saw done, before done went out"
    );
    mesh.stop().await;
}

#[tokio::test]
async fn an_unknown_session_is_not_found_and_no_model_runs() {
    let mesh = Mesh::start(&config(&unique_prefix())).await;
    let mut router = mesh.router();
    let status = router.complete(turn("nope", 1)).await.unwrap_err();
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
    let reason = status
        .get_error_details()
        .error_info()
        .map(|i| i.reason.clone());
    assert_eq!(reason.as_deref(), Some("SESSION_NOT_FOUND"));
    let status = router
        .complete_stream(CompleteStreamRequest {
            model: CHAT.to_string(),
            messages: vec![user("hi")],
            session_id: "nope".to_string(),
            ..CompleteStreamRequest::default()
        })
        .await
        .err()
        .unwrap();
    assert_eq!(status.code(), Code::NotFound);
    assert!(mesh.inference_api().sim_requests_for(CHAT).is_empty());

    // A session with no history and a request with no messages: nothing to answer.
    create(&mesh, "empty").await;
    let mut empty = turn("empty", 1);
    empty.messages.clear();
    let status = router.complete(empty).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    mesh.stop().await;
}

#[tokio::test]
async fn a_session_service_that_is_down_degrades_to_an_answer_without_history() {
    let mesh = Mesh::start_with(
        &config(&unique_prefix()),
        &[Service::Inference, Service::Router],
        |c| c.router.session_url = "http://127.0.0.1:1".to_string(),
    )
    .await;
    let response = mesh
        .router()
        .complete(turn("conv", 1))
        .await
        .expect("answered without history")
        .into_inner();
    assert_eq!(reasons(&response.notices), [SESSION_UNAVAILABLE]);
    let sent = mesh.inference_api().sim_requests_for(CHAT);
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].messages, [user(&question(1))]);
    mesh.stop().await;
}

#[tokio::test]
async fn sessions_off_refuses_a_session_id() {
    let mesh = Mesh::start_with(
        &config(&unique_prefix()),
        &[Service::Inference, Service::Router],
        |c| c.router.session_url = String::new(),
    )
    .await;
    let status = mesh.router().complete(turn("conv", 1)).await.unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);
    let reason = status
        .get_error_details()
        .error_info()
        .map(|i| i.reason.clone());
    assert_eq!(reason.as_deref(), Some(SESSIONS_DISABLED));
    mesh.stop().await;
}

#[tokio::test]
async fn restarting_the_session_service_between_turns_loses_nothing() {
    let toml = config(&unique_prefix());
    let inference = Mesh::start_services(&toml, &[Service::Inference]).await;
    let inference_url = inference.url(Service::Inference);
    let first = Mesh::start_with(&toml, &[Service::Session], |c| {
        c.session.inference_url = inference_url.clone();
    })
    .await;
    let session_addr = first.addr(Service::Session);
    let router = Mesh::start_with(&toml, &[Service::Router], |c| {
        c.router.inference_url = inference_url.clone();
        c.router.session_url = format!("http://{session_addr}");
    })
    .await;
    create(&first, "durable").await;
    let mut client = router.router();
    let one = client
        .complete(turn("durable", 1))
        .await
        .unwrap()
        .into_inner();
    assert!(one.notices.is_empty(), "{:?}", one.notices);

    // The session service goes away: the router answers without history and appends nothing.
    first.stop().await;
    let during = client
        .complete(turn("durable", 2))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reasons(&during.notices), [SESSION_UNAVAILABLE]);

    // A new process on the same address, on the same Redis: the history is all there.
    let second = Mesh::start_with(&toml, &[Service::Session], |c| {
        c.session.listen = session_addr;
        c.session.inference_url = inference_url.clone();
    })
    .await;
    let three = client
        .complete(turn("durable", 3))
        .await
        .unwrap()
        .into_inner();
    assert!(three.notices.is_empty(), "{:?}", three.notices);
    let sent = inference.inference_api().sim_requests_for(CHAT);
    assert_eq!(sent.len(), 3);
    assert_eq!(
        sent[2].messages,
        [
            user(&question(1)),
            one.message.clone().unwrap(),
            user(&question(3))
        ]
    );
    assert_eq!(
        messages(&raw_turns(&second, "durable").await),
        [
            user(&question(1)),
            one.message.unwrap(),
            user(&question(3)),
            three.message.unwrap()
        ]
    );
    router.stop().await;
    second.stop().await;
    inference.stop().await;
}
