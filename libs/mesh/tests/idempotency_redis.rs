//! Idempotency records against a real Redis (`WEIR_TEST_REDIS_URL`, default
//! `redis://127.0.0.1:6379`): two `Idempotency` values stand for two router replicas. Every test
//! uses its own key prefix.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tonic::Code;
use weir_mesh::{
    deadline::Deadline,
    idempotency::{Claim, Fingerprint, Idempotency, IdempotencyConfig, KEY_REUSED},
    tenant::Tenant,
};

fn replicas(test: &str) -> (Idempotency, Idempotency) {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    let config = IdempotencyConfig {
        redis_url: Some(
            std::env::var("WEIR_TEST_REDIS_URL")
                .unwrap_or_else(|_| "redis://127.0.0.1:6379".to_string()),
        ),
        key_prefix: format!("weir-test-{}-{nanos}-{test}", std::process::id()),
        ..IdempotencyConfig::default()
    };
    let a = Idempotency::from_config(&config, "router.idempotency", "router").unwrap();
    let b = Idempotency::from_config(&config, "router.idempotency", "router").unwrap();
    (a, b)
}

fn deadline() -> Option<Deadline> {
    Some(Deadline::after(Duration::from_secs(10)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_concurrent_duplicates_across_two_replicas_run_once_and_all_get_the_answer() {
    let (a, b) = replicas("fifty");
    let tenant = Tenant::new("acme").unwrap();
    let fingerprint = Fingerprint::of(&[b"the same request"]);
    let mut tasks = Vec::new();
    for i in 0..50 {
        let records = if i % 2 == 0 { a.clone() } else { b.clone() };
        let tenant = tenant.clone();
        tasks.push(tokio::spawn(async move {
            match records
                .claim(&tenant, "req-1", fingerprint, deadline())
                .await
                .unwrap()
            {
                Claim::Run(guard) => {
                    // The one run: take a moment, as a model would, then record the answer.
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    assert!(guard.complete(b"the answer").await.unwrap());
                    (true, b"the answer".to_vec())
                }
                Claim::Replay(answer) => (false, answer),
            }
        }));
    }
    let mut runs = 0;
    for task in tasks {
        let (ran, answer) = task.await.unwrap();
        runs += usize::from(ran);
        assert_eq!(answer, b"the answer");
    }
    assert_eq!(runs, 1, "exactly one of 50 duplicates ran");
}

#[tokio::test]
async fn a_record_outlives_the_replica_that_wrote_it_and_reuse_is_refused() {
    let (a, b) = replicas("restart");
    let tenant = Tenant::new("acme").unwrap();
    let Claim::Run(guard) = a
        .claim(&tenant, "req-2", Fingerprint::of(&[b"x"]), deadline())
        .await
        .unwrap()
    else {
        panic!("a new key runs");
    };
    guard.complete(b"kept").await.unwrap();
    drop(a);
    match b
        .claim(&tenant, "req-2", Fingerprint::of(&[b"x"]), deadline())
        .await
        .unwrap()
    {
        Claim::Replay(answer) => assert_eq!(answer, b"kept"),
        Claim::Run(_) => panic!("replayed by another replica"),
    }
    let error = b
        .claim(&tenant, "req-2", Fingerprint::of(&[b"y"]), deadline())
        .await
        .unwrap_err();
    assert_eq!(error.code(), Code::InvalidArgument);
    assert_eq!(error.reason(), KEY_REUSED);
}

#[tokio::test]
async fn a_released_key_runs_again_on_the_other_replica() {
    let (a, b) = replicas("release");
    let tenant = Tenant::new("acme").unwrap();
    let fingerprint = Fingerprint::of(&[b"x"]);
    let Claim::Run(guard) = a
        .claim(&tenant, "req-3", fingerprint, deadline())
        .await
        .unwrap()
    else {
        panic!()
    };
    guard.release().await;
    assert!(matches!(
        b.claim(&tenant, "req-3", fingerprint, deadline())
            .await
            .unwrap(),
        Claim::Run(_)
    ));
}

#[tokio::test]
async fn redis_down_refuses_with_unavailable() {
    let config = IdempotencyConfig {
        redis_url: Some("redis://127.0.0.1:1".to_string()),
        ..IdempotencyConfig::default()
    };
    let records = Idempotency::from_config(&config, "router.idempotency", "router").unwrap();
    let error = records
        .claim(
            &Tenant::new("acme").unwrap(),
            "req-4",
            Fingerprint::of(&[b"x"]),
            deadline(),
        )
        .await
        .unwrap_err();
    assert_eq!(error.code(), Code::Unavailable);
    assert_eq!(error.reason(), "IDEMPOTENCY_UNAVAILABLE");
}
