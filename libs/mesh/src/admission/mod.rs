//! Admission control: a concurrency limit per server that sheds the least important requests
//! first, and keeps goodput at capacity while it does.
//!
//! Layout, as in tower: [`config`] (the `[<service>.admission]` table and its defaults),
//! [`limit`] (the in-flight count, the adaptive limit, [`Permit`] and the [`Admitted`] handle),
//! [`layer`] (the tower `Layer` / `Service`, its response future and body).
//!
//! # Why a concurrency limit, and why adaptive
//!
//! A server past its capacity does not get slower gracefully: queues grow, every request waits
//! behind all the others, and soon every caller times out and retries, so the server spends its
//! time on work nobody is waiting for. Capping the number of requests *in flight* (Little's law:
//! in-flight = throughput × latency) keeps queues short, and refusing the excess at once, with a
//! cheap UNAVAILABLE, is far kinder than serving it late. The right cap depends on what the server
//! and its dependencies can do right now, so by default it is learned.
//!
//! A limit can be wrong in two directions, and they do not cost the same. Too high costs latency:
//! requests queue inside the server before it sheds. Too low costs goodput: the server refuses
//! work it could have done, and nothing gets that capacity back. So the limiter is built to err
//! high: it never shrinks on signals that say nothing about load, it shrinks by a bounded step,
//! and it keeps a queue headroom that stops it from collapsing.
//!
//! # The algorithm: a windowed latency gradient with queue headroom
//!
//! Studied: Netflix concurrency-limits (AIMD, Vegas, Gradient2) and Envoy's adaptive concurrency
//! filter. The AIMD limiter this module used before cut the limit by 10 % on every sample above
//! twice a moving latency baseline; under CPU saturation every sample is above it, so the limit
//! fell to its minimum and the server shed most of what it could have served (goodput at 51 % of
//! capacity at 1.2× offered load), and a burst of callers whose own deadlines passed (each one a
//! "dropped" sample) cut it from 2000 to 243. Vegas estimates the queue as
//! `limit × (1 − min_rtt / rtt)` and moves by ±log10(limit) per sample: stable, but per-sample
//! and slow to come down from a high start. Envoy's filter pins concurrency low at intervals to
//! re-measure the minimum latency, which sheds good traffic on purpose every few seconds.
//! Gradient2 moves the limit by the ratio of a long-term to a short-term latency plus a queue
//! allowance, which tolerates a latency rise and never collapses, but its long-term average
//! drifts up under a sustained overload.
//!
//! What is used here takes Gradient2's update with a Vegas-style baseline:
//!
//! - Samples: only requests that completed work or failed in the backend
//!   ([`crate::outcome::Class::is_sample`]). A caller whose deadline passed or who went away, a
//!   request refused by a local layer (rate limit, auth) and a caller's mistake record nothing and
//!   never move the limit. Latency is measured to the response headers (for a stream: until the
//!   handler returned its stream), because the length of a streamed LLM answer says how many
//!   tokens were asked for, not how loaded the server is.
//! - Windows: samples are averaged over a [`AdmissionConfig::window`] (100 ms) with at least
//!   [`AdmissionConfig::min_window_samples`] (10) samples; the limit moves at most once per
//!   window, so one burst of slow completions moves it once, not once per completion.
//! - Baseline: the lowest window latency over the last [`AdmissionConfig::baseline_window`]
//!   windows (about a minute): the no-load latency. It does not drift up during an overload
//!   shorter than that, and follows a lasting change in a dependency's speed after it.
//! - Gradient: `g = clamp(tolerance × baseline / latency, backoff_ratio, 1)` with
//!   [`AdmissionConfig::latency_tolerance`] 2 (or [`AdmissionConfig::latency_threshold`] /
//!   latency when a fixed threshold is set) and [`AdmissionConfig::backoff_ratio`] 0.95.
//! - Update: congested (`g < 1`): `limit ← min(limit, limit × g + √limit)`, whether or not
//!   the limit is in use (a limit far above the in-flight count while latency climbs would let
//!   the queue grow unchecked until it is reached); healthy: `limit ← limit + √limit`, up to
//!   [`AdmissionConfig::initial_limit`] at any load (so the limit recovers after an overload)
//!   and beyond it only while at least half of it was in flight during the window (an idle
//!   server that grew its limit without bound would lose its protection). The √limit headroom is Gradient2's queue allowance: under the worst
//!   congestion the limit settles where `0.1 × limit = √limit`, at 100, instead of at the minimum,
//!   and after the overload it grows back from 100 to 2000 in about 8 s of busy windows.
//! - Bounds: [`AdmissionConfig::min_limit`] .. [`AdmissionConfig::max_limit`];
//!   `algorithm = "static"` pins the limit at [`AdmissionConfig::initial_limit`].
//!
//! Known limit: the latency signal assumes calls of one kind. A server whose calls differ in
//! latency by orders of magnitude and that runs near its limit should set a
//! [`AdmissionConfig::latency_threshold`] or a static limit.
//!
//! # Criticality-aware shedding
//!
//! All requests share one in-flight count, but each [`Criticality`](crate::criticality::Criticality) may only be admitted while the
//! count is below its own share of the current limit L:
//!
//! | criticality | admitted while in flight < | default |
//! |---|---|---|
//! | SHEDDABLE | `shares.sheddable` × L | 50 % |
//! | SHEDDABLE_PLUS | `shares.sheddable_plus` × L | 75 % |
//! | CRITICAL | L | 100 % |
//! | CRITICAL_PLUS | `shares.critical_plus` × L | 150 % |
//!
//! So as load rises, batch traffic is refused first while interactive traffic still finds free
//! slots, and CRITICAL_PLUS has headroom above the limit (bounded, so it cannot push the server
//! into collapse on its own). Each share is at least one request. Shedding costs two atomic loads
//! and the answer; the metric handles are registered once per server.
//!
//! A handler that learns a request's criticality only from its body (the router's `criticality`
//! field) re-checks the slot with the [`Admitted`] handle the layer puts in the request's
//! extensions: [`Admitted::readmit`].
//!
//! # Answers
//!
//! A shed request is answered at once, without reaching the handler: UNAVAILABLE, reason
//! `OVERLOADED`, with RetryInfo and `grpc-retry-pushback-ms` = [`AdmissionConfig::pushback`]
//! (default 1 s). A SHEDDABLE request shed while the server is full even for CRITICAL traffic
//! gets `grpc-retry-pushback-ms: -1` and no RetryInfo: "do not retry", because retrying batch
//! work into a saturated server only steals capacity from interactive traffic.
//! A `weir-criticality` header that is not one of the four names is answered INVALID_ARGUMENT.
//!
//! Health checks (`/grpc.health.v1.Health/`) and reflection (`/grpc.reflection.`) are never
//! counted or shed: a load balancer must still see an overloaded server as alive and SERVING, or it
//! would move all of its traffic to the remaining servers at once.
//!
//! The semantics are described for users in `docs/resilience.md`.
//!
//! # Metrics
//!
//! `weir_shed_requests_total{service, criticality}`, `weir_admission_in_flight{service}`,
//! `weir_admission_limit{service}`.

pub mod config;
pub mod layer;
pub mod limit;

pub use config::*;
pub use layer::{Admission, AdmissionLayer, body, future};
pub use limit::{AdmissionController, Admitted, OVERLOADED, Permit, Shed};

/// True for the paths that are never shed, counted, authenticated or rate limited: gRPC health and
/// reflection.
pub fn is_exempt_path(path: &str) -> bool {
    path.starts_with("/grpc.health.v1.Health/") || path.starts_with("/grpc.reflection.")
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use std::convert::Infallible;

    use http_body_util::{BodyExt, Empty, StreamBody};
    use tokio::sync::mpsc;
    use tokio_stream::wrappers::ReceiverStream;
    use tonic::{Code, codegen::Bytes};
    use tower::ServiceExt;

    use std::{
        sync::{Arc, Mutex},
        time::Duration,
    };

    use http::{HeaderValue, Request, Response};
    use tower::{Layer, Service};

    use super::*;
    use crate::{
        criticality::Criticality,
        deadline::Deadline,
        error::ApiError,
        metadata::{CRITICALITY, RETRY_PUSHBACK_MS},
    };

    type TestBody = tonic::body::Body;
    type Frame = http_body::Frame<Bytes>;

    fn request(path: &str, criticality: Option<&'static str>) -> Request<()> {
        let mut request = Request::builder().uri(path).body(()).unwrap();
        if let Some(c) = criticality {
            request
                .headers_mut()
                .insert(CRITICALITY, HeaderValue::from_static(c));
        }
        request
    }

    fn code<B>(response: &Response<B>) -> Code {
        tonic::Status::from_header_map(response.headers())
            .map(|s| s.code())
            .unwrap_or(Code::Ok)
    }

    /// A handler that takes `delay` (on the paused clock) and answers with an empty body.
    fn slow(
        delay: Duration,
    ) -> impl Service<Request<()>, Response = Response<TestBody>, Error = Infallible> + Clone {
        tower::service_fn(move |_request: Request<()>| async move {
            tokio::time::sleep(delay).await;
            Ok::<_, Infallible>(Response::new(TestBody::default()))
        })
    }

    #[tokio::test(start_paused = true)]
    async fn sheds_the_lowest_criticality_first() {
        let layer = AdmissionLayer::new(&AdmissionConfig::fixed(10));
        let controller = layer.controller().clone();
        let mut service = layer.layer(slow(Duration::from_secs(60)));
        // Five slow CRITICAL requests take half the limit: SHEDDABLE is now refused.
        let mut held = Vec::new();
        for _ in 0..5 {
            held.push(service.call(request("/weir.Test/Run", None)));
        }
        let response = service
            .call(request("/weir.Test/Run", Some("SHEDDABLE")))
            .await
            .unwrap();
        assert_eq!(code(&response), Code::Unavailable);
        let status = tonic::Status::from_header_map(response.headers()).unwrap();
        assert_eq!(ApiError::from_status(&status).reason(), "OVERLOADED");
        assert_eq!(
            crate::error::pushback(&status),
            Some(DEFAULT_PUSHBACK),
            "not saturated yet: come back later"
        );
        // SHEDDABLE_PLUS still fits (below 75 %) up to 7 in flight.
        held.push(service.call(request("/weir.Test/Run", Some("SHEDDABLE_PLUS"))));
        held.push(service.call(request("/weir.Test/Run", Some("SHEDDABLE_PLUS"))));
        let response = service
            .call(request("/weir.Test/Run", Some("SHEDDABLE_PLUS")))
            .await
            .unwrap();
        assert_eq!(code(&response), Code::Unavailable);
        // CRITICAL is admitted until the limit.
        for _ in 0..3 {
            held.push(service.call(request("/weir.Test/Run", Some("CRITICAL"))));
        }
        assert_eq!(controller.in_flight(), 10);
        let response = service.call(request("/weir.Test/Run", None)).await.unwrap();
        assert_eq!(code(&response), Code::Unavailable);
        // Saturated: SHEDDABLE is told not to retry at all.
        let response = service
            .call(request("/weir.Test/Run", Some("SHEDDABLE")))
            .await
            .unwrap();
        let pushback = response.headers().get(RETRY_PUSHBACK_MS).cloned();
        assert_eq!(pushback, Some(HeaderValue::from_static("-1")));
        // CRITICAL_PLUS has headroom above the limit (150 %).
        for _ in 0..5 {
            held.push(service.call(request("/weir.Test/Run", Some("CRITICAL_PLUS"))));
        }
        let response = service
            .call(request("/weir.Test/Run", Some("CRITICAL_PLUS")))
            .await
            .unwrap();
        assert_eq!(code(&response), Code::Unavailable);
        assert_eq!(controller.in_flight(), 15);
        // Health checks are never shed.
        let response = service
            .call(request("/grpc.health.v1.Health/Check", Some("SHEDDABLE")))
            .await
            .unwrap();
        assert_eq!(code(&response), Code::Ok);
        // The held requests complete and give their slots back.
        for response in futures::future::join_all(held).await {
            let response = response.unwrap();
            assert_eq!(code(&response), Code::Ok);
            drop(response);
        }
        assert_eq!(controller.in_flight(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn permits_return_after_cancellation() {
        let layer = AdmissionLayer::new(&AdmissionConfig::fixed(4));
        let controller = layer.controller().clone();
        let mut service = layer.layer(slow(Duration::from_secs(60)));
        for _ in 0..10 {
            let futures: Vec<_> = (0..4)
                .map(|_| service.call(request("/weir.Test/Run", None)))
                .collect();
            assert_eq!(controller.in_flight(), 4);
            // A caller that goes away mid-call drops the future.
            let _ = tokio::time::timeout(
                Duration::from_millis(10),
                futures::future::join_all(futures),
            )
            .await;
            assert_eq!(controller.in_flight(), 0);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn permit_is_held_until_a_streamed_body_ends_or_drops() {
        let (senders_tx, mut senders_rx) = mpsc::unbounded_channel();
        let streaming = tower::service_fn(move |_request: Request<()>| {
            let senders_tx = senders_tx.clone();
            async move {
                let (tx, rx) = mpsc::channel::<Result<Frame, Infallible>>(4);
                let _ = senders_tx.send(tx);
                Ok::<_, Infallible>(Response::new(TestBody::new(StreamBody::new(
                    ReceiverStream::new(rx),
                ))))
            }
        });
        let layer = AdmissionLayer::new(&AdmissionConfig::fixed(4));
        let controller = layer.controller().clone();
        let service = layer.layer(streaming);

        // A stream read to its end gives the permit back at the end, not at the headers.
        let response = service
            .clone()
            .oneshot(request("/weir.Test/Stream", None))
            .await
            .unwrap();
        let tx = senders_rx.recv().await.unwrap();
        assert_eq!(
            controller.in_flight(),
            1,
            "headers sent, stream still running"
        );
        let mut body = response.into_body();
        tx.send(Ok(Frame::data(Bytes::from_static(b"token"))))
            .await
            .unwrap();
        assert!(body.frame().await.is_some());
        assert_eq!(controller.in_flight(), 1);
        drop(tx);
        assert!(body.frame().await.is_none());
        assert!(!body.holds_permit());
        assert_eq!(controller.in_flight(), 0);
        drop(body);

        // A stream the client abandons gives it back when the body is dropped.
        let response = service
            .clone()
            .oneshot(request("/weir.Test/Stream", None))
            .await
            .unwrap();
        let _tx = senders_rx.recv().await.unwrap();
        assert_eq!(controller.in_flight(), 1);
        drop(response);
        assert_eq!(controller.in_flight(), 0);
    }

    /// A handler whose latency (on the paused clock) and answer code the test sets.
    fn tunable(
        latency: Arc<Mutex<Duration>>,
        code: Arc<Mutex<Code>>,
    ) -> impl Service<Request<()>, Response = Response<Empty<Bytes>>, Error = Infallible> + Clone
    {
        tower::service_fn(move |_request: Request<()>| {
            let delay = *latency.lock().unwrap();
            let code = *code.lock().unwrap();
            async move {
                tokio::time::sleep(delay).await;
                let mut response = Response::new(Empty::<Bytes>::new());
                if code != Code::Ok {
                    response.headers_mut().insert(
                        "grpc-status",
                        HeaderValue::from_str(&(code as i32).to_string()).unwrap(),
                    );
                }
                Ok::<_, Infallible>(response)
            }
        })
    }

    fn adaptive(initial: u32, min: u32, max: u32) -> AdmissionConfig {
        AdmissionConfig {
            initial_limit: initial,
            min_limit: min,
            max_limit: max,
            ..AdmissionConfig::default()
        }
    }

    /// `n` concurrent requests through `service`, each with a deadline `deadline` from now.
    async fn round<S>(service: &S, n: usize, deadline: Option<Duration>)
    where
        S: Service<Request<()>> + Clone,
    {
        let calls = (0..n).map(|_| {
            let mut request = request("/t/Run", None);
            if let Some(deadline) = deadline {
                request.extensions_mut().insert(Deadline::after(deadline));
            }
            service.clone().oneshot(request)
        });
        let _ = futures::future::join_all(calls).await;
    }

    #[tokio::test(start_paused = true)]
    async fn gradient_lowers_the_limit_under_queueing_without_collapse_and_recovers() {
        let controller = AdmissionController::new(&adaptive(2000, 5, 5000));
        let latency = Arc::new(Mutex::new(Duration::from_millis(10)));
        let code = Arc::new(Mutex::new(Code::Ok));
        let service = AdmissionLayer::with_controller(controller.clone())
            .layer(tunable(latency.clone(), code.clone()));

        // Healthy and busy (more than half the limit in flight): the limit grows.
        for _ in 0..30 {
            round(&service, controller.limit() * 3 / 4, None).await;
        }
        let healthy = controller.limit();
        assert!(
            healthy > 2000,
            "healthy and busy: the limit grows, got {healthy}"
        );

        // Latency rises tenfold while the limit is in use: queueing. It comes down, one bounded
        // step per window...
        *latency.lock().unwrap() = Duration::from_millis(100);
        let mut limits = Vec::new();
        for _ in 0..150 {
            round(&service, controller.limit(), None).await;
            limits.push(controller.limit());
        }
        let lowered = controller.limit();
        assert!(
            lowered < healthy / 3,
            "the limit comes down: {healthy} -> {limits:?}"
        );
        assert!(
            limits.windows(2).all(|w| w[1] as f64 >= w[0] as f64 * 0.94),
            "at most 5 % per window: {limits:?}"
        );
        // ...but the √limit headroom keeps it near 400, far above min_limit.
        assert!((380..=450).contains(&lowered), "no collapse: {limits:?}");

        // Latency back to normal, light load: within seconds (a round takes 10 ms: 500 rounds
        // are 5 s) the limit is back at its starting point, not beyond.
        *latency.lock().unwrap() = Duration::from_millis(10);
        for _ in 0..500 {
            round(&service, 20, None).await;
        }
        assert_eq!(
            controller.limit(),
            2000,
            "recovered to initial_limit at light load"
        );
        let recovered = controller.limit();
        assert!(
            recovered >= 2000,
            "the limit recovers: {lowered} -> {recovered}"
        );
        assert!(recovered <= 5000, "never above max_limit");
    }

    #[tokio::test(start_paused = true)]
    async fn caller_gone_rejections_and_caller_errors_never_move_the_limit() {
        // A deep backoff, so that one congested window visibly lowers this small limit.
        let controller = AdmissionController::new(&AdmissionConfig {
            backoff_ratio: 0.5,
            ..adaptive(40, 5, 100)
        });
        let latency = Arc::new(Mutex::new(Duration::from_millis(10)));
        let code = Arc::new(Mutex::new(Code::Ok));
        let service = AdmissionLayer::with_controller(controller.clone())
            .layer(tunable(latency.clone(), code.clone()));
        // A baseline of fast calls.
        for _ in 0..20 {
            round(&service, 30, None).await;
        }
        let before = controller.limit();

        // Impatient callers: every call takes 200 ms and ends DEADLINE_EXCEEDED because the
        // caller's 50 ms deadline passed (what the deadline layer answers). No sample.
        *latency.lock().unwrap() = Duration::from_millis(200);
        *code.lock().unwrap() = Code::DeadlineExceeded;
        for _ in 0..20 {
            round(&service, 30, Some(Duration::from_millis(50))).await;
        }
        assert_eq!(
            controller.limit(),
            before,
            "caller-gone calls are no samples"
        );

        // Callers that cancel, callers' mistakes, local refusals of inner layers: no samples.
        for code_now in [
            Code::Cancelled,
            Code::InvalidArgument,
            Code::ResourceExhausted,
            Code::Unauthenticated,
        ] {
            *code.lock().unwrap() = code_now;
            for _ in 0..10 {
                round(&service, 30, None).await;
            }
            assert_eq!(controller.limit(), before, "{code_now:?} is no sample");
        }
        // Callers that go away before the answer: the future is dropped, no sample.
        *code.lock().unwrap() = Code::Ok;
        for _ in 0..10 {
            let _ =
                tokio::time::timeout(Duration::from_millis(20), round(&service, 30, None)).await;
        }
        assert_eq!(controller.limit(), before, "dropped calls are no samples");
        assert_eq!(controller.in_flight(), 0);

        // A backend failure that took the same 200 ms while the caller still had time is one.
        *code.lock().unwrap() = Code::Unavailable;
        for _ in 0..20 {
            round(&service, 30, Some(Duration::from_secs(5))).await;
        }
        assert!(controller.limit() < before, "backend failures are samples");
    }

    #[tokio::test(start_paused = true)]
    async fn admitted_handle_readmits_under_the_body_criticality() {
        let layer = AdmissionLayer::new(&AdmissionConfig::fixed(10));
        let controller = layer.controller().clone();
        let (handles_tx, mut handles_rx) = mpsc::unbounded_channel();
        let service = layer.layer(tower::service_fn(move |request: Request<()>| {
            let handle = request.extensions().get::<Admitted>().cloned();
            let handles_tx = handles_tx.clone();
            async move {
                let _ = handles_tx.send(handle);
                tokio::time::sleep(Duration::from_secs(60)).await;
                Ok::<_, Infallible>(Response::new(TestBody::default()))
            }
        }));
        let mut held = Vec::new();
        let mut handles = Vec::new();
        // Four CRITICAL (header) requests in flight.
        for _ in 0..4 {
            held.push(tokio::spawn(
                service.clone().oneshot(request("/weir.Test/Run", None)),
            ));
            handles.push(
                handles_rx
                    .recv()
                    .await
                    .unwrap()
                    .expect("handle in extensions"),
            );
        }
        assert_eq!(controller.in_flight(), 4);
        let first = handles[0].clone();
        assert_eq!(first.criticality(), Criticality::Critical);
        // 4 in flight (3 others): SHEDDABLE's share is 5, so it would have been admitted.
        first.readmit(Criticality::Sheddable).unwrap();
        assert_eq!(first.criticality(), Criticality::Sheddable);
        assert_eq!(
            handles[0].clone().criticality(),
            Criticality::Sheddable,
            "clones share the criticality"
        );
        // Two more: 6 in flight, 5 others: SHEDDABLE would be shed now, SHEDDABLE_PLUS not.
        for _ in 0..2 {
            held.push(tokio::spawn(
                service.clone().oneshot(request("/weir.Test/Run", None)),
            ));
            handles.push(handles_rx.recv().await.unwrap().unwrap());
        }
        let second = handles[1].clone();
        let error = second.readmit(Criticality::Sheddable).unwrap_err();
        assert_eq!(error.code(), Code::Unavailable);
        assert_eq!(error.reason(), OVERLOADED);
        assert_eq!(error.retry_after(), Some(DEFAULT_PUSHBACK));
        assert_eq!(
            second.criticality(),
            Criticality::Critical,
            "unchanged on refusal"
        );
        second.readmit(Criticality::SheddablePlus).unwrap();
        // Back to CRITICAL is fine at this load; CRITICAL_PLUS always fits below 150 %.
        first.readmit(Criticality::Critical).unwrap();
        first.readmit(Criticality::CriticalPlus).unwrap();
        assert_eq!(first.criticality(), Criticality::CriticalPlus);
        // The readmission changed nothing about the slots held.
        assert_eq!(controller.in_flight(), 6);
        for call in held {
            call.abort();
        }
        assert!(
            weir_eventually(|| controller.in_flight() == 0).await,
            "aborted calls give their slots back"
        );

        // With admission disabled, readmission always succeeds.
        let open = AdmissionLayer::new(&AdmissionConfig {
            enabled: false,
            ..AdmissionConfig::fixed(1)
        });
        let (tx, mut rx) = mpsc::unbounded_channel();
        let service = open.layer(tower::service_fn(move |request: Request<()>| {
            let _ = tx.send(request.extensions().get::<Admitted>().cloned());
            async { Ok::<_, Infallible>(Response::new(TestBody::default())) }
        }));
        for _ in 0..3 {
            let _ = service
                .clone()
                .oneshot(request("/weir.Test/Run", None))
                .await;
        }
        let handle = rx.recv().await.unwrap().unwrap();
        handle.readmit(Criticality::Sheddable).unwrap();
    }

    /// Yields until `check` holds (at most a thousand times).
    async fn weir_eventually(check: impl Fn() -> bool) -> bool {
        for _ in 0..1000 {
            if check() {
                return true;
            }
            tokio::task::yield_now().await;
        }
        false
    }

    #[tokio::test(start_paused = true)]
    async fn static_limit_does_not_move_and_invalid_criticality_is_refused() {
        let layer = AdmissionLayer::new(&AdmissionConfig::fixed(3));
        let controller = layer.controller().clone();
        let service = layer.layer(slow(Duration::from_secs(5)));
        for _ in 0..3 {
            let calls = (0..3).map(|_| service.clone().oneshot(request("/t/Run", None)));
            futures::future::join_all(calls).await;
        }
        assert_eq!(controller.limit(), 3);
        let response = service
            .clone()
            .oneshot(request("/t/Run", Some("URGENT")))
            .await
            .unwrap();
        assert_eq!(code(&response), Code::InvalidArgument);
        let status = tonic::Status::from_header_map(response.headers()).unwrap();
        assert!(status.message().contains(CRITICALITY), "{status:?}");
    }

    #[test]
    fn config_validation_names_the_key() {
        assert!(
            AdmissionConfig::default()
                .validate("router.admission")
                .is_ok()
        );
        let bad = AdmissionConfig {
            min_limit: 50,
            max_limit: 20,
            ..AdmissionConfig::default()
        };
        let error = bad
            .validate("router.admission")
            .err()
            .map(|e| e.to_string());
        assert!(
            error
                .as_deref()
                .is_some_and(|e| e.contains("router.admission.max_limit")),
            "{error:?}"
        );
        let text = "initial_limit = 20\nlatency_threshold = \"250ms\"\nalgorithm = \"static\"\n\
                    [shares]\nsheddable = 0.4\n";
        let parsed: AdmissionConfig = toml::from_str(text).unwrap();
        assert_eq!(parsed.latency_threshold, Some(Duration::from_millis(250)));
        assert_eq!(parsed.algorithm, LimitAlgorithm::Static);
        assert_eq!(parsed.shares.sheddable_plus, DEFAULT_SHEDDABLE_PLUS_SHARE);
    }
}
