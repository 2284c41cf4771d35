//! One suite for both stores: the in-memory one always, the Redis one against
//! `WEIR_TEST_REDIS_URL` (default `redis://127.0.0.1:6379`) under a unique key prefix, deleted
//! afterwards.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use weir_mesh::tenant::Tenant;
use weir_proto::router::{CompleteRequest, CompleteResponse, Job, JobError};

use super::*;

fn config() -> JobsConfig {
    JobsConfig {
        capacity: 3,
        max_deliveries: 2,
        backoff: Duration::from_millis(1),
        ..JobsConfig::default()
    }
}

fn tenant(name: &str) -> Tenant {
    Tenant::new(name).unwrap()
}

fn new_job(request_id: &str) -> NewJob {
    let id = format!("job-{}", uuid::Uuid::new_v4().simple());
    NewJob {
        id: id.clone(),
        request_id: request_id.to_string(),
        body: Job {
            id,
            request: Some(CompleteRequest {
                model: "sim-small".to_string(),
                ..CompleteRequest::default()
            }),
            ..Job::default()
        },
        expire_ms: now_ms() + 60_000,
    }
}

async fn next(store: &JobStore, consumer: &str) -> Delivery {
    store
        .next(consumer, Duration::from_millis(200))
        .await
        .unwrap()
        .into_iter()
        .next()
        .expect("a delivery")
}

async fn submit_is_idempotent_and_bounded(store: &JobStore) {
    let acme = tenant("acme");
    let config = config();
    let first = store.submit(&acme, new_job("r-1"), &config).await.unwrap();
    assert!(first.created);
    assert_eq!(first.job.state, state::QUEUED);
    let again = store.submit(&acme, new_job("r-1"), &config).await.unwrap();
    assert!(!again.created);
    assert_eq!(again.job.id, first.job.id, "same request_id, same job");
    // Another tenant's request_id is its own.
    let other = store
        .submit(&tenant("globex"), new_job("r-1"), &config)
        .await
        .unwrap();
    assert!(other.created);
    assert_ne!(other.job.id, first.job.id);
    store.submit(&acme, new_job(""), &config).await.unwrap();
    let full = store.submit(&acme, new_job(""), &config).await.unwrap_err();
    assert!(matches!(full, JobsError::Full(3)), "{full}");
    // The retried submit of a known job is still answered when the queue is full.
    let known = store.submit(&acme, new_job("r-1"), &config).await.unwrap();
    assert_eq!(known.job.id, first.job.id);
    // Tenant isolation: the id names nothing for another tenant.
    assert!(
        store
            .get(&tenant("globex"), &first.job.id)
            .await
            .unwrap()
            .is_none()
    );
    assert!(
        store
            .cancel(&tenant("globex"), &first.job.id, &config)
            .await
            .unwrap()
            .is_none()
    );
    // A cancelled job frees its place.
    store.cancel(&acme, &first.job.id, &config).await.unwrap();
    store.submit(&acme, new_job(""), &config).await.unwrap();
}

async fn a_job_runs_once_to_one_terminal_state(store: &JobStore) {
    let acme = tenant("acme");
    let config = config();
    let submitted = store.submit(&acme, new_job(""), &config).await.unwrap();
    let delivery = next(store, "w1").await;
    assert_eq!(delivery.id, submitted.job.id);
    let job = store
        .start(&delivery, "w1", &config)
        .await
        .unwrap()
        .unwrap();
    assert_eq!((job.state, job.attempts), (state::RUNNING, 1));
    assert_eq!(store.pending().await.unwrap(), 1);
    let result = CompleteResponse {
        model: "sim-small".to_string(),
        ..CompleteResponse::default()
    };
    assert!(store.succeed(&delivery, &result, &config).await.unwrap());
    assert_eq!(
        store.pending().await.unwrap(),
        0,
        "acknowledged with the result"
    );
    // Terminal states never change: a late cancel or a second outcome changes nothing.
    let cancelled = store.cancel(&acme, &delivery.id, &config).await.unwrap();
    assert_eq!(cancelled.unwrap().state, state::SUCCEEDED);
    assert!(
        !store
            .fail(&delivery, &JobError::default(), &config)
            .await
            .unwrap()
    );
    let job = store.get(&acme, &delivery.id).await.unwrap().unwrap();
    assert_eq!(job.state, state::SUCCEEDED);
    assert_eq!(job.to_job().result.unwrap().model, "sim-small");
    assert!(job.end_ms > 0);
}

async fn cancel_racing_completion_ends_once(store: &JobStore) {
    let acme = tenant("acme");
    let config = config();
    let submitted = store.submit(&acme, new_job(""), &config).await.unwrap();
    let delivery = next(store, "w1").await;
    store
        .start(&delivery, "w1", &config)
        .await
        .unwrap()
        .unwrap();
    let result = CompleteResponse::default();
    let (cancelled, succeeded) = tokio::join!(
        store.cancel(&acme, &submitted.job.id, &config),
        store.succeed(&delivery, &result, &config)
    );
    let state = cancelled.unwrap().unwrap().state;
    let succeeded = succeeded.unwrap();
    let end = store.get(&acme, &submitted.job.id).await.unwrap().unwrap();
    if succeeded {
        assert_eq!(end.state, state::SUCCEEDED);
    } else {
        assert_eq!((state, end.state), (state::CANCELLED, state::CANCELLED));
    }
    assert_eq!(store.pending().await.unwrap(), 0);
}

async fn a_lost_delivery_is_reclaimed_and_a_poison_job_dead_lettered(store: &JobStore) {
    let acme = tenant("acme");
    let config = config();
    let submitted = store.submit(&acme, new_job(""), &config).await.unwrap();
    // w1 takes the job and dies without a word.
    let lost = next(store, "w1").await;
    store.start(&lost, "w1", &config).await.unwrap().unwrap();
    let reclaimed = store.reclaim("w2", Duration::ZERO, &config).await.unwrap();
    assert_eq!(reclaimed.len(), 1);
    // The lost lease returns the job to QUEUED; the next start counts the next attempt.
    store.lost(&reclaimed[0], "w2").await.unwrap();
    let job = store.get(&acme, &submitted.job.id).await.unwrap().unwrap();
    assert_eq!((job.state, job.attempts), (state::QUEUED, 1));
    let job = store
        .start(&reclaimed[0], "w2", &config)
        .await
        .unwrap()
        .unwrap();
    assert_eq!((job.state, job.attempts), (state::RUNNING, 2));
    // Its second attempt fails retryably: max_deliveries (2) reached, so it is dead-lettered.
    let error = JobError {
        code: 14,
        message: "model down".to_string(),
        reason: "UPSTREAM_UNAVAILABLE".to_string(),
    };
    store
        .retry(&reclaimed[0], &error, Duration::ZERO, &config)
        .await
        .unwrap();
    let job = store.get(&acme, &submitted.job.id).await.unwrap().unwrap();
    assert_eq!(job.state, state::FAILED);
    let error = job.error.unwrap();
    assert_eq!((error.code, error.reason.as_str()), (14, MAX_DELIVERIES));
    assert!(error.message.contains("model down"), "{}", error.message);
    assert_eq!(
        store.dead_letters().await.unwrap(),
        [("acme".to_string(), submitted.job.id.clone())]
    );
    assert_eq!(store.pending().await.unwrap(), 0);
}

async fn a_retried_job_is_queued_again_after_its_backoff(store: &JobStore) {
    let acme = tenant("acme");
    let config = config();
    let submitted = store.submit(&acme, new_job(""), &config).await.unwrap();
    let first = next(store, "w1").await;
    store.start(&first, "w1", &config).await.unwrap().unwrap();
    store
        .retry(&first, &JobError::default(), Duration::ZERO, &config)
        .await
        .unwrap();
    let job = store.get(&acme, &submitted.job.id).await.unwrap().unwrap();
    assert_eq!((job.state, job.attempts), (state::QUEUED, 1));
    assert!(
        store
            .reclaim("w1", Duration::from_secs(60), &config)
            .await
            .unwrap()
            .is_empty()
    );
    let second = next(store, "w1").await;
    assert_eq!(second.id, submitted.job.id);
    assert_ne!(second.entry, first.entry);
    let job = store.start(&second, "w1", &config).await.unwrap().unwrap();
    assert_eq!(job.attempts, 2);
    let error = JobError {
        code: 3,
        ..JobError::default()
    };
    assert!(store.fail(&second, &error, &config).await.unwrap());
    assert_eq!(store.pending().await.unwrap(), 0);
}

async fn lists_are_newest_first_paginated_and_tenant_scoped(store: &JobStore) {
    let acme = tenant("acme");
    let config = JobsConfig {
        capacity: 100,
        ..config()
    };
    let mut ids = Vec::new();
    for _ in 0..5 {
        ids.push(
            store
                .submit(&acme, new_job(""), &config)
                .await
                .unwrap()
                .job
                .id,
        );
    }
    store
        .submit(&tenant("globex"), new_job(""), &config)
        .await
        .unwrap();
    store.cancel(&acme, &ids[1], &config).await.unwrap();
    let query = ListQuery {
        limit: 2,
        ..ListQuery::default()
    };
    let first = store.list(&acme, query).await.unwrap();
    let listed: Vec<&str> = first.jobs.iter().map(|j| j.id.as_str()).collect();
    assert_eq!(listed, [ids[4].as_str(), ids[3].as_str()]);
    let second = store
        .list(
            &acme,
            ListQuery {
                before: first.next,
                ..query
            },
        )
        .await
        .unwrap();
    let listed: Vec<&str> = second.jobs.iter().map(|j| j.id.as_str()).collect();
    assert_eq!(listed, [ids[2].as_str(), ids[1].as_str()]);
    let cancelled = store
        .list(
            &acme,
            ListQuery {
                limit: 10,
                state: state::CANCELLED,
                before: None,
            },
        )
        .await
        .unwrap();
    assert_eq!(cancelled.jobs.len(), 1);
    assert_eq!(cancelled.jobs[0].id, ids[1]);
    assert_eq!(cancelled.next, None);
}

async fn an_unstarted_job_expires(store: &JobStore) {
    let acme = tenant("acme");
    let config = config();
    // Found by a read before any worker: EXPIRED, and its place in the queue is free.
    let mut job = new_job("");
    job.expire_ms = now_ms() - 1;
    let submitted = store.submit(&acme, job, &config).await.unwrap();
    let read = store.fresh(&acme, submitted.job, &config).await.unwrap();
    assert_eq!(read.state, state::EXPIRED);
    let delivery = next(store, "w1").await;
    assert!(
        store
            .start(&delivery, "w1", &config)
            .await
            .unwrap()
            .is_none()
    );
    // Found by a worker first.
    let mut job = new_job("");
    job.expire_ms = now_ms() - 1;
    let submitted = store.submit(&acme, job, &config).await.unwrap();
    let delivery = next(store, "w1").await;
    assert!(
        store
            .start(&delivery, "w1", &config)
            .await
            .unwrap()
            .is_none()
    );
    let job = store.get(&acme, &submitted.job.id).await.unwrap().unwrap();
    assert_eq!(job.state, state::EXPIRED);
    assert_eq!(store.pending().await.unwrap(), 0);
}

/// Runs `suite` on a fresh store of each kind.
/// The callback outbox: an entry only once the result is stored (in the same transition), a
/// claim is a lease (a dispatcher that dies leaves the entry due again), and only a recorded
/// final outcome removes it.
async fn the_callback_outbox_survives_a_dispatcher_crash(store: &JobStore) {
    let acme = tenant("acme");
    let config = config();
    let lease = Duration::from_millis(200);
    let mut with_callback = new_job("");
    with_callback.body.callback = Some(weir_proto::router::Callback {
        url: "https://example.com/hook".to_string(),
    });
    let submitted = store.submit(&acme, with_callback, &config).await.unwrap();
    let id = submitted.job.id;
    // A job without a callback never enters the outbox.
    store.submit(&acme, new_job(""), &config).await.unwrap();
    let delivery = next(store, "w1").await;
    store
        .start(&delivery, "w1", &config)
        .await
        .unwrap()
        .unwrap();
    assert!(store.claim_callbacks(lease, 10).await.unwrap().is_empty());
    let result = CompleteResponse {
        model: "sim-small".to_string(),
        ..CompleteResponse::default()
    };
    assert!(store.succeed(&delivery, &result, &config).await.unwrap());
    let other = next(store, "w1").await;
    store.start(&other, "w1", &config).await.unwrap().unwrap();
    store.succeed(&other, &result, &config).await.unwrap();

    let claimed = store.claim_callbacks(lease, 10).await.unwrap();
    assert_eq!(claimed, [(acme.clone(), id.clone())]);
    // Leased: no other dispatcher gets it meanwhile.
    assert!(store.claim_callbacks(lease, 10).await.unwrap().is_empty());
    // The dispatcher "dies" (records nothing): after the lease the entry is due again.
    tokio::time::sleep(lease + Duration::from_millis(50)).await;
    let claimed = store.claim_callbacks(lease, 10).await.unwrap();
    assert_eq!(claimed, [(acme.clone(), id.clone())]);
    // A failed attempt is due again at its retry time.
    let due = now_ms() + 50;
    store
        .callback_outcome(&acme, &id, callbacks::Outcome::Retry(due))
        .await
        .unwrap();
    assert!(store.claim_callbacks(lease, 10).await.unwrap().is_empty());
    tokio::time::sleep(Duration::from_millis(80)).await;
    assert_eq!(store.claim_callbacks(lease, 10).await.unwrap().len(), 1);
    store
        .callback_outcome(&acme, &id, callbacks::Outcome::Delivered)
        .await
        .unwrap();
    let job = store.get(&acme, &id).await.unwrap().unwrap();
    assert_eq!(job.callback_attempts, 2);
    assert!(job.to_job().callback_delivered);
    tokio::time::sleep(lease + Duration::from_millis(50)).await;
    assert!(store.claim_callbacks(lease, 10).await.unwrap().is_empty());
}

fn batch_config(concurrency: u32) -> JobsConfig {
    let mut config = config();
    config.batches.concurrency = concurrency;
    config.batches.capacity = 20;
    config
}

fn new_batch(
    request_id: &str,
    items: usize,
    expire_in: Duration,
    not_before_ms: i64,
) -> batch::NewBatch {
    let id = format!("batch-{}", uuid::Uuid::new_v4().simple());
    batch::NewBatch {
        items: (0..items)
            .map(|n| Job {
                id: batch::item_job_id(&id, n),
                request: Some(CompleteRequest {
                    model: "sim-small".to_string(),
                    ..CompleteRequest::default()
                }),
                batch_id: id.clone(),
                custom_id: format!("item-{n}"),
                ..Job::default()
            })
            .collect(),
        id,
        request_id: request_id.to_string(),
        body: weir_proto::router::Batch::default(),
        expire_ms: now_ms() + i64::try_from(expire_in.as_millis()).unwrap(),
        not_before_ms,
    }
}

/// Every delivery available now (none left when it returns).
async fn drain(store: &JobStore, consumer: &str) -> Vec<Delivery> {
    let mut all = Vec::new();
    loop {
        let got = store
            .next(consumer, Duration::from_millis(50))
            .await
            .unwrap();
        if got.is_empty() {
            return all;
        }
        all.extend(got);
    }
}

async fn all_results(store: &JobStore, tenant: &Tenant, id: &str) -> Vec<JobRecord> {
    let mut from = 0;
    let mut jobs = Vec::new();
    loop {
        let page = store.batch_results(tenant, id, from, 2).await.unwrap();
        if page.next == from {
            return jobs;
        }
        from = page.next;
        jobs.extend(page.jobs);
    }
}

fn answer() -> CompleteResponse {
    CompleteResponse {
        model: "sim-ok".to_string(),
        ..CompleteResponse::default()
    }
}

async fn a_batch_runs_every_item_once_within_its_concurrency(store: &JobStore) {
    let acme = tenant("acme");
    let config = batch_config(2);
    let created = store
        .create_batch(
            &acme,
            new_batch("b-1", 5, Duration::from_secs(60), 0),
            &config,
        )
        .await
        .unwrap();
    assert!(created.created);
    let batch = created.batch;
    assert_eq!((batch.state, batch.total), (batch::state::IN_PROGRESS, 5));
    // A retried create returns the same batch and queues nothing more.
    let again = store
        .create_batch(
            &acme,
            new_batch("b-1", 5, Duration::from_secs(60), 0),
            &config,
        )
        .await
        .unwrap();
    assert!(!again.created);
    assert_eq!(again.batch.id, batch.id);
    let mut seen = std::collections::HashSet::new();
    loop {
        let deliveries = drain(store, "w1").await;
        if deliveries.is_empty() {
            break;
        }
        // Never more than the batch's concurrency on the queue at once.
        assert!(deliveries.len() <= 2, "{} deliveries", deliveries.len());
        assert!(deliveries.iter().all(|d| d.queue == Queue::Batch));
        for delivery in deliveries {
            let job = store
                .start(&delivery, "w1", &config)
                .await
                .unwrap()
                .unwrap();
            assert_eq!(job.body.batch_id, batch.id);
            assert!(seen.insert(job.body.custom_id.clone()), "ran twice");
            assert!(store.succeed(&delivery, &answer(), &config).await.unwrap());
        }
    }
    assert_eq!(seen.len(), 5);
    let ended = store.get_batch(&acme, &batch.id).await.unwrap().unwrap();
    assert_eq!(ended.state, batch::state::COMPLETED);
    let counts = ended.to_batch().counts.unwrap();
    assert_eq!((counts.succeeded, counts.pending), (5, 0));
    let results = all_results(store, &acme, &batch.id).await;
    let ids: std::collections::HashSet<_> =
        results.iter().map(|j| j.body.custom_id.clone()).collect();
    assert_eq!((results.len(), ids.len()), (5, 5), "each item exactly once");
    assert!(
        results
            .iter()
            .all(|j| j.result.as_ref().is_some_and(|r| r.model == "sim-ok"))
    );
    assert_eq!(store.pending().await.unwrap(), 0);
    // Listed, newest first, paginated; another tenant does not see it.
    let second = store
        .create_batch(&acme, new_batch("", 1, Duration::from_secs(60), 0), &config)
        .await
        .unwrap()
        .batch;
    let page = store.list_batches(&acme, 1, None).await.unwrap();
    assert_eq!(page.batches[0].id, second.id);
    let rest = store.list_batches(&acme, 5, page.next).await.unwrap();
    assert_eq!(rest.batches.len(), 1);
    assert_eq!(rest.batches[0].id, batch.id);
    assert_eq!(rest.next, None);
    let globex = tenant("globex");
    assert!(
        store
            .list_batches(&globex, 5, None)
            .await
            .unwrap()
            .batches
            .is_empty()
    );
    assert!(store.get_batch(&globex, &batch.id).await.unwrap().is_none());
    // A full queue refuses a batch it cannot hold (one item of `second` is open).
    let full = store
        .create_batch(
            &acme,
            new_batch("", 20, Duration::from_secs(60), 0),
            &config,
        )
        .await;
    assert!(matches!(full, Err(JobsError::BatchesFull(20))), "{full:?}");
}

async fn a_cancelled_batch_lets_running_items_finish(store: &JobStore) {
    let acme = tenant("acme");
    let config = batch_config(2);
    let batch = store
        .create_batch(&acme, new_batch("", 4, Duration::from_secs(60), 0), &config)
        .await
        .unwrap()
        .batch;
    let deliveries = drain(store, "w1").await;
    assert_eq!(deliveries.len(), 2);
    let running = &deliveries[0];
    store.start(running, "w1", &config).await.unwrap().unwrap();
    let cancelled = store
        .cancel_batch(&acme, &batch.id, &config)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(cancelled.state, batch::state::CANCELLING);
    // The queued item and the two never queued ended; the running one may finish.
    assert_eq!(cancelled.cancelled, 3);
    assert!(
        store
            .start(&deliveries[1], "w1", &config)
            .await
            .unwrap()
            .is_none()
    );
    assert!(store.succeed(running, &answer(), &config).await.unwrap());
    let ended = store.get_batch(&acme, &batch.id).await.unwrap().unwrap();
    assert_eq!(ended.state, batch::state::CANCELLED);
    assert_eq!((ended.succeeded, ended.cancelled), (1, 3));
    let results = all_results(store, &acme, &batch.id).await;
    assert_eq!(results.len(), 4);
    let reasons: Vec<_> = results
        .iter()
        .filter_map(|j| j.error.as_ref().map(|e| e.reason.clone()))
        .collect();
    assert_eq!(reasons, vec![batch::BATCH_CANCELLED.to_string(); 3]);
    assert!(drain(store, "w1").await.is_empty(), "nothing more runs");
    assert_eq!(store.pending().await.unwrap(), 0);
    // Cancelling again changes nothing.
    let again = store
        .cancel_batch(&acme, &batch.id, &config)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(again.state, batch::state::CANCELLED);
}

async fn an_expired_batch_keeps_its_results(store: &JobStore) {
    let acme = tenant("acme");
    let config = batch_config(1);
    let batch = store
        .create_batch(
            &acme,
            new_batch("", 3, Duration::from_millis(300), 0),
            &config,
        )
        .await
        .unwrap()
        .batch;
    let first = drain(store, "w1").await;
    assert_eq!(first.len(), 1);
    store
        .start(&first[0], "w1", &config)
        .await
        .unwrap()
        .unwrap();
    store.succeed(&first[0], &answer(), &config).await.unwrap();
    let second = drain(store, "w1").await;
    store
        .start(&second[0], "w1", &config)
        .await
        .unwrap()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(350)).await;
    // The janitor's round expires it: the running item too, and the one never queued.
    store
        .reclaim("w1", Duration::from_secs(60), &config)
        .await
        .unwrap();
    let ended = store.get_batch(&acme, &batch.id).await.unwrap().unwrap();
    assert_eq!(ended.state, batch::state::EXPIRED);
    assert_eq!((ended.succeeded, ended.cancelled), (1, 2));
    // The late answer of the running item is not stored.
    assert!(!store.succeed(&second[0], &answer(), &config).await.unwrap());
    let results = all_results(store, &acme, &batch.id).await;
    assert_eq!(results.len(), 3);
    assert_eq!(results[0].state, state::SUCCEEDED);
    assert!(results[1..].iter().all(|j| {
        j.state == state::EXPIRED
            && j.error
                .as_ref()
                .is_some_and(|e| e.reason == batch::BATCH_EXPIRED)
    }));
    assert_eq!(store.pending().await.unwrap(), 0);
}

async fn a_batch_waits_for_its_not_before_time(store: &JobStore) {
    let acme = tenant("acme");
    let config = batch_config(8);
    let batch = store
        .create_batch(
            &acme,
            new_batch("", 2, Duration::from_secs(60), now_ms() + 300),
            &config,
        )
        .await
        .unwrap()
        .batch;
    assert!(
        drain(store, "w1").await.is_empty(),
        "nothing before not_before"
    );
    store
        .reclaim("w1", Duration::from_secs(60), &config)
        .await
        .unwrap();
    assert!(drain(store, "w1").await.is_empty());
    tokio::time::sleep(Duration::from_millis(350)).await;
    store
        .reclaim("w1", Duration::from_secs(60), &config)
        .await
        .unwrap();
    let deliveries = drain(store, "w1").await;
    assert_eq!(deliveries.len(), 2);
    // An item whose worker died is reclaimed like any job.
    store
        .start(&deliveries[0], "w1", &config)
        .await
        .unwrap()
        .unwrap();
    let reclaimed = store.reclaim("w2", Duration::ZERO, &config).await.unwrap();
    assert_eq!(reclaimed.len(), 2);
    for delivery in &reclaimed {
        store.lost(delivery, "w2").await.unwrap();
        store.start(delivery, "w2", &config).await.unwrap().unwrap();
        store.succeed(delivery, &answer(), &config).await.unwrap();
    }
    let ended = store.get_batch(&acme, &batch.id).await.unwrap().unwrap();
    assert_eq!((ended.state, ended.succeeded), (batch::state::COMPLETED, 2));
    assert_eq!(store.pending().await.unwrap(), 0);
}

fn file(id: &str, created_ms: i64, ttl_ms: i64) -> files::StoredFile {
    files::StoredFile {
        meta: files::FileMeta {
            id: id.to_string(),
            filename: "in.jsonl".to_string(),
            purpose: "batch".to_string(),
            bytes: 3,
            created_ms,
            expires_ms: now_ms() + ttl_ms,
        },
        content: b"a\nb".to_vec(),
    }
}

async fn files_are_kept_per_tenant_until_deleted_or_expired(store: &JobStore) {
    let (acme, globex) = (tenant("acme"), tenant("globex"));
    let now = now_ms();
    store
        .put_file(&acme, file("file-1", now - 2, 60_000))
        .await
        .unwrap();
    store
        .put_file(&acme, file("file-2", now - 1, 60_000))
        .await
        .unwrap();
    store
        .put_file(&acme, file("file-short", now, 300))
        .await
        .unwrap();
    let got = store.get_file(&acme, "file-1").await.unwrap().unwrap();
    assert_eq!(
        got,
        file("file-1", now - 2, 60_000).with_expiry(got.meta.expires_ms)
    );
    assert_eq!(got.content, b"a\nb");
    let ids = |list: Vec<files::FileMeta>| list.into_iter().map(|f| f.id).collect::<Vec<_>>();
    assert_eq!(
        ids(store.list_files(&acme).await.unwrap()),
        ["file-short", "file-2", "file-1"],
        "newest first"
    );
    // Another tenant's id names nothing.
    assert!(store.get_file(&globex, "file-1").await.unwrap().is_none());
    assert!(!store.delete_file(&globex, "file-1").await.unwrap());
    assert!(store.list_files(&globex).await.unwrap().is_empty());
    // Deleted.
    assert!(store.delete_file(&acme, "file-1").await.unwrap());
    assert!(!store.delete_file(&acme, "file-1").await.unwrap());
    assert!(store.get_file(&acme, "file-1").await.unwrap().is_none());
    // Expired.
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(store.get_file(&acme, "file-short").await.unwrap().is_none());
    assert_eq!(ids(store.list_files(&acme).await.unwrap()), ["file-2"]);
}

impl files::StoredFile {
    fn with_expiry(mut self, expires_ms: i64) -> Self {
        self.meta.expires_ms = expires_ms;
        self
    }
}

macro_rules! both_stores {
    ($($suite:ident),* $(,)?) => {
        mod memory_store {
            $(
                #[tokio::test]
                async fn $suite() {
                    super::$suite(&super::JobStore::Memory(super::MemoryJobs::default())).await;
                }
            )*
        }
        mod redis_store {
            $(
                #[tokio::test]
                async fn $suite() {
                    let (store, prefix) = super::redis_store().await;
                    // Run apart, so the keys are deleted even when the suite fails.
                    let outcome = tokio::spawn(async move { super::$suite(&store).await }).await;
                    super::delete_prefix(&prefix).await;
                    if let Err(failure) = outcome {
                        std::panic::resume_unwind(failure.into_panic());
                    }
                }
            )*
        }
    };
}

both_stores!(
    submit_is_idempotent_and_bounded,
    a_job_runs_once_to_one_terminal_state,
    cancel_racing_completion_ends_once,
    a_lost_delivery_is_reclaimed_and_a_poison_job_dead_lettered,
    a_retried_job_is_queued_again_after_its_backoff,
    lists_are_newest_first_paginated_and_tenant_scoped,
    an_unstarted_job_expires,
    the_callback_outbox_survives_a_dispatcher_crash,
    a_batch_runs_every_item_once_within_its_concurrency,
    a_cancelled_batch_lets_running_items_finish,
    an_expired_batch_keeps_its_results,
    a_batch_waits_for_its_not_before_time,
    files_are_kept_per_tenant_until_deleted_or_expired,
);

fn redis_url() -> String {
    std::env::var("WEIR_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_string())
}

async fn redis_store() -> (JobStore, String) {
    let prefix = format!("weirtest-jobs-{}", uuid::Uuid::new_v4().simple());
    let store = RedisJobs::lazy(&redis_url(), &prefix).unwrap();
    (JobStore::Redis(store), prefix)
}

async fn delete_prefix(prefix: &str) {
    let mut conn = weir_mesh::store::connect(&redis_url()).await.unwrap();
    let keys = weir_mesh::store::keys_matching(&mut conn, &format!("{prefix}:*"))
        .await
        .unwrap();
    for key in keys {
        let _: () = ::redis::cmd("DEL")
            .arg(key)
            .query_async(&mut conn)
            .await
            .unwrap();
    }
}
