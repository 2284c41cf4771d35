//! The two OpenAI conversions a batch needs: a chat completion request body to a
//! `CompleteRequest`, and a `CompleteResponse` to a `chat.completion` object.
//!
//! TEMPORARY: a stand-in until `weir_router::openai::convert` (the HTTP edge's conversions) is on
//! this branch; then these two functions call it and this minimal copy goes away. It handles
//! what a batch line usually carries: `model`, `messages` (text content), `max_tokens` /
//! `max_completion_tokens`, `temperature`, `top_p`, `stop` and `seed`.

use serde_json::{Value, json};
use weir_proto::{
    common::{FinishReason, GenerationParams, Message, Role},
    router::{CompleteRequest, CompleteResponse},
};

/// A chat completion request body as a `CompleteRequest`, or what is wrong with it.
pub fn request(body: &Value) -> Result<CompleteRequest, String> {
    let model = match body.get("model") {
        Some(Value::String(model)) if !model.is_empty() => model.clone(),
        _ => return Err("model is missing".to_string()),
    };
    let Some(Value::Array(raw)) = body.get("messages") else {
        return Err("messages is missing (an array of {role, content})".to_string());
    };
    let mut messages = Vec::with_capacity(raw.len());
    for (index, message) in raw.iter().enumerate() {
        let role = match message.get("role").and_then(Value::as_str) {
            Some("system" | "developer") => Role::System,
            Some("user") => Role::User,
            Some("assistant") => Role::Assistant,
            Some("tool") => Role::Tool,
            other => return Err(format!("messages[{index}].role: unknown role {other:?}")),
        };
        let content = match message.get("content") {
            Some(Value::String(text)) => text.clone(),
            Some(Value::Array(parts)) => parts
                .iter()
                .filter_map(|part| part.get("text").and_then(Value::as_str))
                .collect::<Vec<_>>()
                .join(""),
            Some(Value::Null) | None => String::new(),
            Some(_) => return Err(format!("messages[{index}].content must be a string")),
        };
        messages.push(Message {
            role: role as i32,
            content,
            ..Message::default()
        });
    }
    if messages.is_empty() {
        return Err("messages is empty".to_string());
    }
    let int = |name: &str| body.get(name).and_then(Value::as_i64);
    let float = |name: &str| body.get(name).and_then(Value::as_f64).map(|v| v as f32);
    let stop = match body.get("stop") {
        Some(Value::String(stop)) => vec![stop.clone()],
        Some(Value::Array(stops)) => stops
            .iter()
            .filter_map(|s| s.as_str().map(str::to_string))
            .collect(),
        _ => Vec::new(),
    };
    let max_tokens = int("max_completion_tokens")
        .or_else(|| int("max_tokens"))
        .map(|n| i32::try_from(n).map_err(|_| "max_tokens is too large".to_string()))
        .transpose()?;
    Ok(CompleteRequest {
        model,
        messages,
        params: Some(GenerationParams {
            max_tokens,
            temperature: float("temperature"),
            top_p: float("top_p"),
            stop,
            seed: int("seed"),
        }),
        ..CompleteRequest::default()
    })
}

/// A `CompleteResponse` as an OpenAI `chat.completion` object.
pub fn completion(response: &CompleteResponse, id: &str, created: i64) -> Value {
    let usage = response.usage.unwrap_or_default();
    let finish_reason = match response.finish_reason() {
        FinishReason::Length => "length",
        FinishReason::ContentFilter => "content_filter",
        FinishReason::ToolCalls => "tool_calls",
        FinishReason::Stop | FinishReason::Unspecified => "stop",
    };
    let content = response
        .message
        .as_ref()
        .map(|m| m.content.clone())
        .unwrap_or_default();
    json!({
        "id": id,
        "object": "chat.completion",
        "created": created,
        "model": response.model,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": content},
            "finish_reason": finish_reason,
        }],
        "usage": {
            "prompt_tokens": usage.input_tokens,
            "completion_tokens": usage.output_tokens,
            "total_tokens": usage.input_tokens + usage.output_tokens,
        },
    })
}
