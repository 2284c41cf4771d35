//! Jobs per second through the queue: the whole stack in this process, an instant sim model.
//!
//! - Redis queue (`WEIR_TEST_REDIS_URL`, default `redis://127.0.0.1:6379`): `jobs` jobs are
//!   submitted first (the submit rate is printed), then 1 to 4 workers are started on the queue and
//!   timed until it has no open job left: the queue's own throughput. Keys are deleted afterwards.
//! - In-memory queue: the router's own 1 to 4 workers, timed from the first submit to the last job
//!   ended (submits and runs overlap).
//! - A batch of `jobs` items on the Redis queue, the router's own 1 to 4 workers: timed from
//!   `CreateBatch` to the batch COMPLETED (the create's own time is printed too).
//!
//! Prints figures; asserts nothing (machines are shared and noisy).
//!
//! ```text
//! cargo run --release -p weir-tests --example jobs_throughput -- [jobs]
//! ```
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use weir::stack::Service;
use weir_mesh::identity::MeshIdentity;
use weir_proto::router::{
    BatchItem, BatchState, CreateBatchRequest, GetBatchRequest, GetJobRequest, JobState,
    SubmitJobRequest,
};
use weir_router::jobs::{JobStore, JobsConfig, api::Jobs, worker};
use weir_tests::{Mesh, complete, delete_prefix, redis_url, unique_prefix};

fn config(prefix: &str, workers: usize, redis: bool) -> String {
    let store = if redis {
        format!("redis_url = \"{}\"\n", redis_url())
    } else {
        String::new()
    };
    format!(
        r#"
[models.sim-zero]
sim = {{ output_tokens = 16 }}

[router]
session_url = ""
[router.rate_limit]
enabled = false
[router.jobs]
{store}key_prefix = "{prefix}"
workers = {workers}
capacity = 1000000
"#
    )
}

/// Submits `jobs` jobs from 8 tasks: their ids.
async fn submit_all(mesh: &Mesh, jobs: usize) -> Vec<String> {
    let mut submitters = Vec::new();
    let per_task = jobs.div_ceil(8);
    for task in 0..8 {
        let mut router = mesh.router();
        let count = per_task.min(jobs.saturating_sub(task * per_task));
        submitters.push(tokio::spawn(async move {
            let mut ids = Vec::with_capacity(count);
            for _ in 0..count {
                let job = router
                    .submit_job(SubmitJobRequest {
                        request: Some(complete("sim-zero", "a report, please")),
                        ..SubmitJobRequest::default()
                    })
                    .await
                    .unwrap()
                    .into_inner()
                    .job
                    .unwrap();
                ids.push(job.id);
            }
            ids
        }));
    }
    let mut ids = Vec::with_capacity(jobs);
    for submitter in submitters {
        ids.extend(submitter.await.unwrap());
    }
    ids
}

/// Submits `jobs` jobs and waits for the last to end: the jobs per second.
async fn run(mesh: &Mesh, jobs: usize) -> f64 {
    let start = Instant::now();
    let ids = submit_all(mesh, jobs).await;
    // Jobs end roughly in order: wait for each in turn.
    let mut router = mesh.router();
    for id in ids {
        loop {
            let job = router
                .get_job(GetJobRequest { job_id: id.clone() })
                .await
                .unwrap()
                .into_inner()
                .job
                .unwrap();
            if job.state >= JobState::Succeeded as i32 {
                assert_eq!(job.state, JobState::Succeeded as i32, "{job:?}");
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    jobs as f64 / start.elapsed().as_secs_f64()
}

/// The Redis queue alone: `jobs` jobs queued first, then `workers` workers drain it.
async fn redis_drain(jobs: usize, workers: usize) -> (f64, f64) {
    let prefix = unique_prefix();
    let mesh = Mesh::start(&config(&prefix, 0, true)).await;
    // Warm up: connections, the model, the stream and its group.
    run_drain(&mesh, &prefix, 20, 1).await;
    let start = Instant::now();
    submit_all(&mesh, jobs).await;
    let submit_rate = jobs as f64 / start.elapsed().as_secs_f64();
    let rate = run_drain(&mesh, &prefix, 0, workers).await;
    mesh.stop().await;
    delete_prefix(&prefix).await;
    (submit_rate, rate)
}

/// Submits `submit` jobs (maybe 0), then starts `workers` workers and times until no job is open.
async fn run_drain(mesh: &Mesh, prefix: &str, submit: usize, workers: usize) -> f64 {
    if submit > 0 {
        submit_all(mesh, submit).await;
    }
    let config = JobsConfig {
        redis_url: Some(redis_url()),
        key_prefix: prefix.to_string(),
        workers,
        ..JobsConfig::default()
    };
    let jobs = Jobs::new(
        JobStore::from_config(&config, "router.jobs")
            .unwrap()
            .unwrap(),
        config,
    );
    let client = redis::Client::open(redis_url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let open_key = format!("{prefix}:{{router:jobs}}:async:open");
    let open = |conn: &mut redis::aio::MultiplexedConnection| {
        let mut conn = conn.clone();
        let key = open_key.clone();
        async move {
            let open: Option<u64> = redis::cmd("GET")
                .arg(key)
                .query_async(&mut conn)
                .await
                .unwrap();
            open.unwrap_or(0)
        }
    };
    let queued = open(&mut conn).await;
    let shutdown = tokio_util::sync::CancellationToken::new();
    let start = Instant::now();
    let handles = worker::spawn(
        &jobs,
        workers,
        &mesh.url(Service::Router),
        MeshIdentity::disabled(),
        shutdown.clone(),
    )
    .unwrap();
    while open(&mut conn).await > 0 {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let elapsed = start.elapsed();
    shutdown.cancel();
    for handle in handles {
        let _ = handle.await;
    }
    queued as f64 / elapsed.as_secs_f64()
}

/// A batch of `items` items run by `workers` router workers on Redis: (create seconds, items/s).
async fn batch_rate(items: usize, workers: usize) -> (f64, f64) {
    let prefix = unique_prefix();
    let mesh = Mesh::start(&config(&prefix, workers, true)).await;
    let mut router = mesh.router();
    let request = |count: usize| CreateBatchRequest {
        items: (0..count)
            .map(|n| BatchItem {
                custom_id: format!("item-{n}"),
                request: Some(complete("sim-zero", "a report, please")),
            })
            .collect(),
        ..CreateBatchRequest::default()
    };
    let wait = |id: String| {
        let mut router = mesh.router();
        async move {
            loop {
                let batch = router
                    .get_batch(GetBatchRequest {
                        batch_id: id.clone(),
                    })
                    .await
                    .unwrap()
                    .into_inner()
                    .batch
                    .unwrap();
                if batch.state != BatchState::InProgress as i32 {
                    assert_eq!(batch.state, BatchState::Completed as i32, "{batch:?}");
                    return;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    };
    // Warm up.
    let warm = router.create_batch(request(20)).await.unwrap().into_inner();
    wait(warm.batch.unwrap().id).await;
    let start = Instant::now();
    let created = router
        .create_batch(request(items))
        .await
        .unwrap()
        .into_inner();
    let create = start.elapsed().as_secs_f64();
    wait(created.batch.unwrap().id).await;
    let rate = items as f64 / start.elapsed().as_secs_f64();
    mesh.stop().await;
    delete_prefix(&prefix).await;
    (create, rate)
}

#[tokio::main]
async fn main() {
    let jobs: usize = std::env::args()
        .nth(1)
        .map_or(1000, |n| n.parse().expect("jobs is a number"));
    println!("{jobs} jobs per run, instant sim model");
    let mut single = 0.0;
    for workers in 1..=4 {
        let (submitted, rate) = redis_drain(jobs, workers).await;
        if workers == 1 {
            single = rate;
        }
        println!(
            "queue redis   workers {workers}  {rate:>8.0} jobs/s drained  ({:.2}x one worker; \
             submitted at {submitted:.0}/s)",
            rate / single
        );
    }
    let mut single = 0.0;
    for workers in 1..=4 {
        let prefix = unique_prefix();
        let mesh = Mesh::start(&config(&prefix, workers, false)).await;
        run(&mesh, 20).await;
        let rate = run(&mesh, jobs).await;
        if workers == 1 {
            single = rate;
        }
        println!(
            "queue memory  workers {workers}  {rate:>8.0} jobs/s submitted and run  ({:.2}x one \
             worker)",
            rate / single
        );
        mesh.stop().await;
    }
    let mut single = 0.0;
    for workers in 1..=4 {
        let (create, rate) = batch_rate(jobs, workers).await;
        if workers == 1 {
            single = rate;
        }
        println!(
            "batch redis   workers {workers}  {rate:>8.0} items/s created and run  ({:.2}x one \
             worker; CreateBatch took {:.0} ms)",
            rate / single,
            create * 1000.0
        );
    }
}
