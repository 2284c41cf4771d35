//! `weir jobs` against real `weir serve inference` and `weir serve router` processes (the router's
//! own workers run the jobs on its in-memory queue: this tests the command; the queue is tested
//! in weir-router and tests/).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::{path::PathBuf, process::Command};

use common::{Serve, WEIR, config_file, serve_command};

fn config() -> PathBuf {
    config_file(
        "jobs-cli",
        "[models.sim-instant]\nsim = { output_tokens = 4 }\n\
         [models.sim-slow]\nsim = { output_tokens = 40, tokens_per_second = 2.0 }\n\
         [router]\nsession_url = \"\"\n",
    )
}

/// Runs `weir jobs <args>` against `router`; returns (success, stdout, stderr).
fn jobs(router: &str, args: &[&str]) -> (bool, String, String) {
    let output = Command::new(WEIR)
        .arg("jobs")
        .args(args)
        .args(["--router", router])
        .env_remove("WEIR_API_KEY")
        .output()
        .unwrap();
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[test]
fn submit_wait_get_list_cancel_and_watch_from_the_command_line() {
    let config = config();
    let inference = Serve::start(serve_command("inference", &config), "inference");
    let mut router = serve_command("router", &config);
    router.env("WEIR_ROUTER__INFERENCE_URL", &inference.url);
    let router = Serve::start(router, "router");
    let url = router.url.as_str();

    // Submit and wait: the id first, then the ending with the answer; success.
    let (ok, out, err) = jobs(
        url,
        &["submit", "hello there", "--model", "sim-instant", "--wait"],
    );
    assert!(ok, "{out}\n{err}");
    let id = out.lines().next().unwrap().trim().to_string();
    assert!(id.starts_with("job"), "{out}");
    assert!(out.contains(&format!("{id} succeeded")), "{out}");
    assert!(out.contains("model sim-instant"), "{out}");

    // Get and list show it.
    let (ok, out, err) = jobs(url, &["get", &id]);
    assert!(
        ok && out.contains("succeeded") && out.contains("out 4 tokens"),
        "{out}{err}"
    );
    let (ok, out, _) = jobs(url, &["list"]);
    assert!(ok && out.contains(&id), "{out}");

    // A slow job, cancelled before it ends; watching it then fails, saying how it ended.
    let (ok, out, err) = jobs(url, &["submit", "take your time", "--model", "sim-slow"]);
    assert!(ok, "{err}");
    let slow = out.trim().to_string();
    let (ok, out, err) = jobs(url, &["cancel", &slow]);
    assert!(
        ok && out.contains(&format!("{slow} cancelled")),
        "{out}{err}"
    );
    let (ok, _, err) = jobs(url, &["watch", &slow]);
    assert!(!ok && err.contains("ended cancelled"), "{err}");

    // An unknown job is a clear error, not a panic.
    let (ok, _, err) = jobs(url, &["get", "job-nonexistent"]);
    assert!(!ok && err.contains("NOT_FOUND"), "{err}");
    let _ = std::fs::remove_file(config);
}
