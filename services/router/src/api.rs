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
    spend::{BUDGET_STEERED, Payer, Spend},
};

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

    /// Steps 1 and 2 for a gRPC request of any execution model.
    async fn start<T>(&self, request: Request<T>) -> Result<Walk, Status>
    where
        Completion: From<T>,
    {
        let deadline = Deadline::from_request(&request);
        let (metadata, extensions, body) = request.into_parts();
        self.begin(&metadata, &extensions, deadline, Completion::from(body))
            .await
            .map_err(refused)
    }

    /// Step 2 of the walk, shared by every execution model: checks, route, steering.
    async fn begin(
        &self,
        metadata: &MetadataMap,
        extensions: &http::Extensions,
        deadline: Option<Deadline>,
        completion: Completion,
    ) -> Result<Walk, ApiError> {
        completion.check()?;
        let plan = self
            .routes
            .resolve(&completion.model, completion.session())?;
        let history = self.sessions.history(&completion)?;
        // The body's criticality overrides the header's, within what the caller's key may claim
        // (the auth layer already lowered the header to that ceiling).
        let criticality = completion
            .criticality()
            .map(|claimed| claimed.max(weir_mesh::auth::criticality_ceiling(extensions)));
        // Admission ran on the header before the body was read: the body's criticality must pass
        // it too, so that this router sheds the request by the criticality it forwards.
        if let (Some(criticality), Some(admitted)) = (criticality, extensions.get::<Admitted>())
            && admitted.criticality() != criticality
        {
            admitted.readmit(criticality)?;
        }
        let cache = if self.cache.is_on() {
            Control::from_metadata(metadata)?
        } else {
            Control::Normal
        };
        let call = Call::new(metadata, deadline, criticality);
        let tenant = extensions
            .get::<Tenant>()
            .cloned()
            .or_else(|| Tenant::from_metadata(metadata).ok())
            .unwrap_or_default();
        let payer = Payer::new(tenant, ApiKeyId::of(extensions))
            .with_tier(crate::request::price_tier(metadata, extensions));
        let mut walk = Walk {
            completion,
            plan,
            call,
            payer,
            history,
            verdict: PendingVerdict::of(extensions),
            notices: Vec::new(),
            cache,
        };
        self.steer(&mut walk, metadata).await;
        Ok(walk)
    }

    /// Lets the route's rules pick a tier ([`crate::rules`]), with a notice naming the rule: a
    /// budget rule's is [`BUDGET_STEERED`], any other's [`ROUTE_RULE`]. The tenant's budget is
    /// read (one GetBudget) only when budgets are on and a rule of the route tests it.
    async fn steer(&self, walk: &mut Walk, metadata: &MetadataMap) {
        if !walk.plan.has_rules() {
            return;
        }
        let soft_limit_reached = self.spend.is_on()
            && walk.plan.needs_budget()
            && self.spend.soft_limit_reached(&walk.call, &walk.payer).await;
        let prompt = crate::matching::prompt_text(&walk.completion.messages);
        // Counted for the route's first model, so a rule's threshold means one thing per route.
        let family = walk
            .plan
            .route()
            .and_then(|route| route.candidates().first())
            .and_then(|candidate| self.routes.catalog().get(candidate.model()))
            .map_or(tokens::SIM_FAMILY, |spec| spec.family());
        let prompt_tokens = tokens::count_messages(family, &walk.completion.messages);
        let tenant = walk.payer.tenant().to_string();
        let quality = walk
            .completion
            .labels
            .get(QUALITY_LABEL)
            .map(String::as_str)
            .or_else(|| {
                metadata
                    .get(weir_mesh::metadata::QUALITY)
                    .and_then(|value| value.to_str().ok())
            });
        let facts = RuleFacts {
            prompt: &prompt,
            prompt_tokens,
            quality,
            tenant: &tenant,
            plan: self.routes.plan(&tenant),
            soft_limit_reached,
        };
        let Some(ruled) = walk.plan.ruled(&facts) else {
            return;
        };
        let Some(rule) = ruled.rule() else {
            return;
        };
        let route = ruled.route_alias();
        tracing::debug!(
            tenant = %tenant, route, rule = rule.name(), tier = rule.tier(),
            "a routing rule picked the tier"
        );
        metrics::counter!(
            "weir_route_rule_total",
            "route" => route.to_string(),
            "rule" => rule.name().to_string()
        )
        .increment(1);
        let notice = if rule.needs_budget() {
            Notice {
                reason: BUDGET_STEERED.to_string(),
                message: format!(
                    "tenant {tenant} is above its soft budget limit; route {route} served this \
                     request from its {} tier (rule {})",
                    rule.tier(),
                    rule.name()
                ),
            }
        } else {
            Notice {
                reason: ROUTE_RULE.to_string(),
                message: format!(
                    "rule {} of route {route} picked tier {}",
                    rule.name(),
                    rule.tier()
                ),
            }
        };
        walk.notices.push(notice);
        walk.plan = ruled;
    }

    /// Steps 3 and 4 for one candidate, while the rate limit check that let the request start
    /// early finishes (see [`RATE_LIMIT_OVERLAPPED`]): a refused request's hold is released
    /// before it ends, and no model runs for it.
    async fn prepare(&self, walk: &mut Walk, model: &str) -> Result<Prepared, ApiError> {
        let Some(verdict) = walk.verdict.clone() else {
            return self.prepare_candidate(walk, model).await;
        };
        let (admitted, prepared) =
            tokio::join!(verdict.admitted(), self.prepare_candidate(walk, model));
        if admitted {
            walk.verdict = None;
            return prepared;
        }
        let error = rate_limited(walk);
        if let Ok(prepared) = prepared {
            prepared.settlement.failed(&error);
        }
        Err(error)
    }

    /// Steps 3 and 4 for one candidate: its prompt (the session's context for it, then the new
    /// messages) and the hold on its worst-case cost.
    async fn prepare_candidate(&self, walk: &mut Walk, model: &str) -> Result<Prepared, ApiError> {
        let spec = self.routes.catalog().get(model).ok_or_else(|| {
            ApiError::internal(format!("route candidate {model} left the catalog"))
        })?;
        let prompt = walk
            .history
            .prompt(&walk.call, &walk.completion, model, spec, &mut walk.notices)
            .await?;
        let prompt_tokens = tokens::count_messages(spec.family(), &prompt);
        let room = spec.context_window.saturating_sub(prompt_tokens);
        let max_output = walk.completion.max_output_tokens(spec).min(room);
        let hold = self
            .spend
            .reserve(
                &walk.call,
                &walk.payer,
                model,
                prompt_tokens,
                max_output,
                &mut walk.notices,
            )
            .await?;
        let append = walk.history.append(&walk.completion);
        Ok(Prepared {
            prompt,
            max_output,
            settlement: Settlement::new(&walk.call, hold, append, spec.family()),
        })
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

impl RouterApi {
    /// Step 5, the same for every execution model: the candidates in order, each later one only
    /// after a fallback-worthy failure of the one before ([`crate::fallback`]), then the route's
    /// degraded answer. Steps 3 and 4 run again for each candidate tried (its own context size and
    /// price); a failed candidate is settled by the one rule of [`Settlement::failed`].
    async fn serve(&self, walk: &mut Walk, delivery: Delivery) -> Result<Served, Status> {
        let plan = walk.plan.clone();
        let mut last_error = None;
        for (position, candidate) in plan.candidates().iter().enumerate() {
            let model = candidate.model();
            if position > 0 && out_of_time(&walk.call) {
                break;
            }
            // 3., 4. Context and reservation for this candidate.
            let prepared = self.prepare(walk, model).await.map_err(refused)?;
            match self
                .attempt(walk, delivery, model, position, prepared)
                .await
            {
                Ok(answer) => {
                    return Ok(Served::Model {
                        answer,
                        model: model.to_string(),
                        position,
                    });
                }
                Err(error) => {
                    let error = failed(&plan, model, error)?;
                    walk.notices.push(fallback_notice(model, &error));
                    last_error = Some(error);
                }
            }
        }
        let text = degraded(&plan, &walk.completion, last_error, &mut walk.notices)?;
        Ok(Served::Degraded { text })
    }

    /// One candidate's model call. A stream is only returned once its first event has arrived: a
    /// failure before it can still fall back, as the client has seen nothing yet.
    async fn attempt(
        &self,
        walk: &Walk,
        delivery: Delivery,
        model: &str,
        position: usize,
        prepared: Prepared,
    ) -> Result<Answer, ApiError> {
        let Prepared {
            prompt,
            max_output,
            settlement,
        } = prepared;
        let (call, completion) = (&walk.call, &walk.completion);
        let tenant = walk.payer.tenant().as_str();
        let route = walk.plan.route_alias();
        let gate = self
            .reviews
            .gate(call, completion, tenant, route, model, &prompt);
        match delivery {
            Delivery::Unary => {
                let request = completion.generate_request(model, prompt, max_output);
                match self.inference.generate(call, model, request).await {
                    Ok(response) => Ok(Answer::Unary {
                        response,
                        settlement,
                        gate,
                    }),
                    Err(error) => {
                        settlement.failed(&error);
                        Err(error)
                    }
                }
            }
            Delivery::Stream => {
                let request = completion.generate_stream_request(model, prompt, max_output);
                let upstream = match self.inference.generate_stream(call, model, request).await {
                    Ok(upstream) => upstream,
                    Err(error) => {
                        settlement.failed(&error);
                        return Err(error);
                    }
                };
                let start = start_event(&walk.plan, model, walk.plan.served_by(position));
                let notices = walk.notices.clone();
                let stream = relay::open(start, notices, upstream, settlement, gate).await?;
                Ok(Answer::Stream(stream))
            }
        }
    }

    /// Steps 6 to 8 of a unary answer: settle and review it (commit, append, queue), then the
    /// response; an error only for a blocking review that could not be queued.
    async fn respond(
        walk: Walk,
        answer: (GenerateResponse, Settlement, Option<Gate>),
        model: &str,
        position: usize,
    ) -> Result<CompleteResponse, Status> {
        let (response, settlement, gate) = answer;
        let Walk {
            plan, mut notices, ..
        } = walk;
        let usage = response.usage;
        let message = response.message.clone().unwrap_or_else(|| Message {
            role: Role::Assistant.into(),
            ..Message::default()
        });
        // 6. Commit the usage and append the exchange; 7. the review policy may hold or sample
        //    the answer.
        let text = message.content.clone();
        let concluded = review_gate::conclude(gate, settlement, usage, &text, Some(message))
            .await
            .map_err(refused)?;
        let settled = concluded.settled;
        notices.extend(settled.notices);
        tracing::debug!(
            requested = plan.requested_model(),
            route = plan.route_alias(),
            model,
            position,
            input_tokens = usage.map(|u| u.input_tokens),
            output_tokens = usage.map(|u| u.output_tokens),
            cost_micros = settled.cost_micros,
            "completed"
        );
        let served_model = if response.model.is_empty() {
            model.to_string()
        } else {
            response.model
        };
        Ok(CompleteResponse {
            // Withheld for a blocking review: the caller gets it from the review service.
            message: response.message.filter(|_| !concluded.withheld),
            model: served_model,
            requested_model: plan.requested_model().to_string(),
            route: plan.route_alias().to_string(),
            served_by: plan.served_by(position).into(),
            finish_reason: response.finish_reason,
            usage,
            cost_micros: settled.cost_micros,
            review_status: concluded.status.into(),
            review_id: concluded.review_id,
            trace_id: current_trace_id(),
            notices,
        })
    }
}

impl RouterApi {
    /// The response cache's step, between the idempotency claim and step 3: an identical
    /// deterministic request's stored answer (no budget hold, no model call), once the rate limit
    /// has admitted the request; or `None`, with what the answer is to be offered to.
    async fn look_up(&self, walk: &Walk, rpc: Rpc) -> Result<Looked, Status> {
        let looked = self
            .cache
            .look(walk.cache, rpc, walk.payer.tenant(), &walk.completion)
            .await;
        if matches!(looked, Looked::Hit(_))
            && let Some(verdict) = &walk.verdict
            && !verdict.admitted().await
        {
            return Err(refused(rate_limited(walk)));
        }
        Ok(looked)
    }

    /// What a cache hit is charged: the stored answer's usage scaled by
    /// `router.cache.cached_price_fraction` at `model`'s price, reserved and committed like a
    /// model call's (so a spent budget refuses it); 0, with nothing reserved, by default.
    async fn charge_hit(
        &self,
        walk: &Walk,
        model: &str,
        usage: Option<Usage>,
        notices: &mut Vec<Notice>,
    ) -> Result<i64, Status> {
        let fraction = self.cache.price_fraction();
        let Some(usage) = usage.filter(|_| fraction > 0.0) else {
            return Ok(0);
        };
        let usage = cache::scaled(usage, fraction);
        let tokens = |n: i64| u32::try_from(n.max(0)).unwrap_or(u32::MAX);
        let hold = self
            .spend
            .reserve(
                &walk.call,
                &walk.payer,
                model,
                tokens(usage.input_tokens),
                tokens(usage.output_tokens),
                notices,
            )
            .await
            .map_err(refused)?;
        let Some(hold) = hold else {
            return Ok(0);
        };
        match hold.commit(&walk.call, usage).await {
            Ok(cost) => Ok(cost),
            Err(error) => {
                tracing::warn!(
                    reason = error.reason(),
                    "a cache hit's charge was not committed"
                );
                Ok(0)
            }
        }
    }

    /// Steps 5 to 8 of a unary request, or its answer from the response cache.
    async fn complete_walk(&self, walk: Walk) -> Result<CompleteResponse, Status> {
        let pending = match self.look_up(&walk, Rpc::Complete).await? {
            Looked::Hit(entry) => match cache::hit_answer(&entry, current_trace_id()) {
                Some(mut response) => {
                    let model = response.model.clone();
                    response.cost_micros = self
                        .charge_hit(&walk, &model, response.usage, &mut response.notices)
                        .await?;
                    return Ok(response);
                }
                None => None,
            },
            Looked::Miss(pending) => pending,
        };
        let result = self.complete_model_walk(walk).await;
        if let (Some(pending), Ok(response)) = (pending, &result) {
            pending.store_answer(response).await;
        }
        result
    }

    /// Steps 5 to 8 of a unary request.
    async fn complete_model_walk(&self, mut walk: Walk) -> Result<CompleteResponse, Status> {
        Ok(match self.serve(&mut walk, Delivery::Unary).await? {
            Served::Model {
                answer:
                    Answer::Unary {
                        response,
                        settlement,
                        gate,
                    },
                model,
                position,
            } => Self::respond(walk, (response, settlement, gate), &model, position).await?,
            Served::Model {
                answer: Answer::Stream(_),
                ..
            } => return Err(Status::internal("a unary walk produced a stream")),
            Served::Degraded { text } => CompleteResponse {
                message: Some(Message {
                    role: Role::Assistant.into(),
                    content: text,
                    ..Message::default()
                }),
                model: String::new(),
                requested_model: walk.plan.requested_model().to_string(),
                route: walk.plan.route_alias().to_string(),
                served_by: ServedBy::Degraded.into(),
                finish_reason: FinishReason::Stop.into(),
                usage: Some(Usage::default()),
                cost_micros: 0,
                review_status: ReviewStatus::NotRequired.into(),
                review_id: String::new(),
                trace_id: current_trace_id(),
                notices: walk.notices,
            },
        })
    }

    /// Steps 5 to 8 of a streamed request, or its answer from the response cache (replayed as
    /// the stream it was stored as).
    async fn stream_walk(&self, walk: Walk) -> Result<CompleteStream, Status> {
        let pending = match self.look_up(&walk, Rpc::CompleteStream).await? {
            Looked::Hit(entry) => match cache::hit_events(&entry, current_trace_id()) {
                Some(mut events) => {
                    let (model, usage) = cache::served(&events);
                    let mut notices = Vec::new();
                    let cost = self.charge_hit(&walk, &model, usage, &mut notices).await?;
                    cache::set_cost(&mut events, cost, notices);
                    return Ok(cache::replayed(events));
                }
                None => None,
            },
            Looked::Miss(pending) => pending,
        };
        let stream = self.stream_model_walk(walk).await?;
        Ok(match pending {
            Some(pending) => pending.storing(stream),
            None => stream,
        })
    }

    /// Steps 5 to 8 of a streamed request: the stream, which settles itself as it ends.
    async fn stream_model_walk(&self, mut walk: Walk) -> Result<CompleteStream, Status> {
        // 6./7. Budget commit, session append and review of a streamed answer run when the relay
        //    sees `done` (or the stream ends early).
        match self.serve(&mut walk, Delivery::Stream).await? {
            Served::Model {
                answer: Answer::Stream(stream),
                model,
                position,
            } => {
                tracing::debug!(
                    requested = walk.plan.requested_model(),
                    route = walk.plan.route_alias(),
                    model,
                    position,
                    "streaming"
                );
                Ok(stream)
            }
            Served::Model {
                answer: Answer::Unary { .. },
                ..
            } => Err(Status::internal("a streaming walk produced a unary answer")),
            Served::Degraded { text } => {
                let start = start_event(&walk.plan, "", ServedBy::Degraded);
                Ok(relay::degraded(start, text, walk.notices))
            }
        }
    }

    /// Claims the request's `request_id`, if it has one (see [`crate::replay`]).
    async fn claim(&self, walk: &Walk, rpc: Rpc) -> Result<Option<Claim>, Status> {
        if walk.completion.request_id.is_empty() {
            return Ok(None);
        }
        // A refused request claims nothing: its retry must run, not replay the refusal.
        if let Some(verdict) = &walk.verdict
            && !verdict.admitted().await
        {
            return Err(refused(rate_limited(walk)));
        }
        self.idempotency
            .claim(
                walk.payer.tenant(),
                &walk.completion.request_id,
                replay::fingerprint(rpc, &walk.completion),
                walk.call.deadline(),
            )
            .await
            .map(Some)
            .map_err(refused)
    }
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

/// The `start` event of a stream served by `model`.
fn start_event(plan: &Plan, model: &str, served_by: ServedBy) -> Start {
    Start {
        model: model.to_string(),
        requested_model: plan.requested_model().to_string(),
        route: plan.route_alias().to_string(),
        served_by: served_by.into(),
        trace_id: current_trace_id(),
    }
}

/// Whether the caller's deadline has passed, so no further candidate is worth trying.
fn out_of_time(call: &Call) -> bool {
    call.deadline()
        .is_some_and(|deadline| deadline.is_expired())
}

/// A failed model call: `Ok(error)` when the walk may try the next candidate, `Err(status)` when
/// the failure ends the request (passed through with its details).
fn failed(plan: &Plan, model: &str, error: ApiError) -> Result<ApiError, Status> {
    tracing::debug!(
        requested = plan.requested_model(),
        route = plan.route_alias(),
        model,
        code = ?error.code(),
        reason = error.reason(),
        "model call failed"
    );
    if fallback::falls_back(&error) {
        Ok(error)
    } else {
        Err(Status::from(error))
    }
}

/// The notice recording that `model` failed and the walk moved on.
fn fallback_notice(model: &str, error: &ApiError) -> Notice {
    Notice {
        reason: FALLBACK_USED.to_string(),
        message: format!("{model} failed ({}); tried the next model", error.reason()),
    }
}

/// Every candidate failed: the route's degraded answer (its notice pushed onto `notices`), or the
/// last error.
fn degraded(
    plan: &Plan,
    completion: &Completion,
    last_error: Option<ApiError>,
    notices: &mut Vec<Notice>,
) -> Result<String, Status> {
    let last_error =
        last_error.unwrap_or_else(|| ApiError::internal("the route has no candidate to call"));
    match plan.degraded() {
        Some(degraded) => {
            tracing::warn!(
                requested = plan.requested_model(),
                route = plan.route_alias(),
                reason = last_error.reason(),
                "every model failed; serving the degraded answer"
            );
            notices.push(Notice {
                reason: DEGRADED.to_string(),
                message: format!(
                    "every model of route {} failed (last: {}); this is the route's degraded answer",
                    plan.route_alias(),
                    last_error.reason()
                ),
            });
            Ok(degraded.text(&completion.messages))
        }
        None => Err(Status::from(last_error)),
    }
}

/// The trace id of the call being answered (empty when telemetry is not installed).
fn current_trace_id() -> String {
    weir_mesh::trace::current_trace_id().unwrap_or_default()
}

/// Notice reason: an earlier candidate failed and a later one served the answer.
pub const FALLBACK_USED: &str = "FALLBACK_USED";
/// Notice reason: every candidate failed and the route's degraded answer was served.
pub const DEGRADED: &str = "DEGRADED";

/// A request refused before (or between) model calls, with its details.
fn refused(error: ApiError) -> Status {
    tracing::debug!(code = ?error.code(), reason = error.reason(), "refused");
    Status::from(error)
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
