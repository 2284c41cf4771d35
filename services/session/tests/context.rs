//! GetContext over real gRPC and Redis: within the budget, newest turns first, tool calls kept
//! with their results, and counts in the requested model's tokenizer family.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{Harness, O200K, assistant, req, tool_call, tool_result, user};
use weir_mesh::tokens;
use weir_proto::{
    common::{Message, Role},
    session::{CreateSessionRequest, GetContextRequest, GetContextResponse},
};

const T: &str = "acme";

/// A conversation with single turns and tool units (a call with one or two results).
fn conversation() -> Vec<Message> {
    let mut messages = Vec::new();
    for i in 0..12 {
        messages.push(user(&format!(
            "question {i} about the river and the bridge"
        )));
        if i % 3 == 1 {
            let (a, b) = (format!("call-{i}-a"), format!("call-{i}-b"));
            let mut call = tool_call(&a);
            call.tool_calls.extend(tool_call(&b).tool_calls);
            messages.push(call);
            messages.push(tool_result(&a, "the river is long and the bridge is old"));
            messages.push(tool_result(&b, "forty two"));
        }
        messages.push(assistant(&format!("answer {i}, which is fairly short")));
    }
    messages
}

fn check_pairs(context: &GetContextResponse) {
    let messages: Vec<&Message> = context
        .turns
        .iter()
        .filter_map(|t| t.message.as_ref())
        .collect();
    for (i, message) in messages.iter().enumerate() {
        if message.role == i32::from(Role::Tool) {
            let call = messages[..i]
                .iter()
                .rev()
                .find(|m| m.role != i32::from(Role::Tool))
                .expect("a tool result is never first");
            assert!(
                call.tool_calls.iter().any(|c| c.id == message.tool_call_id),
                "result {} without its call",
                message.tool_call_id
            );
        }
        for call in &message.tool_calls {
            assert!(
                messages[i + 1..].iter().any(|m| m.tool_call_id == call.id),
                "call {} without its result",
                call.id
            );
        }
    }
}

#[tokio::test]
async fn context_stays_within_budget_and_keeps_tool_pairs_together() {
    let h = Harness::start().await;
    h.create(
        T,
        CreateSessionRequest {
            session_id: "ctx".into(),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let messages = conversation();
    let total = messages.len();
    h.append(T, "ctx", messages.clone()).await.unwrap();
    let all: i64 = messages
        .iter()
        .map(|m| i64::from(tokens::count_message("sim", m)))
        .sum();

    let mut client = h.client.clone();
    let mut previous = 0;
    for budget in (0..=all + 10).step_by(7) {
        let context = client
            .get_context(req(
                T,
                GetContextRequest {
                    session_id: "ctx".into(),
                    max_tokens: budget,
                    ..Default::default()
                },
            ))
            .await
            .unwrap()
            .into_inner();
        let effective = if budget == 0 { i64::MAX } else { budget };
        assert!(
            context.token_count <= effective,
            "{} > {budget}",
            context.token_count
        );
        let sum: i64 = context.turns.iter().map(|t| t.token_count).sum();
        assert_eq!(sum, context.token_count);
        check_pairs(&context);
        // The newest turns, contiguous up to the last one.
        let seqs: Vec<i64> = context.turns.iter().map(|t| t.seq).collect();
        let n = seqs.len() as i64;
        assert_eq!(
            seqs,
            ((total as i64 - n + 1)..=total as i64).collect::<Vec<_>>()
        );
        assert_eq!(context.omitted_turns, total as i64 - n);
        if budget > 0 {
            assert!(n >= previous, "a larger budget never returns fewer turns");
            previous = n;
        } else {
            assert_eq!(
                n, total as i64,
                "the model's own budget (7168) holds everything"
            );
        }
    }

    // Another tokenizer family: counts are that family's, and still add up.
    let context = client
        .get_context(req(
            T,
            GetContextRequest {
                session_id: "ctx".into(),
                model: O200K.into(),
                max_tokens: 120,
                request_id: String::new(),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(context.token_count <= 120);
    for turn in &context.turns {
        let expected = tokens::count_message("o200k", turn.message.as_ref().unwrap());
        assert_eq!(turn.token_count, i64::from(expected));
    }
    check_pairs(&context);
}

/// The texts of a context's turns, oldest first.
fn texts(context: &GetContextResponse) -> Vec<String> {
    context
        .turns
        .iter()
        .filter_map(|t| t.message.as_ref())
        .map(|m| m.content.clone())
        .collect()
}

#[tokio::test]
async fn a_retried_request_gets_the_context_from_before_its_own_turns() {
    let h = Harness::start().await;
    h.create(
        T,
        CreateSessionRequest {
            session_id: "retry".into(),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let mut client = h.client.clone();
    for (id, question, answer) in [("r1", "q1", "a1"), ("r2", "q2", "a2"), ("r3", "q3", "a3")] {
        client
            .append_turns(req(
                T,
                weir_proto::session::AppendTurnsRequest {
                    session_id: "retry".into(),
                    messages: vec![user(question), assistant(answer)],
                    request_id: id.into(),
                    ..Default::default()
                },
            ))
            .await
            .unwrap();
    }
    let context = |request_id: &str| {
        let mut client = h.client.clone();
        let request_id = request_id.to_string();
        async move {
            client
                .get_context(req(
                    T,
                    GetContextRequest {
                        session_id: "retry".into(),
                        request_id,
                        ..Default::default()
                    },
                ))
                .await
                .unwrap()
                .into_inner()
        }
    };
    assert_eq!(
        texts(&context("").await),
        ["q1", "a1", "q2", "a2", "q3", "a3"]
    );
    assert_eq!(
        texts(&context("r2").await),
        ["q1", "a1"],
        "r2 retried sees what it saw the first time"
    );
    let first = context("r1").await;
    assert!(
        first.turns.is_empty() && first.messages.is_empty(),
        "{first:?}"
    );
    assert_eq!(first.omitted_turns, 0);
    assert_eq!(
        texts(&context("never-appended").await),
        ["q1", "a1", "q2", "a2", "q3", "a3"],
        "a request the session does not know gets the whole context"
    );
    let refused = client
        .get_context(req(
            T,
            GetContextRequest {
                session_id: "retry".into(),
                request_id: "x".repeat(300),
                ..Default::default()
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused:?}");
}
