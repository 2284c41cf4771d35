//! The gRPC implementation: the request walk of `Complete` and `CompleteStream`.
//!
//! Both RPCs walk the same steps (docs/architecture.md, section 4), each in its own module:
//!
//! 1. Server layers run before the handler (deadline, admission, auth, rate limit; libs/mesh).
//! 2. Checks and route: [`crate::request`] refuses what the router alone can tell is wrong, and
//!    [`crate::route`] turns `model` into a [`Plan`] of ordered candidates; the route's rules
//!    may pick one of its tiers instead ([`crate::rules`]), a tenant above its soft budget limit
//!    being steered to the economy tier ([`crate::spend`]).
//!    With `[router.cache]` on, an identical deterministic request (after its `request_id` claim
//!    and rate limit verdict) is answered from the response cache here, skipping steps 3 to 7
//!    ([`crate::cache`]); a miss's answer is offered to the cache after step 8.
//! 3. Context: with a `session_id`, the session's summary and recent turns that fit the model
//!    come before the new messages ([`crate::session`]).
//! 4. Budget: the worst case of the call is reserved ([`crate::spend`]); refused →
//!    RESOURCE_EXHAUSTED before any model runs.
//! 5. Model call: [`crate::inference`] calls the candidates in order, each later one only after a
//!    fallback-worthy failure of the one before ([`crate::fallback`]); [`crate::relay`] streams an
//!    answer. Steps 3 and 4 run again for each candidate tried (its own context size and price);
//!    a failed candidate's hold is released.
//! 6. Settle: the usage is committed and the exchange appended to the session
//!    ([`crate::settlement`]); for a stream when the relay sees `done`, or, if it never does, with
//!    what was relayed (committed, not appended).
//! 7. Review: the answer is judged by the review policies; a flagged one is queued for a human
//!    and either withheld until a decision (blocking) or delivered and audited later (post-hoc)
//!    ([`crate::review_gate`]); a stream that a blocking policy may flag is held back until its
//!    end.
//! 8. Respond with what happened: served model, requested name, route, served-by, usage, the
//!    committed cost, and notices for anything done differently (fallback, steering, a session or
//!    budget service that could not answer).
//!
//! `trace_id` names the request's trace (the router's server span's, [`weir_mesh::trace`]), so
//! a user can find it in Jaeger. A degraded answer is never reviewed (`review_status`
//! NOT_REQUIRED): it is the route's configured text, not a model's.
//!
//! Jobs and batches are served by [`crate::jobs`].

use std::sync::Arc;

use tonic::{Request, Response, Status, metadata::MetadataMap};
use tracing::Instrument;
use weir_mesh::{
    ApiError,
    admission::Admitted,
    auth::ApiKeyId,
    client::ClientStack,
    config::ConfigError,
    deadline::Deadline,
    idempotency::{Claim, Idempotency},
    ratelimit::PendingVerdict,
    tenant::Tenant,
    tokens,
};
use weir_proto::{
    common::{FinishReason, Message, Role, Usage},
    inference::GenerateResponse,
    router::{
        CompleteRequest, CompleteResponse, CompleteStreamRequest, Notice, ReviewStatus, ServedBy,
        complete_stream_response::Start, router_service_server::RouterService,
    },
};

use crate::{
    cache::{self, Control, Looked, ResponseCache},
    config::BudgetPolicy,
    fallback,
    inference::{Call, Inference},
    relay::{self, CompleteStream},
    replay::{self, Rpc},
    request::Completion,
    review::Policies,
    review_gate::{self, Gate, Reviews},
    route::{Plan, RouteTable},
    rules::{QUALITY_LABEL, ROUTE_RULE, RuleFacts},
    session::{History, Sessions},
    settlement::Settlement,
    spend::{BUDGET_STEERED, HoldFor, Payer, Purpose, Spend},
};

mod begin;
mod call;
mod walks;

use call::{current_trace_id, refused, start_event};

/// The router's gRPC service. Cheap to clone: the route table is shared and each channel (to
/// inference, session and budget) multiplexes every call.
#[derive(Debug, Clone)]
pub struct RouterApi {
    routes: Arc<RouteTable>,
    inference: Inference,
    sessions: Sessions,
    spend: Spend,
    reviews: Reviews,
    idempotency: Idempotency,
    /// The response cache ([`crate::cache`]; off by default).
    cache: ResponseCache,
    /// Asynchronous jobs, when on ([`crate::jobs`]).
    pub(crate) jobs: Option<crate::jobs::api::Jobs>,
}

impl RouterApi {
    /// A router over validated `routes`, calling inference through `client` (the mesh's client
    /// stack over a channel to the inference service). Sessions and budgets are off until
    /// [`RouterApi::with_sessions`] and [`RouterApi::with_budget`] turn them on.
    pub fn new(routes: RouteTable, client: ClientStack) -> Self {
        Self {
            routes: Arc::new(routes),
            inference: Inference::new(client),
            sessions: Sessions::off(),
            spend: Spend::off(),
            reviews: Reviews::off(),
            idempotency: Idempotency::in_memory("router"),
            cache: ResponseCache::default(),
            jobs: None,
        }
    }

    /// Serves the job RPCs from `jobs` (they answer FAILED_PRECONDITION until this is called).
    pub fn with_jobs(mut self, jobs: crate::jobs::api::Jobs) -> Self {
        self.jobs = Some(jobs);
        self
    }

    /// The jobs this router serves, when on.
    pub fn jobs(&self) -> Option<&crate::jobs::api::Jobs> {
        self.jobs.as_ref()
    }

    /// Keeps the idempotency records of requests with a `request_id` in `records` (in the
    /// process until this is called; see [`crate::replay`]).
    pub fn with_idempotency(mut self, records: Idempotency) -> Self {
        self.idempotency = records;
        self
    }

    /// Answers identical deterministic requests from `cache` (see [`crate::cache`]).
    pub(crate) fn with_cache(mut self, cache: ResponseCache) -> Self {
        self.cache = cache;
        self
    }

    /// Loads and appends session history through `client` (a client stack over a channel to the
    /// session service).
    pub fn with_sessions(mut self, client: ClientStack) -> Self {
        self.sessions = Sessions::new(client);
        self
    }

    /// Reserves and commits every request's cost through `client` (a client stack over a channel
    /// to the budget service), with `policy` for when it cannot answer. Fails, naming
    /// `models.<name>.price`, when a model of the catalog has no price.
    pub fn with_budget(
        mut self,
        client: ClientStack,
        policy: BudgetPolicy,
    ) -> Result<Self, ConfigError> {
        self.spend = Spend::new(client, self.routes.shared_catalog(), policy)?;
        Ok(self)
    }

    /// Sends answers that `policies` flag to the review service through `client` (a client stack
    /// over a channel to it); see [`crate::review_gate`].
    pub fn with_reviews(mut self, client: ClientStack, policies: Policies) -> Self {
        self.reviews = Reviews::new(client, policies, self.routes.shared_catalog());
        self
    }

    /// The client stack of the calls to inference: its circuit breakers and bulkheads by model.
    pub fn inference_client(&self) -> &ClientStack {
        self.inference.stack()
    }

    /// The client stack of the calls to the session service, when sessions are on.
    pub fn session_client(&self) -> Option<&ClientStack> {
        self.sessions.stack()
    }

    /// The client stack of the calls to the budget service, when budgets are on.
    pub fn budget_client(&self) -> Option<&ClientStack> {
        self.spend.stack()
    }

    /// The client stack of the calls to the review service, when review is on.
    pub fn review_client(&self) -> Option<&ClientStack> {
        self.reviews.stack()
    }

    /// The route table requests are resolved against.
    pub fn routes(&self) -> &RouteTable {
        &self.routes
    }

    /// The admin service over this router's routes and response cache ([`crate::admin`]).
    pub fn route_admin(&self) -> crate::admin::RouteAdmin {
        crate::admin::RouteAdmin::new(Arc::clone(&self.routes), self.cache.clone())
    }
}

/// One request on its way through the walk: what steps 2 to 8 share.
struct Walk {
    completion: Completion,
    plan: Plan,
    call: Call,
    payer: Payer,
    history: History,
    /// The rate limit decision, when the request started before it was known; `None` once
    /// admitted.
    verdict: Option<PendingVerdict>,
    /// What the walk did differently, for the answer.
    notices: Vec<Notice>,
    /// What the `weir-cache` metadata asks of the response cache.
    cache: Control,
}

/// The RPCs that start while their rate limit check runs
/// ([`weir_mesh::ratelimit::RateLimitLayer::overlapping`]): their walk waits for the verdict
/// before claiming a `request_id` and, alongside steps 3 and 4, before any model call.
pub const RATE_LIMIT_OVERLAPPED: &[&str] = &[
    "/weir.router.v1.RouterService/Complete",
    "/weir.router.v1.RouterService/CompleteStream",
];

/// What a request refused by the rate limit while it started answers (the rate limit layer
/// answers its own refusal in its place).
fn rate_limited(walk: &Walk) -> ApiError {
    ApiError::resource_exhausted(
        "RATE_LIMITED",
        walk.payer.tenant().to_string(),
        "rate limit exceeded",
    )
}

/// A candidate ready to be called: its prompt, the most it may answer (what was reserved, sent
/// upstream as `max_tokens`) and what it will owe.
struct Prepared {
    prompt: Vec<Message>,
    max_output: u32,
    settlement: Settlement,
}

/// How the answer goes back to the client: the only thing in which the execution models differ.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Delivery {
    /// `Complete`: the whole answer at once.
    Unary,
    /// `CompleteStream`: tokens as they are generated.
    Stream,
}

/// A candidate's answer, before it is delivered. One per request, moved once: not worth a box.
#[allow(clippy::large_enum_variant)]
enum Answer {
    /// A whole answer, what it still owes (settled before it is sent) and its review.
    Unary {
        response: GenerateResponse,
        settlement: Settlement,
        gate: Option<Gate>,
    },
    /// A stream whose first event has arrived; it settles itself as it ends.
    Stream(CompleteStream),
}

/// What step 5 produced. One per request, moved once: not worth a box.
#[allow(clippy::large_enum_variant)]
enum Served {
    /// A model answered: the candidate at `position` of the plan.
    Model {
        answer: Answer,
        model: String,
        position: usize,
    },
    /// Every candidate failed and the route's degraded answer is served (its notice is pushed).
    Degraded { text: String },
}

#[tonic::async_trait]
impl RouterService for RouterApi {
    async fn complete(
        &self,
        request: Request<CompleteRequest>,
    ) -> Result<Response<CompleteResponse>, Status> {
        let walk = self.start(request).await?;
        let guard = match self.claim(&walk, Rpc::Complete).await? {
            None => return self.complete_walk(walk).await.map(Response::new),
            Some(Claim::Replay(recorded)) => return replay::unary(&recorded).map(Response::new),
            Some(Claim::Run(guard)) => guard,
        };
        // A claimed request runs to its end and its outcome is recorded even if this handler is
        // dropped (the caller's deadline passed, the caller went away): its retry then gets the
        // answer instead of running and paying again. The walk is still bounded by the deadline.
        let api = self.clone();
        let task = tokio::spawn(
            async move {
                let result = api.complete_walk(walk).await;
                replay::record_unary(guard, &result).await;
                result
            }
            .in_current_span(),
        );
        match task.await {
            Ok(result) => result.map(Response::new),
            Err(error) => Err(Status::internal(format!(
                "the request's task failed: {error}"
            ))),
        }
    }

    async fn complete_stream(
        &self,
        request: Request<CompleteStreamRequest>,
    ) -> Result<Response<CompleteStream>, Status> {
        let walk = self.start(request).await?;
        let guard = match self.claim(&walk, Rpc::CompleteStream).await? {
            None => return self.stream_walk(walk).await.map(Response::new),
            Some(Claim::Replay(recorded)) => return replay::stream(&recorded).map(Response::new),
            Some(Claim::Run(guard)) => guard,
        };
        match self.stream_walk(walk).await {
            Ok(stream) => Ok(Response::new(replay::recording(stream, guard))),
            Err(status) => {
                replay::record_stream_error(guard, &status).await;
                Err(status)
            }
        }
    }

    async fn submit_job(
        &self,
        request: Request<weir_proto::router::SubmitJobRequest>,
    ) -> Result<Response<weir_proto::router::SubmitJobResponse>, Status> {
        crate::jobs::api::submit(self, request).await
    }

    async fn get_job(
        &self,
        request: Request<weir_proto::router::GetJobRequest>,
    ) -> Result<Response<weir_proto::router::GetJobResponse>, Status> {
        crate::jobs::api::get(self, request).await
    }

    async fn watch_job(
        &self,
        request: Request<weir_proto::router::WatchJobRequest>,
    ) -> Result<Response<tonic::codegen::BoxStream<weir_proto::router::WatchJobResponse>>, Status>
    {
        crate::jobs::api::watch(self, request).await
    }

    async fn cancel_job(
        &self,
        request: Request<weir_proto::router::CancelJobRequest>,
    ) -> Result<Response<weir_proto::router::CancelJobResponse>, Status> {
        crate::jobs::api::cancel(self, request).await
    }

    async fn list_jobs(
        &self,
        request: Request<weir_proto::router::ListJobsRequest>,
    ) -> Result<Response<weir_proto::router::ListJobsResponse>, Status> {
        crate::jobs::api::list(self, request).await
    }

    async fn create_batch(
        &self,
        request: Request<weir_proto::router::CreateBatchRequest>,
    ) -> Result<Response<weir_proto::router::CreateBatchResponse>, Status> {
        crate::jobs::batch_api::create(self, request).await
    }

    async fn get_batch(
        &self,
        request: Request<weir_proto::router::GetBatchRequest>,
    ) -> Result<Response<weir_proto::router::GetBatchResponse>, Status> {
        crate::jobs::batch_api::get(self, request).await
    }

    async fn stream_batch_results(
        &self,
        request: Request<weir_proto::router::StreamBatchResultsRequest>,
    ) -> Result<
        Response<tonic::codegen::BoxStream<weir_proto::router::StreamBatchResultsResponse>>,
        Status,
    > {
        crate::jobs::batch_api::results(self, request).await
    }

    async fn cancel_batch(
        &self,
        request: Request<weir_proto::router::CancelBatchRequest>,
    ) -> Result<Response<weir_proto::router::CancelBatchResponse>, Status> {
        crate::jobs::batch_api::cancel(self, request).await
    }

    async fn list_batches(
        &self,
        request: Request<weir_proto::router::ListBatchesRequest>,
    ) -> Result<Response<weir_proto::router::ListBatchesResponse>, Status> {
        crate::jobs::batch_api::list(self, request).await
    }
}
#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    //! The handlers' own refusals, and unreachable inference, session and budget services. Answers
    //! from running services are covered end to end in tests/ (router_sessions, router_budget).

    use tonic::Code;
    use tonic_types::StatusExt;
    use weir_mesh::catalog::Catalog;
    use weir_proto::common::{Message, Role};

    use super::*;
    use crate::Config;

    /// A router whose inference service is a closed port, without sessions or budgets.
    fn api() -> RouterApi {
        api_with(Config {
            session_url: String::new(),
            budget_url: String::new(),
            ..closed_ports()
        })
    }

    /// Every service the router calls is a closed port.
    fn closed_ports() -> Config {
        Config {
            inference_url: "http://127.0.0.1:1".to_string(),
            session_url: "http://127.0.0.1:1".to_string(),
            budget_url: "http://127.0.0.1:1".to_string(),
            ..Config::default()
        }
    }

    fn api_with(config: Config) -> RouterApi {
        crate::router_api(&config, Arc::new(Catalog::default()), Default::default()).unwrap()
    }

    fn request(model: &str) -> CompleteRequest {
        CompleteRequest {
            model: model.to_string(),
            messages: vec![Message {
                role: Role::User.into(),
                content: "hello".to_string(),
                ..Message::default()
            }],
            ..CompleteRequest::default()
        }
    }

    fn stream_request(model: &str) -> CompleteStreamRequest {
        let request = request(model);
        CompleteStreamRequest {
            model: request.model,
            messages: request.messages,
            ..CompleteStreamRequest::default()
        }
    }

    fn reason(status: &Status) -> Option<String> {
        status
            .get_error_details()
            .error_info()
            .map(|i| i.reason.clone())
    }

    #[tokio::test]
    async fn refusals_come_before_any_model_call() {
        let api = api();
        let mut no_messages = request("auto");
        no_messages.messages.clear();
        let status = api.complete(Request::new(no_messages)).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument);

        // A session with no session service configured is refused, not answered without it.
        let mut session = request("auto");
        session.session_id = "s-1".to_string();
        let status = api.complete(Request::new(session)).await.unwrap_err();
        assert_eq!(status.code(), Code::FailedPrecondition);
        assert_eq!(reason(&status).as_deref(), Some("SESSIONS_DISABLED"));

        let status = api.complete(Request::new(request(""))).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument);

        let status = api
            .complete(Request::new(request("gpt-9")))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::NotFound);
        assert_eq!(reason(&status).as_deref(), Some("MODEL_NOT_FOUND"));

        let status = api
            .complete_stream(Request::new(stream_request("gpt-9")))
            .await
            .err()
            .unwrap();
        assert_eq!(status.code(), Code::NotFound);
    }

    #[tokio::test]
    async fn an_unreachable_inference_service_is_unavailable() {
        let api = api();
        let status = api
            .complete(Request::new(request("auto")))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::Unavailable, "{status:?}");
        assert!(reason(&status).is_some());

        let status = api
            .complete_stream(Request::new(stream_request("sim-small")))
            .await
            .err()
            .unwrap();
        assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    }

    #[tokio::test]
    async fn an_unreachable_budget_service_fails_closed_before_any_model_call() {
        let api = api_with(closed_ports());
        let status = api
            .complete(Request::new(request("auto")))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::Unavailable, "{status:?}");
        assert_eq!(reason(&status).as_deref(), Some("BUDGET_UNAVAILABLE"));
        assert!(status.message().contains("router.budget.fail_open"));
        assert!(
            status.get_error_details().retry_info().is_some(),
            "the client is told when to retry"
        );
        let status = api
            .complete_stream(Request::new(stream_request("sim-small")))
            .await
            .err()
            .unwrap();
        assert_eq!(reason(&status).as_deref(), Some("BUDGET_UNAVAILABLE"));
    }

    #[tokio::test]
    async fn a_fail_open_tenant_goes_on_to_the_model() {
        let mut config = closed_ports();
        config.budget.fail_open = true;
        let api = api_with(config);
        // The budget check is skipped; the (unreachable) model answers for itself.
        let status = api
            .complete(Request::new(request("sim-small")))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::Unavailable, "{status:?}");
        assert_ne!(reason(&status).as_deref(), Some("BUDGET_UNAVAILABLE"));
    }

    #[tokio::test]
    async fn clients_exist_only_for_configured_services() {
        let api = api();
        assert!(api.session_client().is_none());
        assert!(api.budget_client().is_none());
        let api = api_with(closed_ports());
        assert!(api.session_client().is_some());
        assert!(api.budget_client().is_some());
    }
}
