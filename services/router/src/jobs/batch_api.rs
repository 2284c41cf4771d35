//! The batch RPCs (`CreateBatch`, `GetBatch`, `StreamBatchResults`, `CancelBatch`,
//! `ListBatches`) and the batch view of `ListJobs`, called by the router's `RouterService` implementation.
//!
//! As with jobs, the tenant is always the authenticated one and every key carries it, so another
//! tenant's batch id is NOT_FOUND. Every item is checked as `SubmitJob` checks its request (the
//! cheap checks of [`crate::request`] and the route) before anything is stored: a bad item refuses
//! the whole batch with INVALID_ARGUMENT naming `items[i]`, as does a repeated `custom_id`.

use std::{collections::HashMap, collections::VecDeque, time::Duration};

use futures::StreamExt;
use tonic::{Code, Request, Response, Status, codegen::BoxStream};
use weir_mesh::{ApiError, idempotency::validate_key, tenant::Tenant};
use weir_proto::router::{
    Batch, CancelBatchRequest, CancelBatchResponse, CreateBatchRequest, CreateBatchResponse,
    GetBatchRequest, GetBatchResponse, Job, JobError, ListBatchesRequest, ListBatchesResponse,
    ListJobsResponse, StreamBatchResultsRequest, StreamBatchResultsResponse,
    stream_batch_results_response::Outcome,
};

use super::{
    JobRecord, JobsError,
    api::{Jobs, jobs, tenant},
    batch::{BatchRecord, NewBatch, item_job_id},
    now_ms,
};
use crate::{
    RouterApi,
    request::{Completion, MAX_LABELS},
};

/// Longest `custom_id`.
pub const MAX_CUSTOM_ID_LEN: usize = 255;
/// How often `StreamBatchResults` with `follow` looks for new results.
pub const RESULTS_POLL: Duration = Duration::from_millis(200);
/// Results read from the store at once.
const RESULTS_PAGE: usize = 100;

fn not_found(id: &str) -> Status {
    Status::from(ApiError::not_found("batch", id))
}

fn store_error(error: JobsError) -> Status {
    Status::from(ApiError::from(error))
}

fn invalid(field: impl Into<String>, message: impl Into<String>) -> Status {
    Status::from(ApiError::invalid_argument(field, message))
}

/// A protobuf duration as a `Duration`, or INVALID_ARGUMENT naming `field` when negative.
fn duration(field: &str, value: Option<prost_types::Duration>) -> Result<Duration, Status> {
    match value {
        None => Ok(Duration::ZERO),
        Some(d) if d.seconds < 0 || d.nanos < 0 => Err(invalid(field, "must not be negative")),
        Some(d) => Ok(Duration::new(
            d.seconds.unsigned_abs(),
            d.nanos.unsigned_abs(),
        )),
    }
}

fn millis(duration: Duration) -> i64 {
    i64::try_from(duration.as_millis()).unwrap_or(i64::MAX)
}

/// `CreateBatch`: checks every item and the options, then stores the batch (or returns the batch
/// of a known `request_id`).
pub async fn create(
    api: &RouterApi,
    request: Request<CreateBatchRequest>,
) -> Result<Response<CreateBatchResponse>, Status> {
    let jobs = jobs(api)?;
    let tenant = tenant(&request)?;
    let body = request.into_inner();
    let config = &jobs.config().batches;
    if body.callback.is_some() {
        return Err(Status::from(ApiError::new(
            Code::Unimplemented,
            "BATCH_CALLBACKS_UNSUPPORTED",
            "batch callbacks are not supported yet: leave callback unset and follow the batch \
             with StreamBatchResults (follow = true) or GetBatch",
        )));
    }
    if body.items.is_empty() {
        return Err(invalid("items", "a batch needs at least one item"));
    }
    if body.items.len() > config.max_items {
        return Err(invalid(
            "items",
            format!(
                "{} items; a batch holds at most {} (router.jobs.batches.max_items): split it",
                body.items.len(),
                config.max_items
            ),
        ));
    }
    if !body.request_id.is_empty() {
        validate_key("request_id", &body.request_id)?;
    }
    if body.labels.len() > MAX_LABELS {
        return Err(invalid(
            "labels",
            format!("at most {MAX_LABELS} labels, got {}", body.labels.len()),
        ));
    }
    let window = match duration("completion_window", body.completion_window)? {
        Duration::ZERO => config.default_window,
        window if window > config.max_window => {
            return Err(invalid(
                "completion_window",
                format!(
                    "at most {} (router.jobs.batches.max_window)",
                    humantime_serde::re::humantime::format_duration(config.max_window)
                ),
            ));
        }
        window => window,
    };
    let now = now_ms();
    let not_before_ms = match body.not_before {
        None => 0,
        Some(t) => {
            let ms = t
                .seconds
                .saturating_mul(1000)
                .saturating_add(i64::from(t.nanos / 1_000_000));
            if ms > now.saturating_add(millis(config.max_not_before)) {
                return Err(invalid(
                    "not_before",
                    format!(
                        "at most {} ahead (router.jobs.batches.max_not_before)",
                        humantime_serde::re::humantime::format_duration(config.max_not_before)
                    ),
                ));
            }
            ms.max(0)
        }
    };
    let id = format!("batch-{}", uuid::Uuid::new_v4().simple());
    let mut seen: HashMap<&str, usize> = HashMap::with_capacity(body.items.len());
    let mut items = Vec::with_capacity(body.items.len());
    for (n, item) in body.items.iter().enumerate() {
        let field = |name: &str| format!("items[{n}].{name}");
        if item.custom_id.is_empty() || item.custom_id.len() > MAX_CUSTOM_ID_LEN {
            return Err(invalid(
                field("custom_id"),
                format!("must be 1 to {MAX_CUSTOM_ID_LEN} characters"),
            ));
        }
        if let Some(first) = seen.insert(&item.custom_id, n) {
            return Err(invalid(
                field("custom_id"),
                format!(
                    "{:?} is also the custom_id of items[{first}]: every item needs its own",
                    item.custom_id
                ),
            ));
        }
        let Some(mut inner) = item.request.clone() else {
            return Err(invalid(field("request"), "the request to run is required"));
        };
        // The worker sends the item's job id as the request_id of its Complete call.
        inner.request_id.clear();
        let completion = Completion::from(inner.clone());
        completion
            .check()
            .map_err(|error| prefixed(&field("request"), ApiError::from(error)))?;
        api.routes()
            .resolve(&completion.model, completion.session())
            .map_err(|error| prefixed(&field("request"), ApiError::from(error)))?;
        let job_id = item_job_id(&id, n);
        items.push(Job {
            id: job_id,
            request: Some(inner),
            batch_id: id.clone(),
            custom_id: item.custom_id.clone(),
            ..Job::default()
        });
    }
    let start = now.max(not_before_ms);
    let new = NewBatch {
        id: id.clone(),
        request_id: body.request_id,
        body: Batch {
            labels: body.labels,
            ..Batch::default()
        },
        items,
        expire_ms: start.saturating_add(millis(window)),
        not_before_ms,
    };
    let created = jobs
        .store()
        .create_batch(&tenant, new, jobs.config())
        .await
        .map_err(store_error)?;
    if created.created {
        tracing::info!(
            %tenant, batch = created.batch.id, items = created.batch.total, "batch created"
        );
    }
    Ok(Response::new(CreateBatchResponse {
        batch: Some(created.batch.to_batch()),
    }))
}

/// An item's refusal, its field prefixed with the item's place (`items[3].request.model`).
fn prefixed(prefix: &str, error: ApiError) -> Status {
    let status = Status::from(error);
    invalid(prefix, status.message().to_string())
}

async fn load(jobs: &Jobs, tenant: &Tenant, id: &str) -> Result<BatchRecord, Status> {
    if id.is_empty() {
        return Err(invalid("batch_id", "required"));
    }
    jobs.store()
        .get_batch(tenant, id)
        .await
        .map_err(store_error)?
        .ok_or_else(|| not_found(id))
}

/// `GetBatch`.
pub async fn get(
    api: &RouterApi,
    request: Request<GetBatchRequest>,
) -> Result<Response<GetBatchResponse>, Status> {
    let jobs = jobs(api)?;
    let tenant = tenant(&request)?;
    let batch = load(jobs, &tenant, &request.get_ref().batch_id).await?;
    Ok(Response::new(GetBatchResponse {
        batch: Some(batch.to_batch()),
    }))
}

/// `CancelBatch`: CANCELLING (CANCELLED once its running items end); an ended batch is returned
/// unchanged.
pub async fn cancel(
    api: &RouterApi,
    request: Request<CancelBatchRequest>,
) -> Result<Response<CancelBatchResponse>, Status> {
    let jobs = jobs(api)?;
    let tenant = tenant(&request)?;
    let id = &request.get_ref().batch_id;
    if id.is_empty() {
        return Err(invalid("batch_id", "required"));
    }
    let batch = jobs
        .store()
        .cancel_batch(&tenant, id, jobs.config())
        .await
        .map_err(store_error)?
        .ok_or_else(|| not_found(id))?;
    Ok(Response::new(CancelBatchResponse {
        batch: Some(batch.to_batch()),
    }))
}

/// One item's result.
fn result_of(job: JobRecord) -> StreamBatchResultsResponse {
    let outcome = if job.state == super::state::SUCCEEDED {
        job.result.map(Outcome::Response)
    } else {
        Some(Outcome::Error(job.error.unwrap_or_else(|| JobError {
            code: Code::Unknown as i32,
            message: format!("the item ended {}", super::state_name(job.state)),
            reason: String::new(),
        })))
    };
    StreamBatchResultsResponse {
        custom_id: job.body.custom_id,
        job_id: job.id,
        state: job.state,
        outcome,
    }
}

/// Where a results stream is.
struct Cursor {
    jobs: Jobs,
    tenant: Tenant,
    id: String,
    follow: bool,
    /// Position in the batch's results.
    from: u64,
    ready: VecDeque<JobRecord>,
    /// The batch was seen ended: what is left to read is all there is.
    last_read: bool,
}

impl Cursor {
    /// The next result, None at the end of the stream.
    async fn next(&mut self) -> Option<Result<StreamBatchResultsResponse, Status>> {
        loop {
            if let Some(job) = self.ready.pop_front() {
                return Some(Ok(result_of(job)));
            }
            let page = match self
                .jobs
                .store()
                .batch_results(&self.tenant, &self.id, self.from, RESULTS_PAGE)
                .await
            {
                Ok(page) => page,
                Err(error) => return Some(Err(store_error(error))),
            };
            if page.next > self.from {
                // A page of results (of which some may have passed their retention).
                self.from = page.next;
                self.ready.extend(page.jobs);
                continue;
            }
            if !self.follow || self.last_read {
                return None;
            }
            match load(&self.jobs, &self.tenant, &self.id).await {
                // The batch ends in the same step as its last result is listed: once it is seen
                // ended, one more read gets every result.
                Ok(batch) if batch.is_terminal() => self.last_read = true,
                Ok(_) => tokio::time::sleep(RESULTS_POLL).await,
                Err(status) => return Some(Err(status)),
            }
        }
    }
}

/// `StreamBatchResults`: the results of the items that have ended, in the order they ended (each
/// item exactly once); with `follow`, then each new result until the batch has ended.
pub async fn results(
    api: &RouterApi,
    request: Request<StreamBatchResultsRequest>,
) -> Result<Response<BoxStream<StreamBatchResultsResponse>>, Status> {
    let jobs = jobs(api)?.clone();
    let tenant = tenant(&request)?;
    let body = request.into_inner();
    load(&jobs, &tenant, &body.batch_id).await?;
    let cursor = Cursor {
        jobs,
        tenant,
        id: body.batch_id,
        follow: body.follow,
        from: 0,
        ready: VecDeque::new(),
        last_read: false,
    };
    let stream = futures::stream::unfold(cursor, |mut cursor| async move {
        let item = cursor.next().await?;
        Some((item, cursor))
    });
    Ok(Response::new(stream.boxed()))
}

/// Default `ListBatches` page size.
pub const DEFAULT_BATCH_PAGE: usize = 20;
/// Largest `ListBatches` page size.
pub const MAX_BATCH_PAGE: usize = 100;

/// `ListBatches`: the tenant's batches, newest first.
pub async fn list(
    api: &RouterApi,
    request: Request<ListBatchesRequest>,
) -> Result<Response<ListBatchesResponse>, Status> {
    let jobs = jobs(api)?;
    let tenant = tenant(&request)?;
    let body = request.into_inner();
    let limit = match usize::try_from(body.page_size) {
        Ok(0) => DEFAULT_BATCH_PAGE,
        Ok(size) => size.min(MAX_BATCH_PAGE),
        Err(_) => return Err(invalid("page_size", "must be >= 0")),
    };
    let before = match body.page_token.as_str() {
        "" => None,
        token => Some(
            token
                .parse::<u64>()
                .map_err(|_| invalid("page_token", "not a token from a previous page"))?,
        ),
    };
    let page = jobs
        .store()
        .list_batches(&tenant, limit, before)
        .await
        .map_err(store_error)?;
    Ok(Response::new(ListBatchesResponse {
        batches: page.batches.iter().map(BatchRecord::to_batch).collect(),
        next_page_token: page.next.map(|n| n.to_string()).unwrap_or_default(),
    }))
}

/// `ListJobs` with a `batch_id`: the batch's items queued or running (on the first page), then its
/// ended items in the order they ended; the page token is a position in the batch's results.
pub async fn list_jobs(
    jobs: &Jobs,
    tenant: &Tenant,
    batch_id: &str,
    limit: usize,
    token: &str,
    state: i32,
) -> Result<ListJobsResponse, Status> {
    load(jobs, tenant, batch_id).await?;
    let from = match token {
        "" => 0,
        token => token
            .parse::<u64>()
            .map_err(|_| invalid("page_token", "not a token from a previous page"))?,
    };
    let wanted = |job: &JobRecord| state == 0 || job.state == state;
    let mut listed: Vec<Job> = Vec::new();
    if from == 0 {
        let active = jobs
            .store()
            .batch_active(tenant, batch_id)
            .await
            .map_err(store_error)?;
        listed.extend(active.iter().filter(|j| wanted(j)).map(JobRecord::to_job));
    }
    let page = jobs
        .store()
        .batch_results(tenant, batch_id, from, limit)
        .await
        .map_err(store_error)?;
    listed.extend(
        page.jobs
            .iter()
            .filter(|j| wanted(j))
            .map(JobRecord::to_job),
    );
    let full = page.next - from >= u64::try_from(limit).unwrap_or(u64::MAX);
    Ok(ListJobsResponse {
        jobs: listed,
        next_page_token: if full {
            page.next.to_string()
        } else {
            String::new()
        },
    })
}
