//! Batches end to end: the whole stack in this process (`weir up`, with API keys and budgets),
//! the job queue and the budgets on a real Redis (`WEIR_TEST_REDIS_URL`) under a unique key
//! prefix deleted after each test, and the router's own workers running the items through its
//! `Complete` at SHEDDABLE, priced at the batch tier.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    collections::HashSet,
    time::{Duration, Instant},
};

use tokio_stream::StreamExt;
use tonic::Code;
use weir_proto::router::{
    Batch, BatchItem, BatchState, CancelBatchRequest, CreateBatchRequest, GetBatchRequest,
    JobState, ListJobsRequest, StreamBatchResultsRequest, StreamBatchResultsResponse,
    stream_batch_results_response::Outcome,
};
use weir_tests::{
    Mesh, complete, delete_prefix, percentile, reason, redis_url, unique_prefix, with_key,
};

const ACME: &str = "acme-key-0123456789";
const GLOBEX: &str = "globex-key-0123456789";

/// One micro-USD per token at the standard tier, half that at the batch tier.
const PRICE: &str = "price = { input_micros_per_mtok = 1000000, output_micros_per_mtok = 1000000, \
                     batch_input_micros_per_mtok = 500000, batch_output_micros_per_mtok = 500000 }";

fn config(prefix: &str, jobs: &str) -> String {
    format!(
        r#"
[models.sim-instant]
sim = {{ output_tokens = 4 }}
{PRICE}
[models.sim-slow]
sim = {{ output_tokens = 10, tokens_per_second = 10.0 }}
{PRICE}

[[auth.api_keys]]
tenant = "acme"
key = "{ACME}"
[[auth.api_keys]]
tenant = "globex"
key = "{GLOBEX}"

[router]
budget_url = "http://127.0.0.1:50054"   # replaced by the budget service started with it
session_url = ""
[router.rate_limit]
enabled = false
[router.idempotency]
redis_url = "{redis}"
key_prefix = "{prefix}"
[router.jobs]
redis_url = "{redis}"
key_prefix = "{prefix}"
backoff = "20ms"
max_backoff = "50ms"
{jobs}

[budget]
redis_url = "{redis}"
key_prefix = "{prefix}"
"#,
        redis = redis_url(),
    )
}

fn items(model: &str, count: usize) -> Vec<BatchItem> {
    (0..count)
        .map(|n| BatchItem {
            custom_id: format!("req-{n:04}"),
            request: Some(complete(model, &format!("question {n}"))),
        })
        .collect()
}

fn create(model: &str, count: usize) -> CreateBatchRequest {
    CreateBatchRequest {
        items: items(model, count),
        ..CreateBatchRequest::default()
    }
}

async fn get(mesh: &Mesh, key: &str, id: &str) -> Result<Batch, tonic::Status> {
    let request = GetBatchRequest {
        batch_id: id.to_string(),
    };
    Ok(mesh
        .router()
        .get_batch(with_key(request, key))
        .await?
        .into_inner()
        .batch
        .unwrap())
}

/// Every result of the batch, following it until it ends.
async fn follow(mesh: &Mesh, key: &str, id: &str) -> Vec<StreamBatchResultsResponse> {
    let request = StreamBatchResultsRequest {
        batch_id: id.to_string(),
        follow: true,
    };
    let mut stream = mesh
        .router()
        .stream_batch_results(with_key(request, key))
        .await
        .unwrap()
        .into_inner();
    let mut results = Vec::new();
    let read = async {
        while let Some(result) = stream.next().await {
            results.push(result.unwrap());
        }
    };
    tokio::time::timeout(Duration::from_secs(120), read)
        .await
        .expect("the batch ended within two minutes");
    results
}

async fn spent(mesh: &Mesh) -> i64 {
    weir_tests::tenant_spend(mesh, ACME).await
}

#[tokio::test]
async fn a_thousand_items_each_run_once_and_are_paid_at_the_batch_tier() {
    let prefix = unique_prefix();
    let mesh = Mesh::start(&config(&prefix, "workers = 4")).await;
    let mut request = create("sim-instant", 1000);
    request.request_id = "nightly-1".to_string();
    let batch = mesh
        .router()
        .create_batch(with_key(request.clone(), ACME))
        .await
        .unwrap()
        .into_inner()
        .batch
        .unwrap();
    assert_eq!(batch.state, BatchState::InProgress as i32);
    assert_eq!(batch.counts.as_ref().unwrap().total, 1000);
    assert!(batch.expire_time.is_some());
    // A retried create returns the same batch.
    let again = mesh
        .router()
        .create_batch(with_key(request, ACME))
        .await
        .unwrap()
        .into_inner()
        .batch
        .unwrap();
    assert_eq!(again.id, batch.id);
    // Another tenant does not see it.
    let status = get(&mesh, GLOBEX, &batch.id).await.unwrap_err();
    assert_eq!(status.code(), Code::NotFound, "{status:?}");

    let results = follow(&mesh, ACME, &batch.id).await;
    assert_eq!(results.len(), 1000);
    let ids: HashSet<&str> = results.iter().map(|r| r.custom_id.as_str()).collect();
    let expected: HashSet<String> = (0..1000).map(|n| format!("req-{n:04}")).collect();
    assert_eq!(
        ids,
        expected.iter().map(String::as_str).collect(),
        "every custom_id exactly once"
    );
    let mut charged = 0;
    for result in &results {
        assert_eq!(result.state, JobState::Succeeded as i32, "{result:?}");
        let Some(Outcome::Response(response)) = &result.outcome else {
            panic!("no answer: {result:?}");
        };
        let usage = response.usage.unwrap();
        let tokens = usage.input_tokens + usage.output_tokens;
        // Half price, rounded up once per request.
        assert_eq!(
            response.cost_micros,
            (tokens + 1) / 2,
            "batch tier: {usage:?}"
        );
        charged += response.cost_micros;
    }
    let done = get(&mesh, ACME, &batch.id).await.unwrap();
    assert_eq!(done.state, BatchState::Completed as i32);
    let counts = done.counts.unwrap();
    assert_eq!(
        (
            counts.total,
            counts.succeeded,
            counts.failed,
            counts.cancelled,
            counts.pending
        ),
        (1000, 1000, 0, 0, 0),
        "counts add up"
    );
    assert!(done.end_time.is_some());
    // What the budget recorded is what the answers say they cost.
    assert!(
        weir_tests::eventually(Duration::from_secs(5), || async {
            spent(&mesh).await == charged
        })
        .await,
        "recorded {} != charged {charged}",
        spent(&mesh).await
    );
    // The same request, synchronously, pays the standard price.
    let sync = mesh
        .router()
        .complete(with_key(complete("sim-instant", "question 0"), ACME))
        .await
        .unwrap()
        .into_inner();
    let usage = sync.usage.unwrap();
    assert_eq!(sync.cost_micros, usage.input_tokens + usage.output_tokens);
    // ListJobs shows the batch's jobs.
    let page = mesh
        .router()
        .list_jobs(with_key(
            ListJobsRequest {
                batch_id: batch.id.clone(),
                page_size: 10,
                ..ListJobsRequest::default()
            },
            ACME,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(page.jobs.len(), 10);
    assert!(page.jobs.iter().all(|j| j.batch_id == batch.id));
    assert!(!page.next_page_token.is_empty());
    mesh.stop().await;
    delete_prefix(&prefix).await;
}

#[tokio::test]
async fn a_bad_batch_is_refused_whole_with_the_item_named() {
    let prefix = unique_prefix();
    let mesh = Mesh::start(&config(&prefix, "workers = 0")).await;
    let mut router = mesh.router();

    let mut duplicate = create("sim-instant", 3);
    duplicate.items[2].custom_id = "req-0000".to_string();
    let status = router
        .create_batch(with_key(duplicate, ACME))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(
        status.message().contains("items[2].custom_id"),
        "{status:?}"
    );
    assert!(status.message().contains("items[0]"), "{status:?}");

    let mut unknown = create("sim-instant", 3);
    unknown.items[1].request.as_mut().unwrap().model = "gpt-9".to_string();
    let status = router
        .create_batch(with_key(unknown, ACME))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("items[1].request"), "{status:?}");

    let status = router
        .create_batch(with_key(CreateBatchRequest::default(), ACME))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");

    let mut window = create("sim-instant", 1);
    window.completion_window = Some(prost_types::Duration {
        seconds: 30 * 24 * 3600,
        nanos: 0,
    });
    let status = router
        .create_batch(with_key(window, ACME))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("completion_window"), "{status:?}");

    let mut hooked = create("sim-instant", 1);
    hooked.callback = Some(weir_proto::router::Callback {
        url: "https://example.com/hook".to_string(),
    });
    let status = router
        .create_batch(with_key(hooked, ACME))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unimplemented, "{status:?}");
    assert_eq!(reason(&status), "BATCH_CALLBACKS_UNSUPPORTED");
    mesh.stop().await;
    delete_prefix(&prefix).await;
}

#[tokio::test]
async fn a_cancelled_batch_keeps_finished_results_and_ends_the_rest() {
    let prefix = unique_prefix();
    let mesh = Mesh::start(&config(
        &prefix,
        "workers = 2\n[router.jobs.batches]\nconcurrency = 2",
    ))
    .await;
    let batch = mesh
        .router()
        .create_batch(with_key(create("sim-slow", 10), ACME))
        .await
        .unwrap()
        .into_inner()
        .batch
        .unwrap();
    // Once some items have finished, cancel.
    assert!(
        weir_tests::eventually(Duration::from_secs(20), || async {
            get(&mesh, ACME, &batch.id)
                .await
                .is_ok_and(|b| b.counts.unwrap().succeeded >= 1)
        })
        .await
    );
    let cancelled = mesh
        .router()
        .cancel_batch(with_key(
            CancelBatchRequest {
                batch_id: batch.id.clone(),
            },
            ACME,
        ))
        .await
        .unwrap()
        .into_inner()
        .batch
        .unwrap();
    assert!(
        [BatchState::Cancelling as i32, BatchState::Cancelled as i32].contains(&cancelled.state),
        "{cancelled:?}"
    );
    let results = follow(&mesh, ACME, &batch.id).await;
    assert_eq!(results.len(), 10, "every item has one result");
    let succeeded = results
        .iter()
        .filter(|r| r.state == JobState::Succeeded as i32)
        .count();
    let cancelled_items: Vec<_> = results
        .iter()
        .filter(|r| r.state == JobState::Cancelled as i32)
        .collect();
    assert!(succeeded >= 1);
    assert_eq!(succeeded + cancelled_items.len(), 10, "{results:?}");
    assert!(cancelled_items.iter().all(|r| matches!(
        &r.outcome,
        Some(Outcome::Error(e)) if e.reason == "BATCH_CANCELLED"
    )));
    let done = get(&mesh, ACME, &batch.id).await.unwrap();
    assert_eq!(done.state, BatchState::Cancelled as i32);
    let counts = done.counts.unwrap();
    assert_eq!(
        (counts.succeeded as usize, counts.cancelled as usize),
        (succeeded, cancelled_items.len())
    );
    mesh.stop().await;
    delete_prefix(&prefix).await;
}

#[tokio::test]
async fn a_batch_starts_at_its_not_before_time_and_expires_at_its_window() {
    let prefix = unique_prefix();
    let mesh = Mesh::start(&config(
        &prefix,
        "workers = 1\n[router.jobs.batches]\nconcurrency = 1",
    ))
    .await;
    let not_before = std::time::SystemTime::now() + Duration::from_millis(1500);
    let since_epoch = not_before.duration_since(std::time::UNIX_EPOCH).unwrap();
    let mut request = create("sim-slow", 5);
    request.not_before = Some(prost_types::Timestamp {
        seconds: i64::try_from(since_epoch.as_secs()).unwrap(),
        nanos: i32::try_from(since_epoch.subsec_nanos()).unwrap(),
    });
    // Each item takes about a second: the window (from not_before) closes before the last.
    request.completion_window = Some(prost_types::Duration {
        seconds: 2,
        nanos: 500_000_000,
    });
    let batch = mesh
        .router()
        .create_batch(with_key(request, ACME))
        .await
        .unwrap()
        .into_inner()
        .batch
        .unwrap();
    assert!(batch.not_before.is_some());
    let waiting = get(&mesh, ACME, &batch.id).await.unwrap();
    assert_eq!(waiting.counts.unwrap().pending, 5);
    let results = follow(&mesh, ACME, &batch.id).await;
    assert_eq!(results.len(), 5);
    let done = get(&mesh, ACME, &batch.id).await.unwrap();
    assert_eq!(done.state, BatchState::Expired as i32, "{done:?}");
    let counts = done.counts.unwrap();
    assert!(counts.succeeded >= 1 && counts.cancelled >= 1, "{counts:?}");
    assert_eq!(counts.succeeded + counts.cancelled, 5);
    // The finished results are kept; the rest expired.
    for result in &results {
        match &result.outcome {
            Some(Outcome::Response(_)) => assert_eq!(result.state, JobState::Succeeded as i32),
            Some(Outcome::Error(error)) => {
                assert_eq!(result.state, JobState::Expired as i32);
                assert_eq!(error.reason, "BATCH_EXPIRED");
            }
            None => panic!("no outcome: {result:?}"),
        }
    }
    // No item started before not_before.
    let page = mesh
        .router()
        .list_jobs(with_key(
            ListJobsRequest {
                batch_id: batch.id.clone(),
                ..ListJobsRequest::default()
            },
            ACME,
        ))
        .await
        .unwrap()
        .into_inner();
    for job in page.jobs.iter().filter(|j| j.start_time.is_some()) {
        let start = job.start_time.unwrap();
        let start = Duration::new(
            u64::try_from(start.seconds).unwrap(),
            u32::try_from(start.nanos).unwrap(),
        );
        assert!(start >= since_epoch, "{job:?} started before not_before");
    }
    mesh.stop().await;
    delete_prefix(&prefix).await;
}

/// The router admits 8 requests at once; SHEDDABLE (batch items) may use half. Twenty-four workers
/// would take every slot if admission did not put interactive traffic first.
fn busy_config(prefix: &str) -> String {
    config(prefix, "workers = 24").replace(
        "[router.rate_limit]",
        "[models.work]\nsim = { time_to_first_token = \"100ms\", output_tokens = 4 }\n\
         price = { input_micros_per_mtok = 1000000, output_micros_per_mtok = 1000000 }\n\
         [server.admission]\nalgorithm = \"static\"\ninitial_limit = 8\nmin_limit = 1\n\n[router.rate_limit]",
    )
}

/// Sequential CRITICAL calls by `callers` callers for `period`: (ok, refused, latencies).
async fn critical_load(
    mesh: &Mesh,
    callers: usize,
    period: Duration,
) -> (usize, usize, Vec<Duration>) {
    let until = Instant::now() + period;
    let tasks: Vec<_> = (0..callers)
        .map(|_| {
            let mut router = mesh.router();
            tokio::spawn(async move {
                let (mut ok, mut refused, mut latencies) = (0, 0, Vec::new());
                while Instant::now() < until {
                    let mut request = with_key(complete("work", "interactive"), ACME);
                    request
                        .metadata_mut()
                        .insert("weir-criticality", "CRITICAL".parse().unwrap());
                    let start = Instant::now();
                    match router.complete(request).await {
                        Ok(_) => {
                            ok += 1;
                            latencies.push(start.elapsed());
                        }
                        Err(_) => refused += 1,
                    }
                }
                (ok, refused, latencies)
            })
        })
        .collect();
    let mut total = (0, 0, Vec::new());
    for task in tasks {
        let (ok, refused, latencies) = task.await.unwrap();
        total.0 += ok;
        total.1 += refused;
        total.2.extend(latencies);
    }
    total.2.sort();
    total
}

#[tokio::test]
async fn critical_traffic_is_served_first_while_a_batch_runs() {
    let prefix = unique_prefix();
    let mesh = Mesh::start(&busy_config(&prefix)).await;
    let (_, _, alone) = critical_load(&mesh, 4, Duration::from_millis(800)).await;

    let batch = mesh
        .router()
        .create_batch(with_key(create("work", 200), ACME))
        .await
        .unwrap()
        .into_inner()
        .batch
        .unwrap();
    // Let the batch take every slot it may.
    assert!(
        weir_tests::eventually(Duration::from_secs(10), || async {
            get(&mesh, ACME, &batch.id)
                .await
                .is_ok_and(|b| b.counts.unwrap().succeeded >= 4)
        })
        .await
    );
    let (ok, refused, during) = critical_load(&mesh, 4, Duration::from_secs(2)).await;
    let running = get(&mesh, ACME, &batch.id).await.unwrap();
    assert_eq!(
        running.state,
        BatchState::InProgress as i32,
        "the batch was still running while CRITICAL traffic was measured"
    );
    println!(
        "CRITICAL alone: p50 {:?} p99 {:?}; while the batch runs: p50 {:?} p99 {:?} ({ok} ok, {refused} refused)",
        percentile(&alone, 0.5),
        percentile(&alone, 0.99),
        percentile(&during, 0.5),
        percentile(&during, 0.99),
    );
    // Twenty-four workers would fill all 8 slots (run at CRITICAL, they got 137 of 202 CRITICAL
    // calls refused); admission keeps SHEDDABLE batch items to their share (4 slots), so every
    // CRITICAL call is admitted.
    assert_eq!(refused, 0, "CRITICAL calls were refused while a batch ran");
    assert!(ok > 0);
    // Shed is not lost: the batch still completes.
    let results = follow(&mesh, ACME, &batch.id).await;
    assert_eq!(results.len(), 200);
    assert!(
        results
            .iter()
            .all(|r| r.state == JobState::Succeeded as i32)
    );
    mesh.stop().await;
    delete_prefix(&prefix).await;
}

/// Dev mode (no keys): the whole mesh is the default tenant, whose schedule this is.
fn scheduled_config(prefix: &str, input: &std::path::Path) -> String {
    format!(
        r#"
[models.sim-instant]
sim = {{ output_tokens = 4 }}

[router]
session_url = ""
[router.rate_limit]
enabled = false
[router.jobs]
redis_url = "{redis}"
key_prefix = "{prefix}"
workers = 1

[[router.jobs.schedules]]
name = "every-two-seconds"
cron = "*/2 * * * * *"
tenant = "{tenant}"
input = "{input}"
catch_up = "1s"
labels = {{ team = "search" }}
"#,
        redis = redis_url(),
        tenant = weir_mesh::tenant::DEFAULT_TENANT,
        input = input.display(),
    )
}

#[tokio::test]
async fn a_schedule_creates_one_batch_per_run_from_two_processes() {
    let prefix = unique_prefix();
    let dir = std::env::temp_dir().join(format!("weir-schedule-{prefix}"));
    std::fs::create_dir_all(&dir).unwrap();
    let input = dir.join("nightly.jsonl");
    let line = |id: &str| {
        format!(
            r#"{{"custom_id":"{id}","method":"POST","url":"/v1/chat/completions","body":{{"model":"sim-instant","messages":[{{"role":"user","content":"digest {id}"}}]}}}}"#
        )
    };
    std::fs::write(&input, format!("{}\n{}\n", line("a"), line("b"))).unwrap();
    let config = scheduled_config(&prefix, &input);
    let mesh = Mesh::start(&config).await;
    // A second process's schedulers: the same schedules, their own workers, the same router.
    let parsed =
        weir::stack::StackConfig::from_source(&weir_mesh::config::Source::from_toml(&config))
            .unwrap();
    let jobs = weir_router::jobs::api::Jobs::new(
        weir_router::jobs::JobStore::from_config(&parsed.router.jobs, "router.jobs")
            .unwrap()
            .unwrap(),
        parsed.router.jobs.clone(),
    );
    let shutdown = tokio_util::sync::CancellationToken::new();
    let second = weir_router::jobs::worker::spawn(
        &jobs,
        1,
        &mesh.url(weir::stack::Service::Router),
        weir_mesh::identity::MeshIdentity::disabled(),
        shutdown.clone(),
    )
    .unwrap();

    // Five seconds: two or three runs, each fired by both processes.
    tokio::time::sleep(Duration::from_millis(5200)).await;
    shutdown.cancel();
    for handle in second {
        let _ = handle.await;
    }
    let listed = mesh
        .router()
        .list_batches(weir_proto::router::ListBatchesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .batches;
    let runs: Vec<&str> = listed
        .iter()
        .map(|b| b.labels["schedule_run"].as_str())
        .collect();
    let distinct: HashSet<&str> = runs.iter().copied().collect();
    assert!(runs.len() >= 2, "runs: {runs:?}");
    assert_eq!(distinct.len(), runs.len(), "a run created twice: {runs:?}");
    for batch in &listed {
        assert_eq!(batch.labels["schedule"], "every-two-seconds");
        assert_eq!(batch.labels["team"], "search");
        assert_eq!(batch.counts.unwrap().total, 2);
    }
    // Each run's batch runs its items (the oldest has had the most time).
    let oldest = &listed[listed.len() - 1];
    let mut router = mesh.router();
    let results = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            let batch = router
                .get_batch(GetBatchRequest {
                    batch_id: oldest.id.clone(),
                })
                .await
                .unwrap()
                .into_inner()
                .batch
                .unwrap();
            if batch.state == BatchState::Completed as i32 {
                return batch.counts.unwrap().succeeded;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("the scheduled batch completed");
    assert_eq!(results, 2);
    mesh.stop().await;
    delete_prefix(&prefix).await;
    let _ = std::fs::remove_dir_all(&dir);
}
