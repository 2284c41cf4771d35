//! The TypeScript client package (`clients/typescript`) against a running Weir: its example
//! programs (a unary answer, a stream, a session conversation, errors with their `google.rpc`
//! details) run with Node against a stack this test starts, as `weir up` would.
//!
//! Needs Node.js and the package built (`./tests/run` runs `npm ci` and `npm run build` in
//! clients/typescript). Set `WEIR_SKIP_TYPESCRIPT_CLIENT_TESTS=1` to skip it on a machine without
//! Node; it fails otherwise, so that a missing client is never mistaken for a passing one.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;

use tokio::process::Command;
use weir::stack::Service;
use weir_tests::Mesh;

fn package() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../clients/typescript")
}

async fn example(name: &str, args: &[String]) -> String {
    let out = Command::new("node")
        .arg(package().join("examples").join(name))
        .args(args)
        .output()
        .await
        .expect("node runs");
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
async fn the_typescript_client_examples_run_against_weir() {
    if std::env::var_os("WEIR_SKIP_TYPESCRIPT_CLIENT_TESTS").is_some() {
        return;
    }
    assert!(
        package().join("dist/index.js").exists(),
        "clients/typescript is not built: run ./tests/run (or set WEIR_SKIP_TYPESCRIPT_CLIENT_TESTS=1)"
    );
    let mesh = Mesh::start("").await;
    let router = mesh.addr(Service::Router).to_string();
    let sessions = mesh.addr(Service::Session).to_string();

    let out = example("unary.mjs", std::slice::from_ref(&router)).await;
    assert!(out.starts_with("unary model=sim-small"), "{out}");
    let out = example("stream.mjs", std::slice::from_ref(&router)).await;
    assert!(out.starts_with("stream deltas="), "{out}");
    let out = example("session.mjs", &[router.clone(), sessions]).await;
    assert!(out.starts_with("session "), "{out}");
    let out = example("error.mjs", std::slice::from_ref(&router)).await;
    assert!(out.contains("reason=MODEL_NOT_FOUND"), "{out}");
    assert!(out.contains("field=messages"), "{out}");
    mesh.stop().await;
}
