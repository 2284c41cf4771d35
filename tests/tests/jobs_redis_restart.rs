//! Jobs and batches survive a Redis crash: a Redis process of the test's own, with the
//! append-only file on, is killed (SIGKILL) while jobs and a batch's items are queued and running,
//! then started again on the same port and data directory. Every job still completes, exactly once
//! in state, with its result, and so does every item of the batch.
//!
//! Needs `redis-server` on the PATH (`./tests/run` installs it).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use tokio_stream::StreamExt;
use weir_proto::router::{
    BatchItem, BatchState, CreateBatchRequest, GetBatchRequest, GetJobRequest, JobState,
    StreamBatchResultsRequest, SubmitJobRequest,
};
use weir_tests::{Mesh, complete, with_key};

const ACME: &str = "acme-key-0123456789";
const JOBS: usize = 20;
const ITEMS: usize = 10;

/// A `redis-server` on `port` with its data (the append-only file) in `dir`; killed on drop.
struct Redis {
    child: Child,
}

impl Redis {
    fn start(port: u16, dir: &Path) -> Self {
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            // Every write is on disk before Redis answers: what a queue that must not lose a job
            // runs with.
            .args([
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                "--save",
                "",
            ])
            .arg("--dir")
            .arg(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server is installed");
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "redis-server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        Self { child }
    }

    /// SIGKILL: no shutdown, no final save; only what the append-only file holds survives.
    fn crash(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn config(port: u16) -> String {
    format!(
        r#"
[models.sim-steady]
sim = {{ output_tokens = 6, tokens_per_second = 30.0 }}

[[auth.api_keys]]
tenant = "acme"
key = "{ACME}"

[router]
session_url = ""
[router.rate_limit]
enabled = false
[router.jobs]
redis_url = "redis://127.0.0.1:{port}"
key_prefix = "restart"
workers = 2
handler_limit = "2s"
backoff = "50ms"
max_backoff = "200ms"
max_deliveries = 10
[router.jobs.batches]
concurrency = 2
"#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_queued_job_completes_after_redis_crashes_and_restarts() {
    let dir: PathBuf = std::env::temp_dir().join(format!("weir-redis-aof-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let port = free_port();
    let redis = Redis::start(port, &dir);
    let mesh = Mesh::start(&config(port)).await;
    let mut router = mesh.router();

    // Twenty jobs of about 200 ms each for two workers: most are still queued, two are running.
    let mut ids = Vec::new();
    for i in 0..JOBS {
        let job = router
            .submit_job(with_key(
                SubmitJobRequest {
                    request: Some(complete("sim-steady", &format!("job {i}"))),
                    request_id: format!("restart-{i}"),
                    ..SubmitJobRequest::default()
                },
                ACME,
            ))
            .await
            .unwrap()
            .into_inner()
            .job
            .unwrap();
        ids.push(job.id);
    }

    // And a batch, whose items wait behind the jobs.
    let batch = router
        .create_batch(with_key(
            CreateBatchRequest {
                items: (0..ITEMS)
                    .map(|i| BatchItem {
                        custom_id: format!("item-{i}"),
                        request: Some(complete("sim-steady", &format!("item {i}"))),
                    })
                    .collect(),
                ..CreateBatchRequest::default()
            },
            ACME,
        ))
        .await
        .unwrap()
        .into_inner()
        .batch
        .unwrap();

    // Redis dies mid-work, and comes back a moment later from its append-only file.
    tokio::time::sleep(Duration::from_millis(300)).await;
    redis.crash();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let _redis = Redis::start(port, &dir);

    // Every job ends SUCCEEDED with its answer: none lost with the crash, none failed by it.
    let deadline = Instant::now() + Duration::from_secs(90);
    let mut pending = ids.clone();
    while !pending.is_empty() {
        assert!(
            Instant::now() < deadline,
            "{} of {JOBS} jobs did not complete after the restart: {pending:?}",
            pending.len()
        );
        let mut still = Vec::new();
        for id in pending {
            let reply = router
                .get_job(with_key(GetJobRequest { job_id: id.clone() }, ACME))
                .await;
            match reply.map(|r| r.into_inner().job.unwrap()) {
                Ok(job) if job.state() == JobState::Succeeded => {
                    let answer = job.result.expect("a succeeded job has its result");
                    assert!(answer.message.is_some_and(|m| !m.content.is_empty()));
                }
                Ok(job) => {
                    assert!(
                        matches!(job.state(), JobState::Queued | JobState::Running),
                        "job {id} ended {:?}: {:?}",
                        job.state(),
                        job.error
                    );
                    still.push(id);
                }
                // Redis still reconnecting: ask again.
                Err(_) => still.push(id),
            }
        }
        pending = still;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The batch completes too: every item once, each with its answer.
    let done = loop {
        assert!(
            Instant::now() < deadline,
            "the batch did not complete after the restart"
        );
        let reply = router
            .get_batch(with_key(
                GetBatchRequest {
                    batch_id: batch.id.clone(),
                },
                ACME,
            ))
            .await;
        if let Ok(reply) = reply
            && let Some(batch) = reply.into_inner().batch
            && batch.state() != BatchState::InProgress
        {
            break batch;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(done.state(), BatchState::Completed, "{done:?}");
    assert_eq!(done.counts.unwrap().succeeded, ITEMS as i64);
    let mut results = router
        .stream_batch_results(with_key(
            StreamBatchResultsRequest {
                batch_id: batch.id.clone(),
                follow: false,
            },
            ACME,
        ))
        .await
        .unwrap()
        .into_inner();
    let mut seen = std::collections::HashSet::new();
    while let Some(result) = results.next().await {
        let result = result.unwrap();
        assert_eq!(result.state(), JobState::Succeeded);
        assert!(seen.insert(result.custom_id), "an item twice");
    }
    assert_eq!(seen.len(), ITEMS);
    mesh.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
}
