//! `weir up --replicas N`: N processes of every service on this machine, for trying load
//! balancing and outlier ejection locally.
//!
//! Each replica is a `weir serve <service>` child process of this one, on a port of its own
//! (`127.0.0.1:0`; its address read from the banner it prints once it serves). The services are
//! started dependencies first (inference, session, budget, review, then the routers), and each
//! one that calls another is given the comma-separated list of that service's N addresses, which
//! it balances over ([`weir_mesh::balance`]): kill one inference process and the routers eject it
//! while its siblings serve.
//!
//! Processes share no memory, so every store is Redis (`--redis`, default
//! [`DEFAULT_REDIS_URL`]): sessions, budgets, review items, idempotency records, rate limits, jobs
//! and the response cache. Without a reachable Redis the command refuses to start. The processes
//! share a random mesh secret (unless the configuration has one), so they believe each other's
//! tenants. A replica that dies (kill one to watch the others take over) is reported and not
//! restarted. Ctrl-C (or SIGTERM) stops the routers first, then the rest, each with SIGTERM (so it
//! drains), and SIGKILL for any still running after [`STOP_GRACE`].

use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader},
    path::Path,
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{Context, anyhow, bail};

use crate::stack::{Service, StackConfig};

/// The Redis the replicas share unless `--redis` names another.
pub const DEFAULT_REDIS_URL: &str = "redis://127.0.0.1:6379";
/// How long a replica may take to print its addresses.
pub const START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a replica may drain after SIGTERM before it is killed.
pub const STOP_GRACE: Duration = Duration::from_secs(30);

/// The environment variables of the stores that replicas must share, each set to the Redis URL.
const REDIS_SETTINGS: [&str; 7] = [
    "WEIR_SESSION__REDIS_URL",
    "WEIR_BUDGET__REDIS_URL",
    "WEIR_REVIEW__REDIS_URL",
    "WEIR_ROUTER__IDEMPOTENCY__REDIS_URL",
    "WEIR_ROUTER__RATE_LIMIT__REDIS_URL",
    "WEIR_ROUTER__JOBS__REDIS_URL",
    "WEIR_ROUTER__CACHE__REDIS_URL",
];

/// One `weir serve <service>` child process.
struct Replica {
    service: Service,
    child: Child,
    /// What its banner listed: `(name, address)`, such as `("router", "grpc://127.0.0.1:40001")`.
    banner: Vec<(String, String)>,
    /// Whether its exit was reported.
    reported: bool,
}

impl Replica {
    /// `http://<addr>` of its gRPC server.
    fn url(&self) -> Option<String> {
        self.banner
            .iter()
            .find(|(name, _)| name == self.service.name())
            .map(|(_, addr)| addr.replacen("grpc://", "http://", 1))
    }
}

/// The children, stopped (SIGTERM, then SIGKILL) when dropped, so an error on the way up or a
/// panic leaves no process behind.
#[derive(Default)]
struct Replicas(Vec<Replica>);

impl Drop for Replicas {
    fn drop(&mut self) {
        stop_all(&mut self.0);
    }
}

/// Runs `replicas` processes of every service from `config` (the `weir up` config file, if any)
/// sharing the Redis at `redis`, prints their addresses, and waits for Ctrl-C or SIGTERM. A
/// replica that exits meanwhile is reported on stderr; the others keep running.
pub async fn up(replicas: usize, redis: &str, config: Option<&Path>) -> anyhow::Result<()> {
    if replicas == 0 {
        bail!("--replicas must be at least 1");
    }
    // Load the configuration here first, so a bad one fails once, before any process starts.
    let stack = StackConfig::load(config)?;
    weir_mesh::store::connect(redis).await.map_err(|error| {
        anyhow!(
            "weir up --replicas: the replicas are separate processes that share state only \
             through Redis, which cannot be reached ({error}); start Redis there or pass \
             --redis URL"
        )
    })?;
    let shutdown = weir_mesh::shutdown::on_signal();
    let exe = std::env::current_exe().context("cannot find the weir executable")?;
    let mut env: Vec<(String, String)> = REDIS_SETTINGS
        .iter()
        .map(|key| (key.to_string(), redis.to_string()))
        .collect();
    if stack.mesh.configured_secret("mesh")?.is_none() {
        env.push(("WEIR_MESH__SECRET".to_string(), random_secret()?));
    }
    let config = config.map(Path::to_path_buf);
    let mut running = Replicas::default();
    let mut urls = BTreeMap::new();
    for service in Service::ALL {
        let mut service_env = env.clone();
        let mut point = |key: &str, dependency: Service| {
            if let Some(list) = urls.get(&dependency) {
                service_env.push((key.to_string(), String::clone(list)));
            }
        };
        match service {
            Service::Session => point("WEIR_SESSION__INFERENCE_URL", Service::Inference),
            Service::Router => {
                point("WEIR_ROUTER__INFERENCE_URL", Service::Inference);
                // As `weir up`: an empty URL keeps that feature off.
                if stack.router.session_url().is_some() {
                    point("WEIR_ROUTER__SESSION_URL", Service::Session);
                }
                if stack.router.budget_url().is_some() {
                    point("WEIR_ROUTER__BUDGET_URL", Service::Budget);
                }
                if stack.router.review.review_url().is_some() {
                    point("WEIR_ROUTER__REVIEW__REVIEW_URL", Service::Review);
                }
            }
            _ => {}
        }
        let mut addresses = Vec::new();
        for _ in 0..replicas {
            if shutdown.is_cancelled() {
                return Ok(());
            }
            let (exe, config, env) = (exe.clone(), config.clone(), service_env.clone());
            let replica =
                tokio::task::spawn_blocking(move || start(&exe, service, config.as_deref(), &env))
                    .await??;
            addresses.push(
                replica.url().ok_or_else(|| {
                    anyhow!("weir serve {service} printed no address for {service}")
                })?,
            );
            running.0.push(replica);
        }
        urls.insert(service, addresses.join(","));
    }
    print_banner(&running.0, replicas);

    loop {
        tokio::select! {
            () = shutdown.cancelled() => break,
            () = tokio::time::sleep(Duration::from_millis(200)) => {}
        }
        // A replica that exits (killed to watch its siblings take over, say) is reported once;
        // the others keep serving.
        for replica in &mut running.0 {
            if !replica.reported
                && let Some(status) = replica.child.try_wait()?
            {
                replica.reported = true;
                eprintln!(
                    "{} replica (pid {}) exited ({status}); its siblings serve on",
                    replica.service,
                    replica.child.id()
                );
            }
        }
    }
    let mut children = std::mem::take(&mut running.0);
    tokio::task::spawn_blocking(move || stop_all(&mut children)).await?;
    Ok(())
}

/// Spawns `weir serve <service>` and waits for its banner (the addresses it serves on).
fn start(
    exe: &Path,
    service: Service,
    config: Option<&Path>,
    env: &[(String, String)],
) -> anyhow::Result<Replica> {
    let mut command = Command::new(exe);
    command.args(["serve", service.name()]);
    if let Some(config) = config {
        command.arg("--config").arg(config);
    }
    let name = service.name().to_ascii_uppercase();
    command
        .env(format!("WEIR_{name}__LISTEN"), "127.0.0.1:0")
        .env("WEIR_TELEMETRY__METRICS_LISTEN", "127.0.0.1:0")
        .env("WEIR_ROUTER__HTTP__LISTEN", "127.0.0.1:0")
        .env("WEIR_REVIEW__CONSOLE__LISTEN", "127.0.0.1:0")
        .envs(env.iter().map(|(key, value)| (key, value)))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    let mut child = command
        .spawn()
        .with_context(|| format!("cannot start {} serve {service}", exe.display()))?;
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| anyhow!("no stdout from weir serve {service}"))?;
    let (lines, banner_lines) = mpsc::channel();
    // Read its stdout to the end, so it never writes to a closed pipe.
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = lines.send(line);
        }
    });
    let mut replica = Replica {
        service,
        child,
        banner: Vec::new(),
        reported: false,
    };
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match banner_lines.recv_timeout(left) {
            Ok(line) if line.starts_with("Weir is up") => return Ok(replica),
            Ok(line) => {
                let mut words = line.split_whitespace();
                if let (Some(name), Some(addr)) = (words.next(), words.next()) {
                    replica.banner.push((name.to_string(), addr.to_string()));
                }
            }
            Err(_) => {
                let status = replica.child.try_wait()?;
                stop_all(&mut vec![replica]);
                bail!(match status {
                    Some(status) => format!("weir serve {service} exited ({status}) on start"),
                    None => format!("weir serve {service} did not serve within {START_TIMEOUT:?}"),
                });
            }
        }
    }
}

/// Stops `replicas`, routers first: SIGTERM, a drain of up to [`STOP_GRACE`], then SIGKILL.
fn stop_all(replicas: &mut Vec<Replica>) {
    replicas.sort_by_key(|replica| replica.service != Service::Router);
    let routers = replicas
        .iter()
        .take_while(|r| r.service == Service::Router)
        .count();
    let (routers, others) = replicas.split_at_mut(routers);
    for group in [routers, others] {
        for replica in group.iter_mut() {
            terminate(&mut replica.child);
        }
        let deadline = Instant::now() + STOP_GRACE;
        for replica in group.iter_mut() {
            while matches!(replica.child.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = replica.child.kill();
            let _ = replica.child.wait();
        }
    }
    replicas.clear();
}

/// Sends SIGTERM (through `kill`, which every Unix has), so the process drains; SIGKILL when
/// that cannot be run.
fn terminate(child: &mut Child) {
    if matches!(child.try_wait(), Ok(Some(_))) {
        return;
    }
    let sent = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success());
    if !sent {
        let _ = child.kill();
    }
}

/// A mesh secret for this run: 32 random bytes, hex-encoded.
fn random_secret() -> anyhow::Result<String> {
    use ring::rand::{SecureRandom, SystemRandom};
    let mut bytes = [0u8; 32];
    SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| anyhow!("no randomness for the mesh secret"))?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// Prints every replica's addresses, routers first.
fn print_banner(replicas: &[Replica], count: usize) {
    use std::io::Write;
    let mut banner = String::new();
    let mut ordered: Vec<&Replica> = replicas.iter().collect();
    ordered.sort_by_key(|replica| replica.service != Service::Router);
    for replica in ordered {
        for (name, addr) in &replica.banner {
            if name == "auth" {
                continue;
            }
            let pid = replica.child.id();
            banner.push_str(&format!("{name:<10} {addr}   (pid {pid})\n"));
        }
    }
    let router = replicas
        .iter()
        .find(|r| r.service == Service::Router)
        .and_then(Replica::url)
        .unwrap_or_default();
    banner.push_str(&format!(
        "Weir is up with {count} replicas of each service. Try: weir chat --router {router} \
         \"hello\"   (Ctrl-C to stop)\n"
    ));
    let mut stdout = std::io::stdout().lock();
    if stdout
        .write_all(banner.as_bytes())
        .and_then(|()| stdout.flush())
        .is_err()
    {
        tracing::warn!("stdout is closed; the replicas keep running");
    }
}
