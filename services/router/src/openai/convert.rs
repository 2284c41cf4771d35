//! OpenAI's chat JSON ([`super::types`]) into and out of the router's protobuf messages.
//!
//! One request conversion ([`complete_request`]) serves every way an OpenAI request reaches Weir:
//! the HTTP edge's body and a batch input line both become the `CompleteRequest` that gRPC
//! callers send, so each then takes the router's one walk. The answer conversions are pure
//! functions of the router's answer (and a clock reading), so the same answer over gRPC and over
//! HTTP carries the same text, usage and cost.
//!
//! | OpenAI | Weir |
//! |---|---|
//! | `messages[].role` `system`, `developer` / `user` / `assistant` / `tool` | `ROLE_SYSTEM` / `ROLE_USER` / `ROLE_ASSISTANT` / `ROLE_TOOL` |
//! | `messages[].content` string or text parts | `content` (parts joined by newlines) |
//! | `max_completion_tokens`, else `max_tokens` | `params.max_tokens` |
//! | `temperature`, `top_p`, `seed`, `stop` | `params` |
//! | `metadata` pairs, `user` | `labels` (`user` under the key `user`) |
//! | `n` other than 1, `tools`, `logprobs: true` | refused, naming the parameter |
//!
//! What the request alone cannot say (its idempotency key, session, criticality) comes from the
//! HTTP headers at the edge, or from the batch line's `custom_id` and the batch.

use std::collections::HashMap;

use weir_proto::{
    common::{
        FinishReason, GenerationParams, Message, Role, ToolCall as ProtoToolCall,
        Usage as ProtoUsage,
    },
    router::{
        CompleteRequest, CompleteResponse, CompleteStreamRequest, ReviewStatus, ServedBy,
        complete_stream_response::{Done, Start},
    },
};

use super::types::{
    AssistantMessage, ChatCompletion, ChatCompletionChunk, ChatCompletionRequest, ChatMessage,
    Choice, ChunkChoice, ChunkUsage, Content, Delta, FunctionCall, Notice, OBJECT_CHUNK,
    OBJECT_COMPLETION, PromptTokensDetails, ToolCall, Usage, WeirInfo,
};

/// Most stop sequences a request may give (the inference service's limit too).
pub const MAX_STOP: usize = 4;

/// A request Weir cannot run as given: a 400 `invalid_request_error` naming `param`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct ConvertError {
    /// The parameter at fault, such as `messages[1].role`.
    pub param: String,
    /// What is wrong with it.
    pub message: String,
}

impl ConvertError {
    fn new(param: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            param: param.into(),
            message: message.into(),
        }
    }
}

/// The router request for an OpenAI chat request. `stream` and `stream_options` are not part of
/// it: the caller picks `Complete` or `CompleteStream` ([`stream_request`]).
pub fn complete_request(request: ChatCompletionRequest) -> Result<CompleteRequest, ConvertError> {
    if request.model.trim().is_empty() {
        return Err(ConvertError::new("model", "model is required"));
    }
    if let Some(n) = request.n.filter(|&n| n != 1) {
        return Err(ConvertError::new(
            "n",
            format!("n must be 1 (Weir returns one choice), got {n}"),
        ));
    }
    if request
        .tools
        .as_ref()
        .is_some_and(|tools| !tools.is_empty())
    {
        return Err(ConvertError::new("tools", "tools are not supported"));
    }
    if request.logprobs == Some(true) {
        return Err(ConvertError::new("logprobs", "logprobs are not supported"));
    }
    let messages = request
        .messages
        .into_iter()
        .enumerate()
        .map(|(index, message)| convert_message(index, message))
        .collect::<Result<Vec<_>, _>>()?;
    let params = generation_params(
        request.max_completion_tokens,
        request.max_tokens,
        request.temperature,
        request.top_p,
        request.seed,
        request.stop.map(|stop| stop.into_vec()).unwrap_or_default(),
    )?;
    let mut labels: HashMap<String, String> =
        request.metadata.unwrap_or_default().into_iter().collect();
    if let Some(user) = request.user.filter(|user| !user.is_empty()) {
        labels.insert("user".to_string(), user);
    }
    Ok(CompleteRequest {
        model: request.model,
        messages,
        params,
        labels,
        ..CompleteRequest::default()
    })
}

/// The streamed form of a router request: the same fields.
pub fn stream_request(request: CompleteRequest) -> CompleteStreamRequest {
    CompleteStreamRequest {
        model: request.model,
        messages: request.messages,
        session_id: request.session_id,
        params: request.params,
        request_id: request.request_id,
        criticality: request.criticality,
        labels: request.labels,
    }
}

fn generation_params(
    max_completion_tokens: Option<i64>,
    max_tokens: Option<i64>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    seed: Option<i64>,
    stop: Vec<String>,
) -> Result<Option<GenerationParams>, ConvertError> {
    let max_tokens = match (max_completion_tokens, max_tokens) {
        (Some(value), _) => Some(("max_completion_tokens", value)),
        (None, Some(value)) => Some(("max_tokens", value)),
        (None, None) => None,
    };
    let max_tokens = max_tokens
        .map(|(param, value)| {
            i32::try_from(value)
                .ok()
                .filter(|&tokens| tokens > 0)
                .ok_or_else(|| ConvertError::new(param, format!("must be positive, got {value}")))
        })
        .transpose()?;
    if stop.len() > MAX_STOP {
        return Err(ConvertError::new(
            "stop",
            format!("at most {MAX_STOP} stop sequences, got {}", stop.len()),
        ));
    }
    let params = GenerationParams {
        max_tokens,
        temperature,
        top_p,
        stop,
        seed,
    };
    Ok((params != GenerationParams::default()).then_some(params))
}

fn convert_message(index: usize, message: ChatMessage) -> Result<Message, ConvertError> {
    let role = match message.role.as_str() {
        "system" | "developer" => Role::System,
        "user" => Role::User,
        "assistant" => Role::Assistant,
        "tool" => Role::Tool,
        other => {
            return Err(ConvertError::new(
                format!("messages[{index}].role"),
                format!(
                    "unsupported role {other:?}: expected system, developer, user, assistant or tool"
                ),
            ));
        }
    };
    let content = match message.content {
        None => String::new(),
        Some(Content::Text(text)) => text,
        Some(Content::Parts(parts)) => {
            let mut texts = Vec::with_capacity(parts.len());
            for (part_index, part) in parts.into_iter().enumerate() {
                match (part.kind.as_str(), part.text) {
                    ("text", Some(text)) => texts.push(text),
                    (kind, _) => {
                        return Err(ConvertError::new(
                            format!("messages[{index}].content[{part_index}]"),
                            format!("unsupported content part {kind:?}: only text is supported"),
                        ));
                    }
                }
            }
            texts.join("\n")
        }
    };
    let tool_calls = message
        .tool_calls
        .unwrap_or_default()
        .into_iter()
        .map(|call| ProtoToolCall {
            id: call.id,
            name: call.function.name,
            arguments_json: call.function.arguments,
        })
        .collect();
    Ok(Message {
        role: role as i32,
        content,
        name: message.name.unwrap_or_default(),
        tool_calls,
        tool_call_id: message.tool_call_id.unwrap_or_default(),
    })
}

/// The `chat.completion` for a router answer, made at `created` (Unix seconds).
///
/// While a blocking review is pending, and after a rejection, the message is withheld: `content`
/// is null and `weir.review_status` says why (`finish_reason` is null while pending,
/// `content_filter` after a rejection).
pub fn chat_completion(response: CompleteResponse, created: i64) -> ChatCompletion {
    let withheld = withholds(response.review_status);
    let pending = response.review_status == ReviewStatus::Pending as i32;
    let message = response.message.unwrap_or_default();
    let tool_calls = (!message.tool_calls.is_empty() && !withheld).then(|| {
        message
            .tool_calls
            .into_iter()
            .map(|call| ToolCall {
                id: call.id,
                kind: "function".to_string(),
                function: FunctionCall {
                    name: call.name,
                    arguments: call.arguments_json,
                },
            })
            .collect()
    });
    let finish_reason = if pending {
        None
    } else if withheld {
        Some("content_filter".to_string())
    } else {
        finish_reason_name(response.finish_reason).map(str::to_string)
    };
    ChatCompletion {
        id: completion_id(&response.trace_id),
        object: OBJECT_COMPLETION.to_string(),
        created,
        model: served_model(&response.model, &response.requested_model),
        choices: vec![Choice {
            index: 0,
            message: AssistantMessage {
                role: "assistant".to_string(),
                content: (!withheld).then_some(message.content),
                tool_calls,
                refusal: None,
            },
            finish_reason,
            logprobs: None,
        }],
        usage: usage(response.usage.unwrap_or_default()),
        system_fingerprint: None,
        weir: WeirInfo {
            requested_model: response.requested_model,
            route: response.route,
            served_by: served_by_name(response.served_by).to_string(),
            cost_micros: response.cost_micros,
            review_status: review_status_name(response.review_status).to_string(),
            review_id: response.review_id,
            trace_id: response.trace_id,
            notices: notices(response.notices),
        },
    }
}

/// Whether a review status withholds the message (pending or rejected).
pub fn withholds(review_status: i32) -> bool {
    review_status == ReviewStatus::Pending as i32 || review_status == ReviewStatus::Rejected as i32
}

/// The OpenAI id of an answer: `chatcmpl-` and its trace id (a random id when there is none), so
/// a replayed answer keeps its id.
pub fn completion_id(trace_id: &str) -> String {
    if trace_id.is_empty() {
        format!("chatcmpl-{}", uuid::Uuid::new_v4().simple())
    } else {
        format!("chatcmpl-{trace_id}")
    }
}

/// The OpenAI id of the answer to a request with an idempotency key: `chatcmpl-` and a hash of
/// the key, so a replayed answer has the id of the first (whose trace id was another request's).
pub fn keyed_id(request_id: &str) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, request_id.as_bytes());
    let hex: String = digest.as_ref()[..16]
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect();
    format!("chatcmpl-{hex}")
}

fn served_model(model: &str, requested_model: &str) -> String {
    if model.is_empty() {
        requested_model.to_string()
    } else {
        model.to_string()
    }
}

/// OpenAI's `usage` for Weir's.
pub fn usage(usage: ProtoUsage) -> Usage {
    Usage {
        prompt_tokens: usage.input_tokens,
        completion_tokens: usage.output_tokens,
        total_tokens: usage.total_tokens,
        prompt_tokens_details: PromptTokensDetails {
            cached_tokens: usage.cached_input_tokens,
        },
    }
}

fn notices(notices: Vec<weir_proto::router::Notice>) -> Vec<Notice> {
    notices
        .into_iter()
        .map(|notice| Notice {
            reason: notice.reason,
            message: notice.message,
        })
        .collect()
}

/// OpenAI's `finish_reason` (`stop`, `length`, `content_filter`, `tool_calls`); none when unknown.
pub fn finish_reason_name(finish_reason: i32) -> Option<&'static str> {
    match FinishReason::try_from(finish_reason).unwrap_or_default() {
        FinishReason::Unspecified => None,
        FinishReason::Stop => Some("stop"),
        FinishReason::Length => Some("length"),
        FinishReason::ContentFilter => Some("content_filter"),
        FinishReason::ToolCalls => Some("tool_calls"),
    }
}

/// `primary`, `fallback`, `degraded` or `unspecified`.
pub fn served_by_name(served_by: i32) -> &'static str {
    match ServedBy::try_from(served_by).unwrap_or_default() {
        ServedBy::Unspecified => "unspecified",
        ServedBy::Primary => "primary",
        ServedBy::Fallback => "fallback",
        ServedBy::Degraded => "degraded",
    }
}

/// `not_required`, `pending`, `approved`, `rejected`, `edited`, `sampled` or `unspecified`.
pub fn review_status_name(review_status: i32) -> &'static str {
    match ReviewStatus::try_from(review_status).unwrap_or_default() {
        ReviewStatus::Unspecified => "unspecified",
        ReviewStatus::NotRequired => "not_required",
        ReviewStatus::Pending => "pending",
        ReviewStatus::Approved => "approved",
        ReviewStatus::Rejected => "rejected",
        ReviewStatus::Edited => "edited",
        ReviewStatus::Sampled => "sampled",
    }
}

/// Turns the events of a `CompleteStream` into `chat.completion.chunk`s: one id and `created` for
/// the whole answer, `role` on the first chunk, one chunk per delta, `finish_reason` on the last
/// choice chunk, and with `include_usage` a final chunk with `usage` and no choices (every other
/// chunk then carries `usage: null`, as OpenAI's do).
#[derive(Debug, Clone)]
pub struct ChunkWriter {
    id: String,
    created: i64,
    model: String,
    include_usage: bool,
    weir: WeirInfo,
}

impl ChunkWriter {
    /// A writer for a stream that started with `start` at `created` (Unix seconds).
    pub fn new(start: Start, created: i64, include_usage: bool) -> Self {
        Self {
            id: completion_id(&start.trace_id),
            created,
            model: served_model(&start.model, &start.requested_model),
            include_usage,
            weir: WeirInfo {
                requested_model: start.requested_model,
                route: start.route,
                served_by: served_by_name(start.served_by).to_string(),
                trace_id: start.trace_id,
                ..WeirInfo::default()
            },
        }
    }

    /// The same writer with chunks of id `id` (see [`keyed_id`]).
    pub fn with_id(mut self, id: String) -> Self {
        self.id = id;
        self
    }

    fn chunk(
        &self,
        choices: Vec<ChunkChoice>,
        usage: ChunkUsage,
        weir: Option<WeirInfo>,
    ) -> ChatCompletionChunk {
        let usage = match (self.include_usage, usage) {
            (false, _) => ChunkUsage::Absent,
            (true, ChunkUsage::Absent) => ChunkUsage::Null,
            (true, usage) => usage,
        };
        ChatCompletionChunk {
            id: self.id.clone(),
            object: OBJECT_CHUNK.to_string(),
            created: self.created,
            model: self.model.clone(),
            choices,
            usage,
            system_fingerprint: None,
            weir,
        }
    }

    fn choice(delta: Delta, finish_reason: Option<String>) -> Vec<ChunkChoice> {
        vec![ChunkChoice {
            index: 0,
            delta,
            finish_reason,
            logprobs: None,
        }]
    }

    /// The first chunk: the role, no text, and Weir's account so far.
    pub fn first(&self) -> ChatCompletionChunk {
        let delta = Delta {
            role: Some("assistant".to_string()),
            content: Some(String::new()),
        };
        self.chunk(
            Self::choice(delta, None),
            ChunkUsage::Absent,
            Some(self.weir.clone()),
        )
    }

    /// A chunk of text.
    pub fn delta(&self, text: String) -> ChatCompletionChunk {
        let delta = Delta {
            role: None,
            content: Some(text),
        };
        self.chunk(Self::choice(delta, None), ChunkUsage::Absent, None)
    }

    /// The last chunks: `finish_reason` and Weir's complete account, then (with
    /// `include_usage`) the usage chunk.
    pub fn done(&self, done: Done) -> Vec<ChatCompletionChunk> {
        let finish_reason = if done.review_status == ReviewStatus::Pending as i32 {
            None
        } else if withholds(done.review_status) {
            Some("content_filter")
        } else {
            finish_reason_name(done.finish_reason).or(Some("stop"))
        };
        let weir = WeirInfo {
            cost_micros: done.cost_micros,
            review_status: review_status_name(done.review_status).to_string(),
            review_id: done.review_id,
            notices: notices(done.notices),
            ..self.weir.clone()
        };
        let mut chunks = vec![self.chunk(
            Self::choice(Delta::default(), finish_reason.map(str::to_string)),
            ChunkUsage::Absent,
            Some(weir),
        )];
        if self.include_usage {
            let counts = usage(done.usage.unwrap_or_default());
            chunks.push(self.chunk(Vec::new(), ChunkUsage::Counts(counts), None));
        }
        chunks
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use serde_json::json;

    use super::*;

    fn parse(value: serde_json::Value) -> ChatCompletionRequest {
        serde_json::from_value(value).unwrap()
    }

    #[test]
    fn a_request_becomes_the_router_request() {
        let request = complete_request(parse(json!({
            "model": "auto",
            "messages": [
                {"role": "developer", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}], "name": "ann"},
                {"role": "assistant", "content": null, "tool_calls": [
                    {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{\"x\":1}"}}
                ]},
                {"role": "tool", "content": "42", "tool_call_id": "c1"}
            ],
            "max_tokens": 10,
            "max_completion_tokens": 20,
            "temperature": 0.5,
            "top_p": 0.9,
            "seed": 7,
            "stop": "END",
            "user": "u-1",
            "metadata": {"team": "search"},
            "stream": true
        })))
        .unwrap();
        assert_eq!(request.model, "auto");
        let roles: Vec<i32> = request.messages.iter().map(|m| m.role).collect();
        assert_eq!(
            roles,
            [
                Role::System as i32,
                Role::User as i32,
                Role::Assistant as i32,
                Role::Tool as i32
            ]
        );
        assert_eq!(request.messages[1].content, "a\nb");
        assert_eq!(request.messages[1].name, "ann");
        assert_eq!(
            request.messages[2].tool_calls[0].arguments_json,
            "{\"x\":1}"
        );
        assert_eq!(request.messages[3].tool_call_id, "c1");
        let params = request.params.clone().unwrap();
        assert_eq!(params.max_tokens, Some(20), "max_completion_tokens wins");
        assert_eq!(params.temperature, Some(0.5));
        assert_eq!(params.top_p, Some(0.9));
        assert_eq!(params.seed, Some(7));
        assert_eq!(params.stop, ["END"]);
        assert_eq!(request.labels["user"], "u-1");
        assert_eq!(request.labels["team"], "search");
        assert!(request.request_id.is_empty() && request.session_id.is_empty());

        let streamed = stream_request(request.clone());
        assert_eq!(streamed.messages, request.messages);
        assert_eq!(streamed.params, request.params);
    }

    #[test]
    fn no_parameters_means_no_params() {
        let request = complete_request(parse(json!({
            "model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5
        })))
        .unwrap();
        assert_eq!(request.params.unwrap().max_tokens, Some(5));
        let request = complete_request(parse(json!({
            "model": "m", "messages": [{"role": "user", "content": "hi"}], "n": 1
        })))
        .unwrap();
        assert_eq!(request.params, None);
    }

    #[test]
    fn what_weir_cannot_honour_is_refused_naming_the_parameter() {
        let refused = |value| complete_request(parse(value)).unwrap_err().param;
        let hi = json!([{"role": "user", "content": "hi"}]);
        assert_eq!(refused(json!({"model": "", "messages": hi})), "model");
        assert_eq!(refused(json!({"model": "m", "messages": hi, "n": 2})), "n");
        assert_eq!(
            refused(json!({"model": "m", "messages": hi, "tools": [{"type": "function"}]})),
            "tools"
        );
        assert_eq!(
            refused(json!({"model": "m", "messages": hi, "logprobs": true})),
            "logprobs"
        );
        assert_eq!(
            refused(json!({"model": "m", "messages": hi, "max_tokens": 0})),
            "max_tokens"
        );
        assert_eq!(
            refused(
                json!({"model": "m", "messages": hi, "max_completion_tokens": 5_000_000_000_i64})
            ),
            "max_completion_tokens"
        );
        assert_eq!(
            refused(json!({"model": "m", "messages": hi, "stop": ["a", "b", "c", "d", "e"]})),
            "stop"
        );
        assert_eq!(
            refused(
                json!({"model": "m", "messages": [{"role": "user", "content": "a"}, {"role": "robot", "content": "b"}]})
            ),
            "messages[1].role"
        );
        assert_eq!(
            refused(
                json!({"model": "m", "messages": [{"role": "user", "content": [
                    {"type": "image_url", "image_url": {"url": "x"}}
                ]}]})
            ),
            "messages[0].content[0]"
        );
    }

    fn answer() -> CompleteResponse {
        CompleteResponse {
            message: Some(Message {
                role: Role::Assistant as i32,
                content: "Hello.".to_string(),
                ..Message::default()
            }),
            model: "sim-large".to_string(),
            requested_model: "auto".to_string(),
            route: "auto".to_string(),
            served_by: ServedBy::Primary as i32,
            finish_reason: FinishReason::Stop as i32,
            usage: Some(ProtoUsage {
                input_tokens: 5,
                output_tokens: 2,
                cached_input_tokens: 1,
                total_tokens: 7,
            }),
            cost_micros: 12,
            review_status: ReviewStatus::NotRequired as i32,
            review_id: String::new(),
            trace_id: "0af7651916cd43dd8448eb211c80319c".to_string(),
            notices: vec![weir_proto::router::Notice {
                reason: "FALLBACK_USED".to_string(),
                message: "m".to_string(),
            }],
        }
    }

    #[test]
    fn an_answer_becomes_a_chat_completion() {
        let completion = serde_json::to_value(chat_completion(answer(), 1_700_000_000)).unwrap();
        assert_eq!(
            completion,
            json!({
                "id": "chatcmpl-0af7651916cd43dd8448eb211c80319c",
                "object": "chat.completion",
                "created": 1_700_000_000,
                "model": "sim-large",
                "choices": [{
                    "index": 0,
                    "message": {"role": "assistant", "content": "Hello.", "refusal": null},
                    "finish_reason": "stop",
                    "logprobs": null
                }],
                "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7,
                          "prompt_tokens_details": {"cached_tokens": 1}},
                "system_fingerprint": null,
                "weir": {
                    "requested_model": "auto", "route": "auto", "served_by": "primary",
                    "cost_micros": 12, "review_status": "not_required",
                    "trace_id": "0af7651916cd43dd8448eb211c80319c",
                    "notices": [{"reason": "FALLBACK_USED", "message": "m"}]
                }
            })
        );
    }

    #[test]
    fn a_withheld_answer_has_no_content() {
        let mut pending = answer();
        pending.review_status = ReviewStatus::Pending as i32;
        pending.review_id = "rv-1".to_string();
        pending.message = None;
        let completion = chat_completion(pending, 1);
        assert_eq!(completion.choices[0].message.content, None);
        assert_eq!(completion.choices[0].finish_reason, None);
        assert_eq!(completion.weir.review_status, "pending");
        assert_eq!(completion.weir.review_id, "rv-1");

        let mut rejected = answer();
        rejected.review_status = ReviewStatus::Rejected as i32;
        let completion = chat_completion(rejected, 1);
        assert_eq!(completion.choices[0].message.content, None);
        assert_eq!(
            completion.choices[0].finish_reason.as_deref(),
            Some("content_filter")
        );
    }

    #[test]
    fn a_keyed_answer_has_an_id_of_its_key() {
        let id = keyed_id("order-1");
        assert_eq!(id, keyed_id("order-1"));
        assert_ne!(id, keyed_id("order-2"));
        assert_eq!(id.len(), "chatcmpl-".len() + 32);
    }

    #[test]
    fn a_degraded_answer_names_the_requested_model() {
        let mut degraded = answer();
        degraded.model = String::new();
        degraded.served_by = ServedBy::Degraded as i32;
        let completion = chat_completion(degraded, 1);
        assert_eq!(completion.model, "auto");
        assert_eq!(completion.weir.served_by, "degraded");
    }

    #[test]
    fn stream_events_become_chunks() {
        let start = Start {
            model: "sim-large".to_string(),
            requested_model: "auto".to_string(),
            route: "auto".to_string(),
            served_by: ServedBy::Primary as i32,
            trace_id: "abc".to_string(),
        };
        let done = Done {
            finish_reason: FinishReason::Length as i32,
            usage: Some(ProtoUsage {
                input_tokens: 3,
                output_tokens: 2,
                cached_input_tokens: 0,
                total_tokens: 5,
            }),
            cost_micros: 9,
            review_status: ReviewStatus::NotRequired as i32,
            ..Done::default()
        };
        let writer = ChunkWriter::new(start.clone(), 5, true);
        let first = serde_json::to_value(writer.first()).unwrap();
        assert_eq!(first["id"], "chatcmpl-abc");
        assert_eq!(first["object"], "chat.completion.chunk");
        assert_eq!(first["choices"][0]["delta"]["role"], "assistant");
        assert_eq!(first["usage"], serde_json::Value::Null);
        assert_eq!(first["weir"]["served_by"], "primary");
        assert!(
            first["weir"].get("review_status").is_none(),
            "not known yet"
        );
        let delta = serde_json::to_value(writer.delta("Hi".to_string())).unwrap();
        assert_eq!(delta["choices"][0]["delta"], json!({"content": "Hi"}));
        let last = writer.done(done.clone());
        assert_eq!(last.len(), 2);
        let finish = serde_json::to_value(&last[0]).unwrap();
        assert_eq!(finish["choices"][0]["finish_reason"], "length");
        assert_eq!(finish["weir"]["cost_micros"], 9);
        let usage = serde_json::to_value(&last[1]).unwrap();
        assert_eq!(usage["choices"], json!([]));
        assert_eq!(usage["usage"]["total_tokens"], 5);

        // Without include_usage: no usage field, no usage chunk.
        let writer = ChunkWriter::new(start, 5, false);
        assert!(
            serde_json::to_value(writer.first())
                .unwrap()
                .get("usage")
                .is_none()
        );
        assert_eq!(writer.done(done).len(), 1);
    }
}
