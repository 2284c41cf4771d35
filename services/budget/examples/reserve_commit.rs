//! Reserve + Commit throughput and latency over real gRPC against a real Redis.
//!
//! ```text
//! cargo run --release -p weir-budget --example reserve_commit
//! ```
//! Redis is `WEIR_TEST_REDIS_URL` (default `redis://127.0.0.1:6379`); keys go under a fresh prefix
//! and are deleted at the end. Each level runs `DURATION` with N callers, each looping
//! Reserve (tenant + user scope, both with budgets) then Commit. Prints figures; asserts nothing.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use tokio_util::sync::CancellationToken;
use tonic::{Request, transport::Channel};
use weir_budget::Config;
use weir_mesh::catalog::Catalog;
use weir_proto::budget::{self as pb, budget_service_client::BudgetServiceClient};

const DURATION: Duration = Duration::from_secs(3);
const LEVELS: [usize; 3] = [1, 16, 64];

/// A request of the default tenant: the server runs without API keys (single-tenant dev mode),
/// and no server believes a `weir-tenant` header.
fn req<T>(message: T) -> Request<T> {
    Request::new(message)
}

fn scope(kind: pb::ScopeKind, id: &str) -> pb::Scope {
    pb::Scope {
        kind: kind.into(),
        id: id.into(),
    }
}

#[tokio::main]
async fn main() {
    let redis_url =
        std::env::var("WEIR_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let prefix = format!("weir-bench-budget-{}", uuid::Uuid::new_v4().simple());
    let config = Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        redis_url: Some(redis_url.clone()),
        key_prefix: prefix.clone(),
        ..Config::default()
    };
    let api = weir_budget::api(&config, Arc::new(Catalog::default()))
        .await
        .unwrap();
    let listener = tokio::net::TcpListener::bind(config.listen).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let shutdown = CancellationToken::new();
    tokio::spawn(weir_budget::server_with(api).serve(listener, shutdown.clone()));
    let channel = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = BudgetServiceClient::new(channel);
    for s in [
        scope(pb::ScopeKind::Tenant, ""),
        scope(pb::ScopeKind::User, "u1"),
    ] {
        client
            .set_budget(req(pb::SetBudgetRequest {
                scope: Some(s),
                hard_limit_micros: 1_000_000_000_000,
                soft_limit_fraction: 0.9,
                period: Some(pb::Period {
                    kind: Some(pb::period::Kind::Calendar(pb::CalendarPeriod {
                        unit: pb::PeriodUnit::Monthly.into(),
                        time_zone: "Europe/Paris".into(),
                    })),
                }),
            }))
            .await
            .unwrap();
    }

    println!("Reserve + Commit over gRPC (one HTTP/2 connection) against Redis at {redis_url}");
    println!(
        "{:>8} {:>10} {:>14} {:>10} {:>10} {:>10}",
        "callers", "pairs", "pairs/s", "p50 ms", "p99 ms", "max ms"
    );
    for callers in LEVELS {
        let start = Instant::now();
        let tasks: Vec<_> = (0..callers)
            .map(|caller| {
                let mut client = client.clone();
                tokio::spawn(async move {
                    let mut latencies = Vec::new();
                    let mut i = 0u64;
                    while start.elapsed() < DURATION {
                        let t = Instant::now();
                        let reservation = client
                            .reserve(req(pb::ReserveRequest {
                                request_id: format!("{callers}-{caller}-{i}"),
                                scopes: vec![scope(pb::ScopeKind::User, "u1")],
                                amount_micros: 1_000,
                                ttl: None,
                                model: "sim-small".into(),
                                price_version: String::new(),
                            }))
                            .await
                            .unwrap()
                            .into_inner()
                            .reservation
                            .unwrap();
                        client
                            .commit(req(pb::CommitRequest {
                                reservation_id: reservation.id,
                                request_id: String::new(),
                                usage: Some(weir_proto::common::Usage {
                                    input_tokens: 1000,
                                    output_tokens: 200,
                                    cached_input_tokens: 0,
                                    total_tokens: 1200,
                                }),
                                tier: 0,
                                cost_micros: None,
                            }))
                            .await
                            .unwrap();
                        latencies.push(t.elapsed());
                        i += 1;
                    }
                    latencies
                })
            })
            .collect();
        let mut latencies = Vec::new();
        for task in tasks {
            latencies.extend(task.await.unwrap());
        }
        let elapsed = start.elapsed();
        latencies.sort();
        let pct = |p: f64| {
            let index =
                ((latencies.len() as f64 * p).ceil() as usize).clamp(1, latencies.len()) - 1;
            latencies[index].as_secs_f64() * 1000.0
        };
        println!(
            "{:>8} {:>10} {:>14.0} {:>10.2} {:>10.2} {:>10.2}",
            callers,
            latencies.len(),
            latencies.len() as f64 / elapsed.as_secs_f64(),
            pct(0.50),
            pct(0.99),
            pct(1.0),
        );
    }
    shutdown.cancel();

    let mut conn = redis::Client::open(redis_url)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let keys = weir_mesh::store::scan_keys(&mut conn, &format!("{prefix}:*"))
        .await
        .unwrap_or_default();
    if !keys.is_empty() {
        let _: Result<(), _> = redis::cmd("DEL").arg(keys).query_async(&mut conn).await;
    }
}
