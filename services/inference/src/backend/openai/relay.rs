//! A streamed answer, relayed from the upstream's server-sent events as they arrive.
//!
//! [`Relay`] owns the upstream response body; the gRPC response stream is built directly on it,
//! so dropping the gRPC stream (the caller cancelled, or its deadline passed) drops the body and
//! closes the upstream connection. Each content delta becomes an [`Event::Delta`] at once. The
//! answer is complete at `data: [DONE]`, or when the body ends after a finish reason; a body that
//! ends before either, or breaks, is a cut (`STREAM_CUT`).

use std::{collections::VecDeque, time::Duration};

use bytes::Bytes;
use futures::{StreamExt, stream::BoxStream};
use tokio::time::Instant;
use weir_mesh::{ApiError, tokens};
use weir_proto::common::{FinishReason, Usage};

use super::{
    OpenAiModel, UpstreamError, api_error,
    error::{MAX_ERROR_MESSAGE_CHARS, chain, truncate},
    wire::{StreamChunk, finish_reason},
};
use crate::backend::{Call, Event, Finish, sse, usage};

/// A streamed answer being relayed from the upstream's event stream.
pub(super) struct Relay {
    body: BoxStream<'static, reqwest::Result<Bytes>>,
    parser: sse::SseParser,
    /// Events parsed and not yet yielded.
    pending: VecDeque<Result<Event, ApiError>>,
    /// Nothing more will be read (the answer is complete or failed).
    ended: bool,
    deadline: Option<Instant>,
    timeout: Duration,
    model: String,
    upstream_model: String,
    api_key_env: Option<String>,
    family: String,
    prompt_tokens: u32,
    received: Instant,
    first_token_at: Option<Instant>,
    /// Content chunks relayed so far.
    chunks: u64,
    /// The answer so far, kept only to estimate usage if the upstream reports none.
    text: String,
    finish_reason: Option<FinishReason>,
    usage: Option<Usage>,
}

impl Relay {
    /// Relays `body`, the event stream answering `call` to `model`; `deadline` is the model's own
    /// timeout when it comes before the caller's.
    pub(super) fn new(
        model: &OpenAiModel,
        call: &Call,
        body: BoxStream<'static, reqwest::Result<Bytes>>,
        deadline: Option<Instant>,
    ) -> Self {
        Self {
            body,
            parser: sse::SseParser::new(),
            pending: VecDeque::new(),
            ended: false,
            deadline,
            timeout: model.timeout,
            model: model.name.clone(),
            upstream_model: model.upstream_model.clone(),
            api_key_env: model.api_key_env.clone(),
            family: model.family.clone(),
            prompt_tokens: call.checked.prompt_tokens,
            received: call.received,
            first_token_at: None,
            chunks: 0,
            text: String::new(),
            finish_reason: None,
            usage: None,
        }
    }

    pub(super) async fn step(mut self) -> Option<(Result<Event, ApiError>, Self)> {
        loop {
            if let Some(event) = self.pending.pop_front() {
                return Some((event, self));
            }
            if self.ended {
                return None;
            }
            let next = match self.deadline {
                Some(at) => match tokio::time::timeout_at(at, self.body.next()).await {
                    Ok(next) => next,
                    Err(_) => {
                        self.fail(UpstreamError::Timeout(self.timeout));
                        continue;
                    }
                },
                None => self.body.next().await,
            };
            match next {
                Some(Ok(bytes)) => match self.parser.feed(&bytes) {
                    Ok(events) => {
                        for event in events {
                            self.handle(&event);
                        }
                    }
                    Err(e) => self.fail(UpstreamError::Malformed(e.to_string())),
                },
                Some(Err(e)) => self.fail(UpstreamError::Cut {
                    chunks: self.chunks,
                    detail: chain(&e),
                }),
                None => {
                    if let Some(event) = self.parser.finish() {
                        self.handle(&event);
                    }
                    if !self.ended {
                        if self.finish_reason.is_some() {
                            self.complete();
                        } else {
                            self.fail(UpstreamError::Cut {
                                chunks: self.chunks,
                                detail: "the upstream closed the stream before [DONE] or a \
                                         finish reason"
                                    .to_string(),
                            });
                        }
                    }
                }
            }
        }
    }

    fn handle(&mut self, event: &sse::SseEvent) {
        if self.ended {
            return;
        }
        let data = event.data.trim();
        if data == "[DONE]" {
            self.complete();
            return;
        }
        let chunk: StreamChunk = match serde_json::from_str(data) {
            Ok(chunk) => chunk,
            Err(e) => {
                self.fail(UpstreamError::Malformed(format!(
                    "stream event is not a chat completion chunk: {e}"
                )));
                return;
            }
        };
        if let Some(error) = chunk.error {
            let message = error
                .message
                .unwrap_or_else(|| "the upstream reported an error".to_string());
            self.fail(UpstreamError::StreamError(truncate(
                &message,
                MAX_ERROR_MESSAGE_CHARS,
            )));
            return;
        }
        if let Some(choice) = chunk.choices.into_iter().next() {
            if let Some(text) = choice.delta.and_then(|d| d.content)
                && !text.is_empty()
            {
                self.first_token_at.get_or_insert_with(Instant::now);
                self.text.push_str(&text);
                self.pending.push_back(Ok(Event::Delta {
                    text,
                    index: self.chunks,
                }));
                self.chunks += 1;
            }
            if let Some(reason) = choice.finish_reason {
                self.finish_reason = Some(finish_reason(Some(&reason)));
            }
        }
        if let Some(reported) = chunk.usage {
            self.usage = Some(reported.into_usage());
        }
    }

    /// The answer is complete: queue the final event and stop reading.
    fn complete(&mut self) {
        let usage = self.usage.take().unwrap_or_else(|| {
            usage(
                u64::from(self.prompt_tokens),
                u64::from(tokens::count_text(&self.family, &self.text)),
                0,
            )
        });
        let first = self.first_token_at.unwrap_or_else(Instant::now);
        self.pending.push_back(Ok(Event::Done(Finish {
            finish_reason: self.finish_reason.unwrap_or(FinishReason::Unspecified),
            usage,
            time_to_first_token: first.saturating_duration_since(self.received),
        })));
        self.ended = true;
    }

    fn fail(&mut self, error: UpstreamError) {
        tracing::debug!(model = %self.model, %error, "upstream stream failed");
        self.pending.push_back(Err(api_error(
            error,
            &self.model,
            &self.upstream_model,
            self.api_key_env.as_deref(),
        )));
        self.ended = true;
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    fn relay(chunks: Vec<&'static [u8]>) -> Relay {
        let body = futures::stream::iter(chunks.into_iter().map(|c| Ok(Bytes::from_static(c))));
        Relay {
            body: body.boxed(),
            parser: sse::SseParser::new(),
            pending: VecDeque::new(),
            ended: false,
            deadline: None,
            timeout: Duration::from_secs(60),
            model: "gpt".into(),
            upstream_model: "gpt-4o".into(),
            api_key_env: None,
            family: "o200k".into(),
            prompt_tokens: 8,
            received: Instant::now(),
            first_token_at: None,
            chunks: 0,
            text: String::new(),
            finish_reason: None,
            usage: None,
        }
    }

    async fn run(relay: Relay) -> Vec<Result<Event, ApiError>> {
        futures::stream::unfold(relay, Relay::step).collect().await
    }

    fn text_of(events: &[Result<Event, ApiError>]) -> String {
        events
            .iter()
            .filter_map(|e| match e {
                Ok(Event::Delta { text, .. }) => Some(text.as_str()),
                _ => None,
            })
            .collect()
    }

    #[tokio::test]
    async fn relays_deltas_and_reported_usage() {
        let events = run(relay(vec![
            b"data: {\"choices\":[{\"delta\":{\"role\":\"assistant\",\"content\":\"\"},\"finish_reason\":null}]}\n\n",
            b": keep-alive\n\ndata: {\"choices\":[{\"delta\":{\"content\":\"Hel\"}}]}\n\ndata: {\"choi",
            b"ces\":[{\"delta\":{\"content\":\"lo\"},\"finish_reason\":\"stop\"}]}\r\n\r\n",
            b"data: {\"choices\":[],\"usage\":{\"prompt_tokens\":12,\"completion_tokens\":2}}\n\ndata: [DONE]\n\n",
        ]))
        .await;
        assert_eq!(text_of(&events), "Hello");
        assert_eq!(
            events[..2]
                .iter()
                .map(|e| match e {
                    Ok(Event::Delta { index, .. }) => *index,
                    _ => 99,
                })
                .collect::<Vec<_>>(),
            [0, 1]
        );
        let Some(Ok(Event::Done(finish))) = events.last() else {
            panic!("no final event: {events:?}");
        };
        assert_eq!(finish.finish_reason, FinishReason::Stop);
        assert_eq!(finish.usage, usage(12, 2, 0));
        assert_eq!(events.len(), 3);
    }

    #[tokio::test]
    async fn estimates_usage_when_the_upstream_reports_none() {
        let events = run(relay(vec![
            b"data: {\"choices\":[{\"delta\":{\"content\":\"abcdefgh\"},\"finish_reason\":\"length\"}]}\n\n",
            b"data: [DONE]\n\n",
        ]))
        .await;
        let Some(Ok(Event::Done(finish))) = events.last() else {
            panic!("no final event: {events:?}");
        };
        assert_eq!(finish.finish_reason, FinishReason::Length);
        assert_eq!(finish.usage, usage(8, 2, 0));
    }

    #[tokio::test]
    async fn a_finish_reason_without_done_completes_but_silence_is_a_cut() {
        let events = run(relay(vec![
            b"data: {\"choices\":[{\"delta\":{\"content\":\"ok\"},\"finish_reason\":\"stop\"}]}\n\n",
        ]))
        .await;
        assert!(matches!(events.last(), Some(Ok(Event::Done(_)))));

        let events = run(relay(vec![
            b"data: {\"choices\":[{\"delta\":{\"content\":\"par\"}}]}\n\n",
            b"data: {\"choices\":[{\"delta\":{\"content\":\"tial\"}}]}\n\ndata: {\"cho",
        ]))
        .await;
        assert_eq!(text_of(&events), "partial");
        let Some(Err(error)) = events.last() else {
            panic!("a cut stream must fail: {events:?}");
        };
        assert_eq!(error.reason(), "STREAM_CUT");
    }

    #[tokio::test]
    async fn malformed_events_and_error_events_fail_the_stream() {
        let events = run(relay(vec![b"data: {not json}\n\n", b"data: [DONE]\n\n"])).await;
        assert_eq!(events.len(), 1);
        assert_eq!(
            events[0].as_ref().err().map(ApiError::reason),
            Some("UPSTREAM_MALFORMED_RESPONSE")
        );

        let events = run(relay(vec![
            b"data: {\"error\":{\"message\":\"The server is overloaded\"}}\n\n",
        ]))
        .await;
        let error = events[0].as_ref().err().unwrap();
        assert_eq!(error.reason(), "UPSTREAM_UNAVAILABLE");
        assert!(error.message().contains("overloaded"));
    }
}
