//! The fake upstream over real HTTP: the queue and the default, what each reply sends, and what
//! is recorded.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use weir_test_upstream::{Reply, Upstream, Usage, split_at};

async fn post(upstream: &Upstream, body: Value) -> reqwest::Response {
    reqwest::Client::new()
        .post(format!("{}/chat/completions", upstream.base_url()))
        .bearer_auth("sk-test")
        .json(&body)
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn queued_replies_come_first_then_the_default() {
    let upstream = Upstream::start(Reply::answer("default answer"))
        .await
        .unwrap();
    upstream.push(Reply::error(503, "first"));
    upstream.push(Reply::Error {
        status: 429,
        message: "second".to_string(),
        param: Some("model".to_string()),
        retry_after_secs: Some(7),
    });

    let first = post(&upstream, json!({"model": "m"})).await;
    assert_eq!(first.status(), 503);
    let body: Value = first.json().await.unwrap();
    assert_eq!(body["error"]["message"], "first");
    assert_eq!(body["error"]["type"], "server_error");

    let second = post(&upstream, json!({"model": "m"})).await;
    assert_eq!(second.status(), 429);
    assert_eq!(second.headers()["retry-after"], "7");
    let body: Value = second.json().await.unwrap();
    assert_eq!(body["error"]["param"], "model");
    assert_eq!(body["error"]["type"], "invalid_request_error");

    for _ in 0..2 {
        let body: Value = post(&upstream, json!({"model": "m"}))
            .await
            .json()
            .await
            .unwrap();
        assert_eq!(body["choices"][0]["message"]["content"], "default answer");
        assert_eq!(body["usage"]["prompt_tokens"], 10);
        assert_eq!(body["usage"]["completion_tokens"], 2);
    }
    upstream.set_default(Reply::Malformed);
    let text = post(&upstream, json!({"model": "m"}))
        .await
        .text()
        .await
        .unwrap();
    assert_eq!(text, "{not json");

    assert_eq!(upstream.requests(), 5);
    assert_eq!(upstream.received().len(), 5);
    assert_eq!(upstream.received()[0]["model"], "m");
    assert_eq!(
        upstream.received_headers()[0]["authorization"],
        "Bearer sk-test"
    );
}

#[tokio::test]
async fn answers_report_the_usage_they_are_given() {
    let usage = Usage {
        prompt_tokens: 9,
        completion_tokens: 3,
        cached_tokens: Some(2),
    };
    let upstream = Upstream::start(Reply::Answer {
        content: "a b".to_string(),
        usage: Some(usage),
    })
    .await
    .unwrap();
    let body: Value = post(&upstream, json!({})).await.json().await.unwrap();
    assert_eq!(
        body["usage"],
        json!({"prompt_tokens": 9, "completion_tokens": 3, "total_tokens": 12,
               "prompt_tokens_details": {"cached_tokens": 2}})
    );

    upstream.set_default(Reply::Answer {
        content: "a b".to_string(),
        usage: None,
    });
    let body: Value = post(&upstream, json!({})).await.json().await.unwrap();
    assert!(body.get("usage").is_none());
    let text = post(&upstream, json!({"stream": true}))
        .await
        .text()
        .await
        .unwrap();
    assert!(!text.contains("usage"), "{text}");
    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
    assert_eq!(text.matches("\"content\"").count(), 2, "one chunk per word");
}

#[tokio::test]
async fn raw_replies_send_exactly_their_pieces() {
    let body = "data: {\"x\":1}\r\n\r\n: comment\n\ndata: é\n\n";
    let upstream = Upstream::start(Reply::Raw {
        status: 200,
        content_type: "text/event-stream".to_string(),
        // One piece ends inside `é`.
        chunks: split_at(body, &[3, 9, 15, 16, 35]),
        delay_between: Duration::from_millis(30),
    })
    .await
    .unwrap();
    let started = Instant::now();
    let mut response = post(&upstream, json!({"stream": true})).await;
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    let mut pieces = Vec::new();
    while let Some(piece) = response.chunk().await.unwrap() {
        pieces.extend_from_slice(&piece);
    }
    assert_eq!(pieces, body.as_bytes());
    assert!(started.elapsed() >= Duration::from_millis(5 * 30));
    assert_eq!(
        (upstream.streams_started(), upstream.streams_dropped()),
        (1, 1)
    );
}

#[tokio::test]
async fn delayed_replies_wait_and_endless_streams_notice_the_client_leaving() {
    let upstream = Upstream::start(Reply::answer("late").delayed(Duration::from_millis(200)))
        .await
        .unwrap();
    let started = Instant::now();
    assert_eq!(post(&upstream, json!({})).await.status(), 200);
    assert!(started.elapsed() >= Duration::from_millis(200));

    upstream.push(Reply::EndlessStream {
        interval: Duration::from_millis(10),
    });
    let mut response = post(&upstream, json!({"stream": true})).await;
    let mut text = String::new();
    while !text.contains(" t2") {
        text.push_str(&String::from_utf8_lossy(
            &response.chunk().await.unwrap().unwrap(),
        ));
    }
    assert!(text.contains(" t0") && text.contains(" t1"), "{text}");
    assert_eq!(
        (upstream.streams_started(), upstream.streams_dropped()),
        (1, 0)
    );
    drop(response);
    let deadline = Instant::now() + Duration::from_secs(5);
    while upstream.streams_dropped() == 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(upstream.streams_dropped(), 1);
}
