use std::time::Duration;

use tonic::Code;

use super::*;

fn tenant(id: &str) -> Tenant {
    Tenant::new(id).unwrap()
}

fn fp(text: &str) -> Fingerprint {
    Fingerprint::of(&[text.as_bytes()])
}

async fn claim(records: &Idempotency, key: &str, text: &str) -> Result<Claim, ApiError> {
    records
        .claim(
            &tenant("acme"),
            key,
            fp(text),
            Some(Deadline::after(Duration::from_secs(5))),
        )
        .await
}

#[tokio::test(start_paused = true)]
async fn the_first_request_runs_and_its_repeats_replay_its_answer() {
    let records = Idempotency::in_memory("router");
    let Claim::Run(guard) = claim(&records, "k1", "hello").await.unwrap() else {
        panic!("a new key is the request's to run");
    };
    assert!(guard.complete(b"answer").await.unwrap());
    for _ in 0..3 {
        match claim(&records, "k1", "hello").await.unwrap() {
            Claim::Replay(answer) => assert_eq!(answer, b"answer"),
            Claim::Run(_) => panic!("a completed key is never run again"),
        }
    }
}

#[tokio::test(start_paused = true)]
async fn a_key_reused_for_another_request_is_refused() {
    let records = Idempotency::in_memory("router");
    let Claim::Run(guard) = claim(&records, "k1", "hello").await.unwrap() else {
        panic!()
    };
    // While it runs, and after it completed.
    let error = claim(&records, "k1", "goodbye").await.unwrap_err();
    assert_eq!(error.code(), Code::InvalidArgument);
    assert_eq!(error.reason(), KEY_REUSED);
    guard.complete(b"answer").await.unwrap();
    let error = claim(&records, "k1", "goodbye").await.unwrap_err();
    assert_eq!(error.reason(), KEY_REUSED);
}

#[tokio::test(start_paused = true)]
async fn keys_are_scoped_by_tenant() {
    let records = Idempotency::in_memory("router");
    let Claim::Run(guard) = claim(&records, "k1", "hello").await.unwrap() else {
        panic!()
    };
    guard.complete(b"acme's").await.unwrap();
    let other = records
        .claim(&tenant("globex"), "k1", fp("hello"), None)
        .await
        .unwrap();
    assert!(matches!(other, Claim::Run(_)), "globex's k1 is not acme's");
}

#[tokio::test(start_paused = true)]
async fn a_duplicate_waits_for_the_running_request_and_gets_its_answer() {
    let records = Idempotency::in_memory("router");
    let Claim::Run(guard) = claim(&records, "k1", "hello").await.unwrap() else {
        panic!()
    };
    let waiter = {
        let records = records.clone();
        tokio::spawn(async move { claim(&records, "k1", "hello").await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!waiter.is_finished(), "it waits while the first runs");
    guard.complete(b"answer").await.unwrap();
    match waiter.await.unwrap().unwrap() {
        Claim::Replay(answer) => assert_eq!(answer, b"answer"),
        Claim::Run(_) => panic!("the duplicate must not run"),
    }
}

#[tokio::test(start_paused = true)]
async fn a_released_key_is_run_by_the_next_request() {
    let records = Idempotency::in_memory("router");
    let Claim::Run(guard) = claim(&records, "k1", "hello").await.unwrap() else {
        panic!()
    };
    let waiter = {
        let records = records.clone();
        tokio::spawn(async move { claim(&records, "k1", "hello").await })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    guard.release().await;
    assert!(matches!(waiter.await.unwrap().unwrap(), Claim::Run(_)));
}

#[tokio::test(start_paused = true)]
async fn a_dropped_guard_releases_its_key() {
    let records = Idempotency::in_memory("router");
    let Claim::Run(guard) = claim(&records, "k1", "hello").await.unwrap() else {
        panic!()
    };
    drop(guard);
    tokio::task::yield_now().await;
    assert!(matches!(
        claim(&records, "k1", "hello").await.unwrap(),
        Claim::Run(_)
    ));
}

#[tokio::test(start_paused = true)]
async fn a_duplicate_out_of_time_is_aborted_with_retry_info() {
    let records = Idempotency::in_memory("router");
    let Claim::Run(_guard) = claim(&records, "k1", "hello").await.unwrap() else {
        panic!()
    };
    let start = Instant::now();
    let error = records
        .claim(
            &tenant("acme"),
            "k1",
            fp("hello"),
            Some(Deadline::after(Duration::from_millis(200))),
        )
        .await
        .unwrap_err();
    assert_eq!(error.code(), Code::Aborted);
    assert_eq!(error.reason(), KEY_IN_PROGRESS);
    assert!(error.retry_after().is_some());
    assert!(
        start.elapsed() <= Duration::from_millis(200),
        "within its deadline"
    );
}

#[tokio::test(start_paused = true)]
async fn an_owner_that_died_loses_its_key_when_its_lease_ends() {
    let records = Idempotency::in_memory("router");
    let Claim::Run(guard) = records
        .claim(
            &tenant("acme"),
            "k1",
            fp("hello"),
            Some(Deadline::after(Duration::from_secs(1))),
        )
        .await
        .unwrap()
    else {
        panic!()
    };
    // The owner's process is gone: its guard will never complete or release.
    std::mem::forget(guard);
    tokio::time::sleep(Duration::from_secs(1) + LEASE_MARGIN + Duration::from_millis(1)).await;
    let Claim::Run(late) = claim(&records, "k1", "hello").await.unwrap() else {
        panic!("an expired lease frees the key")
    };
    assert!(late.complete(b"second").await.unwrap());
}

#[test]
fn keys_are_checked() {
    assert!(validate_key("request_id", "3f2a-77:b_c.d").is_ok());
    for bad in ["", "has space", "tab\there", "é"] {
        let error = validate_key("request_id", bad).unwrap_err();
        assert_eq!(error.code(), Code::InvalidArgument, "{bad:?}");
    }
    assert!(validate_key("request_id", &"k".repeat(MAX_KEY_LEN)).is_ok());
    assert!(validate_key("request_id", &"k".repeat(MAX_KEY_LEN + 1)).is_err());
}

#[test]
fn fingerprints_separate_their_parts() {
    assert_ne!(
        Fingerprint::of(&[b"ab", b"c"]),
        Fingerprint::of(&[b"a", b"bc"])
    );
    assert_eq!(
        Fingerprint::of(&[b"ab", b"c"]),
        Fingerprint::of(&[b"ab", b"c"])
    );
}
