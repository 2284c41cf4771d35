//! A fake OpenAI-compatible upstream for tests: a real HTTP server, started on `127.0.0.1:0`, that
//! speaks the chat completions protocol (unary JSON and SSE streaming) and misbehaves on demand —
//! error statuses with `Retry-After` and a blamed `param`, hangs, slow answers, malformed bodies,
//! exact byte sequences split at awkward places, streams cut before `[DONE]`, endless streams.
//!
//! Each request gets the next [`Reply`] queued with [`Upstream::push`], or the default one when
//! the queue is empty. The server records what it received and counts streamed bodies started and
//! dropped, so tests can prove a cancellation reached the upstream.
//!
//! This crate is test support only. It depends on no Weir crate, so any Weir crate (including
//! `weir-inference`) can use it as a dev-dependency.
//!
//! ```no_run
//! # async fn example() -> std::io::Result<()> {
//! use weir_test_upstream::{Reply, Upstream};
//!
//! let upstream = Upstream::start(Reply::answer("Hello world")).await?;
//! upstream.push(Reply::error(503, "overloaded"));
//! // Point the client at `upstream.base_url()`: the first request gets a 503, later ones
//! // "Hello world".
//! # Ok(())
//! # }
//! ```

#![warn(missing_docs)]

use std::{
    collections::VecDeque,
    convert::Infallible,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use axum::{
    Json, Router,
    body::Body,
    extract::State,
    http::{HeaderMap, HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
    routing::{get, post},
    serve::ListenerExt as _,
};
pub use bytes::Bytes;
use futures::stream;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// The `usage` object of an answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Usage {
    /// `usage.prompt_tokens`.
    pub prompt_tokens: u64,
    /// `usage.completion_tokens` (`usage.total_tokens` is the sum of the two).
    pub completion_tokens: u64,
    /// `usage.prompt_tokens_details.cached_tokens`; `None` omits `prompt_tokens_details`.
    pub cached_tokens: Option<u64>,
}

/// How the upstream answers a request.
#[derive(Debug, Clone)]
pub enum Reply {
    /// A normal answer (`finish_reason: "stop"`). A unary request gets one `chat.completion`;
    /// a streamed one gets one SSE chunk per word (each word with its trailing space), a chunk
    /// with the finish reason, a chunk with the usage (if any), then `data: [DONE]`.
    Answer {
        /// The assistant's text.
        content: String,
        /// The reported usage; `None` means the upstream omits `usage` altogether.
        usage: Option<Usage>,
    },
    /// An HTTP error with an OpenAI-style body:
    /// `{"error": {"message", "type", "param", "code": null}}`, where `type` is
    /// `invalid_request_error` for 4xx statuses and `server_error` otherwise.
    Error {
        /// HTTP status.
        status: u16,
        /// `error.message`.
        message: String,
        /// `error.param`: the request parameter the upstream blames, if any.
        param: Option<String>,
        /// The `Retry-After` header, in seconds, if any.
        retry_after_secs: Option<u64>,
    },
    /// Exactly these bytes, sent as a streamed body in these pieces: for SSE split at awkward
    /// places, comment lines, `\r\n` line ends, streams cut before `[DONE]`, and so on.
    Raw {
        /// HTTP status.
        status: u16,
        /// The `Content-Type` header.
        content_type: String,
        /// The body, piece by piece; each piece is written (and flushed) on its own.
        chunks: Vec<Bytes>,
        /// Pause before every piece but the first.
        delay_between: Duration,
    },
    /// Never answers: the request hangs until the client gives up.
    Hang,
    /// A 200 `application/json` response whose body is not JSON.
    Malformed,
    /// A stream that sends one SSE chunk immediately and then one every `interval`, forever; the
    /// `n`th chunk (from 0) carries the text `" t{n}"`.
    EndlessStream {
        /// Time between chunks.
        interval: Duration,
    },
    /// The inner reply, after a pause (during which the response headers are not sent yet).
    Delayed(Duration, Box<Reply>),
}

impl Reply {
    /// A normal answer with the given text, reporting 10 prompt tokens and one completion token
    /// per word (no cached tokens).
    pub fn answer(content: &str) -> Self {
        Reply::Answer {
            content: content.to_string(),
            usage: Some(Usage {
                prompt_tokens: 10,
                completion_tokens: content.split_whitespace().count() as u64,
                cached_tokens: None,
            }),
        }
    }

    /// An HTTP error with the given status and message, no `param` and no `Retry-After`.
    pub fn error(status: u16, message: &str) -> Self {
        Reply::Error {
            status,
            message: message.to_string(),
            param: None,
            retry_after_secs: None,
        }
    }

    /// A 200 `text/event-stream` response made of exactly these pieces, sent without pauses.
    pub fn sse<I>(chunks: I) -> Self
    where
        I: IntoIterator,
        I::Item: Into<Bytes>,
    {
        Reply::Raw {
            status: 200,
            content_type: "text/event-stream".to_string(),
            chunks: chunks.into_iter().map(Into::into).collect(),
            delay_between: Duration::ZERO,
        }
    }

    /// This reply, after a pause of `by`.
    pub fn delayed(self, by: Duration) -> Self {
        Reply::Delayed(by, Box::new(self))
    }
}

/// Cuts `body` into pieces at the given byte offsets (ascending; offsets past the end are
/// ignored), e.g. to feed a client an event stream split inside `data:`, inside JSON, inside a
/// UTF-8 character or between `\r` and `\n`.
pub fn split_at(body: impl Into<Bytes>, offsets: &[usize]) -> Vec<Bytes> {
    let body = body.into();
    let mut pieces = Vec::new();
    let mut start = 0;
    for &offset in offsets {
        if offset > start && offset < body.len() {
            pieces.push(body.slice(start..offset));
            start = offset;
        }
    }
    pieces.push(body.slice(start..));
    pieces
}

/// How [`Upstream::start_with`] starts the server.
#[derive(Debug, Clone, Copy)]
pub struct Options {
    /// Where to listen; port 0 picks a free port (the default: `127.0.0.1:0`).
    pub addr: SocketAddr,
    /// Whether to keep every request's body and headers for [`Upstream::received`] and
    /// [`Upstream::received_headers`] (the default). A benchmark turns this off, so memory stays
    /// flat and requests do not contend on the records' locks.
    pub record: bool,
    /// Whether accepted connections set `TCP_NODELAY`, as real upstreams' servers do, so each
    /// streamed chunk leaves at once instead of waiting for the previous one's ACK (Nagle). Off
    /// by default (the tests' behaviour until this option existed); the benchmark's mock sets it.
    pub nodelay: bool,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            record: true,
            nodelay: false,
        }
    }
}

#[derive(Debug)]
struct Inner {
    record: bool,
    replies: Mutex<VecDeque<Reply>>,
    default: Mutex<Reply>,
    received: Mutex<Vec<Value>>,
    headers: Mutex<Vec<HeaderMap>>,
    requests: AtomicUsize,
    streams_started: AtomicUsize,
    streams_dropped: AtomicUsize,
}

/// A running fake upstream serving `POST /v1/chat/completions` (and `GET /v1/models`). Dropping it
/// stops the server.
#[derive(Debug)]
pub struct Upstream {
    addr: SocketAddr,
    inner: Arc<Inner>,
    stop: CancellationToken,
}

impl Upstream {
    /// Starts the server; every request gets `default` unless [`Upstream::push`] queued another.
    /// Must be called inside a Tokio runtime.
    pub async fn start(default: Reply) -> std::io::Result<Self> {
        Self::start_with(default, Options::default()).await
    }

    /// Starts the server as [`Upstream::start`] does, listening and recording as `options` say.
    pub async fn start_with(default: Reply, options: Options) -> std::io::Result<Self> {
        let inner = Arc::new(Inner {
            record: options.record,
            replies: Mutex::new(VecDeque::new()),
            default: Mutex::new(default),
            received: Mutex::new(Vec::new()),
            headers: Mutex::new(Vec::new()),
            requests: AtomicUsize::new(0),
            streams_started: AtomicUsize::new(0),
            streams_dropped: AtomicUsize::new(0),
        });
        let app = Router::new()
            .route("/v1/chat/completions", post(chat))
            .route("/v1/models", get(models))
            .with_state(inner.clone());
        let listener = TcpListener::bind(options.addr).await?;
        let addr = listener.local_addr()?;
        let stop = CancellationToken::new();
        let shutdown = stop.clone();
        let nodelay = options.nodelay;
        let listener = listener.tap_io(move |tcp| {
            if nodelay {
                // Best effort: a socket that refuses the option still serves.
                let _ = tcp.set_nodelay(true);
            }
        });
        tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async move { shutdown.cancelled().await })
                .await;
        });
        Ok(Self { addr, inner, stop })
    }

    /// The base URL clients append `/chat/completions` to (`http://127.0.0.1:<port>/v1`), as in
    /// `[models.<name>.openai] base_url`.
    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    /// Queues a reply for the next request; queued replies are used in order, before the default
    /// applies again.
    pub fn push(&self, reply: Reply) {
        lock(&self.inner.replies).push_back(reply);
    }

    /// Changes the default reply.
    pub fn set_default(&self, reply: Reply) {
        *lock(&self.inner.default) = reply;
    }

    /// Requests received so far, including any whose body was not JSON (those are answered 400
    /// without using a reply, and are not recorded by [`Upstream::received`]).
    pub fn requests(&self) -> usize {
        self.inner.requests.load(Ordering::SeqCst)
    }

    /// JSON bodies received so far, in order.
    pub fn received(&self) -> Vec<Value> {
        lock(&self.inner.received).clone()
    }

    /// Headers of the requests received so far; the `i`th belongs to the `i`th body of
    /// [`Upstream::received`].
    pub fn received_headers(&self) -> Vec<HeaderMap> {
        lock(&self.inner.headers).clone()
    }

    /// Streamed bodies started so far: streamed [`Reply::Answer`]s, [`Reply::Raw`] and
    /// [`Reply::EndlessStream`] replies.
    pub fn streams_started(&self) -> usize {
        self.inner.streams_started.load(Ordering::SeqCst)
    }

    /// Streamed bodies dropped so far — because they ended or because the client went away. An
    /// endless stream only ends that way, so this proves a cancellation reached the upstream.
    pub fn streams_dropped(&self) -> usize {
        self.inner.streams_dropped.load(Ordering::SeqCst)
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

async fn chat(State(inner): State<Arc<Inner>>, headers: HeaderMap, body: Bytes) -> Response {
    inner.requests.fetch_add(1, Ordering::SeqCst);
    let request: Value = match serde_json::from_slice(&body) {
        Ok(value) => value,
        Err(error) => {
            return (
                StatusCode::BAD_REQUEST,
                Json(json!({"error": {"message": format!("bad JSON: {error}")}})),
            )
                .into_response();
        }
    };
    if inner.record {
        // Recorded together, so the `i`th headers belong to the `i`th body.
        let mut received = lock(&inner.received);
        lock(&inner.headers).push(headers);
        received.push(request.clone());
    }
    let streaming = request["stream"].as_bool().unwrap_or(false);
    let model = request["model"].as_str().unwrap_or("unknown").to_string();
    let mut reply = lock(&inner.replies)
        .pop_front()
        .unwrap_or_else(|| lock(&inner.default).clone());
    while let Reply::Delayed(pause, then) = reply {
        tokio::time::sleep(pause).await;
        reply = *then;
    }
    match reply {
        Reply::Answer { content, usage } if streaming => {
            sse_answer(&inner, &model, &content, usage.as_ref())
        }
        Reply::Answer { content, usage } => {
            let mut completion = json!({
                "id": "chatcmpl-test",
                "object": "chat.completion",
                "model": model,
                "choices": [{
                    "index": 0,
                    "message": {"role": "assistant", "content": content},
                    "finish_reason": "stop"
                }],
            });
            if let Some(usage) = &usage {
                completion["usage"] = usage_json(usage);
            }
            Json(completion).into_response()
        }
        Reply::Error {
            status,
            message,
            param,
            retry_after_secs,
        } => {
            let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            let kind = if status.is_client_error() {
                "invalid_request_error"
            } else {
                "server_error"
            };
            let body = json!({
                "error": {"message": message, "type": kind, "param": param, "code": null}
            });
            let mut response = (status, Json(body)).into_response();
            if let Some(secs) = retry_after_secs
                && let Ok(value) = HeaderValue::from_str(&secs.to_string())
            {
                response.headers_mut().insert(header::RETRY_AFTER, value);
            }
            response
        }
        Reply::Raw {
            status,
            content_type,
            chunks,
            delay_between,
        } => {
            let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            let body = streamed_body(&inner, chunks, delay_between);
            Response::builder()
                .status(status)
                .header(header::CONTENT_TYPE, content_type)
                .body(body)
                .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
        }
        Reply::Hang => {
            futures::future::pending::<()>().await;
            StatusCode::INTERNAL_SERVER_ERROR.into_response()
        }
        Reply::Malformed => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "application/json")],
            "{not json",
        )
            .into_response(),
        Reply::EndlessStream { interval } => {
            let guard = StreamGuard::new(&inner);
            let chunks = stream::unfold((guard, 0u64), move |(guard, n)| {
                let model = model.clone();
                async move {
                    if n > 0 {
                        tokio::time::sleep(interval).await;
                    }
                    let chunk = delta_chunk(&model, &format!(" t{n}"));
                    Some((Ok::<_, Infallible>(chunk), (guard, n + 1)))
                }
            });
            sse_response(Body::from_stream(chunks))
        }
        // Unwrapped by the loop above.
        Reply::Delayed(..) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

/// `GET /v1/models`: the one model `mock`, in OpenAI's list shape. Clients that list models
/// before calling (proxies, health checks) get an answer; requests may name any model.
async fn models() -> Json<Value> {
    Json(json!({
        "object": "list",
        "data": [{"id": "mock", "object": "model", "created": 0, "owned_by": "weir-test-upstream"}]
    }))
}

/// Lives as long as a streamed body: counts it started when made and dropped when dropped.
struct StreamGuard(Arc<Inner>);

impl StreamGuard {
    fn new(inner: &Arc<Inner>) -> Self {
        inner.streams_started.fetch_add(1, Ordering::SeqCst);
        Self(inner.clone())
    }
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.0.streams_dropped.fetch_add(1, Ordering::SeqCst);
    }
}

fn usage_json(usage: &Usage) -> Value {
    let mut value = json!({
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.prompt_tokens + usage.completion_tokens
    });
    if let Some(cached) = usage.cached_tokens {
        value["prompt_tokens_details"] = json!({ "cached_tokens": cached });
    }
    value
}

fn delta_chunk(model: &str, text: &str) -> Bytes {
    let value = json!({
        "id": "chatcmpl-test",
        "object": "chat.completion.chunk",
        "model": model,
        "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": null}]
    });
    Bytes::from(format!("data: {value}\n\n"))
}

fn sse_answer(inner: &Arc<Inner>, model: &str, content: &str, usage: Option<&Usage>) -> Response {
    let mut chunks: Vec<Bytes> = content
        .split_inclusive(' ')
        .map(|word| delta_chunk(model, word))
        .collect();
    let finish = json!({
        "id": "chatcmpl-test",
        "object": "chat.completion.chunk",
        "model": model,
        "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]
    });
    chunks.push(Bytes::from(format!("data: {finish}\n\n")));
    if let Some(usage) = usage {
        let usage = json!({
            "id": "chatcmpl-test",
            "object": "chat.completion.chunk",
            "model": model,
            "choices": [],
            "usage": usage_json(usage)
        });
        chunks.push(Bytes::from(format!("data: {usage}\n\n")));
    }
    chunks.push(Bytes::from_static(b"data: [DONE]\n\n"));
    sse_response(streamed_body(inner, chunks, Duration::ZERO))
}

/// A body sending `chunks` one by one, pausing `delay_between` before each but the first.
fn streamed_body(inner: &Arc<Inner>, chunks: Vec<Bytes>, delay_between: Duration) -> Body {
    let guard = StreamGuard::new(inner);
    let body = stream::unfold(
        (guard, chunks.into_iter(), true),
        move |(guard, mut rest, first)| async move {
            let chunk = rest.next()?;
            if !first && !delay_between.is_zero() {
                tokio::time::sleep(delay_between).await;
            }
            Some((Ok::<_, Infallible>(chunk), (guard, rest, false)))
        },
    );
    Body::from_stream(body)
}

fn sse_response(body: Body) -> Response {
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "text/event-stream")
        .header(header::CACHE_CONTROL, "no-cache")
        .body(body)
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    #[test]
    fn split_at_cuts_at_the_offsets_and_ignores_the_rest() {
        let pieces = split_at("abcdef", &[0, 2, 2, 5, 9]);
        assert_eq!(pieces, ["ab", "cde", "f"]);
        assert_eq!(split_at("abc", &[]), ["abc"]);
    }

    #[test]
    fn usage_omits_what_is_none() {
        let usage = Usage {
            prompt_tokens: 9,
            completion_tokens: 3,
            cached_tokens: Some(2),
        };
        assert_eq!(
            usage_json(&usage),
            json!({"prompt_tokens": 9, "completion_tokens": 3, "total_tokens": 12,
                   "prompt_tokens_details": {"cached_tokens": 2}})
        );
        let usage = Usage {
            cached_tokens: None,
            ..usage
        };
        assert!(usage_json(&usage).get("prompt_tokens_details").is_none());
    }
}
