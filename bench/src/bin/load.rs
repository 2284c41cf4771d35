//! The benchmark's load generator (bench/run drives it; docs/benchmarks.md explains the method).
//!
//! `measure` runs one target through every phase — warm-up, sequential calls (c=1), sequential
//! streams (time to the first token), then a closed loop of 16 and of 64 callers for a fixed time
//! — reads the CPU time and peak RSS of the target's processes from /proc, and appends one JSON
//! line to a results file. `table` prints a results file as one markdown table, with each row's
//! latency over the first (baseline) row.
//!
//! `wait`, `set-budget` and `delete-keys` are bench/run's helpers around a Weir it starts: wait
//! until the router answers, give the tenant a budget, delete a run's Redis keys.
//!
//! ```text
//! weir-bench-load measure --name mock --kind http --url http://127.0.0.1:18080/v1 \
//!     --model mock --pid 1234 --out results.jsonl
//! weir-bench-load table results.jsonl
//! weir-bench-load wait --url http://127.0.0.1:50051 --model sim-zero --pid 1234
//! weir-bench-load set-budget --url http://127.0.0.1:50054 --hard-limit-micros 1000000000000000
//! weir-bench-load delete-keys --redis redis://127.0.0.1:6379 --match 'weirbench-1-2-*'
//! ```

use std::{
    collections::HashMap,
    fs,
    io::Write as _,
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand, ValueEnum};
use futures::StreamExt as _;
use serde::{Deserialize, Serialize};
use serde_json::json;
use tonic::transport::Channel;
use weir_proto::{
    budget::{
        CalendarPeriod, Period, PeriodUnit, Scope, ScopeKind, SetBudgetRequest,
        budget_service_client::BudgetServiceClient, period,
    },
    router::{
        CompleteRequest, CompleteStreamRequest, complete_stream_response::Event,
        router_service_client::RouterServiceClient,
    },
};

#[derive(Parser)]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Measure one running target and append its results to `--out`.
    Measure(Measure),
    /// Print a results file as a markdown table.
    Table {
        /// The results file `measure` appended to.
        results: PathBuf,
        /// A line printed under the table (repeatable), e.g. a row left out and why.
        #[arg(long)]
        note: Vec<String>,
    },
    /// Wait until a Weir router answers a gRPC `Complete`: exit 0 then, 1 after `--timeout`
    /// seconds, 3 as soon as the process `--pid` has exited (its log says why).
    Wait {
        /// The router, `http://host:port`.
        #[arg(long)]
        url: String,
        /// The model the probe call names.
        #[arg(long)]
        model: String,
        /// The `weir up` process.
        #[arg(long)]
        pid: u32,
        /// Seconds to wait at most.
        #[arg(long, default_value_t = 30.0)]
        timeout: f64,
    },
    /// Give the caller's tenant (dev mode: the default tenant) a monthly budget with
    /// `BudgetService.SetBudget`: the policy rows' budget, set so high that it never refuses.
    SetBudget {
        /// The budget service, `http://host:port`.
        #[arg(long)]
        url: String,
        /// The hard limit, micro-USD.
        #[arg(long)]
        hard_limit_micros: i64,
    },
    /// Delete every Redis key matching a glob (SCAN + UNLINK): a run's keys, after it.
    DeleteKeys {
        /// The Redis URL.
        #[arg(long)]
        redis: String,
        /// The glob, e.g. `weirbench-<run>-*`.
        #[arg(long = "match")]
        pattern: String,
    },
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Kind {
    /// OpenAI's chat completions over HTTP/1.1 (keep-alive); `--url` is the base URL ending `/v1`.
    Http,
    /// Weir's gRPC `Complete` and `CompleteStream`; `--url` is the router, `http://host:port`.
    Grpc,
}

#[derive(clap::Args)]
struct Measure {
    /// The target's name in the table.
    #[arg(long)]
    name: String,
    #[arg(long, value_enum)]
    kind: Kind,
    /// The target; several, comma-separated, spread the callers over them (caller i uses the
    /// i-th modulo their number; the c=1 phase uses the first).
    #[arg(long)]
    url: String,
    /// The model every request names.
    #[arg(long)]
    model: String,
    /// The target's server process; its CPU and memory include its descendants'.
    #[arg(long)]
    pid: u32,
    /// Sequential calls at c=1 (after the warm-up).
    #[arg(long, default_value_t = 2000)]
    calls: usize,
    /// Sequential streams at c=1, for the time to the first token.
    #[arg(long, default_value_t = 500)]
    streams: usize,
    /// Length of each closed-loop phase (c=16, c=64).
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
    /// Calls before anything is measured (connections, caches, JIT-less warm paths).
    #[arg(long, default_value_t = 300)]
    warmup: usize,
    /// The results file (JSON lines), appended to.
    #[arg(long)]
    out: PathBuf,
}

/// One target's figures: one line of the results file.
#[derive(Serialize, Deserialize)]
struct Row {
    name: String,
    p50_us: f64,
    p99_us: f64,
    ttft_p50_us: f64,
    ttft_p99_us: f64,
    rps_16: f64,
    rps_64: f64,
    cpu_us_per_request: f64,
    peak_rss_kib: u64,
    requests: u64,
    errors: u64,
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> anyhow::Result<()> {
    match Args::parse().command {
        Command::Measure(measure) => {
            let row = measure_target(&measure).await?;
            let mut file = fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&measure.out)
                .with_context(|| format!("opening {}", measure.out.display()))?;
            writeln!(file, "{}", serde_json::to_string(&row)?)?;
            eprintln!(
                "{}: p50 {:.0} us, p99 {:.0} us, ttft p50 {:.0} us, {:.0} rps at c=16, {:.0} rps at c=64, {:.0} us CPU/request, {} KiB peak RSS, {} errors",
                row.name,
                row.p50_us,
                row.p99_us,
                row.ttft_p50_us,
                row.rps_16,
                row.rps_64,
                row.cpu_us_per_request,
                row.peak_rss_kib,
                row.errors
            );
            Ok(())
        }
        Command::Table { results, note } => {
            let text = fs::read_to_string(&results)
                .with_context(|| format!("reading {}", results.display()))?;
            let rows = text
                .lines()
                .filter(|line| !line.trim().is_empty())
                .map(serde_json::from_str)
                .collect::<Result<Vec<Row>, _>>()?;
            print!("{}", table(&rows));
            if !note.is_empty() {
                println!();
                for line in note {
                    println!("{line}");
                }
            }
            Ok(())
        }
        Command::Wait {
            url,
            model,
            pid,
            timeout,
        } => {
            let until = Instant::now() + Duration::from_secs_f64(timeout);
            loop {
                let last = match probe(&url, &model).await {
                    Ok(()) => return Ok(()),
                    Err(error) => format!("{error:#}"),
                };
                if !std::path::Path::new(&format!("/proc/{pid}")).exists()
                    || stat_fields(pid).is_some_and(|f| f.first().is_some_and(|s| s == "Z"))
                {
                    eprintln!("wait: process {pid} exited before {url} answered");
                    std::process::exit(3);
                }
                if Instant::now() >= until {
                    eprintln!("wait: {url} did not answer within {timeout}s: {last}");
                    std::process::exit(1);
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        Command::SetBudget {
            url,
            hard_limit_micros,
        } => {
            let mut client = BudgetServiceClient::new(
                Channel::from_shared(url.clone())?
                    .connect()
                    .await
                    .with_context(|| format!("connecting to {url}"))?,
            );
            client
                .set_budget(SetBudgetRequest {
                    scope: Some(Scope {
                        kind: ScopeKind::Tenant.into(),
                        id: String::new(),
                    }),
                    hard_limit_micros,
                    soft_limit_fraction: 0.0,
                    period: Some(Period {
                        kind: Some(period::Kind::Calendar(CalendarPeriod {
                            unit: PeriodUnit::Monthly.into(),
                            time_zone: String::new(),
                        })),
                    }),
                })
                .await
                .context("SetBudget")?;
            Ok(())
        }
        Command::DeleteKeys { redis, pattern } => {
            let client = redis::Client::open(redis.as_str())?;
            let mut connection = client.get_multiplexed_async_connection().await?;
            let mut cursor: u64 = 0;
            let mut deleted = 0;
            loop {
                let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
                    .arg(cursor)
                    .arg("MATCH")
                    .arg(&pattern)
                    .arg("COUNT")
                    .arg(10_000)
                    .query_async(&mut connection)
                    .await?;
                if !keys.is_empty() {
                    let _: () = redis::cmd("UNLINK")
                        .arg(&keys)
                        .query_async(&mut connection)
                        .await?;
                    deleted += keys.len();
                }
                if next == 0 {
                    break;
                }
                cursor = next;
            }
            eprintln!("deleted {deleted} Redis keys matching {pattern}");
            Ok(())
        }
    }
}

/// One gRPC `Complete` on a fresh connection (the `wait` probe).
async fn probe(url: &str, model: &str) -> anyhow::Result<()> {
    let channel = Channel::from_shared(url.to_string())?
        .connect_timeout(Duration::from_secs(1))
        .timeout(Duration::from_secs(5))
        .connect()
        .await?;
    RouterServiceClient::new(channel)
        .complete(CompleteRequest {
            model: model.to_string(),
            messages: vec![user(0)],
            ..CompleteRequest::default()
        })
        .await?;
    Ok(())
}

/// One caller's connection to the target.
enum Caller {
    Http {
        client: reqwest::Client,
        url: String,
    },
    Grpc(RouterServiceClient<Channel>),
}

impl Caller {
    /// The `index`-th caller's connection, to the `index`-th target of `--url` (modulo their number).
    async fn connect(
        measure: &Measure,
        http: &reqwest::Client,
        index: usize,
    ) -> anyhow::Result<Self> {
        let urls: Vec<&str> = measure.url.split(',').map(str::trim).collect();
        let url = urls[index % urls.len()];
        Ok(match measure.kind {
            Kind::Http => Caller::Http {
                client: http.clone(),
                url: format!("{}/chat/completions", url.trim_end_matches('/')),
            },
            // One connection per caller, as an HTTP/1.1 caller has.
            Kind::Grpc => Caller::Grpc(RouterServiceClient::new(
                Channel::from_shared(url.to_string())?
                    .tcp_nodelay(true)
                    .connect()
                    .await
                    .with_context(|| format!("connecting to {url}"))?,
            )),
        })
    }

    /// One non-streamed call, read to the end.
    async fn unary(&mut self, model: &str, i: u64) -> anyhow::Result<()> {
        match self {
            Caller::Http { client, url } => {
                let response = client
                    .post(url.as_str())
                    .json(&body(model, i, false))
                    .send()
                    .await?;
                let status = response.status();
                let bytes = response.bytes().await?;
                if !status.is_success() {
                    bail!("HTTP {status}: {}", String::from_utf8_lossy(&bytes));
                }
            }
            Caller::Grpc(client) => {
                client
                    .complete(CompleteRequest {
                        model: model.to_string(),
                        messages: vec![user(i)],
                        ..CompleteRequest::default()
                    })
                    .await?;
            }
        }
        Ok(())
    }

    /// One streamed call, read to the end; returns the time until the first non-empty text.
    async fn stream(&mut self, model: &str, i: u64) -> anyhow::Result<Duration> {
        let start = Instant::now();
        let mut first = None;
        match self {
            Caller::Http { client, url } => {
                let response = client
                    .post(url.as_str())
                    .json(&body(model, i, true))
                    .send()
                    .await?;
                let status = response.status();
                if !status.is_success() {
                    bail!(
                        "HTTP {status}: {}",
                        response.text().await.unwrap_or_default()
                    );
                }
                let mut bytes = response.bytes_stream();
                let mut pending = String::new();
                let mut done = false;
                while let Some(piece) = bytes.next().await {
                    pending.push_str(std::str::from_utf8(&piece?)?);
                    while let Some(end) = pending.find("\n\n") {
                        let event: String = pending.drain(..end + 2).collect();
                        for data in event.lines().filter_map(|l| l.strip_prefix("data:")) {
                            let data = data.trim();
                            if data == "[DONE]" {
                                done = true;
                            } else if first.is_none() && has_text(data) {
                                first = Some(start.elapsed());
                            }
                        }
                    }
                }
                if !done {
                    bail!("stream ended without [DONE]");
                }
            }
            Caller::Grpc(client) => {
                let mut events = client
                    .complete_stream(CompleteStreamRequest {
                        model: model.to_string(),
                        messages: vec![user(i)],
                        ..CompleteStreamRequest::default()
                    })
                    .await?
                    .into_inner();
                let mut done = false;
                while let Some(event) = events.message().await? {
                    match event.event {
                        Some(Event::Delta(delta)) if first.is_none() && !delta.text.is_empty() => {
                            first = Some(start.elapsed());
                        }
                        Some(Event::Done(_)) => done = true,
                        _ => {}
                    }
                }
                if !done {
                    bail!("stream ended without done");
                }
            }
        }
        first.context("stream carried no text")
    }
}

fn user(i: u64) -> weir_proto::common::Message {
    weir_proto::common::Message {
        role: weir_proto::common::Role::User.into(),
        content: format!("call {i}"),
        ..Default::default()
    }
}

fn body(model: &str, i: u64, stream: bool) -> serde_json::Value {
    json!({
        "model": model,
        "messages": [{"role": "user", "content": format!("call {i}")}],
        "stream": stream,
    })
}

/// Whether an SSE `data:` payload is a chunk with non-empty `choices[0].delta.content`.
fn has_text(data: &str) -> bool {
    serde_json::from_str::<serde_json::Value>(data)
        .ok()
        .and_then(|chunk| {
            chunk["choices"][0]["delta"]["content"]
                .as_str()
                .map(|text| !text.is_empty())
        })
        .unwrap_or(false)
}

async fn measure_target(measure: &Measure) -> anyhow::Result<Row> {
    let http = reqwest::Client::builder()
        .tcp_nodelay(true)
        .pool_max_idle_per_host(256)
        .build()?;
    let model = measure.model.as_str();
    let errors = Arc::new(AtomicU64::new(0));
    let mut caller = Caller::connect(measure, &http, 0).await?;

    // Warm-up: connections, the target's pools and caches, the first streams.
    for i in 0..measure.warmup as u64 {
        if caller.unary(model, i).await.is_err() || caller.stream(model, i).await.is_err() {
            errors.fetch_add(1, Ordering::Relaxed);
        }
    }
    if errors.load(Ordering::Relaxed) == measure.warmup as u64 {
        // Say why, rather than measure a target that refuses everything.
        caller
            .unary(model, 0)
            .await
            .context("every warm-up call failed")?;
    }
    errors.store(0, Ordering::Relaxed);

    let cpu_before = tree_cpu_ticks(measure.pid);
    let mut requests = 0u64;

    let mut latencies = Vec::with_capacity(measure.calls);
    for i in 0..measure.calls as u64 {
        let start = Instant::now();
        match caller.unary(model, i).await {
            Ok(()) => latencies.push(start.elapsed()),
            Err(_) => {
                errors.fetch_add(1, Ordering::Relaxed);
            }
        }
        requests += 1;
    }
    latencies.sort();

    let mut ttfts = Vec::with_capacity(measure.streams);
    for i in 0..measure.streams as u64 {
        match caller.stream(model, i).await {
            Ok(first) => ttfts.push(first),
            Err(_) => {
                errors.fetch_add(1, Ordering::Relaxed);
            }
        }
        requests += 1;
    }
    ttfts.sort();

    let duration = Duration::from_secs_f64(measure.seconds);
    let (done_16, rps_16) = closed_loop(measure, &http, 16, duration, &errors).await?;
    let (done_64, rps_64) = closed_loop(measure, &http, 64, duration, &errors).await?;
    requests += done_16 + done_64;

    let cpu_ticks = tree_cpu_ticks(measure.pid).saturating_sub(cpu_before);
    Ok(Row {
        name: measure.name.clone(),
        p50_us: micros(percentile(&latencies, 0.50)),
        p99_us: micros(percentile(&latencies, 0.99)),
        ttft_p50_us: micros(percentile(&ttfts, 0.50)),
        ttft_p99_us: micros(percentile(&ttfts, 0.99)),
        rps_16,
        rps_64,
        // /proc/<pid>/stat counts in USER_HZ, which is 100 on Linux whatever the kernel's HZ.
        cpu_us_per_request: cpu_ticks as f64 * 10_000.0 / requests.max(1) as f64,
        peak_rss_kib: tree_peak_rss_kib(measure.pid),
        requests,
        errors: errors.load(Ordering::Relaxed),
    })
}

/// `concurrency` callers, each sending its next call as soon as the last one is answered, for
/// `duration` after a one-second warm-up at the same concurrency. Returns every call the target
/// answered in the phase, warm-up and the calls finishing after the window included (the CPU
/// count covers all of them), and the successful calls per second within the window.
async fn closed_loop(
    measure: &Measure,
    http: &reqwest::Client,
    concurrency: usize,
    duration: Duration,
    errors: &Arc<AtomicU64>,
) -> anyhow::Result<(u64, f64)> {
    let mut callers = Vec::with_capacity(concurrency);
    for index in 0..concurrency {
        callers.push(Caller::connect(measure, http, index).await?);
    }
    // The window starts after every caller is connected and has had a second to warm up.
    let begin = Instant::now() + Duration::from_secs(1);
    let end = begin + duration;
    let ok = Arc::new(AtomicU64::new(0));
    let served = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::with_capacity(concurrency);
    for (worker, mut caller) in (0u64..).zip(callers) {
        let model = measure.model.clone();
        let (ok, served, errors) = (ok.clone(), served.clone(), errors.clone());
        tasks.push(tokio::spawn(async move {
            let mut i = worker << 32;
            loop {
                let result = caller.unary(&model, i).await;
                i += 1;
                served.fetch_add(1, Ordering::Relaxed);
                let now = Instant::now();
                if now >= end {
                    break;
                }
                if now >= begin {
                    match result {
                        Ok(()) => ok.fetch_add(1, Ordering::Relaxed),
                        Err(_) => errors.fetch_add(1, Ordering::Relaxed),
                    };
                }
            }
        }));
    }
    for task in tasks {
        task.await?;
    }
    Ok((
        served.load(Ordering::Relaxed),
        ok.load(Ordering::Relaxed) as f64 / duration.as_secs_f64(),
    ))
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index.min(sorted.len() - 1)]
}

fn micros(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1e6
}

/// The pid and every descendant of it now alive (LiteLLM's proxy may run worker processes).
fn process_tree(root: u32) -> Vec<u32> {
    let mut parents: HashMap<u32, Vec<u32>> = HashMap::new();
    if let Ok(entries) = fs::read_dir("/proc") {
        for entry in entries.flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<u32>().ok())
            else {
                continue;
            };
            if let Some(ppid) = stat_fields(pid).and_then(|f| f.get(1).and_then(|p| p.parse().ok()))
            {
                parents.entry(ppid).or_default().push(pid);
            }
        }
    }
    let mut tree = vec![root];
    let mut next = 0;
    while next < tree.len() {
        if let Some(children) = parents.get(&tree[next]) {
            tree.extend(children);
        }
        next += 1;
    }
    tree
}

/// The fields of /proc/<pid>/stat after the command name: state, ppid, ...
fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    Some(rest.split_whitespace().map(str::to_string).collect())
}

/// utime + stime of the process tree, in clock ticks.
fn tree_cpu_ticks(root: u32) -> u64 {
    process_tree(root)
        .into_iter()
        .filter_map(stat_fields)
        .map(|fields| {
            let field = |i: usize| fields.get(i).and_then(|v| v.parse::<u64>().ok());
            // utime and stime are fields 14 and 15 of the line, 11 and 12 after the name.
            field(11).unwrap_or(0) + field(12).unwrap_or(0)
        })
        .sum()
}

/// The sum of VmHWM (peak resident set) over the process tree, in KiB.
fn tree_peak_rss_kib(root: u32) -> u64 {
    process_tree(root)
        .into_iter()
        .filter_map(|pid| fs::read_to_string(format!("/proc/{pid}/status")).ok())
        .filter_map(|status| {
            status
                .lines()
                .find_map(|line| line.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .sum()
}

fn machine() -> String {
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let model = fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
        })
        .unwrap_or_else(|| "unknown CPU".to_string());
    format!("{cores} cores (nproc), {model}")
}

fn table(rows: &[Row]) -> String {
    let mut out = String::new();
    let Some(base) = rows.first() else {
        return "no results\n".to_string();
    };
    let ms = |us: f64| us / 1000.0;
    out.push_str(&format!("Machine: {}\n\n", machine()));
    out.push_str(
        "| Target | c=1 p50 (over mock) | c=1 p99 (over mock) | rps c=16 | rps c=64 | TTFT p50 (over mock) | CPU / request | Peak RSS |\n",
    );
    out.push_str("|---|---|---|---|---|---|---|---|\n");
    for (i, row) in rows.iter().enumerate() {
        let over = |value: f64, baseline: f64| {
            if i == 0 {
                format!("{:.3} ms (baseline)", ms(value))
            } else {
                format!("{:.3} ms (**{:+.3}**)", ms(value), ms(value - baseline))
            }
        };
        let errors = if row.errors > 0 {
            format!(" ({} errors)", row.errors)
        } else {
            String::new()
        };
        out.push_str(&format!(
            "| {}{} | {} | {} | {:.0} | {:.0} | {} | {:.0} µs | {:.1} MiB |\n",
            row.name,
            errors,
            over(row.p50_us, base.p50_us),
            over(row.p99_us, base.p99_us),
            row.rps_16,
            row.rps_64,
            over(row.ttft_p50_us, base.ttft_p50_us),
            row.cpu_us_per_request,
            row.peak_rss_kib as f64 / 1024.0,
        ));
    }
    out
}
