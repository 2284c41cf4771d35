//! The gRPC implementation of `weir.inference.v1.InferenceService`.
//!
//! Each call is validated (`validate.rs`), handed to its model's backend, and bounded by the
//! caller's deadline from `grpc-timeout` ([`weir_mesh::deadline`]): when it passes, the call ends
//! with DEADLINE_EXCEEDED, streams included (gRPC servers otherwise only bound the wait for a
//! stream's first message). Errors are [`ApiError`]s and become statuses through
//! `weir_mesh::error` only.
//!
//! # Circuit breaker and bulkhead, per model
//!
//! Every backend call, simulated or HTTP, goes through its model's circuit breaker
//! ([`weir_mesh::breaker::Breaker`]) and bulkhead compartment
//! ([`weir_mesh::bulkhead::Compartment`]), both keyed by the model name (`[inference.breaker]`,
//! `[inference.bulkhead]`, see [`crate::Config`]):
//!
//! - Validation comes first: INVALID_ARGUMENT, NOT_FOUND and the context-window refusal never
//!   touch the breaker or the bulkhead.
//! - Then the breaker permit (open → UNAVAILABLE `CIRCUIT_OPEN` with RetryInfo, logged at debug,
//!   the backend not called), then the bulkhead slot (full → UNAVAILABLE `BULKHEAD_FULL` at once;
//!   the breaker permit is dropped unrecorded, since our own burst says nothing about the backend).
//!   This is the order of the mesh's client stack (breaker above bulkhead).
//! - `Generate` records its final code: OK with the answer's time to first token (a long answer
//!   is not a slow model), an error with the time since the permit was taken.
//! - `GenerateStream` records at the first event: OK at the first token (with the time to first
//!   token, which is what "slow" means for a model; an answer without tokens counts at its end),
//!   or the error code when the stream fails before its first token (including at the start, or
//!   a backend timeout). After the first token the outcome is recorded already, so a stream
//!   cut later is not counted again. A caller that cancels before an outcome, or whose deadline
//!   passes first, drops the permit unrecorded: ignored (only successes and backend failures
//!   count, see [`weir_mesh::outcome`]).
//! - The bulkhead slot is held for the whole call: for a stream it moves into the response stream
//!   and is released when the stream ends, fails, or is dropped (cancelled).
//!
//! Metrics (state gauge, transitions, rejections, in-flight) come from the mesh cores, labelled
//! `backend = <model>`; every catalog model's breaker and compartment are created at start-up, so
//! their series exist before the first call.
//!
//! `ListModels` pages through the catalog in name order. `page_size` 0 means
//! [`DEFAULT_PAGE_SIZE`], and sizes above [`MAX_PAGE_SIZE`] are treated as that; `page_token` is
//! the opaque `next_page_token` of the previous page (it encodes the last name returned, so pages
//! stay consistent when the catalog is reloaded between calls).

use std::{
    collections::BTreeMap,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use futures::{Stream, StreamExt, stream::BoxStream};
use tokio::time::Instant;
use tonic::{
    Code, Request, Response, Status, codec::CompressionEncoding,
    codegen::BoxStream as TonicBoxStream,
};
use tracing::Instrument;
use weir_mesh::{
    ApiError,
    backend::BackendKey,
    breaker::{Breaker, BreakerConfig, Breakers, Permit},
    bulkhead::{BulkheadConfig, BulkheadPermit, Bulkheads, Compartment},
    catalog::Catalog,
    deadline,
    outcome::Class,
};
use weir_proto::inference::{
    GenerateRequest, GenerateResponse, GenerateStreamRequest, GenerateStreamResponse,
    ListModelsRequest, ListModelsResponse, ModelInfo,
    generate_stream_response::{self, Delta, Done},
    inference_service_server::{InferenceService, InferenceServiceServer},
};

use crate::{
    backend::{Backend, Call, Event, EventStream, Finish, instant_after, sim},
    observe::ModelCall,
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
    models: BTreeMap<String, Model>,
    breakers: Breakers,
    bulkheads: Bulkheads,
    sim_log: sim::SimLog,
}

/// One catalog model: its backend, and the breaker and bulkhead compartment guarding it.
#[derive(Debug)]
struct Model {
    name: String,
    backend: Backend,
    breaker: Arc<Breaker>,
    bulkhead: Arc<Compartment>,
}

/// What a call holds while its backend works: the breaker permit (until the outcome is recorded)
/// and the bulkhead slot (until the call ends), and the caller's deadline, to tell a caller who
/// ran out of time from a failing backend.
#[derive(Debug)]
struct Guard {
    breaker: Option<Permit>,
    _slot: BulkheadPermit,
    deadline: Option<Instant>,
}

impl Model {
    /// Starts observing a validated call (its GenAI span and metrics; see [`crate::observe`]).
    fn observe(&self, call: &Call, streaming: bool) -> ModelCall {
        ModelCall::start(
            &self.name,
            self.backend.kind(),
            call.checked.output_limit,
            streaming,
        )
    }

    /// Takes the breaker permit, then the bulkhead slot, or says why the call must fail fast.
    fn admit(&self, deadline: Option<Instant>) -> Result<Guard, ApiError> {
        let permit = self.breaker.try_acquire().map_err(|open| {
            tracing::debug!(
                model = self.name,
                retry_after_ms = open.retry_after.as_millis(),
                "circuit open: call refused without calling the backend"
            );
            ApiError::from(open)
        })?;
        let slot = self.bulkhead.try_acquire().map_err(|full| {
            // `permit` is dropped unrecorded: a local rejection is no verdict on the backend.
            tracing::debug!(
                model = self.name,
                limit = full.limit,
                "bulkhead full: call refused"
            );
            ApiError::from(full)
        })?;
        Ok(Guard {
            breaker: Some(permit),
            _slot: slot,
            deadline,
        })
    }
}

impl Guard {
    /// Records the outcome on the breaker with the call's time to first token (or to its error),
    /// once; later calls do nothing. Only successes and backend failures count
    /// ([`weir_mesh::outcome::Class`]): a call that ended because the caller's deadline passed
    /// drops the permit unrecorded, since the caller's impatience says nothing about the model.
    fn record(&mut self, code: Code, elapsed: Duration) {
        if let Some(permit) = self.breaker.take()
            && Class::of(code, None, self.deadline, Instant::now()).feeds_breaker()
        {
            permit.record_elapsed(code, elapsed);
        }
    }
}

/// Breaker and bulkhead settings that can be used: invalid ones (only possible for a `Config`
/// built in code; deserialized ones are checked) are logged and replaced by the defaults.
fn usable(config: &crate::Config) -> (BreakerConfig, BulkheadConfig) {
    let breaker = match config.breaker.validate(crate::BREAKER_KEY) {
        Ok(()) => config.breaker.clone(),
        Err(error) => {
            tracing::error!(%error, "using the default circuit breaker settings instead");
            BreakerConfig::default()
        }
    };
    let bulkhead = match config.bulkhead.validate(crate::BULKHEAD_KEY) {
        Ok(()) => config.bulkhead.clone(),
        Err(error) => {
            tracing::error!(%error, "using the default bulkhead settings instead");
            BulkheadConfig::default()
        }
    };
    (breaker, bulkhead)
}

impl InferenceApi {
    /// The service for the models of `catalog`, with the default breaker and bulkhead settings.
    /// Models that cannot be called as configured (an `openai` model without its table) are
    /// logged now and fail each request with FAILED_PRECONDITION.
    pub fn new(catalog: Arc<Catalog>) -> Self {
        Self::with_config(catalog, &crate::Config::default())
    }

    /// The service for the models of `catalog`, with the breaker and bulkhead settings of
    /// `config` (invalid ones, possible only for a `Config` built in code, are logged and replaced
    /// by the defaults; check with [`crate::Config::validate`] first).
    pub fn with_config(catalog: Arc<Catalog>, config: &crate::Config) -> Self {
        let (breaker, bulkhead) = usable(config);
        let breakers = Breakers::new(breaker);
        let bulkheads = Bulkheads::new(bulkhead);
        let sim_log = sim::SimLog::default();
        let models = catalog
            .iter()
            .map(|(name, spec)| {
                let key = BackendKey::new(name);
                let model = Model {
                    name: name.to_string(),
                    backend: Backend::new(name, spec, &sim_log),
                    breaker: breakers.get(&key),
                    bulkhead: bulkheads.get(&key),
                };
                (name.to_string(), model)
            })
            .collect();
        Self {
            inner: Arc::new(Inner {
                catalog,
                models,
                breakers,
                bulkheads,
                sim_log,
            }),
        }
    }

    /// The circuit breakers, one per model (keyed by [`BackendKey`] = the model name), to read
    /// their state.
    pub fn breakers(&self) -> &Breakers {
        &self.inner.breakers
    }

    /// The bulkhead compartments, one per model (keyed by [`BackendKey`] = the model name), to read
    /// how many calls are in flight.
    pub fn bulkheads(&self) -> &Bulkheads {
        &self.inner.bulkheads
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

    /// Validates a request and prepares its call. Nothing here touches the breaker.
    fn prepare(
        &self,
        input: Input,
        received: Instant,
        deadline: Option<Instant>,
    ) -> Result<(&Model, Call), ApiError> {
        let (_, checked) = validate(&self.inner.catalog, &input)?;
        let model =
            self.inner.models.get(&input.model).ok_or_else(|| {
                ApiError::internal(format!("model {} has no backend", input.model))
            })?;
        Ok((
            model,
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
        let (model, call) = self.prepare(input, received, deadline)?;
        let observed = model.observe(&call, false);
        let result = async {
            let mut guard = model.admit(deadline)?;
            let started = Instant::now();
            let result = within(deadline, received, model.backend.generate(call)).await;
            match &result {
                // "Slow" means a slow first token, not a long answer.
                Ok(generation) => guard.record(Code::Ok, generation.finish.time_to_first_token),
                Err(error) => guard.record(error.code(), started.elapsed()),
            }
            result
        }
        .instrument(observed.span().clone())
        .await;
        let generation = match result {
            Ok(generation) => generation,
            Err(error) => {
                observed.failed(error.code());
                return Err(error);
            }
        };
        let finish = generation.finish;
        observed.finished(
            &finish.usage,
            finish.finish_reason,
            finish.time_to_first_token,
        );
        Ok(GenerateResponse {
            message: Some(generation.message),
            model: model.name.clone(),
            finish_reason: finish.finish_reason.into(),
            usage: Some(finish.usage),
            backend: model.backend.kind().as_str().to_string(),
            time_to_first_token: proto_duration(finish.time_to_first_token),
        })
    }

    async fn stream_call(
        &self,
        input: Input,
        received: Instant,
        deadline: Option<Instant>,
    ) -> Result<(EventStream, ModelCall), ApiError> {
        let (model, call) = self.prepare(input, received, deadline)?;
        let observed = model.observe(&call, true);
        let opened = async {
            let mut guard = model.admit(deadline)?;
            let started = Instant::now();
            match within(deadline, received, model.backend.stream(call)).await {
                Ok(events) => Ok((events, guard, started)),
                Err(error) => {
                    guard.record(error.code(), started.elapsed());
                    Err(error)
                }
            }
        }
        .instrument(observed.span().clone())
        .await;
        let (events, guard, started) = match opened {
            Ok(opened) => opened,
            Err(error) => {
                observed.failed(error.code());
                return Err(error);
            }
        };
        let events = match deadline {
            Some(at) => until_deadline(events, at, received),
            None => events,
        };
        let events = Guarded {
            events: Some(events),
            guard: Some(guard),
            started,
        }
        .boxed();
        Ok((events, observed))
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
        let (events, observed) = match self.stream_call(input, received, deadline).await {
            Ok(opened) => opened,
            Err(error) => {
                tracing::debug!(model, request_id, %error, "stream failed before its first token");
                return Err(error.into());
            }
        };
        let backend = self
            .inner
            .models
            .get(&model)
            .map_or("", |m| m.backend.kind().as_str());
        let mut log = StreamLog {
            model,
            request_id,
            backend,
            received,
            observed: Some(observed),
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

/// A backend's event stream holding its call's [`Guard`]: it records the breaker outcome at the
/// first event and gives the bulkhead slot back when the stream ends, fails, or is dropped.
struct Guarded {
    events: Option<EventStream>,
    guard: Option<Guard>,
    started: Instant,
}

impl Stream for Guarded {
    type Item = Result<Event, ApiError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        let Some(events) = this.events.as_mut() else {
            return Poll::Ready(None);
        };
        let event = std::task::ready!(events.poll_next_unpin(cx));
        if let Some(guard) = this.guard.as_mut() {
            match &event {
                // The first token (or an answer without any): time to first token.
                Some(Ok(_)) => guard.record(Code::Ok, this.started.elapsed()),
                Some(Err(error)) => guard.record(error.code(), this.started.elapsed()),
                // Ended without a final event: the backend broke its contract.
                None => guard.record(Code::Internal, this.started.elapsed()),
            }
        }
        let last = match &event {
            Some(Ok(Event::Delta { .. })) => false,
            Some(Ok(Event::Done(_)) | Err(_)) | None => true,
        };
        if last {
            // Nothing more will come: stop the backend's work and give the slot back now rather
            // than when the transport drops the stream.
            this.events = None;
            this.guard = None;
        }
        Poll::Ready(event)
    }
}

/// Turns a stream's events into responses and logs and observes how it ended (including a
/// cancellation by the caller, noticed when the stream is dropped unfinished).
struct StreamLog {
    model: String,
    request_id: String,
    backend: &'static str,
    received: Instant,
    /// The model call, until the stream ends.
    observed: Option<ModelCall>,
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
                self.log_done(&finish);
                if let Some(observed) = self.observed.take() {
                    observed.finished(
                        &finish.usage,
                        finish.finish_reason,
                        finish.time_to_first_token,
                    );
                }
                generate_stream_response::Event::Done(Done {
                    finish_reason: finish.finish_reason.into(),
                    usage: Some(finish.usage),
                    model: self.model.clone(),
                    backend: self.backend.to_string(),
                    time_to_first_token: proto_duration(finish.time_to_first_token),
                })
            }
            Err(error) => {
                if let Some(observed) = self.observed.take() {
                    observed.failed(error.code());
                }
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
        // The model call, if still open, records itself as cancelled when dropped.
        if self.observed.is_some() {
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
            .0
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

    fn resilient_api(models: Vec<(&str, SimSpec)>, breaker: BreakerConfig) -> InferenceApi {
        let catalog = Arc::new(Catalog::new(models.into_iter().map(|(name, sim)| {
            (
                name.to_string(),
                ModelSpec {
                    sim,
                    ..ModelSpec::default()
                },
            )
        })));
        let config = crate::Config {
            breaker,
            ..crate::Config::default()
        };
        InferenceApi::with_config(catalog, &config)
    }

    fn small_breaker() -> BreakerConfig {
        BreakerConfig {
            window: 4,
            minimum_calls: 4,
            open_duration: Duration::from_secs(1),
            jitter: 0.0,
            ..BreakerConfig::default()
        }
    }

    fn state(api: &InferenceApi, model: &str) -> weir_mesh::breaker::BreakerState {
        api.breakers().state(&BackendKey::new(model))
    }

    #[tokio::test(start_paused = true)]
    async fn a_stream_cancelled_before_its_first_token_is_ignored_and_frees_its_probe() {
        use weir_mesh::breaker::BreakerState;
        let api = resilient_api(
            vec![(
                "m",
                SimSpec {
                    time_to_first_token: Duration::from_secs(1),
                    cut_after_tokens: Some(2),
                    ..SimSpec::default()
                },
            )],
            small_breaker(),
        );
        let short = || {
            let mut input = request("m", "hi");
            input.params.max_tokens = Some(2);
            input
        };
        for _ in 0..4 {
            let error = api
                .generate_call(request("m", "hi"), Instant::now(), None)
                .await
                .err()
                .unwrap();
            assert_eq!(error.reason(), sim::CUT_REASON);
        }
        assert_eq!(state(&api, "m"), BreakerState::Open);
        tokio::time::advance(Duration::from_secs(1)).await;

        let mut probes = Vec::new();
        for _ in 0..3 {
            probes.push(
                api.stream_call(short(), Instant::now(), None)
                    .await
                    .unwrap()
                    .0,
            );
        }
        let refused = api.stream_call(short(), Instant::now(), None).await;
        assert_eq!(refused.err().unwrap().reason(), "CIRCUIT_OPEN");
        // The caller of one probe goes away before its first token: nothing is recorded and its
        // slot goes to the next call.
        drop(probes.pop());
        assert_eq!(state(&api, "m"), BreakerState::HalfOpen);
        probes.push(
            api.stream_call(short(), Instant::now(), None)
                .await
                .unwrap()
                .0,
        );
        assert_eq!(
            api.bulkheads().get(&BackendKey::new("m")).in_flight(),
            3,
            "the cancelled call gave its slot back"
        );
        for probe in probes {
            let events: Vec<_> = probe.collect().await;
            assert!(events.iter().all(Result::is_ok));
        }
        assert_eq!(state(&api, "m"), BreakerState::Closed);
        assert_eq!(api.bulkheads().get(&BackendKey::new("m")).in_flight(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn slow_means_a_slow_first_token_not_a_long_answer() {
        use weir_mesh::breaker::BreakerState;
        let breaker = BreakerConfig {
            slow_call_threshold: Duration::from_millis(500),
            ..small_breaker()
        };
        let api = resilient_api(
            vec![
                (
                    "slow-start",
                    SimSpec {
                        time_to_first_token: Duration::from_secs(1),
                        ..SimSpec::default()
                    },
                ),
                (
                    "long-answer",
                    SimSpec {
                        tokens_per_second: 10.0,
                        ..SimSpec::default()
                    },
                ),
            ],
            breaker,
        );
        for _ in 0..4 {
            let started = Instant::now();
            api.generate_call(request("long-answer", "hi"), started, None)
                .await
                .unwrap();
            assert!(started.elapsed() > Duration::from_secs(3));
            let events: Vec<_> = api
                .stream_call(request("long-answer", "hi"), Instant::now(), None)
                .await
                .unwrap()
                .0
                .collect()
                .await;
            assert!(events.iter().all(Result::is_ok));
        }
        assert_eq!(state(&api, "long-answer"), BreakerState::Closed);
        for _ in 0..4 {
            let events: Vec<_> = api
                .stream_call(request("slow-start", "hi"), Instant::now(), None)
                .await
                .unwrap()
                .0
                .collect()
                .await;
            assert!(events.iter().all(Result::is_ok));
        }
        assert_eq!(state(&api, "slow-start"), BreakerState::Open);
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
