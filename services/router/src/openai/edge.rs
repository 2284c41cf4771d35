//! The HTTP edge: OpenAI's chat API on a port of its own, in front of the router's gRPC API.
//!
//! ```toml
//! [router.http]
//! listen = "127.0.0.1:50057"   # WEIR_ROUTER__HTTP__LISTEN; "" turns the edge off
//! max_file_bytes = 104857600   # largest POST /v1/files upload (100 MiB); larger: 413
//! file_retention = "30d"       # how long an uploaded file is kept
//! ```
//!
//! A thin gateway, not a second implementation: each `POST /v1/chat/completions` becomes one
//! gRPC call (`Complete`, or `CompleteStream` with `stream: true`), carrying the caller's
//! `Authorization` header, into the router server's own stack, every layer included, handed to
//! the edge in the process ([`weir_mesh::local::LocalChannel`]) so the call skips only the
//! loopback socket. So authentication, admission, rate limits, deadlines, idempotency, sessions,
//! budgets and review apply exactly as they do to gRPC callers, and an answer costs the same by
//! either door. docs/http-edge.md has the header
//! and error tables and the answer to a blocking review.
//!
//! The edge also serves OpenAI's Files and Batch APIs onto Weir's batches ([`super::files`],
//! [`super::batches`]): uploaded files live in the router's job store, batch calls go into the
//! router's stack like chat completions.
//!
//! | HTTP | gRPC |
//! |---|---|
//! | `Authorization: Bearer <key>` | `authorization` metadata |
//! | `Idempotency-Key` | `request_id` |
//! | `weir-session-id` | `session_id` |
//! | `weir-criticality` | `weir-criticality` metadata |
//! | `traceparent`, `tracestate` | the same metadata |
//!
//! A streamed answer is written chunk by chunk as the router relays tokens. When the HTTP client
//! goes away, the response body is dropped, which drops the gRPC stream, which cancels the model
//! call upstream. A stream that fails after it started ends with `data: {"error": ...}` and no
//! `data: [DONE]`, so a client never mistakes a cut answer for a whole one.

use std::{
    convert::Infallible,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use axum::{
    Router,
    body::Bytes,
    extract::{DefaultBodyLimit, State, rejection::BytesRejection},
    http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Uri, header},
    response::{
        IntoResponse, Response,
        sse::{Event, KeepAlive, Sse},
    },
    routing::{get, post},
};
use futures::{Stream, stream};
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::{Status, Streaming, metadata::MetadataValue};
use weir_mesh::{
    auth::Authenticator, catalog::Catalog, config::ConfigError, local::LocalChannel, tenant::Tenant,
};
use weir_proto::router::{
    CompleteResponse, CompleteStreamResponse, ReviewStatus,
    complete_stream_response::{Event as StreamEvent, Start},
    router_service_client::RouterServiceClient,
};

use super::{
    convert::{self, ChunkWriter},
    errors::{self, OpenAiError},
    types::{ChatCompletionRequest, ErrorBody, ModelList},
};
use crate::{Config, RouteTable, jobs::JobStore};

/// Default address of the HTTP edge.
pub const DEFAULT_LISTEN: SocketAddr =
    SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::new(127, 0, 0, 1), 50057));
/// The header whose value becomes the request's `request_id` (idempotency key).
pub const IDEMPOTENCY_KEY: &str = "idempotency-key";
/// The header whose value becomes the request's `session_id`.
pub const SESSION_ID: &str = "weir-session-id";
/// The header giving the request's deadline, in milliseconds (sent on as `grpc-timeout`).
pub const TIMEOUT_MS: &str = "weir-timeout-ms";
/// The header carrying the answer's trace id.
pub const TRACE_ID: &str = "weir-trace-id";
/// Headers passed on to the router as gRPC metadata, unchanged.
const FORWARDED: [&str; 6] = [
    weir_mesh::metadata::AUTHORIZATION,
    weir_mesh::metadata::CRITICALITY,
    weir_mesh::metadata::CACHE_CONTROL,
    weir_mesh::metadata::QUALITY,
    "traceparent",
    "tracestate",
];
/// Largest request body: the router's gRPC server decodes messages up to 4 MiB (tonic's default),
/// so a larger body could never be served; it is refused here with 413 instead.
pub const MAX_BODY_BYTES: usize = 4 * 1024 * 1024;
/// How often an idle stream sends an SSE comment, so proxies keep it open.
const KEEP_ALIVE: Duration = Duration::from_secs(15);

/// The `[router.http]` table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpConfig {
    /// Address of the HTTP edge (default [`DEFAULT_LISTEN`]; `WEIR_ROUTER__HTTP__LISTEN`); `""`
    /// turns it off.
    #[serde(with = "weir_mesh::config::optional_addr")]
    pub listen: Option<SocketAddr>,
    /// Largest file `POST /v1/files` accepts (default [`DEFAULT_MAX_FILE_BYTES`], 100 MiB);
    /// larger: 413.
    pub max_file_bytes: usize,
    /// How long an uploaded file is kept (default 30 days).
    #[serde(with = "humantime_serde")]
    pub file_retention: Duration,
}

/// Default of `[router.http] max_file_bytes`: 100 MiB.
pub const DEFAULT_MAX_FILE_BYTES: usize = 100 * 1024 * 1024;
/// Default of `[router.http] file_retention`: 30 days.
pub const DEFAULT_FILE_RETENTION: Duration = Duration::from_secs(30 * 24 * 3600);

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            listen: Some(DEFAULT_LISTEN),
            max_file_bytes: DEFAULT_MAX_FILE_BYTES,
            file_retention: DEFAULT_FILE_RETENTION,
        }
    }
}

/// The names `GET /v1/models` lists: the route aliases (`auto` first when present), then the
/// catalog's models, each once.
pub fn model_ids(config: &Config, catalog: Arc<Catalog>) -> Result<Vec<String>, ConfigError> {
    let routes = RouteTable::new(config, catalog)?;
    let mut ids: Vec<String> = routes.routes().map(|r| r.alias().to_string()).collect();
    ids.sort_by_key(|alias| alias != crate::config::DEFAULT_ROUTE);
    for (name, _) in routes.catalog().iter() {
        if !ids.iter().any(|id| id == name) {
            ids.push(name.to_string());
        }
    }
    Ok(ids)
}

/// What the edge's handlers share.
#[derive(Debug, Clone)]
pub(super) struct Edge {
    /// The router this edge fronts: its whole gRPC stack, in the process.
    pub(super) router: RouterServiceClient<LocalChannel>,
    /// The answer of `GET /v1/models`, serialized once.
    models: Bytes,
    /// Checks the key of calls that make no gRPC call (`GET /v1/models`, the files) as the
    /// router would.
    authenticator: Authenticator,
    /// Where uploaded files are kept: the router's job store (None when jobs are off).
    pub(super) files: Option<JobStore>,
    /// The `[router.http]` table (file size cap and retention).
    pub(super) config: HttpConfig,
}

impl Edge {
    /// The tenant of the caller's key, checked by the same `Authenticator` as the router's.
    pub(super) fn tenant(
        &self,
        headers: &HeaderMap,
        path: &'static str,
    ) -> Result<Tenant, OpenAiError> {
        let mut request = http::Request::new(());
        *request.uri_mut() = Uri::from_static(path);
        if let Some(value) = headers.get(header::AUTHORIZATION) {
            request
                .headers_mut()
                .insert(header::AUTHORIZATION, value.clone());
        }
        self.authenticator
            .authenticate(&mut request)
            .map(|caller| caller.tenant)
            .map_err(|error| errors::from_status(&Status::from(error)))
    }
}

/// The edge's routes over `router`, the router server's stack in the process
/// ([`weir_mesh::server::GrpcServer::local_channel`]), listing `models`, checking keys of calls
/// that make no gRPC call with `authenticator`, keeping uploaded files in `files` (the router's
/// job store; None when jobs are off).
pub fn app(
    router: LocalChannel,
    models: Vec<String>,
    authenticator: Authenticator,
    files: Option<JobStore>,
    config: HttpConfig,
) -> std::io::Result<Router> {
    let models = serde_json::to_vec(&ModelList::new(models)).map_err(std::io::Error::other)?;
    // A multipart upload carries a little more than the file itself.
    let upload_limit = config.max_file_bytes.saturating_add(64 * 1024);
    let edge = Edge {
        router: RouterServiceClient::new(router),
        models: Bytes::from(models),
        authenticator,
        files,
        config,
    };
    let uploads = Router::new()
        .route(
            "/v1/files",
            post(super::files::upload).get(super::files::list),
        )
        .layer(DefaultBodyLimit::max(upload_limit));
    Ok(Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/models", get(list_models))
        .route(
            "/v1/files/{id}",
            get(super::files::retrieve).delete(super::files::delete),
        )
        .route("/v1/files/{id}/content", get(super::files::content))
        .route(
            "/v1/batches",
            post(super::batches::create).get(super::batches::list),
        )
        .route("/v1/batches/{id}", get(super::batches::retrieve))
        .route("/v1/batches/{id}/cancel", post(super::batches::cancel))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .merge(uploads)
        .method_not_allowed_fallback(wrong_method)
        .fallback(unknown_path)
        .with_state(edge))
}

/// Serves the edge on `listener` until `shutdown` is cancelled (see [`app`]).
pub async fn serve(
    listener: TcpListener,
    router: LocalChannel,
    models: Vec<String>,
    authenticator: Authenticator,
    files: Option<JobStore>,
    config: HttpConfig,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let app = app(router, models, authenticator, files, config)?;
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, "serving the OpenAI-compatible HTTP edge");
    }
    // Without TCP_NODELAY, each small SSE write after a stream's first waits for the previous
    // one's acknowledgement (Nagle's algorithm): tokens would arrive late and in clumps.
    let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
        if let Err(error) = tcp.set_nodelay(true) {
            tracing::debug!(%error, "TCP_NODELAY could not be set");
        }
    });
    axum::serve(listener, app)
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
}

impl IntoResponse for OpenAiError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let mut response = json(status, &self.body);
        let headers = response.headers_mut();
        if let Some(secs) = self.retry_after_secs() {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        if let Some(ms) = self.retry_after_ms()
            && let Ok(value) = HeaderValue::from_str(&ms.to_string())
        {
            headers.insert(HeaderName::from_static("retry-after-ms"), value);
        }
        if let Some(retry) = self.should_retry {
            headers.insert(
                HeaderName::from_static("x-should-retry"),
                HeaderValue::from_static(if retry { "true" } else { "false" }),
            );
        }
        response
    }
}

pub(super) fn json(status: StatusCode, body: &impl Serialize) -> Response {
    match serde_json::to_vec(body) {
        Ok(bytes) => (
            status,
            [(header::CONTENT_TYPE, "application/json")],
            Bytes::from(bytes),
        )
            .into_response(),
        Err(error) => (StatusCode::INTERNAL_SERVER_ERROR, error.to_string()).into_response(),
    }
}

async fn unknown_path(method: Method, uri: Uri) -> OpenAiError {
    OpenAiError::unknown_path(method.as_str(), uri.path())
}

/// A known path with a method it does not take: 405, in OpenAI's error shape.
async fn wrong_method(method: Method, uri: Uri) -> OpenAiError {
    let mut error =
        OpenAiError::invalid_request(None, format!("{} does not take {method}", uri.path()));
    error.status = 405;
    error.body.error.code = Some("METHOD_NOT_ALLOWED".to_string());
    error
}

/// `GET /v1/models`.
async fn list_models(State(edge): State<Edge>, headers: HeaderMap) -> Response {
    if let Err(error) = edge.tenant(&headers, "/v1/models") {
        return error.into_response();
    }
    (
        [(header::CONTENT_TYPE, "application/json")],
        edge.models.clone(),
    )
        .into_response()
}

/// `POST /v1/chat/completions`.
async fn chat_completions(
    State(edge): State<Edge>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    match run(edge, headers, body).await {
        Ok(response) => response,
        Err(error) => error.into_response(),
    }
}

async fn run(
    edge: Edge,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, OpenAiError> {
    let body = body.map_err(|rejection| {
        let mut error = OpenAiError::invalid_request(None, rejection.body_text());
        error.status = rejection.status().as_u16();
        error
    })?;
    let request: ChatCompletionRequest = serde_json::from_slice(&body).map_err(|error| {
        OpenAiError::invalid_request(None, format!("the body is not a chat request: {error}"))
    })?;
    let (stream, include_usage) = (request.is_stream(), request.include_usage());
    let mut message = convert::complete_request(request)
        .map_err(|error| OpenAiError::invalid_request(Some(&error.param), error.message))?;
    message.request_id = header_text(&headers, IDEMPOTENCY_KEY)?;
    message.session_id = header_text(&headers, SESSION_ID)?;
    // A replay keeps the first answer's id.
    let id = (!message.request_id.is_empty()).then(|| convert::keyed_id(&message.request_id));
    let mut router = edge.router;
    if stream {
        let request = grpc_request(&headers, convert::stream_request(message))?;
        let events = router
            .complete_stream(request)
            .await
            .map_err(|status| errors::from_status(&status))?
            .into_inner();
        stream_response(events, include_usage, id).await
    } else {
        let request = grpc_request(&headers, message)?;
        let answer = router
            .complete(request)
            .await
            .map_err(|status| errors::from_status(&status))?
            .into_inner();
        Ok(completion_response(answer, id))
    }
}

/// A header's value as text (empty when absent).
pub(super) fn header_text(headers: &HeaderMap, name: &str) -> Result<String, OpenAiError> {
    headers.get(name).map_or(Ok(String::new()), |value| {
        value.to_str().map(str::to_string).map_err(|_| {
            OpenAiError::invalid_request(Some(name), format!("the {name} header is not ASCII"))
        })
    })
}

/// A gRPC request with the forwarded headers as metadata.
pub(super) fn grpc_request<T>(
    headers: &HeaderMap,
    message: T,
) -> Result<tonic::Request<T>, OpenAiError> {
    let mut request = tonic::Request::new(message);
    for name in FORWARDED {
        let Some(value) = headers.get(name) else {
            continue;
        };
        let value: MetadataValue<_> = value
            .to_str()
            .ok()
            .and_then(|text| text.parse().ok())
            .ok_or_else(|| {
                OpenAiError::invalid_request(Some(name), format!("the {name} header is not ASCII"))
            })?;
        request.metadata_mut().insert(name, value);
    }
    if let Some(value) = headers.get(TIMEOUT_MS) {
        let millis: u64 = value
            .to_str()
            .ok()
            .and_then(|text| text.trim().parse().ok())
            .filter(|&millis| millis > 0)
            .ok_or_else(|| {
                OpenAiError::invalid_request(
                    Some(TIMEOUT_MS),
                    format!("the {TIMEOUT_MS} header must be a positive number of milliseconds"),
                )
            })?;
        request.set_timeout(Duration::from_millis(millis));
    }
    Ok(request)
}

pub(super) fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| {
            i64::try_from(elapsed.as_secs()).unwrap_or(i64::MAX)
        })
}

fn with_trace_id(mut response: Response, trace_id: &str) -> Response {
    if let Ok(value) = HeaderValue::from_str(trace_id)
        && !trace_id.is_empty()
    {
        response
            .headers_mut()
            .insert(HeaderName::from_static(TRACE_ID), value);
    }
    response
}

/// 200 with the answer; 202 while a blocking review holds it (the body says `pending` and names
/// the review item, the message is null).
fn completion_response(answer: CompleteResponse, id: Option<String>) -> Response {
    let status = if answer.review_status == ReviewStatus::Pending as i32 {
        StatusCode::ACCEPTED
    } else {
        StatusCode::OK
    };
    let trace_id = answer.trace_id.clone();
    let mut completion = convert::chat_completion(answer, now());
    if let Some(id) = id {
        completion.id = id;
    }
    with_trace_id(json(status, &completion), &trace_id)
}

/// The SSE answer. The first event is awaited before answering, so a failure before the stream
/// starts (admission, rate limit, budget, no model) gets its own HTTP status like a non-streamed
/// request.
async fn stream_response(
    mut events: Streaming<CompleteStreamResponse>,
    include_usage: bool,
    id: Option<String>,
) -> Result<Response, OpenAiError> {
    let first = events
        .message()
        .await
        .map_err(|status| errors::from_status(&status))?
        .ok_or_else(|| {
            errors::from_status(&Status::internal(
                "the router ended the stream before it started",
            ))
        })?;
    let (start, pending) = match first.event {
        Some(StreamEvent::Start(start)) => (start, None),
        // Not what the router sends, but nothing is dropped if it ever does.
        other => (Start::default(), other),
    };
    let trace_id = start.trace_id.clone();
    let mut writer = ChunkWriter::new(start, now(), include_usage);
    if let Some(id) = id {
        writer = writer.with_id(id);
    }
    let mut queued = vec![chunk_event(&writer.first())];
    let mut relay = Relay {
        events,
        writer,
        done: false,
    };
    if let Some(event) = pending {
        queued.extend(relay.on(Ok(Some(CompleteStreamResponse { event: Some(event) }))));
    }
    let body =
        Sse::new(relay_stream(queued, relay)).keep_alive(KeepAlive::new().interval(KEEP_ALIVE));
    Ok(with_trace_id(body.into_response(), &trace_id))
}

/// The gRPC stream being relayed as chunks.
struct Relay {
    events: Streaming<CompleteStreamResponse>,
    writer: ChunkWriter,
    done: bool,
}

impl Relay {
    /// The SSE events for one read of the gRPC stream; sets `done` once the stream is over.
    fn on(&mut self, read: Result<Option<CompleteStreamResponse>, Status>) -> Vec<Event> {
        match read {
            Ok(Some(CompleteStreamResponse { event })) => match event {
                Some(StreamEvent::Delta(delta)) => {
                    vec![chunk_event(&self.writer.delta(delta.text))]
                }
                Some(StreamEvent::Done(done)) => {
                    self.done = true;
                    let mut out: Vec<Event> =
                        self.writer.done(done).iter().map(chunk_event).collect();
                    out.push(Event::default().data("[DONE]"));
                    out
                }
                Some(StreamEvent::Start(_)) | None => Vec::new(),
            },
            Ok(None) => {
                self.done = true;
                vec![error_event(&errors::from_status(&Status::internal(
                    "the router ended the stream without its last event",
                )))]
            }
            Err(status) => {
                self.done = true;
                vec![error_event(&errors::from_status(&status))]
            }
        }
    }
}

/// The events already known, then one batch per read of the gRPC stream until it is over.
fn relay_stream(queued: Vec<Event>, relay: Relay) -> impl Stream<Item = Result<Event, Infallible>> {
    let queued = stream::iter(queued.into_iter().map(Ok));
    let rest = stream::unfold(relay, |mut relay| async move {
        if relay.done {
            return None;
        }
        let read = relay.events.message().await;
        let events = relay.on(read);
        if relay.done {
            // Read the trailers, so the router sees a stream that ended, not one cancelled.
            let _ = relay.events.trailers().await;
        }
        Some((stream::iter(events.into_iter().map(Ok)), relay))
    });
    futures::StreamExt::chain(queued, futures::StreamExt::flatten(rest))
}

fn chunk_event(chunk: &impl Serialize) -> Event {
    Event::default().data(serde_json::to_string(chunk).unwrap_or_default())
}

fn error_event(error: &OpenAiError) -> Event {
    let body: &ErrorBody = &error.body;
    Event::default().data(serde_json::to_string(body).unwrap_or_default())
}
