//! Sessions: the router's client of the session service (steps 3 and 6 of the walk).
//!
//! A request with a `session_id` continues a conversation whose history the session service keeps
//! (in Redis), so the client sends only the new messages:
//!
//! - **Context (step 3).** Before each model call, `GetContext` for that model returns the
//!   session's summary and the most recent turns that fit the room the model leaves: its context
//!   window minus the answer's room (`params.max_tokens`, else the model's `max_output_tokens`)
//!   minus the new messages. The prompt is then the context's `messages` as the session service
//!   assembled them (the summary as one system message, then the recent turns) and the new
//!   messages. A
//!   fallback to a model of another size or tokenizer asks again, for that model. The request's
//!   `request_id` goes with it: a retry whose first attempt stored its turns before its router
//!   died gets the context that attempt saw, so it asks the same question of the same history
//!   (and prices the same hold, see [`crate::spend`]).
//! - **Append (step 6).** After a successful answer, `AppendTurns` adds the new messages and the
//!   answer, with the request's `request_id` (or a generated one) as the session's idempotency key,
//!   so a retried append adds nothing. A streamed answer is appended when the relay sees `done`.
//!   **A stream that does not finish (the client cancelled, or the model failed mid-answer) is not
//!   appended at all**: the client never received a whole answer, and a partial one in the history
//!   would mislead every later turn; the client may send the same message again.
//!
//! Failures:
//!
//! - The session service cannot answer (UNAVAILABLE, including an open circuit or a full bulkhead
//!   in the router's client stack, or DEADLINE_EXCEEDED while the caller still had time): the
//!   request is answered **without history**, the answer carries a [`SESSION_UNAVAILABLE`] notice,
//!   and the exchange is not appended (the answer was made without the conversation, and the
//!   service is likely still down). With no new messages there is nothing to answer: UNAVAILABLE,
//!   reason [`SESSION_UNAVAILABLE`].
//! - Any other answer is the client's to see, unchanged: NOT_FOUND `SESSION_NOT_FOUND` for an
//!   unknown, expired, deleted or other tenant's session, INVALID_ARGUMENT for a malformed id.
//! - An append that fails after the answer never fails the answer: it is logged and the answer
//!   carries a [`SESSION_APPEND_FAILED`] notice.
//! - With `router.session_url` empty (sessions off), a request with a `session_id` is refused with
//!   FAILED_PRECONDITION, reason [`SESSIONS_DISABLED`], rather than silently answered without its
//!   history.
//!
//! Sessions belong to the tenant the router authenticated: the `weir-tenant` metadata is forwarded
//! on every call, as for inference.

use std::{fmt, sync::Arc};

use tonic::Code;
use weir_mesh::{
    ApiError,
    catalog::ModelSpec,
    client::{BoxedClient, ClientStack},
    tokens,
};
use weir_proto::{
    common::Message,
    router::Notice,
    session::{
        AppendTurnsRequest, GetContextRequest, session_service_client::SessionServiceClient,
    },
};

use crate::{inference::Call, request::Completion};

/// Backend key of the calls to the session service (its breaker, bulkhead and retry budget).
pub const SESSION_BACKEND: &str = "session";
/// Notice reason (and error reason with no new messages): the history could not be loaded.
pub const SESSION_UNAVAILABLE: &str = "SESSION_UNAVAILABLE";
/// Notice reason: the answer was delivered but could not be added to the session.
pub const SESSION_APPEND_FAILED: &str = "SESSION_APPEND_FAILED";
/// ErrorInfo reason of a request with a `session_id` to a router whose sessions are off.
pub const SESSIONS_DISABLED: &str = "SESSIONS_DISABLED";

/// The router's client of the session service; off when `router.session_url` is empty. Cheap to
/// clone.
#[derive(Clone, Default)]
pub(crate) struct Sessions {
    inner: Option<Arc<Inner>>,
}

struct Inner {
    client: SessionServiceClient<BoxedClient>,
    stack: ClientStack,
}

impl fmt::Debug for Sessions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sessions")
            .field("enabled", &self.inner.is_some())
            .finish()
    }
}

impl Sessions {
    /// Sessions off.
    pub fn off() -> Self {
        Self::default()
    }

    /// Sessions through `stack` (a client stack over a channel to the session service).
    pub fn new(stack: ClientStack) -> Self {
        Self {
            inner: Some(Arc::new(Inner {
                client: SessionServiceClient::new(stack.service()),
                stack,
            })),
        }
    }

    /// The client stack of the calls to the session service, when sessions are on.
    pub fn stack(&self) -> Option<&ClientStack> {
        self.inner.as_ref().map(|inner| &inner.stack)
    }

    /// The history of `completion`'s session (none without a `session_id`). Refused with
    /// FAILED_PRECONDITION [`SESSIONS_DISABLED`] when the request names a session and sessions are
    /// off.
    pub fn history(&self, completion: &Completion) -> Result<History, ApiError> {
        let Some(session_id) = completion.session() else {
            return Ok(History::none());
        };
        let Some(inner) = &self.inner else {
            return Err(ApiError::new(
                Code::FailedPrecondition,
                SESSIONS_DISABLED,
                "this router has no session service (router.session_url is empty): leave \
                 session_id empty and send the whole conversation in messages",
            ));
        };
        Ok(History {
            session: Some(SessionRef {
                inner: Arc::clone(inner),
                id: session_id.to_string(),
            }),
            loaded: Vec::new(),
            unavailable: false,
        })
    }
}

#[derive(Clone)]
struct SessionRef {
    inner: Arc<Inner>,
    id: String,
}

/// One request's view of its session: the context loaded per model, and whether the session
/// service could answer.
pub(crate) struct History {
    session: Option<SessionRef>,
    /// Context messages already loaded, by model.
    loaded: Vec<(String, Vec<Message>)>,
    /// The session service could not answer: the request goes on without history.
    unavailable: bool,
}

impl fmt::Debug for History {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("History")
            .field("session", &self.session.as_ref().map(|s| &s.id))
            .field("unavailable", &self.unavailable)
            .finish()
    }
}

impl History {
    /// No session: prompts are the request's messages.
    pub fn none() -> Self {
        Self {
            session: None,
            loaded: Vec::new(),
            unavailable: false,
        }
    }

    /// The prompt for `model` (described by `spec`): the session's context for it, then the
    /// request's messages (see the module documentation). Pushes a [`SESSION_UNAVAILABLE`] notice
    /// the first time the session service cannot answer.
    pub async fn prompt(
        &mut self,
        call: &Call,
        completion: &Completion,
        model: &str,
        spec: &ModelSpec,
        notices: &mut Vec<Notice>,
    ) -> Result<Vec<Message>, ApiError> {
        let Some(session) = self.session.clone() else {
            return Ok(completion.messages.clone());
        };
        let mut prompt = self
            .context(call, &session, completion, model, spec, notices)
            .await?;
        prompt.extend(completion.messages.iter().cloned());
        if prompt.is_empty() {
            return Err(if self.unavailable {
                ApiError::unavailable(
                    SESSION_UNAVAILABLE,
                    format!(
                        "the history of session {} could not be loaded and the request has no \
                         new messages; retry later",
                        session.id
                    ),
                )
            } else {
                ApiError::invalid_argument(
                    "messages",
                    format!(
                        "at least one message is required: session {} has no history yet",
                        session.id
                    ),
                )
            });
        }
        Ok(prompt)
    }

    /// The session's context messages for `model`: loaded once per model, and none once the
    /// session service could not answer (noticed the first time).
    async fn context(
        &mut self,
        call: &Call,
        session: &SessionRef,
        completion: &Completion,
        model: &str,
        spec: &ModelSpec,
        notices: &mut Vec<Notice>,
    ) -> Result<Vec<Message>, ApiError> {
        if self.unavailable {
            return Ok(Vec::new());
        }
        if let Some((_, context)) = self.loaded.iter().find(|(m, _)| m == model) {
            return Ok(context.clone());
        }
        let request = GetContextRequest {
            session_id: session.id.clone(),
            model: model.to_string(),
            max_tokens: history_budget(spec, completion),
            // A retry whose first attempt stored its turns (its router died before recording the
            // answer) sees the context that attempt saw, not its own question and answer again.
            request_id: completion.request_id.clone(),
        };
        let mut client = session.inner.client.clone();
        match client
            .get_context(call.bookkeeping(request, SESSION_BACKEND))
            .await
        {
            Ok(response) => {
                let context = response.into_inner().messages;
                self.loaded.push((model.to_string(), context.clone()));
                Ok(context)
            }
            Err(status) => {
                let error = ApiError::from_status(&status);
                if !is_outage(call, &error) {
                    return Err(error);
                }
                tracing::warn!(
                    session = %session.id, reason = error.reason(),
                    "session service unavailable; answering without history"
                );
                self.unavailable = true;
                notices.push(Notice {
                    reason: SESSION_UNAVAILABLE.to_string(),
                    message: format!(
                        "the history of session {} could not be loaded ({}); this answer was \
                         made without it, and this exchange was not added to the session",
                        session.id,
                        error.reason()
                    ),
                });
                Ok(Vec::new())
            }
        }
    }

    /// What to append after a successful answer, or `None` (no session, or its history could not
    /// be loaded).
    pub fn append(&self, completion: &Completion) -> Option<Append> {
        let session = self.session.as_ref().filter(|_| !self.unavailable)?;
        let request_id = if completion.request_id.is_empty() {
            format!("rt-{}", uuid::Uuid::new_v4().simple())
        } else {
            completion.request_id.clone()
        };
        Some(Append {
            session: session.clone(),
            messages: completion.messages.clone(),
            request_id,
        })
    }
}

/// The exchange to append to a session once the answer is known.
pub(crate) struct Append {
    session: SessionRef,
    messages: Vec<Message>,
    request_id: String,
}

impl fmt::Debug for Append {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Append")
            .field("session", &self.session.id)
            .field("messages", &self.messages.len())
            .finish()
    }
}

impl Append {
    /// Appends the new messages and `answer` (idempotent under the append's request id).
    pub async fn send(self, call: &Call, answer: Message) -> Result<(), ApiError> {
        let mut messages = self.messages;
        messages.push(answer);
        let request = AppendTurnsRequest {
            session_id: self.session.id.clone(),
            messages,
            request_id: self.request_id,
            expected_last_seq: None,
        };
        let mut client = self.session.inner.client.clone();
        match client
            .append_turns(call.bookkeeping(request, SESSION_BACKEND))
            .await
        {
            Ok(response) => {
                let response = response.into_inner();
                tracing::debug!(
                    session = %self.session.id, first_seq = response.first_seq,
                    last_seq = response.last_seq, "exchange appended"
                );
                Ok(())
            }
            Err(status) => {
                let error = ApiError::from_status(&status);
                tracing::warn!(
                    session = %self.session.id, reason = error.reason(), message = error.message(),
                    "appending the exchange to the session failed"
                );
                Err(error)
            }
        }
    }
}

/// The tokens of history `model` has room for: its context window minus the answer's room minus
/// the new messages (with the prompt's fixed overhead). At least 1, since 0 would mean "the
/// model's default budget" to the session service.
fn history_budget(spec: &ModelSpec, completion: &Completion) -> i64 {
    let new = tokens::count_messages(spec.family(), &completion.messages);
    let room = i64::from(spec.context_window)
        - i64::from(completion.max_output_tokens(spec))
        - i64::from(new);
    room.max(1)
}

/// Whether a failed session call means the service could not answer (rather than an answer about
/// the session), while the caller still had time.
fn is_outage(call: &Call, error: &ApiError) -> bool {
    match error.code() {
        Code::Unavailable => true,
        Code::DeadlineExceeded => !call.deadline().is_some_and(|d| d.is_expired()),
        _ => false,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use weir_proto::{
        common::{GenerationParams, Role},
        router::CompleteRequest,
    };

    use super::*;

    fn completion(session: &str, text: &str) -> Completion {
        Completion::from(CompleteRequest {
            model: "m".to_string(),
            messages: vec![Message {
                role: Role::User.into(),
                content: text.to_string(),
                ..Message::default()
            }],
            session_id: session.to_string(),
            ..CompleteRequest::default()
        })
    }

    #[test]
    fn the_history_budget_leaves_room_for_the_answer_and_the_new_messages() {
        let spec = ModelSpec {
            context_window: 600,
            max_output_tokens: 100,
            ..ModelSpec::default()
        };
        // "one two three": 3 tokens + 4 per message + 3 for the reply primer.
        let mut request = completion("s", "one two three");
        assert_eq!(history_budget(&spec, &request), 600 - 100 - 10);
        request.params = Some(GenerationParams {
            max_tokens: Some(20),
            ..GenerationParams::default()
        });
        assert_eq!(history_budget(&spec, &request), 600 - 20 - 10);
        let tiny = ModelSpec {
            context_window: 10,
            ..spec
        };
        assert_eq!(history_budget(&tiny, &request), 1);
    }

    #[tokio::test]
    async fn without_a_session_the_prompt_is_the_request() {
        let request = completion("", "hi");
        let mut history = Sessions::off().history(&request).unwrap();
        let mut notices = Vec::new();
        let prompt = history
            .prompt(
                &Call::default(),
                &request,
                "m",
                &ModelSpec::default(),
                &mut notices,
            )
            .await
            .unwrap();
        assert_eq!(prompt, request.messages);
        assert!(history.append(&request).is_none());
        assert!(notices.is_empty());
    }

    #[test]
    fn a_session_without_a_session_service_is_refused() {
        let error = Sessions::off()
            .history(&completion("s-1", "hi"))
            .unwrap_err();
        assert_eq!(error.code(), Code::FailedPrecondition);
        assert_eq!(error.reason(), SESSIONS_DISABLED);
        assert!(error.message().contains("router.session_url"));
    }

    /// A client stack to a closed port.
    fn closed_port() -> ClientStack {
        ClientStack::new(
            weir_mesh::client::lazy_channel("http://127.0.0.1:1").unwrap(),
            &Default::default(),
        )
    }

    #[tokio::test]
    async fn an_unreachable_session_service_degrades_to_no_history() {
        let sessions = Sessions::new(closed_port());
        let request = completion("s-1", "hi");
        let mut history = sessions.history(&request).unwrap();
        let mut notices = Vec::new();
        let spec = ModelSpec::default();
        let prompt = history
            .prompt(&Call::default(), &request, "m", &spec, &mut notices)
            .await
            .unwrap();
        assert_eq!(prompt, request.messages);
        assert_eq!(notices.len(), 1);
        assert_eq!(notices[0].reason, SESSION_UNAVAILABLE);
        assert!(history.append(&request).is_none(), "not appended");
        // Asked again (a fallback): no second call, no second notice.
        history
            .prompt(&Call::default(), &request, "m2", &spec, &mut notices)
            .await
            .unwrap();
        assert_eq!(notices.len(), 1);

        // With nothing new to say and no history, there is nothing to answer.
        let mut empty = completion("s-1", "x");
        empty.messages.clear();
        let mut history = sessions.history(&empty).unwrap();
        let error = history
            .prompt(&Call::default(), &empty, "m", &spec, &mut Vec::new())
            .await
            .unwrap_err();
        assert_eq!(error.code(), Code::Unavailable);
        assert_eq!(error.reason(), SESSION_UNAVAILABLE);
    }

    #[tokio::test]
    async fn appends_use_the_request_id_or_a_fresh_one() {
        let sessions = Sessions::new(closed_port());
        let mut request = completion("s-1", "hi");
        let history = sessions.history(&request).unwrap();
        let generated = history.append(&request).unwrap().request_id;
        assert!(generated.starts_with("rt-"), "{generated}");
        assert_ne!(generated, history.append(&request).unwrap().request_id);
        request.request_id = "client-1".to_string();
        let append = history.append(&request).unwrap();
        assert_eq!(append.request_id, "client-1");
        assert_eq!(append.messages, request.messages);
    }
}
