//! An impatient tenant cannot take a healthy model away from everybody else (docs/resilience.md,
//! "Failure classification"): calls that end because *their caller's* deadline passed say nothing
//! about the backend or about overload, so they leave the circuit breakers of the router and of
//! inference CLOSED and the router's admission limit where it was; a real backend outage still
//! opens them.
//!
//! Router → inference over real gRPC on loopback, simulated models; the admission limit is read
//! from the process's Prometheus metrics, the breaker states from what callers see (a fallback or
//! CIRCUIT_OPEN) and from the inference service's registry.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use tonic::Code;
use weir_mesh::{backend::BackendKey, breaker::BreakerState};
use weir_proto::{inference::GenerateRequest, router::ServedBy};
use weir_tests::{Mesh, admission_limit, complete, eventually, reason, user};

/// Small breaker windows on both sides, so that the impatient calls would open both breakers many
/// times over if they counted. The router's is smaller than inference's, so that an outage opens
/// the router's first and a CIRCUIT_OPEN seen through the router is the router's own.
const CONFIG: &str = r#"
[models.slow]
sim = { time_to_first_token = "200ms", output_tokens = 4 }
[models.backup]
sim = { output_tokens = 4 }
[models.broken]
sim = { error_rate = 1.0 }

[router.routes.chat]
models = ["slow", "backup"]

[router.rate_limit]
enabled = false

[router.client.inference.retry]
max_attempts = 1

[router.client.inference.breaker]
window = 5
minimum_calls = 5
jitter = 0.0
open_duration = "30s"

[inference.breaker]
window = 10
minimum_calls = 10
jitter = 0.0
open_duration = "30s"
"#;

/// Calls the impatient tenant makes.
const IMPATIENT_CALLS: usize = 40;

/// The router's admission limit, as `weir_admission_limit{service="router"}` reports it.
fn router_limit(metrics: &impl Fn() -> String) -> Option<f64> {
    admission_limit(&metrics(), "router")
}

async fn call(mesh: &Mesh, model: &str, deadline: Duration) -> Result<ServedBy, tonic::Status> {
    let mut request = tonic::Request::new(complete(model, "hello"));
    request.set_timeout(deadline);
    let response = mesh.router().complete(request).await?;
    Ok(response.get_ref().served_by())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn impatient_callers_leave_breakers_closed_and_the_limit_unchanged() {
    let handle = weir_mesh::telemetry::install_metrics_recorder();
    let metrics = move || handle.render();
    let mesh = Mesh::start(CONFIG).await;
    // The servers register their metrics as they start serving, just after `Mesh::start`.
    assert!(
        eventually(Duration::from_secs(5), || async {
            router_limit(&metrics).is_some()
        })
        .await,
        "the router reports its admission limit"
    );
    let limit_before = router_limit(&metrics).expect("reported");

    // The impatient tenant: 50 ms deadlines against a model whose first token takes 200 ms.
    for i in 0..IMPATIENT_CALLS {
        let status = call(&mesh, "slow", Duration::from_millis(50))
            .await
            .unwrap_err();
        assert!(
            matches!(status.code(), Code::DeadlineExceeded | Code::Cancelled),
            "call {i}: {status:?}"
        );
        assert_ne!(reason(&status), "CIRCUIT_OPEN", "call {i}: {status:?}");
    }
    // Every one of them reached the model: no breaker refused any.
    assert!(
        eventually(Duration::from_secs(5), || async {
            mesh.inference_api().sim_requests_for("slow").len() == IMPATIENT_CALLS
        })
        .await,
        "{} of {IMPATIENT_CALLS} impatient calls reached the model",
        mesh.inference_api().sim_requests_for("slow").len()
    );

    let slow = BackendKey::new("slow");
    assert_eq!(
        mesh.inference_api().breakers().state(&slow),
        BreakerState::Closed,
        "inference's breaker for the model"
    );
    // The next, patient caller is served by the primary model of the route: the router's breaker
    // for it is closed too (open, the route would have fallen back to `backup`).
    let served = call(&mesh, "chat", Duration::from_secs(5)).await.unwrap();
    assert_eq!(served, ServedBy::Primary);
    assert_eq!(
        router_limit(&metrics),
        Some(limit_before),
        "the router's admission limit did not move"
    );
    mesh.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_outage_still_opens_the_breakers() {
    let mesh = Mesh::start(CONFIG).await;
    let broken = BackendKey::new("broken");
    // Patient callers, a model that fails every call: backend failures. After the router's
    // minimum of 5 it stops calling: CIRCUIT_OPEN at once, nothing more reaches the model, and
    // inference's own breaker (minimum 10) is still closed, so that refusal is the router's.
    for i in 0..5 {
        let status = call(&mesh, "broken", Duration::from_secs(5))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::Unavailable, "call {i}: {status:?}");
        assert_ne!(reason(&status), "CIRCUIT_OPEN", "call {i}: {status:?}");
    }
    for _ in 0..5 {
        let status = call(&mesh, "broken", Duration::from_secs(5))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::Unavailable, "{status:?}");
        assert_eq!(reason(&status), "CIRCUIT_OPEN", "{status:?}");
    }
    assert_eq!(mesh.inference_api().sim_requests_for("broken").len(), 5);
    assert_eq!(
        mesh.inference_api().breakers().state(&broken),
        BreakerState::Closed
    );

    // Inference's own breaker for the model opens too once it has seen enough failures (direct
    // calls, with plenty of time left).
    let mut inference = mesh.inference();
    for _ in 0..5 {
        let mut request = tonic::Request::new(GenerateRequest {
            model: "broken".into(),
            messages: vec![user("hello")],
            ..Default::default()
        });
        request.set_timeout(Duration::from_secs(5));
        let status = inference.generate(request).await.unwrap_err();
        assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    }
    assert_eq!(
        mesh.inference_api().breakers().state(&broken),
        BreakerState::Open
    );
    mesh.stop().await;
}
