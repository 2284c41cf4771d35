//! Workers: each takes deliveries from the queue and runs the job through the router's own
//! `Complete` over gRPC, so budget, session, review and resilience apply exactly as to a
//! synchronous call.
//!
//! The call is signed with the mesh identity for the job's tenant (`weir-tenant` plus the mesh
//! token of [`weir_mesh::identity`]), at criticality SHEDDABLE_PLUS so the router's admission
//! serves interactive traffic first, with the job id as its `request_id`: a job re-run after its
//! worker died is answered from the router's idempotency records, so it is paid once.
//!
//! Outcomes: an answer → SUCCEEDED (the result is stored, then the delivery acknowledged, in one
//! step); a retryable error ([`retryable`]) → QUEUED again after a backoff, dead-lettered after
//! `max_deliveries`; any other error → FAILED with its code, message and reason. A job cancelled
//! while it runs has its call dropped.
//!
//! Every worker is also a janitor: every [`JANITOR_INTERVAL`] it moves jobs whose backoff is over
//! back onto the queue and reclaims deliveries held longer than the handler limit (XAUTOCLAIM):
//! their worker died or hangs.

use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tonic::{Code, Status};
use weir_mesh::{
    ApiError,
    client::{ClientConfig, ClientStack},
    config::ConfigError,
    criticality::Criticality,
    identity::MeshIdentity,
    metadata::TENANT,
    timeout::TimeoutConfig,
};
use weir_proto::router::{JobError, router_service_client::RouterServiceClient};

use super::{Delivery, JobRecord, JobStore, JobsConfig, api::Jobs};

/// How often a worker reclaims stuck deliveries and promotes retries.
pub const JANITOR_INTERVAL: Duration = Duration::from_millis(500);
/// How long a worker's read of the queue blocks.
pub const READ_WAIT: Duration = Duration::from_millis(500);
/// How often a running job is checked for cancellation.
pub const CANCEL_CHECK: Duration = Duration::from_millis(250);
/// Pause after the queue could not be read.
const ERROR_PAUSE: Duration = Duration::from_secs(1);

/// A client of the router the workers call, signed with `identity`, with no attempt timeout
/// shorter than the handler limit.
pub fn router_client(
    router_url: &str,
    identity: MeshIdentity,
    config: &JobsConfig,
) -> Result<RouterServiceClient<weir_mesh::client::BoxedClient>, ConfigError> {
    let channel = weir_mesh::client::lazy_channel(router_url.trim())
        .map_err(|error| ConfigError::invalid("router.jobs.router_url", error.to_string()))?;
    let settings = ClientConfig {
        timeout: TimeoutConfig {
            attempt_timeout: config.handler_limit,
            ..TimeoutConfig::default()
        },
        ..ClientConfig::default()
    };
    let stack = ClientStack::signed(channel, &settings, identity);
    Ok(RouterServiceClient::new(stack.service()))
}

/// Starts `count` workers on `jobs`, calling the router at `router_url` signed with `identity`,
/// until `shutdown`. Their consumer names are `<host>-<pid>-<random>-<n>`, unique per process.
pub fn spawn(
    jobs: &Jobs,
    count: usize,
    router_url: &str,
    identity: MeshIdentity,
    shutdown: CancellationToken,
) -> Result<Vec<tokio::task::JoinHandle<()>>, ConfigError> {
    let client = router_client(router_url, identity, jobs.config())?;
    let process = format!(
        "{}-{}-{}",
        std::env::var("HOSTNAME").unwrap_or_else(|_| "worker".to_string()),
        std::process::id(),
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    );
    Ok((0..count)
        .map(|n| {
            let worker = Worker {
                store: jobs.store().clone(),
                config: jobs.config().clone(),
                client: client.clone(),
                consumer: format!("{process}-{n}"),
            };
            tokio::spawn(worker.run(shutdown.clone()))
        })
        .collect())
}

/// One worker: a consumer of the queue.
struct Worker {
    store: JobStore,
    config: JobsConfig,
    client: RouterServiceClient<weir_mesh::client::BoxedClient>,
    consumer: String,
}

impl Worker {
    async fn run(self, shutdown: CancellationToken) {
        tracing::debug!(consumer = self.consumer, "job worker started");
        let mut janitor_due = tokio::time::Instant::now();
        loop {
            if tokio::time::Instant::now() >= janitor_due {
                janitor_due = tokio::time::Instant::now() + JANITOR_INTERVAL;
                match self
                    .store
                    .reclaim(&self.consumer, self.config.reclaim_after())
                    .await
                {
                    Ok(reclaimed) => {
                        for delivery in reclaimed {
                            tracing::info!(
                                consumer = self.consumer,
                                job = delivery.id,
                                "reclaimed a job whose worker stopped"
                            );
                            self.handle(delivery, &shutdown).await;
                        }
                    }
                    Err(error) => tracing::warn!(%error, "job janitor failed"),
                }
            }
            // Only shutdown interrupts a read: a read dropped mid-way could take an entry that
            // then waits for the janitor.
            let next = tokio::select! {
                () = shutdown.cancelled() => return,
                next = self.store.next(&self.consumer, READ_WAIT) => next,
            };
            match next {
                Ok(Some(delivery)) => self.handle(delivery, &shutdown).await,
                Ok(None) => {}
                Err(error) => {
                    tracing::warn!(%error, "job queue could not be read");
                    tokio::time::sleep(ERROR_PAUSE).await;
                }
            }
        }
    }

    /// Runs one delivery to its outcome. A store failure leaves the delivery pending: the
    /// janitor reclaims it later.
    async fn handle(&self, delivery: Delivery, shutdown: &CancellationToken) {
        let job = match self
            .store
            .start(&delivery, &self.consumer, &self.config)
            .await
        {
            Ok(Some(job)) => job,
            Ok(None) => return,
            Err(error) => {
                tracing::warn!(%error, job = delivery.id, "job could not be started");
                return;
            }
        };
        let outcome = tokio::select! {
            outcome = self.call(&delivery, &job) => outcome,
            () = self.cancelled(&delivery) => {
                tracing::debug!(job = delivery.id, "job cancelled while running");
                // The job is terminal: this acknowledges the delivery.
                let _ = self.store.fail(&delivery, &JobError::default(), &self.config).await;
                return;
            }
            // Shutting down: leave the delivery pending, to be reclaimed.
            () = shutdown.cancelled() => return,
        };
        let stored = match outcome {
            Ok(response) => self
                .store
                .succeed(&delivery, &response, &self.config)
                .await
                .map(|_| ()),
            Err(status) if retryable(&status) => {
                let backoff = self.config.backoff_after(job.attempts);
                tracing::debug!(
                    job = delivery.id, attempts = job.attempts, code = ?status.code(),
                    "job attempt failed; retrying"
                );
                self.store
                    .retry(&delivery, &job_error(&status), backoff, &self.config)
                    .await
            }
            Err(status) => self
                .store
                .fail(&delivery, &job_error(&status), &self.config)
                .await
                .map(|_| ()),
        };
        if let Err(error) = stored {
            tracing::warn!(%error, job = delivery.id, "job outcome could not be stored");
        }
    }

    /// The job's `Complete` call through the router.
    async fn call(
        &self,
        delivery: &Delivery,
        job: &JobRecord,
    ) -> Result<weir_proto::router::CompleteResponse, Status> {
        let mut body = job.body.request.clone().unwrap_or_default();
        body.request_id.clone_from(&job.id);
        body.criticality = weir_proto::common::Criticality::SheddablePlus.into();
        let mut request = tonic::Request::new(body);
        request.set_timeout(self.config.handler_limit);
        let tenant = tonic::metadata::MetadataValue::try_from(delivery.tenant.as_str())
            .map_err(|_| Status::internal("tenant id is not valid metadata"))?;
        request.metadata_mut().insert(TENANT, tenant);
        Criticality::SheddablePlus.set_on(&mut request);
        let mut client = self.client.clone();
        client
            .complete(request)
            .await
            .map(tonic::Response::into_inner)
    }

    /// Resolves once the job has ended without this worker (cancelled).
    async fn cancelled(&self, delivery: &Delivery) {
        loop {
            tokio::time::sleep(CANCEL_CHECK).await;
            if let Ok(Some(job)) = self.store.get(&delivery.tenant, &delivery.id).await
                && job.is_terminal()
            {
                return;
            }
        }
    }
}

/// Whether a failed attempt is worth another: the service was unavailable, overloaded, out of
/// time, or the tenant's rate limit refused it. Refusals of the request itself
/// (INVALID_ARGUMENT, NOT_FOUND, a budget refusal, ...) are final.
pub fn retryable(status: &Status) -> bool {
    match status.code() {
        Code::Unavailable | Code::DeadlineExceeded | Code::Aborted | Code::Unknown => true,
        Code::ResourceExhausted => ApiError::from_status(status).reason() == "RATE_LIMITED",
        _ => false,
    }
}

/// The `JobError` of a failed call.
pub fn job_error(status: &Status) -> JobError {
    let error = ApiError::from_status(status);
    JobError {
        code: status.code() as i32,
        message: status.message().to_string(),
        reason: error.reason().to_string(),
    }
}
