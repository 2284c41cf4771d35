//! `weir serve worker`: a process that only runs jobs.
//!
//! The workers take jobs from the queue of `[router.jobs]` (which must be on Redis: a separate
//! process cannot share the router's memory) and run each through the router at
//! `[worker] router_url`, signed with the mesh secret for the job's tenant. Routers run workers of
//! their own too (`[router.jobs] workers`); this process adds capacity without adding a router.
//!
//! ```toml
//! [worker]
//! router_url = "http://127.0.0.1:50051"  # WEIR_WORKER__ROUTER_URL
//! workers = 4                            # default: [router.jobs] workers
//! ```

use serde::{Deserialize, Serialize};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use weir_mesh::{config::ConfigError, identity::MeshIdentity};
use weir_router::jobs::{JobStore, api::Jobs, worker};

/// Default router the workers call.
pub const DEFAULT_ROUTER_URL: &str = "http://127.0.0.1:50051";

/// The `[worker]` table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WorkerConfig {
    /// The router whose `Complete` runs the jobs.
    pub router_url: String,
    /// Workers in this process (default: `[router.jobs] workers`, at least 1).
    pub workers: Option<usize>,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        Self {
            router_url: DEFAULT_ROUTER_URL.to_string(),
            workers: None,
        }
    }
}

/// Starts the workers of a `weir serve worker` process on the queue of `jobs` (the
/// `[router.jobs]` table), until `shutdown`.
pub fn start(
    config: &WorkerConfig,
    jobs: &weir_router::jobs::JobsConfig,
    identity: MeshIdentity,
    shutdown: CancellationToken,
) -> Result<Vec<JoinHandle<()>>, ConfigError> {
    if jobs.redis_url.is_none() {
        return Err(ConfigError::invalid(
            "router.jobs.redis_url",
            "weir serve worker needs the job queue on Redis, shared with the router: set \
             [router.jobs] redis_url (WEIR_ROUTER__JOBS__REDIS_URL) in both",
        ));
    }
    let store = JobStore::from_config(jobs, "router.jobs")?.ok_or_else(|| {
        ConfigError::invalid(
            "router.jobs.enabled",
            "jobs are off: there is nothing to run",
        )
    })?;
    let count = config.workers.unwrap_or(jobs.workers).max(1);
    worker::spawn(
        &Jobs::new(store, jobs.clone()),
        count,
        &config.router_url,
        identity,
        shutdown,
    )
}
