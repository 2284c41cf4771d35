//! `weir health` against a real `weir serve` process, and against nothing.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::Command;

use common::{Serve, WEIR, config_file, serve_command};

fn health(args: &[&str]) -> std::process::Output {
    Command::new(WEIR)
        .arg("health")
        .args(args)
        .output()
        .expect("weir health runs")
}

#[test]
fn a_serving_service_is_healthy_and_a_closed_port_is_not() {
    let config = config_file("health", "");
    let inference = Serve::start(serve_command("inference", &config), "inference");
    let addr = inference.url.trim_start_matches("http://").to_string();

    let out = health(&[&addr]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "SERVING");
    let out = health(&[&addr, "--service", "weir.inference.v1.InferenceService"]);
    assert!(out.status.success(), "{out:?}");

    // A service this process does not run: a clear refusal naming what to do.
    let out = health(&[&addr, "--service", "weir.router.v1.RouterService"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("does not serve"), "{stderr}");

    // Nothing listening: exit non-zero, quickly, saying so.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let out = health(&[&format!("127.0.0.1:{port}"), "--timeout", "1s"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("cannot connect"),
        "{out:?}"
    );
    let _ = std::fs::remove_file(config);
}
