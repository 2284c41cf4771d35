//! The `weir` command as a user runs it: `weir up` in one process, `weir chat` in another.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::TcpStream,
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex, mpsc},
    time::{Duration, Instant},
};

const WEIR: &str = env!("CARGO_BIN_EXE_weir");

/// `weir up` on free ports, logging JSON at debug for the router; killed on drop.
struct Up {
    child: Child,
    router: String,
    metrics: String,
    console: String,
    openai: String,
    logs: Arc<Mutex<Vec<String>>>,
}

impl Up {
    fn start() -> Self {
        let mut command = Command::new(WEIR);
        command.arg("up");
        for service in ["ROUTER", "INFERENCE", "SESSION", "BUDGET", "REVIEW"] {
            command.env(format!("WEIR_{service}__LISTEN"), "127.0.0.1:0");
        }
        let mut child = command
            .env_remove("WEIR_CONFIG")
            .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
            .env("RUST_LOG", "warn,weir_router=debug")
            .env("WEIR_TELEMETRY__LOG_FORMAT", "json")
            .env("WEIR_TELEMETRY__METRICS_LISTEN", "127.0.0.1:0")
            .env("WEIR_REVIEW__CONSOLE__LISTEN", "127.0.0.1:0")
            .env("WEIR_ROUTER__HTTP__LISTEN", "127.0.0.1:0")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("weir up starts");
        let logs = Arc::new(Mutex::new(Vec::new()));
        let stderr = child.stderr.take().unwrap();
        let sink = logs.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                sink.lock().unwrap().push(line);
            }
        });
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut router = None;
        let mut metrics = None;
        let mut console = None;
        let mut openai = None;
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            match rx.recv_timeout(Duration::from_millis(200)) {
                Ok(line) if line.starts_with("router") => {
                    let addr = line.split("grpc://").nth(1).unwrap().trim().to_string();
                    router = Some(format!("http://{addr}"));
                }
                Ok(line) if line.starts_with("metrics") => {
                    let url = line.split("http://").nth(1).unwrap().trim();
                    metrics = Some(url.trim_end_matches("/metrics").to_string());
                }
                Ok(line) if line.starts_with("console") => {
                    let url = line.split("http://").nth(1).unwrap();
                    console = url.split('/').next().map(str::to_string);
                }
                Ok(line) if line.starts_with("openai") => {
                    let url = line.split("http://").nth(1).unwrap();
                    openai = url.split('/').next().map(str::to_string);
                }
                Ok(line) if line.starts_with("Weir is up") => break,
                Ok(_) | Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
        }
        Self {
            child,
            router: router.expect("weir up prints the router's address"),
            metrics: metrics.expect("weir up prints the metrics address"),
            console: console.expect("weir up prints the reviewer console's address"),
            openai: openai.expect("weir up prints the OpenAI base URL"),
            logs,
        }
    }

    fn terminate(mut self) -> std::process::ExitStatus {
        let pid = self.child.id().to_string();
        Command::new("kill").args(["-TERM", &pid]).status().unwrap();
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "weir up did not stop on SIGTERM");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// `GET /metrics` over a plain HTTP/1.0 connection: the Prometheus text.
fn scrape(addr: &str) -> String {
    get(addr, "/metrics")
}

/// `GET path` over a plain HTTP/1.0 connection: the whole response, which must be 200.
fn get(addr: &str, path: &str) -> String {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\nHost: weir\r\n\r\n").as_bytes())
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    assert!(response.starts_with("HTTP/1.0 200"), "{response}");
    response
}

/// The value of the series of `name` whose labels include all of `labels`.
fn sample(metrics: &str, name: &str, labels: &[&str]) -> Option<f64> {
    metrics
        .lines()
        .filter(|line| line.starts_with(&format!("{name}{{")))
        .find(|line| labels.iter().all(|label| line.contains(label)))
        .and_then(|line| line.rsplit_once(' '))
        .and_then(|(_, value)| value.parse().ok())
}

fn is_hex(text: &str, len: usize) -> bool {
    text.len() == len && text.bytes().all(|b| b.is_ascii_hexdigit())
}

/// The value of a string field in a JSON log line (`"key":"value"`).
fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    let start = line.find(&format!("\"{key}\":\""))? + key.len() + 4;
    let rest = line.get(start..)?;
    rest.find('"').and_then(|end| rest.get(..end))
}

impl Drop for Up {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn chat(router: &str, args: &[&str]) -> std::process::Output {
    Command::new(WEIR)
        .arg("chat")
        .args(args)
        .env("WEIR_ROUTER_URL", router)
        .output()
        .expect("weir chat runs")
}

#[test]
fn up_then_chat_streams_an_answer_and_sigterm_stops_cleanly() {
    let up = Up::start();

    let streamed = chat(&up.router, &["hello zebracorn"]);
    assert!(streamed.status.success(), "{streamed:?}");
    let text = String::from_utf8(streamed.stdout).unwrap();
    assert!(
        text.contains("hello"),
        "the sim model answers about the prompt: {text:?}"
    );
    let summary = String::from_utf8(streamed.stderr).unwrap();
    assert!(
        summary.contains("sim-large"),
        "the auto route serves sim-large: {summary}"
    );
    assert!(summary.contains("out tokens"), "{summary}");

    let unary = chat(
        &up.router,
        &["--no-stream", "--model", "sim-small", "hello"],
    );
    assert!(unary.status.success(), "{unary:?}");
    assert!(
        String::from_utf8(unary.stderr)
            .unwrap()
            .contains("sim-small")
    );

    let missing = chat(&up.router, &["--model", "no-such-model", "hello"]);
    assert!(!missing.status.success());
    let error = String::from_utf8(missing.stderr).unwrap();
    assert!(
        error.contains("NOT_FOUND") && error.contains("no-such-model"),
        "{error}"
    );

    // The reviewer console: its page and script, served by the same process with no build step;
    // its API refuses a caller without a key.
    let page = get(&up.console, "/");
    assert!(
        page.contains("<title>Weir review console</title>"),
        "{page}"
    );
    assert!(get(&up.console, "/console.js").contains("text/javascript"));
    let mut stream = TcpStream::connect(&up.console).unwrap();
    stream
        .write_all(b"GET /api/queues HTTP/1.0\r\nHost: weir\r\n\r\n")
        .unwrap();
    let mut refused = String::new();
    stream.read_to_string(&mut refused).unwrap();
    assert!(refused.starts_with("HTTP/1.0 401"), "{refused}");

    // The OpenAI-compatible edge: its model list, served by the same process.
    let models = get(&up.openai, "/v1/models");
    assert!(models.contains(r#""id":"auto""#), "{models}");

    // Prometheus metrics of the same process: the calls above, by method and code.
    let metrics = scrape(&up.metrics);
    let router = "rpc_service=\"weir.router.v1.RouterService\"";
    let count = |method: &str, code: &str| {
        let method = format!("rpc_method=\"{method}\"");
        let code = format!("grpc_code=\"{code}\"");
        sample(
            &metrics,
            "weir_rpc_server_requests_total",
            &[router, &method, &code],
        )
    };
    assert_eq!(count("CompleteStream", "OK"), Some(1.0), "{metrics}");
    assert_eq!(count("Complete", "OK"), Some(1.0), "{metrics}");
    assert_eq!(count("CompleteStream", "NOT_FOUND"), Some(1.0), "{metrics}");
    assert!(metrics.contains("weir_circuit_breaker_state{"), "{metrics}");

    // JSON logs: the router's lines inside a call carry its trace and span ids; no prompt text.
    let logs = up.logs.lock().unwrap().clone();
    let traced: Vec<&String> = logs
        .iter()
        .filter(|line| line.contains("weir_router"))
        .filter(|line| {
            field(line, "trace_id").is_some_and(|id| is_hex(id, 32))
                && field(line, "span_id").is_some_and(|id| is_hex(id, 16))
        })
        .collect();
    assert!(
        !traced.is_empty(),
        "no router log line with trace_id and span_id: {logs:#?}"
    );
    assert!(
        logs.iter()
            .all(|line| line.starts_with('{') && line.ends_with('}'))
    );
    assert!(
        !logs.iter().any(|line| line.contains("zebracorn")),
        "prompt text reached the logs"
    );

    let status = up.terminate();
    assert!(
        status.success(),
        "weir up exits 0 after draining: {status:?}"
    );
}

#[test]
fn bad_config_fails_at_start_naming_the_key() {
    let output = Command::new(WEIR)
        .arg("up")
        .env("WEIR_ROUTER__LISTEN", "not-an-address")
        .output()
        .unwrap();
    assert!(!output.status.success());
    let error = String::from_utf8(output.stderr).unwrap();
    assert!(error.contains("router.listen"), "{error}");

    let output = Command::new(WEIR)
        .args(["serve", "router", "--config", "/nonexistent/weir.toml"])
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(
        String::from_utf8(output.stderr)
            .unwrap()
            .contains("/nonexistent/weir.toml")
    );
}
