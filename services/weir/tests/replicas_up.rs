//! `weir up --replicas 2`: two processes of every service on one Redis, the routers balancing
//! over the others. Requests go through both printed routers, survive the SIGKILL of one
//! inference process, and SIGINT stops every process.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::{
    io::{BufRead, BufReader},
    process::{Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use common::{WEIR, config_file, delete_prefix, redis_url};
use weir_proto::{
    common::{Message, Role},
    router::{CompleteRequest, router_service_client::RouterServiceClient},
};

fn config(prefix: &str) -> String {
    format!(
        r#"
[server]
drain_delay = "100ms"

[models.fast]
sim = {{ output_tokens = 2 }}

[router.rate_limit]
key_prefix = "{prefix}"
[router.idempotency]
key_prefix = "{prefix}"
[router.jobs]
key_prefix = "{prefix}"
[router.cache]
key_prefix = "{prefix}"
[session]
key_prefix = "{prefix}"
[budget]
key_prefix = "{prefix}"
[review]
key_prefix = "{prefix}"
"#
    )
}

fn complete() -> CompleteRequest {
    CompleteRequest {
        model: "fast".to_string(),
        messages: vec![Message {
            role: Role::User as i32,
            content: "hello replicas".to_string(),
            ..Message::default()
        }],
        ..CompleteRequest::default()
    }
}

/// Signals `pid` with `kill -<signal>`.
fn signal(pid: u32, signal: &str) {
    let status = Command::new("kill")
        .args([format!("-{signal}"), pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weir_up_with_two_replicas_serves_through_both_routers_and_stops_on_sigint() {
    let prefix = format!("wtest-replicas-up-{}", std::process::id());
    let file = config_file("replicas-up", &config(&prefix));
    let mut up = Command::new(WEIR)
        .args(["up", "--replicas", "2", "--redis", &redis_url(), "--config"])
        .arg(&file)
        .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
        .env_remove("WEIR_MESH__SECRET")
        .env("RUST_LOG", "error")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = up.stdout.take().unwrap();
    let (tx, lines) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    // `<service>  grpc://<addr>   (pid <pid>)` per replica, then `Weir is up ...`.
    let mut replicas: Vec<(String, String, u32)> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = lines.recv_timeout(left).expect("weir up prints its banner");
        if line.starts_with("Weir is up with 2 replicas") {
            break;
        }
        let words: Vec<&str> = line.split_whitespace().collect();
        if let [name, addr, "(pid", pid] = words.as_slice()
            && let Some(addr) = addr.strip_prefix("grpc://")
        {
            let pid = pid.trim_end_matches(')').parse().unwrap();
            replicas.push((name.to_string(), addr.to_string(), pid));
        }
    }
    let of = |service: &str| -> Vec<(String, u32)> {
        replicas
            .iter()
            .filter(|(name, _, _)| name == service)
            .map(|(_, addr, pid)| (addr.clone(), *pid))
            .collect()
    };
    for service in ["router", "inference", "session", "budget", "review"] {
        assert_eq!(of(service).len(), 2, "{service}: {replicas:?}");
    }
    let routers: Vec<_> = of("router")
        .into_iter()
        .map(|(addr, _)| {
            RouterServiceClient::new(
                tonic::transport::Channel::from_shared(format!("http://{addr}"))
                    .unwrap()
                    .connect_lazy(),
            )
        })
        .collect();
    for router in &routers {
        for _ in 0..5 {
            router.clone().complete(complete()).await.unwrap();
        }
    }

    // One inference process dies: both routers keep answering through the other.
    signal(of("inference")[0].1, "KILL");
    for router in &routers {
        for _ in 0..20 {
            router.clone().complete(complete()).await.unwrap();
        }
    }

    signal(up.id(), "INT");
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = up.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "weir up did not stop");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(status.success(), "{status}");
    for (name, addr, _) in &replicas {
        assert!(
            std::net::TcpStream::connect(addr).is_err(),
            "{name} at {addr} still accepts connections"
        );
    }
    delete_prefix(&prefix).await;
    let _ = std::fs::remove_file(file);
}
