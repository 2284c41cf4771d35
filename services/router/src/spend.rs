//! Budgets: the router's client of the budget service (steps 2, 4 and 6 of the walk).
//!
//! With `router.budget_url` set, every request pays for what it asks of a model, and a tenant's
//! spend never passes its hard limit however many requests (and router replicas) run at once:
//!
//! - **Steer (step 2).** When a rule of the plan's route tests the budget (its economy tier, or a
//!   rule with `budget = "soft_limit_reached"`; see [`crate::rules`]), the router reads the
//!   tenant's budget (`GetBudget`, once); once spend has passed the soft limit in the current
//!   period (`soft_limit_reached`), that rule's tier serves the request and the answer carries a
//!   [`BUDGET_STEERED`] notice. A tenant without a budget, or a budget that cannot be read, is not
//!   steered (the reservation below decides what an outage means).
//! - **Reserve (step 4).** Before each model call, `Reserve` holds the request's worst case: the
//!   prompt's tokens (the session's history included, counted with the model's tokenizer family)
//!   plus the most output the request allows (`params.max_tokens`, else the model's
//!   `max_output_tokens`, never more than what is left of the context window), at the model's
//!   price ([`weir_mesh::pricing::estimate`], the function the budget service prices with, so no
//!   extra network call). The hold is against the tenant and, when one authenticated the request,
//!   its API key, all or none (a scope without a budget only has its spend reported). Sessions
//!   are not a scope here: there are unboundedly many of them, and each scope keeps hourly spend
//!   records in Redis for the budget service's spend retention. Refused → RESOURCE_EXHAUSTED, reason `BUDGET_EXHAUSTED`, with the budget
//!   service's QuotaFailure (naming the scope, e.g. `tenant:acme`) and RetryInfo, before any model
//!   runs. A free model (price `free = true`) needs no hold.
//! - **Commit (step 6).** After the answer, `Commit` settles the hold with the usage the model
//!   reported, priced by the budget service at the reservation's model; the difference is
//!   refunded, and the response's `cost_micros` is the committed cost. The metric
//!   `weir_cost_microdollars_total{tenant, model}` counts committed cost.
//! - **Release.** A candidate whose model certainly never ran gives its hold back (`Release`);
//!   one that may have run is charged its prompt (the rule is `crate::settlement::model_never_ran`).
//!   **Fallbacks re-reserve**: the next candidate reserves its own worst case at its
//!   own price, so the commit, the spend report by model and the refund are those of the model that
//!   served. (Reserving the maximum over all candidates up front would hold more than needed on
//!   every request to pay for the rare fallback, and attribute the spend to the wrong model.)
//! - **Abandoned holds.** A `Hold` dropped without a commit or a release (the client cancelled a
//!   stream, a stream failed mid-answer, a unary call was cut off while its model ran) commits what
//!   is known to have been used: the prompt, and for streams the tokens relayed so far. The commit
//!   runs on a spawned task, since `Drop` cannot wait.
//!
//! Reservation and commit ids are made by the router, one per reservation, so the client stack may
//! retry `Reserve` and `Commit` (the budget service charges once per id). A request without a
//! `request_id` gets a fresh `rsv-<uuid>`. A request with one gets an id derived from the tenant,
//! the `request_id`, the model and what the hold pays for (a model call or a cache hit):
//! `rsv-<sha256 prefix>`. A client that repeats a request whose answer was recorded never reaches
//! the budget again (the router replays the answer, see [`crate::replay`]); but when the router
//! that ran the first attempt died before recording it (killed after its `Commit`, or during the
//! model call), the retry, on any replica, reserves under the same id and finds the first
//! attempt's reservation: still held, it is settled once by the retry; already committed, the
//! retry's `Commit` replays the first charge. So a request retried across a crash is paid once.
//! When the derived id names a reservation that can no longer be used (released or expired, or
//! made for another amount because the session's context changed), the next id of the series
//! (`...-1`, `...-2`, up to [`MAX_RESERVATION_REKEYS`]) is tried, then a fresh `rsv-<uuid>`. A hold lasts the request's deadline plus
//! its settlement time; a `Reserve` abandoned in flight (the caller left while it was out) is sent
//! again with the same id, which finds the same reservation, and released.
//!
//! **Prices.** A model the budget service cannot price is refused at `Reserve`
//! (FAILED_PRECONDITION [`PRICE_UNKNOWN`], naming the model) before it runs, or served with a
//! notice to a fail-open tenant; each reservation carries the router's price version (see
//! [`crate::prices`]).
//!
//! When the budget service cannot answer (UNAVAILABLE, including an open circuit or a full
//! bulkhead in the router's client stack, or DEADLINE_EXCEEDED while the caller still had time),
//! [`crate::config::BudgetPolicy`] decides: fail closed with UNAVAILABLE, reason
//! [`BUDGET_UNAVAILABLE`] (the default), or, for a fail-open tenant, serve unmetered with a
//! [`BUDGET_UNAVAILABLE`] notice and `cost_micros` 0. A commit that fails after the answer never
//! fails the answer: it is logged and noticed ([`BUDGET_COMMIT_FAILED`]), and the hold, which
//! already counts the worst case against the limit, expires after the budget service's reservation
//! TTL.

use std::{fmt, sync::Arc, time::Duration};

use tonic::Code;
use tracing::Instrument;
use weir_mesh::pricing::{self, Tier, Tokens};
use weir_mesh::{
    ApiError,
    auth::ApiKeyId,
    catalog::Catalog,
    client::{BoxedClient, ClientStack},
    config::ConfigError,
    tenant::Tenant,
};
use weir_proto::{
    budget::{
        CommitRequest, GetBudgetRequest, PriceTier, ReleaseRequest, ReservationState,
        ReserveRequest, Scope, ScopeKind, budget_service_client::BudgetServiceClient,
    },
    common::Usage,
    router::Notice,
};

use crate::{config::BudgetPolicy, inference::Call, settlement::SETTLE_TIMEOUT};

/// Backend key of the calls to the budget service (its breaker, bulkhead and retry budget).
pub const BUDGET_BACKEND: &str = "budget";
/// Notice reason (and, failing closed, ErrorInfo reason): the budget service could not answer.
pub const BUDGET_UNAVAILABLE: &str = "BUDGET_UNAVAILABLE";
/// Notice reason: the tenant is above its soft limit and the route's economy tier served.
pub const BUDGET_STEERED: &str = "BUDGET_STEERED";
/// Notice reason: the answer was delivered but its cost could not be committed.
pub const BUDGET_COMMIT_FAILED: &str = "BUDGET_COMMIT_FAILED";
/// Retry delay suggested when failing closed and the budget service gave none.
pub const BUDGET_RETRY_AFTER: Duration = Duration::from_secs(1);
/// Longest scope id the budget service accepts.
const MAX_SCOPE_ID_LEN: usize = 128;
/// The budget service's reason for a model it has no price for.
pub const PRICE_UNKNOWN: &str = "PRICE_UNKNOWN";

/// How long a reservation lasts if the router never settles it (its process died): the request's
/// remaining deadline plus the time its settlement may take, so an orphaned hold stops counting
/// against the tenant's limit soon after its request could have ended, not after a fixed
/// 10 minutes.
fn hold_ttl(call: &Call) -> prost_types::Duration {
    let ttl = call
        .deadline()
        .map_or(DEFAULT_HOLD_TTL, |d| d.remaining() + SETTLE_TIMEOUT);
    prost_types::Duration {
        seconds: i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(ttl.subsec_nanos()).unwrap_or(0),
    }
}

/// Releases the hold of a Reserve whose caller was dropped before its answer: the Reserve is sent
/// again with the same key (the budget service answers with the same reservation, holding
/// nothing more) and that reservation released, on a spawned task.
struct OrphanGuard(Option<(BudgetServiceClient<BoxedClient>, Call, ReserveRequest)>);

impl OrphanGuard {
    fn disarm(mut self) {
        self.0 = None;
    }
}

impl Drop for OrphanGuard {
    fn drop(&mut self) {
        let Some((mut client, call, request)) = self.0.take() else {
            return;
        };
        spawn_settling(async move {
            let call = call.with_deadline(settle_deadline());
            let key = request.request_id.clone();
            let Ok(response) = client
                .reserve(call.bookkeeping(request, BUDGET_BACKEND))
                .await
            else {
                return;
            };
            let Some(reservation) = response.into_inner().reservation else {
                return;
            };
            let release = ReleaseRequest {
                reservation_id: reservation.id,
            };
            match client
                .release(call.bookkeeping(release, BUDGET_BACKEND))
                .await
            {
                Ok(_) => tracing::debug!(%key, "released the hold of an abandoned reservation"),
                Err(status) => tracing::warn!(
                    %key, reason = ApiError::from_status(&status).reason(),
                    "could not release an abandoned reservation; it expires with its TTL"
                ),
            }
        });
    }
}

/// Hold lifetime of a request without a deadline (the server layers always set one).
const DEFAULT_HOLD_TTL: Duration = Duration::from_secs(600);

/// The router's client of the budget service; off when `router.budget_url` is empty. Cheap to
/// clone.
#[derive(Clone, Default)]
pub(crate) struct Spend {
    inner: Option<Arc<Inner>>,
}

struct Inner {
    client: BudgetServiceClient<BoxedClient>,
    stack: ClientStack,
    catalog: Arc<Catalog>,
    policy: BudgetPolicy,
}

impl fmt::Debug for Spend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Spend")
            .field("enabled", &self.inner.is_some())
            .finish()
    }
}

/// How many times a derived reservation id moves to the next of its series before a fresh
/// `rsv-<uuid>` is used (see the module doc).
pub const MAX_RESERVATION_REKEYS: u32 = 2;

/// What a hold pays for: part of a derived reservation id, so a cache hit's charge and a model
/// call of the same request never share a reservation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Purpose {
    /// A model call.
    Call,
    /// A cache hit's charge.
    CacheHit,
}

/// The reservation id of a request's `n`-th try at a hold for `model` (see the module doc): the same
/// on every replica for the same tenant, `request_id`, model and purpose.
fn derived_reservation_id(
    tenant: &Tenant,
    request_id: &str,
    model: &str,
    purpose: Purpose,
    n: u32,
) -> String {
    let purpose = match purpose {
        Purpose::Call => "call",
        Purpose::CacheHit => "hit",
    };
    let mut input = Vec::new();
    for part in [tenant.as_str(), request_id, model, purpose] {
        input.extend_from_slice(&(part.len() as u64).to_be_bytes());
        input.extend_from_slice(part.as_bytes());
    }
    let digest = ring::digest::digest(&ring::digest::SHA256, &input);
    let hex: String = digest.as_ref()[..16]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    match n {
        0 => format!("rsv-{hex}"),
        n => format!("rsv-{hex}-{n}"),
    }
}

/// Whether a `Reserve` refusal means the derived id cannot be used (see the module doc), so the
/// next id of the series is tried.
fn id_unusable(error: &ApiError) -> bool {
    error.reason() == "RESERVATION_GONE"
        || (error.code() == Code::InvalidArgument
            && error
                .metadata()
                .get("reason_detail")
                .is_some_and(|detail| detail == "IDEMPOTENCY_KEY_REUSED"))
}

/// What a hold is for: the model, what it pays for, and the worst case it holds (the prompt and
/// the most output the model may write).
#[derive(Debug, Clone, Copy)]
pub(crate) struct HoldFor<'a> {
    /// The model it pays for.
    pub model: &'a str,
    /// A model call or a cache hit's charge.
    pub purpose: Purpose,
    /// Tokens of the prompt.
    pub prompt_tokens: u32,
    /// Most tokens of answer.
    pub max_output_tokens: u32,
}

/// Who pays for a request: the tenant and the budget scopes a hold is made against.
#[derive(Debug, Clone)]
pub(crate) struct Payer {
    tenant: Tenant,
    scopes: Vec<Scope>,
    /// The request's `request_id`, if it has one: reservation ids derive from it.
    request_id: Option<String>,
    /// The price tier the request is charged at: the batch tier for batch items (asked for by a
    /// job worker, see [`crate::request::price_tier`]), else the standard one.
    tier: Tier,
}

impl Payer {
    /// The tenant, plus the API key that authenticated the request, if any (and its id fits a
    /// scope id; key ids always do).
    pub fn new(tenant: Tenant, api_key: Option<&ApiKeyId>) -> Self {
        let mut scopes = vec![Scope {
            kind: ScopeKind::Tenant.into(),
            id: String::new(),
        }];
        if let Some(id) = api_key.map(ApiKeyId::as_str).filter(|id| scope_id_ok(id)) {
            scopes.push(Scope {
                kind: ScopeKind::ApiKey.into(),
                id: id.to_string(),
            });
        }
        Self {
            tenant,
            scopes,
            request_id: None,
            tier: Tier::Standard,
        }
    }

    /// The same payer, for a request with `request_id` (empty: none), whose reservation ids are
    /// derived from it (see the module doc).
    pub fn with_request_id(mut self, request_id: &str) -> Self {
        self.request_id = Some(request_id)
            .filter(|id| !id.is_empty())
            .map(str::to_string);
        self
    }

    /// The same payer, charged at `tier`.
    pub fn with_tier(mut self, tier: Tier) -> Self {
        self.tier = tier;
        self
    }

    /// The tenant.
    pub fn tenant(&self) -> &Tenant {
        &self.tenant
    }
}

/// Whether `id` is a valid budget scope id: 1 to 128 bytes, no `:`, whitespace or control
/// characters.
fn scope_id_ok(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_SCOPE_ID_LEN
        && !id
            .chars()
            .any(|c| c == ':' || c.is_whitespace() || c.is_control())
}

impl Spend {
    /// Budgets off.
    pub fn off() -> Self {
        Self::default()
    }

    /// Budgets through `stack` (a client stack over a channel to the budget service). Every model
    /// of `catalog` must have a price (or be marked free): a request to an unpriced model would
    /// otherwise be refused at run time, so this fails at start-up naming `models.<name>.price`.
    pub fn new(
        stack: ClientStack,
        catalog: Arc<Catalog>,
        policy: BudgetPolicy,
    ) -> Result<Self, ConfigError> {
        for (name, _) in catalog.iter() {
            if pricing::price_of(&catalog, name).is_err() {
                return Err(ConfigError::invalid(
                    format!("models.{name}.price"),
                    "router.budget_url is set, so every model needs a price (or `free = true`) \
                     for the router to reserve its cost",
                ));
            }
        }
        let client = BudgetServiceClient::new(stack.service());
        crate::prices::check_at_start(client.clone(), catalog.clone());
        Ok(Self {
            inner: Some(Arc::new(Inner {
                client,
                stack,
                catalog,
                policy,
            })),
        })
    }

    /// Whether budgets are on.
    pub fn is_on(&self) -> bool {
        self.inner.is_some()
    }

    /// The client stack of the calls to the budget service, when budgets are on.
    pub fn stack(&self) -> Option<&ClientStack> {
        self.inner.as_ref().map(|inner| &inner.stack)
    }

    /// Whether the tenant's spend has passed its soft limit in the current period (step 2). False
    /// when budgets are off, the tenant has no budget, or the budget cannot be read.
    pub async fn soft_limit_reached(&self, call: &Call, payer: &Payer) -> bool {
        let Some(inner) = &self.inner else {
            return false;
        };
        let request = GetBudgetRequest {
            scope: Some(Scope {
                kind: ScopeKind::Tenant.into(),
                id: String::new(),
            }),
        };
        let mut client = inner.client.clone();
        match client
            .get_budget(call.bookkeeping(request, BUDGET_BACKEND))
            .await
        {
            Ok(response) => response
                .into_inner()
                .budget
                .is_some_and(|b| b.soft_limit_reached),
            Err(status) => {
                if status.code() != Code::NotFound {
                    tracing::debug!(
                        tenant = %payer.tenant,
                        code = ?status.code(),
                        "budget not readable for steering; not steering"
                    );
                }
                false
            }
        }
    }

    /// Reserves the worst case of a call to `model` with `prompt_tokens` of prompt and at most
    /// `max_output_tokens` of answer, as `hold` says (step 4; see the module documentation).
    ///
    /// `Ok(None)` when there is nothing to hold: budgets are off, the model is free, or the budget
    /// service could not answer and the tenant fails open (a [`BUDGET_UNAVAILABLE`] notice is then
    /// pushed onto `notices`). Errors are the budget service's refusals, unchanged
    /// (RESOURCE_EXHAUSTED with its QuotaFailure), or UNAVAILABLE [`BUDGET_UNAVAILABLE`] when
    /// failing closed.
    pub async fn reserve(
        &self,
        call: &Call,
        payer: &Payer,
        hold: HoldFor<'_>,
        notices: &mut Vec<Notice>,
    ) -> Result<Option<Hold>, ApiError> {
        let Some(inner) = &self.inner else {
            return Ok(None);
        };
        let HoldFor {
            model,
            purpose,
            prompt_tokens,
            max_output_tokens,
        } = hold;
        let tokens = Tokens {
            input: i64::from(prompt_tokens),
            cached_input: 0,
            output: i64::from(max_output_tokens),
        };
        let price = pricing::price_of(&inner.catalog, model)?;
        let amount = pricing::cost_micros(price, &tokens, payer.tier)?;
        if amount == 0 {
            return Ok(None);
        }
        let mut n = 0;
        let (key, reserved) = loop {
            let derived = payer.request_id.is_some() && n <= MAX_RESERVATION_REKEYS;
            let key = match &payer.request_id {
                Some(request_id) if derived => {
                    derived_reservation_id(&payer.tenant, request_id, model, purpose, n)
                }
                _ => format!("rsv-{}", uuid::Uuid::new_v4().simple()),
            };
            let request = ReserveRequest {
                request_id: key.clone(),
                scopes: payer.scopes.clone(),
                amount_micros: amount,
                ttl: Some(hold_ttl(call)),
                model: model.to_string(),
                price_version: price.version.clone(),
            };
            let mut client = inner.client.clone();
            // If this future is dropped while the Reserve is out (the caller's deadline passed,
            // the caller left), the hold may exist with no one to settle it: find it by its key
            // and release it.
            let orphan = OrphanGuard(Some((inner.client.clone(), call.clone(), request.clone())));
            let reserved = client
                .reserve(call.bookkeeping(request, BUDGET_BACKEND))
                .await;
            orphan.disarm();
            let unusable = match &reserved {
                Ok(response) => response.get_ref().reservation.as_ref().is_some_and(|r| {
                    matches!(
                        r.state(),
                        ReservationState::Released | ReservationState::Expired
                    )
                }),
                Err(status) => id_unusable(&ApiError::from_status(status)),
            };
            if unusable && derived {
                tracing::debug!(
                    tenant = %payer.tenant, model, reservation = %key,
                    "a derived reservation id is spent; trying the next of its series"
                );
                n += 1;
                continue;
            }
            break (key, reserved);
        };
        match reserved {
            Ok(response) => {
                let reservation_id = response
                    .into_inner()
                    .reservation
                    .map(|r| r.id)
                    .filter(|id| !id.is_empty())
                    .ok_or_else(|| {
                        ApiError::internal("the budget service answered Reserve without an id")
                    })?;
                tracing::debug!(
                    tenant = %payer.tenant, model, amount_micros = amount, reservation = %reservation_id,
                    "reserved"
                );
                Ok(Some(Hold {
                    inner: Some(HoldState {
                        client: inner.client.clone(),
                        call: call.clone(),
                        reservation_id,
                        key,
                        tenant: payer.tenant.to_string(),
                        model: model.to_string(),
                        prompt_tokens: i64::from(prompt_tokens),
                        output_tokens: 0,
                        tier: payer.tier,
                    }),
                }))
            }
            Err(status) => {
                let error = ApiError::from_status(&status);
                // A model the budget service cannot price cannot be metered either: refused
                // (FAILED_PRECONDITION naming the model) unless the tenant fails open.
                let unpriced = error.reason() == PRICE_UNKNOWN;
                if !is_outage(call, &error) && !unpriced {
                    return Err(error);
                }
                if inner.policy.fail_open_for(payer.tenant.as_str()) {
                    tracing::warn!(
                        tenant = %payer.tenant, model, reason = error.reason(),
                        "budget service unavailable; serving unmetered (tenant fails open)"
                    );
                    if notices.iter().any(|n| n.reason == BUDGET_UNAVAILABLE) {
                        return Ok(None);
                    }
                    notices.push(Notice {
                        reason: BUDGET_UNAVAILABLE.to_string(),
                        message: format!(
                            "the budget service could not meter this request ({}); it was served \
                             without a budget check and its spend was not recorded",
                            error.reason()
                        ),
                    });
                    return Ok(None);
                }
                if unpriced {
                    tracing::warn!(
                        tenant = %payer.tenant, model,
                        "the budget service has no price for this model; refusing (fail closed)"
                    );
                    return Err(error);
                }
                tracing::warn!(
                    tenant = %payer.tenant, model, reason = error.reason(),
                    "budget service unavailable; refusing (fail closed)"
                );
                Err(ApiError::unavailable(
                    BUDGET_UNAVAILABLE,
                    format!(
                        "the budget service could not be reached ({}: {}), and tenant {} is not \
                         configured to be served without a budget check \
                         (router.budget.fail_open); retry later",
                        error.reason(),
                        error.message(),
                        payer.tenant
                    ),
                )
                .with_retry_after(error.retry_after().unwrap_or(BUDGET_RETRY_AFTER)))
            }
        }
    }
}

/// Whether a failed budget call means the service could not answer (rather than a refusal), while
/// the caller still had time: a DEADLINE_EXCEEDED after the caller's own deadline is the caller's.
fn is_outage(call: &Call, error: &ApiError) -> bool {
    match error.code() {
        Code::Unavailable => true,
        Code::DeadlineExceeded => !call.deadline().is_some_and(|d| d.is_expired()),
        _ => false,
    }
}

/// Money held by one reservation until it is committed or released.
///
/// Dropping a hold that was neither commits the prompt and the output recorded with
/// [`Hold::set_output_tokens`] on a spawned task (see the module documentation).
pub(crate) struct Hold {
    /// `None` once committed, released or abandoned.
    inner: Option<HoldState>,
}

struct HoldState {
    client: BudgetServiceClient<BoxedClient>,
    call: Call,
    reservation_id: String,
    key: String,
    tenant: String,
    model: String,
    prompt_tokens: i64,
    output_tokens: i64,
    tier: Tier,
}

impl fmt::Debug for Hold {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut debug = f.debug_struct("Hold");
        if let Some(state) = &self.inner {
            debug
                .field("reservation", &state.reservation_id)
                .field("model", &state.model);
        }
        debug.finish()
    }
}

impl Hold {
    /// Records how many answer tokens the model produced so far (for a stream cut short).
    pub fn set_output_tokens(&mut self, tokens: i64) {
        if let Some(state) = &mut self.inner {
            state.output_tokens = tokens;
        }
    }

    /// The usage known without the model's report: the counted prompt and the recorded output.
    pub fn estimated_usage(&self) -> Usage {
        let (input, output) = self
            .inner
            .as_ref()
            .map_or((0, 0), |s| (s.prompt_tokens, s.output_tokens));
        usage(input, output)
    }

    /// Commits `usage` (priced by the budget service at the reservation's model) and returns the
    /// committed cost in micro-USD. Uses `call` (the settlement's own deadline).
    pub async fn commit(mut self, call: &Call, usage: Usage) -> Result<i64, ApiError> {
        let Some(state) = self.inner.take() else {
            return Ok(0);
        };
        state.commit(call, usage).await
    }

    /// Gives the hold back without spending (the model never ran), on a spawned task: the caller
    /// does not wait, and a failure only leaves the hold to expire.
    pub fn release(mut self) {
        let Some(state) = self.inner.take() else {
            return;
        };
        spawn_settling(async move {
            let call = state.call.with_deadline(settle_deadline());
            let request = ReleaseRequest {
                reservation_id: state.reservation_id.clone(),
            };
            let mut client = state.client.clone();
            if let Err(status) = client
                .release(call.bookkeeping(request, BUDGET_BACKEND))
                .await
            {
                tracing::warn!(
                    tenant = %state.tenant, reservation = %state.reservation_id,
                    code = ?status.code(), message = status.message(),
                    "budget release failed; the hold expires after its TTL"
                );
            }
        });
    }
}

impl HoldState {
    async fn commit(self, call: &Call, usage: Usage) -> Result<i64, ApiError> {
        let request = CommitRequest {
            reservation_id: self.reservation_id.clone(),
            request_id: self.key.clone(),
            usage: Some(usage),
            tier: match self.tier {
                Tier::Standard => PriceTier::Standard,
                Tier::Batch => PriceTier::Batch,
            }
            .into(),
            cost_micros: None,
        };
        let mut client = self.client.clone();
        match client
            .commit(call.bookkeeping(request, BUDGET_BACKEND))
            .await
        {
            Ok(response) => {
                let cost = response.into_inner().cost_micros;
                metrics::counter!(
                    "weir_cost_microdollars_total",
                    "tenant" => self.tenant.clone(),
                    "model" => self.model.clone()
                )
                .increment(u64::try_from(cost).unwrap_or(0));
                tracing::debug!(
                    tenant = %self.tenant, model = %self.model, reservation = %self.reservation_id,
                    cost_micros = cost, "committed"
                );
                Ok(cost)
            }
            Err(status) => {
                let error = ApiError::from_status(&status);
                tracing::warn!(
                    tenant = %self.tenant, model = %self.model, reservation = %self.reservation_id,
                    reason = error.reason(), message = error.message(),
                    "budget commit failed; the hold expires after its TTL"
                );
                Err(error)
            }
        }
    }
}

impl Drop for Hold {
    fn drop(&mut self) {
        let Some(state) = self.inner.take() else {
            return;
        };
        let usage = usage(state.prompt_tokens, state.output_tokens);
        tracing::debug!(
            tenant = %state.tenant, model = %state.model, reservation = %state.reservation_id,
            output_tokens = state.output_tokens, "request ended early; committing what was used"
        );
        spawn_settling(async move {
            let call = state.call.with_deadline(settle_deadline());
            // A failure is logged by `commit`; nothing else can be done here.
            let _ = state.commit(&call, usage).await;
        });
    }
}

/// A `Usage` of `input` and `output` tokens.
pub(crate) fn usage(input: i64, output: i64) -> Usage {
    Usage {
        input_tokens: input,
        output_tokens: output,
        cached_input_tokens: 0,
        total_tokens: input.saturating_add(output),
    }
}

/// The deadline of bookkeeping calls made after (or without) the caller.
fn settle_deadline() -> weir_mesh::deadline::Deadline {
    weir_mesh::deadline::Deadline::after(SETTLE_TIMEOUT)
}

/// Runs `task` on the current Tokio runtime, if there is one (there always is in a server; a hold
/// dropped elsewhere is left to expire).
fn spawn_settling(task: impl std::future::Future<Output = ()> + Send + 'static) {
    match tokio::runtime::Handle::try_current() {
        Ok(handle) => {
            handle.spawn(task.in_current_span());
        }
        Err(_) => tracing::warn!("no runtime to settle a budget hold on; it expires after its TTL"),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use weir_mesh::deadline::Deadline;

    #[test]
    fn derived_reservation_ids_are_stable_and_name_tenant_request_model_and_purpose() {
        let acme = Tenant::new("acme").unwrap();
        let id = |tenant: &Tenant, request: &str, model: &str, purpose: Purpose, n: u32| {
            derived_reservation_id(tenant, request, model, purpose, n)
        };
        let first = id(&acme, "r1", "m", Purpose::Call, 0);
        assert_eq!(
            first,
            id(&acme, "r1", "m", Purpose::Call, 0),
            "same on every replica"
        );
        assert!(
            first.starts_with("rsv-") && first.len() == 4 + 32,
            "{first}"
        );
        let others = [
            id(&Tenant::new("globex").unwrap(), "r1", "m", Purpose::Call, 0),
            id(&acme, "r2", "m", Purpose::Call, 0),
            id(&acme, "r1", "n", Purpose::Call, 0),
            id(&acme, "r1", "m", Purpose::CacheHit, 0),
            // Length-prefixed parts: moving a character from one part to the next changes it.
            id(&acme, "r1m", "", Purpose::Call, 0),
        ];
        for other in &others {
            assert_ne!(&first, other);
        }
        assert_eq!(id(&acme, "r1", "m", Purpose::Call, 2), format!("{first}-2"));
    }

    use super::*;

    fn kinds(payer: &Payer) -> Vec<(ScopeKind, &str)> {
        payer
            .scopes
            .iter()
            .map(|s| (s.kind(), s.id.as_str()))
            .collect()
    }

    #[test]
    fn the_tenant_always_pays_and_its_api_key_when_there_is_one() {
        let tenant = Tenant::new("acme").unwrap();
        let payer = Payer::new(tenant.clone(), None);
        assert_eq!(kinds(&payer), [(ScopeKind::Tenant, "")]);
        let key = ApiKeyId::new("ci-key");
        let payer = Payer::new(tenant.clone(), Some(&key));
        assert_eq!(
            kinds(&payer),
            [(ScopeKind::Tenant, ""), (ScopeKind::ApiKey, "ci-key")]
        );
        // An id the budget service would refuse is left out rather than failing the request.
        let payer = Payer::new(tenant, Some(&ApiKeyId::new("a:b")));
        assert_eq!(kinds(&payer), [(ScopeKind::Tenant, "")]);
        assert_eq!(payer.tenant().as_str(), "acme");
    }

    #[test]
    fn outages_are_unavailable_or_a_timeout_while_the_caller_had_time() {
        let live = Call::new(
            &Default::default(),
            Some(Deadline::after(Duration::from_secs(5))),
            None,
        );
        let gone = Call::new(
            &Default::default(),
            Some(Deadline::after(Duration::ZERO)),
            None,
        );
        let unavailable = ApiError::unavailable("CIRCUIT_OPEN", "open");
        let timeout = ApiError::deadline_exceeded("slow");
        let refused = ApiError::resource_exhausted("BUDGET_EXHAUSTED", "tenant:a", "spent");
        assert!(is_outage(&live, &unavailable));
        assert!(is_outage(&live, &timeout));
        assert!(
            !is_outage(&gone, &timeout),
            "the caller's own deadline passed"
        );
        assert!(!is_outage(&live, &refused));
    }

    #[tokio::test]
    async fn every_model_needs_a_price_when_budgets_are_on() {
        let channel = weir_mesh::client::lazy_channel("http://127.0.0.1:1");
        let stack = ClientStack::new(channel.unwrap(), &Default::default());
        let unpriced = Catalog::new([(
            "sim-free-for-all".to_string(),
            weir_mesh::catalog::ModelSpec::default(),
        )]);
        let error = Spend::new(stack.clone(), Arc::new(unpriced), BudgetPolicy::default())
            .unwrap_err()
            .to_string();
        assert!(error.contains("models.sim-free-for-all.price"), "{error}");
        let spend = Spend::new(stack, Arc::new(Catalog::default()), BudgetPolicy::default());
        assert!(spend.unwrap().is_on());
        assert!(!Spend::off().is_on());
    }

    #[tokio::test]
    async fn budgets_off_hold_nothing() {
        let mut notices = Vec::new();
        let payer = Payer::new(Tenant::default(), None);
        let hold = Spend::off()
            .reserve(
                &Call::default(),
                &payer,
                HoldFor {
                    model: "sim-small",
                    purpose: Purpose::Call,
                    prompt_tokens: 10,
                    max_output_tokens: 10,
                },
                &mut notices,
            )
            .await
            .unwrap();
        assert!(hold.is_none());
        assert!(notices.is_empty());
        assert!(
            !Spend::off()
                .soft_limit_reached(&Call::default(), &payer)
                .await
        );
    }

    #[test]
    fn estimated_usage_is_prompt_plus_recorded_output() {
        assert_eq!(
            usage(7, 3),
            Usage {
                input_tokens: 7,
                output_tokens: 3,
                cached_input_tokens: 0,
                total_tokens: 10
            }
        );
        let mut empty = Hold { inner: None };
        empty.set_output_tokens(5);
        assert_eq!(empty.estimated_usage(), usage(0, 0));
    }
}
