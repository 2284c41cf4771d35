//! OpenAI's Files and Batch APIs on the HTTP edge, end to end: multipart uploads over real HTTP
//! to the edge, batches created, followed and cancelled through the router's own stack, run by
//! its workers against the sim model, and their output and error files read back. The job store
//! (and the files with it) on a real Redis (`WEIR_TEST_REDIS_URL`) under a unique prefix deleted
//! afterwards, and in memory.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    collections::HashSet,
    future::Future,
    time::{Duration, Instant},
};

use serde_json::{Value, json};
use weir_tests::{Mesh, delete_prefix, redis_url, unique_prefix};

const ACME: &str = "acme-key-0123456789";
const GLOBEX: &str = "globex-key-0123456789";
const BOUNDARY: &str = "weir-test-boundary-7f3a";
/// One micro-USD per token, half that at the batch tier.
const PRICE: &str = "price = { input_micros_per_mtok = 1000000, output_micros_per_mtok = 1000000, \
                     batch_input_micros_per_mtok = 500000, batch_output_micros_per_mtok = 500000 }";
/// The edge's file size cap in these tests.
const MAX_FILE_BYTES: usize = 16 * 1024;

/// Where the job store lives.
#[derive(Debug, Clone, Copy)]
enum Store {
    Redis,
    Memory,
}

fn config(prefix: &str, store: Store, jobs: &str) -> String {
    let jobs_redis = match store {
        Store::Redis => format!("redis_url = \"{}\"", redis_url()),
        Store::Memory => String::new(),
    };
    format!(
        r#"
[models.sim-instant]
sim = {{ output_tokens = 6 }}
{PRICE}
[models.sim-slow]
sim = {{ output_tokens = 20, tokens_per_second = 10.0 }}
{PRICE}
[models.sim-denied]
sim = {{ error_rate = 1.0, error_code = "PERMISSION_DENIED" }}
{PRICE}

[[auth.api_keys]]
tenant = "acme"
key = "{ACME}"
[[auth.api_keys]]
tenant = "globex"
key = "{GLOBEX}"

[router]
budget_url = "http://127.0.0.1:50054"   # replaced by the budget service started with it
session_url = ""
[router.http]
max_file_bytes = {MAX_FILE_BYTES}
[router.rate_limit]
enabled = false
[router.idempotency]
redis_url = "{redis}"
key_prefix = "{prefix}"
[router.jobs]
{jobs_redis}
key_prefix = "{prefix}"
backoff = "20ms"
max_backoff = "50ms"
{jobs}

[budget]
redis_url = "{redis}"
key_prefix = "{prefix}"
"#,
        redis = redis_url(),
    )
}

struct Edge {
    mesh: Mesh,
    http: reqwest::Client,
    prefix: String,
}

/// Runs `scenario` on a stack with its job store in `store`, and deletes the stack's Redis keys
/// afterwards even when the scenario failed (the Redis is shared).
async fn run<Fut>(store: Store, jobs: &str, scenario: impl FnOnce(Edge) -> Fut)
where
    Fut: Future<Output = ()> + Send + 'static,
{
    run_with(|prefix| config(prefix, store, jobs), scenario).await;
}

/// [`run`] with the config `config` makes of the key prefix.
async fn run_with<Fut>(config: impl FnOnce(&str) -> String, scenario: impl FnOnce(Edge) -> Fut)
where
    Fut: Future<Output = ()> + Send + 'static,
{
    let prefix = unique_prefix();
    let edge = Edge {
        mesh: Mesh::start(&config(&prefix)).await,
        http: reqwest::Client::new(),
        prefix: prefix.clone(),
    };
    let outcome = tokio::spawn(scenario(edge)).await;
    delete_prefix(&prefix).await;
    if let Err(failure) = outcome {
        std::panic::resume_unwind(failure.into_panic());
    }
}

/// A batch input line.
fn line(custom_id: &str, model: &str, question: &str) -> String {
    json!({
        "custom_id": custom_id,
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"model": model, "messages": [{"role": "user", "content": question}]},
    })
    .to_string()
}

/// A multipart/form-data body with `purpose` and `file` (built by hand: the workspace's reqwest
/// has no multipart feature).
fn multipart(purpose: &str, content: &str) -> Vec<u8> {
    format!(
        "--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\n{purpose}\r\n\
         --{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"input.jsonl\"\r\n\
         Content-Type: application/jsonl\r\n\r\n{content}\r\n--{BOUNDARY}--\r\n"
    )
    .into_bytes()
}

/// Status and body (JSON, or the text as a JSON string).
async fn answer(response: reqwest::Response) -> (u16, Value) {
    let status = response.status().as_u16();
    let text = response.text().await.unwrap();
    let json = serde_json::from_str(&text).unwrap_or(Value::String(text));
    (status, json)
}

impl Edge {
    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.mesh.openai_url())
    }

    async fn upload_as(&self, key: &str, purpose: &str, content: &str) -> (u16, Value) {
        let response = self
            .http
            .post(self.url("/files"))
            .bearer_auth(key)
            .header(
                "content-type",
                format!("multipart/form-data; boundary={BOUNDARY}"),
            )
            .body(multipart(purpose, content))
            .send()
            .await
            .unwrap();
        answer(response).await
    }

    /// Uploads `content` as acme's batch file; its id.
    async fn upload(&self, content: &str) -> String {
        let (status, file) = self.upload_as(ACME, "batch", content).await;
        assert_eq!(status, 200, "{file}");
        file["id"].as_str().unwrap().to_string()
    }

    async fn get(&self, key: &str, path: &str) -> (u16, Value) {
        answer(
            self.http
                .get(self.url(path))
                .bearer_auth(key)
                .send()
                .await
                .unwrap(),
        )
        .await
    }

    async fn post(&self, key: &str, path: &str, body: &Value) -> (u16, Value) {
        answer(
            self.http
                .post(self.url(path))
                .bearer_auth(key)
                .json(body)
                .send()
                .await
                .unwrap(),
        )
        .await
    }

    async fn delete(&self, key: &str, path: &str) -> (u16, Value) {
        answer(
            self.http
                .delete(self.url(path))
                .bearer_auth(key)
                .send()
                .await
                .unwrap(),
        )
        .await
    }

    async fn create_batch(&self, file: &str, metadata: Value) -> Value {
        let body = json!({
            "input_file_id": file,
            "endpoint": "/v1/chat/completions",
            "completion_window": "24h",
            "metadata": metadata,
        });
        let (status, batch) = self.post(ACME, "/batches", &body).await;
        assert_eq!(status, 200, "{batch}");
        batch
    }

    /// The batch once its status is `wanted`, polling for at most a minute.
    async fn until(&self, id: &str, wanted: &str) -> Value {
        let start = Instant::now();
        loop {
            let (status, batch) = self.get(ACME, &format!("/batches/{id}")).await;
            assert_eq!(status, 200, "{batch}");
            if batch["status"] == wanted {
                return batch;
            }
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "not {wanted} within a minute: {batch}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// A file's content as JSON lines.
    async fn lines(&self, key: &str, file: &str) -> Vec<Value> {
        let response = self
            .http
            .get(self.url(&format!("/files/{file}/content")))
            .bearer_auth(key)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status().as_u16(), 200, "{file}");
        let text = response.text().await.unwrap();
        text.lines()
            .map(|line| serde_json::from_str(line).unwrap())
            .collect()
    }
}

async fn files_and_batches_run_end_to_end(store: Store) {
    run(store, "workers = 2", |edge| async move {
        // The first item is slow, so it ends last: the output file is still in input order.
        let questions: Vec<(String, &str, String)> = (0..6)
            .map(|n| {
                let model = if n == 0 { "sim-slow" } else { "sim-instant" };
                (format!("req-{n}"), model, format!("question number {n}"))
            })
            .collect();
        let mut input: Vec<String> = questions
            .iter()
            .map(|(id, model, question)| line(id, model, question))
            .collect();
        input.insert(3, line("denied", "sim-denied", "not allowed"));
        let content = input.join("\n") + "\n";
        let (status, file) = edge.upload_as(ACME, "batch", &content).await;
        assert_eq!(status, 200, "{file}");
        assert_eq!(file["object"], "file");
        assert_eq!(file["purpose"], "batch");
        assert_eq!(file["status"], "processed");
        assert_eq!(file["filename"], "input.jsonl");
        assert_eq!(file["bytes"], content.len());
        let file_id = file["id"].as_str().unwrap().to_string();
        let thirty_days = 30 * 24 * 3600;
        assert_eq!(
            file["expires_at"].as_i64().unwrap() - file["created_at"].as_i64().unwrap(),
            thirty_days
        );

        let (status, listed) = edge.get(ACME, "/files").await;
        assert_eq!(status, 200, "{listed}");
        assert_eq!(listed["data"][0]["id"], file_id.as_str());
        let (status, again) = edge.get(ACME, &format!("/files/{file_id}")).await;
        assert_eq!((status, &again), (200, &file));
        let raw = edge
            .http
            .get(edge.url(&format!("/files/{file_id}/content")))
            .bearer_auth(ACME)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert_eq!(raw, content, "the content as uploaded");

        let batch = edge.create_batch(&file_id, json!({"team": "search"})).await;
        assert_eq!(batch["object"], "batch");
        assert_eq!(batch["endpoint"], "/v1/chat/completions");
        assert_eq!(batch["input_file_id"], file_id.as_str());
        assert_eq!(batch["completion_window"], "24h");
        assert_eq!(batch["metadata"], json!({"team": "search"}));
        assert_eq!(batch["request_counts"]["total"], 7);
        assert_eq!(batch["output_file_id"], Value::Null, "not before it ends");
        let id = batch["id"].as_str().unwrap().to_string();
        assert!(
            batch["expires_at"].as_i64().unwrap() - batch["created_at"].as_i64().unwrap()
                >= 24 * 3600
        );

        let done = edge.until(&id, "completed").await;
        assert_eq!(
            done["request_counts"],
            json!({"total": 7, "completed": 6, "failed": 1})
        );
        assert!(done["completed_at"].as_i64().is_some(), "{done}");
        let output_id = done["output_file_id"].as_str().unwrap().to_string();
        let error_id = done["error_file_id"].as_str().unwrap().to_string();

        let output = edge.lines(ACME, &output_id).await;
        let order: Vec<&str> = output
            .iter()
            .map(|line| line["custom_id"].as_str().unwrap())
            .collect();
        let expected: Vec<&str> = questions.iter().map(|(id, _, _)| id.as_str()).collect();
        assert_eq!(order, expected, "every custom_id once, in input order");
        for (line, (custom_id, model, question)) in output.iter().zip(&questions) {
            assert_eq!(line["error"], Value::Null);
            assert_eq!(line["response"]["status_code"], 200);
            let body = &line["response"]["body"];
            assert_eq!(body["object"], "chat.completion");
            assert_eq!(body["model"], *model);
            // The sim model's answer to the same request over the chat endpoint.
            let direct = json!({"model": model,
                                "messages": [{"role": "user", "content": question}]});
            let (status, direct) = edge.post(ACME, "/chat/completions", &direct).await;
            assert_eq!(status, 200, "{direct}");
            assert_eq!(
                body["choices"][0]["message"]["content"],
                direct["choices"][0]["message"]["content"],
                "{custom_id}"
            );
            assert!(
                body["choices"][0]["message"]["content"]
                    .as_str()
                    .unwrap()
                    .contains("question number"),
                "{body}"
            );
            assert_eq!(body["usage"], direct["usage"], "{custom_id}");
            let tokens = if *model == "sim-slow" { 20 } else { 6 };
            assert_eq!(body["usage"]["completion_tokens"], tokens);
        }
        let errors = edge.lines(ACME, &error_id).await;
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert_eq!(errors[0]["custom_id"], "denied");
        assert_eq!(errors[0]["response"], Value::Null);
        assert!(
            errors[0]["error"]["message"].as_str().is_some(),
            "{errors:?}"
        );

        let (status, output_file) = edge.get(ACME, &format!("/files/{output_id}")).await;
        assert_eq!(status, 200, "{output_file}");
        assert_eq!(output_file["purpose"], "batch_output");
        let output_bytes: usize = output.iter().map(|line| line.to_string().len() + 1).sum();
        assert!(output_file["bytes"].as_u64().unwrap() >= output_bytes as u64 / 2);

        let (status, list) = edge.get(ACME, "/batches").await;
        assert_eq!(status, 200, "{list}");
        assert_eq!(list["object"], "list");
        assert_eq!(list["data"][0]["id"], id.as_str());
        assert_eq!(list["data"][0]["status"], "completed");

        let (status, deleted) = edge.delete(ACME, &format!("/files/{file_id}")).await;
        assert_eq!(status, 200, "{deleted}");
        assert_eq!(
            deleted,
            json!({"id": file_id, "object": "file", "deleted": true})
        );
        let (status, _) = edge.get(ACME, &format!("/files/{file_id}")).await;
        assert_eq!(status, 404);
        // The batch keeps its results.
        assert_eq!(edge.lines(ACME, &output_id).await.len(), 6);
    })
    .await;
}

#[tokio::test]
async fn files_and_batches_run_end_to_end_on_redis() {
    files_and_batches_run_end_to_end(Store::Redis).await;
}

#[tokio::test]
async fn files_and_batches_run_end_to_end_in_memory() {
    files_and_batches_run_end_to_end(Store::Memory).await;
}

#[tokio::test]
async fn files_are_kept_in_redis_under_the_prefix_with_their_retention() {
    run(Store::Redis, "", |edge| async move {
        let file = edge.upload(&line("a", "sim-instant", "hi")).await;
        let mut conn = weir_mesh::store::connect(&redis_url()).await.unwrap();
        let key = format!("{}:{{acme}}:file:{file}", edge.prefix);
        let ttl: i64 = redis::cmd("PTTL")
            .arg(&key)
            .query_async(&mut conn)
            .await
            .unwrap();
        let thirty_days = 30 * 24 * 3600 * 1000;
        assert!(ttl > thirty_days - 60_000 && ttl <= thirty_days, "{ttl}");
        let indexed: Option<f64> = redis::cmd("ZSCORE")
            .arg(format!("{}:{{acme}}:file:_index", edge.prefix))
            .arg(&file)
            .query_async(&mut conn)
            .await
            .unwrap();
        assert!(indexed.is_some());
    })
    .await;
}

#[tokio::test]
async fn bad_files_and_requests_are_refused_naming_what_to_fix() {
    run(Store::Redis, "", |edge| async move {
        let content = [
            line("ok", "sim-instant", "fine"),
            "{not json".to_string(),
            json!({"custom_id": "e", "method": "POST", "url": "/v1/embeddings",
                   "body": {"model": "sim-instant", "input": "x"}})
            .to_string(),
        ]
        .join("\n");
        let (status, error) = edge.upload_as(ACME, "batch", &content).await;
        assert_eq!(status, 400, "{error}");
        assert_eq!(error["error"]["type"], "invalid_request_error");
        let message = error["error"]["message"].as_str().unwrap();
        assert!(message.contains("line 2:"), "{message}");
        assert!(message.contains("line 3:"), "{message}");
        assert!(!message.contains("line 1:"), "{message}");

        let (status, error) = edge
            .upload_as(ACME, "fine-tune", &line("a", "sim-instant", "hi"))
            .await;
        assert_eq!(status, 400, "{error}");
        assert_eq!(error["error"]["param"], "purpose");

        let huge = line("a", "sim-instant", &"word ".repeat(MAX_FILE_BYTES / 5));
        let (status, error) = edge.upload_as(ACME, "batch", &huge).await;
        assert_eq!(status, 413, "{error}");
        assert!(
            error["error"]["message"]
                .as_str()
                .unwrap()
                .contains("max_file_bytes"),
            "{error}"
        );

        let (status, error) = edge
            .post(ACME, "/files", &json!({"purpose": "batch"}))
            .await;
        assert_eq!(status, 400, "not multipart: {error}");

        let file = edge.upload(&line("a", "sim-instant", "hi")).await;
        let (status, error) = edge
            .post(
                ACME,
                "/batches",
                &json!({"input_file_id": file, "endpoint": "/v1/embeddings",
                        "completion_window": "24h"}),
            )
            .await;
        assert_eq!(status, 400, "{error}");
        assert_eq!(error["error"]["param"], "endpoint");
        let (status, error) = edge
            .post(
                ACME,
                "/batches",
                &json!({"input_file_id": file, "endpoint": "/v1/chat/completions",
                        "completion_window": "a while"}),
            )
            .await;
        assert_eq!(status, 400, "{error}");
        assert_eq!(error["error"]["param"], "completion_window");
        let (status, error) = edge
            .post(
                ACME,
                "/batches",
                &json!({"input_file_id": file, "endpoint": "/v1/chat/completions",
                        "completion_window": "30d"}),
            )
            .await;
        assert_eq!(status, 400, "beyond max_window: {error}");
        let (status, error) = edge
            .post(
                ACME,
                "/batches",
                &json!({"input_file_id": "file-0000", "endpoint": "/v1/chat/completions",
                        "completion_window": "24h"}),
            )
            .await;
        assert_eq!(status, 404, "{error}");
        assert_eq!(error["error"]["type"], "not_found_error");
        let (status, error) = edge.get(ACME, "/batches/batch-0000").await;
        assert_eq!(status, 404, "{error}");
        let (status, error) = edge
            .get(ACME, "/files/file-batch-0000-output/content")
            .await;
        assert_eq!(status, 404, "{error}");
        let (status, error) = edge.get("wrong-key-0123456789", "/files").await;
        assert_eq!(status, 401, "{error}");
        let (status, error) = edge.upload_as("wrong-key-0123456789", "batch", &huge).await;
        assert_eq!(status, 401, "the key is checked first: {error}");
        // A known path with a method it does not take: 405, in OpenAI's shape.
        let (status, error) = edge.delete(ACME, "/batches").await;
        assert_eq!(status, 405, "{error}");
        assert_eq!(error["error"]["code"], "METHOD_NOT_ALLOWED");
    })
    .await;
}

#[tokio::test]
async fn another_tenants_files_and_batches_are_not_found() {
    run(Store::Redis, "", |edge| async move {
        let file = edge.upload(&line("a", "sim-instant", "hi")).await;
        let batch = edge.create_batch(&file, json!({})).await;
        let id = batch["id"].as_str().unwrap().to_string();
        let done = edge.until(&id, "completed").await;
        let output = done["output_file_id"].as_str().unwrap().to_string();

        for path in [
            format!("/files/{file}"),
            format!("/files/{file}/content"),
            format!("/batches/{id}"),
            format!("/files/{output}"),
            format!("/files/{output}/content"),
        ] {
            let (status, error) = edge.get(GLOBEX, &path).await;
            assert_eq!(status, 404, "{path}: {error}");
        }
        let (status, _) = edge.delete(GLOBEX, &format!("/files/{file}")).await;
        assert_eq!(status, 404);
        let (status, _) = edge
            .post(GLOBEX, &format!("/batches/{id}/cancel"), &json!({}))
            .await;
        assert_eq!(status, 404);
        let (status, error) = edge
            .post(
                GLOBEX,
                "/batches",
                &json!({"input_file_id": file, "endpoint": "/v1/chat/completions",
                        "completion_window": "24h"}),
            )
            .await;
        assert_eq!(status, 404, "{error}");
        let (_, files) = edge.get(GLOBEX, "/files").await;
        assert_eq!(files["data"], json!([]));
        let (_, batches) = edge.get(GLOBEX, "/batches").await;
        assert_eq!(batches["data"], json!([]));
        // Still acme's.
        let (status, _) = edge.get(ACME, &format!("/files/{file}")).await;
        assert_eq!(status, 200);
    })
    .await;
}

async fn cancel_and_list(store: Store) {
    let jobs = "workers = 1\n[router.jobs.batches]\nconcurrency = 1";
    run(store, jobs, |edge| async move {
        let slow: Vec<String> = (0..5)
            .map(|n| {
                line(
                    &format!("slow-{n}"),
                    "sim-slow",
                    &format!("long question {n}"),
                )
            })
            .collect();
        let file = edge.upload(&slow.join("\n")).await;
        let batch = edge.create_batch(&file, json!({})).await;
        let id = batch["id"].as_str().unwrap().to_string();
        let (status, cancelling) = edge
            .post(ACME, &format!("/batches/{id}/cancel"), &json!({}))
            .await;
        assert_eq!(status, 200, "{cancelling}");
        assert!(
            ["cancelling", "cancelled"].contains(&cancelling["status"].as_str().unwrap()),
            "{cancelling}"
        );
        let cancelled = edge.until(&id, "cancelled").await;
        assert!(cancelled["cancelled_at"].as_i64().is_some(), "{cancelled}");
        let counts = &cancelled["request_counts"];
        assert_eq!(counts["total"], 5);
        let completed = counts["completed"].as_i64().unwrap();
        assert_eq!(
            completed + counts["failed"].as_i64().unwrap(),
            5,
            "{cancelled}"
        );
        assert!(
            completed < 5,
            "cancelled before every item ran: {cancelled}"
        );
        let errors = edge
            .lines(ACME, cancelled["error_file_id"].as_str().unwrap())
            .await;
        assert_eq!(errors.len() as i64, 5 - completed);
        assert!(
            errors
                .iter()
                .any(|line| line["error"]["code"] == "batch_cancelled"),
            "{errors:?}"
        );

        // Two more batches: three in all, newest first, paged by `after`.
        let quick = edge.upload(&line("q", "sim-instant", "quick")).await;
        // The second with an Idempotency-Key: created once, whatever the retries.
        let keyed = || async {
            let response = edge
                .http
                .post(edge.url("/batches"))
                .bearer_auth(ACME)
                .header("Idempotency-Key", "nightly-2026-12-03")
                .json(
                    &json!({"input_file_id": quick, "endpoint": "/v1/chat/completions",
                              "completion_window": "24h"}),
                )
                .send()
                .await
                .unwrap();
            answer(response).await
        };
        let (status, second) = keyed().await;
        assert_eq!(status, 200, "{second}");
        let (status, again) = keyed().await;
        assert_eq!(status, 200, "{again}");
        assert_eq!(again["id"], second["id"], "the same batch");
        let second = second["id"].clone();
        let third = edge.create_batch(&quick, json!({})).await["id"].clone();
        let (status, page) = edge.get(ACME, "/batches?limit=2").await;
        assert_eq!(status, 200, "{page}");
        let ids: Vec<&Value> = page["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| &b["id"])
            .collect();
        assert_eq!(ids, [&third, &second]);
        assert_eq!(page["has_more"], true);
        assert_eq!(page["last_id"], second);
        let (_, rest) = edge
            .get(
                ACME,
                &format!("/batches?limit=2&after={}", second.as_str().unwrap()),
            )
            .await;
        let ids: Vec<&Value> = rest["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| &b["id"])
            .collect();
        assert_eq!(ids, [&Value::String(id.clone())]);
        assert_eq!(rest["has_more"], false);
        let all: HashSet<String> = [&third, &second]
            .iter()
            .map(|v| v.as_str().unwrap().to_string())
            .chain([id])
            .collect();
        assert_eq!(all.len(), 3);
    })
    .await;
}

#[tokio::test]
async fn a_batch_is_cancelled_and_batches_are_listed_on_redis() {
    cancel_and_list(Store::Redis).await;
}

#[tokio::test]
async fn a_batch_is_cancelled_and_batches_are_listed_in_memory() {
    cancel_and_list(Store::Memory).await;
}

#[tokio::test]
async fn a_file_larger_than_a_chat_body_is_taken_up_to_max_file_bytes() {
    // Above the 4 MiB a chat request may be, below this stack's cap.
    let cap = 6 * 1024 * 1024;
    let config = |prefix: &str| {
        config(prefix, Store::Memory, "").replace(
            &format!("max_file_bytes = {MAX_FILE_BYTES}"),
            &format!("max_file_bytes = {cap}"),
        )
    };
    run_with(config, move |edge| async move {
        // JSON may be padded with whitespace, which the requests do not carry: 5 MiB of file,
        // a few KiB of requests.
        let padding = " ".repeat(500 * 1024);
        let lines: Vec<String> = (0..10)
            .map(|n| {
                let line = line(&format!("big-{n}"), "sim-instant", "a padded question");
                format!("{{{padding}{}", &line[1..])
            })
            .collect();
        let content = lines.join("\n");
        assert!(content.len() > 4 * 1024 * 1024 && content.len() < cap);
        let (status, file) = edge.upload_as(ACME, "batch", &content).await;
        assert_eq!(status, 200, "{file}");
        assert_eq!(file["bytes"], content.len());
        let batch = edge
            .create_batch(file["id"].as_str().unwrap(), json!({}))
            .await;
        let done = edge.until(batch["id"].as_str().unwrap(), "completed").await;
        assert_eq!(done["request_counts"]["completed"], 10, "{done}");

        // Requests above tonic's default 4 MiB message size go through one CreateBatch (the
        // router decodes up to MAX_MESSAGE_BYTES): 5 MB of prompts (each item fails on its
        // model's context window, which is not what this checks).
        let words = "word ".repeat(100_000);
        let heavy: Vec<String> = (0..10)
            .map(|n| line(&format!("heavy-{n}"), "sim-instant", &words))
            .collect();
        let (status, file) = edge.upload_as(ACME, "batch", &heavy.join("\n")).await;
        assert_eq!(status, 200, "{file}");
        let batch = edge
            .create_batch(file["id"].as_str().unwrap(), json!({}))
            .await;
        let done = edge.until(batch["id"].as_str().unwrap(), "completed").await;
        assert_eq!(done["request_counts"]["total"], 10, "{done}");
    })
    .await;
}

#[tokio::test]
async fn a_file_whose_requests_exceed_one_create_batch_message_is_refused_at_upload() {
    let cap = 80 * 1024 * 1024;
    let config = |prefix: &str| {
        config(prefix, Store::Memory, "").replace(
            &format!("max_file_bytes = {MAX_FILE_BYTES}"),
            &format!("max_file_bytes = {cap}"),
        )
    };
    run_with(config, move |edge| async move {
        // Past MAX_MESSAGE_BYTES (64 MiB) of requests, below max_file_bytes.
        let words = "word ".repeat(100_000);
        let heavy: Vec<String> = (0..140)
            .map(|n| line(&format!("heavy-{n}"), "sim-instant", &words))
            .collect();
        let heavy = heavy.join("\n");
        assert!(heavy.len() > weir_router::MAX_MESSAGE_BYTES && heavy.len() < cap);
        let (status, error) = edge.upload_as(ACME, "batch", &heavy).await;
        assert_eq!(status, 413, "{error}");
        assert!(
            error["error"]["message"]
                .as_str()
                .unwrap()
                .contains("split the file"),
            "{error}"
        );
    })
    .await;
}

#[tokio::test]
async fn a_file_above_max_file_bytes_is_refused() {
    let cap = 6 * 1024 * 1024;
    let config = |prefix: &str| {
        config(prefix, Store::Memory, "").replace(
            &format!("max_file_bytes = {MAX_FILE_BYTES}"),
            &format!("max_file_bytes = {cap}"),
        )
    };
    run_with(config, move |edge| async move {
        let padding = " ".repeat(500 * 1024);
        let line = line("big", "sim-instant", "a padded question");
        let line = format!("{{{padding}{}", &line[1..]);
        let too_big = vec![line; 14].join("\n");
        assert!(too_big.len() > cap);
        let (status, error) = edge.upload_as(ACME, "batch", &too_big).await;
        assert_eq!(status, 413, "{error}");
        assert!(
            error["error"]["message"]
                .as_str()
                .unwrap()
                .contains("max_file_bytes"),
            "{error}"
        );
    })
    .await;
}

#[tokio::test]
async fn files_and_batches_need_the_routers_jobs() {
    let config = |prefix: &str| config(prefix, Store::Memory, "enabled = false");
    run_with(config, |edge| async move {
        let (status, error) = edge
            .upload_as(ACME, "batch", &line("a", "sim-instant", "hi"))
            .await;
        assert_eq!(status, 422, "{error}");
        assert_eq!(error["error"]["code"], "JOBS_DISABLED");
        let (status, error) = edge.get(ACME, "/batches").await;
        assert_eq!(status, 422, "{error}");
    })
    .await;
}
