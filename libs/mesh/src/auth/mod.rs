//! Who is calling: API keys and mesh tokens mapped to tenants, checked by every service.
//!
//! The tenant of a request decides whose data it may name, whose budget it spends and whose rate
//! limit it counts against, so a client must never be able to choose it. Every Weir server (router,
//! inference, session, budget, review) runs this layer with the same keys (the top-level `[auth]`
//! table), and decides the caller of each call in this order:
//!
//! 1. **A mesh peer**: the call carries a `weir-mesh-token` ([`crate::identity`]). A valid token
//!    makes the call its tenant's, with the criticality the peer sent as its ceiling and no roles;
//!    an invalid one is UNAUTHENTICATED `MESH_TOKEN_INVALID` (in dev mode it is ignored: it could
//!    grant nothing more than sending none).
//! 2. **A key holder** (`mode = "api_keys"`, i.e. keys are configured): `authorization: Bearer
//!    <key>` is required; the key decides the tenant, its roles and its criticality ceiling.
//!    Missing: UNAUTHENTICATED `API_KEY_MISSING`; unknown or malformed: `API_KEY_INVALID`.
//! 3. **Single-tenant dev mode** (`mode = "default_tenant"`, no keys configured; what `weir up`
//!    runs): every caller is the `default` tenant, with every role and no criticality ceiling.
//!
//! A bare `weir-tenant` header is never believed: the layer drops it and sets it to the tenant it
//! decided, so handlers, and the calls they forward, only ever see the authenticated tenant. The
//! `authorization` and `weir-mesh-token` headers are removed, so secrets go no further.
//!
//! | mode | `authorization` | mesh token | client's `weir-tenant` |
//! |---|---|---|---|
//! | `api_keys` | required unless a mesh token is sent | verified | dropped |
//! | `default_tenant` | ignored | a valid one names the tenant; an invalid one is ignored | dropped |
//! | `auto` (default) | `api_keys` when keys are configured, else `default_tenant` | | |
//!
//! There is no mode that trusts a bare header: internal services used to, which let anyone who
//! could reach their ports read and change any tenant's data.
//!
//! # Keys
//!
//! ```toml
//! [auth]
//! # mode = "auto"                      # api_keys | default_tenant | auto
//!
//! [[auth.api_keys]]
//! tenant = "acme"
//! key_env = "WEIR_ACME_KEY"             # the key is read from this environment variable
//!
//! [[auth.api_keys]]
//! id = "ops"                            # optional non-secret name (logs, metrics, rate limits)
//! tenant = "acme"
//! key_sha256 = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
//! roles = ["admin"]                     # admin | reviewer (default none)
//! max_criticality = "CRITICAL_PLUS"     # highest criticality it may claim (default CRITICAL)
//! ```
//!
//! Each key gives exactly one of `key_env` (the secret lives in the environment, e.g. a
//! Kubernetes secret), `key_sha256` (only the hex SHA-256 of the key is in the file, so the file
//! itself is not a secret) or `key` (the key in clear: for tests and local set-ups only). A missing
//! or empty environment variable fails start-up, naming the key. `[router.auth]`, where keys lived
//! before every service authenticated, is still read when `[auth]` is absent.
//!
//! Keys are only ever held hashed: the layer hashes the presented key and looks the digest up, so
//! comparing never touches the secret byte by byte and its timing reveals nothing usable. Keys
//! should be long random strings (128 bits or more); a hash is no protection for a guessable key.
//!
//! # Roles
//!
//! Administrative RPCs name a [`Role`] ([`AuthLayer::require_role`]): `SetBudget`,
//! `DeleteUserSessions` and the router's `RouteAdminService` (`ListRoutes`, `ResumeCanary`,
//! `PauseCanary`) need `admin`; the review decisions (`ClaimNext`, `RenewLease`,
//! `SubmitDecision`, `CancelItem`) and the live queue (`WatchQueue`) need `reviewer`. `admin` satisfies every role. A caller
//! without it is answered PERMISSION_DENIED, reason `ROLE_REQUIRED`, naming the role. Roles are
//! not carried by mesh tokens: the router never makes administrative calls on a user's behalf.
//!
//! # Criticality ceiling
//!
//! A key says the highest criticality it may claim (`max_criticality`, default
//! [`DEFAULT_MAX_CRITICALITY`] = CRITICAL: interactive traffic keeps its place, but only keys
//! configured for it may use CRITICAL_PLUS, the headroom above the admission limit). The layer
//! lowers a `weir-criticality` above the ceiling to the ceiling (a missing header counts as
//! CRITICAL) before admission reads it, and stores the ceiling for handlers
//! ([`criticality_ceiling`]). A mesh-token call's ceiling is the criticality its peer signed.
//!
//! # Where it runs
//!
//! After the deadline layer and **before admission** (see [`crate::server`]): authenticating is a
//! hash lookup, admission must see the clamped criticality, and unauthenticated calls must not
//! take admission slots. Health checks and reflection bypass it so load balancers and grpcurl work
//! without a key. The authenticated tenant (and key id) are recorded on the call's span
//! (`weir.tenant`, `weir.api_key`).
//!
//! Metric: `weir_auth_failures_total{reason}`. The trust model of the whole stack, with its threat
//! model: `docs/security.md`.

mod config;
mod keys;
mod layer;

use std::{fmt, sync::Arc};

pub use config::{ApiKeySpec, AuthConfig, AuthMode, DEFAULT_MAX_CRITICALITY, DEFAULT_MODE, Role};
pub use layer::{Auth, AuthLayer, Authenticator, future};

use crate::{criticality::Criticality, tenant::Tenant};

/// The non-secret name of the API key a request was authenticated with, in its extensions.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ApiKeyId(Arc<str>);

impl ApiKeyId {
    /// An id named `id` (assumed valid: see [`AuthConfig::validate`]).
    pub fn new(id: &str) -> Self {
        Self(Arc::from(id))
    }

    /// The id of the key that authenticated the request, if any.
    pub fn of(extensions: &http::Extensions) -> Option<&ApiKeyId> {
        extensions.get::<ApiKeyId>()
    }

    /// The id.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ApiKeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// How a caller was authenticated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    /// An API key (`authorization: Bearer`).
    ApiKey,
    /// A mesh token from another Weir service.
    MeshToken,
    /// No keys are configured: everyone is the default tenant (single-tenant dev mode).
    DefaultTenant,
}

/// The authenticated caller, in the request's extensions (next to its [`Tenant`] and
/// [`ApiKeyId`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// Whose data the call may name.
    pub tenant: Tenant,
    /// The key it presented, if any.
    pub key: Option<ApiKeyId>,
    /// Its roles (every role in dev mode, none for mesh tokens).
    pub roles: Vec<Role>,
    /// The highest criticality it may claim.
    pub ceiling: Criticality,
    /// How it was authenticated.
    pub via: Via,
}

impl Caller {
    /// The caller the auth layer stored in `extensions`, if it ran.
    pub fn of(extensions: &http::Extensions) -> Option<&Caller> {
        extensions.get::<Caller>()
    }

    /// Whether the caller has `role` (`admin` has every role).
    pub fn has_role(&self, role: Role) -> bool {
        self.roles.contains(&role) || self.roles.contains(&Role::Admin)
    }
}

/// The highest criticality the authenticated caller of a request may claim: its key's
/// `max_criticality`, or the criticality its mesh peer signed; CRITICAL_PLUS when there is no
/// restriction (dev mode, or no auth layer ran).
pub fn criticality_ceiling(extensions: &http::Extensions) -> Criticality {
    Caller::of(extensions).map_or(Criticality::CriticalPlus, |caller| caller.ceiling)
}
