//! Circuit breaker: stop calling a backend that is failing, and fail fast instead.
//!
//! # Why a breaker, when there are already retries and timeouts?
//!
//! A backend that is down or drowning makes every call wait for a timeout before failing, and each
//! caller that retries adds load to the one component that cannot take it. Retries (even with a
//! budget) are a per-call decision; a breaker is a decision about the *backend*: once enough recent
//! calls have failed it stops sending any for a while, so callers get their answer (UNAVAILABLE,
//! reason `CIRCUIT_OPEN`, which the router turns into a fallback) in microseconds instead of after
//! a timeout, and the backend gets room to recover. It then lets a few probe calls through to find
//! out whether it has.
//!
//! # States
//!
//! - **CLOSED**: calls go through; each outcome goes into a count-based sliding window of the last
//!   [`window`](BreakerConfig::window) calls (default [`DEFAULT_WINDOW`] = 20). When the window holds
//!   at least [`minimum_calls`](BreakerConfig::minimum_calls) (default 20) and the failure rate is
//!   ≥ [`failure_rate`](BreakerConfig::failure_rate) (default 50 %) or the slow-call rate is ≥
//!   [`slow_call_rate`](BreakerConfig::slow_call_rate) (default 100 %), the breaker opens. Below the
//!   minimum it never opens, so three failures out of three calls after a quiet night do not cut a
//!   backend off.
//! - **OPEN**: every call is refused at once with UNAVAILABLE, reason `CIRCUIT_OPEN`, ErrorInfo
//!   metadata `backend`, and RetryInfo (and `grpc-retry-pushback-ms`) = the time left open. The
//!   open duration starts at [`open_duration`](BreakerConfig::open_duration) (5 s) and doubles on
//!   each consecutive re-open, capped at [`max_open_duration`](BreakerConfig::max_open_duration)
//!   (60 s), so a backend that keeps failing its probes is probed less and less often.
//! - **HALF_OPEN** (the first call after the open duration moves the breaker there; there is no
//!   timer task): exactly [`half_open_probes`](BreakerConfig::half_open_probes) (3) calls are let
//!   through and the others refused like in OPEN. A probe that fails re-opens the breaker at once
//!   (for longer); when all probes have succeeded the breaker closes with a fresh window. A probe
//!   that ends with an ignored code, or is cancelled, gives its slot to the next call.
//!
//! # What counts
//!
//! - Failures ([`failure_codes`](BreakerConfig::failure_codes)): UNAVAILABLE, INTERNAL, UNKNOWN,
//!   DATA_LOSS and DEADLINE_EXCEEDED while the caller still had time (a transport error counts as
//!   UNAVAILABLE, see [`crate::outcome`]).
//! - Successes: OK, which for a call seen by the tower layer means "the response started" (HTTP
//!   200 without `grpc-status` in the headers); the final status of a stream comes later and is not
//!   waited for.
//! - Ignored (neither, not even in the window): every other code, i.e. CANCELLED,
//!   INVALID_ARGUMENT, NOT_FOUND, UNAUTHENTICATED, PERMISSION_DENIED, RESOURCE_EXHAUSTED (an
//!   upstream quota is not an outage), and also ALREADY_EXISTS, FAILED_PRECONDITION, ABORTED,
//!   OUT_OF_RANGE, UNIMPLEMENTED, which are answers about the request, not the backend's health.
//!   A call dropped before its outcome (the caller went away) is ignored too. So is a local
//!   `BULKHEAD_FULL` rejection from the bulkhead below this layer: it says *we* sent too much, not
//!   that the backend failed, and counting it would let our own burst cut off a healthy backend.
//!   So is a call that ended because the *caller's* deadline passed (one impatient tenant must not
//!   open a breaker for everyone), while our own attempt timeout (`ATTEMPT_TIMEOUT`) is a failure;
//!   and so is a backend's refusal for load (UNAVAILABLE `OVERLOADED` or `BULKHEAD_FULL` from
//!   elsewhere): it works, and says when to come back. The rules are [`crate::outcome`]'s.
//! - Slow calls: a counted call whose time to the first response byte (the response headers) is
//!   longer than [`slow_call_threshold`](BreakerConfig::slow_call_threshold) (default 10 s; `0s`
//!   disables) is slow, whether it succeeded or failed. In HALF_OPEN the slow-call rate is judged
//!   over the probes once they have all answered.
//!
//! # Shape
//!
//! [`Breaker`] is the transport-agnostic core (`try_acquire` → [`Permit`] → [`Permit::record`]), so
//! the inference service can wrap its HTTP upstream calls in it and measure time to first token
//! itself. [`Breakers`] keeps one `Breaker` per [`crate::backend::BackendKey`] (requests without a key share the
//! registry's default key). [`CircuitBreakerLayer`] / [`CircuitBreaker`] apply it to gRPC calls.
//!
//! # Metrics
//!
//! Gauge `weir_circuit_breaker_state{backend}` (0 closed, 1 half-open, 2 open), counters
//! `weir_circuit_breaker_transitions_total{backend,to}` and
//! `weir_circuit_breaker_rejected_total{backend}`. The handles are registered when a backend's
//! breaker is created (on its first call), so install the metrics recorder before serving. OPEN →
//! HALF_OPEN happens on the first call after the open duration, so the gauge reads OPEN until then.
//! Transitions are logged at INFO.

mod config;
mod layer;
mod state;

use std::time::Duration;

pub use config::BreakerConfig;
pub(crate) use config::join_key;
pub use layer::{CircuitBreaker, CircuitBreakerLayer, future};
pub use state::{Breaker, BreakerState, Breakers, CircuitOpen, Permit};

type GrpcRequest = http::Request<tonic::body::Body>;
type GrpcResponse = http::Response<tonic::body::Body>;

/// Calls in the sliding window.
pub const DEFAULT_WINDOW: usize = 20;
/// Calls the window must hold before the breaker may open.
pub const DEFAULT_MINIMUM_CALLS: usize = 20;
/// Failure rate (0–1] at or above which the breaker opens.
pub const DEFAULT_FAILURE_RATE: f64 = 0.5;
/// Slow-call rate (0–1] at or above which the breaker opens.
pub const DEFAULT_SLOW_CALL_RATE: f64 = 1.0;
/// Time to first response byte above which a call is slow. Ten seconds is far above a healthy
/// model's time to first token and below the attempt timeout ([`crate::timeout`], 30 s), so a
/// backend that is hanging rather than failing still opens the breaker.
pub const DEFAULT_SLOW_CALL_THRESHOLD: Duration = Duration::from_secs(10);
/// First open duration.
pub const DEFAULT_OPEN_DURATION: Duration = Duration::from_secs(5);
/// Cap of the doubling open duration.
pub const DEFAULT_MAX_OPEN_DURATION: Duration = Duration::from_secs(60);
/// Jitter fraction: each open duration is drawn uniformly from `[d·(1−jitter), d]`, so callers
/// that opened together do not all probe in the same instant. 0 disables it.
pub const DEFAULT_JITTER: f64 = 0.1;
/// Probe calls let through in HALF_OPEN.
pub const DEFAULT_HALF_OPEN_PROBES: usize = 3;
/// Codes that count as failures.
pub const DEFAULT_FAILURE_CODES: [&str; 5] = [
    "UNAVAILABLE",
    "INTERNAL",
    "UNKNOWN",
    "DATA_LOSS",
    "DEADLINE_EXCEEDED",
];
/// ErrorInfo reason of a call refused by an open circuit.
pub const CIRCUIT_OPEN: &str = "CIRCUIT_OPEN";
/// The key of requests that carry no [`crate::backend::BackendKey`], unless the registry is given another.
pub const DEFAULT_BACKEND: &str = "default";
#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
pub(crate) mod tests {
    use std::sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    };

    use rand::{SeedableRng, rngs::StdRng};
    use tonic::Code;
    use tower::{BoxError, Layer, Service, ServiceExt};

    use super::*;
    use tokio::time::Instant;

    use crate::{ApiError, backend::BackendKey, outcome};

    /// A request to the fake backend: it answers `code` (trailers-only unless OK; `None` = a
    /// transport error) after `delay`.
    pub(crate) fn request(
        backend: Option<&str>,
        code: Option<Code>,
        delay: Duration,
    ) -> GrpcRequest {
        let mut request = http::Request::builder()
            .uri("http://backend/weir.v1.Inference/Generate")
            .header(
                "x-code",
                code.map_or_else(|| "transport".to_string(), |c| (c as i32).to_string()),
            )
            .header("x-delay-ms", delay.as_millis().to_string())
            .body(tonic::body::Body::empty())
            .unwrap();
        if let Some(backend) = backend {
            request.extensions_mut().insert(BackendKey::new(backend));
        }
        request
    }

    /// A fake backend driven by the request's `x-code` and `x-delay-ms`, counting its calls.
    pub(crate) fn backend() -> (
        impl Service<GrpcRequest, Response = GrpcResponse, Error = BoxError, Future: Send>
        + Clone
        + Send
        + 'static,
        Arc<AtomicUsize>,
    ) {
        let calls = Arc::new(AtomicUsize::new(0));
        let counter = calls.clone();
        let service = tower::service_fn(move |request: GrpcRequest| {
            counter.fetch_add(1, Ordering::SeqCst);
            let header = |name: &str| {
                request
                    .headers()
                    .get(name)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("")
                    .to_string()
            };
            let code = header("x-code");
            let delay = Duration::from_millis(header("x-delay-ms").parse().unwrap_or(0));
            async move {
                if !delay.is_zero() {
                    tokio::time::sleep(delay).await;
                }
                match code.parse::<i32>() {
                    Ok(0) => Ok(http::Response::new(tonic::body::Body::empty())),
                    Ok(code) => Ok(http::Response::builder()
                        .header("grpc-status", code.to_string())
                        .body(tonic::body::Body::empty())
                        .unwrap()),
                    Err(_) => Err::<GrpcResponse, BoxError>("connection reset".into()),
                }
            }
        });
        (service, calls)
    }

    fn config() -> BreakerConfig {
        BreakerConfig {
            jitter: 0.0,
            ..BreakerConfig::default()
        }
    }

    fn code_of(result: &Result<GrpcResponse, BoxError>) -> Code {
        outcome::classify(result).code
    }

    async fn call<S>(service: &mut S, request: GrpcRequest) -> Result<GrpcResponse, BoxError>
    where
        S: Service<GrpcRequest, Response = GrpcResponse, Error = BoxError>,
    {
        service.ready().await?.call(request).await
    }

    async fn calls<S>(service: &mut S, n: usize, code: Option<Code>)
    where
        S: Service<GrpcRequest, Response = GrpcResponse, Error = BoxError>,
    {
        for _ in 0..n {
            let _ = call(service, request(None, code, Duration::ZERO)).await;
        }
    }

    fn default_key() -> BackendKey {
        BackendKey::new(DEFAULT_BACKEND)
    }

    #[tokio::test(start_paused = true)]
    async fn opens_exactly_at_the_minimum_number_of_calls() {
        let layer = CircuitBreakerLayer::new(config());
        let (inner, _) = backend();
        let mut service = layer.layer(inner);
        calls(&mut service, 19, Some(Code::Unavailable)).await;
        // 19 failures out of 19 calls: 100 %, but below the minimum of 20.
        assert_eq!(layer.breakers().state(&default_key()), BreakerState::Closed);
        calls(&mut service, 1, None).await; // a transport error is a failure too
        assert_eq!(layer.breakers().state(&default_key()), BreakerState::Open);
    }

    #[tokio::test(start_paused = true)]
    async fn opens_exactly_at_the_failure_rate_threshold() {
        let layer = CircuitBreakerLayer::new(config());
        let (inner, _) = backend();
        let mut service = layer.layer(inner);
        calls(&mut service, 11, Some(Code::Ok)).await;
        calls(&mut service, 9, Some(Code::Internal)).await;
        // 9 / 20 = 45 %: stays closed.
        assert_eq!(layer.breakers().state(&default_key()), BreakerState::Closed);
        // The window slides: the oldest success leaves, 10 / 20 = 50 % opens it.
        calls(&mut service, 1, Some(Code::DeadlineExceeded)).await;
        assert_eq!(layer.breakers().state(&default_key()), BreakerState::Open);
    }

    #[tokio::test(start_paused = true)]
    async fn ignored_codes_never_open_it_nor_count_toward_the_minimum() {
        let layer = CircuitBreakerLayer::new(config());
        let (inner, _) = backend();
        let mut service = layer.layer(inner);
        for code in [
            Code::Cancelled,
            Code::InvalidArgument,
            Code::NotFound,
            Code::Unauthenticated,
            Code::PermissionDenied,
            Code::ResourceExhausted,
            Code::FailedPrecondition,
        ] {
            calls(&mut service, 50, Some(code)).await;
        }
        calls(&mut service, 19, Some(Code::DataLoss)).await;
        assert_eq!(layer.breakers().state(&default_key()), BreakerState::Closed);
        calls(&mut service, 1, Some(Code::Unknown)).await;
        assert_eq!(layer.breakers().state(&default_key()), BreakerState::Open);
    }

    #[tokio::test(start_paused = true)]
    async fn local_bulkhead_rejections_are_ignored() {
        let layer = CircuitBreakerLayer::new(config());
        let inner = tower::service_fn(|_: GrpcRequest| async {
            let full = crate::bulkhead::BulkheadFull {
                backend: BackendKey::new("a"),
                limit: 1,
            };
            Err::<GrpcResponse, BoxError>(Box::new(full.into_status()))
        });
        let mut service = layer.layer(inner);
        calls(&mut service, 100, None).await;
        assert_eq!(layer.breakers().state(&default_key()), BreakerState::Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn open_circuit_fails_fast_with_circuit_open_and_time_left() {
        let layer = CircuitBreakerLayer::new(config());
        let (inner, backend_calls) = backend();
        let mut service = layer.layer(inner);
        for _ in 0..20 {
            let _ = call(
                &mut service,
                request(Some("gpt-4o"), Some(Code::Unavailable), Duration::ZERO),
            )
            .await;
        }
        assert_eq!(backend_calls.load(Ordering::SeqCst), 20);
        tokio::time::advance(Duration::from_secs(2)).await;

        let started = Instant::now();
        let result = call(
            &mut service,
            request(Some("gpt-4o"), Some(Code::Ok), Duration::ZERO),
        )
        .await;
        assert_eq!(started.elapsed(), Duration::ZERO);
        assert_eq!(backend_calls.load(Ordering::SeqCst), 20, "not called");
        let status = outcome::find_status(&**result.as_ref().err().unwrap()).unwrap();
        assert_eq!(status.code(), Code::Unavailable);
        let error = ApiError::from_status(status);
        assert_eq!(error.reason(), "CIRCUIT_OPEN");
        assert_eq!(error.retry_after(), Some(Duration::from_secs(3)));
        assert_eq!(
            error.metadata().get("backend").map(String::as_str),
            Some("gpt-4o")
        );
        // Other backends are not affected.
        let other = call(
            &mut service,
            request(Some("sim-small"), Some(Code::Ok), Duration::ZERO),
        )
        .await;
        assert_eq!(code_of(&other), Code::Ok);
    }

    /// Opens the breaker of the default key with 20 failures.
    async fn open<S>(service: &mut S)
    where
        S: Service<GrpcRequest, Response = GrpcResponse, Error = BoxError>,
    {
        calls(service, 20, Some(Code::Unavailable)).await;
    }

    #[tokio::test(start_paused = true)]
    async fn half_open_admits_exactly_n_probes_then_closes_with_a_fresh_window() {
        let layer = CircuitBreakerLayer::new(config());
        let (inner, backend_calls) = backend();
        let mut service = layer.layer(inner);
        open(&mut service).await;
        tokio::time::advance(DEFAULT_OPEN_DURATION).await;

        let mut handles = Vec::new();
        for _ in 0..5 {
            let future = service.ready().await.unwrap().call(request(
                None,
                Some(Code::Ok),
                Duration::from_millis(100),
            ));
            handles.push(tokio::spawn(future));
        }
        assert_eq!(
            layer.breakers().state(&default_key()),
            BreakerState::HalfOpen
        );
        let mut codes = Vec::new();
        for handle in handles {
            codes.push(code_of(&handle.await.unwrap()));
        }
        assert_eq!(
            codes,
            [
                Code::Ok,
                Code::Ok,
                Code::Ok,
                Code::Unavailable,
                Code::Unavailable
            ]
        );
        assert_eq!(backend_calls.load(Ordering::SeqCst), 23);
        assert_eq!(layer.breakers().state(&default_key()), BreakerState::Closed);
        // A fresh window: the 20 failures that opened it are forgotten.
        calls(&mut service, 19, Some(Code::Unavailable)).await;
        assert_eq!(layer.breakers().state(&default_key()), BreakerState::Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_probe_reopens_and_the_open_duration_doubles_up_to_the_cap() {
        let breaker = Arc::new(Breaker::new(BackendKey::new("b"), config()));
        let retry_after = |breaker: &Arc<Breaker>| breaker.try_acquire().err().unwrap().retry_after;
        for _ in 0..20 {
            breaker.try_acquire().unwrap().record(Code::Unavailable);
        }
        let mut durations = vec![retry_after(&breaker)];
        for _ in 0..6 {
            tokio::time::advance(*durations.last().unwrap()).await;
            let probe = breaker.try_acquire().unwrap();
            assert!(probe.is_probe());
            probe.record(Code::Internal);
            assert_eq!(breaker.state(), BreakerState::Open);
            durations.push(retry_after(&breaker));
        }
        let secs: Vec<u64> = durations.iter().map(Duration::as_secs).collect();
        assert_eq!(secs, [5, 10, 20, 40, 60, 60, 60]);

        // Closing resets the backoff.
        tokio::time::advance(Duration::from_secs(60)).await;
        for _ in 0..3 {
            breaker.try_acquire().unwrap().record(Code::Ok);
        }
        assert_eq!(breaker.state(), BreakerState::Closed);
        for _ in 0..20 {
            breaker.try_acquire().unwrap().record(Code::Unavailable);
        }
        assert_eq!(retry_after(&breaker), Duration::from_secs(5));
    }

    #[tokio::test(start_paused = true)]
    async fn jitter_shortens_the_open_duration_within_its_fraction() {
        for seed in 0..50 {
            let config = BreakerConfig {
                jitter: 0.2,
                ..BreakerConfig::default()
            };
            let breaker = Arc::new(Breaker::with_rng(
                BackendKey::new("b"),
                config,
                StdRng::seed_from_u64(seed),
            ));
            for _ in 0..20 {
                breaker.try_acquire().unwrap().record(Code::Unavailable);
            }
            let open = breaker.try_acquire().err().unwrap().retry_after;
            assert!(
                open >= Duration::from_secs(4) && open <= Duration::from_secs(5),
                "{open:?}"
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn cancelled_and_ignored_probes_release_their_slots() {
        let layer = CircuitBreakerLayer::new(config());
        let (inner, backend_calls) = backend();
        let mut service = layer.layer(inner);
        open(&mut service).await;
        tokio::time::advance(DEFAULT_OPEN_DURATION).await;

        // Three probes that hang, then are cancelled by their callers.
        let mut hanging = Vec::new();
        for _ in 0..3 {
            let future = service.ready().await.unwrap().call(request(
                None,
                Some(Code::Ok),
                Duration::from_secs(3600),
            ));
            hanging.push(tokio::spawn(future));
        }
        tokio::task::yield_now().await;
        let rejected = call(&mut service, request(None, Some(Code::Ok), Duration::ZERO)).await;
        assert_eq!(
            code_of(&rejected),
            Code::Unavailable,
            "all probe slots taken"
        );
        for handle in &hanging {
            handle.abort();
        }
        for handle in hanging {
            let _ = handle.await;
        }
        // An ignored probe gives its slot back too.
        let ignored = call(
            &mut service,
            request(None, Some(Code::InvalidArgument), Duration::ZERO),
        )
        .await;
        assert_eq!(code_of(&ignored), Code::InvalidArgument);
        assert_eq!(
            layer.breakers().state(&default_key()),
            BreakerState::HalfOpen
        );
        calls(&mut service, 3, Some(Code::Ok)).await;
        assert_eq!(layer.breakers().state(&default_key()), BreakerState::Closed);
        assert_eq!(backend_calls.load(Ordering::SeqCst), 20 + 3 + 1 + 3);
    }

    #[tokio::test(start_paused = true)]
    async fn slow_calls_open_it() {
        let layer = CircuitBreakerLayer::new(config());
        let (inner, _) = backend();
        let mut service = layer.layer(inner);
        let slow = DEFAULT_SLOW_CALL_THRESHOLD + Duration::from_millis(1);
        for _ in 0..19 {
            let _ = call(&mut service, request(None, Some(Code::Ok), slow)).await;
        }
        assert_eq!(layer.breakers().state(&default_key()), BreakerState::Closed);
        // Exactly at the threshold is not slow.
        let _ = call(
            &mut service,
            request(None, Some(Code::Ok), DEFAULT_SLOW_CALL_THRESHOLD),
        )
        .await;
        assert_eq!(layer.breakers().state(&default_key()), BreakerState::Closed);
        // The window slides past the fast call: 20 / 20 slow opens it.
        let _ = call(&mut service, request(None, Some(Code::Ok), slow)).await;
        assert_eq!(layer.breakers().state(&default_key()), BreakerState::Closed);
        for _ in 0..19 {
            let _ = call(&mut service, request(None, Some(Code::Ok), slow)).await;
        }
        assert_eq!(layer.breakers().state(&default_key()), BreakerState::Open);
    }

    #[tokio::test(start_paused = true)]
    async fn outcomes_of_calls_from_an_earlier_state_are_not_counted() {
        let breaker = Arc::new(Breaker::new(BackendKey::new("b"), config()));
        let late = breaker.try_acquire().unwrap();
        for _ in 0..20 {
            breaker.try_acquire().unwrap().record(Code::Unavailable);
        }
        tokio::time::advance(DEFAULT_OPEN_DURATION).await;
        assert_eq!(breaker.state(), BreakerState::HalfOpen);
        // A call that started while CLOSED fails now: it is no probe and changes nothing.
        late.record(Code::Unavailable);
        assert_eq!(breaker.state(), BreakerState::HalfOpen);
    }

    #[test]
    fn config_defaults_parse_and_validate() {
        let config: BreakerConfig = toml::from_str("").unwrap();
        assert_eq!(config, BreakerConfig::default());
        config.validate("router.breaker").unwrap();
        let config: BreakerConfig = toml::from_str(
            "window = 50\nminimum_calls = 10\nslow_call_threshold = \"0s\"\nopen_duration = \"1s\"\n",
        )
        .unwrap();
        assert_eq!(config.open_duration, Duration::from_secs(1));
        config.validate("router.breaker").unwrap();
        assert!(toml::from_str::<BreakerConfig>("windw = 5").is_err());
    }

    #[test]
    fn validation_names_the_key() {
        let cases = [
            (
                BreakerConfig {
                    failure_rate: 1.5,
                    ..BreakerConfig::default()
                },
                "router.breaker.failure_rate",
            ),
            (
                BreakerConfig {
                    minimum_calls: 30,
                    ..BreakerConfig::default()
                },
                "router.breaker.minimum_calls",
            ),
            (
                BreakerConfig {
                    max_open_duration: Duration::from_secs(1),
                    ..BreakerConfig::default()
                },
                "router.breaker.max_open_duration",
            ),
            (
                BreakerConfig {
                    failure_codes: vec!["UNAVAILABLE".into(), "BROKEN".into()],
                    ..BreakerConfig::default()
                },
                "router.breaker.failure_codes",
            ),
        ];
        for (config, key) in cases {
            let error = config.validate("router.breaker").unwrap_err().to_string();
            assert!(error.contains(&format!("`{key}`")), "{error}");
        }
    }
}
