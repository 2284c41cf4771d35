//! Idempotent requests: a `request_id` sent again gets the first request's answer, without running
//! (or paying for) the model again.
//!
//! The records are `weir_mesh::idempotency`'s, keyed by (tenant, `request_id`) and shared by the
//! router's replicas through Redis (`[router.idempotency]`). What this module adds is what a
//! router answer *is*, so that it can be recorded and replayed:
//!
//! - The **fingerprint** of a request (`fingerprint`) is a hash of everything that changes its
//!   answer: the RPC, `model`, `messages`, `session_id`, `params` and `labels`. Not `request_id`
//!   itself, nor `criticality` (a retry may be sent at another priority and is still the same
//!   request). The same id with another fingerprint is refused (INVALID_ARGUMENT
//!   `IDEMPOTENCY_KEY_REUSED`).
//! - A **unary answer** is recorded whole; a **stream** as the list of its events, `start` to
//!   `done`, recorded when `done` is about to go out. Both are recorded before they reach the
//!   client, so an answer lost on the wire is replayed, never paid twice.
//! - **Errors**: the caller's own mistakes (INVALID_ARGUMENT, NOT_FOUND, FAILED_PRECONDITION,
//!   PERMISSION_DENIED, OUT_OF_RANGE, ALREADY_EXISTS, UNIMPLEMENTED) are recorded and replayed like
//!   answers: sending them again cannot change them. Every other failure (UNAVAILABLE,
//!   DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED, ABORTED, INTERNAL, a stream cut mid-way, a client that
//!   went away) releases the key, so the retry runs.
//! - A **replay** is the recorded answer with one notice added, [`IDEMPOTENT_REPLAY`] (on a
//!   stream, in its `done`); it costs nothing more. `cost_micros` still says what the answer cost
//!   the first time.

use std::pin::Pin;

use futures::{Stream, StreamExt, stream};
use prost::Message as _;
use tonic::{Code, Status};
use weir_mesh::idempotency::{Fingerprint, Guard};
use weir_proto::router::{
    CompleteRequest, CompleteResponse, CompleteStreamResponse, Notice,
    complete_stream_response::Event,
};

use crate::{relay::CompleteStream, request::Completion};

/// Notice reason: this answer is the recorded answer of an earlier request with the same
/// `request_id`; nothing ran and nothing was charged again.
pub const IDEMPOTENT_REPLAY: &str = "IDEMPOTENT_REPLAY";

/// The RPC a recorded answer belongs to (part of the fingerprint).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Rpc {
    /// `Complete`.
    Complete,
    /// `CompleteStream`.
    CompleteStream,
}

impl Rpc {
    fn name(self) -> &'static str {
        match self {
            Rpc::Complete => "weir.router.v1.RouterService/Complete",
            Rpc::CompleteStream => "weir.router.v1.RouterService/CompleteStream",
        }
    }
}

/// The fingerprint of `completion` sent to `rpc` (see the module doc).
pub(crate) fn fingerprint(rpc: Rpc, completion: &Completion) -> Fingerprint {
    let body = CompleteRequest {
        model: completion.model.clone(),
        messages: completion.messages.clone(),
        session_id: completion.session_id.clone(),
        params: completion.params.clone(),
        ..CompleteRequest::default()
    }
    .encode_to_vec();
    // Labels are a map: sorted, so their order on the wire does not matter.
    let mut labels: Vec<_> = completion.labels.iter().collect();
    labels.sort();
    let labels: Vec<u8> = labels
        .into_iter()
        .flat_map(|(k, v)| [k.as_bytes(), b"\0", v.as_bytes(), b"\0"].concat())
        .collect();
    Fingerprint::of(&[rpc.name().as_bytes(), &body, &labels])
}

/// What is recorded for a request: its answer, or the caller error it got.
#[derive(Clone, PartialEq, prost::Message)]
struct Recorded {
    /// A unary answer.
    #[prost(message, optional, tag = "1")]
    response: Option<CompleteResponse>,
    /// A stream's events, `start` to `done`.
    #[prost(message, repeated, tag = "2")]
    events: Vec<CompleteStreamResponse>,
    /// A recorded error's code (0 for an answer).
    #[prost(int32, tag = "3")]
    code: i32,
    /// A recorded error's message.
    #[prost(string, tag = "4")]
    message: String,
    /// A recorded error's `google.rpc.Status` details.
    #[prost(bytes = "vec", tag = "5")]
    details: Vec<u8>,
}

/// Whether a failure is the caller's own mistake, which is recorded and replayed (see the module
/// doc).
fn is_callers_mistake(code: Code) -> bool {
    matches!(
        code,
        Code::InvalidArgument
            | Code::NotFound
            | Code::FailedPrecondition
            | Code::PermissionDenied
            | Code::OutOfRange
            | Code::AlreadyExists
            | Code::Unimplemented
    )
}

fn recorded_error(status: &Status) -> Recorded {
    Recorded {
        code: status.code() as i32,
        message: status.message().to_string(),
        details: status.details().to_vec(),
        ..Recorded::default()
    }
}

/// Records the outcome of a unary request before it is sent: its answer, or its caller error;
/// any other failure releases the key.
pub(crate) async fn record_unary(guard: Guard, result: &Result<CompleteResponse, Status>) {
    let recorded = match result {
        Ok(response) => Recorded {
            response: Some(response.clone()),
            ..Recorded::default()
        },
        Err(status) if is_callers_mistake(status.code()) => recorded_error(status),
        Err(_) => return guard.release().await,
    };
    complete(guard, &recorded).await;
}

/// Records a caller error of a stream that failed before its first event; any other failure
/// releases the key.
pub(crate) async fn record_stream_error(guard: Guard, status: &Status) {
    if is_callers_mistake(status.code()) {
        complete(guard, &recorded_error(status)).await;
    } else {
        guard.release().await;
    }
}

async fn complete(guard: Guard, recorded: &Recorded) {
    match guard.complete(&recorded.encode_to_vec()).await {
        Ok(true) => {}
        Ok(false) => tracing::warn!("idempotency lease expired before the answer was recorded"),
        // The answer is still sent; a retry of it would run again.
        Err(error) => tracing::warn!(reason = error.reason(), "answer not recorded"),
    }
}

/// The recorded outcome of an earlier unary request.
pub(crate) fn unary(bytes: &[u8]) -> Result<CompleteResponse, Status> {
    let recorded = decode(bytes)?;
    if recorded.code != 0 {
        return Err(replayed_error(recorded));
    }
    let mut response = recorded.response.ok_or_else(|| {
        Status::failed_precondition(
            "request_id was used for a streamed request; send it to CompleteStream, or use a new id",
        )
    })?;
    response.notices.push(replay_notice());
    Ok(response)
}

/// The recorded outcome of an earlier stream, as a stream.
pub(crate) fn stream(bytes: &[u8]) -> Result<CompleteStream, Status> {
    let recorded = decode(bytes)?;
    if recorded.code != 0 {
        return Err(replayed_error(recorded));
    }
    let mut events = recorded.events;
    if events.is_empty() {
        return Err(Status::failed_precondition(
            "request_id was used for a unary request; send it to Complete, or use a new id",
        ));
    }
    if let Some(Event::Done(done)) = events.last_mut().and_then(|e| e.event.as_mut()) {
        done.notices.push(replay_notice());
    }
    Ok(Box::pin(stream::iter(events.into_iter().map(Ok))))
}

/// `upstream`, recording its events: when `done` is about to go out, the whole stream is recorded
/// first; if the stream fails or is dropped before `done`, the key is released.
pub(crate) fn recording(upstream: CompleteStream, guard: Guard) -> CompleteStream {
    struct State {
        upstream: CompleteStream,
        guard: Option<Guard>,
        events: Vec<CompleteStreamResponse>,
    }
    let state = State {
        upstream,
        guard: Some(guard),
        events: Vec::new(),
    };
    let recorded = stream::unfold(state, |mut state| async move {
        let item = state.upstream.next().await?;
        match &item {
            Ok(event) => {
                state.events.push(event.clone());
                if matches!(event.event, Some(Event::Done(_)))
                    && let Some(guard) = state.guard.take()
                {
                    let recorded = Recorded {
                        events: std::mem::take(&mut state.events),
                        ..Recorded::default()
                    };
                    complete(guard, &recorded).await;
                }
            }
            Err(_) => {
                // Cut or failed mid-way: the retry runs (and the partial work was charged).
                if let Some(guard) = state.guard.take() {
                    guard.release().await;
                }
            }
        }
        Some((item, state))
    });
    Box::pin(recorded) as Pin<Box<dyn Stream<Item = _> + Send>>
}

/// A unary answer in the recorded form, for other stores of answers (the response cache).
pub(crate) fn encode_answer(response: &CompleteResponse) -> Vec<u8> {
    Recorded {
        response: Some(response.clone()),
        ..Recorded::default()
    }
    .encode_to_vec()
}

/// A stream's events, `start` to `done`, in the recorded form (see [`encode_answer`]).
pub(crate) fn encode_events(events: Vec<CompleteStreamResponse>) -> Vec<u8> {
    Recorded {
        events,
        ..Recorded::default()
    }
    .encode_to_vec()
}

/// The unary answer of a record made by [`encode_answer`], as it was recorded (no notice
/// added); `None` for anything else.
pub(crate) fn decode_answer(bytes: &[u8]) -> Option<CompleteResponse> {
    Recorded::decode(bytes).ok()?.response
}

/// The events of a record made by [`encode_events`], as they were recorded; `None` for anything
/// else.
pub(crate) fn decode_events(bytes: &[u8]) -> Option<Vec<CompleteStreamResponse>> {
    Some(Recorded::decode(bytes).ok()?.events).filter(|events| !events.is_empty())
}

fn decode(bytes: &[u8]) -> Result<Recorded, Status> {
    Recorded::decode(bytes).map_err(|error| {
        Status::internal(format!("the recorded answer could not be read: {error}"))
    })
}

fn replayed_error(recorded: Recorded) -> Status {
    Status::with_details(
        Code::from_i32(recorded.code),
        recorded.message,
        recorded.details.into(),
    )
}

fn replay_notice() -> Notice {
    Notice {
        reason: IDEMPOTENT_REPLAY.to_string(),
        message: "this is the recorded answer of an earlier request with the same request_id; \
                  nothing was run or charged again"
            .to_string(),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use std::collections::HashMap;

    use weir_proto::common::{GenerationParams, Message, Role};

    use super::*;

    fn completion() -> Completion {
        Completion::from(CompleteRequest {
            model: "auto".to_string(),
            messages: vec![Message {
                role: Role::User.into(),
                content: "hi".to_string(),
                ..Message::default()
            }],
            labels: HashMap::from([
                ("a".to_string(), "1".to_string()),
                ("b".to_string(), "2".to_string()),
            ]),
            request_id: "r-1".to_string(),
            ..CompleteRequest::default()
        })
    }

    #[test]
    fn the_fingerprint_covers_what_changes_the_answer_only() {
        let base = fingerprint(Rpc::Complete, &completion());
        let mut same = completion();
        same.request_id = "r-2".to_string();
        same.criticality = 1;
        assert_eq!(
            fingerprint(Rpc::Complete, &same),
            base,
            "id and criticality do not count"
        );
        let mut other = completion();
        other.messages[0].content = "ho".to_string();
        assert_ne!(fingerprint(Rpc::Complete, &other), base);
        let mut other = completion();
        other.params = Some(GenerationParams {
            max_tokens: Some(5),
            ..GenerationParams::default()
        });
        assert_ne!(fingerprint(Rpc::Complete, &other), base);
        let mut other = completion();
        other.labels.insert("c".to_string(), "3".to_string());
        assert_ne!(fingerprint(Rpc::Complete, &other), base);
        assert_ne!(fingerprint(Rpc::CompleteStream, &completion()), base);
    }

    #[test]
    fn caller_errors_replay_with_their_details_and_answers_with_a_notice() {
        let status = Status::from(weir_mesh::ApiError::not_found("session", "s-1"));
        let bytes = recorded_error(&status).encode_to_vec();
        let replayed = unary(&bytes).unwrap_err();
        assert_eq!(replayed.code(), Code::NotFound);
        assert_eq!(replayed.details(), status.details());

        let answer = CompleteResponse {
            model: "m".to_string(),
            cost_micros: 28,
            ..CompleteResponse::default()
        };
        let bytes = Recorded {
            response: Some(answer.clone()),
            ..Recorded::default()
        }
        .encode_to_vec();
        let replayed = unary(&bytes).unwrap();
        assert_eq!(replayed.cost_micros, 28);
        assert_eq!(replayed.notices.len(), 1);
        assert_eq!(replayed.notices[0].reason, IDEMPOTENT_REPLAY);
        assert!(
            stream(&bytes).is_err(),
            "a unary answer is not replayed as a stream"
        );
    }

    #[test]
    fn transient_failures_are_not_recorded() {
        for code in [
            Code::Unavailable,
            Code::DeadlineExceeded,
            Code::ResourceExhausted,
            Code::Aborted,
            Code::Internal,
            Code::Cancelled,
        ] {
            assert!(!is_callers_mistake(code), "{code:?}");
        }
    }
}
