//! A real HTTP server, started by a test on `127.0.0.1:0`, that speaks the OpenAI chat completions
//! protocol (unary JSON and SSE streaming) and misbehaves on demand: error statuses with
//! Retry-After, hangs, malformed bodies, endless streams. It records what it received and notices
//! when a client walks away from a stream, so tests can prove cancellation reaches the upstream.

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
    body::{Body, Bytes},
    extract::State,
    http::{HeaderMap, HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
    routing::post,
};
use futures::stream;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// How the upstream answers the next requests.
#[derive(Debug, Clone)]
pub enum Reply {
    /// A normal answer; streamed requests get it as one SSE chunk per word.
    Answer {
        /// The assistant's text.
        content: String,
        /// Reported prompt tokens.
        prompt_tokens: i64,
        /// Reported completion tokens.
        completion_tokens: i64,
    },
    /// An HTTP error with an OpenAI-style error body.
    Error {
        /// HTTP status.
        status: u16,
        /// `error.message` in the body.
        message: String,
        /// Retry-After header (seconds), if any.
        retry_after_secs: Option<u64>,
    },
    /// Never answers (the request hangs until the client gives up).
    Hang,
    /// A 200 with a body that is not JSON.
    Malformed,
    /// A stream that sends one chunk every `interval` and never ends.
    EndlessStream {
        /// Time between chunks.
        interval: Duration,
    },
}

impl Reply {
    /// A normal answer with the given text (usage: 10 prompt tokens, one token per word).
    pub fn answer(content: &str) -> Self {
        Reply::Answer {
            content: content.to_string(),
            prompt_tokens: 10,
            completion_tokens: content.split_whitespace().count() as i64,
        }
    }
}

#[derive(Debug)]
struct Inner {
    replies: Mutex<VecDeque<Reply>>,
    default: Mutex<Reply>,
    received: Mutex<Vec<Value>>,
    headers: Mutex<Vec<HeaderMap>>,
    requests: AtomicUsize,
    streams_dropped: AtomicUsize,
}

/// A running fake upstream. Dropping it stops the server.
#[derive(Debug)]
pub struct Upstream {
    addr: SocketAddr,
    inner: Arc<Inner>,
    stop: CancellationToken,
}

impl Upstream {
    /// Starts the server; every request gets `default` unless [`Upstream::push`] queued another.
    pub async fn start(default: Reply) -> std::io::Result<Self> {
        let inner = Arc::new(Inner {
            replies: Mutex::new(VecDeque::new()),
            default: Mutex::new(default),
            received: Mutex::new(Vec::new()),
            headers: Mutex::new(Vec::new()),
            requests: AtomicUsize::new(0),
            streams_dropped: AtomicUsize::new(0),
        });
        let app = Router::new()
            .route("/v1/chat/completions", post(chat))
            .with_state(inner.clone());
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let stop = CancellationToken::new();
        let shutdown = stop.clone();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async move { shutdown.cancelled().await })
                .await;
        });
        Ok(Self { addr, inner, stop })
    }

    /// Base URL to put in `[models.<name>.openai] base_url`.
    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    /// Queues a reply for the next request (before the default applies again).
    pub fn push(&self, reply: Reply) {
        lock(&self.inner.replies).push_back(reply);
    }

    /// Changes the default reply.
    pub fn set_default(&self, reply: Reply) {
        *lock(&self.inner.default) = reply;
    }

    /// Requests received so far.
    pub fn requests(&self) -> usize {
        self.inner.requests.load(Ordering::SeqCst)
    }

    /// JSON bodies received so far.
    pub fn received(&self) -> Vec<Value> {
        lock(&self.inner.received).clone()
    }

    /// Headers of the requests received so far.
    pub fn received_headers(&self) -> Vec<HeaderMap> {
        lock(&self.inner.headers).clone()
    }

    /// Streamed responses whose client went away (or that ended) — the body was dropped.
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
    lock(&inner.headers).push(headers);
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
    lock(&inner.received).push(request.clone());
    let streaming = request["stream"].as_bool().unwrap_or(false);
    let model = request["model"].as_str().unwrap_or("unknown").to_string();
    let reply = lock(&inner.replies)
        .pop_front()
        .unwrap_or_else(|| lock(&inner.default).clone());
    match reply {
        Reply::Answer {
            content,
            prompt_tokens,
            completion_tokens,
        } => {
            if streaming {
                sse_answer(&inner, &model, &content, prompt_tokens, completion_tokens)
            } else {
                Json(json!({
                    "id": "chatcmpl-test",
                    "object": "chat.completion",
                    "model": model,
                    "choices": [{
                        "index": 0,
                        "message": {"role": "assistant", "content": content},
                        "finish_reason": "stop"
                    }],
                    "usage": {
                        "prompt_tokens": prompt_tokens,
                        "completion_tokens": completion_tokens,
                        "total_tokens": prompt_tokens + completion_tokens
                    }
                }))
                .into_response()
            }
        }
        Reply::Error {
            status,
            message,
            retry_after_secs,
        } => {
            let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            let mut response = (
                status,
                Json(json!({"error": {"message": message, "type": "test_error"}})),
            )
                .into_response();
            if let Some(secs) = retry_after_secs
                && let Ok(value) = HeaderValue::from_str(&secs.to_string())
            {
                response.headers_mut().insert(header::RETRY_AFTER, value);
            }
            response
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
            let guard = DropGuard(inner.clone());
            let model_name = model.clone();
            let chunks = stream::unfold((guard, 0u64), move |(guard, n)| {
                let model = model_name.clone();
                async move {
                    if n > 0 {
                        tokio::time::sleep(interval).await;
                    }
                    let chunk = delta_chunk(&model, &format!("tok{n} "));
                    Some((Ok::<_, Infallible>(chunk), (guard, n + 1)))
                }
            });
            sse_response(Body::from_stream(chunks))
        }
    }
}

/// Counts a dropped stream body when the response stream is dropped.
struct DropGuard(Arc<Inner>);

impl Drop for DropGuard {
    fn drop(&mut self) {
        self.0.streams_dropped.fetch_add(1, Ordering::SeqCst);
    }
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

fn sse_answer(
    inner: &Arc<Inner>,
    model: &str,
    content: &str,
    prompt_tokens: i64,
    completion_tokens: i64,
) -> Response {
    let mut chunks: Vec<Bytes> = Vec::new();
    let words: Vec<&str> = content.split_inclusive(' ').collect();
    for word in words {
        chunks.push(delta_chunk(model, word));
    }
    let finish = json!({
        "id": "chatcmpl-test",
        "object": "chat.completion.chunk",
        "model": model,
        "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]
    });
    chunks.push(Bytes::from(format!("data: {finish}\n\n")));
    let usage = json!({
        "id": "chatcmpl-test",
        "object": "chat.completion.chunk",
        "model": model,
        "choices": [],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens
        }
    });
    chunks.push(Bytes::from(format!("data: {usage}\n\n")));
    chunks.push(Bytes::from_static(b"data: [DONE]\n\n"));
    let guard = DropGuard(inner.clone());
    let body = stream::unfold(
        (guard, chunks.into_iter()),
        |(guard, mut rest)| async move {
            rest.next()
                .map(|chunk| (Ok::<_, Infallible>(chunk), (guard, rest)))
        },
    );
    sse_response(Body::from_stream(body))
}

fn sse_response(body: Body) -> Response {
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "text/event-stream")
        .header(header::CACHE_CONTROL, "no-cache")
        .body(body)
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}
