//! `weir review` against a real `weir serve review` process with API keys (in-memory store:
//! this tests the command, the store is tested in weir-review).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::{path::PathBuf, process::Command};

use common::{Serve, WEIR, config_file, serve_command};
use tonic::Request;
use weir_proto::{
    common::{Message, Role},
    review::{CreateItemRequest, ReviewItem, review_service_client::ReviewServiceClient},
};

const REVIEWER_KEY: &str = "acme-reviewer-key-0123456789abcdef";
const PLAIN_KEY: &str = "acme-plain-key-0123456789abcdef";

fn config() -> PathBuf {
    config_file(
        "review-cli",
        &format!(
            "[[auth.api_keys]]\nid = \"desk\"\ntenant = \"acme\"\nkey = \"{REVIEWER_KEY}\"\n\
             roles = [\"reviewer\"]\n\n[[auth.api_keys]]\ntenant = \"acme\"\nkey = \"{PLAIN_KEY}\"\n"
        ),
    )
}

/// Runs `weir review <args>` with `key`; returns (success, stdout, stderr).
fn review(url: &str, key: &str, args: &[&str]) -> (bool, String, String) {
    let output = Command::new(WEIR)
        .arg("review")
        .args(args)
        .args(["--review", url])
        .env("WEIR_API_KEY", key)
        .env("WEIR_REVIEWER", "alice")
        .output()
        .unwrap();
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

async fn create(url: &str, priority: i32, text: &str) -> ReviewItem {
    let mut client = ReviewServiceClient::connect(url.to_string()).await.unwrap();
    let mut request = Request::new(CreateItemRequest {
        queue: "cli".to_string(),
        output: Some(Message {
            role: Role::Assistant.into(),
            content: text.to_string(),
            ..Message::default()
        }),
        model: "sim-small".to_string(),
        reasons: vec!["pii".to_string()],
        priority,
        ..CreateItemRequest::default()
    });
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {PLAIN_KEY}").parse().unwrap(),
    );
    client
        .create_item(request)
        .await
        .unwrap()
        .into_inner()
        .item
        .unwrap()
}

#[tokio::test]
async fn list_show_approve_and_reject_from_the_command_line() {
    let path = config();
    let mut command = serve_command("review", &path);
    // Keys in a separate process need a mesh secret (unused here: no peer calls).
    command.env(
        "WEIR_MESH__SECRET",
        "review-cli-test-mesh-secret-0123456789abcdef",
    );
    let server = Serve::start(command, "review");
    let url = server.url.clone();
    let low = create(&url, 0, "a low priority answer").await;
    let high = create(&url, 5, "an urgent answer").await;

    let (ok, out, err) = review(&url, REVIEWER_KEY, &["list", "--queue", "cli"]);
    assert!(ok, "{err}");
    let (high_at, low_at) = (out.find(&high.id).unwrap(), out.find(&low.id).unwrap());
    assert!(high_at < low_at, "most urgent first:\n{out}");
    assert!(out.contains("pending"), "{out}");

    let (ok, out, err) = review(
        &url,
        REVIEWER_KEY,
        &["approve", &high.id, "--comment", "fine"],
    );
    assert!(ok, "{err}");
    assert!(out.contains(&format!("approved {}", high.id)), "{out}");
    let (ok, out, _) = review(&url, REVIEWER_KEY, &["show", &high.id]);
    assert!(ok);
    assert!(out.contains("state:     decided"), "{out}");
    assert!(out.contains("VERDICT_APPROVE by alice"), "{out}");
    assert!(out.contains("an urgent answer"), "{out}");
    assert!(
        out.contains("CLAIMED") && out.contains("alice (key:desk)"),
        "{out}"
    );

    // Deciding needs the reviewer role; the refusal names it and exits non-zero.
    let (ok, _, err) = review(&url, PLAIN_KEY, &["reject", &low.id, "--reason", "no"]);
    assert!(!ok);
    assert!(
        err.contains("ROLE_REQUIRED") || err.contains("reviewer"),
        "{err}"
    );
    let (ok, out, err) = review(&url, REVIEWER_KEY, &["reject", &low.id, "--reason", "no"]);
    assert!(ok, "{err}");
    assert!(out.contains("rejected"), "{out}");
    // A decided item cannot be decided again.
    let (ok, _, err) = review(&url, REVIEWER_KEY, &["approve", &low.id]);
    assert!(!ok);
    assert!(err.contains("ALREADY_DECIDED"), "{err}");

    let (ok, out, _) = review(
        &url,
        REVIEWER_KEY,
        &["list", "--queue", "cli", "--state", "pending"],
    );
    assert!(ok);
    assert!(out.contains("no items"), "{out}");
    drop(server);
    let _ = std::fs::remove_file(path);
}
