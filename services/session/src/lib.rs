//! weir-session: conversation history in Redis, token-budgeted context and summarization.
//!
//! The API is `weir.session.v1.SessionService` (`proto/weir/session/v1/session.proto`).
//! Production servers keep no conversation state: a session's turns live in Redis, so any replica
//! serves any session and a restarted process loses nothing. Long conversations would outgrow the
//! model's context and cost more every turn, so the oldest turns are compressed into a summary by
//! the inference service, in the background, without ever losing a turn.
//!
//! - [`store`]: the [`store::Store`] trait, its Redis implementation (key layout and Lua scripts
//!   documented there) and the in-memory one used when no `redis_url` is set.
//! - [`api`]: the RPCs and their semantics.
//! - [`context`]: which turns fit a token budget, never splitting a tool call from its results;
//!   [`context::context_messages`] turns a `GetContext` answer into the messages to prepend.
//! - [`summarizer`]: when and how old turns are summarized, and why commits are compare-and-swap.
//! - [`error`]: how failures become statuses (Redis down → UNAVAILABLE, `REDIS_UNAVAILABLE`).
//! - [`config`]: the `[session]` table and its defaults.
//!
//! # Defaults
//!
//! Sessions expire after 24 h without an append (`default_ttl`; a `CreateSession` may ask for 1 s
//! to `max_ttl`, 30 days). Summaries start when raw turns exceed 80% of the context budget
//! (context window minus `max_output_tokens`) of the session's model and keep the newest half of
//! that raw. Token counts use [`weir_mesh::tokens`] with the model's tokenizer family: exact for
//! the `sim` family of the simulated models, an estimate (characters / 4) for the others.
//!
//! # For callers (the router)
//!
//! Before inference: `GetContext { session_id, model }` (with `max_tokens` 0 the model's own
//! budget applies) and prepend [`context::context_messages`] to the new messages. After it:
//! `AppendTurns { session_id, messages: [user message, answer], request_id }`, with a request id
//! derived from the caller's, so a retried call appends once.
//!
//! # Who
//!
//! Every RPC acts for the tenant the server's auth layer authenticated ([`weir_mesh::auth`]: an
//! API key, as at the router, or the router's mesh token); a bare `weir-tenant` header is
//! ignored. `DeleteUserSessions` needs a key with the `admin` role. The summarizer signs its calls
//! to inference with the process's mesh identity, so inference bills the session's tenant.
//!
//! Logging never includes message, summary or metadata content: only ids, counts and outcomes.
#![warn(missing_docs)]

use std::{sync::Arc, time::SystemTime};

use weir_mesh::{
    auth::Role, catalog::Catalog, config::ConfigError, identity::MeshIdentity, server::GrpcServer,
};
use weir_proto::service_names;

pub mod api;
pub mod config;
pub mod context;
pub mod error;
pub mod ids;
pub mod store;
pub mod summarizer;
pub mod validate;

pub use api::SessionApi;
pub use config::Config;
pub use summarizer::SummaryStats;

use crate::{
    store::{AnyStore, MemoryStore, RedisStore},
    summarizer::Summarizer,
};

/// Why the session service could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The `[session]` table is invalid (the message names the key).
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// Redis could not be reached at `session.redis_url` (the error names the URL without its
    /// password).
    #[error("session store: {0} (check session.redis_url / WEIR_SESSION__REDIS_URL)")]
    Redis(#[from] weir_mesh::store::ConnectError),
    /// `session.inference_url` is not a usable URL.
    #[error("invalid configuration: `session.inference_url`: {url:?}: {source}")]
    InferenceUrl {
        /// The URL.
        url: String,
        /// Why it cannot be used (it names the bad element of a list).
        source: weir_mesh::balance::BadUrl,
    },
}

/// Builds the service: validates `config` against `catalog`, connects to Redis (or creates the
/// in-memory store when `redis_url` is unset) and prepares the (lazy) channel to the inference
/// service, whose calls `identity` signs. Keep a clone of the returned API to read its
/// [`SessionApi::summary_stats`].
pub async fn api(
    config: &Config,
    catalog: Arc<Catalog>,
    identity: MeshIdentity,
) -> Result<SessionApi, StartError> {
    config.validate(&catalog)?;
    let store = match &config.redis_url {
        Some(url) => AnyStore::Redis(RedisStore::connect(url, &config.key_prefix).await?),
        None => {
            tracing::warn!(
                "session: no redis_url; sessions are kept in memory and lost on restart"
            );
            AnyStore::Memory(MemoryStore::new())
        }
    };
    // A list of URLs or a host name is balanced over every inference replica.
    let channel = weir_mesh::local::Dialer::default()
        .dial_balanced(
            &config.inference_url,
            &weir_mesh::balance::BalanceConfig::default(),
            "inference",
        )
        .map_err(|source| StartError::InferenceUrl {
            url: config.inference_url.clone(),
            source,
        })?;
    let summarizer = Summarizer::new(
        store.clone(),
        channel,
        identity,
        catalog.clone(),
        config.clone(),
    );
    Ok(SessionApi::new(store, catalog, config.clone(), summarizer))
}

/// Hosts an existing [`SessionApi`] on a server, ready to `serve`. It authenticates in
/// single-tenant dev mode until given the stack's keys with [`GrpcServer::with_auth`].
pub fn server_with(api: SessionApi) -> GrpcServer {
    GrpcServer::default()
        .add_service(api.into_service())
        // Erasing a user's whole history is an administrator's decision.
        .require_role(
            format!("/{}/DeleteUserSessions", service_names::SESSION),
            Role::Admin,
        )
}

/// Builds the session server for `config`, ready to `serve` (see [`api`]).
pub async fn server(
    config: &Config,
    catalog: Arc<Catalog>,
    identity: MeshIdentity,
) -> Result<GrpcServer, StartError> {
    Ok(server_with(api(config, catalog, identity).await?))
}

/// Now, in Unix milliseconds.
pub(crate) fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}
