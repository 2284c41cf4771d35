//! Load shedding across real processes: a router offered twice what its concurrency limit can
//! serve keeps serving CRITICAL traffic and sheds SHEDDABLE traffic first, with a clean
//! UNAVAILABLE / `OVERLOADED` answer that tells the client when (or whether) to come back.
//!
//! The figures for the closing note are printed by
//! `cargo test -p weir-tests --test overload -- --nocapture`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use tokio::time::Instant;
use tonic::{Code, metadata::MetadataValue, transport::Channel};
use weir::stack::Service;
use weir_proto::router::router_service_client::RouterServiceClient;
use weir_tests::{Mesh, complete, reason};

/// The router's fixed concurrency limit.
const LIMIT: usize = 16;
/// Time the simulated model takes per request.
const MODEL_TIME: Duration = Duration::from_millis(100);
/// How long the overload lasts.
const LOAD_TIME: Duration = Duration::from_secs(2);
/// Interactive clients: half of the limit, so they fit next to SHEDDABLE's share (50 % of the
/// limit by default) — the shedder can protect them completely, and a shed CRITICAL request is
/// the shedder's fault.
const CRITICAL_CLIENTS: usize = LIMIT / 2;
/// Batch clients: with the interactive ones, twice as many clients as the limit.
const SHEDDABLE_CLIENTS: usize = 2 * LIMIT - CRITICAL_CLIENTS;

/// The inference service alone, with admission off: it is not what this test measures.
const INFERENCE_CONFIG: &str = r#"
[models.work]
sim = { time_to_first_token = "100ms", output_tokens = 4 }

[server.admission]
enabled = false
"#;

/// The router in front of it, with a fixed limit and default shares (SHEDDABLE may use half).
fn router_config(inference_url: &str) -> String {
    format!(
        r#"
[models.work]
sim = {{ time_to_first_token = "100ms", output_tokens = 4 }}

[router]
inference_url = "{inference_url}"

[router.rate_limit]
enabled = false

[server.admission]
algorithm = "static"
initial_limit = {LIMIT}
"#
    )
}

/// What one class of clients saw.
#[derive(Debug, Default)]
struct Outcomes {
    ok: usize,
    /// UNAVAILABLE, reason OVERLOADED.
    shed: usize,
    /// Shed answers that carried `grpc-retry-pushback-ms`.
    shed_with_pushback: usize,
    /// Of those, the ones that said "do not retry" (-1).
    shed_do_not_retry: usize,
    /// Latencies of the successful requests.
    ok_latencies: Vec<Duration>,
    /// Anything else, with the first few for the failure message.
    other: usize,
    other_examples: Vec<String>,
}

impl Outcomes {
    fn total(&self) -> usize {
        self.ok + self.shed + self.other
    }

    /// The median and the largest latency of the successful requests.
    fn latency(&self) -> (Duration, Duration) {
        let mut sorted = self.ok_latencies.clone();
        sorted.sort();
        (
            sorted.get(sorted.len() / 2).copied().unwrap_or_default(),
            sorted.last().copied().unwrap_or_default(),
        )
    }

    fn success_rate(&self) -> f64 {
        if self.total() == 0 {
            0.0
        } else {
            self.ok as f64 / self.total() as f64
        }
    }

    fn record(&mut self, result: Result<(), tonic::Status>, latency: Duration) {
        match result {
            Ok(()) => {
                self.ok += 1;
                self.ok_latencies.push(latency);
            }
            Err(status)
                if status.code() == Code::Unavailable && reason(&status) == "OVERLOADED" =>
            {
                self.shed += 1;
                if let Some(pushback) = status.metadata().get("grpc-retry-pushback-ms") {
                    self.shed_with_pushback += 1;
                    if pushback.to_str().is_ok_and(|v| v.trim() == "-1") {
                        self.shed_do_not_retry += 1;
                    }
                }
            }
            Err(status) => {
                self.other += 1;
                if self.other_examples.len() < 3 {
                    self.other_examples.push(format!("{status:?}"));
                }
            }
        }
    }
}

/// One client: a request at most every [`MODEL_TIME`] (at once again when an answer took that
/// long, after the rest of the interval when it was refused early), until `stop`.
async fn client(
    mut router: RouterServiceClient<Channel>,
    criticality: &'static str,
    outcomes: Arc<Mutex<Outcomes>>,
    stop: Arc<AtomicBool>,
) {
    let mut n = 0;
    while !stop.load(Ordering::Relaxed) {
        let started = Instant::now();
        let mut request = tonic::Request::new(complete("work", &format!("{criticality} {n}")));
        request
            .metadata_mut()
            .insert("weir-criticality", MetadataValue::from_static(criticality));
        request.set_timeout(Duration::from_secs(5));
        let result = router.complete(request).await.map(drop);
        outcomes.lock().unwrap().record(result, started.elapsed());
        n += 1;
        tokio::time::sleep_until(started + MODEL_TIME).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twice_the_capacity_keeps_critical_and_sheds_sheddable() {
    // The router is the only server that sheds: the inference service behind it runs in its own
    // stack with admission off (`[server.admission]` is shared by every service of a stack, and an
    // inference service shedding CRITICAL calls the router had admitted would blur what is
    // measured here).
    let inference = Mesh::start_services(INFERENCE_CONFIG, &[Service::Inference]).await;
    let mesh = Mesh::start_services(
        &router_config(&inference.url(Service::Inference)),
        &[Service::Router],
    )
    .await;

    // Warm up the connections, and measure what a request costs without load.
    let mut idle = Outcomes::default();
    for i in 0..5 {
        let started = Instant::now();
        let result = mesh
            .router()
            .complete(complete("work", &format!("idle {i}")))
            .await
            .map(drop);
        idle.record(result, started.elapsed());
    }
    assert_eq!(idle.ok, 5, "an idle router answers: {idle:?}");
    let (idle_latency, _) = idle.latency();

    let critical = Arc::new(Mutex::new(Outcomes::default()));
    let sheddable = Arc::new(Mutex::new(Outcomes::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let mut clients = tokio::task::JoinSet::new();
    for i in 0..CRITICAL_CLIENTS + SHEDDABLE_CLIENTS {
        let (class, outcomes) = if i % 4 == 0 {
            ("CRITICAL", critical.clone())
        } else {
            ("SHEDDABLE", sheddable.clone())
        };
        clients.spawn(client(mesh.router(), class, outcomes, stop.clone()));
    }
    // Clients are interleaved (every fourth one is CRITICAL) so neither class starts first.
    assert_eq!(CRITICAL_CLIENTS * 4, CRITICAL_CLIENTS + SHEDDABLE_CLIENTS);
    let started = Instant::now();
    tokio::time::sleep(LOAD_TIME).await;
    stop.store(true, Ordering::Relaxed);
    while let Some(joined) = clients.join_next().await {
        joined.expect("client task");
    }
    let elapsed = started.elapsed().as_secs_f64();

    let critical = std::mem::take(&mut *critical.lock().unwrap());
    let sheddable = std::mem::take(&mut *sheddable.lock().unwrap());
    // Capacity: the limit's worth of requests, each taking what an idle request takes.
    let capacity = LIMIT as f64 / idle_latency.as_secs_f64();
    let offered = (critical.total() + sheddable.total()) as f64 / elapsed;
    println!(
        "overload: limit {LIMIT} in flight x {} ms per idle request = capacity {capacity:.0} req/s; \
         offered {offered:.0} req/s ({:.1}x) for {elapsed:.1} s by {CRITICAL_CLIENTS} CRITICAL + \
         {SHEDDABLE_CLIENTS} SHEDDABLE clients",
        idle_latency.as_millis(),
        offered / capacity,
    );
    for (class, outcomes) in [("CRITICAL", &critical), ("SHEDDABLE", &sheddable)] {
        let (p50, max) = outcomes.latency();
        println!(
            "overload: {class:<9} success {:6.2}% ({} ok, {} shed [{} with grpc-retry-pushback-ms, \
             {} of them -1], {} other; of {}); latency of successes p50 {} ms, max {} ms",
            outcomes.success_rate() * 100.0,
            outcomes.ok,
            outcomes.shed,
            outcomes.shed_with_pushback,
            outcomes.shed_do_not_retry,
            outcomes.other,
            outcomes.total(),
            p50.as_millis(),
            max.as_millis(),
        );
    }

    // The load really was an overload, and CRITICAL got enough requests to measure.
    assert!(
        offered >= 1.5 * capacity,
        "offered {offered:.0} req/s against a capacity of {capacity:.0}"
    );
    assert!(critical.total() >= 50, "{critical:?}");
    // Interactive traffic is served...
    assert!(
        critical.success_rate() >= 0.99,
        "CRITICAL success must be at least 99%: {critical:?}"
    );
    // ...while batch traffic is shed, with an answer that says so and says when to come back.
    assert!(sheddable.shed > 0, "SHEDDABLE must be shed: {sheddable:?}");
    assert_eq!(
        sheddable.shed_with_pushback, sheddable.shed,
        "every shed answer carries grpc-retry-pushback-ms: {sheddable:?}"
    );
    assert_eq!(
        sheddable.other, 0,
        "SHEDDABLE is refused only by shedding: {sheddable:?}"
    );
    assert!(
        sheddable.success_rate() < critical.success_rate(),
        "SHEDDABLE {:.3} must do worse than CRITICAL {:.3}",
        sheddable.success_rate(),
        critical.success_rate()
    );

    mesh.stop().await;
    inference.stop().await;
}
