//! The official `openai` Python SDK against a running Weir: `tests/openai_sdk/test_openai_sdk.py`
//! (a completion, a stream with usage, the model list, each error status as the SDK's exception,
//! retries honouring Retry-After, an Idempotency-Key replay, a client that hangs up mid-stream,
//! a file uploaded and run as a batch whose output file is read back)
//! against the HTTP edges of two stacks this test starts, as `weir up` would.
//!
//! Needs `python3` and the SDK in `.tools/openai-venv` (pinned in `tests/openai_sdk/
//! requirements.txt`); `./tests/run` creates it, and this test does when it is missing. Set
//! `WEIR_SKIP_OPENAI_SDK_TESTS=1` to skip it on a machine without Python or PyPI; it fails
//! otherwise, so that a missing SDK is never mistaken for a passing suite.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    path::{Path, PathBuf},
    process::Stdio,
    time::Duration,
};

use tokio::process::Command;
use tokio_util::sync::CancellationToken;
use weir_mesh::telemetry;
use weir_tests::{Mesh, delete_prefix, redis_url, unique_prefix};

const KEY: &str = "acme-key-0123456789";
const PRICE: &str = "price = { input_micros_per_mtok = 1000000, output_micros_per_mtok = 1000000 }";

fn config(prefix: &str) -> String {
    format!(
        r#"
[[auth.api_keys]]
tenant = "acme"
key = "{KEY}"

[models.quick]
max_output_tokens = 64
sim = {{ output_tokens = 12 }}
{PRICE}
[models.slow]
sim = {{ output_tokens = 20, time_to_first_token = "1s" }}
{PRICE}
[models.drip]
sim = {{ output_tokens = 400, tokens_per_second = 20.0 }}
{PRICE}
[models.denied]
sim = {{ error_rate = 1.0, error_code = "PERMISSION_DENIED" }}
{PRICE}
[models.exhausted]
sim = {{ error_rate = 1.0, error_code = "RESOURCE_EXHAUSTED", retry_after = "2s" }}
{PRICE}
[models.broken]
sim = {{ error_rate = 1.0, error_code = "UNAVAILABLE", retry_after = "1s" }}
{PRICE}
[models.internal]
sim = {{ error_rate = 1.0, error_code = "INTERNAL" }}
{PRICE}
[models.conflict]
sim = {{ error_rate = 1.0, error_code = "ABORTED" }}
{PRICE}

[router]
budget_url = "http://127.0.0.1:50054"   # replaced by the budget service started with it
session_url = ""

[router.routes.auto]
models = ["quick"]

[router.idempotency]
redis_url = "{redis}"
key_prefix = "{prefix}"

[budget]
redis_url = "{redis}"
key_prefix = "{prefix}"
"#,
        redis = redis_url()
    )
}

/// One request per second, burst one: the second request in a row is refused with a delay.
const LIMITED: &str = r#"
[models.quick]
sim = { output_tokens = 4 }

[router]
session_url = ""

[router.rate_limit]
requests_per_second = 1.0
burst = 1
"#;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn python() -> PathBuf {
    root().join(".tools/openai-venv/bin/python")
}

/// The SDK's virtualenv, created from the pinned requirements when missing; or why not.
async fn sdk_ready() -> Result<(), String> {
    let has_sdk = Command::new(python())
        .args(["-c", "import openai"])
        .status()
        .await
        .is_ok_and(|status| status.success());
    if has_sdk {
        return Ok(());
    }
    let venv = Command::new("python3")
        .args(["-m", "venv"])
        .arg(root().join(".tools/openai-venv"))
        .status()
        .await
        .map_err(|e| format!("python3 -m venv: {e}"))?;
    if !venv.success() {
        return Err("python3 -m venv failed (apt-get install python3-venv)".into());
    }
    let pip = Command::new(python())
        .args(["-m", "pip", "install", "-q", "-r"])
        .arg(root().join("tests/openai_sdk/requirements.txt"))
        .status()
        .await
        .map_err(|e| format!("pip install: {e}"))?;
    if !pip.success() {
        return Err("pip install -r tests/openai_sdk/requirements.txt failed".into());
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_official_openai_sdk_works_against_weir() {
    if let Err(why) = sdk_ready().await {
        if std::env::var_os("WEIR_SKIP_OPENAI_SDK_TESTS").is_some() {
            eprintln!("skipped (WEIR_SKIP_OPENAI_SDK_TESTS): {why}");
            return;
        }
        panic!("{why}; ./tests/run installs it, or set WEIR_SKIP_OPENAI_SDK_TESTS=1");
    }
    let prefix = unique_prefix();
    // Run apart, so the Redis keys are deleted even when the suite fails (CI shares the Redis).
    let outcome = tokio::spawn(suite(prefix.clone())).await;
    delete_prefix(&prefix).await;
    if let Err(failure) = outcome {
        std::panic::resume_unwind(failure.into_panic());
    }
}

async fn suite(prefix: String) {
    let handle = telemetry::install_metrics_recorder();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let metrics_url = format!("http://{}/metrics", listener.local_addr().unwrap());
    let stop = CancellationToken::new();
    let metrics = tokio::spawn(telemetry::serve_metrics(listener, handle, stop.clone()));

    let mesh = Mesh::start(&config(&prefix)).await;
    let limited = Mesh::start_services(
        LIMITED,
        &[
            weir::stack::Service::Router,
            weir::stack::Service::Inference,
        ],
    )
    .await;

    let run = Command::new(python())
        .arg(root().join("tests/openai_sdk/test_openai_sdk.py"))
        .env("WEIR_OPENAI_BASE_URL", mesh.openai_url())
        .env("WEIR_OPENAI_KEY", KEY)
        .env("WEIR_LIMITED_BASE_URL", limited.openai_url())
        .env("WEIR_METRICS_URL", &metrics_url)
        .env("PYTHONUNBUFFERED", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("python runs");
    let output = tokio::time::timeout(Duration::from_secs(120), run.wait_with_output())
        .await
        .expect("the SDK suite ends within two minutes")
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    eprintln!("{stderr}");
    assert!(
        output.status.success(),
        "the SDK suite failed:\n{stdout}\n{stderr}"
    );

    // The replayed request ran the model once (so it was charged once).
    let key = stdout
        .lines()
        .find_map(|line| line.strip_prefix("REPLAY_KEY "))
        .expect("the replay test printed its key")
        .trim();
    let calls = mesh
        .inference_api()
        .sim_requests()
        .iter()
        .filter(|r| r.request_id == key)
        .count();
    assert_eq!(
        calls, 1,
        "one model call for two requests with one Idempotency-Key"
    );

    limited.stop().await;
    mesh.stop().await;
    stop.cancel();
    metrics.await.unwrap().unwrap();
}
