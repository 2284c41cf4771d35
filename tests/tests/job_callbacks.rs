//! Job callbacks end to end: the whole stack in this process, the job queue on a real Redis
//! (`WEIR_TEST_REDIS_URL`, a unique key prefix deleted after each test) or in memory, and a real
//! HTTP receiver (axum on 127.0.0.1:0) that checks every delivery against its own implementation
//! of the Standard Webhooks signature.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    collections::VecDeque,
    sync::{Arc, Mutex},
    time::Duration,
};

use axum::{
    body::Bytes,
    extract::State,
    http::{HeaderMap, StatusCode},
    routing::post,
};
use base64::{Engine as _, engine::general_purpose::STANDARD};
use tonic::{Code, transport::Channel};
use weir_proto::router::{
    Callback, GetJobRequest, Job, JobState, SubmitJobRequest,
    router_service_client::RouterServiceClient,
};
use weir_tests::{
    Mesh, complete, delete_prefix, eventually, reason, redis_url, unique_prefix, with_key,
};

const ACME: &str = "acme-key-0123456789";
/// The Standard Webhooks form of the signing secret: `whsec_` and base64 of the key.
const SECRET: &str = "whsec_c2VjcmV0LWtleS1mb3ItdGhlLWNhbGxiYWNrLXRlc3Rz";

/// `redis`: the queue on the test Redis under `prefix`, else in memory.
fn config(prefix: &str, redis: bool, callbacks: &str) -> String {
    let queue = if redis {
        format!("redis_url = \"{}\"\nkey_prefix = \"{prefix}\"", redis_url())
    } else {
        String::new()
    };
    format!(
        r#"
[models.sim-instant]
sim = {{ output_tokens = 4 }}

[[auth.api_keys]]
tenant = "acme"
key = "{ACME}"

[router]
session_url = ""
[router.rate_limit]
enabled = false
[router.jobs]
{queue}
[router.jobs.callbacks]
retry_delays = ["20ms", "20ms", "20ms", "20ms"]
timeout = "2s"
lease = "5s"
{callbacks}
[router.jobs.callbacks.tenants.acme]
secret = "{SECRET}"
"#
    )
}

/// One POST the receiver got.
#[derive(Debug, Clone)]
struct Received {
    id: String,
    timestamp: String,
    signature: String,
    body: Bytes,
    /// The job as GetJob showed it when the POST arrived.
    seen: Job,
    /// The status answered.
    answered: u16,
}

/// The receiver's state: what to answer next (then 200) and what it got.
#[derive(Clone)]
struct Receiver {
    answers: Arc<Mutex<VecDeque<u16>>>,
    always: Option<u16>,
    received: Arc<Mutex<Vec<Received>>>,
    router: RouterServiceClient<Channel>,
}

async fn hook(State(receiver): State<Receiver>, headers: HeaderMap, body: Bytes) -> StatusCode {
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string()
    };
    let id = header("webhook-id");
    let seen = receiver
        .router
        .clone()
        .get_job(with_key(GetJobRequest { job_id: id.clone() }, ACME))
        .await
        .unwrap()
        .into_inner()
        .job
        .unwrap();
    let answered = receiver
        .always
        .unwrap_or_else(|| receiver.answers.lock().unwrap().pop_front().unwrap_or(200));
    receiver.received.lock().unwrap().push(Received {
        id,
        timestamp: header("webhook-timestamp"),
        signature: header("webhook-signature"),
        body,
        seen,
        answered,
    });
    StatusCode::from_u16(answered).unwrap()
}

/// Starts a receiver answering `answers` first (then 200), or `always` one status; its URL.
async fn receiver(mesh: &Mesh, answers: &[u16], always: Option<u16>) -> (Receiver, String) {
    let receiver = Receiver {
        answers: Arc::new(Mutex::new(answers.iter().copied().collect())),
        always,
        received: Arc::default(),
        router: mesh.router(),
    };
    let app = axum::Router::new()
        .route("/hook", post(hook))
        .with_state(receiver.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (receiver, url)
}

/// The Standard Webhooks check, written from the specification: the key is the base64 after
/// `whsec_`; the signed content is `{id}.{timestamp}.{raw body}`; the header lists
/// space-separated `v1,<base64 HMAC-SHA256>` signatures, any of which may match.
fn verifies(secret: &str, received: &Received) -> bool {
    let key = STANDARD
        .decode(secret.strip_prefix("whsec_").unwrap())
        .unwrap();
    let mut content = format!("{}.{}.", received.id, received.timestamp).into_bytes();
    content.extend_from_slice(&received.body);
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &key);
    let expected = STANDARD.encode(ring::hmac::sign(&key, &content).as_ref());
    received
        .signature
        .split(' ')
        .filter_map(|s| s.strip_prefix("v1,"))
        .any(|s| s == expected)
}

fn submit(url: &str) -> SubmitJobRequest {
    SubmitJobRequest {
        request: Some(complete("sim-instant", "hello")),
        callback: Some(Callback {
            url: url.to_string(),
        }),
        ..SubmitJobRequest::default()
    }
}

async fn get(mesh: &Mesh, id: &str) -> Job {
    mesh.router()
        .get_job(with_key(
            GetJobRequest {
                job_id: id.to_string(),
            },
            ACME,
        ))
        .await
        .unwrap()
        .into_inner()
        .job
        .unwrap()
}

/// Runs `scenario` on a fresh prefix and deletes its keys even when it fails.
async fn on_redis<F, Fut>(scenario: F)
where
    F: FnOnce(String) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let prefix = unique_prefix();
    let outcome = tokio::spawn(scenario(prefix.clone())).await;
    delete_prefix(&prefix).await;
    if let Err(failure) = outcome {
        std::panic::resume_unwind(failure.into_panic());
    }
}

/// A receiver that fails three times, then succeeds: four POSTs with one `webhook-id`, each
/// signed, each arriving after the result was stored, one success, `callback_delivered`.
async fn fails_three_times_then_succeeds(prefix: String, redis: bool) {
    let mesh = Mesh::start(&config(&prefix, redis, "allow_private = true")).await;
    let (receiver, url) = receiver(&mesh, &[500, 500, 500], None).await;
    let job = mesh
        .router()
        .submit_job(with_key(submit(&url), ACME))
        .await
        .unwrap()
        .into_inner()
        .job
        .unwrap();
    let delivered = eventually(Duration::from_secs(20), || {
        let mesh = &mesh;
        let id = job.id.clone();
        async move { get(mesh, &id).await.callback_delivered }
    })
    .await;
    let received = receiver.received.lock().unwrap().clone();
    assert!(delivered, "not delivered: {received:#?}");
    // Nothing more arrives after the success.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let received = receiver.received.lock().unwrap().clone();
    assert_eq!(
        received.iter().map(|r| r.answered).collect::<Vec<_>>(),
        [500, 500, 500, 200]
    );
    for post in &received {
        assert_eq!(post.id, job.id, "one webhook-id across retries");
        assert!(
            verifies(SECRET, post),
            "signature does not verify: {post:?}"
        );
        // None before the result is stored.
        assert_eq!(
            post.seen.state,
            JobState::Succeeded as i32,
            "{:?}",
            post.seen
        );
        assert!(post.seen.result.is_some());
        let body: serde_json::Value = serde_json::from_slice(&post.body).unwrap();
        assert_eq!(body["data"]["id"], job.id.as_str());
        assert_eq!(body["data"]["state"], "JOB_STATE_SUCCEEDED");
        assert!(!body["data"]["result"]["text"].as_str().unwrap().is_empty());
        assert!(
            body["data"]["result"]["usage"]["output_tokens"]
                .as_i64()
                .unwrap()
                > 0
        );
    }
    mesh.stop().await;
}

#[tokio::test]
async fn a_receiver_failing_three_times_gets_one_signed_success_on_redis() {
    on_redis(|prefix| fails_three_times_then_succeeds(prefix, true)).await;
}

#[tokio::test]
async fn a_receiver_failing_three_times_gets_one_signed_success_in_memory() {
    fails_three_times_then_succeeds(unique_prefix(), false).await;
}

#[tokio::test]
async fn gone_stops_the_retries() {
    on_redis(|prefix| async move {
        let mesh = Mesh::start(&config(&prefix, true, "allow_private = true")).await;
        let (receiver, url) = receiver(&mesh, &[], Some(410)).await;
        let job = mesh
            .router()
            .submit_job(with_key(submit(&url), ACME))
            .await
            .unwrap()
            .into_inner()
            .job
            .unwrap();
        let received = eventually(Duration::from_secs(20), || {
            let receiver = receiver.clone();
            async move { !receiver.received.lock().unwrap().is_empty() }
        })
        .await;
        assert!(received);
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert_eq!(receiver.received.lock().unwrap().len(), 1, "410 stops");
        assert!(!get(&mesh, &job.id).await.callback_delivered);
        mesh.stop().await;
    })
    .await;
}

#[tokio::test]
async fn the_last_attempt_gives_up() {
    on_redis(|prefix| async move {
        let mesh = Mesh::start(&config(&prefix, true, "allow_private = true")).await;
        let (receiver, url) = receiver(&mesh, &[], Some(503)).await;
        mesh.router()
            .submit_job(with_key(submit(&url), ACME))
            .await
            .unwrap();
        // The first attempt and four retries.
        let all = eventually(Duration::from_secs(20), || {
            let receiver = receiver.clone();
            async move { receiver.received.lock().unwrap().len() >= 5 }
        })
        .await;
        assert!(all);
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert_eq!(receiver.received.lock().unwrap().len(), 5);
        mesh.stop().await;
    })
    .await;
}

#[tokio::test]
async fn a_loopback_url_is_refused_at_submit_without_allow_private() {
    on_redis(|prefix| async move {
        let mesh = Mesh::start(&config(&prefix, true, "")).await;
        let mut router = mesh.router();
        for url in [
            "http://127.0.0.1:9/hook",
            "http://localhost:9/hook",
            "ftp://x/y",
        ] {
            let status = router
                .submit_job(with_key(submit(url), ACME))
                .await
                .unwrap_err();
            assert_eq!(status.code(), Code::InvalidArgument, "{url}: {status:?}");
            assert_eq!(reason(&status), "INVALID_ARGUMENT");
            assert!(
                status.message().starts_with("callback.url:"),
                "{}",
                status.message()
            );
        }
        mesh.stop().await;
    })
    .await;
}
