//! deploy/docker-compose.yml's wiring without Docker: `deploy/compose_topology.py` starts every
//! Weir service with its compose command and environment as a `weir` process of this build (host
//! names mapped to 127.0.0.1, fixed ports to free ones, Redis to the test's), waits for each to be
//! healthy as compose's health checks do, and drives a session conversation and a budgeted
//! request through the router with the Python client, checking the recorded spend.
//!
//! Needs `.tools/python-client-venv` (`./tests/run` makes it); set
//! `WEIR_SKIP_PYTHON_CLIENT_TESTS=1` to skip it on a machine without Python.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::PathBuf;

use common::{WEIR, delete_prefix, redis_url};

#[tokio::test]
async fn the_compose_services_start_healthy_and_serve_a_budgeted_session() {
    if std::env::var_os("WEIR_SKIP_PYTHON_CLIENT_TESTS").is_some() {
        return;
    }
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let python = root.join(".tools/python-client-venv/bin/python");
    assert!(
        python.exists(),
        "{} is missing: run ./tests/run (or set WEIR_SKIP_PYTHON_CLIENT_TESTS=1)",
        python.display()
    );
    let prefix = format!("wtest-topology-{}", std::process::id());
    let script = root.join("deploy/compose_topology.py");
    let args = [WEIR.to_string(), redis_url(), prefix.clone()];
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(&python)
            .arg(script)
            .args(args)
            .output()
            .expect("python runs")
    })
    .await
    .unwrap();
    delete_prefix(&prefix).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    for service in ["inference", "session", "budget", "review", "router"] {
        assert!(
            stdout.contains(&format!("{service:<10} healthy")),
            "{stdout}"
        );
    }
    assert!(stdout.contains("micro-USD recorded"), "{stdout}");
}
