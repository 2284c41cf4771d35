//! The JSON of OpenAI's chat API, as far as Weir serves it: the chat completion request, the
//! `chat.completion` answer, the `chat.completion.chunk` events of a stream, the error body and
//! the model list.
//!
//! These types are plain serde: no HTTP here, so the batch input reader (one request per JSONL
//! line) and the HTTP edge parse the same request the same way. [`super::convert`] turns them into
//! and out of the router's protobuf messages.
//!
//! Parsing is lenient where OpenAI's is: unknown fields are ignored (SDKs send new ones before
//! servers know them), `content` may be a string or an array of text parts, `stop` a string or an
//! array. What Weir cannot honour and would otherwise silently change the answer (`n` above 1,
//! `tools`, `logprobs`) is refused by the conversion, naming the parameter.
//!
//! Every answer carries a `weir` object beside OpenAI's fields ([`WeirInfo`]): the served model,
//! how it was served, the cost in micro-USD, the review status and the trace id, which an OpenAI
//! SDK keeps as an extra field (`completion.weir` / `completion.model_extra["weir"]`).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// `object` of a non-streamed answer.
pub const OBJECT_COMPLETION: &str = "chat.completion";
/// `object` of a streamed event.
pub const OBJECT_CHUNK: &str = "chat.completion.chunk";
/// `object` of one model.
pub const OBJECT_MODEL: &str = "model";
/// `object` of a list.
pub const OBJECT_LIST: &str = "list";
/// `owned_by` of every model Weir lists.
pub const OWNED_BY: &str = "weir";

/// `POST /v1/chat/completions`: the request body.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ChatCompletionRequest {
    /// A model name or a route alias (such as `auto`).
    pub model: String,
    /// The conversation, oldest first.
    #[serde(default)]
    pub messages: Vec<ChatMessage>,
    /// Upper bound on generated tokens (deprecated by OpenAI in favour of
    /// `max_completion_tokens`; when both are given, `max_completion_tokens` wins).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<i64>,
    /// Upper bound on generated tokens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_completion_tokens: Option<i64>,
    /// Sampling temperature, 0 to 2.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f32>,
    /// Nucleus sampling probability mass.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_p: Option<f32>,
    /// Seed for backends that support reproducible sampling.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<i64>,
    /// Stop sequences: one string or up to four.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop: Option<Stop>,
    /// The end user's id; kept as the label `user`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// Answer as server-sent events.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream: Option<bool>,
    /// Options of a streamed answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream_options: Option<StreamOptions>,
    /// How many answers; Weir gives exactly one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub n: Option<i64>,
    /// Free-form string pairs; kept as the request's labels.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<BTreeMap<String, String>>,
    /// Tool definitions: not supported (refused when non-empty).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tools: Option<Vec<Value>>,
    /// Log probabilities: not supported (refused when true).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logprobs: Option<bool>,
}

impl ChatCompletionRequest {
    /// Whether the answer is to be streamed.
    pub fn is_stream(&self) -> bool {
        self.stream.unwrap_or(false)
    }

    /// Whether a streamed answer ends with a chunk carrying `usage` (`stream_options.include_usage`).
    pub fn include_usage(&self) -> bool {
        self.stream_options
            .as_ref()
            .is_some_and(|options| options.include_usage)
    }
}

/// `stream_options`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamOptions {
    /// Send a last chunk with `usage` and empty `choices` before `data: [DONE]`.
    #[serde(default)]
    pub include_usage: bool,
}

/// `stop`: one sequence or several.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Stop {
    /// One stop sequence.
    One(String),
    /// Several stop sequences.
    Many(Vec<String>),
}

impl Stop {
    /// The sequences, in order.
    pub fn into_vec(self) -> Vec<String> {
        match self {
            Self::One(one) => vec![one],
            Self::Many(many) => many,
        }
    }
}

/// One message of a request's conversation.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ChatMessage {
    /// `system`, `developer` (treated as `system`), `user`, `assistant` or `tool`.
    pub role: String,
    /// The text: a string, an array of parts (only `text` parts are supported), or null (an
    /// assistant message with tool calls only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content: Option<Content>,
    /// Optional name of the participant.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Tool calls an assistant message made.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<ToolCall>>,
    /// For a `tool` message: the call it answers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
}

/// A message's `content`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Content {
    /// Plain text.
    Text(String),
    /// Content parts (`{"type": "text", "text": ...}`; other types are refused).
    Parts(Vec<ContentPart>),
}

/// One part of an array `content`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ContentPart {
    /// `text` (the only type supported).
    #[serde(rename = "type")]
    pub kind: String,
    /// The text of a `text` part.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
}

/// A tool call in an assistant message.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ToolCall {
    /// The call's id.
    pub id: String,
    /// Always `function`.
    #[serde(rename = "type", default = "function_type")]
    pub kind: String,
    /// The function called.
    pub function: FunctionCall,
}

fn function_type() -> String {
    "function".to_string()
}

/// The function of a tool call.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct FunctionCall {
    /// The function's name.
    pub name: String,
    /// Its arguments, a JSON object as text.
    #[serde(default)]
    pub arguments: String,
}

/// The answer of a non-streamed request (`object: "chat.completion"`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatCompletion {
    /// `chatcmpl-` and the request's trace id: the same for a replayed answer.
    pub id: String,
    /// Always `chat.completion`.
    pub object: String,
    /// Unix seconds when the answer was made.
    pub created: i64,
    /// The model that served it (the requested name for a degraded answer).
    pub model: String,
    /// Exactly one choice.
    pub choices: Vec<Choice>,
    /// Token counts.
    pub usage: Usage,
    /// Not provided by Weir (always null).
    pub system_fingerprint: Option<String>,
    /// What Weir did with the request.
    pub weir: WeirInfo,
}

/// The one choice of an answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Choice {
    /// Always 0.
    pub index: u32,
    /// The assistant message.
    pub message: AssistantMessage,
    /// `stop`, `length`, `content_filter` or `tool_calls`; null while a review is pending.
    pub finish_reason: Option<String>,
    /// Not supported (always null).
    pub logprobs: Option<Value>,
}

/// The assistant message of an answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AssistantMessage {
    /// Always `assistant`.
    pub role: String,
    /// The text; null when withheld by review.
    pub content: Option<String>,
    /// Tool calls the model asked for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<ToolCall>>,
    /// Always null.
    pub refusal: Option<String>,
}

/// Token counts (`usage`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    /// Prompt tokens, including cached ones.
    pub prompt_tokens: i64,
    /// Generated tokens.
    pub completion_tokens: i64,
    /// The sum.
    pub total_tokens: i64,
    /// Prompt tokens served from the backend's cache.
    pub prompt_tokens_details: PromptTokensDetails,
}

/// `usage.prompt_tokens_details`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PromptTokensDetails {
    /// Prompt tokens served from the backend's cache.
    pub cached_tokens: i64,
}

/// Weir's own account of a request, beside OpenAI's fields (`weir`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WeirInfo {
    /// The model or alias the request asked for.
    pub requested_model: String,
    /// The route that resolved it (empty when a model was named directly).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub route: String,
    /// `primary`, `fallback` or `degraded` (`unspecified` when not known).
    pub served_by: String,
    /// Cost charged, in micro-USD.
    pub cost_micros: i64,
    /// `not_required`, `pending`, `approved`, `rejected`, `edited` or `sampled` (left out of a
    /// stream's first chunk: not known yet).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub review_status: String,
    /// The review item, when one was created.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub review_id: String,
    /// The W3C trace id (32 hex digits).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub trace_id: String,
    /// What the router did differently from the normal walk.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub notices: Vec<Notice>,
}

/// One notice of [`WeirInfo`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Notice {
    /// UPPER_SNAKE reason.
    pub reason: String,
    /// What happened.
    pub message: String,
}

/// One event of a streamed answer (`object: "chat.completion.chunk"`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatCompletionChunk {
    /// The same id on every chunk of one answer.
    pub id: String,
    /// Always `chat.completion.chunk`.
    pub object: String,
    /// Unix seconds when the answer started.
    pub created: i64,
    /// The model serving the answer.
    pub model: String,
    /// One choice, or none on the usage chunk.
    pub choices: Vec<ChunkChoice>,
    /// With `include_usage`: null on every chunk but the last, which has empty `choices`.
    /// Left out without it.
    #[serde(default, skip_serializing_if = "ChunkUsage::is_absent")]
    pub usage: ChunkUsage,
    /// Not provided by Weir (always null).
    pub system_fingerprint: Option<String>,
    /// Weir's account: on the first chunk (without cost) and on the last (complete).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weir: Option<WeirInfo>,
}

/// `usage` of a chunk: absent, null, or the counts.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "Option<Usage>", into = "Option<Usage>")]
pub enum ChunkUsage {
    /// Not asked for: the field is left out.
    #[default]
    Absent,
    /// Asked for, not yet known: `null`.
    Null,
    /// The counts of the whole answer.
    Counts(Usage),
}

impl ChunkUsage {
    /// Whether the field is left out.
    pub fn is_absent(&self) -> bool {
        matches!(self, Self::Absent)
    }
}

impl From<Option<Usage>> for ChunkUsage {
    fn from(usage: Option<Usage>) -> Self {
        usage.map_or(Self::Null, Self::Counts)
    }
}

impl From<ChunkUsage> for Option<Usage> {
    fn from(usage: ChunkUsage) -> Self {
        match usage {
            ChunkUsage::Counts(usage) => Some(usage),
            ChunkUsage::Absent | ChunkUsage::Null => None,
        }
    }
}

/// The choice of a chunk.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChunkChoice {
    /// Always 0.
    pub index: u32,
    /// What this chunk adds.
    pub delta: Delta,
    /// Set on the chunk that ends the answer.
    pub finish_reason: Option<String>,
    /// Not supported (always null).
    pub logprobs: Option<Value>,
}

/// The delta of a chunk.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Delta {
    /// `assistant` on the first chunk.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
    /// Text to append.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
}

/// An error answer: `{"error": {...}}`, also sent as the last event of a stream that failed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// The error.
    pub error: ErrorObject,
}

/// The error of an [`ErrorBody`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorObject {
    /// What went wrong, for a person.
    pub message: String,
    /// OpenAI's error type: `invalid_request_error`, `authentication_error`, ...
    #[serde(rename = "type")]
    pub kind: String,
    /// The request field at fault, when one is.
    pub param: Option<String>,
    /// A machine-readable code: Weir's UPPER_SNAKE reason (`BUDGET_EXHAUSTED`) when there is one,
    /// else the gRPC code name.
    pub code: Option<String>,
}

/// `GET /v1/models`: the answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelList {
    /// Always `list`.
    pub object: String,
    /// The models and route aliases, by id.
    pub data: Vec<Model>,
}

/// One entry of a [`ModelList`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Model {
    /// The name to put in a request's `model`.
    pub id: String,
    /// Always `model`.
    pub object: String,
    /// Unix seconds (0: Weir does not track when a model was added).
    pub created: i64,
    /// Always `weir`.
    pub owned_by: String,
}

impl Model {
    /// A model entry for `id`.
    pub fn new(id: impl Into<String>) -> Self {
        Self {
            id: id.into(),
            object: OBJECT_MODEL.to_string(),
            created: 0,
            owned_by: OWNED_BY.to_string(),
        }
    }
}

impl ModelList {
    /// A list of `ids`, in the order given.
    pub fn new(ids: impl IntoIterator<Item = String>) -> Self {
        Self {
            object: OBJECT_LIST.to_string(),
            data: ids.into_iter().map(Model::new).collect(),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn a_request_as_the_sdk_sends_it_parses() {
        let request: ChatCompletionRequest = serde_json::from_value(json!({
            "model": "auto",
            "messages": [
                {"role": "developer", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "Hi"}]},
                {"role": "assistant", "content": null, "tool_calls": [
                    {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
                ]},
                {"role": "tool", "content": "42", "tool_call_id": "c1"}
            ],
            "max_completion_tokens": 50,
            "temperature": 0.5,
            "seed": 7,
            "stop": "END",
            "user": "u-1",
            "stream": true,
            "stream_options": {"include_usage": true},
            "frequency_penalty": 0,
            "some_future_field": {"x": 1}
        }))
        .unwrap();
        assert_eq!(request.model, "auto");
        assert_eq!(request.messages.len(), 4);
        assert_eq!(
            request.messages[1].content,
            Some(Content::Parts(vec![ContentPart {
                kind: "text".to_string(),
                text: Some("Hi".to_string())
            }]))
        );
        assert_eq!(request.messages[2].content, None);
        assert_eq!(request.stop, Some(Stop::One("END".to_string())));
        assert!(request.is_stream() && request.include_usage());
        assert_eq!(request.max_completion_tokens, Some(50));
    }

    #[test]
    fn stop_may_be_a_list_and_stream_defaults_off() {
        let request: ChatCompletionRequest = serde_json::from_value(json!({
            "model": "m", "messages": [], "stop": ["a", "b"]
        }))
        .unwrap();
        assert_eq!(request.stop.clone().unwrap().into_vec(), ["a", "b"]);
        assert!(!request.is_stream() && !request.include_usage());
    }

    #[test]
    fn chunk_usage_is_absent_null_or_counts() {
        let chunk = |usage| ChatCompletionChunk {
            id: "chatcmpl-1".to_string(),
            object: OBJECT_CHUNK.to_string(),
            created: 1,
            model: "m".to_string(),
            choices: vec![],
            usage,
            system_fingerprint: None,
            weir: None,
        };
        let absent = serde_json::to_value(chunk(ChunkUsage::Absent)).unwrap();
        assert!(absent.get("usage").is_none());
        let null = serde_json::to_value(chunk(ChunkUsage::Null)).unwrap();
        assert_eq!(null["usage"], Value::Null);
        let counts = serde_json::to_value(chunk(ChunkUsage::Counts(Usage {
            prompt_tokens: 3,
            completion_tokens: 4,
            total_tokens: 7,
            ..Usage::default()
        })))
        .unwrap();
        assert_eq!(counts["usage"]["total_tokens"], 7);
        assert_eq!(counts["usage"]["prompt_tokens_details"]["cached_tokens"], 0);
    }

    #[test]
    fn the_error_body_has_openai_s_shape() {
        let body = ErrorBody {
            error: ErrorObject {
                message: "no".to_string(),
                kind: "invalid_request_error".to_string(),
                param: Some("messages".to_string()),
                code: None,
            },
        };
        assert_eq!(
            serde_json::to_value(body).unwrap(),
            json!({"error": {"message": "no", "type": "invalid_request_error",
                             "param": "messages", "code": null}})
        );
    }

    #[test]
    fn the_model_list_has_openai_s_shape() {
        let list = ModelList::new(["auto".to_string()]);
        assert_eq!(
            serde_json::to_value(list).unwrap(),
            json!({"object": "list", "data": [
                {"id": "auto", "object": "model", "created": 0, "owned_by": "weir"}
            ]})
        );
    }
}
