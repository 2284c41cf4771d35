//! `weir batch` against real `weir serve inference` and `weir serve router` processes: an OpenAI
//! batch input file in, OpenAI batch output and error files out (the batch machinery itself is
//! tested in weir-router and tests/; this tests the command).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    process::Command,
};

use common::{Serve, WEIR, config_file, serve_command};
use serde_json::{Value, json};

fn config() -> PathBuf {
    config_file(
        "batch-cli",
        "[models.sim-instant]\nsim = { output_tokens = 4 }\n\
         [models.sim-slow]\nsim = { output_tokens = 10, tokens_per_second = 5.0 }\n\
         [router]\nsession_url = \"\"\n\
         [router.jobs]\nworkers = 2\n[router.jobs.batches]\nconcurrency = 4\n",
    )
}

/// A directory of its own for a test's files.
fn scratch(name: &str) -> PathBuf {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let dir = std::env::temp_dir().join(format!(
        "weir-batch-cli-{name}-{}-{nanos}",
        std::process::id()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// One line of OpenAI's batch input format.
fn line(custom_id: &str, model: &str, prompt: &str) -> String {
    json!({
        "custom_id": custom_id,
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"model": model, "messages": [{"role": "user", "content": prompt}]},
    })
    .to_string()
}

/// Runs `weir batch <args>` against `router`; returns (success, stdout, stderr).
fn batch(router: &str, args: &[&str]) -> (bool, String, String) {
    let output = Command::new(WEIR)
        .arg("batch")
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

/// The JSON lines of a file.
fn lines(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn files_in(dir: &Path) -> BTreeSet<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect()
}

#[test]
fn a_batch_file_runs_to_an_output_file_with_each_custom_id_once() {
    let config = config();
    let inference = Serve::start(serve_command("inference", &config), "inference");
    let mut router = serve_command("router", &config);
    router.env("WEIR_ROUTER__INFERENCE_URL", &inference.url);
    let router = Serve::start(router, "router");
    let url = router.url.as_str();
    let dir = scratch("submit");

    let ids: Vec<String> = (0..50).map(|i| format!("question-{i:02}")).collect();
    let text: Vec<String> = ids
        .iter()
        .map(|id| line(id, "sim-instant", &format!("tell me about {id}")))
        .collect();
    let input = dir.join("questions.jsonl");
    std::fs::write(&input, text.join("\n") + "\n").unwrap();

    // Submit and wait: the batch id on stdout, progress lines on stderr (not a terminal), success.
    let (ok, out, err) = batch(url, &["submit", input.to_str().unwrap()]);
    assert!(ok, "{out}\n{err}");
    let id = out.lines().next().unwrap().trim().to_string();
    assert!(!id.is_empty(), "{out}");
    assert!(
        err.contains(&format!("{id} completed: 50/50 done (50 succeeded")),
        "{err}"
    );

    // One output line per custom_id, each exactly once, each a chat.completion; no errors.
    let output = lines(&dir.join("questions.output.jsonl"));
    assert_eq!(output.len(), 50, "{output:?}");
    let written: Vec<&str> = output
        .iter()
        .map(|l| l["custom_id"].as_str().unwrap())
        .collect();
    let unique: BTreeSet<&str> = written.iter().copied().collect();
    assert_eq!(unique.len(), 50, "a custom_id appears twice: {written:?}");
    assert_eq!(unique, ids.iter().map(String::as_str).collect());
    for result in &output {
        assert_eq!(result["error"], Value::Null, "{result}");
        assert_eq!(result["response"]["status_code"], 200, "{result}");
        let body = &result["response"]["body"];
        assert_eq!(body["object"], "chat.completion", "{result}");
        assert_eq!(body["model"], "sim-instant", "{result}");
        assert!(
            !body["choices"][0]["message"]["content"]
                .as_str()
                .unwrap()
                .is_empty(),
            "{result}"
        );
        assert_eq!(body["usage"]["completion_tokens"], 4, "{result}");
    }
    assert!(lines(&dir.join("questions.errors.jsonl")).is_empty());

    // Running the same file again finds the same batch (the default request_id is its hash).
    let (ok, out, err) = batch(url, &["submit", input.to_str().unwrap()]);
    assert!(ok, "{out}\n{err}");
    assert_eq!(out.lines().next().unwrap().trim(), id, "{out}");
    assert_eq!(lines(&dir.join("questions.output.jsonl")).len(), 50);

    // get shows the counts; results writes the same lines again, where asked.
    let (ok, out, err) = batch(url, &["get", &id]);
    assert!(ok && out.contains(&format!("{id} completed")), "{out}{err}");
    assert!(out.contains("total 50  succeeded 50  failed 0"), "{out}");
    let again = dir.join("again.jsonl");
    let again_errors = dir.join("again-errors.jsonl");
    let (ok, _, err) = batch(
        url,
        &[
            "results",
            &id,
            "--output",
            again.to_str().unwrap(),
            "--errors",
            again_errors.to_str().unwrap(),
        ],
    );
    assert!(ok, "{err}");
    assert_eq!(lines(&again).len(), 50);

    // An unknown batch is a clear error, not a panic.
    let (ok, _, err) = batch(url, &["get", "batch-nonexistent"]);
    assert!(!ok && err.contains("NOT_FOUND"), "{err}");
    let _ = std::fs::remove_dir_all(dir);
    let _ = std::fs::remove_file(config);
}

#[test]
fn a_bad_file_is_refused_with_its_line_numbers_and_nothing_is_sent() {
    let dir = scratch("refused");
    let good = |i: usize| line(&format!("q{i}"), "sim-instant", "hi");
    // Line 7 repeats line 2's custom_id.
    let mut text: Vec<String> = (1..=6).map(good).collect();
    text.push(line("q2", "sim-instant", "again"));
    let duplicate = dir.join("duplicate.jsonl");
    std::fs::write(&duplicate, text.join("\n")).unwrap();
    // Line 3 is not JSON and line 4 asks for another endpoint.
    let mut text: Vec<String> = (1..=2).map(good).collect();
    text.push("{\"custom_id\": \"q3\",".to_string());
    text.push(
        json!({"custom_id": "q4", "method": "POST", "url": "/v1/embeddings", "body": {}})
            .to_string(),
    );
    let broken = dir.join("broken.jsonl");
    std::fs::write(&broken, text.join("\n")).unwrap();
    let before = files_in(&dir);

    // Nothing listens on port 1: a refusal that names the line, not the connection, proves the
    // file was checked before anything was sent.
    let nowhere = "http://127.0.0.1:1";
    let (ok, out, err) = batch(nowhere, &["submit", duplicate.to_str().unwrap()]);
    assert!(!ok, "{out}");
    assert!(out.is_empty(), "no batch id: {out}");
    assert!(
        err.contains("line 7: custom_id \"q2\" is already used on line 2"),
        "{err}"
    );
    assert!(err.contains("nothing was sent"), "{err}");

    let (ok, _, err) = batch(nowhere, &["submit", broken.to_str().unwrap()]);
    assert!(!ok);
    assert!(
        err.contains("line 3: not valid JSON at column 19: EOF"),
        "{err}"
    );
    assert!(
        err.contains("line 4: url must be \"/v1/chat/completions\""),
        "{err}"
    );
    assert!(
        !err.contains("line 1:") && !err.contains("line 2:"),
        "{err}"
    );

    // No output or error file was created.
    assert_eq!(files_in(&dir), before);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn a_cancelled_batch_writes_what_ran_and_exits_non_zero() {
    let config = config();
    let inference = Serve::start(serve_command("inference", &config), "inference");
    let mut router = serve_command("router", &config);
    router.env("WEIR_ROUTER__INFERENCE_URL", &inference.url);
    let router = Serve::start(router, "router");
    let url = router.url.as_str();
    let dir = scratch("cancel");

    // Slow items (2 s each, two workers, four queued at a time): most have not started when the
    // batch is cancelled.
    let text: Vec<String> = (0..20)
        .map(|i| line(&format!("slow-{i}"), "sim-slow", "take your time"))
        .collect();
    let input = dir.join("slow.jsonl");
    std::fs::write(&input, text.join("\n")).unwrap();
    let (ok, out, err) = batch(url, &["submit", input.to_str().unwrap(), "--no-wait"]);
    assert!(ok, "{out}{err}");
    let id = out.trim().to_string();
    assert!(
        !dir.join("slow.output.jsonl").exists(),
        "--no-wait writes nothing"
    );

    let (ok, out, err) = batch(url, &["cancel", &id]);
    assert!(ok, "{out}{err}");
    assert!(
        out.contains(&format!("{id} cancelling")) || out.contains(&format!("{id} cancelled")),
        "{out}"
    );

    // Following the results to the end: every item once across both files; non-zero exit.
    let output = dir.join("slow.output.jsonl");
    let errors = dir.join("slow.errors.jsonl");
    let (ok, _, err) = batch(
        url,
        &[
            "results",
            &id,
            "--follow",
            "--output",
            output.to_str().unwrap(),
            "--errors",
            errors.to_str().unwrap(),
        ],
    );
    assert!(
        !ok && err.contains(&format!("batch {id} ended cancelled")),
        "{err}"
    );
    let succeeded = lines(&output);
    let failed = lines(&errors);
    assert_eq!(
        succeeded.len() + failed.len(),
        20,
        "{succeeded:?} {failed:?}"
    );
    let all: BTreeSet<String> = succeeded
        .iter()
        .chain(&failed)
        .map(|l| l["custom_id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(all.len(), 20);
    assert!(
        failed
            .iter()
            .any(|l| l["error"]["code"] == "batch_cancelled"),
        "{failed:?}"
    );
    let _ = std::fs::remove_dir_all(dir);
    let _ = std::fs::remove_file(config);
}
