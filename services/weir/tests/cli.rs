//! The `weir` command as a user runs it: `weir up` in one process, `weir chat` in another.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    io::{BufRead, BufReader},
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

const WEIR: &str = env!("CARGO_BIN_EXE_weir");

/// `weir up` on free ports; killed on drop.
struct Up {
    child: Child,
    router: String,
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
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("weir up starts");
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
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            match rx.recv_timeout(Duration::from_millis(200)) {
                Ok(line) if line.starts_with("router") => {
                    let addr = line.split("grpc://").nth(1).unwrap().trim().to_string();
                    router = Some(format!("http://{addr}"));
                }
                Ok(line) if line.starts_with("Weir is up") => break,
                Ok(_) | Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
        }
        Self {
            child,
            router: router.expect("weir up prints the router's address"),
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

    let streamed = chat(&up.router, &["hello"]);
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
