//! Decisions per second on Redis (`WEIR_TEST_REDIS_URL`, default `redis://127.0.0.1:6379`):
//! one review server over loopback gRPC; `items` items are created by 8 concurrent producers,
//! then `reviewers` concurrent reviewers each loop ClaimNext → SubmitDecision until the queue is
//! empty. Prints the rates and the latency of one claim + decide. Uses a unique key prefix and
//! deletes its keys at the end.
//!
//! Prints figures; asserts nothing (machines are shared and noisy).
//!
//! ```text
//! cargo run --release -p weir-review --example decision_throughput -- [items] [reviewers]
//! ```
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use tokio_util::sync::CancellationToken;
use weir_proto::{
    common::{Message, Role},
    review::{
        ClaimNextRequest, CreateItemRequest, GetQueueStatsRequest, SubmitDecisionRequest, Verdict,
        review_service_client::ReviewServiceClient,
    },
};

fn redis_url() -> String {
    std::env::var("WEIR_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_string())
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted
        .get(index.min(sorted.len().saturating_sub(1)))
        .copied()
        .unwrap_or_default()
}

async fn delete_prefix(prefix: &str) -> usize {
    let mut conn = weir_mesh::store::connect(&redis_url()).await.unwrap();
    let keys = weir_mesh::store::scan_keys(&mut conn, &format!("{prefix}:*"))
        .await
        .unwrap();
    for batch in keys.chunks(1000) {
        let _: () = redis::cmd("UNLINK")
            .arg(batch)
            .query_async(&mut conn)
            .await
            .unwrap();
    }
    keys.len()
}

#[tokio::main]
async fn main() {
    let mut args = std::env::args().skip(1);
    let items: usize = args.next().and_then(|n| n.parse().ok()).unwrap_or(2000);
    let reviewers: usize = args.next().and_then(|n| n.parse().ok()).unwrap_or(8);
    let prefix = format!(
        "wbench-review-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos()
    );
    let config = weir_review::Config {
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        redis_url: Some(redis_url()),
        key_prefix: prefix.clone(),
        ..weir_review::Config::default()
    };
    let api = weir_review::api(&config).await.unwrap();
    let listener = weir_mesh::server::bind(config.listen).await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let shutdown = CancellationToken::new();
    tokio::spawn(weir_review::server_with(api).serve(listener, shutdown.clone()));
    let client = ReviewServiceClient::connect(url).await.unwrap();

    // Create.
    let start = Instant::now();
    let mut producers = Vec::new();
    for p in 0..8 {
        let mut client = client.clone();
        producers.push(tokio::spawn(async move {
            for i in (p..items).step_by(8) {
                let body = CreateItemRequest {
                    queue: "bench".to_string(),
                    output: Some(Message {
                        role: Role::Assistant.into(),
                        content: format!(
                            "answer {i} to review, about a paragraph long: {}",
                            "x".repeat(200)
                        ),
                        ..Message::default()
                    }),
                    model: "sim-small".to_string(),
                    reasons: vec!["pii".to_string()],
                    priority: i32::try_from(i % 5).unwrap(),
                    ..CreateItemRequest::default()
                };
                client.create_item(body).await.unwrap();
            }
        }));
    }
    for producer in producers {
        producer.await.unwrap();
    }
    let create_time = start.elapsed();

    // Claim and decide.
    let start = Instant::now();
    let mut workers = Vec::new();
    for r in 0..reviewers {
        let mut client = client.clone();
        workers.push(tokio::spawn(async move {
            let mut samples = Vec::new();
            loop {
                let t = Instant::now();
                let claim = ClaimNextRequest {
                    queue: "bench".to_string(),
                    reviewer: format!("reviewer-{r}"),
                    ..ClaimNextRequest::default()
                };
                let Some(item) = client.claim_next(claim).await.unwrap().into_inner().item else {
                    return samples;
                };
                let decide = SubmitDecisionRequest {
                    item_id: item.id,
                    lease_id: item.lease.unwrap().lease_id,
                    verdict: if samples.len() % 4 == 0 {
                        Verdict::Reject
                    } else {
                        Verdict::Approve
                    } as i32,
                    comment: "ok".to_string(),
                    ..SubmitDecisionRequest::default()
                };
                client.submit_decision(decide).await.unwrap();
                samples.push(t.elapsed());
            }
        }));
    }
    let mut samples = Vec::new();
    for worker in workers {
        samples.extend(worker.await.unwrap());
    }
    let decide_time = start.elapsed();
    samples.sort();
    let stats = client
        .clone()
        .get_queue_stats(GetQueueStatsRequest {
            queue: "bench".to_string(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(stats.decided_total as usize, items);

    println!(
        "review service on Redis, loopback gRPC, {items} items, {reviewers} concurrent reviewers:"
    );
    println!(
        "create           {:>8.0} items/s     ({items} in {create_time:.2?}, 8 producers)",
        items as f64 / create_time.as_secs_f64()
    );
    println!(
        "claim + decide   {:>8.0} decisions/s ({} in {decide_time:.2?})",
        samples.len() as f64 / decide_time.as_secs_f64(),
        samples.len()
    );
    println!(
        "one claim+decide p50={:.2?} p90={:.2?} p99={:.2?} max={:.2?}",
        percentile(&samples, 0.5),
        percentile(&samples, 0.9),
        percentile(&samples, 0.99),
        samples.last().copied().unwrap_or_default()
    );
    println!("approval rate    {:.2}", stats.approval_rate);
    shutdown.cancel();
    let deleted = delete_prefix(&prefix).await;
    println!("deleted {deleted} keys under {prefix}:");
}
