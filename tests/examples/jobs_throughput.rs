//! Jobs per second through the queue: the whole stack in this process, the job queue on Redis
//! (`WEIR_TEST_REDIS_URL`, default `redis://127.0.0.1:6379`) and then in memory, an instant sim
//! model, and 1 to 4 of the router's own workers. Each run submits `jobs` jobs at once and times
//! until the queue has no open job left; its keys are deleted afterwards.
//!
//! Prints figures; asserts nothing (machines are shared and noisy).
//!
//! ```text
//! cargo run --release -p weir-tests --example jobs_throughput -- [jobs]
//! ```
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use weir_proto::router::{GetJobRequest, JobState, SubmitJobRequest};
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

/// Submits `jobs` jobs and waits for the last to end: the jobs per second.
async fn run(mesh: &Mesh, jobs: usize) -> f64 {
    let start = Instant::now();
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

#[tokio::main]
async fn main() {
    let jobs: usize = std::env::args()
        .nth(1)
        .map_or(1000, |n| n.parse().expect("jobs is a number"));
    println!("{jobs} jobs per run, instant sim model");
    for redis in [true, false] {
        let queue = if redis { "redis " } else { "memory" };
        let mut single = 0.0;
        for workers in 1..=4 {
            let prefix = unique_prefix();
            let mesh = Mesh::start(&config(&prefix, workers, redis)).await;
            // Warm up connections and the model.
            run(&mesh, 20).await;
            let rate = run(&mesh, jobs).await;
            if workers == 1 {
                single = rate;
            }
            println!(
                "queue {queue}  workers {workers}  {rate:>8.0} jobs/s  ({:.2}x one worker)",
                rate / single
            );
            mesh.stop().await;
            if redis {
                delete_prefix(&prefix).await;
            }
        }
    }
}
