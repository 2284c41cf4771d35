//! The five job RPCs (`SubmitJob`, `GetJob`, `WatchJob`, `CancelJob`, `ListJobs`), called by
//! the router's `RouterService` implementation.
//!
//! The tenant is always the authenticated one ([`Tenant::authenticated`]): every key carries it,
//! so another tenant's job id is NOT_FOUND, never someone else's job. A submitted request is
//! checked like `Complete` checks it (the cheap checks of [`crate::request`] and the route), so a
//! bad request is refused now rather than failing later in a worker. A `callback` URL is checked
//! against the allow-list ([`super::callbacks::check_url`]) and the tenant must have a signing
//! secret. The batch RPCs are in [`super::batch_api`].

use std::{sync::Arc, time::Duration};

use futures::StreamExt;
use tonic::{Code, Request, Response, Status, codegen::BoxStream};
use weir_mesh::{ApiError, idempotency::validate_key, tenant::Tenant};
use weir_proto::router::{
    CancelJobRequest, CancelJobResponse, GetJobRequest, GetJobResponse, Job, ListJobsRequest,
    ListJobsResponse, SubmitJobRequest, SubmitJobResponse, WatchJobRequest, WatchJobResponse,
};

use super::{JOBS_DISABLED, JobRecord, JobStore, JobsConfig, ListQuery, NewJob, now_ms};
use crate::{RouterApi, request::Completion};

/// Default `ListJobs` page size.
pub const DEFAULT_PAGE_SIZE: usize = 100;
/// Largest `ListJobs` page size.
pub const MAX_PAGE_SIZE: usize = 1000;
/// How often `WatchJob` re-reads the job.
pub const WATCH_INTERVAL: Duration = Duration::from_millis(100);

/// The jobs of a router: where they live and the `[router.jobs]` settings. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Jobs {
    store: JobStore,
    config: Arc<JobsConfig>,
}

impl Jobs {
    /// Jobs kept in `store`, with `config`.
    pub fn new(store: JobStore, config: JobsConfig) -> Self {
        Self {
            store,
            config: Arc::new(config),
        }
    }

    /// The store.
    pub fn store(&self) -> &JobStore {
        &self.store
    }

    /// The settings.
    pub fn config(&self) -> &JobsConfig {
        &self.config
    }
}

/// The jobs of `api`, or FAILED_PRECONDITION `JOBS_DISABLED`.
pub(super) fn jobs(api: &RouterApi) -> Result<&Jobs, Status> {
    api.jobs.as_ref().ok_or_else(|| {
        Status::from(ApiError::new(
            Code::FailedPrecondition,
            JOBS_DISABLED,
            "jobs are off on this router: set [router.jobs] enabled = true",
        ))
    })
}

pub(super) fn tenant<T>(request: &Request<T>) -> Result<Tenant, Status> {
    Tenant::authenticated(request.extensions()).map_err(Status::from)
}

fn not_found(id: &str) -> Status {
    Status::from(ApiError::not_found("job", id))
}

fn store_error(error: super::JobsError) -> Status {
    Status::from(ApiError::from(error))
}

/// `SubmitJob`: checks the request and queues it (or returns the job of a known `request_id`).
pub async fn submit(
    api: &RouterApi,
    request: Request<SubmitJobRequest>,
) -> Result<Response<SubmitJobResponse>, Status> {
    let jobs = jobs(api)?;
    let tenant = tenant(&request)?;
    let body = request.into_inner();
    if let Some(callback) = &body.callback {
        let config = &jobs.config.callbacks;
        super::callbacks::check_url(&callback.url, config)
            .await
            .map_err(|message| ApiError::invalid_argument("callback.url", message))?;
        config.secret(tenant.as_str()).map_err(|message| {
            ApiError::new(
                Code::FailedPrecondition,
                super::callbacks::NO_CALLBACK_SECRET,
                message,
            )
        })?;
    }
    let Some(mut inner) = body.request else {
        return Err(ApiError::invalid_argument("request", "the request to run is required").into());
    };
    if !body.request_id.is_empty() {
        validate_key("request_id", &body.request_id)?;
    }
    // The worker sends the job id as the request_id of its Complete call.
    inner.request_id.clear();
    let completion = Completion::from(inner.clone());
    completion.check().map_err(ApiError::from)?;
    api.routes()
        .resolve(&completion.model, completion.session())
        .map_err(ApiError::from)?;
    let ttl = match body.ttl {
        None => jobs.config.default_ttl,
        Some(ttl) if ttl.seconds < 0 || ttl.nanos < 0 => {
            return Err(ApiError::invalid_argument("ttl", "must not be negative").into());
        }
        Some(ttl) if ttl.seconds == 0 && ttl.nanos == 0 => jobs.config.default_ttl,
        Some(ttl) => Duration::new(ttl.seconds.unsigned_abs(), ttl.nanos.unsigned_abs()),
    };
    let id = format!("job-{}", uuid::Uuid::new_v4().simple());
    let new = NewJob {
        id: id.clone(),
        request_id: body.request_id,
        body: Job {
            id,
            request: Some(inner),
            callback: body.callback,
            ..Job::default()
        },
        expire_ms: now_ms().saturating_add(i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX)),
    };
    let submitted = jobs
        .store
        .submit(&tenant, new, &jobs.config)
        .await
        .map_err(store_error)?;
    if submitted.created {
        tracing::debug!(%tenant, job = submitted.job.id, "job queued");
    }
    Ok(Response::new(SubmitJobResponse {
        job: Some(submitted.job.to_job()),
    }))
}

async fn load(jobs: &Jobs, tenant: &Tenant, id: &str) -> Result<JobRecord, Status> {
    if id.is_empty() {
        return Err(ApiError::invalid_argument("job_id", "required").into());
    }
    let job = jobs
        .store
        .get(tenant, id)
        .await
        .map_err(store_error)?
        .ok_or_else(|| not_found(id))?;
    jobs.store
        .fresh(tenant, job, &jobs.config)
        .await
        .map_err(store_error)
}

/// `GetJob`.
pub async fn get(
    api: &RouterApi,
    request: Request<GetJobRequest>,
) -> Result<Response<GetJobResponse>, Status> {
    let jobs = jobs(api)?;
    let tenant = tenant(&request)?;
    let job = load(jobs, &tenant, &request.get_ref().job_id).await?;
    Ok(Response::new(GetJobResponse {
        job: Some(job.to_job()),
    }))
}

/// `WatchJob`: the job now, then each change (read every [`WATCH_INTERVAL`]), ending after a
/// terminal state.
pub async fn watch(
    api: &RouterApi,
    request: Request<WatchJobRequest>,
) -> Result<Response<BoxStream<WatchJobResponse>>, Status> {
    let jobs = jobs(api)?.clone();
    let tenant = tenant(&request)?;
    let id = request.into_inner().job_id;
    let first = load(&jobs, &tenant, &id).await?;
    // (last sent, done)
    let state = (Some(first), None::<(i32, u32)>, false);
    let stream = futures::stream::unfold(state, move |(mut next, mut last, done)| {
        let (jobs, tenant, id) = (jobs.clone(), tenant.clone(), id.clone());
        async move {
            if done {
                return None;
            }
            loop {
                let job = match next.take() {
                    Some(job) => job,
                    None => {
                        tokio::time::sleep(WATCH_INTERVAL).await;
                        match load(&jobs, &tenant, &id).await {
                            Ok(job) => job,
                            Err(status) => return Some((Err(status), (None, last, true))),
                        }
                    }
                };
                let seen = (job.state, job.attempts);
                if last == Some(seen) {
                    continue;
                }
                last = Some(seen);
                let terminal = job.is_terminal();
                let item = WatchJobResponse {
                    job: Some(job.to_job()),
                };
                return Some((Ok(item), (None, last, terminal)));
            }
        }
    });
    Ok(Response::new(stream.boxed()))
}

/// `CancelJob`: ends a job that has not ended (CANCELLED); an ended job is returned unchanged.
pub async fn cancel(
    api: &RouterApi,
    request: Request<CancelJobRequest>,
) -> Result<Response<CancelJobResponse>, Status> {
    let jobs = jobs(api)?;
    let tenant = tenant(&request)?;
    let id = &request.get_ref().job_id;
    if id.is_empty() {
        return Err(ApiError::invalid_argument("job_id", "required").into());
    }
    let job = jobs
        .store
        .cancel(&tenant, id, &jobs.config)
        .await
        .map_err(store_error)?
        .ok_or_else(|| not_found(id))?;
    Ok(Response::new(CancelJobResponse {
        job: Some(job.to_job()),
    }))
}

/// `ListJobs`: the tenant's jobs, newest first.
pub async fn list(
    api: &RouterApi,
    request: Request<ListJobsRequest>,
) -> Result<Response<ListJobsResponse>, Status> {
    let jobs = jobs(api)?;
    let tenant = tenant(&request)?;
    let body = request.into_inner();
    let limit = match usize::try_from(body.page_size) {
        Ok(0) => DEFAULT_PAGE_SIZE,
        Ok(size) => size.min(MAX_PAGE_SIZE),
        Err(_) => return Err(ApiError::invalid_argument("page_size", "must be >= 0").into()),
    };
    if !body.batch_id.is_empty() {
        return super::batch_api::list_jobs(
            jobs,
            &tenant,
            &body.batch_id,
            limit,
            &body.page_token,
            body.state,
        )
        .await
        .map(Response::new);
    }
    let before = match body.page_token.as_str() {
        "" => None,
        token => Some(token.parse::<u64>().map_err(|_| {
            Status::from(ApiError::invalid_argument(
                "page_token",
                "not a token from a previous page",
            ))
        })?),
    };
    let page = jobs
        .store
        .list(
            &tenant,
            ListQuery {
                limit,
                before,
                state: body.state,
            },
        )
        .await
        .map_err(store_error)?;
    let mut listed = Vec::with_capacity(page.jobs.len());
    for job in page.jobs {
        let job = jobs
            .store
            .fresh(&tenant, job, &jobs.config)
            .await
            .map_err(store_error)?;
        listed.push(job.to_job());
    }
    Ok(Response::new(ListJobsResponse {
        jobs: listed,
        next_page_token: page.next.map(|n| n.to_string()).unwrap_or_default(),
    }))
}
