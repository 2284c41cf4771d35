//! The gRPC handlers: validate, resolve periods and prices, call the store, map the outcome.
//! Handlers return [`ApiError`]; `weir_mesh::error` turns it into a `Status` with its details.

use std::{
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use tonic::{Code, Request, Response, Status};
use weir_mesh::{ApiError, catalog::Catalog, tenant::Tenant};
use weir_proto::{budget as pb, budget::budget_service_server::BudgetService, common};

use crate::{
    cache::Cache,
    events::{Events, Metrics, SoftLimitEvent},
    period::{CalendarUnit, MAX_ROLLING_WINDOW, MIN_ROLLING_WINDOW, Period, Window, parse_tz},
    pricing::{self, MAX_MICROS, Tier, Tokens},
    scope::{MAX_SCOPES, Scope},
    store::{
        BudgetRecord, CommitInput, CommitOutcome, ReservationRecord, ReserveInput, ReserveOutcome,
        ScopePlan, State, Store,
    },
};

/// Longest request id, reservation id or model name accepted.
pub const MAX_ID_LEN: usize = 128;
/// Default page size of ListPrices.
pub const DEFAULT_PAGE_SIZE: usize = 100;
/// Largest page size of ListPrices.
pub const MAX_PAGE_SIZE: usize = 1000;
/// How many times Reserve re-plans when a budget changes under it before answering ABORTED.
const MAX_PLAN_ATTEMPTS: usize = 5;
const PAGE_TOKEN_PREFIX: &str = "after:";

/// Settings the handlers need.
#[derive(Debug, Clone)]
pub(crate) struct Settings {
    pub(crate) default_ttl: Duration,
    pub(crate) max_ttl: Duration,
    pub(crate) usage_retention: Duration,
}

/// The budget service. Cheap to clone; clones share the store and the counters.
#[derive(Debug, Clone)]
pub struct BudgetApi {
    inner: Arc<Inner>,
}

#[derive(Debug)]
pub(crate) struct Inner {
    pub(crate) store: Store,
    catalog: Arc<Catalog>,
    settings: Settings,
    events: Events,
    /// Budgets and reservation models this replica remembers ([`crate::cache`]).
    cache: Cache,
}

impl Inner {
    pub(crate) fn metrics(&self) -> Arc<Metrics> {
        self.events.metrics.clone()
    }
}

pub(crate) fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

fn timestamp(ms: i64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: ms.div_euclid(1000),
        nanos: i32::try_from(ms.rem_euclid(1000) * 1_000_000).unwrap_or(0),
    }
}

fn timestamp_ms(ts: &prost_types::Timestamp, field: &str) -> Result<i64, ApiError> {
    ts.seconds
        .checked_mul(1000)
        .and_then(|ms| ms.checked_add(i64::from(ts.nanos) / 1_000_000))
        .filter(|_| (0..1_000_000_000).contains(&ts.nanos))
        .ok_or_else(|| ApiError::invalid_argument(field, "not a valid timestamp"))
}

fn duration(d: &prost_types::Duration, field: &str) -> Result<Duration, ApiError> {
    if d.seconds < 0 || d.nanos < 0 {
        return Err(ApiError::invalid_argument(field, "must not be negative"));
    }
    Ok(Duration::new(
        u64::try_from(d.seconds).unwrap_or(0),
        u32::try_from(d.nanos).unwrap_or(0),
    ))
}

fn duration_ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

fn check_id(value: &str, field: &str, required: bool) -> Result<(), ApiError> {
    if required && value.is_empty() {
        return Err(ApiError::invalid_argument(field, "required"));
    }
    if value.len() > MAX_ID_LEN {
        return Err(ApiError::invalid_argument(
            field,
            format!("at most {MAX_ID_LEN} bytes"),
        ));
    }
    Ok(())
}

fn check_micros(value: i64, field: &str, min: i64) -> Result<i64, ApiError> {
    if (min..=MAX_MICROS).contains(&value) {
        Ok(value)
    } else {
        Err(ApiError::invalid_argument(
            field,
            format!("must be {min} to {MAX_MICROS} micro-USD, got {value}"),
        ))
    }
}

fn usd(micros: i64) -> String {
    format!("${}.{:06}", micros / 1_000_000, (micros % 1_000_000).abs())
}

fn reservation_to_proto(record: &ReservationRecord) -> pb::Reservation {
    let state = match record.state {
        State::Held => pb::ReservationState::Held,
        State::Committed => pb::ReservationState::Committed,
        State::Released => pb::ReservationState::Released,
        State::Expired => pb::ReservationState::Expired,
    };
    pb::Reservation {
        id: record.id.clone(),
        state: state.into(),
        scopes: record.scopes.iter().map(Scope::to_proto).collect(),
        amount_micros: record.amount,
        committed_micros: record.committed.unwrap_or(0),
        model: record.model.clone(),
        create_time: Some(timestamp(record.created_ms)),
        expire_time: Some(timestamp(record.expire_ms)),
    }
}

fn period_from_proto(period: Option<&pb::Period>) -> Result<Period, ApiError> {
    match period.and_then(|p| p.kind.as_ref()) {
        None => Err(ApiError::invalid_argument(
            "period",
            "required: a calendar period or a rolling duration",
        )),
        Some(pb::period::Kind::Calendar(calendar)) => {
            let unit = match pb::PeriodUnit::try_from(calendar.unit) {
                Ok(pb::PeriodUnit::Daily) => CalendarUnit::Daily,
                Ok(pb::PeriodUnit::Weekly) => CalendarUnit::Weekly,
                Ok(pb::PeriodUnit::Monthly) => CalendarUnit::Monthly,
                _ => {
                    return Err(ApiError::invalid_argument(
                        "period.calendar.unit",
                        "must be DAILY, WEEKLY or MONTHLY",
                    ));
                }
            };
            let tz = parse_tz(&calendar.time_zone).map_err(|e| {
                ApiError::invalid_argument("period.calendar.time_zone", e.to_string())
            })?;
            Ok(Period::Calendar { unit, tz })
        }
        Some(pb::period::Kind::Rolling(rolling)) => {
            let window = duration(rolling, "period.rolling")?;
            if !(MIN_ROLLING_WINDOW..=MAX_ROLLING_WINDOW).contains(&window) {
                return Err(ApiError::invalid_argument(
                    "period.rolling",
                    format!("must be {MIN_ROLLING_WINDOW:?} to {MAX_ROLLING_WINDOW:?}"),
                ));
            }
            Ok(Period::Rolling { window })
        }
    }
}

fn period_to_proto(period: &Period) -> pb::Period {
    let kind = match period {
        Period::Calendar { unit, tz } => {
            let unit = match unit {
                CalendarUnit::Daily => pb::PeriodUnit::Daily,
                CalendarUnit::Weekly => pb::PeriodUnit::Weekly,
                CalendarUnit::Monthly => pb::PeriodUnit::Monthly,
            };
            pb::period::Kind::Calendar(pb::CalendarPeriod {
                unit: unit.into(),
                time_zone: tz.name().to_string(),
            })
        }
        Period::Rolling { window } => pb::period::Kind::Rolling(prost_types::Duration {
            seconds: i64::try_from(window.as_secs()).unwrap_or(i64::MAX),
            nanos: i32::try_from(window.subsec_nanos()).unwrap_or(0),
        }),
    };
    pb::Period { kind: Some(kind) }
}

/// When the scope's spend can next fall: the end of a calendar period, or when the oldest spend
/// of a rolling window leaves it.
fn reset_ms(window: &Window, oldest_bucket: Option<i64>) -> i64 {
    match (window.bucket_ms, oldest_bucket) {
        (0, _) => window.end_ms,
        (width, Some(oldest)) => (oldest + window.buckets) * width,
        (_, None) => window.end_ms,
    }
}

impl BudgetApi {
    pub(crate) fn new(
        store: Store,
        catalog: Arc<Catalog>,
        settings: Settings,
        metrics: Arc<Metrics>,
        webhook: Option<String>,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                store,
                catalog,
                settings,
                events: Events::new(metrics, webhook),
                cache: Cache::default(),
            }),
        }
    }

    pub(crate) fn downgrade(&self) -> std::sync::Weak<Inner> {
        Arc::downgrade(&self.inner)
    }

    /// The service's counters (reservations, refusals, soft-limit events, ...).
    pub fn metrics(&self) -> Arc<Metrics> {
        self.inner.metrics()
    }

    async fn estimate(
        &self,
        req: pb::EstimateCostRequest,
    ) -> Result<pb::EstimateCostResponse, ApiError> {
        check_id(&req.model, "model", true)?;
        let tier = Tier::from_proto(req.tier)?;
        let tokens = Tokens {
            input: req.input_tokens,
            cached_input: req.cached_input_tokens,
            output: req.max_output_tokens,
        };
        if req.max_output_tokens < 0 {
            return Err(ApiError::invalid_argument(
                "max_output_tokens",
                "must not be negative",
            ));
        }
        tokens.validate("")?;
        let price = pricing::price_of(&self.inner.catalog, &req.model)?;
        let cost = pricing::cost_micros(price, &tokens, tier)?;
        Ok(pb::EstimateCostResponse {
            cost_micros: cost,
            price: Some(pricing::to_proto(&req.model, price)),
        })
    }

    async fn reserve_(
        &self,
        tenant: &Tenant,
        req: pb::ReserveRequest,
    ) -> Result<pb::ReserveResponse, ApiError> {
        check_id(&req.request_id, "request_id", true)?;
        check_id(&req.model, "model", false)?;
        let amount = check_micros(req.amount_micros, "amount_micros", 1)?;
        if !req.model.is_empty() {
            // Refused now, before anything is held or any model runs: its answer could not be
            // priced at commit, and would be free.
            let price = pricing::price_of(&self.inner.catalog, &req.model)?;
            if !req.price_version.is_empty() && req.price_version != price.version {
                metrics::counter!(
                    "weir_budget_price_version_skew_total",
                    "model" => req.model.clone()
                )
                .increment(1);
                tracing::warn!(
                    model = %req.model,
                    caller_version = %req.price_version,
                    our_version = %price.version,
                    "a reservation was priced with another price version; commits use ours"
                );
            }
        }
        let ttl = match &req.ttl {
            None => self.inner.settings.default_ttl,
            Some(d) => match duration(d, "ttl")? {
                Duration::ZERO => self.inner.settings.default_ttl,
                ttl => ttl,
            },
        };
        if ttl > self.inner.settings.max_ttl {
            return Err(ApiError::invalid_argument(
                "ttl",
                format!("at most {:?}", self.inner.settings.max_ttl),
            ));
        }
        if req.scopes.is_empty() {
            return Err(ApiError::invalid_argument(
                "scopes",
                "at least one scope (the tenant is added if missing)",
            ));
        }
        let mut scopes: Vec<Scope> = Vec::new();
        for (i, scope) in req.scopes.iter().enumerate() {
            let scope = Scope::from_proto(Some(scope), &format!("scopes[{i}]"))?;
            if !scopes.contains(&scope) {
                scopes.push(scope);
            }
        }
        if !scopes.contains(&Scope::tenant()) {
            scopes.push(Scope::tenant());
        }
        if scopes.len() > MAX_SCOPES {
            return Err(ApiError::invalid_argument(
                "scopes",
                format!("at most {MAX_SCOPES} distinct scopes, the tenant included"),
            ));
        }
        let mut sorted: Vec<String> = scopes.iter().map(Scope::key).collect();
        sorted.sort();
        let fingerprint = format!("{amount};{};{}", req.model, sorted.join(","));
        let id = uuid::Uuid::new_v4().simple().to_string();
        let now = now_ms();
        let expire_ms = now.saturating_add(duration_ms(ttl));

        for attempt in 0..MAX_PLAN_ATTEMPTS {
            // The first plan may use the budgets this replica read recently: the script checks
            // their generations, and a stale plan is re-made from the store (crate::cache).
            let cached = (attempt == 0)
                .then(|| self.inner.cache.budgets(tenant, &scopes))
                .flatten();
            let budgets = match cached {
                Some(budgets) => budgets,
                None => {
                    let budgets = self.inner.store.budgets(tenant, &scopes).await?;
                    self.inner.cache.keep_budgets(tenant, &scopes, &budgets);
                    budgets
                }
            };
            let plans: Vec<ScopePlan> = scopes
                .iter()
                .zip(&budgets)
                .map(|(scope, budget)| ScopePlan {
                    scope: scope.clone(),
                    generation: budget.as_ref().map_or(0, |b| b.generation),
                    window: budget.as_ref().map(|b| b.period.window_at(now)),
                })
                .collect();
            let input = ReserveInput {
                id: id.clone(),
                request_id: req.request_id.clone(),
                fingerprint: fingerprint.clone(),
                amount,
                model: req.model.clone(),
                now_ms: now,
                expire_ms,
                scopes: plans.clone(),
            };
            match self.inner.store.reserve(tenant, &input).await? {
                ReserveOutcome::Held(record) => {
                    if record.id == id {
                        self.inner.events.metrics.add_reservation();
                    }
                    self.inner
                        .cache
                        .keep_model(tenant, &record.id, &record.model);
                    return Ok(pb::ReserveResponse {
                        reservation: Some(reservation_to_proto(&record)),
                    });
                }
                ReserveOutcome::Stale => continue,
                ReserveOutcome::Mismatch => {
                    return Err(ApiError::invalid_argument(
                        "request_id",
                        "already used for a reservation with other scopes, amount or model",
                    )
                    .with_metadata("reason_detail", "IDEMPOTENCY_KEY_REUSED"));
                }
                ReserveOutcome::Gone => {
                    return Err(ApiError::new(
                        Code::FailedPrecondition,
                        "RESERVATION_GONE",
                        "request_id names a reservation that is no longer kept; use a new request_id",
                    ));
                }
                ReserveOutcome::Exhausted {
                    index,
                    oldest_bucket,
                    held,
                    spent,
                    hard,
                } => {
                    self.inner.events.metrics.add_refused(tenant.as_str());
                    let (scope, window) = plans
                        .get(index)
                        .and_then(|p| p.window.as_ref().map(|w| (&p.scope, w)))
                        .ok_or_else(|| ApiError::internal("exhausted scope out of range"))?;
                    let subject = scope.subject(tenant);
                    let retry = reset_ms(window, oldest_bucket).saturating_sub(now).max(1);
                    let message = format!(
                        "budget of {subject} exhausted: {} held + {} spent + {} requested exceeds the hard limit of {}",
                        usd(held),
                        usd(spent),
                        usd(amount),
                        usd(hard)
                    );
                    return Err(
                        ApiError::resource_exhausted("BUDGET_EXHAUSTED", subject, message)
                            .with_retry_after(Duration::from_millis(
                                u64::try_from(retry).unwrap_or(1),
                            )),
                    );
                }
            }
        }
        Err(ApiError::new(
            Code::Aborted,
            "BUDGET_CHANGED",
            "the budget changed while reserving; retry",
        )
        .with_retry_after(Duration::from_millis(10)))
    }

    async fn commit_(
        &self,
        tenant: &Tenant,
        req: pb::CommitRequest,
    ) -> Result<pb::CommitResponse, ApiError> {
        check_id(&req.reservation_id, "reservation_id", true)?;
        check_id(&req.request_id, "request_id", false)?;
        let tier = Tier::from_proto(req.tier)?;
        let tokens = req.usage.as_ref().map(Tokens::from_usage);
        if let Some(tokens) = &tokens {
            tokens.validate("usage.")?;
        }
        let cost = match req.cost_micros {
            Some(cost) => check_micros(cost, "cost_micros", 0)?,
            None => {
                let tokens = tokens.ok_or_else(|| {
                    ApiError::invalid_argument("usage", "required unless cost_micros is set")
                })?;
                // The model a reservation was made for never changes: the replica that made it
                // remembers it, any other reads it (crate::cache).
                let model = match self.inner.cache.model(tenant, &req.reservation_id) {
                    Some(model) => model,
                    None => {
                        self.inner
                            .store
                            .reservation(tenant, &req.reservation_id)
                            .await?
                            .ok_or_else(|| ApiError::not_found("reservation", &req.reservation_id))?
                            .model
                    }
                };
                let price = pricing::price_of(&self.inner.catalog, &model)?;
                pricing::cost_micros(price, &tokens, tier)?
            }
        };
        let input = CommitInput {
            id: req.reservation_id.clone(),
            request_id: req.request_id.clone(),
            cost,
            tokens: tokens.unwrap_or_default(),
            now_ms: now_ms(),
        };
        let outcome = self.inner.store.commit(tenant, &input).await?;
        self.inner.cache.forget_model(tenant, &req.reservation_id);
        let record = match outcome {
            CommitOutcome::Charged(record, crossings) => {
                self.inner.events.metrics.add_commit(record.overrun > 0);
                if record.overrun > 0 {
                    tracing::info!(
                        %tenant,
                        reservation = %record.id,
                        overrun_micros = record.overrun,
                        "commit exceeded its reservation; the overrun is recorded as spend"
                    );
                }
                for crossing in crossings {
                    self.inner.events.soft_limit_reached(SoftLimitEvent {
                        kind: "budget.soft_limit_reached",
                        id: uuid::Uuid::new_v4().to_string(),
                        tenant: tenant.to_string(),
                        subject: crossing.scope.subject(tenant),
                        spent_micros: crossing.spent,
                        soft_limit_micros: crossing.soft,
                        time: chrono::DateTime::<chrono::Utc>::from_timestamp_millis(input.now_ms)
                            .unwrap_or_default()
                            .to_rfc3339(),
                    });
                }
                record
            }
            CommitOutcome::Replayed(record) => record,
            CommitOutcome::Released(_) => {
                return Err(ApiError::new(
                    Code::FailedPrecondition,
                    "RESERVATION_RELEASED",
                    format!(
                        "reservation {} was released: nothing to commit against",
                        req.reservation_id
                    ),
                ));
            }
            CommitOutcome::Conflict(_) => {
                return Err(ApiError::new(
                    Code::FailedPrecondition,
                    "RESERVATION_ALREADY_COMMITTED",
                    format!(
                        "reservation {} was already committed under another request_id",
                        req.reservation_id
                    ),
                ));
            }
            CommitOutcome::NotFound => {
                return Err(ApiError::not_found("reservation", &req.reservation_id));
            }
        };
        Ok(pb::CommitResponse {
            reservation: Some(reservation_to_proto(&record)),
            cost_micros: record.committed.unwrap_or(0),
            refunded_micros: record.refunded,
            overrun_micros: record.overrun,
        })
    }

    async fn release_(
        &self,
        tenant: &Tenant,
        req: pb::ReleaseRequest,
    ) -> Result<pb::ReleaseResponse, ApiError> {
        check_id(&req.reservation_id, "reservation_id", true)?;
        let record = self
            .inner
            .store
            .release(tenant, &req.reservation_id, now_ms())
            .await?
            .ok_or_else(|| ApiError::not_found("reservation", &req.reservation_id))?;
        self.inner.cache.forget_model(tenant, &req.reservation_id);
        if record.state == State::Released {
            self.inner.events.metrics.add_release();
        }
        Ok(pb::ReleaseResponse {
            reservation: Some(reservation_to_proto(&record)),
        })
    }

    async fn budget_view(
        &self,
        tenant: &Tenant,
        scope: &Scope,
        budget: &BudgetRecord,
    ) -> Result<pb::Budget, ApiError> {
        let now = now_ms();
        let window = budget.period.window_at(now);
        let counter = self
            .inner
            .store
            .counter(tenant, scope, &window, now)
            .await?;
        Ok(pb::Budget {
            scope: Some(scope.to_proto()),
            hard_limit_micros: budget.hard,
            soft_limit_fraction: budget.fraction,
            period: Some(period_to_proto(&budget.period)),
            spent_micros: counter.spent,
            held_micros: counter.held,
            period_start_time: Some(timestamp(window.start_ms)),
            period_end_time: Some(timestamp(reset_ms(&window, counter.oldest_bucket))),
            soft_limit_reached: counter.soft_reached
                || (budget.soft > 0 && counter.spent >= budget.soft),
        })
    }

    async fn set_budget_(
        &self,
        tenant: &Tenant,
        req: pb::SetBudgetRequest,
    ) -> Result<pb::SetBudgetResponse, ApiError> {
        let scope = Scope::from_proto(req.scope.as_ref(), "scope")?;
        let hard = check_micros(req.hard_limit_micros, "hard_limit_micros", 0)?;
        let fraction = req.soft_limit_fraction;
        if !(fraction.is_finite() && (0.0..=1.0).contains(&fraction)) {
            return Err(ApiError::invalid_argument(
                "soft_limit_fraction",
                "must be 0 (disabled) to 1",
            ));
        }
        let period = period_from_proto(req.period.as_ref())?;
        // f64 has 53 bits of mantissa and MAX_MICROS is 2^53 - 1, so the product is exact enough;
        // a positive fraction of a positive limit is at least one micro-USD.
        #[allow(clippy::cast_possible_truncation, clippy::cast_precision_loss)]
        let mut soft = ((hard as f64) * fraction).floor() as i64;
        if fraction > 0.0 && hard > 0 {
            soft = soft.clamp(1, hard);
        }
        let mut budget = BudgetRecord {
            generation: 0,
            hard,
            soft,
            fraction,
            period,
        };
        budget.generation = self.inner.store.set_budget(tenant, &scope, &budget).await?;
        self.inner.cache.forget_budget(tenant, &scope);
        tracing::info!(%tenant, %scope, hard_limit_micros = hard, %period, "budget set");
        Ok(pb::SetBudgetResponse {
            budget: Some(self.budget_view(tenant, &scope, &budget).await?),
        })
    }

    async fn get_budget_(
        &self,
        tenant: &Tenant,
        req: pb::GetBudgetRequest,
    ) -> Result<pb::GetBudgetResponse, ApiError> {
        let scope = Scope::from_proto(req.scope.as_ref(), "scope")?;
        let budget = self
            .inner
            .store
            .budgets(tenant, std::slice::from_ref(&scope))
            .await?
            .into_iter()
            .next()
            .flatten()
            .ok_or_else(|| ApiError::not_found("budget", scope.subject(tenant)))?;
        Ok(pb::GetBudgetResponse {
            budget: Some(self.budget_view(tenant, &scope, &budget).await?),
        })
    }

    async fn get_spend_(
        &self,
        tenant: &Tenant,
        req: pb::GetSpendRequest,
    ) -> Result<pb::GetSpendResponse, ApiError> {
        let scope = Scope::from_proto(req.scope.as_ref(), "scope")?;
        let now = now_ms();
        let start = match &req.start_time {
            Some(ts) => timestamp_ms(ts, "start_time")?,
            None => {
                let budget = self
                    .inner
                    .store
                    .budgets(tenant, std::slice::from_ref(&scope))
                    .await?
                    .into_iter()
                    .next()
                    .flatten();
                match budget {
                    Some(budget) => budget.period.window_at(now).start_ms,
                    None => now.div_euclid(86_400_000) * 86_400_000,
                }
            }
        };
        let end = match &req.end_time {
            Some(ts) => timestamp_ms(ts, "end_time")?,
            None => now.saturating_add(1),
        };
        if end <= start {
            return Err(ApiError::invalid_argument(
                "end_time",
                "must be after start_time",
            ));
        }
        let retention = duration_ms(self.inner.settings.usage_retention);
        if end - start > retention.saturating_add(3_600_000) {
            return Err(ApiError::invalid_argument(
                "start_time",
                format!(
                    "the window may be at most the spend retention ({:?})",
                    self.inner.settings.usage_retention
                ),
            ));
        }
        // Spend is kept per hour: an hour counts when it starts in [hour of start, end).
        let first_hour = start.div_euclid(3_600_000) * 3600;
        let hours: Vec<i64> = (0..)
            .map(|i| first_hour + i * 3600)
            .take_while(|h| h * 1000 < end)
            .collect();
        let mut rows = self.inner.store.spend(tenant, &scope, &hours).await?;
        rows.sort_by(|a, b| b.cost.cmp(&a.cost).then_with(|| a.model.cmp(&b.model)));
        let total = rows.iter().fold(0i64, |sum, r| sum.saturating_add(r.cost));
        Ok(pb::GetSpendResponse {
            total_micros: total,
            by_model: rows
                .into_iter()
                .map(|r| pb::ModelSpend {
                    model: r.model,
                    cost_micros: r.cost,
                    requests: r.requests,
                    usage: Some(common::Usage {
                        input_tokens: r.input,
                        output_tokens: r.output,
                        cached_input_tokens: r.cached_input,
                        total_tokens: r.input.saturating_add(r.output),
                    }),
                })
                .collect(),
        })
    }

    fn list_prices_(
        &self,
        req: &pb::ListPricesRequest,
    ) -> Result<pb::ListPricesResponse, ApiError> {
        let page_size = match usize::try_from(req.page_size) {
            Err(_) => {
                return Err(ApiError::invalid_argument(
                    "page_size",
                    "must not be negative",
                ));
            }
            Ok(0) => DEFAULT_PAGE_SIZE,
            Ok(n) => n.min(MAX_PAGE_SIZE),
        };
        let after = if req.page_token.is_empty() {
            None
        } else {
            Some(
                req.page_token
                    .strip_prefix(PAGE_TOKEN_PREFIX)
                    .ok_or_else(|| {
                        ApiError::invalid_argument("page_token", "not a token from ListPrices")
                    })?,
            )
        };
        let mut priced = self
            .inner
            .catalog
            .iter()
            .filter(|(name, _)| after.is_none_or(|a| *name > a))
            .filter_map(|(name, spec)| spec.price.as_ref().map(|p| (name, p)));
        let prices: Vec<pb::ModelPrice> = priced
            .by_ref()
            .take(page_size)
            .map(|(name, price)| pricing::to_proto(name, price))
            .collect();
        let next_page_token = match (priced.next(), prices.last()) {
            (Some(_), Some(last)) => format!("{PAGE_TOKEN_PREFIX}{}", last.model),
            _ => String::new(),
        };
        Ok(pb::ListPricesResponse {
            prices,
            next_page_token,
        })
    }
}

/// Runs a handler with the tenant the auth layer authenticated (never a header the client chose),
/// turning its error into a `Status`.
macro_rules! handle {
    ($self:ident, $request:ident, $method:ident) => {{
        let tenant = Tenant::authenticated($request.extensions())?;
        let result = $self.$method(&tenant, $request.into_inner()).await;
        result.map(Response::new).map_err(Status::from)
    }};
}

#[tonic::async_trait]
impl BudgetService for BudgetApi {
    async fn estimate_cost(
        &self,
        request: Request<pb::EstimateCostRequest>,
    ) -> Result<Response<pb::EstimateCostResponse>, Status> {
        Tenant::authenticated(request.extensions())?;
        let result = self.estimate(request.into_inner()).await;
        result.map(Response::new).map_err(Status::from)
    }

    async fn reserve(
        &self,
        request: Request<pb::ReserveRequest>,
    ) -> Result<Response<pb::ReserveResponse>, Status> {
        handle!(self, request, reserve_)
    }

    async fn commit(
        &self,
        request: Request<pb::CommitRequest>,
    ) -> Result<Response<pb::CommitResponse>, Status> {
        handle!(self, request, commit_)
    }

    async fn release(
        &self,
        request: Request<pb::ReleaseRequest>,
    ) -> Result<Response<pb::ReleaseResponse>, Status> {
        handle!(self, request, release_)
    }

    async fn set_budget(
        &self,
        request: Request<pb::SetBudgetRequest>,
    ) -> Result<Response<pb::SetBudgetResponse>, Status> {
        handle!(self, request, set_budget_)
    }

    async fn get_budget(
        &self,
        request: Request<pb::GetBudgetRequest>,
    ) -> Result<Response<pb::GetBudgetResponse>, Status> {
        handle!(self, request, get_budget_)
    }

    async fn get_spend(
        &self,
        request: Request<pb::GetSpendRequest>,
    ) -> Result<Response<pb::GetSpendResponse>, Status> {
        handle!(self, request, get_spend_)
    }

    async fn list_prices(
        &self,
        request: Request<pb::ListPricesRequest>,
    ) -> Result<Response<pb::ListPricesResponse>, Status> {
        Tenant::authenticated(request.extensions())?;
        self.list_prices_(request.get_ref())
            .map(Response::new)
            .map_err(Status::from)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn money_prints_as_dollars() {
        assert_eq!(usd(5_000_000), "$5.000000");
        assert_eq!(usd(100_000), "$0.100000");
    }

    #[test]
    fn timestamps_round_trip() {
        let ts = timestamp(1_700_000_000_123);
        assert_eq!(timestamp_ms(&ts, "t").ok(), Some(1_700_000_000_123));
    }

    #[test]
    fn rolling_reset_is_when_the_oldest_spend_leaves() {
        let window = Period::Rolling {
            window: Duration::from_secs(60),
        }
        .window_at(125_000);
        // 1 s buckets; spend in bucket 100 leaves the 60 s window at 160 s.
        assert_eq!(reset_ms(&window, Some(100)), 160_000);
    }
}
