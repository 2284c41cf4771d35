//! Workers: each takes deliveries from the queue and runs the job through the router's own
//! `Complete` over gRPC, so budget, session, review and resilience apply exactly as to a
//! synchronous call.
//!
//! The call is signed with the mesh identity for the job's tenant (`weir-tenant` plus the mesh
//! token of [`weir_mesh::identity`]), at criticality SHEDDABLE_PLUS so the router's admission
//! serves interactive traffic first (batch items: SHEDDABLE, shed before async jobs, and
//! `weir-price-tier: batch` so they are priced at the batch tier), with the job id as its
//! `request_id`: a job re-run after its worker died is answered from the router's idempotency
//! records, so it is paid once.
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
use tonic::transport::Channel;
use tonic::{Code, Status};
use tower::Layer;
use weir_mesh::{
    ApiError,
    config::ConfigError,
    criticality::Criticality,
    identity::{MeshIdentity, Sign, SignLayer},
    metadata::TENANT,
    outcome::OVERLOADED,
};
use weir_proto::router::{JobError, router_service_client::RouterServiceClient};

use super::{Delivery, JobRecord, JobStore, JobsConfig, Queue, api::Jobs, callbacks::Dispatcher};
use weir_mesh::metadata::{BATCH_PRICE_TIER, PRICE_TIER};

/// How often a worker reclaims stuck deliveries and promotes retries.
pub const JANITOR_INTERVAL: Duration = Duration::from_millis(500);
/// How long a worker's read of the queue blocks.
pub const READ_WAIT: Duration = Duration::from_millis(500);
/// How often a running job is checked for cancellation.
pub const CANCEL_CHECK: Duration = Duration::from_millis(250);
/// Pause before calling again a router that could not be reached (or shed the call without
/// saying when to come back).
const UNREACHED_PAUSE: Duration = Duration::from_millis(500);
/// Pause after the queue could not be read.
const ERROR_PAUSE: Duration = Duration::from_secs(1);

/// The client the workers call the router with: a channel whose calls are signed with the
/// mesh identity. No retry, breaker or bulkhead of its own: the router applies those to each
/// model, and a failed job is retried by the queue, so a poison job cannot trip a breaker that
/// would stop every other job.
pub type RouterClient = RouterServiceClient<Sign<Channel>>;

/// A [`RouterClient`] of the router at `router_url`, signed with `identity`.
pub fn router_client(
    router_url: &str,
    identity: MeshIdentity,
) -> Result<RouterClient, ConfigError> {
    let channel = weir_mesh::client::lazy_channel(router_url.trim())
        .map_err(|error| ConfigError::invalid("worker.router_url", error.to_string()))?;
    Ok(RouterServiceClient::new(
        SignLayer::new(identity).layer(channel),
    ))
}

/// Starts `count` workers on `jobs`, calling the router at `router_url` signed with `identity`,
/// until `shutdown`. Their consumer names are `<host>-<pid>-<random>-<n>`, unique per process.
/// With at least one worker, a callback [`Dispatcher`] and the recurring batches
/// ([`super::schedule`]) run too.
pub fn spawn(
    jobs: &Jobs,
    count: usize,
    router_url: &str,
    identity: MeshIdentity,
    shutdown: CancellationToken,
) -> Result<Vec<tokio::task::JoinHandle<()>>, ConfigError> {
    let client = router_client(router_url, identity)?;
    let process = format!(
        "{}-{}-{}",
        std::env::var("HOSTNAME").unwrap_or_else(|_| "worker".to_string()),
        std::process::id(),
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    );
    let mut handles: Vec<_> = (0..count)
        .map(|n| {
            let worker = Worker {
                store: jobs.store().clone(),
                config: jobs.config().clone(),
                client: client.clone(),
                consumer: format!("{process}-{n}"),
            };
            tokio::spawn(worker.run(shutdown.clone()))
        })
        .collect();
    if count > 0 {
        // Callbacks are delivered, and recurring batches created, wherever workers run.
        let dispatcher = Dispatcher::new(jobs.store().clone(), jobs.config().callbacks.clone())?;
        let schedules =
            super::schedule::parse_all(&jobs.config().schedules, "router.jobs.schedules")?;
        handles.extend(super::schedule::spawn(schedules, client, shutdown.clone()));
        handles.push(tokio::spawn(dispatcher.run(shutdown)));
    }
    Ok(handles)
}

/// One worker: a consumer of the queue.
struct Worker {
    store: JobStore,
    config: JobsConfig,
    client: RouterClient,
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
                    .reclaim(&self.consumer, self.config.reclaim_after(), &self.config)
                    .await
                {
                    Ok(reclaimed) => {
                        for delivery in reclaimed {
                            tracing::info!(
                                consumer = self.consumer,
                                job = delivery.id,
                                "reclaimed a job whose worker stopped"
                            );
                            if let Err(error) = self.store.lost(&delivery, &self.consumer).await {
                                tracing::warn!(%error, job = delivery.id, "lost job not requeued");
                            }
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
                Ok(deliveries) => {
                    for delivery in deliveries {
                        self.handle(delivery, &shutdown).await;
                    }
                }
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
        // Async jobs come after interactive traffic, batch items after everything.
        let (criticality, tier) = match delivery.queue {
            Queue::Async => (Criticality::SheddablePlus, None),
            Queue::Batch => (Criticality::Sheddable, Some(BATCH_PRICE_TIER)),
        };
        let mut body = job.body.request.clone().unwrap_or_default();
        body.request_id.clone_from(&job.id);
        body.criticality = criticality.into();
        let tenant = tonic::metadata::MetadataValue::try_from(delivery.tenant.as_str())
            .map_err(|_| Status::internal("tenant id is not valid metadata"))?;
        let give_up = tokio::time::Instant::now() + self.config.handler_limit;
        loop {
            let mut request = tonic::Request::new(body.clone());
            request.set_timeout(give_up.saturating_duration_since(tokio::time::Instant::now()));
            request.metadata_mut().insert(TENANT, tenant.clone());
            if let Some(tier) = tier {
                request.metadata_mut().insert(
                    PRICE_TIER,
                    tonic::metadata::MetadataValue::from_static(tier),
                );
            }
            criticality.set_on(&mut request);
            let mut client = self.client.clone();
            let outcome = client.complete(request).await;
            // The router could not be reached, shed the job for more important traffic, or the
            // tenant is at its rate limit: not the job's fault, so it costs no delivery, and the
            // worker waits instead of taking more work. The call is idempotent (the job id is its
            // request_id), so sending it again is safe even if the router did receive it.
            if let Err(status) = &outcome
                && let Some(pause) = resend_after(status)
                && tokio::time::Instant::now() + pause < give_up
            {
                tracing::debug!(job = job.id, %status, ?pause, "job call refused for now; resending");
                tokio::time::sleep(pause).await;
                continue;
            }
            return outcome.map(tonic::Response::into_inner);
        }
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

/// Whether the call never reached a router: a status made by the client's own channel (a
/// router's answer always carries `content-type: application/grpc`).
fn unreached(status: &Status) -> bool {
    status.code() == Code::Unavailable && status.metadata().get("content-type").is_none()
}

/// How long to wait before sending a refused call again within the same delivery: when it never
/// reached a router ([`unreached`]), was shed (`OVERLOADED`) or rate-limited (`RATE_LIMITED`, after
/// its RetryInfo). None for every other failure.
fn resend_after(status: &Status) -> Option<Duration> {
    if unreached(status) {
        return Some(UNREACHED_PAUSE);
    }
    let error = ApiError::from_status(status);
    matches!(error.reason(), OVERLOADED | "RATE_LIMITED").then(|| {
        error
            .retry_after()
            .unwrap_or(UNREACHED_PAUSE)
            .clamp(Duration::from_millis(50), Duration::from_secs(5))
    })
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

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn only_transient_failures_are_retried() {
        assert!(retryable(&Status::unavailable("down")));
        assert!(retryable(&Status::deadline_exceeded("slow")));
        assert!(retryable(&Status::from(ApiError::resource_exhausted(
            "RATE_LIMITED",
            "tenant acme",
            "slow down",
        ))));
        assert!(!retryable(&Status::from(ApiError::resource_exhausted(
            "BUDGET_EXHAUSTED",
            "tenant acme",
            "no money",
        ))));
        assert!(!retryable(&Status::invalid_argument("bad")));
        assert!(!retryable(&Status::not_found("no such model")));
    }

    #[test]
    fn a_status_without_grpc_headers_never_reached_a_router() {
        assert!(unreached(&Status::unavailable("tcp connect error")));
        let mut answered = Status::unavailable("every model failed");
        answered
            .metadata_mut()
            .insert("content-type", "application/grpc".parse().unwrap());
        assert!(!unreached(&answered));
        assert_eq!(resend_after(&answered), None);
        let shed = Status::from(ApiError::unavailable(OVERLOADED, "busy"));
        assert_eq!(resend_after(&shed), Some(UNREACHED_PAUSE));
        let limited = Status::from(
            ApiError::resource_exhausted("RATE_LIMITED", "tenant acme", "slow down")
                .with_retry_after(Duration::from_millis(120)),
        );
        assert_eq!(resend_after(&limited), Some(Duration::from_millis(120)));
        let error = job_error(&Status::from(ApiError::unavailable("UPSTREAM", "down")));
        assert_eq!((error.code, error.reason.as_str()), (14, "UPSTREAM"));
    }
}
