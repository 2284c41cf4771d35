//! The overload curve of the full policy path: router → budget (on Redis) → inference (sim model,
//! no artificial latency), with the Redis rate limit on (at a rate high enough that it is never
//! what refuses).
//!
//! It measures the closed-loop capacity first, then offers open-loop load at 0.5× .. 2× that
//! capacity (a fixed-rate generator with a bounded number of outstanding calls, a fixed time per
//! step, mixed criticality via `weir-criticality`), and prints per step: offered rate, goodput
//! (and its share of capacity), the shed share of each criticality, p50/p99 of the successful
//! calls and the router's admission limit at the end of the step. A last step at 0.5× shows how
//! the limit recovers after the overload.
//!
//! Prints figures; asserts nothing (machines are shared and noisy).
//!
//! ```text
//! cargo run --release -p weir-tests --example overload_curve -- [seconds per step] [critical %]
//! ```
//!
//! `OVERLOAD_CURVE_SEPARATE=1` runs the services in a `weir up` process of their own pinned to CPU
//! 0 (`taskset`), and pins this generator to CPU 1, so that the load generator's work does not
//! come out of the server's CPU: what a load shedder is judged on is the server's goodput, and on
//! a two-core machine a generator sharing its cores makes every shed request look twice as
//! expensive. Build the binary first (`cargo build --release -p weir`); `OVERLOAD_CURVE_WEIR`
//! names another one.
//!
//! `OVERLOAD_CURVE_STEPS` (comma-separated multiples, e.g. `2`) replaces the steps, to profile one.
//!
//! `OVERLOAD_CURVE_CAPACITY` (requests per second) replaces the measured capacity as the base of
//! the steps, to offer two builds the same load (a build whose closed loop collapses measures
//! nothing). `OVERLOAD_CURVE_ADMISSION` (TOML lines, e.g. `algorithm = "static"`) is added to the
//! `[server.admission]` table every service of the run shares, to compare settings.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use tokio::sync::Semaphore;
use tonic::{Code, metadata::MetadataValue, transport::Channel};
use weir::stack::Service;
use weir_proto::router::router_service_client::RouterServiceClient;
use weir_tests::{Mesh, admission_limit, complete, percentile, reason, redis_url, unique_prefix};

/// Offered load per step, as multiples of the measured capacity.
const STEPS: [f64; 6] = [0.5, 0.8, 1.0, 1.2, 1.5, 2.0];
/// Calls the generator keeps outstanding at most; beyond that a tick's call is not sent (and
/// counted as such): the bound that keeps an overloaded run from growing without limit.
const MAX_OUTSTANDING: usize = 4000;
/// The deadline of every call: an interactive client's patience.
const CALL_DEADLINE: Duration = Duration::from_secs(1);
/// Concurrent callers of the closed-loop capacity measurement.
const CLOSED_LOOP_CALLERS: usize = 256;
/// Connections the generator spreads its calls over.
const CONNECTIONS: usize = 4;

const CLASSES: [&str; 3] = ["CRITICAL", "SHEDDABLE_PLUS", "SHEDDABLE"];

fn config(prefix: &str) -> String {
    format!(
        r#"
[models.sim-priced]
sim = {{ output_tokens = 12 }}
price = {{ input_micros_per_mtok = 1000000, output_micros_per_mtok = 1000000 }}

[router]
budget_url = "http://127.0.0.1:50054"   # replaced by the budget service started with it
session_url = ""

# The model bulkhead (64 in flight per model by default, sized for real model calls that take
# seconds) would refuse the instant sim's calls before admission has anything to say: not what
# this measures. (The budget calls have their own, larger, bulkhead.)
[router.client.inference.bulkhead]
max_concurrent = 100000

[router.rate_limit]
requests_per_second = 1000000.0
burst = 1000000
redis_url = "{redis}"
key_prefix = "{prefix}-rl"

[budget]
redis_url = "{redis}"
key_prefix = "{prefix}"

[server.admission]
{admission}
"#,
        redis = redis_url(),
        admission = std::env::var("OVERLOAD_CURVE_ADMISSION").unwrap_or_default(),
    )
}

/// What the calls of one criticality saw.
#[derive(Debug, Default, Clone)]
struct Class {
    sent: usize,
    ok: usize,
    shed: usize,
    other: usize,
    /// Not sent: the generator already had [`MAX_OUTSTANDING`] calls outstanding.
    not_sent: usize,
    latencies: Vec<Duration>,
}

#[derive(Debug, Default)]
struct Stats {
    classes: [Class; 3],
    other_examples: Vec<String>,
}

impl Stats {
    fn record(&mut self, class: usize, result: Result<(), tonic::Status>, latency: Duration) {
        let c = &mut self.classes[class];
        match result {
            Ok(()) => {
                c.ok += 1;
                c.latencies.push(latency);
            }
            Err(status)
                if status.code() == Code::Unavailable && reason(&status) == "OVERLOADED" =>
            {
                c.shed += 1
            }
            Err(status) => {
                c.other += 1;
                if self.other_examples.len() < 3 {
                    self.other_examples
                        .push(format!("{:?} {}", status.code(), status.message()));
                }
            }
        }
    }
}

async fn call(
    mut router: RouterServiceClient<Channel>,
    criticality: &'static str,
    n: u64,
) -> Result<(), tonic::Status> {
    let mut request = tonic::Request::new(complete("sim-priced", &format!("call {n}")));
    request
        .metadata_mut()
        .insert("weir-criticality", MetadataValue::from_static(criticality));
    request.set_timeout(CALL_DEADLINE);
    router.complete(request).await.map(drop)
}

/// The class of call `n`: `critical` % CRITICAL, the rest split evenly between SHEDDABLE_PLUS
/// and SHEDDABLE.
fn class_of(n: u64, critical: u64) -> usize {
    let slot = n % 100;
    if slot < critical {
        0
    } else if (slot - critical).is_multiple_of(2) {
        1
    } else {
        2
    }
}

/// Closed loop: as many CRITICAL calls as [`CLOSED_LOOP_CALLERS`] callers complete in `time`
/// (calls per second), and what the calls saw.
async fn capacity(routers: &[RouterServiceClient<Channel>], time: Duration) -> (f64, Stats) {
    let stats = Arc::new(Mutex::new(Stats::default()));
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..CLOSED_LOOP_CALLERS {
        let router = routers[i % routers.len()].clone();
        let stats = stats.clone();
        tasks.spawn(async move {
            let mut n = 0;
            while start.elapsed() < time {
                n += 1;
                let started = Instant::now();
                let result = call(router.clone(), "CRITICAL", n).await;
                let mut stats = stats.lock().unwrap();
                stats.classes[0].sent += 1;
                stats.record(0, result, started.elapsed());
            }
        });
    }
    while tasks.join_next().await.is_some() {}
    let stats = std::mem::take(&mut *stats.lock().unwrap());
    (
        stats.classes[0].ok as f64 / start.elapsed().as_secs_f64(),
        stats,
    )
}

/// Open loop: `rate` calls per second for `time`, at most [`MAX_OUTSTANDING`] outstanding.
async fn open_loop(
    routers: &[RouterServiceClient<Channel>],
    rate: f64,
    time: Duration,
    critical: u64,
) -> Stats {
    let stats = Arc::new(Mutex::new(Stats::default()));
    let outstanding = Arc::new(Semaphore::new(MAX_OUTSTANDING));
    let start = Instant::now();
    let mut sent: u64 = 0;
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    while start.elapsed() < time {
        tick.tick().await;
        let due = (start.elapsed().as_secs_f64() * rate) as u64;
        while sent < due {
            let n = sent;
            sent += 1;
            let class = class_of(n, critical);
            let Ok(permit) = outstanding.clone().try_acquire_owned() else {
                stats.lock().unwrap().classes[class].not_sent += 1;
                continue;
            };
            stats.lock().unwrap().classes[class].sent += 1;
            let router = routers[n as usize % routers.len()].clone();
            let stats = stats.clone();
            tokio::spawn(async move {
                let started = Instant::now();
                let result = call(router, CLASSES[class], n).await;
                stats
                    .lock()
                    .unwrap()
                    .record(class, result, started.elapsed());
                drop(permit);
            });
        }
    }
    // Every outstanding call ends by its deadline.
    let _ = outstanding.acquire_many(MAX_OUTSTANDING as u32).await;
    std::mem::take(&mut *stats.lock().unwrap())
}

/// Where the router's metrics are read from.
enum Metrics {
    /// This process's recorder (the services run in it).
    InProcess(Box<dyn Fn() -> String>),
    /// The `/metrics` endpoint of the separate `weir up` process.
    Scrape(String),
}

impl Metrics {
    async fn render(&self) -> String {
        match self {
            Self::InProcess(render) => render(),
            Self::Scrape(url) => match reqwest::get(url).await {
                Ok(response) => response.text().await.unwrap_or_default(),
                Err(_) => String::new(),
            },
        }
    }
}

/// The router's admission limit, from its metrics.
async fn router_limit(metrics: &Metrics) -> String {
    admission_limit(&metrics.render().await, "router")
        .map_or_else(|| "?".to_string(), |l| l.to_string())
}

/// `weir up` in a process of its own, pinned to CPU 0; killed on drop.
struct Separate {
    child: std::process::Child,
    _config: std::path::PathBuf,
}

impl Drop for Separate {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `weir up` with `config` on CPU 0, pins this process to CPU 1, and returns the process
/// with the router's URL and its metrics URL (read from the banner `weir up` prints).
fn start_separate(config: &str) -> (Separate, String, String) {
    use std::io::BufRead;
    let weir = std::env::var("OVERLOAD_CURVE_WEIR").unwrap_or_else(|_| {
        concat!(env!("CARGO_MANIFEST_DIR"), "/../target/release/weir").to_string()
    });
    let path = std::env::temp_dir().join(format!("overload-curve-{}.toml", std::process::id()));
    std::fs::write(&path, config).unwrap();
    let mut command = std::process::Command::new("taskset");
    command
        .args(["-c", "0", &weir, "up", "--config"])
        .arg(&path);
    for service in ["ROUTER", "INFERENCE", "SESSION", "BUDGET", "REVIEW"] {
        command.env(format!("WEIR_{service}__LISTEN"), "127.0.0.1:0");
    }
    let mut child = command
        .env("WEIR_TELEMETRY__METRICS_LISTEN", "127.0.0.1:0")
        .env("WEIR_REVIEW__CONSOLE__LISTEN", "")
        .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
        .env("RUST_LOG", "error")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {weir} under taskset: {e}"));
    let stdout = child.stdout.take().unwrap();
    let (mut router, mut metrics) = (None, None);
    let mut lines = std::io::BufReader::new(stdout).lines();
    while router.is_none() || metrics.is_none() {
        let line = lines.next().expect("weir up prints its addresses").unwrap();
        if let Some(addr) = line
            .strip_prefix("router")
            .and_then(|l| l.split("grpc://").nth(1))
        {
            router = Some(format!("http://{}", addr.trim()));
        }
        if line.starts_with("metrics") {
            metrics = line.split_whitespace().nth(1).map(str::to_string);
        }
    }
    // The rest of the banner is read (and dropped) so that `weir up` never writes to a full pipe.
    std::thread::spawn(move || lines.for_each(drop));
    let status = std::process::Command::new("taskset")
        .args(["-a", "-c", "-p", "1", &std::process::id().to_string()])
        .stdout(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(status.success(), "taskset could not pin the generator");
    (
        Separate {
            child,
            _config: path,
        },
        router.unwrap(),
        metrics.unwrap(),
    )
}

fn print_step(label: &str, capacity: f64, time: Duration, stats: &Stats, limit: &str) {
    let secs = time.as_secs_f64();
    let sent: usize = stats.classes.iter().map(|c| c.sent + c.not_sent).sum();
    let ok: usize = stats.classes.iter().map(|c| c.ok).sum();
    let other: usize = stats.classes.iter().map(|c| c.other).sum();
    let not_sent: usize = stats.classes.iter().map(|c| c.not_sent).sum();
    let mut latencies: Vec<Duration> = stats
        .classes
        .iter()
        .flat_map(|c| c.latencies.iter().copied())
        .collect();
    latencies.sort();
    let (p50, p99) = if latencies.is_empty() {
        (Duration::ZERO, Duration::ZERO)
    } else {
        (percentile(&latencies, 0.5), percentile(&latencies, 0.99))
    };
    let share = |c: &Class, n: usize| {
        if c.sent + c.not_sent == 0 {
            0.0
        } else {
            100.0 * n as f64 / (c.sent + c.not_sent) as f64
        }
    };
    let [critical, plus, sheddable] = &stats.classes;
    println!(
        "{label:>5} offered {:>6.0} rps | goodput {:>6.0} rps {:>5.1}% of cap | shed C {:>5.1}% S+ {:>5.1}% S {:>5.1}% | ok C {:>5.1}% | other {other} not-sent {not_sent} | p50 {:>7.2?} p99 {:>7.2?} | limit {limit}",
        sent as f64 / secs,
        ok as f64 / secs,
        100.0 * ok as f64 / secs / capacity,
        share(critical, critical.shed),
        share(plus, plus.shed),
        share(sheddable, sheddable.shed),
        share(critical, critical.ok),
        p50,
        p99,
    );
    for example in &stats.other_examples {
        println!("      other: {example}");
    }
}

fn main() {
    let mut args = std::env::args().skip(1);
    let step_time = Duration::from_secs(args.next().and_then(|s| s.parse().ok()).unwrap_or(5));
    let critical: u64 = args.next().and_then(|s| s.parse().ok()).unwrap_or(50);
    let separate = std::env::var_os("OVERLOAD_CURVE_SEPARATE").is_some();

    // In-process, the services get a runtime of their own; the generator another, as a separate
    // client would.
    let servers = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let prefix = unique_prefix();
    let (mesh, process, url, metrics) = if separate {
        let (process, url, metrics) = start_separate(&config(&prefix));
        println!("services: a separate `weir up` on CPU 0; generator on CPU 1");
        (None, Some(process), url, Metrics::Scrape(metrics))
    } else {
        let handle = weir_mesh::telemetry::install_metrics_recorder();
        let mesh = servers.block_on(Mesh::start_services(
            &config(&prefix),
            &[Service::Inference, Service::Budget, Service::Router],
        ));
        let url = mesh.url(Service::Router);
        (
            Some(mesh),
            None,
            url,
            Metrics::InProcess(Box::new(move || handle.render())),
        )
    };
    let client = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    client.block_on(async {
        let routers: Vec<_> = (0..CONNECTIONS)
            .map(|_| {
                RouterServiceClient::new(weir_mesh::client::lazy_channel(&url).expect("valid URL"))
            })
            .collect();
        // Warm up connections and code paths.
        capacity(&routers, Duration::from_secs(1)).await;
        let (capacity, closed) = capacity(&routers, Duration::from_secs(3)).await;
        let c = &closed.classes[0];
        println!(
            "closed-loop capacity: {capacity:.0} rps ({CLOSED_LOOP_CALLERS} callers; {} ok, {} shed, \
             {} other); admission limit {}",
            c.ok,
            c.shed,
            c.other,
            router_limit(&metrics).await
        );
        for example in &closed.other_examples {
            println!("      other: {example}");
        }
        let capacity = match std::env::var("OVERLOAD_CURVE_CAPACITY") {
            Ok(given) => {
                let given = given.parse().expect("OVERLOAD_CURVE_CAPACITY is a number");
                println!("steps are multiples of OVERLOAD_CURVE_CAPACITY = {given:.0} rps");
                given
            }
            Err(_) => capacity,
        };
        println!(
            "open loop: {step_time:?} per step, {critical}% CRITICAL, the rest SHEDDABLE_PLUS / \
             SHEDDABLE half and half, deadline {CALL_DEADLINE:?}, at most {MAX_OUTSTANDING} outstanding"
        );
        let steps: Vec<f64> = std::env::var("OVERLOAD_CURVE_STEPS").map_or_else(
            |_| STEPS.to_vec(),
            |given| {
                given
                    .split(',')
                    .map(|s| s.trim().parse().expect("OVERLOAD_CURVE_STEPS: numbers"))
                    .collect()
            },
        );
        // The closed loop can underestimate what the server does with more calls in flight; the
        // best goodput of any step is the other yardstick: is it held at 2x, or does it collapse?
        let mut peak: f64 = 0.0;
        let mut last = 0.0;
        for multiple in steps {
            let stats = open_loop(&routers, capacity * multiple, step_time, critical).await;
            last = stats.classes.iter().map(|c| c.ok).sum::<usize>() as f64
                / step_time.as_secs_f64();
            peak = peak.max(last);
            print_step(
                &format!("{multiple:.1}x"),
                capacity,
                step_time,
                &stats,
                &router_limit(&metrics).await,
            );
        }
        println!(
            "peak goodput {peak:.0} rps; the last overload step kept {:.1}% of it",
            100.0 * last / peak.max(1.0)
        );
        // After the overload: how soon is the limit back?
        for second in 1..=3 {
            let stats = open_loop(&routers, capacity * 0.5, Duration::from_secs(1), critical).await;
            print_step(
                &format!("+{second}s"),
                capacity,
                Duration::from_secs(1),
                &stats,
                &router_limit(&metrics).await,
            );
        }
    });
    if let Some(mesh) = mesh {
        servers.block_on(mesh.stop());
    }
    drop(process);
    // Hundreds of thousands of reservations and their idempotency keys: not left behind in a Redis
    // that tests share.
    for prefix in [prefix.clone(), format!("{prefix}-rl")] {
        let deleted = servers.block_on(weir_tests::delete_prefix(&prefix));
        println!("deleted {deleted} Redis keys under {prefix}:");
    }
}
