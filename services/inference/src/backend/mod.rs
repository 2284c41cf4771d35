//! Model backends: what turns a validated request into tokens.
//!
//! Each catalog model gets one [`Backend`] at start-up: the simulated model ([`sim`]) or an
//! OpenAI-compatible HTTP endpoint ([`openai`]). Both offer the same two operations:
//!
//! - `generate`: the whole answer at once ([`Generation`]).
//! - `stream`: first does everything that can fail before the first token (added latency,
//!   injected faults, the upstream's response status), so such failures become the call's status;
//!   then returns an [`EventStream`] of deltas ending with exactly one [`Event::Done`], or with an
//!   error when the answer breaks off. Dropping the stream stops the work behind it: the simulated
//!   model stops generating and the upstream HTTP response is dropped, which closes its
//!   connection.
//!
//! Backends bound their own work only by their own timeouts (an upstream's configured timeout);
//! the caller's deadline is applied around them by the API layer, which answers
//! DEADLINE_EXCEEDED.

use std::time::Duration;

use futures::{StreamExt, stream::BoxStream};
use tokio::time::Instant;
use weir_mesh::{
    ApiError,
    catalog::{BackendKind, ModelSpec},
};
use weir_proto::common::{FinishReason, Message, Role, Usage};

use crate::validate::{Checked, Input};

pub mod openai;
pub mod sim;
pub mod sse;

/// One validated call, as a backend receives it.
#[derive(Debug, Clone)]
pub struct Call {
    /// The request.
    pub input: Input,
    /// What validation learned (prompt tokens, output limit).
    pub checked: Checked,
    /// When the service received the call; time to first token is measured from here.
    pub received: Instant,
    /// The caller's deadline, if it set one.
    pub deadline: Option<Instant>,
}

/// One event of a streamed answer.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// Generated text.
    Delta {
        /// The text of one or more tokens.
        text: String,
        /// Index of the first token of this delta, counting from 0.
        index: u64,
    },
    /// The end of the answer.
    Done(Finish),
}

/// How an answer ended.
#[derive(Debug, Clone, PartialEq)]
pub struct Finish {
    /// Why generation ended.
    pub finish_reason: FinishReason,
    /// Token usage of the whole answer.
    pub usage: Usage,
    /// Time from receiving the call to the first generated token (to the end when there was none).
    pub time_to_first_token: Duration,
}

/// A whole answer.
#[derive(Debug, Clone, PartialEq)]
pub struct Generation {
    /// The assistant message.
    pub message: Message,
    /// How it ended.
    pub finish: Finish,
}

/// A streamed answer: deltas, then exactly one [`Event::Done`]; an error ends it early.
pub type EventStream = BoxStream<'static, Result<Event, ApiError>>;

/// The backend serving one model.
#[derive(Debug)]
pub enum Backend {
    /// The simulated model.
    Sim(sim::SimModel),
    /// An OpenAI-compatible endpoint.
    OpenAi(openai::OpenAiModel),
}

impl Backend {
    /// The backend for model `name`; simulated models record requests in `log`.
    pub fn new(name: &str, spec: &ModelSpec, log: &sim::SimLog) -> Self {
        match spec.backend {
            BackendKind::Sim => Self::Sim(sim::SimModel::new(name, spec, log.clone())),
            BackendKind::Openai => Self::OpenAi(openai::OpenAiModel::new(name, spec)),
        }
    }

    /// The backend's kind.
    pub fn kind(&self) -> BackendKind {
        match self {
            Self::Sim(_) => BackendKind::Sim,
            Self::OpenAi(_) => BackendKind::Openai,
        }
    }

    /// Generates the whole answer.
    pub async fn generate(&self, call: Call) -> Result<Generation, ApiError> {
        match self {
            Self::Sim(model) => model.generate(call).await,
            Self::OpenAi(model) => model.generate(call).await,
        }
    }

    /// Starts a streamed answer (see the module doc for what fails here and what in the stream).
    pub async fn stream(&self, call: Call) -> Result<EventStream, ApiError> {
        match self {
            Self::Sim(model) => model.stream(call, true).await,
            Self::OpenAi(model) => model.stream(call).await,
        }
    }
}

/// Usage with `total_tokens` filled in.
pub fn usage(input_tokens: u64, output_tokens: u64, cached_input_tokens: u64) -> Usage {
    let clamp = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
    Usage {
        input_tokens: clamp(input_tokens),
        output_tokens: clamp(output_tokens),
        cached_input_tokens: clamp(cached_input_tokens),
        total_tokens: clamp(input_tokens.saturating_add(output_tokens)),
    }
}

/// An assistant message with the given text.
pub fn assistant(content: String) -> Message {
    Message {
        role: Role::Assistant.into(),
        content,
        ..Message::default()
    }
}

/// Collects a streamed answer into a whole one: the answer a unary call gets is by construction
/// the one a stream would have delivered.
pub async fn collect(mut events: EventStream) -> Result<Generation, ApiError> {
    let mut content = String::new();
    while let Some(event) = events.next().await {
        match event? {
            Event::Delta { text, .. } => content.push_str(&text),
            Event::Done(finish) => {
                return Ok(Generation {
                    message: assistant(content),
                    finish,
                });
            }
        }
    }
    Err(ApiError::internal(
        "the backend's answer ended without a final event",
    ))
}

/// `start + offset`, or a time so far away that it never comes when that would overflow (a
/// configured delay of centuries).
pub fn instant_after(start: Instant, offset: Duration) -> Instant {
    const FAR: Duration = Duration::from_secs(30 * 365 * 24 * 3600);
    start
        .checked_add(offset.min(FAR))
        .unwrap_or_else(|| start + Duration::from_secs(24 * 3600))
}
