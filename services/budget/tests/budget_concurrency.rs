//! No overspend under concurrency: 1,000 concurrent $0.10 reservations against a $5.00 hard limit.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use common::*;
use tonic::Code;

const LIMIT: i64 = 5_000_000;
const AMOUNT: i64 = 100_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousand_concurrent_reservations_never_overspend() {
    let server = start(config()).await;
    let mut client = server.client.clone();
    set_budget(&mut client, "acme", tenant_scope(), LIMIT, 0.0).await;

    // Sample the Redis counters while the reservations run.
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = {
        let stop = stop.clone();
        let pattern = format!("{}:{{acme}}:budget:ctr:*", server.prefix);
        tokio::spawn(async move {
            let mut conn = redis().await;
            let (mut samples, mut max_seen) = (0u64, 0i64);
            while !stop.load(Ordering::Relaxed) {
                let keys = weir_mesh::store::keys_matching(&mut conn, &pattern)
                    .await
                    .unwrap();
                for key in keys {
                    let (held, spent): (Option<i64>, Option<i64>) = redis::cmd("HMGET")
                        .arg(&key)
                        .arg("held")
                        .arg("spent")
                        .query_async(&mut conn)
                        .await
                        .unwrap();
                    let total = held.unwrap_or(0) + spent.unwrap_or(0);
                    assert!(total <= LIMIT, "held + spent = {total} > {LIMIT}");
                    max_seen = max_seen.max(total);
                    samples += 1;
                }
            }
            (samples, max_seen)
        })
    };

    let calls = (0..1000).map(|i| {
        let mut client = client.clone();
        async move {
            reserve(
                &mut client,
                "acme",
                &format!("r{i}"),
                vec![tenant_scope()],
                AMOUNT,
            )
            .await
        }
    });
    let results = futures::future::join_all(calls).await;
    stop.store(true, Ordering::Relaxed);
    let (samples, max_seen) = sampler.await.unwrap();

    let ok = results.iter().filter(|r| r.is_ok()).count();
    assert_eq!(ok, 50, "exactly $5.00 / $0.10 reservations succeed");
    for error in results.iter().filter_map(|r| r.as_ref().err()) {
        assert_eq!(error.code(), Code::ResourceExhausted, "{error}");
        assert_eq!(error.reason(), "BUDGET_EXHAUSTED");
        assert_eq!(error.quota_violations()[0].0, "tenant:acme");
        let retry = error
            .retry_after()
            .expect("RetryInfo until the period resets");
        assert!(retry > Duration::ZERO && retry <= Duration::from_secs(86_400));
    }
    assert!(samples > 0, "the sampler read the counters during the run");
    assert!(max_seen <= LIMIT);

    let budget = get_budget(&mut client, "acme", tenant_scope()).await;
    assert_eq!(budget.held_micros, LIMIT);
    assert_eq!(budget.spent_micros, 0);
    eprintln!("sampler: {samples} samples, max held + spent {max_seen}");
    cleanup(&server.prefix).await;
}
