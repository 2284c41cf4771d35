//! Summarization against a real Redis and a real inference service: concurrent appends racing the
//! summarizer lose nothing, the summary reaches the context, and failures change nothing.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::{collections::BTreeMap, net::SocketAddr, time::Duration};

use common::{
    BROKEN, Harness, SLOW, TINY, catalog, req, start_inference, test_config, user, wait_for,
};
use weir_proto::session::{
    AppendTurnsRequest, CreateSessionRequest, GetContextRequest, GetSessionRequest,
};
use weir_session::{context::SUMMARY_PREFIX, summarizer::INSTRUCTION};

const T: &str = "acme";

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_appends_racing_the_summarizer_lose_nothing() {
    let h = Harness::start_with(|c| c.summary_model = SLOW.to_string()).await;
    h.create(
        T,
        CreateSessionRequest {
            session_id: "race".into(),
            model: TINY.into(),
            ..Default::default()
        },
    )
    .await
    .unwrap();

    // 100 appends at once, in two waves so that the second races a summary in flight (the
    // summary model takes 300 ms). Each message is 12 tokens; 400 trigger a summary.
    let mut sent: BTreeMap<String, (i64, i64)> = BTreeMap::new();
    for wave in 0..2 {
        let mut tasks = Vec::new();
        for i in 0..50 {
            let mut client = h.client.clone();
            let text = format!("message number {wave} {i} from the racing client");
            tasks.push(tokio::spawn(async move {
                let body = AppendTurnsRequest {
                    session_id: "race".into(),
                    messages: vec![user(&text)],
                    request_id: format!("r-{wave}-{i}"),
                    ..Default::default()
                };
                let response = client
                    .append_turns(req(T, body))
                    .await
                    .unwrap()
                    .into_inner();
                (text, (response.first_seq, response.last_seq))
            }));
        }
        for task in tasks {
            let (text, seqs) = task.await.unwrap();
            sent.insert(text, seqs);
        }
        if wave == 0 {
            wait_for("a summary in flight", Duration::from_secs(10), || async {
                h.api.summary_stats().running > 0 || h.api.summary_stats().committed > 0
            })
            .await;
        }
    }
    h.summarizer_idle().await;

    let mut client = h.client.clone();
    let session = client
        .get_session(req(
            T,
            GetSessionRequest {
                session_id: "race".into(),
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .session
        .unwrap();
    assert_eq!(session.last_seq, 100);
    let summary = session.summary.expect("the summarizer committed");
    assert!(summary.version >= 1);
    let covers = summary.covers_through_seq;
    assert!(covers > 0 && covers < 100, "covers {covers}");
    assert!(h.api.summary_stats().committed >= 1);

    // Every seq is either covered or raw, exactly once; no gaps, no duplicates.
    let raw = h.all_turns(T, "race").await;
    let raw_seqs: Vec<i64> = raw.iter().map(|t| t.seq).collect();
    assert_eq!(raw_seqs, ((covers + 1)..=100).collect::<Vec<_>>());
    let mut seqs: Vec<i64> = sent
        .values()
        .map(|(first, last)| {
            assert_eq!(first, last);
            *first
        })
        .collect();
    seqs.sort_unstable();
    assert_eq!(
        seqs,
        (1..=100).collect::<Vec<_>>(),
        "each append got its own seq"
    );
    // Each raw turn holds exactly the message whose append was given its seq.
    for turn in &raw {
        let content = &turn.message.as_ref().unwrap().content;
        assert_eq!(sent[content].0, turn.seq, "{content}");
    }
}

#[tokio::test]
async fn the_summary_and_recent_turns_make_the_context() {
    let h = Harness::start().await;
    h.create(
        T,
        CreateSessionRequest {
            session_id: "long".into(),
            model: TINY.into(),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    for i in 0..40 {
        h.append(
            T,
            "long",
            vec![user(&format!(
                "the user says thing {i} about boats and rivers"
            ))],
        )
        .await
        .unwrap();
    }
    h.summarizer_idle().await;
    wait_for("a committed summary", Duration::from_secs(10), || async {
        h.api.summary_stats().committed >= 1
    })
    .await;
    h.summarizer_idle().await;

    let mut client = h.client.clone();
    let context = client
        .get_context(req(
            T,
            GetContextRequest {
                session_id: "long".into(),
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner();
    let summary = context.summary.clone().expect("a summary");
    assert!(!summary.text.is_empty());
    assert_eq!(
        context.turns.first().unwrap().seq,
        summary.covers_through_seq + 1
    );
    assert_eq!(context.turns.last().unwrap().seq, 40);
    assert!(context.token_count <= 500, "within sim-tiny's budget");
    let messages = weir_session::context::context_messages(&context);
    assert!(messages[0].content.starts_with(SUMMARY_PREFIX));

    // What the summary model received: the instruction, then the oldest turns' transcript.
    let requests = h.inference.as_ref().unwrap().api.sim_requests_for(TINY);
    let first = requests.first().expect("a summarization request");
    assert_eq!(first.messages[0].content, INSTRUCTION);
    assert!(
        first.messages[1]
            .content
            .contains("user: the user says thing 0 about boats")
    );
    assert!(
        !first.messages[1].content.contains("thing 39 "),
        "the newest turns stay raw"
    );
}

#[tokio::test]
async fn failed_summaries_change_nothing_and_the_next_append_retries() {
    // First, a summary model that always fails: history stays whole.
    let h = Harness::start_with(|c| c.summary_model = BROKEN.to_string()).await;
    h.create(
        T,
        CreateSessionRequest {
            session_id: "fails".into(),
            model: TINY.into(),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    for i in 0..40 {
        h.append(
            T,
            "fails",
            vec![user(&format!("message {i} with several words in it"))],
        )
        .await
        .unwrap();
    }
    h.summarizer_idle().await;
    let stats = h.api.summary_stats();
    assert!(stats.failed >= 1 && stats.committed == 0, "{stats:?}");
    assert_eq!(h.all_turns(T, "fails").await.len(), 40);

    // Then an inference service that is down at first and comes back.
    let reserved = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr: SocketAddr = reserved.local_addr().unwrap();
    drop(reserved);
    let catalog = catalog();
    let config = test_config(&format!("http://{addr}"));
    let h = Harness::start_session(config, catalog.clone(), None).await;
    h.create(
        T,
        CreateSessionRequest {
            session_id: "retry".into(),
            model: TINY.into(),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    for i in 0..40 {
        h.append(
            T,
            "retry",
            vec![user(&format!("message {i} with several words in it"))],
        )
        .await
        .unwrap();
    }
    h.summarizer_idle().await;
    assert!(h.api.summary_stats().failed >= 1);
    assert_eq!(
        h.all_turns(T, "retry").await.len(),
        40,
        "nothing lost, nothing dropped"
    );

    let _inference = start_inference(catalog, addr).await;
    h.append(T, "retry", vec![user("one more")]).await.unwrap();
    wait_for("the retried summary", Duration::from_secs(10), || async {
        h.api.summary_stats().committed >= 1
    })
    .await;
    h.summarizer_idle().await;
    let raw = h.all_turns(T, "retry").await;
    let covers = raw.first().unwrap().seq - 1;
    assert!(covers > 0);
    assert_eq!(raw.last().unwrap().seq, 41);
}
