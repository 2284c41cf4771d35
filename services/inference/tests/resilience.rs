//! The per-model circuit breaker and bulkhead over real gRPC, exercised through the simulated
//! backend's fault injection: an open breaker fails fast without calling the model and re-opens
//! when its probe fails; half-open admits exactly the probes and closes when they succeed;
//! streams count at their first token; a full bulkhead refuses at once, isolates models and gets
//! its slots back from cancelled and finished streams.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{net::SocketAddr, sync::Arc, time::Duration};

use tokio_util::sync::CancellationToken;
use tonic::{Code, Request, Status, transport::Channel};
use tonic_types::StatusExt;
use weir_inference::{Config, InferenceApi, server_with};
use weir_mesh::{
    backend::BackendKey,
    breaker::{BreakerConfig, BreakerState},
    bulkhead::BulkheadConfig,
    catalog::{Catalog, ModelSpec, SimSpec},
};
use weir_proto::{
    common::{GenerationParams, Message, Role},
    inference::{
        GenerateRequest, GenerateStreamRequest, GenerateStreamResponse,
        generate_stream_response::Event, inference_service_client::InferenceServiceClient,
    },
};

/// The breaker's open duration in these tests.
const OPEN: Duration = Duration::from_millis(300);
/// The bulkhead's limit per model in these tests.
const LIMIT: usize = 2;
/// Time to first token of the slow models.
const SLOW_TTFT: Duration = Duration::from_millis(400);

struct Harness {
    client: InferenceServiceClient<Channel>,
    api: InferenceApi,
    shutdown: CancellationToken,
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

fn sim(sim: SimSpec) -> ModelSpec {
    ModelSpec {
        sim,
        ..ModelSpec::default()
    }
}

/// A server with a small breaker (window = minimum = 4 calls, 50 % failures, 300 ms open, no
/// jitter, 3 probes) and a bulkhead of 2 per model (8 for `sim-slow-cut`), over these models:
/// - `sim-healthy`: never fails;
/// - `sim-down`: every request fails (UNAVAILABLE `SIMULATED_FAULT`);
/// - `sim-cut`: answers break off after 2 tokens (`STREAM_CUT`), so a request with
///   `max_tokens <= 2` succeeds and a longer one fails;
/// - `sim-slow`: first token after 400 ms;
/// - `sim-slow-cut`: both.
async fn start() -> Harness {
    let models = [
        ("sim-healthy", SimSpec::default()),
        (
            "sim-down",
            SimSpec {
                error_rate: 1.0,
                ..SimSpec::default()
            },
        ),
        (
            "sim-cut",
            SimSpec {
                cut_after_tokens: Some(2),
                ..SimSpec::default()
            },
        ),
        (
            "sim-slow",
            SimSpec {
                time_to_first_token: SLOW_TTFT,
                ..SimSpec::default()
            },
        ),
        (
            "sim-slow-cut",
            SimSpec {
                time_to_first_token: SLOW_TTFT,
                cut_after_tokens: Some(2),
                ..SimSpec::default()
            },
        ),
    ];
    let catalog = Arc::new(Catalog::new(
        models
            .into_iter()
            .map(|(name, spec)| (name.to_string(), sim(spec))),
    ));
    let config = Config {
        breaker: BreakerConfig {
            window: 4,
            minimum_calls: 4,
            open_duration: OPEN,
            jitter: 0.0,
            ..BreakerConfig::default()
        },
        bulkhead: BulkheadConfig {
            max_concurrent: LIMIT,
            // Room for the three half-open probes.
            backends: [("sim-slow-cut".to_string(), 8)].into(),
            ..BulkheadConfig::default()
        },
        ..Config::default()
    };
    config.validate().unwrap();
    let api = InferenceApi::with_config(catalog, &config);
    let shutdown = CancellationToken::new();
    let listener = weir_mesh::server::bind(SocketAddr::from(([127, 0, 0, 1], 0)))
        .await
        .unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(server_with(&config, api.clone()).serve(listener, shutdown.clone()));
    let client = InferenceServiceClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    Harness {
        client,
        api,
        shutdown,
    }
}

impl Harness {
    fn state(&self, model: &str) -> BreakerState {
        self.api.breakers().state(&BackendKey::new(model))
    }

    fn in_flight(&self, model: &str) -> usize {
        self.api
            .bulkheads()
            .get(&BackendKey::new(model))
            .in_flight()
    }

    fn received(&self, model: &str) -> usize {
        self.api.sim_requests_for(model).len()
    }

    async fn generate(&mut self, model: &str, max_tokens: Option<i32>) -> Result<(), Status> {
        self.client
            .generate(request(model, max_tokens))
            .await
            .map(drop)
    }

    /// Starts a stream and returns once its response headers are in (the call holds its permits).
    async fn open_stream(
        &mut self,
        model: &str,
        max_tokens: Option<i32>,
    ) -> Result<tonic::Streaming<GenerateStreamResponse>, Status> {
        let request = request(model, max_tokens);
        self.client
            .generate_stream(GenerateStreamRequest {
                model: request.model,
                messages: request.messages,
                params: request.params,
                ..GenerateStreamRequest::default()
            })
            .await
            .map(tonic::Response::into_inner)
    }

    /// Reads a stream to its end: the number of deltas, and the error it ended with, if any.
    async fn drain(
        stream: &mut tonic::Streaming<GenerateStreamResponse>,
    ) -> (usize, Option<Status>) {
        let mut deltas = 0;
        loop {
            match stream.message().await {
                Ok(Some(GenerateStreamResponse {
                    event: Some(Event::Delta(_)),
                })) => deltas += 1,
                Ok(Some(_)) => {}
                Ok(None) => return (deltas, None),
                Err(status) => return (deltas, Some(status)),
            }
        }
    }
}

fn request(model: &str, max_tokens: Option<i32>) -> GenerateRequest {
    GenerateRequest {
        model: model.to_string(),
        messages: vec![Message {
            role: Role::User.into(),
            content: "hello".to_string(),
            ..Message::default()
        }],
        params: Some(GenerationParams {
            max_tokens,
            ..GenerationParams::default()
        }),
        ..GenerateRequest::default()
    }
}

fn reason(status: &Status) -> String {
    status
        .get_error_details()
        .error_info()
        .map(|info| info.reason.clone())
        .unwrap_or_default()
}

fn retry_delay(status: &Status) -> Option<Duration> {
    status
        .get_error_details()
        .retry_info()
        .and_then(|info| info.retry_delay)
}

/// Asserts `status` is UNAVAILABLE with `expected` as its ErrorInfo reason.
fn assert_unavailable(status: &Status, expected: &str) {
    assert_eq!(
        (status.code(), reason(status).as_str()),
        (Code::Unavailable, expected),
        "{status:?}"
    );
}

/// Polls `condition` every 10 ms for at most `within`; false if it never held.
async fn eventually(within: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if condition() {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn an_open_breaker_fails_fast_without_calling_the_model_and_only_for_that_model() {
    let mut h = start().await;

    // Refused requests never touch the breaker: many of them do not open it.
    for _ in 0..10 {
        let status = h.generate("sim-down", Some(-1)).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument);
    }
    assert_eq!(h.state("sim-down"), BreakerState::Closed);
    assert_eq!(h.received("sim-down"), 0);

    // Four failures, unary and streamed (a stream failing before its first token counts).
    for i in 0..4 {
        let status = if i % 2 == 0 {
            h.generate("sim-down", None).await.unwrap_err()
        } else {
            h.open_stream("sim-down", None).await.unwrap_err()
        };
        assert_unavailable(&status, "SIMULATED_FAULT");
        let expected = if i < 3 {
            BreakerState::Closed
        } else {
            BreakerState::Open
        };
        assert_eq!(h.state("sim-down"), expected, "after {} failures", i + 1);
    }
    assert_eq!(h.received("sim-down"), 4);

    // The fifth call fails fast with CIRCUIT_OPEN and RetryInfo, and the model never sees it.
    let started = std::time::Instant::now();
    let status = h.generate("sim-down", None).await.unwrap_err();
    let fail_fast = started.elapsed();
    assert_unavailable(&status, "CIRCUIT_OPEN");
    let delay = retry_delay(&status).expect("RetryInfo");
    assert!(delay > Duration::ZERO && delay <= OPEN, "{delay:?}");
    assert!(fail_fast < OPEN, "refused in {fail_fast:?}");
    let status = h.open_stream("sim-down", None).await.unwrap_err();
    assert_unavailable(&status, "CIRCUIT_OPEN");
    assert_eq!(h.received("sim-down"), 4, "refused calls reach no model");

    // Validation still answers first while the circuit is open.
    let status = h.generate("sim-down", Some(-1)).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);

    // Breakers are per model: a healthy model is unaffected.
    h.generate("sim-healthy", None).await.unwrap();
    let mut stream = h.open_stream("sim-healthy", None).await.unwrap();
    let (deltas, error) = Harness::drain(&mut stream).await;
    assert!(deltas > 0 && error.is_none(), "{error:?}");
    assert_eq!(h.state("sim-healthy"), BreakerState::Closed);

    // After the open duration one probe goes through; it fails, so the breaker re-opens at once,
    // for twice as long.
    assert!(
        eventually(Duration::from_secs(5), || h.state("sim-down")
            == BreakerState::HalfOpen)
        .await
    );
    let status = h.generate("sim-down", None).await.unwrap_err();
    assert_unavailable(&status, "SIMULATED_FAULT");
    assert_eq!(
        h.received("sim-down"),
        5,
        "exactly one probe reached the model"
    );
    assert_eq!(h.state("sim-down"), BreakerState::Open);
    let status = h.generate("sim-down", None).await.unwrap_err();
    assert_unavailable(&status, "CIRCUIT_OPEN");
    let delay = retry_delay(&status).expect("RetryInfo");
    assert!(delay > OPEN && delay <= 2 * OPEN, "doubled: {delay:?}");
    assert_eq!(h.received("sim-down"), 5);
}

#[tokio::test]
async fn half_open_admits_exactly_the_probes_and_closes_when_they_succeed() {
    let mut h = start().await;
    // `sim-slow-cut` fails requests for more than 2 tokens (after its 400 ms first token) and
    // answers shorter ones: the "backend" recovers when the callers' requests get short.
    for _ in 0..4 {
        let status = h.generate("sim-slow-cut", None).await.unwrap_err();
        assert_unavailable(&status, "STREAM_CUT");
    }
    assert_eq!(h.state("sim-slow-cut"), BreakerState::Open);
    let status = h.generate("sim-slow-cut", Some(2)).await.unwrap_err();
    assert_unavailable(&status, "CIRCUIT_OPEN");
    assert_eq!(h.received("sim-slow-cut"), 4);

    assert!(
        eventually(Duration::from_secs(5), || h.state("sim-slow-cut")
            == BreakerState::HalfOpen)
        .await
    );
    // Three probe streams: each holds its probe slot until its first token (400 ms away).
    let mut probes = Vec::new();
    for _ in 0..3 {
        probes.push(h.open_stream("sim-slow-cut", Some(2)).await.unwrap());
    }
    // A fourth call while the probes are out is refused.
    let status = h.generate("sim-slow-cut", Some(2)).await.unwrap_err();
    assert_unavailable(&status, "CIRCUIT_OPEN");
    assert_eq!(h.received("sim-slow-cut"), 4 + 3);
    assert_eq!(h.state("sim-slow-cut"), BreakerState::HalfOpen);

    // All three probes succeed (at their first token): closed.
    for probe in &mut probes {
        let (deltas, error) = Harness::drain(probe).await;
        assert_eq!((deltas, error.map(|s| s.code())), (2, None));
    }
    assert_eq!(h.state("sim-slow-cut"), BreakerState::Closed);

    // With a fresh window: the failures that opened it are forgotten, three new ones are below
    // the minimum again, and the fourth opens it for the base duration (closing reset the
    // doubling).
    for _ in 0..3 {
        let status = h.generate("sim-slow-cut", None).await.unwrap_err();
        assert_unavailable(&status, "STREAM_CUT");
    }
    assert_eq!(h.state("sim-slow-cut"), BreakerState::Closed);
    let status = h.generate("sim-slow-cut", None).await.unwrap_err();
    assert_unavailable(&status, "STREAM_CUT");
    assert_eq!(h.state("sim-slow-cut"), BreakerState::Open);
    let status = h.generate("sim-slow-cut", Some(2)).await.unwrap_err();
    assert_unavailable(&status, "CIRCUIT_OPEN");
    let delay = retry_delay(&status).expect("RetryInfo");
    assert!(delay <= OPEN, "{delay:?}");
    assert_eq!(h.received("sim-slow-cut"), 4 + 3 + 4);
}

#[tokio::test]
async fn streams_count_at_their_first_token() {
    let mut h = start().await;

    // A stream cut after its first token was a success at its first token: many such streams do
    // not open the breaker, though each ends with STREAM_CUT...
    for _ in 0..8 {
        let mut stream = h.open_stream("sim-cut", None).await.unwrap();
        let (deltas, error) = Harness::drain(&mut stream).await;
        assert_eq!(deltas, 2);
        assert_unavailable(&error.expect("cut"), "STREAM_CUT");
    }
    assert_eq!(h.state("sim-cut"), BreakerState::Closed);
    // ...while a unary call counts its final status: two cut answers make the last four calls
    // 50 % failures, which opens it.
    let status = h.generate("sim-cut", None).await.unwrap_err();
    assert_unavailable(&status, "STREAM_CUT");
    assert_eq!(h.state("sim-cut"), BreakerState::Closed);
    let status = h.generate("sim-cut", None).await.unwrap_err();
    assert_unavailable(&status, "STREAM_CUT");
    assert_eq!(h.state("sim-cut"), BreakerState::Open);

    // A stream whose caller's deadline passes before its first token is no verdict on the model
    // (the caller ran out of time, see weir_mesh::outcome): the breaker ignores it.
    let reached = h.received("sim-slow");
    for _ in 0..4 {
        let original = request("sim-slow", None);
        let mut request = Request::new(GenerateStreamRequest {
            model: original.model,
            messages: original.messages,
            params: original.params,
            ..GenerateStreamRequest::default()
        });
        request.set_timeout(Duration::from_millis(50));
        match h.client.generate_stream(request).await {
            Ok(response) => {
                let (deltas, error) = Harness::drain(&mut response.into_inner()).await;
                assert_eq!(deltas, 0);
                assert_eq!(error.map(|s| s.code()), Some(Code::DeadlineExceeded));
            }
            Err(status) => assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}"),
        }
    }
    assert!(
        eventually(Duration::from_secs(2), || h.received("sim-slow")
            == reached + 4)
        .await,
        "every call reached the model"
    );
    assert_eq!(h.state("sim-slow"), BreakerState::Closed);
}

#[tokio::test]
async fn a_full_bulkhead_refuses_at_once_isolates_models_and_gets_its_slots_back() {
    let mut h = start().await;

    // Two streams waiting for their first token hold the model's two slots.
    let mut held = Vec::new();
    for _ in 0..LIMIT {
        held.push(h.open_stream("sim-slow", None).await.unwrap());
    }
    assert_eq!(h.in_flight("sim-slow"), LIMIT);

    // A third call is refused at once (it could not have finished before the first token).
    let started = std::time::Instant::now();
    let status = h.generate("sim-slow", None).await.unwrap_err();
    assert!(started.elapsed() < SLOW_TTFT, "{:?}", started.elapsed());
    assert_unavailable(&status, "BULKHEAD_FULL");
    let status = h.open_stream("sim-slow", None).await.unwrap_err();
    assert_unavailable(&status, "BULKHEAD_FULL");
    assert_eq!(
        h.received("sim-slow"),
        LIMIT,
        "refused calls reach no model"
    );

    // Another model has its own slots.
    let mut other = Vec::new();
    for _ in 0..LIMIT {
        other.push(h.open_stream("sim-healthy", None).await.unwrap());
    }
    for stream in &mut other {
        let (deltas, error) = Harness::drain(stream).await;
        assert!(deltas > 0 && error.is_none(), "{error:?}");
    }

    // The caller cancels both streams: their slots come back, and the next call is served.
    drop(held);
    assert!(
        eventually(Duration::from_secs(5), || h.in_flight("sim-slow") == 0).await,
        "{} still in flight",
        h.in_flight("sim-slow")
    );
    h.generate("sim-slow", None).await.unwrap();

    // Streams that ran to their end give their slots back (the caller still holds them).
    let mut finished = Vec::new();
    for _ in 0..LIMIT {
        finished.push(h.open_stream("sim-slow", None).await.unwrap());
    }
    for stream in &mut finished {
        let (deltas, error) = Harness::drain(stream).await;
        assert!(deltas > 0 && error.is_none(), "{error:?}");
    }
    assert!(
        eventually(Duration::from_secs(5), || h.in_flight("sim-slow") == 0).await,
        "{} in flight",
        h.in_flight("sim-slow")
    );
    for _ in 0..LIMIT {
        h.open_stream("sim-slow", None).await.unwrap();
    }

    // Neither the refusals nor the cancellations counted against the model's breaker.
    assert_eq!(h.state("sim-slow"), BreakerState::Closed);
}
