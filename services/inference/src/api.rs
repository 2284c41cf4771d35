//! The gRPC implementation of `weir.inference.v1.InferenceService`.
//!
//! Each call is validated (`validate.rs`), handed to its model's backend, and bounded by the
//! caller's deadline from `grpc-timeout` ([`weir_mesh::deadline`]): when it passes, the call ends
//! with DEADLINE_EXCEEDED, streams included (gRPC servers otherwise only bound the wait for a
//! stream's first message). Errors are [`ApiError`]s and become statuses through
//! `weir_mesh::error` only.
//!
//! `ListModels` pages through the catalog in name order. `page_size` 0 means
//! [`DEFAULT_PAGE_SIZE`], and sizes above [`MAX_PAGE_SIZE`] are treated as that; `page_token` is
//! the opaque `next_page_token` of the previous page (it encodes the last name returned, so pages
//! stay consistent when the catalog is reloaded between calls).

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use futures::{StreamExt, stream::BoxStream};
use tokio::time::Instant;
use tonic::{
    Request, Response, Status, codec::CompressionEncoding, codegen::BoxStream as TonicBoxStream,
};
use weir_mesh::{ApiError, catalog::Catalog, deadline};
use weir_proto::inference::{
    GenerateRequest, GenerateResponse, GenerateStreamRequest, GenerateStreamResponse,
    ListModelsRequest, ListModelsResponse, ModelInfo,
    generate_stream_response::{self, Delta, Done},
    inference_service_server::{InferenceService, InferenceServiceServer},
};

use crate::{
    backend::{Backend, Call, Event, EventStream, Finish, instant_after, sim},
    validate::{Input, validate},
};

/// Models per `ListModels` page when the request says 0.
pub const DEFAULT_PAGE_SIZE: usize = 100;
/// Most models per `ListModels` page.
pub const MAX_PAGE_SIZE: usize = 1000;
/// Prefix of page tokens, versioning their format.
const PAGE_TOKEN_PREFIX: &str = "m1.";

/// The inference service: one backend per catalog model. Cheap to clone (clones share the
/// backends, their connection pools and the simulated models' request log).
#[derive(Debug, Clone)]
pub struct InferenceApi {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    catalog: Arc<Catalog>,
    backends: BTreeMap<String, Backend>,
    sim_log: sim::SimLog,
}

impl InferenceApi {
    /// The service for the models of `catalog`. Models that cannot be called as configured (an
    /// `openai` model without its table) are logged now and fail each request with
    /// FAILED_PRECONDITION.
    pub fn new(catalog: Arc<Catalog>) -> Self {
        let sim_log = sim::SimLog::default();
        let backends = catalog
            .iter()
            .map(|(name, spec)| (name.to_string(), Backend::new(name, spec, &sim_log)))
            .collect();
        Self {
            inner: Arc::new(Inner {
                catalog,
                backends,
                sim_log,
            }),
        }
    }

    /// The catalog served.
    pub fn catalog(&self) -> &Catalog {
        &self.inner.catalog
    }

    /// The last requests the simulated models received (at most 256, oldest first), for tests
    /// that check what a model was actually given.
    pub fn sim_requests(&self) -> Vec<sim::SimRequest> {
        self.inner.sim_log.snapshot()
    }

    /// [`Self::sim_requests`] of one model.
    pub fn sim_requests_for(&self, model: &str) -> Vec<sim::SimRequest> {
        let mut requests = self.sim_requests();
        requests.retain(|r| r.model == model);
        requests
    }

    /// The tonic service, to host on a server. It accepts gzip-compressed requests (large
    /// prompts compress well).
    pub fn into_service(self) -> InferenceServiceServer<Self> {
        InferenceServiceServer::new(self).accept_compressed(CompressionEncoding::Gzip)
    }

    /// Validates a request and prepares its call.
    fn prepare(
        &self,
        input: Input,
        received: Instant,
        deadline: Option<Instant>,
    ) -> Result<(&Backend, Call), ApiError> {
        let (_, checked) = validate(&self.inner.catalog, &input)?;
        let backend =
            self.inner.backends.get(&input.model).ok_or_else(|| {
                ApiError::internal(format!("model {} has no backend", input.model))
            })?;
        Ok((
            backend,
            Call {
                input,
                checked,
                received,
                deadline,
            },
        ))
    }

    async fn generate_call(
        &self,
        input: Input,
        received: Instant,
        deadline: Option<Instant>,
    ) -> Result<GenerateResponse, ApiError> {
        let model = input.model.clone();
        let (backend, call) = self.prepare(input, received, deadline)?;
        let generation = within(deadline, received, backend.generate(call)).await?;
        let finish = generation.finish;
        Ok(GenerateResponse {
            message: Some(generation.message),
            model,
            finish_reason: finish.finish_reason.into(),
            usage: Some(finish.usage),
            backend: backend.kind().as_str().to_string(),
            time_to_first_token: proto_duration(finish.time_to_first_token),
        })
    }

    async fn stream_call(
        &self,
        input: Input,
        received: Instant,
        deadline: Option<Instant>,
    ) -> Result<EventStream, ApiError> {
        let (backend, call) = self.prepare(input, received, deadline)?;
        let events = within(deadline, received, backend.stream(call)).await?;
        Ok(match deadline {
            Some(at) => until_deadline(events, at, received),
            None => events,
        })
    }

    fn list(&self, request: &ListModelsRequest) -> Result<ListModelsResponse, ApiError> {
        let size = match usize::try_from(request.page_size) {
            Err(_) => {
                return Err(ApiError::invalid_argument(
                    "page_size",
                    format!("must not be negative, got {}", request.page_size),
                ));
            }
            Ok(0) => DEFAULT_PAGE_SIZE,
            Ok(size) => size.min(MAX_PAGE_SIZE),
        };
        let after = if request.page_token.is_empty() {
            None
        } else {
            Some(decode_page_token(&request.page_token).ok_or_else(|| {
                ApiError::invalid_argument(
                    "page_token",
                    "is not a next_page_token from a previous ListModels response",
                )
            })?)
        };
        let mut page: Vec<ModelInfo> = self
            .inner
            .catalog
            .iter()
            .filter(|(name, _)| after.as_deref().is_none_or(|after| *name > after))
            .take(size + 1)
            .map(|(name, spec)| ModelInfo {
                name: name.to_string(),
                backend: spec.backend.as_str().to_string(),
                family: spec.family().to_string(),
                context_window: i64::from(spec.context_window),
                max_output_tokens: i64::from(spec.max_output_tokens),
                description: spec.description.clone(),
            })
            .collect();
        let next_page_token = if page.len() > size {
            page.truncate(size);
            page.last()
                .map(|last| encode_page_token(&last.name))
                .unwrap_or_default()
        } else {
            String::new()
        };
        Ok(ListModelsResponse {
            models: page,
            next_page_token,
        })
    }
}

#[tonic::async_trait]
impl InferenceService for InferenceApi {
    async fn generate(
        &self,
        request: Request<GenerateRequest>,
    ) -> Result<Response<GenerateResponse>, Status> {
        let received = Instant::now();
        let deadline = caller_deadline(&request, received);
        let input = Input::from(request.into_inner());
        let (model, request_id, labels) = (
            input.model.clone(),
            input.request_id.clone(),
            input.labels.clone(),
        );
        match self.generate_call(input, received, deadline).await {
            Ok(response) => {
                let usage = response.usage.unwrap_or_default();
                tracing::debug!(
                    model,
                    request_id,
                    ?labels,
                    backend = response.backend,
                    input_tokens = usage.input_tokens,
                    output_tokens = usage.output_tokens,
                    cached_input_tokens = usage.cached_input_tokens,
                    finish_reason = response.finish_reason().as_str_name(),
                    elapsed_ms = received.elapsed().as_millis(),
                    "generated"
                );
                Ok(Response::new(response))
            }
            Err(error) => {
                tracing::debug!(model, request_id, ?labels, %error, "generate failed");
                Err(error.into())
            }
        }
    }

    async fn generate_stream(
        &self,
        request: Request<GenerateStreamRequest>,
    ) -> Result<Response<TonicBoxStream<GenerateStreamResponse>>, Status> {
        let received = Instant::now();
        let deadline = caller_deadline(&request, received);
        let input = Input::from(request.into_inner());
        let (model, request_id) = (input.model.clone(), input.request_id.clone());
        let events = match self.stream_call(input, received, deadline).await {
            Ok(events) => events,
            Err(error) => {
                tracing::debug!(model, request_id, %error, "stream failed before its first token");
                return Err(error.into());
            }
        };
        let backend = self
            .inner
            .backends
            .get(&model)
            .map_or("", |b| b.kind().as_str());
        let mut log = StreamLog {
            model,
            request_id,
            backend,
            received,
            ended: false,
        };
        let responses = events.map(move |event| log.relay(event));
        Ok(Response::new(Box::pin(responses)))
    }

    async fn list_models(
        &self,
        request: Request<ListModelsRequest>,
    ) -> Result<Response<ListModelsResponse>, Status> {
        Ok(Response::new(self.list(request.get_ref())?))
    }
}

/// Turns a stream's events into responses and logs how it ended (including a cancellation by the
/// caller, noticed when the stream is dropped unfinished).
struct StreamLog {
    model: String,
    request_id: String,
    backend: &'static str,
    received: Instant,
    ended: bool,
}

impl StreamLog {
    fn relay(
        &mut self,
        event: Result<Event, weir_mesh::ApiError>,
    ) -> Result<GenerateStreamResponse, Status> {
        let event = match event {
            Ok(Event::Delta { text, index }) => generate_stream_response::Event::Delta(Delta {
                text,
                index: i64::try_from(index).unwrap_or(i64::MAX),
            }),
            Ok(Event::Done(finish)) => {
                self.ended = true;
                self.log_done(&finish);
                generate_stream_response::Event::Done(Done {
                    finish_reason: finish.finish_reason.into(),
                    usage: Some(finish.usage),
                    model: self.model.clone(),
                    backend: self.backend.to_string(),
                    time_to_first_token: proto_duration(finish.time_to_first_token),
                })
            }
            Err(error) => {
                self.ended = true;
                tracing::debug!(
                    model = self.model,
                    request_id = self.request_id,
                    backend = self.backend,
                    %error,
                    "stream broke off"
                );
                return Err(error.into());
            }
        };
        Ok(GenerateStreamResponse { event: Some(event) })
    }

    fn log_done(&self, finish: &Finish) {
        tracing::debug!(
            model = self.model,
            request_id = self.request_id,
            backend = self.backend,
            input_tokens = finish.usage.input_tokens,
            output_tokens = finish.usage.output_tokens,
            cached_input_tokens = finish.usage.cached_input_tokens,
            finish_reason = finish.finish_reason.as_str_name(),
            ttft_ms = finish.time_to_first_token.as_millis(),
            elapsed_ms = self.received.elapsed().as_millis(),
            "streamed"
        );
    }
}

impl Drop for StreamLog {
    fn drop(&mut self) {
        if !self.ended {
            tracing::debug!(
                model = self.model,
                request_id = self.request_id,
                backend = self.backend,
                elapsed_ms = self.received.elapsed().as_millis(),
                "stream cancelled by the caller"
            );
        }
    }
}

/// The absolute deadline of a call received at `received`, from its `grpc-timeout`.
fn caller_deadline<T>(request: &Request<T>, received: Instant) -> Option<Instant> {
    deadline::remaining(request.metadata()).map(|remaining| instant_after(received, remaining))
}

fn deadline_exceeded(received: Instant) -> ApiError {
    ApiError::deadline_exceeded(format!(
        "the caller's deadline passed after {} ms",
        received.elapsed().as_millis()
    ))
}

/// Runs `work` until the caller's deadline, if it set one.
async fn within<T>(
    deadline: Option<Instant>,
    received: Instant,
    work: impl Future<Output = Result<T, ApiError>>,
) -> Result<T, ApiError> {
    match deadline {
        Some(at) => tokio::time::timeout_at(at, work)
            .await
            .unwrap_or_else(|_| Err(deadline_exceeded(received))),
        None => work.await,
    }
}

/// Ends `events` with DEADLINE_EXCEEDED at `deadline` (dropping the backend's stream, which stops
/// its work).
fn until_deadline(events: EventStream, deadline: Instant, received: Instant) -> EventStream {
    let bounded: BoxStream<'static, _> =
        futures::stream::unfold(Some(events), move |events| async move {
            let mut events = events?;
            match tokio::time::timeout_at(deadline, events.next()).await {
                Ok(Some(event)) => {
                    let last = event.is_err();
                    Some((event, (!last).then_some(events)))
                }
                Ok(None) => None,
                Err(_) => Some((Err(deadline_exceeded(received)), None)),
            }
        })
        .boxed();
    bounded
}

fn proto_duration(duration: Duration) -> Option<prost_types::Duration> {
    prost_types::Duration::try_from(duration).ok()
}

/// Page tokens are `m1.` and the hex of the last name returned: opaque to clients, checkable here.
fn encode_page_token(last: &str) -> String {
    use std::fmt::Write as _;
    last.bytes()
        .fold(PAGE_TOKEN_PREFIX.to_string(), |mut token, byte| {
            let _ = write!(token, "{byte:02x}");
            token
        })
}

fn decode_page_token(token: &str) -> Option<String> {
    let hex = token.strip_prefix(PAGE_TOKEN_PREFIX)?;
    if hex.is_empty() || hex.len() % 2 != 0 {
        return None;
    }
    let bytes = (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(hex.get(i..i + 2)?, 16).ok())
        .collect::<Option<Vec<u8>>>()?;
    String::from_utf8(bytes).ok()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use tonic::Code;
    use weir_mesh::catalog::{ModelSpec, SimSpec};
    use weir_proto::common::{GenerationParams, Message, Role};

    use super::*;

    fn catalog(n: usize) -> Arc<Catalog> {
        Arc::new(Catalog::new((0..n).map(|i| {
            (
                format!("model-{i:03}"),
                ModelSpec {
                    description: format!("number {i}"),
                    ..ModelSpec::default()
                },
            )
        })))
    }

    fn list(
        api: &InferenceApi,
        page_size: i32,
        page_token: &str,
    ) -> Result<ListModelsResponse, ApiError> {
        api.list(&ListModelsRequest {
            page_size,
            page_token: page_token.to_string(),
        })
    }

    #[test]
    fn list_models_pages_through_the_catalog_in_order() {
        let api = InferenceApi::new(catalog(5));
        let first = list(&api, 2, "").unwrap();
        assert_eq!(
            first
                .models
                .iter()
                .map(|m| m.name.as_str())
                .collect::<Vec<_>>(),
            ["model-000", "model-001"]
        );
        assert_eq!(first.models[0].backend, "sim");
        assert_eq!(first.models[0].family, "sim");
        assert_eq!(first.models[0].context_window, 8192);
        let second = list(&api, 2, &first.next_page_token).unwrap();
        assert_eq!(second.models[0].name, "model-002");
        let third = list(&api, 2, &second.next_page_token).unwrap();
        assert_eq!(third.models.len(), 1);
        assert_eq!(third.next_page_token, "");
        // Exactly a full last page has no next page.
        let all = list(&api, 5, "").unwrap();
        assert_eq!((all.models.len(), all.next_page_token.as_str()), (5, ""));
    }

    #[test]
    fn list_models_page_sizes() {
        let api = InferenceApi::new(catalog(1200));
        assert_eq!(list(&api, 0, "").unwrap().models.len(), DEFAULT_PAGE_SIZE);
        assert_eq!(list(&api, 5000, "").unwrap().models.len(), MAX_PAGE_SIZE);
        let error = list(&api, -1, "").err().unwrap();
        assert_eq!(error.field_violations()[0].0, "page_size");
    }

    #[test]
    fn invalid_page_tokens_are_invalid_arguments() {
        let api = InferenceApi::new(catalog(3));
        for token in ["garbage", "m1.", "m1.zz", "m1.abc", "m1.ff"] {
            let error = list(&api, 1, token).err().unwrap();
            assert_eq!(error.code(), Code::InvalidArgument, "{token}");
            assert_eq!(error.field_violations()[0].0, "page_token");
        }
        assert_eq!(
            decode_page_token(&encode_page_token("sïm-1")).as_deref(),
            Some("sïm-1")
        );
    }

    fn request(model: &str, text: &str) -> Input {
        Input {
            model: model.to_string(),
            messages: vec![Message {
                role: Role::User.into(),
                content: text.to_string(),
                ..Message::default()
            }],
            params: GenerationParams::default(),
            ..Input::default()
        }
    }

    #[tokio::test(start_paused = true)]
    async fn the_callers_deadline_ends_hanging_calls_and_streams() {
        let catalog = Arc::new(Catalog::new([
            (
                "hang".to_string(),
                ModelSpec {
                    sim: SimSpec {
                        hang: true,
                        ..SimSpec::default()
                    },
                    ..ModelSpec::default()
                },
            ),
            (
                "slow".to_string(),
                ModelSpec {
                    sim: SimSpec {
                        tokens_per_second: 1.0,
                        ..SimSpec::default()
                    },
                    ..ModelSpec::default()
                },
            ),
        ]));
        let api = InferenceApi::new(catalog);
        let received = Instant::now();
        let deadline = Some(received + Duration::from_millis(500));
        let error = api
            .generate_call(request("hang", "hi"), received, deadline)
            .await
            .err()
            .unwrap();
        assert_eq!(error.code(), Code::DeadlineExceeded);
        assert_eq!(received.elapsed(), Duration::from_millis(500));

        let received = Instant::now();
        let deadline = Some(received + Duration::from_millis(2500));
        let events: Vec<_> = api
            .stream_call(request("slow", "hi"), received, deadline)
            .await
            .unwrap()
            .collect()
            .await;
        // Tokens at 0 s, 1 s and 2 s, then the deadline.
        assert_eq!(events.len(), 4);
        assert_eq!(
            events[3].as_ref().err().map(ApiError::code),
            Some(Code::DeadlineExceeded)
        );
        assert_eq!(received.elapsed(), Duration::from_millis(2500));
    }

    #[tokio::test]
    async fn the_sim_log_is_readable_per_model() {
        let api = InferenceApi::new(Arc::new(Catalog::default()));
        let received = Instant::now();
        api.generate_call(request("sim-small", "first"), received, None)
            .await
            .unwrap();
        let _ = api
            .stream_call(request("sim-large", "second"), received, None)
            .await
            .unwrap();
        // Refused requests never reach a model.
        let mut bad = request("sim-small", "x");
        bad.params.max_tokens = Some(-1);
        assert!(api.generate_call(bad, received, None).await.is_err());

        assert_eq!(api.sim_requests().len(), 2);
        let small = api.sim_requests_for("sim-small");
        assert_eq!(small.len(), 1);
        assert_eq!(small[0].messages[0].content, "first");
        let large = api.sim_requests_for("sim-large");
        assert!(large[0].streamed);
    }
}
