//! A job worker killed mid-job: the worker is its own `weir serve worker` process, killed with
//! SIGKILL while the job's model call runs; another worker process reclaims the job. The router,
//! inference and budget services run in this test's process, the queue and the budget on the real Redis
//! (`WEIR_TEST_REDIS_URL`) under a unique prefix, deleted at the end.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::{
    net::{IpAddr, Ipv4Addr},
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use tokio_stream::StreamExt;
use weir::stack::{self, Service, StackConfig};
use weir_mesh::config::Source;
use weir_proto::{
    budget::{GetSpendRequest, Scope, ScopeKind, budget_service_client::BudgetServiceClient},
    common::{Message, Role},
    router::{
        CompleteRequest, GetJobRequest, Job, JobState, SubmitJobRequest, WatchJobRequest,
        router_service_client::RouterServiceClient,
    },
};

use common::{Serve, WEIR, delete_prefix, redis_url};

/// 60 tokens at 20 a second: three seconds of model call, time enough to kill its worker.
/// One micro-USD per token, so a cost is a token count.
const MODELS: &str = r#"
[models.sim-slow]
sim = { output_tokens = 60, tokens_per_second = 20.0 }
price = { input_micros_per_mtok = 1000000, output_micros_per_mtok = 1000000 }
"#;

/// The `[router.jobs]` table both the router and the workers read: a handler limit above the
/// job's three seconds, so a delivery is only reclaimed once its worker is gone.
fn jobs_table(prefix: &str) -> String {
    format!(
        "[router.jobs]\nredis_url = \"{}\"\nkey_prefix = \"{prefix}\"\nhandler_limit = \"4s\"\n\
         backoff = \"50ms\"\n",
        redis_url()
    )
}

/// `weir serve worker --config <config>`: one worker calling the router of the config.
fn worker(config: &Path) -> Serve {
    let mut command = Command::new(WEIR);
    command
        .args(["serve", "worker", "--config"])
        .arg(config)
        .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
        .env_remove("WEIR_MESH__SECRET")
        .env("RUST_LOG", "warn")
        .env("WEIR_TELEMETRY__METRICS_LISTEN", "");
    Serve::start(command, "worker")
}

async fn job(router: &mut RouterServiceClient<tonic::transport::Channel>, id: &str) -> Job {
    router
        .get_job(GetJobRequest {
            job_id: id.to_string(),
        })
        .await
        .unwrap()
        .into_inner()
        .job
        .unwrap()
}

#[tokio::test]
async fn a_worker_killed_mid_job_is_replaced_and_the_job_runs_and_is_paid_once() {
    let prefix = format!("wtest-jobkill-{}", std::process::id());
    // Run apart, so the keys are deleted even when the scenario fails.
    let outcome = tokio::spawn(killed_worker(prefix.clone())).await;
    let keys = delete_prefix(&prefix).await;
    if let Err(failure) = outcome {
        std::panic::resume_unwind(failure.into_panic());
    }
    assert!(!keys.is_empty());
}

async fn killed_worker(prefix: String) {
    let toml = format!(
        r#"{MODELS}
[router]
budget_url = "http://127.0.0.1:50054"   # replaced by the budget service started here
session_url = ""
[router.rate_limit]
enabled = false
[budget]
redis_url = "{redis}"
key_prefix = "{prefix}"
{jobs}workers = 0                             # only the worker processes run jobs
"#,
        redis = redis_url(),
        jobs = jobs_table(&prefix),
    );
    let mut config = StackConfig::from_source(&Source::from_toml(&toml)).unwrap();
    config.listen_on_any_port(IpAddr::V4(Ipv4Addr::LOCALHOST));
    let running = stack::start(
        config,
        &[Service::Inference, Service::Budget, Service::Router],
        Default::default(),
    )
    .await
    .unwrap();
    let router_url = running.url(Service::Router).unwrap();
    let worker_config = std::env::temp_dir().join(format!(
        "weir-jobs-process-{}-worker.toml",
        std::process::id()
    ));
    std::fs::write(
        &worker_config,
        format!(
            "{}\n[worker]\nrouter_url = \"{router_url}\"\nworkers = 1\n",
            jobs_table(&prefix)
        ),
    )
    .unwrap();
    let channel = |url: &str| weir_mesh::client::lazy_channel(url).unwrap();
    let mut router = RouterServiceClient::new(channel(&router_url));
    let mut budget = BudgetServiceClient::new(channel(&running.url(Service::Budget).unwrap()));

    let mut first = worker(&worker_config);
    let submitted = router
        .submit_job(SubmitJobRequest {
            request: Some(CompleteRequest {
                model: "sim-slow".to_string(),
                messages: vec![Message {
                    role: Role::User.into(),
                    content: "write a long report".to_string(),
                    ..Message::default()
                }],
                ..CompleteRequest::default()
            }),
            ..SubmitJobRequest::default()
        })
        .await
        .unwrap()
        .into_inner()
        .job
        .unwrap();
    let id = submitted.id;
    let mut watch = router
        .watch_job(WatchJobRequest { job_id: id.clone() })
        .await
        .unwrap()
        .into_inner();

    // Kill the worker once it runs the job, mid model call.
    let deadline = Instant::now() + Duration::from_secs(20);
    while job(&mut router, &id).await.state != JobState::Running as i32 {
        assert!(Instant::now() < deadline, "no worker started the job");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    first.kill();
    assert_eq!(job(&mut router, &id).await.state, JobState::Running as i32);

    // Another worker process reclaims it once the dead one's delivery has been idle too long.
    let _second = worker(&worker_config);
    let mut states = Vec::new();
    let watched = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(message) = watch.next().await {
            states.push(message.unwrap().job.unwrap());
        }
    })
    .await;
    assert!(watched.is_ok(), "the job did not end: {states:?}");
    let terminal: Vec<&Job> = states.iter().filter(|j| j.state >= 3).collect();
    assert_eq!(terminal.len(), 1, "exactly one terminal state: {states:?}");
    let done = terminal[0];
    let timeline: Vec<(i32, i32, Option<String>)> = states
        .iter()
        .map(|j| {
            (
                j.state,
                j.attempts,
                j.error.as_ref().map(|e| e.message.clone()),
            )
        })
        .collect();
    assert_eq!(done.state, JobState::Succeeded as i32, "{timeline:?}");
    assert_eq!(done.attempts, 2, "the killed attempt and the reclaimed one");
    let result = done.result.clone().unwrap();
    assert!(result.cost_micros > 0);
    assert_eq!(job(&mut router, &id).await.result, Some(result.clone()));

    // Nothing stays pending in the stream.
    let mut conn = weir_mesh::store::connect(&redis_url()).await.unwrap();
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

    // Charged once: the re-run was answered from the idempotency record of the first call.
    let spent = budget
        .get_spend(GetSpendRequest {
            scope: Some(Scope {
                kind: ScopeKind::Tenant.into(),
                id: String::new(),
            }),
            ..GetSpendRequest::default()
        })
        .await
        .unwrap()
        .into_inner()
        .total_micros;
    assert_eq!(spent, result.cost_micros, "the tenant is charged once");

    running.stop().await.unwrap();
    let _ = std::fs::remove_file(&worker_config);
}
