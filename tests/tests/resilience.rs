//! The resilience layers across real processes (docs/resilience.md), the
//! cross-process tests: router → inference → a real HTTP upstream or a simulated model, with
//! faults injected at the far end and only what a caller can see asserted — status codes, the
//! google.rpc ErrorInfo reason, the model that served, how long the call took, and how many
//! requests the upstream received.
//!
//! Timing: waits are asserted with exact lower bounds where the behaviour requires a wait, and
//! generous upper bounds (several times the expected) where it must not; conditions that take time
//! to become true are polled with [`eventually`], never slept for.
//!
//! `cargo test -p weir-tests --test resilience -- --nocapture` prints the figures of the closing
//! note: the fail-fast latency of an open breaker and the upstream amplification with and without
//! the retry budget.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use tokio::{task::JoinSet, time::Instant};
use tokio_stream::StreamExt;
use tonic::Code;
use tonic_types::StatusExt;
use weir_proto::router::{ServedBy, complete_stream_response::Event};
use weir_tests::{
    Mesh, complete, complete_stream, eventually, reason,
    upstream::{Reply, Upstream},
};

/// Keeps the per-tenant rate limiter (100/s, burst 200 by default) out of the way: these tests are
/// about the client stack, and some of them send far more than 200 calls.
const NO_RATE_LIMIT: &str = "
[router.rate_limit]
enabled = false
";

/// A model served by `upstream` through inference's OpenAI backend.
fn openai_model(name: &str, upstream: &Upstream) -> String {
    format!(
        r#"
[models.{name}]
backend = "openai"
context_window = 128000
openai = {{ base_url = "{}" }}
"#,
        upstream.base_url()
    )
}

fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

/// Router → inference → an upstream answering 503 to everything. The router's breaker for the
/// model opens after `minimum_calls` failures; then calls fail fast with CIRCUIT_OPEN without
/// reaching the upstream; once the upstream is healthy again, after the open duration the
/// half-open probes succeed and the breaker closes.
#[tokio::test]
async fn a_failing_upstream_opens_the_breaker_then_half_open_probes_close_it() {
    const OPEN_FOR: Duration = Duration::from_millis(300);
    let upstream = Upstream::start(Reply::error(503, "the upstream is down"))
        .await
        .unwrap();
    let config = format!(
        r#"
{model}
{NO_RATE_LIMIT}
# One attempt per call, so every failure is one upstream request.
[router.client.inference.retry]
max_attempts = 1

[router.client.inference.breaker]
window = 5
minimum_calls = 5
open_duration = "300ms"
jitter = 0.0
half_open_probes = 2

# Inference's own per-model breaker must not be the one that trips.
[inference.breaker]
window = 1000
minimum_calls = 1000
"#,
        model = openai_model("flaky", &upstream)
    );
    let mesh = Mesh::start(&config).await;
    let mut router = mesh.router();

    // Closed: below the minimum number of calls every call reaches the upstream and fails.
    let mut before_fifth = Instant::now();
    for i in 0..5 {
        before_fifth = Instant::now();
        let status = router
            .complete(complete("flaky", "hello"))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::Unavailable, "call {i}: {status:?}");
        assert_ne!(reason(&status), "CIRCUIT_OPEN", "call {i}: {status:?}");
        assert_eq!(upstream.requests(), i + 1);
    }

    // Open: calls fail fast, the upstream sees nothing. Only calls made well inside the open
    // duration are checked, so a stalled machine cannot turn one into a half-open probe.
    let opened_seen = Instant::now();
    let mut fail_fast = Vec::new();
    while fail_fast.len() < 20 && opened_seen.elapsed() < OPEN_FOR / 2 {
        let started = Instant::now();
        let status = router
            .complete(complete("flaky", "hello"))
            .await
            .unwrap_err();
        fail_fast.push(started.elapsed());
        assert_eq!(status.code(), Code::Unavailable, "{status:?}");
        assert_eq!(reason(&status), "CIRCUIT_OPEN", "{status:?}");
        let retry_delay = status
            .get_error_details()
            .retry_info()
            .and_then(|info| info.retry_delay)
            .expect("an open circuit says when to come back (RetryInfo)");
        assert!(retry_delay <= OPEN_FOR, "{retry_delay:?}");
    }
    assert_eq!(upstream.requests(), 5, "an open breaker calls nobody");
    println!(
        "open breaker: {} fail-fast calls, median {:?} client round trip (router → breaker → \
         back), max {:?}",
        fail_fast.len(),
        median(fail_fast.clone()),
        fail_fast.iter().max().unwrap()
    );

    // The upstream recovers. Calls keep failing fast until the open duration has passed; then
    // the first half-open probe reaches the upstream and succeeds.
    upstream.set_default(Reply::answer("back again"));
    let recovered = eventually(Duration::from_secs(5), || {
        let mut router = router.clone();
        async move {
            match router.complete(complete("flaky", "hello")).await {
                Ok(response) => {
                    assert_eq!(response.into_inner().model, "flaky");
                    true
                }
                Err(status) => {
                    assert_eq!(reason(&status), "CIRCUIT_OPEN", "{status:?}");
                    false
                }
            }
        }
    })
    .await;
    assert!(recovered, "no call succeeded after the open duration");
    // The breaker opened after `before_fifth`, and stays open for exactly OPEN_FOR (no jitter).
    assert!(
        before_fifth.elapsed() >= OPEN_FOR,
        "a call got through after {:?}, before the open duration",
        before_fifth.elapsed()
    );
    assert_eq!(upstream.requests(), 6, "one probe reached the upstream");

    // The second probe succeeds too → closed: more calls than probes all go through.
    for i in 0..6 {
        let response = router
            .complete(complete("flaky", "hello"))
            .await
            .unwrap_or_else(|status| panic!("call {i} after recovery: {status:?}"))
            .into_inner();
        assert_eq!(response.message.unwrap().content, "back again");
        assert_eq!(upstream.requests(), 7 + i);
    }
    mesh.stop().await;
}

const HUNG: &str = r#"
[models.stuck]
sim = { hang = true }
[models.ok]
sim = { output_tokens = 2 }

[router.rate_limit]
enabled = false
"#;

/// How a call to a hung model ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum HungEnd {
    /// Weir answered DEADLINE_EXCEEDED (reason DEADLINE_EXCEEDED).
    WeirDeadlineExceeded,
    /// Weir's answer had not arrived when the caller's own tonic channel gave up at the
    /// `grpc-timeout` it sent (tonic reports that locally as CANCELLED "Timeout expired", with
    /// `TimeoutExpired` as the source: nothing the server sent).
    CallersOwnTimer,
}

/// Whether `status` was made by the caller's own tonic channel when its timeout expired.
fn is_local_timeout(status: &tonic::Status) -> bool {
    let mut source = std::error::Error::source(status);
    while let Some(error) = source {
        if error.downcast_ref::<tonic::TimeoutExpired>().is_some() {
            return true;
        }
        source = error.source();
    }
    false
}

/// Classifies how a call to a hung model ended; anything but the two deadline endings (say
/// UNAVAILABLE, or a CANCELLED sent by the server) fails the test.
fn hung_end(status: &tonic::Status) -> HungEnd {
    match status.code() {
        Code::DeadlineExceeded => {
            assert_eq!(reason(status), "DEADLINE_EXCEEDED", "{status:?}");
            HungEnd::WeirDeadlineExceeded
        }
        Code::Cancelled if is_local_timeout(status) => HungEnd::CallersOwnTimer,
        _ => panic!("a hung call must end by its deadline, got {status:?}"),
    }
}

/// One unary call to the hung model with `timeout`: how it ended and how long it took.
async fn hung_unary(mesh: &Mesh, timeout: Duration) -> (tonic::Status, Duration) {
    let mut request = tonic::Request::new(complete("stuck", "hello"));
    request.set_timeout(timeout);
    let started = Instant::now();
    let status = mesh.router().complete(request).await.unwrap_err();
    (status, started.elapsed())
}

/// One streamed call to the hung model with `timeout`: the status it ended with (as the RPC's
/// answer or as the stream's error; no token may come before it) and how long it took.
async fn hung_stream(mesh: &Mesh, timeout: Duration) -> (tonic::Status, Duration) {
    let mut request = tonic::Request::new(complete_stream("stuck", "hello"));
    request.set_timeout(timeout);
    let started = Instant::now();
    let status = match mesh.router().complete_stream(request).await {
        Err(status) => status,
        Ok(response) => {
            let mut stream = response.into_inner();
            loop {
                match stream.next().await {
                    Some(Ok(event)) => assert!(
                        !matches!(event.event, Some(Event::Delta(_)) | Some(Event::Done(_))),
                        "a hung model produced {event:?}"
                    ),
                    Some(Err(status)) => break status,
                    None => panic!("the stream of a hung model ended without an error"),
                }
            }
        }
    };
    (status, started.elapsed())
}

/// Starts the hung-model mesh and makes one healthy call, so the connections exist and the timed
/// calls measure the hung model alone.
async fn hung_mesh() -> Mesh {
    let mesh = Mesh::start(HUNG).await;
    mesh.router()
        .complete(complete("ok", "warm up"))
        .await
        .expect("a healthy call");
    mesh
}

/// A hung model is bounded by the caller's deadline, not by the hop's own 30 s attempt timeout:
/// the call ends at its deadline — never with UNAVAILABLE, never with a CANCELLED from the
/// server — for unary calls and streams alike, and the model received at most that deadline.
///
/// Which side reports the deadline is a race (see
/// `a_plain_tonic_caller_gets_weirs_deadline_exceeded_not_its_own_cancelled`), so both endings are
/// accepted here.
#[tokio::test]
async fn a_hung_model_is_bounded_by_the_callers_deadline() {
    const TIMEOUT: Duration = Duration::from_millis(300);
    let mesh = hung_mesh().await;
    for (kind, (status, elapsed)) in [
        ("unary", hung_unary(&mesh, TIMEOUT).await),
        ("stream", hung_stream(&mesh, TIMEOUT).await),
    ] {
        let end = hung_end(&status);
        // It waited for the deadline (less the hops' few-millisecond safety margins), then
        // no longer: far from the 30 s attempt timeout.
        assert!(
            elapsed >= TIMEOUT - Duration::from_millis(50),
            "{kind}: {elapsed:?}"
        );
        assert!(elapsed < Duration::from_secs(5), "{kind}: {elapsed:?}");
        println!("hung {kind} call: {end:?} after {elapsed:?} (deadline {TIMEOUT:?})");
    }

    // Both calls reached the model with (at most) the caller's deadline.
    let received = mesh.inference_api().sim_requests_for("stuck");
    assert_eq!(received.len(), 2, "{received:?}");
    for request in received {
        let remaining = request.deadline_remaining.expect("a deadline arrived");
        assert!(remaining <= TIMEOUT, "{remaining:?}");
    }
    mesh.stop().await;
}

/// A 1 s call that spends 200 ms on a failing first model arrives at the fallback with at most
/// 800 ms left: each hop sends only the time remaining.
#[tokio::test]
async fn the_deadline_arrives_reduced_at_the_next_hop() {
    let config = format!(
        r#"
[models.slow-fail]
sim = {{ added_latency = "200ms", error_rate = 1.0 }}
[models.fast]
sim = {{ output_tokens = 4 }}

[router.routes.chain]
models = ["slow-fail", "fast"]

[router.client.inference.retry]
max_attempts = 1
{NO_RATE_LIMIT}
"#
    );
    let mesh = Mesh::start(&config).await;
    let mut request = tonic::Request::new(complete("chain", "hello"));
    request.set_timeout(Duration::from_secs(1));
    let response = mesh
        .router()
        .complete(request)
        .await
        .expect("the fallback answers")
        .into_inner();
    assert_eq!(response.model, "fast");
    assert_eq!(response.served_by(), ServedBy::Fallback);

    let api = mesh.inference_api();
    let first = api.sim_requests_for("slow-fail");
    assert_eq!(first.len(), 1, "one attempt: {first:?}");
    let first = first[0]
        .deadline_remaining
        .expect("a deadline reached slow-fail");
    assert!(first <= Duration::from_secs(1), "{first:?}");
    let second = api.sim_requests_for("fast");
    assert_eq!(second.len(), 1, "{second:?}");
    let second = second[0]
        .deadline_remaining
        .expect("a deadline reached fast");
    assert!(
        second > Duration::ZERO && second <= Duration::from_millis(800),
        "{second:?}"
    );
    println!("deadline left at slow-fail: {first:?}; at fast, after it: {second:?}");
    mesh.stop().await;
}

/// Two calls to a slow model fill its compartment of the router's bulkhead: a third is refused at
/// once with BULKHEAD_FULL, while calls to another model go through untouched. When the slow
/// calls end, the slow model accepts calls again.
#[tokio::test]
async fn a_slow_backend_fills_its_own_bulkhead_only() {
    let config = format!(
        r#"
# A slow stream: first token after 500 ms, then 9 more at 20/s (about 1 s in all).
[models.slow]
sim = {{ time_to_first_token = "500ms", tokens_per_second = 20.0, output_tokens = 10 }}
[models.fast]
sim = {{ output_tokens = 4 }}

[router.client.inference.bulkhead]
max_concurrent = 2
{NO_RATE_LIMIT}
"#
    );
    let mesh = Mesh::start(&config).await;
    let router = mesh.router();

    // Two slow streams in flight (both reached the model, so both hold a slot). They are opened
    // concurrently: the router answers a stream only once its first token is there (500 ms), and
    // each holds its slot until its last token, about a second after it reached the model.
    let mut slow = JoinSet::new();
    for i in 0..2 {
        let mut router = router.clone();
        slow.spawn(async move {
            let mut stream = router
                .complete_stream(complete_stream("slow", &format!("take your time {i}")))
                .await
                .expect("the slow stream opens")
                .into_inner();
            let mut done = false;
            while let Some(event) = stream.next().await {
                if let Some(Event::Done(_)) = event.expect("the slow stream completes").event {
                    done = true;
                }
            }
            done
        });
    }
    assert!(
        eventually(Duration::from_secs(5), || async {
            mesh.inference_api().sim_requests_for("slow").len() == 2
        })
        .await,
        "both slow calls reach the model"
    );

    // Meanwhile: ten calls to the fast model (one after the other: its own compartment holds 2
    // too), and a third slow call.
    let fast = {
        let mut router = router.clone();
        tokio::spawn(async move {
            let mut latencies = Vec::new();
            for i in 0..10 {
                let started = Instant::now();
                let response = router
                    .complete(complete("fast", &format!("quick {i}")))
                    .await
                    .unwrap_or_else(|status| panic!("fast call {i} failed: {status:?}"))
                    .into_inner();
                latencies.push(started.elapsed());
                assert_eq!(response.model, "fast");
            }
            latencies
        })
    };
    let started = Instant::now();
    let status = router
        .clone()
        .complete(complete("slow", "one more"))
        .await
        .unwrap_err();
    let refused_after = started.elapsed();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert_eq!(reason(&status), "BULKHEAD_FULL", "{status:?}");
    // At once: it does not wait for a slot (the slow model's first token alone takes 500 ms).
    assert!(
        refused_after < Duration::from_millis(400),
        "{refused_after:?}"
    );
    let fast_latencies = fast.await.expect("every fast call succeeds");
    let slowest_fast = *fast_latencies.iter().max().unwrap();
    assert!(
        slowest_fast < Duration::from_millis(400),
        "a fast call waited {slowest_fast:?}"
    );
    assert_eq!(
        mesh.inference_api().sim_requests_for("slow").len(),
        2,
        "the refused call was refused by the router, not sent on"
    );
    println!(
        "bulkhead full refused after {refused_after:?}; fast calls meanwhile: median {:?}, \
         max {slowest_fast:?}",
        median(fast_latencies.clone())
    );

    // The slow streams finish; their slots come back.
    while let Some(joined) = slow.join_next().await {
        assert!(
            joined.unwrap(),
            "a slow stream ended without its done event"
        );
    }
    let accepts_again = eventually(Duration::from_secs(5), || {
        let mut router = router.clone();
        async move {
            match router.complete(complete("slow", "again")).await {
                Ok(response) => response.into_inner().model == "slow",
                Err(status) => {
                    assert_eq!(reason(&status), "BULKHEAD_FULL", "{status:?}");
                    false
                }
            }
        }
    })
    .await;
    assert!(
        accepts_again,
        "the slow model accepts calls once its slots are free"
    );
    mesh.stop().await;
}

/// An upstream 429 with `Retry-After: 1` is waited out (the router's default policy retries
/// RESOURCE_EXHAUSTED only with such a pushback) and retried once, not hammered.
#[tokio::test]
async fn a_429_with_retry_after_is_waited_out_not_hammered() {
    let upstream = Upstream::start(Reply::answer("worth the wait"))
        .await
        .unwrap();
    upstream.push(Reply::Error {
        status: 429,
        message: "slow down".to_string(),
        param: None,
        retry_after_secs: Some(1),
    });
    let config = format!("{}{NO_RATE_LIMIT}", openai_model("rate-limited", &upstream));
    let mesh = Mesh::start(&config).await;
    let started = Instant::now();
    let response = mesh
        .router()
        .complete(complete("rate-limited", "hello"))
        .await
        .expect("the retry after the pushback succeeds")
        .into_inner();
    let elapsed = started.elapsed();
    assert_eq!(response.message.unwrap().content, "worth the wait");
    assert_eq!(response.model, "rate-limited");
    assert_eq!(upstream.requests(), 2, "one retry, no more");
    assert!(elapsed >= Duration::from_secs(1), "{elapsed:?}");
    assert!(elapsed < Duration::from_secs(10), "{elapsed:?}");
    println!("429 with Retry-After: 1 → answered after {elapsed:?} with 2 upstream requests");
    mesh.stop().await;
}

/// Calls made, in [`amplification`].
const CALLS: usize = 1000;
/// Callers in parallel, in [`amplification`].
const WORKERS: usize = 32;

/// Sends [`CALLS`] calls from [`WORKERS`] parallel callers to a model whose upstream always answers
/// 503, with 3 attempts per call and `budget` as the router's `[router.client.inference.retry_budget]`;
/// returns the upstream's request count and the time it took.
async fn amplification(budget: &str) -> (usize, Duration) {
    let upstream = Upstream::start(Reply::error(503, "the upstream is down"))
        .await
        .unwrap();
    let config = format!(
        r#"
{model}
{NO_RATE_LIMIT}
[router.client.inference.retry]
max_attempts = 3
initial_backoff = "1ms"
max_backoff = "5ms"

{budget}

# Breakers effectively off, so that only the retry budget limits the load.
[router.client.inference.breaker]
window = 100000
minimum_calls = 100000
[inference.breaker]
window = 100000
minimum_calls = 100000

# Nor may admission control shed any of the calls.
[server.admission]
enabled = false
"#,
        model = openai_model("down", &upstream)
    );
    let mesh = Mesh::start(&config).await;
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut workers = JoinSet::new();
    for _ in 0..WORKERS {
        let mut router = mesh.router();
        let next = next.clone();
        workers.spawn(async move {
            while next.fetch_add(1, Ordering::Relaxed) < CALLS {
                let status = router
                    .complete(complete("down", "hello"))
                    .await
                    .unwrap_err();
                assert_eq!(status.code(), Code::Unavailable, "{status:?}");
            }
        });
    }
    while let Some(joined) = workers.join_next().await {
        joined.unwrap();
    }
    let elapsed = started.elapsed();
    let requests = upstream.requests();
    mesh.stop().await;
    (requests, elapsed)
}

/// Under a 100%-failing upstream, the retry budget keeps the load near 1.2× the calls; without it
/// (the largest ratio the config accepts), 3 attempts per call triple it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_retry_budget_caps_amplification_under_a_failing_upstream() {
    // Default budget: ttl 10 s, floor 10 retries/s, ratio 0.2.
    let (budgeted, elapsed) = amplification("").await;
    // The bound: tower's TpsBudget(10 s, 10, 0.2) deposits 1 token per call and withdraws
    // 1 / 0.2 = 5 per retry, on top of a reserve of 10/s × 10 s × 5 = 500 tokens (100 retries).
    // Nothing expires within the ttl, so while the run lasts under 10 s, retries ≤ 0.2 × CALLS +
    // 100. Its check-then-withdraw is not atomic, so each of the WORKERS concurrent callers can
    // overdraw by at most one retry: upstream requests ≤ 1.2 × CALLS + 100 + WORKERS.
    assert!(
        elapsed < Duration::from_secs(10),
        "the run took {elapsed:?}, longer than the budget's 10 s ttl the bound assumes"
    );
    let bound = CALLS + CALLS / 5 + 100 + WORKERS;
    println!(
        "retry budget (default): {CALLS} calls → {budgeted} upstream requests ({:.2}×) in \
         {elapsed:?}; bound {bound}",
        budgeted as f64 / CALLS as f64
    );
    assert!(budgeted <= bound, "{budgeted} > {bound}");
    assert!(budgeted > CALLS, "some calls were retried: {budgeted}");

    // Effectively no budget: ratio 1000 (the config's maximum) means 1000 retries per call.
    let (unbudgeted, elapsed) = amplification(
        "[router.client.inference.retry_budget]
retry_ratio = 1000.0",
    )
    .await;
    println!(
        "retry budget (ratio 1000, i.e. none): {CALLS} calls → {unbudgeted} upstream requests \
         ({:.2}×) in {elapsed:?}",
        unbudgeted as f64 / CALLS as f64
    );
    assert!(
        unbudgeted * 2 >= CALLS * 5,
        "without a budget every call is tried 3 times: {unbudgeted}"
    );
}
