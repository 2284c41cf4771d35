//! weir-review: the human review queue, with leases, SLAs and an audit trail.
//!
//! The API is `weir.review.v1.ReviewService` (`proto/weir/review/v1/review.proto`). Risky
//! outputs are queued as items; reviewers claim the most urgent one under a lease, and approve,
//! reject or edit it; an item not decided within its SLA gets its queue's timeout action; every
//! transition is audited.
//!
//! - [`store`]: the [`store::Store`] trait, its Redis implementation (key layout and Lua scripts
//!   documented there) and the in-memory one used when no `redis_url` is set; the state machine
//!   and its guarantees.
//! - [`mod@api`]: the RPCs and their semantics; [`error`]: how failures become statuses.
//! - [`sweeper`]: lapsed leases and SLA timeout actions, exactly once across replicas.
//! - [`config`]: the `[review]` table; [`metrics`]: the Prometheus series.
//! - [`console`]: the reviewer console, a web page on a port of its own.
//! - [`reveal`]: a blocking item's output is for reviewers until it is approved.
//!
//! # States
//!
//! PENDING → CLAIMED (a lease; back to PENDING when it lapses, audited as actor `system`) →
//! DECIDED (approve, reject, edit). CANCELLED and EXPIRED are the other ends. A decided,
//! cancelled or expired item never changes again. When an item's SLA passes, its queue's
//! `timeout_action` applies: `reject` (the default, failing closed) ends it EXPIRED, the output
//! withheld; `approve` ends it DECIDED/APPROVE by reviewer `system:sla`; `escalate` moves it to
//! `escalate_to`, PENDING there with that queue's SLA (audited as `ESCALATED`).
//!
//! # Who
//!
//! Every RPC acts for the tenant the server's auth layer authenticated ([`weir_mesh::auth`]).
//! The review decisions and the live queue ([`REVIEWER_METHODS`]: `ClaimNext`, `RenewLease`,
//! `SubmitDecision`, `CancelItem`, `WatchQueue`) need a key with the `reviewer` (or `admin`)
//! role, checked before the call reaches the service: without it they are PERMISSION_DENIED
//! `ROLE_REQUIRED`. Creating, reading and watching one item need no role (the router does them
//! with its mesh token, which carries none).
//!
//! Logging never includes conversation, output or comment content: only ids and outcomes.
#![warn(missing_docs)]

use std::sync::Arc;

use weir_mesh::{auth::Role, config::ConfigError, server::GrpcServer};
use weir_proto::{review::review_service_server::ReviewServiceServer, service_names};

pub mod api;
pub mod config;
pub mod console;
pub mod error;
pub mod metrics;
pub mod reveal;
pub mod store;
pub mod sweeper;

pub use api::ReviewApi;
pub use config::Config;

use crate::store::{AnyStore, MemoryStore, RedisStore};

/// The RPCs that decide on review items or follow a whole queue: they need the `reviewer` (or
/// `admin`) role.
pub const REVIEWER_METHODS: [&str; 5] = [
    "ClaimNext",
    "RenewLease",
    "SubmitDecision",
    "CancelItem",
    "WatchQueue",
];

/// Why the review service could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The `[review]` table is invalid (the message names the key).
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// Redis could not be reached at `review.redis_url`.
    #[error("review store: {0} (check review.redis_url / WEIR_REVIEW__REDIS_URL)")]
    Redis(#[from] weir_mesh::store::ConnectError),
}

/// Builds the service: validates `config`, connects to Redis (or creates the in-memory store
/// when `redis_url` is unset) and starts the sweeper, which runs until every clone of the API
/// is dropped.
pub async fn api(config: &Config) -> Result<ReviewApi, StartError> {
    config.validate()?;
    let store = match &config.redis_url {
        Some(url) => AnyStore::Redis(Box::new(
            RedisStore::connect(url, &config.key_prefix).await?,
        )),
        None => {
            tracing::warn!(
                "review: no redis_url; review items are kept in memory and lost on restart"
            );
            AnyStore::Memory(MemoryStore::new())
        }
    };
    let api = ReviewApi::new(store, config.clone());
    metrics::register();
    sweeper::spawn(Arc::downgrade(&api.inner), config.sweep_interval);
    Ok(api)
}

/// Hosts an existing [`ReviewApi`] on a server, ready to `serve`. It authenticates in
/// single-tenant dev mode until given the stack's keys with [`GrpcServer::with_auth`].
pub fn server_with(api: ReviewApi) -> GrpcServer {
    REVIEWER_METHODS.into_iter().fold(
        GrpcServer::default().add_service(ReviewServiceServer::new(api)),
        // Only people trusted to review may take, keep, decide or withdraw an item, or follow
        // a whole queue.
        |server, method| {
            server.require_role(
                format!("/{}/{method}", service_names::REVIEW),
                Role::Reviewer,
            )
        },
    )
}

/// Builds the review server for `config`, ready to `serve` (see [`api()`]).
pub async fn server(config: &Config) -> Result<GrpcServer, StartError> {
    Ok(server_with(api(config).await?))
}
