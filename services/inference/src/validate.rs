//! Request validation: everything a backend may assume about a request.
//!
//! Checks run in field order and the first failure is returned, as INVALID_ARGUMENT with a
//! BadRequest violation naming the protobuf field path (`messages[2].role`, `params.max_tokens`)
//! and a message saying what is wrong and the value received:
//!
//! - `model`: required, and must be in the catalog (else NOT_FOUND, reason `MODEL_NOT_FOUND`).
//! - `messages`: at least one; every role set (`ROLE_UNSPECIFIED` and unknown values are refused).
//! - `params.max_tokens`: positive and at most the model's `max_output_tokens`.
//! - `params.temperature`: 0 to 2; `params.top_p`: above 0, at most 1.
//! - `params.stop`: at most [`MAX_STOP_SEQUENCES`], none empty.
//! - `labels`: at most [`MAX_LABELS`], keys non-empty and at most [`MAX_LABEL_KEY_BYTES`] bytes.
//! - Context window: the prompt's tokens ([`weir_mesh::tokens::count_messages`] with the model's
//!   family) plus `max_tokens` when set must fit the model's `context_window`. When `max_tokens` is
//!   unset nothing is reserved for the answer; it is cut (FINISH_REASON_LENGTH) when the window
//!   fills.

use std::collections::HashMap;

use weir_mesh::{ApiError, catalog::Catalog, catalog::ModelSpec, tokens};
use weir_proto::{
    common::{GenerationParams, Message, Role},
    inference::{GenerateRequest, GenerateStreamRequest},
};

/// Most stop sequences a request may set.
pub const MAX_STOP_SEQUENCES: usize = 4;
/// Most labels a request may carry.
pub const MAX_LABELS: usize = 16;
/// Longest label key, in bytes.
pub const MAX_LABEL_KEY_BYTES: usize = 64;
/// Highest sampling temperature.
pub const MAX_TEMPERATURE: f32 = 2.0;

/// A generation request, unary or streamed (both carry the same fields).
#[derive(Debug, Clone, Default)]
pub struct Input {
    /// Catalog name of the model.
    pub model: String,
    /// The conversation, oldest first.
    pub messages: Vec<Message>,
    /// Generation parameters (defaults when the request left them unset).
    pub params: GenerationParams,
    /// Caller-chosen id for logs and upstream correlation.
    pub request_id: String,
    /// Free-form labels for logs.
    pub labels: HashMap<String, String>,
}

impl From<GenerateRequest> for Input {
    fn from(request: GenerateRequest) -> Self {
        Self {
            model: request.model,
            messages: request.messages,
            params: request.params.unwrap_or_default(),
            request_id: request.request_id,
            labels: request.labels,
        }
    }
}

impl From<GenerateStreamRequest> for Input {
    fn from(request: GenerateStreamRequest) -> Self {
        Self {
            model: request.model,
            messages: request.messages,
            params: request.params.unwrap_or_default(),
            request_id: request.request_id,
            labels: request.labels,
        }
    }
}

/// What validation learned about a valid request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Checked {
    /// Prompt tokens, counted with the model's tokenizer family.
    pub prompt_tokens: u32,
    /// Most tokens the answer may have: `max_tokens` (or the model's `max_output_tokens` when
    /// unset), and never more than what is left of the context window.
    pub output_limit: u32,
}

/// Validates `input` against the catalog; returns the model and what was learned.
pub fn validate<'c>(
    catalog: &'c Catalog,
    input: &Input,
) -> Result<(&'c ModelSpec, Checked), ApiError> {
    if input.model.is_empty() {
        return Err(ApiError::invalid_argument(
            "model",
            "is required (a model name from ListModels)",
        ));
    }
    let spec = catalog
        .get(&input.model)
        .ok_or_else(|| ApiError::not_found("model", &input.model))?;
    validate_messages(&input.messages)?;
    let max_tokens = validate_params(&input.model, spec, &input.params)?;
    validate_labels(&input.labels)?;

    let prompt_tokens = tokens::count_messages(spec.family(), &input.messages);
    let needed = u64::from(prompt_tokens) + u64::from(max_tokens.unwrap_or(0));
    if needed > u64::from(spec.context_window) {
        let prompt = match max_tokens {
            Some(max) => format!(
                "prompt is {prompt_tokens} tokens and max_tokens is {max} ({needed} in all)"
            ),
            None => format!("prompt is {prompt_tokens} tokens"),
        };
        return Err(ApiError::invalid_argument(
            "messages",
            format!(
                "{prompt}; model {} accepts {} including max_tokens",
                input.model, spec.context_window
            ),
        ));
    }
    let room = spec.context_window - prompt_tokens;
    let output_limit = max_tokens.unwrap_or(spec.max_output_tokens).min(room);
    Ok((
        spec,
        Checked {
            prompt_tokens,
            output_limit,
        },
    ))
}

fn validate_messages(messages: &[Message]) -> Result<(), ApiError> {
    if messages.is_empty() {
        return Err(ApiError::invalid_argument(
            "messages",
            "at least one message is required",
        ));
    }
    for (i, message) in messages.iter().enumerate() {
        match Role::try_from(message.role) {
            Ok(Role::Unspecified) => {
                return Err(ApiError::invalid_argument(
                    format!("messages[{i}].role"),
                    "must be set (ROLE_SYSTEM, ROLE_USER, ROLE_ASSISTANT or ROLE_TOOL)",
                ));
            }
            Ok(_) => {}
            Err(_) => {
                return Err(ApiError::invalid_argument(
                    format!("messages[{i}].role"),
                    format!("unknown role {}", message.role),
                ));
            }
        }
    }
    Ok(())
}

/// Checks the parameters; returns `max_tokens` when set.
fn validate_params(
    model: &str,
    spec: &ModelSpec,
    params: &GenerationParams,
) -> Result<Option<u32>, ApiError> {
    let max_tokens = match params.max_tokens {
        None => None,
        Some(max) if max <= 0 => {
            return Err(ApiError::invalid_argument(
                "params.max_tokens",
                format!("must be positive, got {max}"),
            ));
        }
        Some(max) => {
            let max = max.unsigned_abs();
            if max > spec.max_output_tokens {
                return Err(ApiError::invalid_argument(
                    "params.max_tokens",
                    format!(
                        "must be at most {} for model {model}, got {max}",
                        spec.max_output_tokens
                    ),
                ));
            }
            Some(max)
        }
    };
    if let Some(temperature) = params.temperature
        && !(0.0..=MAX_TEMPERATURE).contains(&temperature)
    {
        return Err(ApiError::invalid_argument(
            "params.temperature",
            format!("must be between 0 and {MAX_TEMPERATURE}, got {temperature}"),
        ));
    }
    if let Some(top_p) = params.top_p
        && !(top_p > 0.0 && top_p <= 1.0)
    {
        return Err(ApiError::invalid_argument(
            "params.top_p",
            format!("must be above 0 and at most 1, got {top_p}"),
        ));
    }
    if params.stop.len() > MAX_STOP_SEQUENCES {
        return Err(ApiError::invalid_argument(
            "params.stop",
            format!(
                "at most {MAX_STOP_SEQUENCES} stop sequences are allowed, got {}",
                params.stop.len()
            ),
        ));
    }
    if let Some(i) = params.stop.iter().position(String::is_empty) {
        return Err(ApiError::invalid_argument(
            format!("params.stop[{i}]"),
            "must not be empty",
        ));
    }
    Ok(max_tokens)
}

fn validate_labels(labels: &HashMap<String, String>) -> Result<(), ApiError> {
    if labels.len() > MAX_LABELS {
        return Err(ApiError::invalid_argument(
            "labels",
            format!(
                "at most {MAX_LABELS} labels are allowed, got {}",
                labels.len()
            ),
        ));
    }
    // Sorted so the reported key does not depend on hash order.
    let mut keys: Vec<&String> = labels.keys().collect();
    keys.sort();
    for key in keys {
        if key.is_empty() {
            return Err(ApiError::invalid_argument(
                "labels",
                "label keys must not be empty",
            ));
        }
        if key.len() > MAX_LABEL_KEY_BYTES {
            return Err(ApiError::invalid_argument(
                "labels",
                format!(
                    "label keys must be at most {MAX_LABEL_KEY_BYTES} bytes, got {} for a key starting {:?}",
                    key.len(),
                    key.chars().take(16).collect::<String>()
                ),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use tonic::Code;
    use weir_mesh::catalog::{ModelSpec, SimSpec};

    use super::*;

    fn catalog() -> Catalog {
        Catalog::new([(
            "sim-small".to_string(),
            ModelSpec {
                context_window: 100,
                max_output_tokens: 50,
                sim: SimSpec::default(),
                ..ModelSpec::default()
            },
        )])
    }

    fn user(text: &str) -> Message {
        Message {
            role: Role::User.into(),
            content: text.to_string(),
            ..Message::default()
        }
    }

    fn input() -> Input {
        Input {
            model: "sim-small".to_string(),
            messages: vec![user("Hello there")],
            ..Input::default()
        }
    }

    fn error(input: &Input) -> ApiError {
        validate(&catalog(), input)
            .map(|_| ())
            .expect_err("should be refused")
    }

    fn field(error: &ApiError) -> &str {
        error
            .field_violations()
            .first()
            .map_or("", |(field, _)| field.as_str())
    }

    #[test]
    fn a_valid_request_reports_prompt_tokens_and_output_limit() {
        let (_, checked) = validate(&catalog(), &input()).unwrap();
        // 2 words + 4 per message + 3 reply primer.
        assert_eq!(checked.prompt_tokens, 9);
        assert_eq!(checked.output_limit, 50);
        let mut small = input();
        small.params.max_tokens = Some(5);
        assert_eq!(validate(&catalog(), &small).unwrap().1.output_limit, 5);
    }

    #[test]
    fn output_limit_never_exceeds_the_rest_of_the_window() {
        let mut long = input();
        long.messages = vec![user(&"word ".repeat(80))];
        let (_, checked) = validate(&catalog(), &long).unwrap();
        assert_eq!(checked.prompt_tokens, 87);
        assert_eq!(checked.output_limit, 13);
    }

    #[test]
    fn model_must_be_named_and_known() {
        let mut request = input();
        request.model.clear();
        let e = error(&request);
        assert_eq!((e.code(), field(&e)), (Code::InvalidArgument, "model"));
        request.model = "gpt-9".to_string();
        let e = error(&request);
        assert_eq!(e.code(), Code::NotFound);
        assert_eq!(e.reason(), "MODEL_NOT_FOUND");
        assert!(e.message().contains("gpt-9"));
    }

    #[test]
    fn messages_are_required_and_need_roles() {
        let mut request = input();
        request.messages.clear();
        let e = error(&request);
        assert_eq!(field(&e), "messages");
        assert!(e.message().contains("at least one message is required"));

        request.messages = vec![user("a"), Message::default()];
        assert_eq!(field(&error(&request)), "messages[1].role");
        request.messages[1].role = 42;
        let e = error(&request);
        assert_eq!(field(&e), "messages[1].role");
        assert!(e.message().contains("42"));
    }

    #[test]
    fn max_tokens_must_be_positive_and_within_the_model_limit() {
        for (value, expected) in [(-1, "got -1"), (0, "got 0"), (51, "at most 50")] {
            let mut request = input();
            request.params.max_tokens = Some(value);
            let e = error(&request);
            assert_eq!(field(&e), "params.max_tokens");
            assert!(e.message().contains(expected), "{}", e.message());
        }
    }

    #[test]
    fn sampling_parameters_have_ranges() {
        for (temperature, top_p, name) in [
            (Some(-0.1), None, "params.temperature"),
            (Some(2.5), None, "params.temperature"),
            (Some(f32::NAN), None, "params.temperature"),
            (None, Some(0.0), "params.top_p"),
            (None, Some(1.01), "params.top_p"),
        ] {
            let mut request = input();
            request.params.temperature = temperature;
            request.params.top_p = top_p;
            assert_eq!(field(&error(&request)), name);
        }
        let mut request = input();
        request.params.temperature = Some(2.0);
        request.params.top_p = Some(1.0);
        assert!(validate(&catalog(), &request).is_ok());
    }

    #[test]
    fn stop_sequences_are_limited_and_non_empty() {
        let mut request = input();
        request.params.stop = vec!["a".to_string(); 5];
        assert_eq!(field(&error(&request)), "params.stop");
        request.params.stop = vec!["a".to_string(), String::new()];
        assert_eq!(field(&error(&request)), "params.stop[1]");
        request.params.stop = vec!["a".to_string(); 4];
        assert!(validate(&catalog(), &request).is_ok());
    }

    #[test]
    fn labels_are_limited() {
        let mut request = input();
        request.labels = (0..17).map(|i| (format!("k{i}"), String::new())).collect();
        assert_eq!(field(&error(&request)), "labels");
        request.labels = [("k".repeat(65), String::new())].into();
        assert!(error(&request).message().contains("64 bytes"));
        request.labels = [("k".repeat(64), "v".to_string())].into();
        assert!(validate(&catalog(), &request).is_ok());
    }

    #[test]
    fn oversized_prompts_name_both_numbers() {
        let mut request = input();
        request.messages = vec![user(&"word ".repeat(100))];
        let e = error(&request);
        assert_eq!(field(&e), "messages");
        assert!(
            e.message()
                .contains("prompt is 107 tokens; model sim-small accepts 100 including max_tokens"),
            "{}",
            e.message()
        );

        request.messages = vec![user(&"word ".repeat(80))];
        request.params.max_tokens = Some(20);
        let e = error(&request);
        assert!(
            e.message()
                .contains("prompt is 87 tokens and max_tokens is 20 (107 in all)"),
            "{}",
            e.message()
        );
        request.params.max_tokens = Some(13);
        assert!(validate(&catalog(), &request).is_ok());
    }
}
