//! The JSON of the chat completions API: the request Weir sends and the parts of responses,
//! stream chunks and error bodies it reads. Responses are parsed leniently: unknown fields are
//! ignored and the `null`s that compatible servers send freely are read as defaults.

use serde::{Deserialize, Serialize};
use weir_proto::common::{FinishReason, Message, Role};

use crate::backend::usage;

/// The finish reason of an OpenAI `finish_reason`.
pub fn finish_reason(reason: Option<&str>) -> FinishReason {
    match reason {
        Some("stop") => FinishReason::Stop,
        Some("length") => FinishReason::Length,
        Some("content_filter") => FinishReason::ContentFilter,
        Some("tool_calls" | "function_call") => FinishReason::ToolCalls,
        _ => FinishReason::Unspecified,
    }
}

#[derive(Debug, Serialize)]
pub(super) struct ChatRequest<'a> {
    pub(super) model: &'a str,
    pub(super) messages: Vec<ChatMessage<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) max_tokens: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) temperature: Option<f32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) top_p: Option<f32>,
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    pub(super) stop: &'a [String],
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) seed: Option<i64>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub(super) stream: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) stream_options: Option<StreamOptions>,
}

#[derive(Debug, Serialize)]
pub(super) struct StreamOptions {
    pub(super) include_usage: bool,
}

#[derive(Debug, Serialize)]
pub(super) struct ChatMessage<'a> {
    pub(super) role: &'static str,
    /// `null` for an assistant message that only calls tools, as the API expects.
    pub(super) content: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) name: Option<&'a str>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub(super) tool_calls: Vec<OutgoingToolCall<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) tool_call_id: Option<&'a str>,
}

impl<'a> From<&'a Message> for ChatMessage<'a> {
    fn from(message: &'a Message) -> Self {
        let role = match Role::try_from(message.role) {
            Ok(Role::System) => "system",
            Ok(Role::Assistant) => "assistant",
            Ok(Role::Tool) => "tool",
            // Validation refuses anything else before a backend sees it.
            _ => "user",
        };
        let non_empty = |text: &'a str| (!text.is_empty()).then_some(text);
        Self {
            role,
            content: if message.content.is_empty() && !message.tool_calls.is_empty() {
                None
            } else {
                Some(&message.content)
            },
            name: non_empty(&message.name),
            tool_calls: message
                .tool_calls
                .iter()
                .map(|call| OutgoingToolCall {
                    id: &call.id,
                    kind: "function",
                    function: OutgoingFunction {
                        name: &call.name,
                        arguments: &call.arguments_json,
                    },
                })
                .collect(),
            tool_call_id: non_empty(&message.tool_call_id),
        }
    }
}

#[derive(Debug, Serialize)]
pub(super) struct OutgoingToolCall<'a> {
    pub(super) id: &'a str,
    #[serde(rename = "type")]
    pub(super) kind: &'static str,
    pub(super) function: OutgoingFunction<'a>,
}

#[derive(Debug, Serialize)]
pub(super) struct OutgoingFunction<'a> {
    pub(super) name: &'a str,
    pub(super) arguments: &'a str,
}

#[derive(Debug, Deserialize)]
pub(super) struct ChatCompletion {
    #[serde(default)]
    pub(super) choices: Vec<CompletionChoice>,
    #[serde(default)]
    pub(super) usage: Option<ReportedUsage>,
}

#[derive(Debug, Deserialize)]
pub(super) struct CompletionChoice {
    #[serde(default)]
    pub(super) message: Option<CompletionMessage>,
    #[serde(default)]
    pub(super) finish_reason: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
pub(super) struct CompletionMessage {
    #[serde(default)]
    pub(super) content: Option<String>,
    #[serde(default, deserialize_with = "null_as_default")]
    pub(super) tool_calls: Vec<IncomingToolCall>,
}

#[derive(Debug, Deserialize)]
pub(super) struct IncomingToolCall {
    #[serde(default)]
    pub(super) id: String,
    pub(super) function: IncomingFunction,
}

#[derive(Debug, Deserialize)]
pub(super) struct IncomingFunction {
    #[serde(default)]
    pub(super) name: String,
    #[serde(default)]
    pub(super) arguments: String,
}

#[derive(Debug, Deserialize)]
pub(super) struct StreamChunk {
    #[serde(default, deserialize_with = "null_as_default")]
    pub(super) choices: Vec<StreamChoice>,
    #[serde(default)]
    pub(super) usage: Option<ReportedUsage>,
    #[serde(default)]
    pub(super) error: Option<StreamErrorBody>,
}

#[derive(Debug, Deserialize)]
pub(super) struct StreamChoice {
    #[serde(default)]
    pub(super) delta: Option<StreamDelta>,
    #[serde(default)]
    pub(super) finish_reason: Option<String>,
}

#[derive(Debug, Deserialize)]
pub(super) struct StreamDelta {
    #[serde(default)]
    pub(super) content: Option<String>,
}

#[derive(Debug, Deserialize)]
pub(super) struct StreamErrorBody {
    #[serde(default)]
    pub(super) message: Option<String>,
}

#[derive(Debug, Deserialize)]
pub(super) struct ReportedUsage {
    #[serde(default)]
    pub(super) prompt_tokens: u64,
    #[serde(default)]
    pub(super) completion_tokens: u64,
    #[serde(default)]
    pub(super) prompt_tokens_details: Option<PromptTokensDetails>,
}

impl ReportedUsage {
    pub(super) fn into_usage(self) -> weir_proto::common::Usage {
        let cached = self
            .prompt_tokens_details
            .and_then(|d| d.cached_tokens)
            .unwrap_or(0);
        usage(self.prompt_tokens, self.completion_tokens, cached)
    }
}

#[derive(Debug, Deserialize)]
pub(super) struct PromptTokensDetails {
    #[serde(default)]
    pub(super) cached_tokens: Option<u64>,
}

#[derive(Debug, Deserialize)]
pub(super) struct ErrorBody {
    #[serde(default)]
    pub(super) error: Option<ErrorDetail>,
    #[serde(default)]
    pub(super) message: Option<String>,
    #[serde(default)]
    pub(super) detail: Option<serde_json::Value>,
}

#[derive(Debug, Deserialize)]
pub(super) struct ErrorDetail {
    #[serde(default)]
    pub(super) message: Option<String>,
    #[serde(default, deserialize_with = "string_or_null")]
    pub(super) param: Option<String>,
}

/// `null` (which OpenAI-compatible servers send freely) as the type's default.
fn null_as_default<'de, D, T>(deserializer: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(deserializer)?.unwrap_or_default())
}

/// A string, or `None` for null or any other JSON type.
fn string_or_null<'de, D>(deserializer: D) -> Result<Option<String>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    Ok(match serde_json::Value::deserialize(deserializer)? {
        serde_json::Value::String(text) => Some(text),
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use weir_proto::common::{GenerationParams, ToolCall};

    use super::*;

    #[test]
    fn requests_follow_the_chat_completions_format() {
        let messages = [
            Message {
                role: Role::System.into(),
                content: "be brief".into(),
                ..Message::default()
            },
            Message {
                role: Role::Assistant.into(),
                tool_calls: vec![ToolCall {
                    id: "call_1".into(),
                    name: "lookup".into(),
                    arguments_json: r#"{"q":"x"}"#.into(),
                }],
                ..Message::default()
            },
            Message {
                role: Role::Tool.into(),
                content: "42".into(),
                tool_call_id: "call_1".into(),
                name: "lookup".into(),
                ..Message::default()
            },
        ];
        let params = GenerationParams {
            max_tokens: Some(10),
            temperature: Some(0.5),
            stop: vec!["\n".into()],
            seed: Some(7),
            ..GenerationParams::default()
        };
        let body = ChatRequest {
            model: "gpt-4o",
            messages: messages.iter().map(ChatMessage::from).collect(),
            max_tokens: params.max_tokens,
            temperature: params.temperature,
            top_p: params.top_p,
            stop: &params.stop,
            seed: params.seed,
            stream: true,
            stream_options: Some(StreamOptions {
                include_usage: true,
            }),
        };
        let json = serde_json::to_value(&body).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "model": "gpt-4o",
                "messages": [
                    {"role": "system", "content": "be brief"},
                    {"role": "assistant", "content": null, "tool_calls": [
                        {"id": "call_1", "type": "function",
                         "function": {"name": "lookup", "arguments": "{\"q\":\"x\"}"}}
                    ]},
                    {"role": "tool", "content": "42", "name": "lookup", "tool_call_id": "call_1"}
                ],
                "max_tokens": 10,
                "temperature": 0.5,
                "stop": ["\n"],
                "seed": 7,
                "stream": true,
                "stream_options": {"include_usage": true}
            })
        );
    }

    #[test]
    fn finish_reasons() {
        assert_eq!(finish_reason(Some("stop")), FinishReason::Stop);
        assert_eq!(finish_reason(Some("length")), FinishReason::Length);
        assert_eq!(
            finish_reason(Some("content_filter")),
            FinishReason::ContentFilter
        );
        assert_eq!(finish_reason(Some("tool_calls")), FinishReason::ToolCalls);
        assert_eq!(
            finish_reason(Some("function_call")),
            FinishReason::ToolCalls
        );
        assert_eq!(finish_reason(Some("eos")), FinishReason::Unspecified);
        assert_eq!(finish_reason(None), FinishReason::Unspecified);
    }
}
