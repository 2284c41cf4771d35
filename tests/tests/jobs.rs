//! Asynchronous jobs end to end: the whole stack in this process (`weir up`, with API keys), the
//! job queue on a real Redis (`WEIR_TEST_REDIS_URL`) under a unique key prefix deleted after each
//! test, and the router's own workers running jobs through its `Complete`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use tokio_stream::StreamExt;
use tonic::Code;
use weir_proto::router::{
    CancelJobRequest, GetJobRequest, Job, JobState, ListJobsRequest, SubmitJobRequest,
    WatchJobRequest,
};
use weir_tests::{Mesh, complete, delete_prefix, reason, redis_url, unique_prefix, with_key};

const ACME: &str = "acme-key-0123456789";
const GLOBEX: &str = "globex-key-0123456789";

/// Two tenants, an instant model, a slow one and one that always fails retryably.
fn config(prefix: &str, jobs: &str) -> String {
    format!(
        r#"
[models.sim-instant]
sim = {{ output_tokens = 4 }}
[models.sim-slow]
sim = {{ output_tokens = 40, tokens_per_second = 20.0 }}
[models.sim-poison]
sim = {{ error_rate = 1.0, error_code = "UNAVAILABLE" }}

[[auth.api_keys]]
tenant = "acme"
key = "{ACME}"
[[auth.api_keys]]
tenant = "globex"
key = "{GLOBEX}"

[router]
session_url = ""
[router.rate_limit]
enabled = false
[router.jobs]
redis_url = "{redis}"
key_prefix = "{prefix}"
backoff = "20ms"
max_backoff = "50ms"
max_deliveries = 3
{jobs}
"#,
        redis = redis_url(),
    )
}

fn submit(model: &str, request_id: &str) -> SubmitJobRequest {
    SubmitJobRequest {
        request: Some(complete(model, "hello")),
        request_id: request_id.to_string(),
        ..SubmitJobRequest::default()
    }
}

async fn get(mesh: &Mesh, key: &str, id: &str) -> Result<Job, tonic::Status> {
    let request = GetJobRequest {
        job_id: id.to_string(),
    };
    Ok(mesh
        .router()
        .get_job(with_key(request, key))
        .await?
        .into_inner()
        .job
        .unwrap())
}

/// Watches the job to its end: every state seen, and the last job.
async fn watch(mesh: &Mesh, key: &str, id: &str) -> (Vec<i32>, Job) {
    let request = WatchJobRequest {
        job_id: id.to_string(),
    };
    let mut stream = mesh
        .router()
        .watch_job(with_key(request, key))
        .await
        .unwrap()
        .into_inner();
    let mut states = Vec::new();
    let mut last = None;
    let watched = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(message) = stream.next().await {
            let job = message.unwrap().job.unwrap();
            states.push(job.state);
            last = Some(job);
        }
    })
    .await;
    assert!(watched.is_ok(), "the job did not end: {states:?}");
    (states, last.unwrap())
}

fn is_terminal(state: i32) -> bool {
    state >= JobState::Succeeded as i32
}

#[tokio::test]
async fn a_job_runs_through_complete_and_a_retried_submit_returns_it() {
    let prefix = unique_prefix();
    let mesh = Mesh::start(&config(&prefix, "")).await;
    let mut router = mesh.router();
    let job = router
        .submit_job(with_key(submit("sim-instant", "order-1"), ACME))
        .await
        .unwrap()
        .into_inner()
        .job
        .unwrap();
    assert_eq!(job.state, JobState::Queued as i32);
    assert!(job.id.starts_with("job-"), "{}", job.id);
    let again = router
        .submit_job(with_key(submit("sim-instant", "order-1"), ACME))
        .await
        .unwrap()
        .into_inner()
        .job
        .unwrap();
    assert_eq!(again.id, job.id, "same request_id, same job");

    let (states, done) = watch(&mesh, ACME, &job.id).await;
    assert_eq!(done.state, JobState::Succeeded as i32, "{done:?}");
    assert_eq!(
        states.iter().filter(|s| is_terminal(**s)).count(),
        1,
        "exactly one terminal state: {states:?}"
    );
    let result = done.result.unwrap();
    assert_eq!(result.model, "sim-instant");
    assert!(!result.message.unwrap().content.is_empty());
    assert_eq!(done.attempts, 1);
    assert!(done.end_time.is_some());

    // After it ended, the retried submit still returns it, with its result.
    let again = router
        .submit_job(with_key(submit("sim-instant", "order-1"), ACME))
        .await
        .unwrap()
        .into_inner()
        .job
        .unwrap();
    assert_eq!(
        (again.id.as_str(), again.state),
        (job.id.as_str(), JobState::Succeeded as i32)
    );

    // A bad request is refused at submit, as Complete would refuse it.
    let status = router
        .submit_job(with_key(submit("gpt-9", ""), ACME))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
    let mut empty = submit("sim-instant", "");
    empty.request.as_mut().unwrap().messages.clear();
    let status = router.submit_job(with_key(empty, ACME)).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    mesh.stop().await;
    delete_prefix(&prefix).await;
}

#[tokio::test]
async fn another_tenants_job_is_not_found() {
    let prefix = unique_prefix();
    let mesh = Mesh::start(&config(&prefix, "workers = 0")).await;
    let mut router = mesh.router();
    let job = router
        .submit_job(with_key(submit("sim-instant", "shared-id"), ACME))
        .await
        .unwrap()
        .into_inner()
        .job
        .unwrap();
    let status = get(&mesh, GLOBEX, &job.id).await.unwrap_err();
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
    let status = router
        .cancel_job(with_key(
            CancelJobRequest {
                job_id: job.id.clone(),
            },
            GLOBEX,
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
    let listed = router
        .list_jobs(with_key(ListJobsRequest::default(), GLOBEX))
        .await
        .unwrap()
        .into_inner();
    assert!(listed.jobs.is_empty());
    // The same request_id is globex's own.
    let theirs = router
        .submit_job(with_key(submit("sim-instant", "shared-id"), GLOBEX))
        .await
        .unwrap()
        .into_inner()
        .job
        .unwrap();
    assert_ne!(theirs.id, job.id);
    let mine = router
        .list_jobs(with_key(ListJobsRequest::default(), ACME))
        .await
        .unwrap()
        .into_inner();
    let ids: Vec<&str> = mine.jobs.iter().map(|j| j.id.as_str()).collect();
    assert_eq!(ids, [job.id.as_str()]);
    // No key, no jobs.
    let status = router
        .get_job(GetJobRequest {
            job_id: job.id.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    mesh.stop().await;
    delete_prefix(&prefix).await;
}

#[tokio::test]
async fn a_full_queue_refuses_with_resource_exhausted() {
    let prefix = unique_prefix();
    // No workers: submitted jobs stay queued.
    let mesh = Mesh::start(&config(&prefix, "workers = 0\ncapacity = 2")).await;
    let mut router = mesh.router();
    for _ in 0..2 {
        router
            .submit_job(with_key(submit("sim-instant", ""), ACME))
            .await
            .unwrap();
    }
    let status = router
        .submit_job(with_key(submit("sim-instant", ""), GLOBEX))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert_eq!(reason(&status), "QUEUE_FULL");
    mesh.stop().await;
    delete_prefix(&prefix).await;
}

#[tokio::test]
async fn cancel_racing_completion_ends_in_exactly_one_terminal_state() {
    let prefix = unique_prefix();
    let mesh = Mesh::start(&config(&prefix, "workers = 4")).await;
    let mut router = mesh.router();
    let mut ids = Vec::new();
    for i in 0..20 {
        let job = router
            .submit_job(with_key(submit("sim-instant", ""), ACME))
            .await
            .unwrap()
            .into_inner()
            .job
            .unwrap();
        // Give the workers a varying head start, so some cancels land before, during and after.
        tokio::time::sleep(Duration::from_millis(i % 4)).await;
        let cancelled = router
            .cancel_job(with_key(
                CancelJobRequest {
                    job_id: job.id.clone(),
                },
                ACME,
            ))
            .await
            .unwrap()
            .into_inner()
            .job
            .unwrap();
        assert!(
            is_terminal(cancelled.state),
            "cancel answers a terminal job: {cancelled:?}"
        );
        ids.push((job.id, cancelled.state));
    }
    let (mut succeeded, mut cancelled) = (0, 0);
    for (id, answered) in ids {
        let (states, done) = watch(&mesh, ACME, &id).await;
        assert_eq!(states, [answered], "the job never changes after its end");
        if done.state == JobState::Succeeded as i32 {
            succeeded += 1;
            assert!(done.result.is_some());
        } else {
            assert_eq!(done.state, JobState::Cancelled as i32);
            assert!(done.result.is_none(), "a cancelled job has no result");
            cancelled += 1;
        }
    }
    assert_eq!(succeeded + cancelled, 20);
    mesh.stop().await;
    delete_prefix(&prefix).await;
}

#[tokio::test]
async fn a_poison_job_is_dead_lettered_while_others_complete() {
    let prefix = unique_prefix();
    let mesh = Mesh::start(&config(&prefix, "")).await;
    let mut router = mesh.router();
    let poison = router
        .submit_job(with_key(submit("sim-poison", ""), ACME))
        .await
        .unwrap()
        .into_inner()
        .job
        .unwrap();
    let mut good = Vec::new();
    for _ in 0..5 {
        good.push(
            router
                .submit_job(with_key(submit("sim-instant", ""), ACME))
                .await
                .unwrap()
                .into_inner()
                .job
                .unwrap()
                .id,
        );
    }
    for id in &good {
        let (_, done) = watch(&mesh, ACME, id).await;
        assert_eq!(done.state, JobState::Succeeded as i32, "{done:?}");
    }
    let (_, dead) = watch(&mesh, ACME, &poison.id).await;
    assert_eq!(dead.state, JobState::Failed as i32, "{dead:?}");
    assert_eq!(dead.attempts, 3, "max_deliveries");
    let error = dead.error.unwrap();
    assert_eq!(error.reason, "MAX_DELIVERIES");
    assert_eq!(error.code, Code::Unavailable as i32);

    let mut conn = weir_mesh::store::connect(&redis_url()).await.unwrap();
    let letters: redis::streams::StreamRangeReply = redis::cmd("XRANGE")
        .arg(format!("{prefix}:{{router:jobs}}:async:dead"))
        .arg("-")
        .arg("+")
        .query_async(&mut conn)
        .await
        .unwrap();
    let ids: Vec<String> = letters
        .ids
        .iter()
        .map(|e| e.get::<String>("id").unwrap())
        .collect();
    assert_eq!(ids, std::slice::from_ref(&poison.id));
    let pending: redis::Value = redis::cmd("XPENDING")
        .arg(format!("{prefix}:{{router:jobs}}:async"))
        .arg("workers")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(
        matches!(&pending, redis::Value::Array(items) if items.first() == Some(&redis::Value::Int(0))),
        "nothing stays pending: {pending:?}"
    );
    mesh.stop().await;
    delete_prefix(&prefix).await;
}

#[tokio::test]
async fn without_redis_the_queue_lives_in_the_router_process() {
    let toml = r#"
[models.sim-instant]
sim = { output_tokens = 4 }
[router]
session_url = ""
"#;
    let mesh = Mesh::start(toml).await;
    let mut router = mesh.router();
    let job = router
        .submit_job(submit("sim-instant", "in-memory-1"))
        .await
        .unwrap()
        .into_inner()
        .job
        .unwrap();
    let again = router
        .submit_job(submit("sim-instant", "in-memory-1"))
        .await
        .unwrap()
        .into_inner()
        .job
        .unwrap();
    assert_eq!(again.id, job.id);
    let request = WatchJobRequest {
        job_id: job.id.clone(),
    };
    let mut stream = router.watch_job(request).await.unwrap().into_inner();
    let mut last = None;
    while let Some(message) = stream.next().await {
        last = message.unwrap().job;
    }
    let done = last.unwrap();
    assert_eq!(done.state, JobState::Succeeded as i32, "{done:?}");
    assert!(done.result.is_some());

    // A callback needs the tenant's signing secret: refused, not accepted and sent unsigned.
    let mut with_callback = submit("sim-instant", "");
    with_callback.callback = Some(weir_proto::router::Callback {
        url: "https://93.184.215.14/hook".to_string(),
    });
    let status = router.submit_job(with_callback).await.unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert_eq!(reason(&status), "NO_CALLBACK_SECRET");
    mesh.stop().await;
}

#[tokio::test]
async fn jobs_turned_off_answer_failed_precondition() {
    let toml = "[router]\nsession_url = \"\"\n[router.jobs]\nenabled = false\n";
    let mesh = Mesh::start(toml).await;
    let status = mesh
        .router()
        .get_job(GetJobRequest {
            job_id: "job-1".to_string(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert_eq!(reason(&status), "JOBS_DISABLED");
    mesh.stop().await;
}
