//! `weir routes` against a real `weir serve inference` and two `weir serve router` replicas: the
//! table shows each replica's own canary state, and `canary resume` and `canary pause` reach
//! every replica given.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use common::{Serve, WEIR, config_file, serve_command};
use tonic::Request;
use weir_proto::{
    common::{Message, Role},
    router::{CompleteRequest, router_service_client::RouterServiceClient},
};

const ADMIN_KEY: &str = "routes-cli-admin-key-0123456789abcdef";
const PLAIN_KEY: &str = "routes-cli-plain-key-0123456789abcdef";
const SECRET: &str = "routes-cli-test-mesh-secret-0123456789abcdef";

fn config() -> PathBuf {
    config_file(
        "routes-cli",
        &format!(
            r#"
[[auth.api_keys]]
id = "ops"
tenant = "acme"
key = "{ADMIN_KEY}"
roles = ["admin"]

[[auth.api_keys]]
tenant = "acme"
key = "{PLAIN_KEY}"

[models.sim-old]
sim = {{ output_tokens = 4 }}
[models.sim-new]
sim = {{ output_tokens = 4, error_rate = 1.0, error_code = "INTERNAL" }}

[router]
session_url = ""
[router.rate_limit]
enabled = false

[router.routes.auto]
models = ["sim-old"]
tiers = {{ fast = ["sim-old"] }}
canary = {{ model = "sim-new", weight = 0.5, interval = "200ms", min_requests = 4, failed_checks = 1 }}

[router.routes.plain]
models = ["sim-old"]
"#
        ),
    )
}

fn serve(service: &str, config: &Path, inference: Option<&str>) -> Serve {
    let mut command = serve_command(service, config);
    command.env("WEIR_MESH__SECRET", SECRET);
    if let Some(url) = inference {
        command.env("WEIR_ROUTER__INFERENCE_URL", url);
    }
    Serve::start(command, service)
}

/// Runs `weir routes <args>` with `key` against `routers`; returns (success, stdout, stderr).
fn routes(routers: &[&str], key: &str, args: &[&str]) -> (bool, String, String) {
    let mut command = Command::new(WEIR);
    command.arg("routes").args(args).env("WEIR_API_KEY", key);
    for router in routers {
        command.args(["--router", router]);
    }
    let output = command.output().unwrap();
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// Sends requests to `router` until `weir routes` shows its canary rolled back (30 s at most).
async fn roll_back(router: &str) -> String {
    let mut client = RouterServiceClient::connect(router.to_string())
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while tokio::time::Instant::now() < deadline {
        for _ in 0..10 {
            let mut request = Request::new(CompleteRequest {
                model: "auto".to_string(),
                messages: vec![Message {
                    role: Role::User.into(),
                    content: "hello".to_string(),
                    ..Message::default()
                }],
                ..CompleteRequest::default()
            });
            request.metadata_mut().insert(
                "authorization",
                format!("Bearer {PLAIN_KEY}").parse().unwrap(),
            );
            let answer = client.complete(request).await.unwrap().into_inner();
            assert_eq!(answer.model, "sim-old", "the primary answers");
        }
        let (ok, out, err) = routes(&[router], ADMIN_KEY, &[]);
        assert!(ok, "{err}");
        if out.contains("rolled back") {
            return out;
        }
    }
    panic!("the canary was not rolled back");
}

#[tokio::test]
async fn routes_lists_each_replica_and_resume_reaches_them_all() {
    let config = config();
    let inference = serve("inference", &config, None);
    let first = serve("router", &config, Some(&inference.url));
    let second = serve("router", &config, Some(&inference.url));
    let (one, two) = (first.url.as_str(), second.url.as_str());

    // Both replicas start at the configured weight.
    let (ok, out, err) = routes(&[one, two], ADMIN_KEY, &[]);
    assert!(ok, "{err}");
    assert!(out.contains(&format!("router {one}")), "{out}");
    assert!(out.contains(&format!("router {two}")), "{out}");
    let table = out.lines().find(|l| l.starts_with("auto ")).unwrap();
    for cell in ["sim-old", "sim-new", "0.5/0.5", "active"] {
        assert!(table.contains(cell), "{cell}:\n{out}");
    }
    assert!(out.contains("auto tier fast: sim-old"), "{out}");
    assert!(out.contains("cache: off"), "{out}");
    let plain = out.lines().find(|l| l.starts_with("plain ")).unwrap();
    assert!(plain.contains(" - "), "no canary:\n{out}");

    // Only the first replica sees the failing canary's traffic: only it rolls back.
    let out = roll_back(one).await;
    let table = out.lines().find(|l| l.starts_with("auto ")).unwrap();
    assert!(
        table.contains("0.5/0") && table.contains("rolled back"),
        "{out}"
    );
    assert!(out.contains("error rate 100.0%"), "{out}");
    let (ok, out, _) = routes(&[two], ADMIN_KEY, &[]);
    assert!(
        ok && out.contains("0.5/0.5") && !out.contains("rolled back"),
        "{out}"
    );

    // Resuming needs admin, names the role, and exits non-zero.
    let (ok, _, err) = routes(&[one], PLAIN_KEY, &["canary", "resume", "auto"]);
    assert!(!ok && err.contains("ROLE_REQUIRED"), "{err}");
    // A route without a canary, or an unknown one, is refused with its reason.
    let (ok, _, err) = routes(&[one], ADMIN_KEY, &["canary", "resume", "plain"]);
    assert!(!ok && err.contains("NO_CANARY"), "{err}");
    let (ok, _, err) = routes(&[one], ADMIN_KEY, &["canary", "resume", "nope"]);
    assert!(!ok && err.contains("ROUTE_NOT_FOUND"), "{err}");

    // Resume reaches every replica given.
    let (ok, out, err) = routes(&[one, two], ADMIN_KEY, &["canary", "resume", "auto"]);
    assert!(ok, "{out}{err}");
    for url in [one, two] {
        assert!(
            out.contains(&format!(
                "{url}: canary sim-new of route auto resumed at weight 0.5"
            )),
            "{out}"
        );
    }
    let (ok, out, _) = routes(&[one, two], ADMIN_KEY, &[]);
    assert!(ok && !out.contains("rolled back"), "{out}");

    // Pause takes it off on every replica given, until resumed.
    let (ok, out, err) = routes(&[one, two], ADMIN_KEY, &["canary", "pause", "auto"]);
    assert!(ok, "{out}{err}");
    assert!(
        out.contains(&format!(
            "{two}: canary sim-new of route auto paused at weight 0"
        )),
        "{out}"
    );
    let (ok, out, _) = routes(&[two], ADMIN_KEY, &[]);
    assert!(
        ok && out.contains("0.5/0") && out.contains("paused by an operator"),
        "{out}"
    );
    drop((first, second, inference));
    let _ = std::fs::remove_file(config);
}
