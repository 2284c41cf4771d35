//! The Python client package (`clients/python`) against a running Weir: its example programs
//! (a unary answer, a stream and its asyncio variant, a session conversation, errors with their
//! `google.rpc` details) run against a stack this test starts, as `weir up` would.
//!
//! Needs the package installed in `.tools/python-client-venv` (`./tests/run` does it). Set
//! `WEIR_SKIP_PYTHON_CLIENT_TESTS=1` to skip it on a machine without Python; it fails otherwise,
//! so that a missing client is never mistaken for a passing one.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;

use tokio::process::Command;
use weir::stack::Service;
use weir_tests::Mesh;

fn python() -> Option<PathBuf> {
    if std::env::var_os("WEIR_SKIP_PYTHON_CLIENT_TESTS").is_some() {
        return None;
    }
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let python = root.join(".tools/python-client-venv/bin/python");
    assert!(
        python.exists(),
        "{} is missing: run ./tests/run (or set WEIR_SKIP_PYTHON_CLIENT_TESTS=1)",
        python.display()
    );
    Some(python)
}

async fn example(python: &PathBuf, name: &str, args: &[String]) -> String {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../clients/python/examples")
        .join(name);
    let out = Command::new(python)
        .arg(&script)
        .args(args)
        .output()
        .await
        .expect("python runs");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{name} failed: {}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

#[tokio::test]
async fn the_python_client_examples_run_against_weir() {
    let Some(python) = python() else {
        return;
    };
    let mesh = Mesh::start("").await;
    let router = mesh.addr(Service::Router).to_string();
    let sessions = mesh.addr(Service::Session).to_string();

    let out = example(&python, "unary.py", std::slice::from_ref(&router)).await;
    assert!(out.starts_with("unary model=sim-small"), "{out}");
    let out = example(&python, "stream.py", std::slice::from_ref(&router)).await;
    assert!(
        out.contains("stream deltas=") && out.contains("async deltas="),
        "{out}"
    );
    let out = example(&python, "session.py", &[router.clone(), sessions]).await;
    assert!(out.starts_with("session "), "{out}");
    let out = example(&python, "error.py", std::slice::from_ref(&router)).await;
    assert!(out.contains("reason=MODEL_NOT_FOUND"), "{out}");
    assert!(out.contains("fields=[('messages'"), "{out}");
    mesh.stop().await;
}
