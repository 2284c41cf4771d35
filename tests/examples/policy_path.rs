//! What the router's policy path costs: inference called directly, against `Complete` through the
//! router with no policy, with the full policy (budget reserve and commit on Redis, a Redis rate
//! limit), and with the full policy plus a session (context read, turns appended), all in one run,
//! instant sim model, real gRPC on loopback, Redis at `WEIR_TEST_REDIS_URL`. Rows 2-4 call between
//! services over loopback sockets (as separate processes do); rows 5-7 are the same paths with
//! the calls between services in the process (`[mesh] in_process`, the default of `weir up`).
//!
//! Prints, per path: p50/p99 of sequential calls (c=1) and the requests per second of 16
//! concurrent callers. Asserts nothing (machines are shared and noisy). `POLICY_PATH_ROWS=3,4`
//! measures only the rows named (1-based), to profile one path.
//!
//! ```text
//! cargo run --release -p weir-tests --example policy_path -- [calls] [seconds at c=16]
//! ```
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

/// The weir binary's allocator (services/weir/src/main.rs), so the services here cost what they
/// cost in `weir up`.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use tonic::transport::Channel;
use weir::stack::Service;
use weir_proto::{
    inference::{GenerateRequest, inference_service_client::InferenceServiceClient},
    router::{CompleteRequest, router_service_client::RouterServiceClient},
    session::{CreateSessionRequest, session_service_client::SessionServiceClient},
};
use weir_tests::{Mesh, complete, delete_prefix, percentile, redis_url, unique_prefix, user};

const PRICE: &str = "price = { input_micros_per_mtok = 1000000, output_micros_per_mtok = 1000000 }";

fn config(prefix: &str, policy: bool) -> String {
    let redis = redis_url();
    let policy = if policy {
        format!(
            r#"
[router]
budget_url = "http://127.0.0.1:50054"
[router.rate_limit]
requests_per_second = 1000000.0
burst = 1000000
redis_url = "{redis}"
key_prefix = "{prefix}"
[budget]
redis_url = "{redis}"
key_prefix = "{prefix}"
[session]
redis_url = "{redis}"
key_prefix = "{prefix}"
"#
        )
    } else {
        "[router]\nsession_url = \"\"\n[router.rate_limit]\nenabled = false\n".to_string()
    };
    format!("[models.sim-zero]\nsim = {{ output_tokens = 16 }}\n{PRICE}\n{policy}")
}

/// One path: how a call is made.
#[derive(Clone, Copy)]
enum Path {
    Direct,
    Router,
    Session,
}

/// The clients of one caller (each caller its own connection, as separate clients would have).
#[derive(Clone)]
struct Clients {
    router: RouterServiceClient<Channel>,
    inference: InferenceServiceClient<Channel>,
    session: Option<SessionServiceClient<Channel>>,
}

impl Clients {
    fn of(mesh: &Mesh, path: Path) -> Self {
        Self {
            router: mesh.router(),
            inference: mesh.inference(),
            session: matches!(path, Path::Session).then(|| mesh.session()),
        }
    }
}

async fn call(clients: &mut Clients, path: Path, n: usize, worker: usize) -> Duration {
    // A conversation of 20 turns per session: created before the clock starts.
    let session_id = format!("bench-{worker}-{}-{}", std::process::id(), n / 20);
    if matches!(path, Path::Session) && n.is_multiple_of(20) {
        let session = clients.session.as_mut().expect("the session service runs");
        session
            .create_session(CreateSessionRequest {
                session_id: session_id.clone(),
                model: "sim-zero".to_string(),
                ..CreateSessionRequest::default()
            })
            .await
            .unwrap();
    }
    let start = Instant::now();
    match path {
        Path::Direct => {
            let request = GenerateRequest {
                model: "sim-zero".into(),
                messages: vec![user(&format!("call {n}"))],
                ..Default::default()
            };
            clients.inference.generate(request).await.unwrap();
        }
        Path::Router => {
            clients
                .router
                .complete(complete("sim-zero", &format!("call {n}")))
                .await
                .unwrap();
        }
        Path::Session => {
            let request = CompleteRequest {
                session_id,
                ..complete("sim-zero", &format!("call {n}"))
            };
            clients.router.complete(request).await.unwrap();
        }
    }
    start.elapsed()
}

async fn sequential(mesh: &Mesh, path: Path, calls: usize) -> Vec<Duration> {
    let mut clients = Clients::of(mesh, path);
    for n in 0..100 {
        call(&mut clients, path, n, 0).await;
    }
    let mut samples = Vec::with_capacity(calls);
    // Numbered on from the warm-up, so the session row does not create its sessions again.
    for n in 100..100 + calls {
        samples.push(call(&mut clients, path, n, 0).await);
    }
    samples.sort();
    samples
}

async fn concurrent(mesh: &Mesh, path: Path, callers: usize, period: Duration) -> f64 {
    let until = Instant::now() + period;
    let mut tasks = Vec::new();
    for worker in 0..callers {
        let mut clients = Clients::of(mesh, path);
        tasks.push(tokio::spawn(async move {
            let mut done = 0;
            while Instant::now() < until {
                call(&mut clients, path, done, worker + 1).await;
                done += 1;
            }
            done
        }));
    }
    let mut total = 0;
    for task in tasks {
        total += task.await.unwrap();
    }
    total as f64 / period.as_secs_f64()
}

#[tokio::main]
async fn main() {
    let mut args = std::env::args().skip(1);
    let calls: usize = args.next().map_or(2000, |n| n.parse().unwrap());
    let seconds: u64 = args.next().map_or(3, |n| n.parse().unwrap());
    let prefix = unique_prefix();
    let bare = Mesh::start_services(
        &config(&prefix, false),
        &[Service::Inference, Service::Router],
    )
    .await;
    let full = Mesh::start(&config(&prefix, true)).await;
    // The same two stacks with the calls between services in the process (`[mesh] in_process`,
    // the default of `weir up`; the harness turns it off so that tests drive sockets).
    let in_process = |config: &mut weir::stack::StackConfig| config.mesh.in_process = true;
    let bare_local = Mesh::start_with(
        &config(&prefix, false),
        &[Service::Inference, Service::Router],
        in_process,
    )
    .await;
    // Its own prefix: the session row's session ids are per process.
    let local_prefix = unique_prefix();
    let full_local =
        Mesh::start_with(&config(&local_prefix, true), &Service::ALL, in_process).await;
    println!(
        "instant sim model, loopback gRPC, Redis; c=1: {calls} sequential calls; c=16: {seconds} s"
    );
    println!("| path | c=1 p50 | c=1 p99 | c=16 rps |");
    println!("|---|---|---|---|");
    let rows: [(&str, &Mesh, Path); 7] = [
        ("inference direct", &bare, Path::Direct),
        ("router, no policy", &bare, Path::Router),
        ("router, full policy", &full, Path::Router),
        ("router, full policy + session", &full, Path::Session),
        ("in process: router, no policy", &bare_local, Path::Router),
        ("in process: router, full policy", &full_local, Path::Router),
        (
            "in process: router, full policy + session",
            &full_local,
            Path::Session,
        ),
    ];
    // `POLICY_PATH_ROWS=3` measures only the third row (e.g. under `perf record`); the first
    // row, the baseline of the overhead columns, is measured only when selected.
    let selected: Option<Vec<usize>> = std::env::var("POLICY_PATH_ROWS")
        .ok()
        .map(|rows| rows.split(',').map(|n| n.trim().parse().unwrap()).collect());
    let mut baseline = None;
    for (row, (name, mesh, path)) in rows.into_iter().enumerate() {
        if selected
            .as_ref()
            .is_some_and(|rows| !rows.contains(&(row + 1)))
        {
            continue;
        }
        let samples = sequential(mesh, path, calls).await;
        let rps = concurrent(mesh, path, 16, Duration::from_secs(seconds)).await;
        let (p50, p99) = (percentile(&samples, 0.5), percentile(&samples, 0.99));
        let over = baseline.map_or(
            String::new(),
            |(b50, b99, brps): (Duration, Duration, f64)| {
                format!(
                    " (+{:.2} ms / +{:.2} ms; {:.0} % of direct)",
                    (p50.as_secs_f64() - b50.as_secs_f64()) * 1e3,
                    (p99.as_secs_f64() - b99.as_secs_f64()) * 1e3,
                    rps / brps * 100.0
                )
            },
        );
        println!(
            "| {name} | {:.3} ms | {:.3} ms | {rps:.0} |{over}",
            p50.as_secs_f64() * 1e3,
            p99.as_secs_f64() * 1e3
        );
        if baseline.is_none() {
            baseline = Some((p50, p99, rps));
        }
    }
    full.stop().await;
    bare.stop().await;
    full_local.stop().await;
    bare_local.stop().await;
    delete_prefix(&prefix).await;
    delete_prefix(&local_prefix).await;
}
