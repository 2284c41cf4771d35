//! The reviewer console in a real browser: Debian's Chromium, driven by playwright-core
//! (`tests/browser/console.mjs`), against a router, an inference service and a review service on
//! Redis, on real sockets.
//!
//! A key without the reviewer role is turned away at sign-in; a reviewer signs in with the
//! keyboard; a user's request that a blocking policy flags arrives in
//! the open queue without a reload; the reviewer claims it with Enter and approves it with `a`;
//! the user, waiting in `WatchItem`, receives the approved answer. Screenshots of the queue and
//! item views are saved under `target/tmp/review_console/`.
//!
//! Needs Node.js, `/usr/bin/chromium` and `tests/browser/node_modules` (`./tests/run` installs all
//! three; this test runs `npm ci` itself when only the last is missing). Set
//! `WEIR_SKIP_BROWSER_TESTS=1` to skip it on a machine without a browser; it fails otherwise, so
//! that a missing browser is never mistaken for a passing console.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{path::PathBuf, process::Stdio, time::Duration};

use tokio::{
    io::{AsyncBufReadExt, BufReader},
    process::Command,
};
use weir::stack::Service;
use weir_proto::review::{ItemState, Verdict, WatchItemRequest};
use weir_proto::router::ReviewStatus;
use weir_tests::{Mesh, complete, delete_prefix, redis_url, unique_prefix, with_key};

const USER_KEY: &str = "acme-user-key-0123456789";
const REVIEWER_KEY: &str = "acme-reviewer-key-0123456789";

fn config(prefix: &str) -> String {
    format!(
        r#"
# The services run in one process here, but not all of them: they vouch for each other's calls
# with this secret, as separate processes would.
[mesh]
secret = "review-console-test-secret-0123456789abcdef"

[[auth.api_keys]]
tenant = "acme"
key = "{USER_KEY}"

[[auth.api_keys]]
tenant = "acme"
key = "{REVIEWER_KEY}"
roles = ["reviewer"]

[router.review]
review_url = "http://127.0.0.1:50055"

[[router.review.policies]]
name = "refunds"
mode = "blocking"
prompt_keywords = ["refund"]
priority = 5

[review]
redis_url = "{redis}"
key_prefix = "{prefix}"

[review.console]
listen = "127.0.0.1:0"
"#,
        redis = redis_url(),
    )
}

fn browser_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("browser")
}

/// Node.js, Chromium and playwright-core, or why not.
async fn browser_ready() -> Result<(), String> {
    let node = Command::new("node").arg("--version").output().await;
    if !node.is_ok_and(|out| out.status.success()) {
        return Err("Node.js is not installed (apt-get install nodejs npm)".into());
    }
    if !std::path::Path::new("/usr/bin/chromium").exists() && std::env::var_os("CHROMIUM").is_none()
    {
        return Err("Chromium is not installed (apt-get install chromium)".into());
    }
    if ["playwright-core", "axe-core"]
        .iter()
        .any(|package| !browser_dir().join("node_modules").join(package).exists())
    {
        let status = Command::new("npm")
            .args(["ci", "--no-audit", "--no-fund", "--silent"])
            .current_dir(browser_dir())
            .status()
            .await
            .map_err(|e| format!("npm ci in tests/browser: {e}"))?;
        if !status.success() {
            return Err("npm ci in tests/browser failed".into());
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reviewer_approves_from_the_console_and_the_waiting_user_gets_the_answer() {
    if let Err(why) = browser_ready().await {
        if std::env::var_os("WEIR_SKIP_BROWSER_TESTS").is_some() {
            eprintln!("skipped (WEIR_SKIP_BROWSER_TESTS): {why}");
            return;
        }
        panic!("{why}; ./tests/run installs it, or set WEIR_SKIP_BROWSER_TESTS=1");
    }
    let prefix = unique_prefix();
    let mesh = Mesh::start_services(
        &config(&prefix),
        &[Service::Router, Service::Inference, Service::Review],
    )
    .await;
    let console = mesh.console_url();
    let shots = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("review_console");
    std::fs::create_dir_all(&shots).unwrap();

    let mut driver = Command::new("node")
        .arg(browser_dir().join("console.mjs"))
        .env("CONSOLE_URL", &console)
        .env("REVIEWER_KEY", REVIEWER_KEY)
        .env("NON_REVIEWER_KEY", USER_KEY)
        .env("REVIEWER_NAME", "ada")
        .env("SCREENSHOTS", &shots)
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("node runs");
    let mut lines = BufReader::new(driver.stdout.take().unwrap()).lines();
    let mut next_line = async || {
        tokio::time::timeout(Duration::from_secs(60), lines.next_line())
            .await
            .expect("the browser driver answers within a minute")
            .unwrap()
            .expect("the browser driver is still running")
    };
    let mut weight = 0;
    let mut refused = false;
    loop {
        let line = next_line().await;
        refused |= line == "REFUSED non-reviewer";
        if let Some(bytes) = line.strip_prefix("WEIGHT ") {
            weight = bytes.parse().unwrap();
        }
        if line == "READY" {
            break;
        }
    }
    assert!(refused, "a key without the reviewer role cannot sign in");

    // The console is open on an empty queue. A user's request is flagged: no text, a review id.
    let answer = mesh
        .router()
        .complete(with_key(
            complete("sim-small", "I want a refund for order 42"),
            USER_KEY,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(answer.review_status(), ReviewStatus::Pending);
    assert!(!answer.review_id.is_empty());
    let withheld = answer.message.as_ref().map_or("", |m| m.content.as_str());
    assert_eq!(
        withheld, "",
        "a held answer is not revealed before the decision"
    );

    // The user waits for the decision, and cannot read the held answer meanwhile.
    let mut watch = mesh
        .review()
        .watch_item(with_key(
            WatchItemRequest {
                item_id: answer.review_id.clone(),
            },
            USER_KEY,
        ))
        .await
        .unwrap()
        .into_inner();
    let first = watch.message().await.unwrap().unwrap().item.unwrap();
    assert!(matches!(
        first.state(),
        ItemState::Pending | ItemState::Claimed
    ));
    assert_eq!(first.output, None, "the held answer is for reviewers only");

    // The driver reports the item's arrival, an accessibility audit, then the approval.
    let (mut arrived, mut audit, mut keys) = (None, None, None);
    while keys.is_none() {
        let line = next_line().await;
        if let Some(id) = line.strip_prefix("ARRIVED ") {
            arrived = Some(id.to_string());
        } else if let Some(result) = line.strip_prefix("AXE ") {
            audit = Some(result.to_string());
        } else if let Some(rest) = line.strip_prefix("APPROVED ") {
            let (id, count) = rest.split_once(' ').unwrap();
            assert_eq!(
                id, answer.review_id,
                "the reviewer approved the flagged item"
            );
            keys = Some(count.parse::<usize>().unwrap());
        }
    }
    assert_eq!(arrived.as_deref(), Some(answer.review_id.as_str()));
    let audit = audit.expect("the driver audited the page");
    assert!(audit.ends_with(" 0 serious"), "axe-core: {audit}");
    let keys = keys.unwrap();
    assert!(driver.wait().await.unwrap().success(), "no page errors");

    let decided = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let item = watch
                .message()
                .await
                .unwrap()
                .expect("an update")
                .item
                .unwrap();
            if item.state() == ItemState::Decided {
                return item;
            }
        }
    })
    .await
    .expect("the waiting user hears of the decision");
    let decision = decided.decision.unwrap();
    assert_eq!(decision.verdict(), Verdict::Approve);
    assert_eq!(decision.reviewer, "ada");
    let text = decided.output.unwrap().content;
    assert!(!text.is_empty(), "the approved answer reaches the user");

    for shot in ["queue.png", "item.png"] {
        let size = std::fs::metadata(shots.join(shot)).unwrap().len();
        assert!(size > 1000, "{shot} is a real screenshot ({size} bytes)");
    }
    println!(
        "console: {keys} keystrokes to claim and approve; page weight {weight} bytes \
         (built-in: {}); axe-core {audit}; screenshots in {}",
        weir_review::console::page_weight(),
        shots.display()
    );
    mesh.stop().await;
    delete_prefix(&prefix).await;
}
