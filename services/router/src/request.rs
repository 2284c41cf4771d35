//! A completion request as the router's walk sees it, and the cheap checks the router makes.
//!
//! `CompleteRequest` and `CompleteStreamRequest` carry the same fields; both become a
//! `Completion`, so the synchronous and streaming paths (and, later, jobs and batches) run one
//! walk over one type.
//!
//! The router only checks what it must know before it can route, or what it alone owns:
//!
//! - `messages` empty without a `session_id`: INVALID_ARGUMENT on field `messages` (with a session
//!   the request may continue the conversation from its history alone; the walk refuses it on the
//!   same field if the history turns out to be empty too);
//! - more than [`MAX_LABELS`] labels: INVALID_ARGUMENT on field `labels`;
//! - `criticality` not a known value: INVALID_ARGUMENT on field `criticality`.
//!
//! Everything else (roles, generation parameters, prompt size against the model's context window,
//! label key length) is checked by the inference service, whose INVALID_ARGUMENT and NOT_FOUND
//! answers, with their BadRequest details, reach the client unchanged. The session id itself is
//! checked by the session service (INVALID_ARGUMENT on `session_id`, NOT_FOUND for an unknown one).
//!
//! The messages sent to a model are the request's own, after the session's history when there is
//! one (`generate_request` takes the prompt the walk assembled).

use std::collections::HashMap;

use weir_mesh::{ApiError, catalog::ModelSpec};
use weir_proto::{
    common::{Criticality, GenerationParams, Message},
    inference::{GenerateRequest, GenerateStreamRequest},
    router::{CompleteRequest, CompleteStreamRequest},
};

/// Most labels a request may carry (the inference service's limit too).
pub const MAX_LABELS: usize = 16;

/// The fields of a completion request, whichever RPC it came from.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Completion {
    /// A model name or a route alias.
    pub model: String,
    /// The new messages, oldest first.
    pub messages: Vec<Message>,
    /// Optional session.
    pub session_id: String,
    /// Generation parameters.
    pub params: Option<GenerationParams>,
    /// Optional idempotency key, also passed to inference for its logs.
    pub request_id: String,
    /// Criticality from the body (`CRITICALITY_UNSPECIFIED` when unset; the metadata then applies).
    pub criticality: i32,
    /// Free-form labels.
    pub labels: HashMap<String, String>,
}

impl From<CompleteRequest> for Completion {
    fn from(request: CompleteRequest) -> Self {
        Self {
            model: request.model,
            messages: request.messages,
            session_id: request.session_id,
            params: request.params,
            request_id: request.request_id,
            criticality: request.criticality,
            labels: request.labels,
        }
    }
}

impl From<CompleteStreamRequest> for Completion {
    fn from(request: CompleteStreamRequest) -> Self {
        Self {
            model: request.model,
            messages: request.messages,
            session_id: request.session_id,
            params: request.params,
            request_id: request.request_id,
            criticality: request.criticality,
            labels: request.labels,
        }
    }
}

/// Why the router refuses a request before routing it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    /// `messages` is empty (and there is no session to continue).
    #[error("at least one message is required")]
    NoMessages,
    /// More than [`MAX_LABELS`] labels.
    #[error("at most {MAX_LABELS} labels, got {0}")]
    TooManyLabels(usize),
    /// `criticality` is not a known value.
    #[error("unknown value {0}")]
    UnknownCriticality(i32),
    /// `request_id` is not a valid idempotency key.
    #[error("{0}")]
    InvalidRequestId(String),
}

impl From<RequestError> for ApiError {
    fn from(error: RequestError) -> Self {
        let description = error.to_string();
        match error {
            RequestError::NoMessages => ApiError::invalid_argument("messages", description),
            RequestError::TooManyLabels(_) => ApiError::invalid_argument("labels", description),
            RequestError::UnknownCriticality(_) => {
                ApiError::invalid_argument("criticality", description)
            }
            RequestError::InvalidRequestId(_) => {
                ApiError::invalid_argument("request_id", description)
            }
        }
    }
}

impl Completion {
    /// The router's own checks (see the module documentation), in that order.
    pub fn check(&self) -> Result<(), RequestError> {
        if self.messages.is_empty() && self.session_id.is_empty() {
            return Err(RequestError::NoMessages);
        }
        if self.labels.len() > MAX_LABELS {
            return Err(RequestError::TooManyLabels(self.labels.len()));
        }
        if Criticality::try_from(self.criticality).is_err() {
            return Err(RequestError::UnknownCriticality(self.criticality));
        }
        // Checked before anything is claimed, reserved or charged.
        if !self.request_id.is_empty()
            && let Some(problem) = weir_mesh::idempotency::key_problem(&self.request_id)
        {
            return Err(RequestError::InvalidRequestId(problem));
        }
        Ok(())
    }

    /// The criticality set in the body, if any; it overrides the `weir-criticality` metadata.
    pub fn criticality(&self) -> Option<weir_mesh::criticality::Criticality> {
        weir_mesh::criticality::Criticality::from_proto(self.criticality)
    }

    /// The session id, if the request names one.
    pub fn session(&self) -> Option<&str> {
        Some(self.session_id.as_str()).filter(|s| !s.is_empty())
    }

    /// The largest answer the request allows from a model: `params.max_tokens` when set, else the
    /// model's `max_output_tokens`.
    pub fn max_output_tokens(&self, spec: &ModelSpec) -> u32 {
        self.params
            .as_ref()
            .and_then(|p| p.max_tokens)
            .and_then(|max| u32::try_from(max).ok())
            .unwrap_or(spec.max_output_tokens)
    }

    /// The unary inference request for `model` with `messages` as the prompt (the session's
    /// history, if any, then the request's messages) and an answer of at most `max_output`
    /// tokens (see [`Completion::params_for`]).
    pub fn generate_request(
        &self,
        model: &str,
        messages: Vec<Message>,
        max_output: u32,
    ) -> GenerateRequest {
        GenerateRequest {
            model: model.to_string(),
            messages,
            params: Some(self.params_for(max_output)),
            request_id: self.request_id.clone(),
            labels: self.labels.clone(),
        }
    }

    /// The streaming inference request for `model` with `messages` as the prompt and an answer of
    /// at most `max_output` tokens.
    pub fn generate_stream_request(
        &self,
        model: &str,
        messages: Vec<Message>,
        max_output: u32,
    ) -> GenerateStreamRequest {
        GenerateStreamRequest {
            model: model.to_string(),
            messages,
            params: Some(self.params_for(max_output)),
            request_id: self.request_id.clone(),
            labels: self.labels.clone(),
        }
    }

    /// The request's generation parameters with `max_tokens` set to `max_output`, the limit the
    /// router reserved for, when the client set none: an OpenAI-compatible server sent no limit
    /// generates until its own, and the commit would overrun the reservation and the tenant's
    /// hard limit. So an answer can never cost more than its hold. A client's own `max_tokens` is
    /// sent unchanged (it is what was reserved; the inference service refuses it if it is invalid
    /// or does not fit the window), and a prompt that leaves no room (`max_output` 0) is sent
    /// without one, for the inference service to refuse by its size.
    pub fn params_for(&self, max_output: u32) -> GenerationParams {
        let mut params = self.params.clone().unwrap_or_default();
        if params.max_tokens.is_none() && max_output > 0 {
            params.max_tokens = Some(i32::try_from(max_output).unwrap_or(i32::MAX));
        }
        params
    }
}

/// The price tier a request is charged at: the batch tier when a job worker (a caller with a
/// valid mesh token) asks for it with `weir-price-tier: batch` for a batch item, else the standard
/// tier. Anyone else's header is ignored: a client cannot buy at batch prices.
pub fn price_tier(
    metadata: &tonic::metadata::MetadataMap,
    extensions: &http::Extensions,
) -> weir_mesh::pricing::Tier {
    use weir_mesh::{
        auth::{Caller, Via},
        metadata::{BATCH_PRICE_TIER, PRICE_TIER},
        pricing::Tier,
    };
    let from_mesh = Caller::of(extensions).is_some_and(|caller| caller.via == Via::MeshToken);
    let asked = metadata
        .get(PRICE_TIER)
        .and_then(|value| value.to_str().ok())
        .is_some_and(|value| value == BATCH_PRICE_TIER);
    if from_mesh && asked {
        Tier::Batch
    } else {
        Tier::Standard
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use tonic::{Code, Status};
    use tonic_types::StatusExt;
    use weir_proto::common::Role;

    use super::*;

    fn valid() -> Completion {
        Completion::from(CompleteRequest {
            model: "auto".to_string(),
            messages: vec![Message {
                role: Role::User.into(),
                content: "hi".to_string(),
                ..Message::default()
            }],
            ..CompleteRequest::default()
        })
    }

    fn bad_field(error: RequestError) -> (Code, Option<String>) {
        let status = Status::from(ApiError::from(error));
        let field = status
            .get_error_details()
            .bad_request()
            .and_then(|b| b.field_violations.first().map(|v| v.field.clone()));
        (status.code(), field)
    }

    #[test]
    fn a_plain_request_passes() {
        valid().check().unwrap();
    }

    #[test]
    fn empty_messages_name_the_field() {
        let mut request = valid();
        request.messages.clear();
        let error = request.check().unwrap_err();
        assert_eq!(
            bad_field(error),
            (Code::InvalidArgument, Some("messages".to_string()))
        );
    }

    #[test]
    fn a_session_may_continue_without_new_messages() {
        let mut request = valid();
        request.session_id = "s-1".to_string();
        request.messages.clear();
        request.check().unwrap();
        assert_eq!(request.session(), Some("s-1"));
        assert_eq!(valid().session(), None);
    }

    #[test]
    fn max_output_tokens_is_the_request_s_or_the_model_s() {
        let spec = ModelSpec {
            max_output_tokens: 77,
            ..ModelSpec::default()
        };
        let mut request = valid();
        assert_eq!(request.max_output_tokens(&spec), 77);
        request.params = Some(GenerationParams {
            max_tokens: Some(5),
            ..GenerationParams::default()
        });
        assert_eq!(request.max_output_tokens(&spec), 5);
    }

    #[test]
    fn a_bad_request_id_is_refused_naming_the_field() {
        for bad in ["has space", &"k".repeat(256)] {
            let mut request = valid();
            request.request_id = bad.to_string();
            let error = ApiError::from(request.check().unwrap_err());
            assert_eq!(error.code(), tonic::Code::InvalidArgument);
            assert!(error.message().starts_with("request_id:"), "{error:?}");
        }
        let mut request = valid();
        request.request_id = "7c9e6679-7425-40de-944b-e07fc1f90ae7".to_string();
        request.check().unwrap();
    }

    #[test]
    fn too_many_labels_name_the_field() {
        let mut request = valid();
        request.labels = (0..=MAX_LABELS)
            .map(|i| (format!("k{i}"), "v".to_string()))
            .collect();
        let error = request.check().unwrap_err();
        assert_eq!(
            bad_field(error),
            (Code::InvalidArgument, Some("labels".to_string()))
        );
        request.labels.remove("k0");
        request.check().unwrap();
    }

    #[test]
    fn unknown_criticality_names_the_field() {
        let mut request = valid();
        request.criticality = 99;
        let error = request.check().unwrap_err();
        assert_eq!(
            bad_field(error),
            (Code::InvalidArgument, Some("criticality".to_string()))
        );
    }

    #[test]
    fn body_criticality_is_only_reported_when_set() {
        let mut request = valid();
        assert_eq!(request.criticality(), None);
        request.criticality = Criticality::Sheddable.into();
        assert_eq!(
            request.criticality(),
            Some(weir_mesh::criticality::Criticality::Sheddable)
        );
    }

    #[test]
    fn both_rpcs_carry_the_same_fields() {
        let stream = Completion::from(CompleteStreamRequest {
            model: "auto".to_string(),
            messages: valid().messages,
            ..CompleteStreamRequest::default()
        });
        assert_eq!(stream, valid());
        let upstream = stream.generate_stream_request("sim-large", valid().messages, 64);
        assert_eq!(upstream.model, "sim-large");
        assert_eq!(upstream.messages, valid().messages);
    }

    #[test]
    fn the_reserved_limit_is_always_sent_upstream() {
        let mut request = valid();
        request.params = Some(GenerationParams {
            temperature: Some(0.5),
            ..GenerationParams::default()
        });
        let params = request
            .generate_request("m", Vec::new(), 300)
            .params
            .unwrap();
        assert_eq!(
            params.max_tokens,
            Some(300),
            "set though the client set none"
        );
        assert_eq!(params.temperature, Some(0.5), "the rest is the client's");
        request.params = None;
        let params = request
            .generate_stream_request("m", Vec::new(), 7)
            .params
            .unwrap();
        assert_eq!(params.max_tokens, Some(7));
        // The client's own limit is what was reserved, and goes as it is.
        request.params = Some(GenerationParams {
            max_tokens: Some(-1),
            ..GenerationParams::default()
        });
        let params = request
            .generate_request("m", Vec::new(), 300)
            .params
            .unwrap();
        assert_eq!(params.max_tokens, Some(-1));
        // No room left: no limit, so inference refuses the prompt for its size.
        request.params = None;
        let params = request.generate_request("m", Vec::new(), 0).params.unwrap();
        assert_eq!(params.max_tokens, None);
    }
}
