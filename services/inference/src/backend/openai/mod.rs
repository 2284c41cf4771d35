//! OpenAI-compatible chat completions (`backend = "openai"`): OpenAI itself, vLLM, Ollama,
//! llama.cpp, and anything else speaking `POST {base_url}/chat/completions`.
//!
//! # Requests
//!
//! The body carries `model` (`upstream_model`, else the catalog name), the messages (roles
//! `system`, `user`, `assistant`, `tool`, with `name`, `tool_calls` and `tool_call_id` passed
//! through) and the parameters the caller set (`max_tokens`, `temperature`, `top_p`, `stop`,
//! `seed`); unset ones are left to the upstream's defaults. A non-empty `request_id` is sent as
//! `X-Request-Id`. Streams ask for `stream: true` with `stream_options.include_usage`, and every
//! content delta is relayed as soon as it is parsed, never buffered into a whole answer.
//!
//! # API keys
//!
//! `api_key_env` names an environment variable; its value is read on every request and sent as
//! `Authorization: Bearer …` (never logged). When the variable is unset or empty the request fails
//! with FAILED_PRECONDITION, reason `UPSTREAM_API_KEY_MISSING`, naming the variable: it is an
//! operator mistake that no retry can fix, and it is also logged as a warning at start-up.
//!
//! # Timeouts and cancellation
//!
//! One pooled `reqwest::Client` per model, with the configured `connect_timeout`. The whole request
//! (streams included) is bounded by the configured `timeout` (UNAVAILABLE, `UPSTREAM_TIMEOUT`)
//! unless the caller's deadline comes first, in which case the API layer ends the call with
//! DEADLINE_EXCEEDED. The response stream owns the upstream response body: when the gRPC call is
//! cancelled the body is dropped and its connection closed, which cancels the generation upstream.
//!
//! # Usage
//!
//! Taken from the upstream's `usage` (with `prompt_tokens_details.cached_tokens`); when it sends
//! none, estimated with [`weir_mesh::tokens`] for the model's family. Streamed delta indexes count
//! the upstream's content chunks, which OpenAI-compatible servers send about one token at a time.
//! Streamed tool calls are not relayed (the stream API carries text), but the finish reason says
//! `FINISH_REASON_TOOL_CALLS`; unary answers carry them in full.
//!
//! # Modules
//!
//! - `error`: upstream failures and the one function that maps them to statuses.
//! - `relay`: the streamed answer, read from the upstream's event stream as it arrives.
//! - `wire`: the JSON of the chat completions API.

mod error;
mod relay;
mod wire;

use std::time::Duration;

use futures::{StreamExt, TryFutureExt};
use reqwest::header::HeaderValue;
use tokio::time::Instant;
use weir_mesh::{
    ApiError,
    catalog::{ModelSpec, OpenAiSpec},
    tokens,
};
use weir_proto::common::ToolCall;

pub use error::{UpstreamError, api_error};
use error::{chain, http_error, send_error};
use relay::Relay;
use wire::{ChatCompletion, ChatMessage, ChatRequest, StreamOptions, finish_reason};

use super::{Call, Event, EventStream, Finish, Generation, assistant, instant_after, usage};

/// Largest unary response body read (16 MiB).
pub const MAX_BODY_BYTES: usize = 16 << 20;
/// How long an idle pooled connection is kept.
pub const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(90);

/// One OpenAI-compatible model.
#[derive(Debug)]
pub struct OpenAiModel {
    name: String,
    upstream_model: String,
    family: String,
    url: String,
    api_key_env: Option<String>,
    timeout: Duration,
    /// The pooled client, or why the model cannot be called.
    client: Result<reqwest::Client, String>,
}

impl OpenAiModel {
    /// The model `name`. Problems that make it uncallable (no `openai` table, an HTTP client that
    /// cannot be built) are logged now and reported on each request.
    pub fn new(name: &str, spec: &ModelSpec) -> Self {
        let openai = spec.openai.clone();
        let config = openai.clone().unwrap_or_default();
        let client = match openai {
            None => Err(format!(
                "backend \"openai\" needs an [models.{name}.openai] table with base_url"
            )),
            Some(openai) => build_client(&openai),
        };
        if let Err(problem) = &client {
            tracing::error!(model = name, problem, "model cannot be called");
        }
        if let Some(var) = &config.api_key_env
            && std::env::var(var).map_or(true, |v| v.is_empty())
        {
            tracing::warn!(
                model = name,
                api_key_env = var.as_str(),
                "API key variable is not set; requests to this model will fail"
            );
        }
        Self {
            name: name.to_string(),
            upstream_model: config
                .upstream_model
                .clone()
                .unwrap_or_else(|| name.to_string()),
            family: spec.family().to_string(),
            url: format!("{}/chat/completions", config.base_url.trim_end_matches('/')),
            api_key_env: config.api_key_env,
            timeout: config.timeout,
            client,
        }
    }

    fn error(&self, error: UpstreamError) -> ApiError {
        api_error(
            error,
            &self.name,
            &self.upstream_model,
            self.api_key_env.as_deref(),
        )
    }

    /// The configured timeout's end, when it comes before the caller's deadline (otherwise the
    /// caller's deadline governs and is enforced by the API layer).
    fn own_deadline(&self, call: &Call) -> Option<Instant> {
        let own = instant_after(call.received, self.timeout);
        match call.deadline {
            Some(caller) if caller <= own => None,
            _ => Some(own),
        }
    }

    fn request(&self, call: &Call, stream: bool) -> Result<reqwest::RequestBuilder, UpstreamError> {
        let client = self
            .client
            .as_ref()
            .map_err(|p| UpstreamError::Misconfigured(p.clone()))?;
        let params = &call.input.params;
        let body = ChatRequest {
            model: &self.upstream_model,
            messages: call.input.messages.iter().map(ChatMessage::from).collect(),
            max_tokens: params.max_tokens,
            temperature: params.temperature,
            top_p: params.top_p,
            stop: &params.stop,
            seed: params.seed,
            stream,
            stream_options: stream.then_some(StreamOptions {
                include_usage: true,
            }),
        };
        let mut request = client.post(&self.url).json(&body);
        if stream {
            request = request.header(reqwest::header::ACCEPT, "text/event-stream");
        }
        if let Some(var) = &self.api_key_env {
            match std::env::var(var) {
                Ok(key) if !key.is_empty() => request = request.bearer_auth(key),
                _ => return Err(UpstreamError::MissingApiKey(var.clone())),
            }
        }
        if let Ok(id) = HeaderValue::from_str(&call.input.request_id)
            && !call.input.request_id.is_empty()
        {
            request = request.header("x-request-id", id);
        }
        Ok(request)
    }

    /// Sends the request and waits for a successful response's headers.
    async fn send(&self, call: &Call, stream: bool) -> Result<reqwest::Response, UpstreamError> {
        let response = self
            .request(call, stream)?
            .send()
            .await
            .map_err(|e| send_error(&e))?;
        if response.status().is_success() {
            return Ok(response);
        }
        Err(http_error(response).await)
    }

    /// Generates the whole answer with a non-streamed request.
    pub async fn generate(&self, call: Call) -> Result<Generation, ApiError> {
        let work = async {
            let response = self.send(&call, false).await?;
            let headers_at = Instant::now();
            let completion = read_completion(response).await?;
            self.generation(completion, &call, headers_at)
        };
        bounded(self.own_deadline(&call), self.timeout, work)
            .await
            .map_err(|e| self.error(e))
    }

    /// Starts a streamed answer: fails here when the upstream refuses the request, then relays its
    /// event stream.
    pub async fn stream(&self, call: Call) -> Result<EventStream, ApiError> {
        let deadline = self.own_deadline(&call);
        let response = bounded(deadline, self.timeout, self.send(&call, true))
            .await
            .map_err(|e| self.error(e))?;
        let is_json = response
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("application/json"));
        if is_json {
            // The upstream ignored `stream: true` and sent a whole completion: relay it as one
            // delta rather than failing.
            let headers_at = Instant::now();
            let generation = bounded(deadline, self.timeout, read_completion(response))
                .await
                .and_then(|completion| self.generation(completion, &call, headers_at))
                .map_err(|e| self.error(e))?;
            let mut events = Vec::new();
            if !generation.message.content.is_empty() {
                events.push(Ok(Event::Delta {
                    text: generation.message.content,
                    index: 0,
                }));
            }
            events.push(Ok(Event::Done(generation.finish)));
            return Ok(futures::stream::iter(events).boxed());
        }
        let relay = Relay::new(self, &call, response.bytes_stream().boxed(), deadline);
        Ok(futures::stream::unfold(relay, Relay::step).boxed())
    }

    fn generation(
        &self,
        completion: ChatCompletion,
        call: &Call,
        headers_at: Instant,
    ) -> Result<Generation, UpstreamError> {
        let Some(choice) = completion.choices.into_iter().next() else {
            return Err(UpstreamError::Malformed(
                "chat completion has no choices".to_string(),
            ));
        };
        let message = choice.message.unwrap_or_default();
        let content = message.content.unwrap_or_default();
        let usage = match completion.usage {
            Some(reported) => reported.into_usage(),
            None => usage(
                u64::from(call.checked.prompt_tokens),
                u64::from(tokens::count_text(&self.family, &content)),
                0,
            ),
        };
        let mut answer = assistant(content);
        answer.tool_calls = message
            .tool_calls
            .into_iter()
            .map(|call| ToolCall {
                id: call.id,
                name: call.function.name,
                arguments_json: call.function.arguments,
            })
            .collect();
        Ok(Generation {
            message: answer,
            finish: Finish {
                finish_reason: finish_reason(choice.finish_reason.as_deref()),
                usage,
                // A whole completion arrives with its headers: the first token came no later.
                time_to_first_token: headers_at.saturating_duration_since(call.received),
            },
        })
    }
}

fn build_client(openai: &OpenAiSpec) -> Result<reqwest::Client, String> {
    reqwest::Client::builder()
        .connect_timeout(openai.connect_timeout)
        .pool_idle_timeout(POOL_IDLE_TIMEOUT)
        .tcp_nodelay(true)
        .user_agent(concat!("weir-inference/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| format!("cannot build its HTTP client: {}", chain(&e)))
}

/// Runs `work` until `deadline` (the configured `timeout` from the call's start), if any.
async fn bounded<T>(
    deadline: Option<Instant>,
    timeout: Duration,
    work: impl Future<Output = Result<T, UpstreamError>>,
) -> Result<T, UpstreamError> {
    match deadline {
        Some(at) => {
            tokio::time::timeout_at(at, work)
                .unwrap_or_else(|_| Err(UpstreamError::Timeout(timeout)))
                .await
        }
        None => work.await,
    }
}

/// Reads a whole (non-streamed) chat completion.
async fn read_completion(response: reqwest::Response) -> Result<ChatCompletion, UpstreamError> {
    let body = read_capped(response, MAX_BODY_BYTES)
        .await
        .map_err(|e| UpstreamError::Transport(chain(&e)))?;
    serde_json::from_slice(&body)
        .map_err(|e| UpstreamError::Malformed(format!("chat completion is not valid JSON: {e}")))
}

/// Reads at most `cap` bytes of the body (the rest is dropped).
async fn read_capped(mut response: reqwest::Response, cap: usize) -> reqwest::Result<Vec<u8>> {
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await? {
        let room = cap.saturating_sub(body.len());
        body.extend_from_slice(&chunk[..chunk.len().min(room)]);
        if body.len() >= cap {
            break;
        }
    }
    Ok(body)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use tonic::Code;
    use weir_proto::common::{FinishReason, Message, Role};

    use crate::validate::{Checked, Input};

    use super::*;

    fn call() -> Call {
        Call {
            input: Input {
                model: "gpt".into(),
                messages: vec![Message {
                    role: Role::User.into(),
                    content: "hi".into(),
                    ..Message::default()
                }],
                ..Input::default()
            },
            checked: Checked {
                prompt_tokens: 8,
                output_limit: 100,
            },
            received: Instant::now(),
            deadline: None,
        }
    }

    fn model(timeout: Duration) -> OpenAiModel {
        OpenAiModel::new(
            "gpt",
            &ModelSpec {
                backend: weir_mesh::catalog::BackendKind::Openai,
                openai: Some(OpenAiSpec {
                    base_url: "http://127.0.0.1:9/v1/".into(),
                    timeout,
                    ..OpenAiSpec::default()
                }),
                ..ModelSpec::default()
            },
        )
    }

    #[test]
    fn unary_completions_with_and_without_usage() {
        let model = model(Duration::from_secs(60));
        assert_eq!(model.url, "http://127.0.0.1:9/v1/chat/completions");
        let completion: ChatCompletion = serde_json::from_str(
            r#"{"choices":[{"index":0,"message":{"role":"assistant","content":"Hello there"},"finish_reason":"length"}],
                "usage":{"prompt_tokens":9,"completion_tokens":2,"total_tokens":11,"prompt_tokens_details":{"cached_tokens":4}}}"#,
        )
        .unwrap();
        let generation = model
            .generation(completion, &call(), Instant::now())
            .unwrap();
        assert_eq!(generation.message.content, "Hello there");
        assert_eq!(generation.finish.finish_reason, FinishReason::Length);
        assert_eq!(generation.finish.usage, usage(9, 2, 4));

        let completion: ChatCompletion = serde_json::from_str(
            r#"{"choices":[{"message":{"content":null,"tool_calls":[{"id":"c1","type":"function","function":{"name":"f","arguments":"{}"}}]},"finish_reason":"tool_calls"}]}"#,
        )
        .unwrap();
        let generation = model
            .generation(completion, &call(), Instant::now())
            .unwrap();
        assert_eq!(generation.finish.finish_reason, FinishReason::ToolCalls);
        assert_eq!(generation.message.tool_calls[0].name, "f");
        // No usage: the prompt's validated count and an estimate of the (empty) answer.
        assert_eq!(generation.finish.usage, usage(8, 0, 0));

        let empty: ChatCompletion = serde_json::from_str(r#"{"choices":[]}"#).unwrap();
        assert!(matches!(
            model.generation(empty, &call(), Instant::now()),
            Err(UpstreamError::Malformed(_))
        ));
    }

    #[test]
    fn the_configured_timeout_applies_only_before_the_callers_deadline() {
        let model = model(Duration::from_secs(10));
        let mut call = call();
        assert_eq!(
            model.own_deadline(&call),
            Some(call.received + Duration::from_secs(10))
        );
        call.deadline = Some(call.received + Duration::from_secs(5));
        assert_eq!(model.own_deadline(&call), None);
        call.deadline = Some(call.received + Duration::from_secs(50));
        assert_eq!(
            model.own_deadline(&call),
            Some(call.received + Duration::from_secs(10))
        );
    }

    /// A relay over a canned body, split into the given chunks.

    #[tokio::test]
    async fn missing_api_keys_fail_before_sending() {
        let mut spec = ModelSpec {
            backend: weir_mesh::catalog::BackendKind::Openai,
            openai: Some(OpenAiSpec {
                base_url: "http://127.0.0.1:9/v1".into(),
                api_key_env: Some("WEIR_TEST_THIS_VARIABLE_IS_NEVER_SET".into()),
                ..OpenAiSpec::default()
            }),
            ..ModelSpec::default()
        };
        let model = OpenAiModel::new("gpt", &spec);
        let error = model.generate(call()).await.err().unwrap();
        assert_eq!(error.reason(), "UPSTREAM_API_KEY_MISSING");
        assert!(
            error
                .message()
                .contains("WEIR_TEST_THIS_VARIABLE_IS_NEVER_SET")
        );

        spec.openai = None;
        let model = OpenAiModel::new("gpt", &spec);
        let error = model.generate(call()).await.err().unwrap();
        assert_eq!(error.code(), Code::FailedPrecondition);
    }
}
