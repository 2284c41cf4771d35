//! The OpenAI-compatible HTTP edge, end to end: real HTTP to the edge, which calls the router's
//! own gRPC port, which calls real inference and budget services; idempotency records and budgets
//! on a real Redis. What an OpenAI client sees (status, JSON shape, SSE framing) is checked, and
//! that the HTTP door gives the same answer, usage and cost as the gRPC one.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{future::Future, time::Duration};

use futures::StreamExt;
use serde_json::{Value, json};
use weir_proto::budget::{GetSpendRequest, Scope, ScopeKind};
use weir_tests::{
    Mesh, complete, delete_prefix, eventually, model_calls, redis_url, unique_prefix, with_key,
};

const KEY: &str = "acme-key-0123456789";
/// One micro-USD per token, so a cost is a token count.
const PRICE: &str = "price = { input_micros_per_mtok = 1000000, output_micros_per_mtok = 1000000 }";

fn config(prefix: &str) -> String {
    config_with(prefix, "session_url = \"\"")
}

/// The test stack's config, with `router_line` in `[router]` (sessions are off unless it says).
fn config_with(prefix: &str, router_line: &str) -> String {
    format!(
        r#"
[[auth.api_keys]]
tenant = "acme"
key = "{KEY}"

[models.quick]
max_output_tokens = 64
sim = {{ output_tokens = 12 }}
{PRICE}
[models.slow]
sim = {{ output_tokens = 20, time_to_first_token = "1s" }}
{PRICE}
[models.drip]
sim = {{ output_tokens = 400, tokens_per_second = 20.0 }}
{PRICE}
[models.cut]
sim = {{ output_tokens = 20, cut_after_tokens = 3 }}
{PRICE}
[models.denied]
sim = {{ error_rate = 1.0, error_code = "PERMISSION_DENIED" }}
{PRICE}
[models.exhausted]
sim = {{ error_rate = 1.0, error_code = "RESOURCE_EXHAUSTED", retry_after = "2s" }}
{PRICE}
[models.broken]
sim = {{ error_rate = 1.0, error_code = "UNAVAILABLE", retry_after = "1s" }}
{PRICE}
[models.internal]
sim = {{ error_rate = 1.0, error_code = "INTERNAL" }}
{PRICE}
[models.conflict]
sim = {{ error_rate = 1.0, error_code = "ABORTED" }}
{PRICE}

[router]
budget_url = "http://127.0.0.1:50054"   # replaced by the budget service started with it
{router_line}

[router.routes.auto]
models = ["quick"]

[router.review]
review_url = "http://127.0.0.1:50055"   # replaced by the review service started with it

[[router.review.policies]]
name = "held"
prompt_regex = "(?i)hold[- ]me"

[router.idempotency]
redis_url = "{redis}"
key_prefix = "{prefix}"

[budget]
redis_url = "{redis}"
key_prefix = "{prefix}"
"#,
        redis = redis_url()
    )
}

struct Edge {
    mesh: Mesh,
    http: reqwest::Client,
}

/// Runs `scenario` on a stack started with `config`, apart, and deletes the stack's Redis keys
/// afterwards even when the scenario failed (CI shares the Redis).
async fn run<Fut>(config: fn(&str) -> String, scenario: impl FnOnce(Edge) -> Fut)
where
    Fut: Future<Output = ()> + Send + 'static,
{
    let prefix = unique_prefix();
    let edge = Edge {
        mesh: Mesh::start(&config(&prefix)).await,
        http: reqwest::Client::new(),
    };
    let outcome = tokio::spawn(scenario(edge)).await;
    delete_prefix(&prefix).await;
    if let Err(failure) = outcome {
        std::panic::resume_unwind(failure.into_panic());
    }
}

/// The stack's config with sessions on (its own session service).
fn with_sessions(prefix: &str) -> String {
    config_with(
        prefix,
        "session_url = \"http://127.0.0.1:50053\"  # its own",
    )
}

impl Edge {
    fn post(&self, body: &Value) -> reqwest::RequestBuilder {
        self.http
            .post(format!("{}/chat/completions", self.mesh.openai_url()))
            .bearer_auth(KEY)
            .json(body)
    }

    async fn send(&self, body: &Value) -> (u16, reqwest::header::HeaderMap, Value) {
        let response = self.post(body).send().await.unwrap();
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let text = response.text().await.unwrap();
        let json = serde_json::from_str(&text).unwrap_or(Value::String(text));
        (status, headers, json)
    }

    async fn spent(&self) -> i64 {
        let request = GetSpendRequest {
            scope: Some(Scope {
                kind: ScopeKind::Tenant.into(),
                id: String::new(),
            }),
            ..GetSpendRequest::default()
        };
        self.mesh
            .budget()
            .get_spend(with_key(request, KEY))
            .await
            .unwrap()
            .into_inner()
            .total_micros
    }

    async fn stop(self) {
        self.mesh.stop().await;
    }
}

fn chat(model: &str, text: &str) -> Value {
    json!({"model": model, "messages": [{"role": "user", "content": text}]})
}

/// The `data:` payloads of an SSE body, in order.
fn data_lines(body: &str) -> Vec<String> {
    body.lines()
        .filter_map(|line| line.strip_prefix("data: ").or(line.strip_prefix("data:")))
        .map(|data| data.trim().to_string())
        .collect()
}

#[tokio::test]
async fn the_same_request_over_http_and_grpc_gives_the_same_answer_usage_and_cost() {
    run(config, |edge| async move {
        let (status, headers, body) = edge.send(&chat("auto", "what is a weir")).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["object"], "chat.completion");
        assert_eq!(body["model"], "quick");
        assert_eq!(body["choices"][0]["message"]["role"], "assistant");
        assert_eq!(body["choices"][0]["finish_reason"], "stop");
        assert_eq!(body["weir"]["served_by"], "primary");
        assert_eq!(body["weir"]["review_status"], "not_required");
        assert!(body["id"].as_str().unwrap().starts_with("chatcmpl-"));
        // With tracing on (as in `weir up`), the id and a header carry the trace id.
        if let Some(trace_id) = body["weir"]["trace_id"].as_str() {
            assert_eq!(headers["weir-trace-id"], trace_id);
            assert_eq!(body["id"], format!("chatcmpl-{trace_id}"));
        }

        let grpc = edge
            .mesh
            .router()
            .complete(with_key(complete("auto", "what is a weir"), KEY))
            .await
            .unwrap()
            .into_inner();
        let usage = grpc.usage.unwrap();
        assert_eq!(
            body["choices"][0]["message"]["content"],
            grpc.message.unwrap().content
        );
        assert_eq!(body["usage"]["prompt_tokens"], usage.input_tokens);
        assert_eq!(body["usage"]["completion_tokens"], usage.output_tokens);
        assert_eq!(body["usage"]["total_tokens"], usage.total_tokens);
        assert!(grpc.cost_micros > 0);
        assert_eq!(body["weir"]["cost_micros"], grpc.cost_micros);
        assert_eq!(
            edge.spent().await,
            2 * grpc.cost_micros,
            "both doors charge the same budget"
        );

        // Streamed over HTTP: the same text, usage and cost.
        let mut request = chat("auto", "what is a weir");
        request["stream"] = json!(true);
        request["stream_options"] = json!({"include_usage": true});
        let response = edge.post(&request).send().await.unwrap();
        assert_eq!(response.status(), 200);
        assert_eq!(
            response.headers()["content-type"],
            "text/event-stream",
            "server-sent events"
        );
        let lines = data_lines(&response.text().await.unwrap());
        assert_eq!(lines.last().unwrap(), "[DONE]");
        let chunks: Vec<Value> = lines[..lines.len() - 1]
            .iter()
            .map(|line| serde_json::from_str(line).unwrap())
            .collect();
        assert!(
            chunks
                .iter()
                .all(|c| c["object"] == "chat.completion.chunk")
        );
        assert!(chunks.iter().all(|c| c["id"] == chunks[0]["id"]));
        assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
        let text: String = chunks
            .iter()
            .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
            .collect();
        assert_eq!(text, body["choices"][0]["message"]["content"]);
        let (last, finish) = (&chunks[chunks.len() - 1], &chunks[chunks.len() - 2]);
        assert_eq!(last["choices"], json!([]), "the usage chunk has no choices");
        assert_eq!(last["usage"], body["usage"]);
        assert_eq!(finish["choices"][0]["finish_reason"], "stop");
        assert_eq!(finish["weir"]["cost_micros"], grpc.cost_micros);
        assert!(
            chunks[..chunks.len() - 1]
                .iter()
                .all(|c| c["usage"].is_null()),
            "usage: null before the last chunk"
        );
        edge.stop().await;
    })
    .await;
}

#[tokio::test]
async fn a_stream_without_include_usage_has_no_usage() {
    run(config, |edge| async move {
        let mut request = chat("quick", "hi");
        request["stream"] = json!(true);
        let response = edge.post(&request).send().await.unwrap();
        let lines = data_lines(&response.text().await.unwrap());
        assert_eq!(lines.last().unwrap(), "[DONE]");
        for line in &lines[..lines.len() - 1] {
            let chunk: Value = serde_json::from_str(line).unwrap();
            assert!(chunk.get("usage").is_none(), "{chunk}");
            assert_eq!(chunk["choices"].as_array().unwrap().len(), 1);
        }
        edge.stop().await;
    })
    .await;
}

#[tokio::test]
async fn models_lists_route_aliases_then_catalog_models_to_a_known_key() {
    run(config, |edge| async move {
        let url = format!("{}/models", edge.mesh.openai_url());
        let response = edge.http.get(&url).bearer_auth(KEY).send().await.unwrap();
        assert_eq!(response.status(), 200);
        let list: Value = response.json().await.unwrap();
        assert_eq!(list["object"], "list");
        let ids: Vec<&str> = list["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["id"].as_str().unwrap())
            .collect();
        assert_eq!(ids[0], "auto");
        for model in ["quick", "slow", "drip", "cut"] {
            assert!(ids.contains(&model), "{ids:?}");
        }
        assert_eq!(list["data"][0]["object"], "model");
        assert_eq!(list["data"][0]["owned_by"], "weir");

        let refused = edge.http.get(&url).send().await.unwrap();
        assert_eq!(refused.status(), 401);
        let body: Value = refused.json().await.unwrap();
        assert_eq!(body["error"]["type"], "authentication_error");
        edge.stop().await;
    })
    .await;
}

/// Checks an OpenAI error answer: status, `type`, `code` and, when given, `param`.
fn assert_error(answer: &(u16, reqwest::header::HeaderMap, Value), status: u16, kind: &str) {
    let (got, _, body) = answer;
    assert_eq!(*got, status, "{body}");
    let error = &body["error"];
    assert_eq!(error["type"], kind, "{body}");
    assert!(
        error["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{body}"
    );
    assert!(
        error.get("param").is_some() && error.get("code").is_some(),
        "{body}"
    );
}

#[tokio::test]
async fn each_failure_has_its_http_status_in_openai_s_error_shape() {
    run(config, |edge| async move {
        let started = edge.mesh.inference_api().sim_requests().len();

        // 400: refused at the edge (a role OpenAI does not have), naming the parameter.
        let bad_role = json!({"model": "quick", "messages": [{"role": "robot", "content": "x"}]});
        let answer = edge.send(&bad_role).await;
        assert_error(&answer, 400, "invalid_request_error");
        assert_eq!(answer.2["error"]["param"], "messages[0].role");
        let answer = edge.post(&json!({})).body("not json").send().await.unwrap();
        assert_eq!(answer.status(), 400);
        // 400: refused behind it (more output than the model allows), naming the field.
        let mut too_long = chat("quick", "x");
        too_long["max_tokens"] = json!(100_000);
        let answer = edge.send(&too_long).await;
        assert_error(&answer, 400, "invalid_request_error");
        assert!(
            answer.2["error"]["param"]
                .as_str()
                .unwrap()
                .contains("max_tokens")
        );

        // 401: no key.
        let answer = edge
            .http
            .post(format!("{}/chat/completions", edge.mesh.openai_url()))
            .json(&chat("quick", "x"))
            .send()
            .await
            .unwrap();
        assert_eq!(answer.status(), 401);
        assert_eq!(
            answer.json::<Value>().await.unwrap()["error"]["type"],
            "authentication_error"
        );
        // 403, 404, 422, 429 (+ Retry-After), 500, 503 (+ Retry-After).
        assert_error(
            &edge.send(&chat("denied", "x")).await,
            403,
            "permission_denied_error",
        );
        let answer = edge.send(&chat("no-such-model", "x")).await;
        assert_error(&answer, 404, "not_found_error");
        let answer = edge
            .post(&chat("quick", "x"))
            .header("weir-session-id", "s-1")
            .send()
            .await
            .unwrap();
        assert_eq!(answer.status(), 422);
        assert_eq!(
            answer.json::<Value>().await.unwrap()["error"]["code"],
            "SESSIONS_DISABLED"
        );
        let answer = edge.send(&chat("exhausted", "x")).await;
        assert_error(&answer, 429, "rate_limit_error");
        assert_eq!(answer.1["retry-after"], "2", "{:?}", answer.1);
        assert_eq!(answer.1["retry-after-ms"], "2000");
        assert_error(
            &edge.send(&chat("internal", "x")).await,
            500,
            "server_error",
        );
        let answer = edge.send(&chat("broken", "x")).await;
        assert_error(&answer, 503, "service_unavailable_error");
        assert_eq!(answer.1["retry-after"], "1");
        // A bad criticality header is the caller's mistake.
        let answer = edge
            .post(&chat("quick", "x"))
            .header("weir-criticality", "SHEDABLE")
            .send()
            .await
            .unwrap();
        assert_eq!(answer.status(), 400);
        let answer = edge
            .post(&chat("quick", "x"))
            .header("weir-criticality", "SHEDDABLE")
            .send()
            .await
            .unwrap();
        assert_eq!(answer.status(), 200, "a known criticality is passed on");

        // 409: ABORTED (what a request gets when the same Idempotency-Key is still running past
        // its deadline; simulated here, as that race is decided by timing).
        let answer = edge.send(&chat("conflict", "x")).await;
        assert_error(&answer, 409, "conflict_error");
        // Unknown paths answer in the same shape.
        let answer = edge
            .http
            .get(format!("{}/nothing", edge.mesh.openai_url()))
            .send()
            .await
            .unwrap();
        assert_eq!(answer.status(), 404);
        assert!(edge.mesh.inference_api().sim_requests().len() > started);
        edge.stop().await;
    })
    .await;
}

#[tokio::test]
async fn an_idempotency_key_replays_the_answer_and_charges_once() {
    run(config, |edge| async move {
        let send = || async {
            let response = edge
                .post(&chat("quick", "charge me once"))
                .header("idempotency-key", "replay-1")
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), 200);
            response.json::<Value>().await.unwrap()
        };
        let first = send().await;
        let second = send().await;
        assert_eq!(second["id"], first["id"]);
        assert_eq!(second["choices"], first["choices"]);
        assert_eq!(second["usage"], first["usage"]);
        assert_eq!(second["weir"]["notices"][0]["reason"], "IDEMPOTENT_REPLAY");
        let calls = edge
            .mesh
            .inference_api()
            .sim_requests()
            .iter()
            .filter(|r| r.request_id == "replay-1")
            .count();
        assert_eq!(calls, 1, "one model call");
        assert_eq!(
            edge.spent().await,
            first["weir"]["cost_micros"].as_i64().unwrap()
        );
        edge.stop().await;
    })
    .await;
}

#[tokio::test]
async fn a_stream_cut_after_its_first_tokens_ends_with_an_error_event() {
    run(config, |edge| async move {
        let mut request = chat("cut", "cut me");
        request["stream"] = json!(true);
        let response = edge.post(&request).send().await.unwrap();
        assert_eq!(response.status(), 200, "the stream had started");
        let lines = data_lines(&response.text().await.unwrap());
        assert!(!lines.contains(&"[DONE]".to_string()), "{lines:?}");
        let last: Value = serde_json::from_str(lines.last().unwrap()).unwrap();
        assert_eq!(last["error"]["type"], "service_unavailable_error", "{last}");
        assert_eq!(last["error"]["code"], "STREAM_CUT");
        let text: String = lines[..lines.len() - 1]
            .iter()
            .map(|line| serde_json::from_str::<Value>(line).unwrap())
            .filter_map(|c| {
                c["choices"][0]["delta"]["content"]
                    .as_str()
                    .map(str::to_string)
            })
            .collect();
        assert!(!text.is_empty(), "tokens before the cut were relayed");
        edge.stop().await;
    })
    .await;
}

#[tokio::test]
async fn a_client_that_goes_away_mid_stream_cancels_the_model_call() {
    run(config, |edge| async move {
        weir_mesh::telemetry::install_metrics_recorder();
        let before = model_calls("drip", "CANCELLED");
        let mut request = chat("drip", "a long answer");
        request["stream"] = json!(true);
        let response = edge.post(&request).send().await.unwrap();
        assert_eq!(response.status(), 200);
        let mut body = response.bytes_stream();
        let mut seen = String::new();
        // Tokens arrive as they are made (20/s): read a few, then hang up.
        while data_lines(&seen).len() < 4 {
            seen.push_str(std::str::from_utf8(&body.next().await.unwrap().unwrap()).unwrap());
        }
        drop(body);
        assert!(
            eventually(Duration::from_secs(5), || async {
                model_calls("drip", "CANCELLED") > before
            })
            .await,
            "the model call was cancelled"
        );
        // 400 tokens at 20/s would take 20 s: the stream stopped long before.
        assert_eq!(model_calls("drip", "OK"), 0.0);
        edge.stop().await;
    })
    .await;
}

#[tokio::test]
async fn an_answer_held_for_review_is_202_pending_with_no_content() {
    run(config, |edge| async move {
        let (status, _, body) = edge.send(&chat("quick", "please hold-me for review")).await;
        assert_eq!(status, 202, "{body}");
        assert_eq!(body["object"], "chat.completion");
        assert_eq!(body["choices"][0]["message"]["content"], Value::Null);
        assert_eq!(body["choices"][0]["finish_reason"], Value::Null);
        assert_eq!(body["weir"]["review_status"], "pending");
        assert!(
            body["weir"]["review_id"]
                .as_str()
                .is_some_and(|id| !id.is_empty())
        );
        assert!(
            body["usage"]["completion_tokens"].as_i64().unwrap() > 0,
            "the model ran"
        );

        // Streamed: no token goes out; the last chunk says pending and names the item.
        let mut request = chat("quick", "hold me again");
        request["stream"] = json!(true);
        let response = edge.post(&request).send().await.unwrap();
        assert_eq!(response.status(), 200);
        let lines = data_lines(&response.text().await.unwrap());
        assert_eq!(lines.last().unwrap(), "[DONE]");
        let chunks: Vec<Value> = lines[..lines.len() - 1]
            .iter()
            .map(|line| serde_json::from_str(line).unwrap())
            .collect();
        let text: String = chunks
            .iter()
            .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
            .collect();
        assert_eq!(text, "", "no token of a held answer");
        let last = chunks.last().unwrap();
        assert_eq!(last["weir"]["review_status"], "pending");
        assert!(
            last["weir"]["review_id"]
                .as_str()
                .is_some_and(|id| !id.is_empty())
        );
        edge.stop().await;
    })
    .await;
}

#[tokio::test]
async fn a_taken_port_fails_the_start_naming_the_setting() {
    let taken = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mut stack = weir::stack::StackConfig::from_source(&weir_mesh::config::Source::from_toml(
        "[models.quick]\nsim = { output_tokens = 2 }\n",
    ))
    .unwrap();
    stack.listen_on_any_port("127.0.0.1".parse().unwrap());
    stack.router.http.listen = Some(taken.local_addr().unwrap());
    let error = weir::stack::start(stack, &[weir::stack::Service::Router], Default::default())
        .await
        .unwrap_err()
        .to_string();
    assert!(error.contains("OpenAI-compatible HTTP edge"), "{error}");
    assert!(error.contains("WEIR_ROUTER__HTTP__LISTEN"), "{error}");

    run(config, |edge| async move {
        // Too large a body is refused in OpenAI's shape, before any call.
        let huge = "x".repeat(weir_router::openai::edge::MAX_BODY_BYTES + 1);
        let answer = edge.send(&chat("quick", &huge)).await;
        assert_eq!(answer.0, 413, "{}", answer.2);
        assert_eq!(answer.2["error"]["type"], "invalid_request_error");
        edge.stop().await;
    })
    .await;
}

#[tokio::test]
async fn a_session_header_continues_the_conversation() {
    run(with_sessions, |edge| async move {
        let create = weir_proto::session::CreateSessionRequest {
            session_id: "http-chat-1".to_string(),
            model: "quick".to_string(),
            ..Default::default()
        };
        edge.mesh
            .session()
            .create_session(with_key(create, KEY))
            .await
            .unwrap();
        let turn = |text: &str| {
            edge.post(&chat("quick", text))
                .header("weir-session-id", "http-chat-1")
                .send()
        };
        let first: Value = turn("my name is ada").await.unwrap().json().await.unwrap();
        let second: Value = turn("what is my name").await.unwrap().json().await.unwrap();
        let alone = edge.send(&chat("quick", "what is my name")).await.2;
        // The second turn's prompt is the first exchange plus its own message.
        let prompt = |body: &Value| body["usage"]["prompt_tokens"].as_i64().unwrap();
        assert!(
            prompt(&second) >= prompt(&first) + prompt(&alone),
            "{first}\n{second}\n{alone}"
        );
        edge.stop().await;
    })
    .await;
}
