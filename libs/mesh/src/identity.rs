//! Mesh identity: which calls come from another Weir service, and what they may assert.
//!
//! # Why
//!
//! Every Weir service puts the caller's tenant in every storage key, so whoever decides the tenant
//! decides whose data a call reads. A user authenticates with an API key at whichever service they
//! call ([`crate::auth`]); the router then calls session, budget and inference *on the user's
//! behalf*, naming the tenant in `weir-tenant`. A bare `weir-tenant` header proves nothing (anyone
//! who can reach a port can send one), so a service believes it only when the call also carries a
//! valid **mesh token**: proof that the caller holds the mesh secret, i.e. is a Weir service of
//! this deployment.
//!
//! # Why an HMAC token and not mTLS
//!
//! Both were considered. mTLS with a mesh CA authenticates the *connection*; it needs a CA,
//! certificate issuance and rotation for every service and every development set-up, and it still
//! needs a way to carry the tenant per call. A per-call HMAC-SHA256 token needs one shared secret
//! (`weir up` generates it), binds the asserted tenant to the call itself (method, expiry,
//! criticality), and verifies with one hash and a constant-time compare (ring). What it does not
//! give is confidentiality: run the mesh on a private network, or behind a TLS sidecar, when the
//! network between services is not trusted (see "Threat model").
//!
//! # The token
//!
//! The client side ([`SignLayer`], innermost in every [`crate::client::ClientStack`] built with
//! an identity) adds to each outgoing call that names a tenant:
//!
//! ```text
//! weir-mesh-token: v1;t=<tenant>;c=<criticality>;e=<expiry, Unix ms>;m=<hex HMAC-SHA256>
//! ```
//!
//! The MAC covers `weir-mesh-token/v1`, the method path (`/weir.session.v1.SessionService/GetContext`)
//! and every field before `;m=`. So a token is only good for the method it was made for and only
//! until its expiry, which is the call's deadline or [`MeshConfig::token_ttl`] from now, whichever
//! is sooner (each attempt of a retried call is signed afresh). `c` is the criticality the peer
//! sent: it is the ceiling the callee clamps `weir-criticality` to, so a replayed token cannot
//! raise it. Roles are never carried: a mesh token grants the tenant's ordinary access, and
//! administrative RPCs need an API key with the role, presented to the service itself.
//!
//! The server side ([`MeshIdentity::verify`], called by the auth layer) refuses a token that does
//! not parse, whose MAC matches none of the accepted secrets, that expired more than
//! [`MeshConfig::clock_skew`] ago, or whose expiry is further ahead than the TTL allows:
//! UNAUTHENTICATED, reason `MESH_TOKEN_INVALID`.
//!
//! # Threat model
//!
//! An attacker who can reach an internal port (session, budget, review, inference) but does not
//! hold the mesh secret:
//! - **cannot** name another tenant: a bare `weir-tenant` is dropped, and a forged, tampered,
//!   expired or other-method token is refused; without credentials the call is the `default`
//!   tenant only when no API keys are configured at all (single-tenant dev mode), else refused;
//! - **can** call with their own API key, exactly as at the router (same keys, same tenant, same
//!   roles, criticality clamped to the key's ceiling);
//! - **can**, if they can also *read* traffic between services, replay a captured token for the
//!   same method until it expires (at most the call's deadline, at most `token_ttl`), with a
//!   request body of their choosing. Tokens are not bound to the body (streams cannot be hashed
//!   before they are sent) nor single-use (that would need shared state per call). Keep the
//!   network between services private, or encrypt it, if that matters in your deployment.
//!
//! Whoever holds the mesh secret is the mesh: treat it like a database password. Secrets are held
//! only as HMAC keys and never logged; a secret shorter than [`MIN_SECRET_LEN`] is refused.
//!
//! # Rotation
//!
//! Tokens are signed with `secret` and accepted under `secret` or any of `previous_secrets`. To
//! rotate without failing calls: (1) add the new secret to `previous_secrets` everywhere and roll
//! out; (2) make it `secret`, moving the old one to `previous_secrets`, and roll out; (3) drop
//! the old one.
//!
//! # Configuration
//!
//! ```toml
//! [mesh]
//! secret_env = "WEIR_MESH_SECRET"   # or `secret = "..."`, or WEIR_MESH__SECRET
//! previous_secrets = []             # still accepted, never used to sign
//! token_ttl = "30s"                 # longest lifetime of a token
//! clock_skew = "2s"                 # tolerated clock difference between hosts
//! ```
//!
//! `weir up` (every service in one process) generates a random secret when none is configured;
//! services in separate processes need the same configured secret as soon as API keys exist.
//! `docs/security.md` describes the trust model of the whole stack.

use std::{
    fmt,
    sync::Arc,
    task::{Context, Poll},
    time::{Duration, SystemTime},
};

use ring::{
    hmac,
    rand::{SecureRandom, SystemRandom},
};
use serde::{Deserialize, Serialize};
use tower::{Layer, Service};

use crate::{
    config::ConfigError,
    criticality::Criticality,
    deadline::Deadline,
    error::ApiError,
    metadata::{MESH_TOKEN, TENANT},
    tenant::Tenant,
};

/// Default longest lifetime of a mesh token (a call's deadline shortens it).
pub const DEFAULT_TOKEN_TTL: Duration = Duration::from_secs(30);
/// Default clock difference tolerated between the signing and the verifying host.
pub const DEFAULT_CLOCK_SKEW: Duration = Duration::from_secs(2);
/// Shortest accepted mesh secret, in bytes (256 bits of a random string's worth).
pub const MIN_SECRET_LEN: usize = 32;
/// Longest `token_ttl` accepted: a token is a bearer credential, so it must stay short-lived.
pub const MAX_TOKEN_TTL: Duration = Duration::from_secs(600);
/// Longest `clock_skew` accepted.
pub const MAX_CLOCK_SKEW: Duration = Duration::from_secs(60);

const VERSION: &str = "v1";
const CONTEXT: &str = "weir-mesh-token/v1";

/// The `[mesh]` table: the shared secret services sign and verify mesh tokens with, and whether
/// co-located services call each other in the process.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MeshConfig {
    /// The secret in clear (`WEIR_MESH__SECRET`; default unset). Prefer `secret_env`.
    pub secret: Option<String>,
    /// Name of an environment variable holding the secret (default unset).
    pub secret_env: Option<String>,
    /// Secrets still accepted when verifying, never used to sign (rotation; default none).
    pub previous_secrets: Vec<String>,
    /// Longest lifetime of a token (default 30 s, at most 10 min).
    #[serde(with = "humantime_serde")]
    pub token_ttl: Duration,
    /// Clock difference tolerated between hosts (default 2 s, at most 60 s).
    #[serde(with = "humantime_serde")]
    pub clock_skew: Duration,
    /// Whether services hosted by the same process call each other in the process, through the
    /// callee's whole server stack minus the socket (default true; `WEIR_MESH__IN_PROCESS`; see
    /// [`crate::local`]). Off, every call between services takes a loopback socket, as between
    /// separate processes. Services in separate processes always use sockets.
    pub in_process: bool,
}

impl Default for MeshConfig {
    fn default() -> Self {
        Self {
            secret: None,
            secret_env: None,
            previous_secrets: Vec::new(),
            token_ttl: DEFAULT_TOKEN_TTL,
            clock_skew: DEFAULT_CLOCK_SKEW,
            in_process: true,
        }
    }
}

impl MeshConfig {
    /// The configured signing secret, read from the environment for `secret_env`; `None` when
    /// neither `secret` nor `secret_env` is set. Errors name the key under `key_prefix`.
    pub fn configured_secret(&self, key_prefix: &str) -> Result<Option<String>, ConfigError> {
        self.resolve_secret(key_prefix, |name| std::env::var(name).ok())
    }

    fn resolve_secret(
        &self,
        key_prefix: &str,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Option<String>, ConfigError> {
        let secret = match (&self.secret, &self.secret_env) {
            (Some(_), Some(_)) => {
                return Err(ConfigError::invalid(
                    format!("{key_prefix}.secret"),
                    "give either secret or secret_env, not both",
                ));
            }
            (Some(secret), None) if secret.trim().is_empty() => None,
            (Some(secret), None) => Some(secret.trim().to_string()),
            (None, Some(var)) => Some(
                env(var)
                    .map(|v| v.trim().to_string())
                    .filter(|v| !v.is_empty())
                    .ok_or_else(|| {
                        ConfigError::invalid(
                            format!("{key_prefix}.secret_env"),
                            format!("environment variable {var} is not set or empty"),
                        )
                    })?,
            ),
            (None, None) => None,
        };
        if let Some(secret) = &secret {
            check_secret(secret, &format!("{key_prefix}.secret"))?;
        }
        Ok(secret)
    }

    /// Checks the TTL, skew and previous secrets (not the environment).
    pub fn validate(&self, key_prefix: &str) -> Result<(), ConfigError> {
        if self.token_ttl < Duration::from_secs(1) || self.token_ttl > MAX_TOKEN_TTL {
            return Err(ConfigError::invalid(
                format!("{key_prefix}.token_ttl"),
                "must be between 1s and 10m",
            ));
        }
        if self.clock_skew > MAX_CLOCK_SKEW {
            return Err(ConfigError::invalid(
                format!("{key_prefix}.clock_skew"),
                "must be at most 60s",
            ));
        }
        for (index, secret) in self.previous_secrets.iter().enumerate() {
            check_secret(
                secret.trim(),
                &format!("{key_prefix}.previous_secrets[{index}]"),
            )?;
        }
        Ok(())
    }
}

fn check_secret(secret: &str, key: &str) -> Result<(), ConfigError> {
    if secret.len() < MIN_SECRET_LEN {
        return Err(ConfigError::invalid(
            key,
            format!(
                "a mesh secret must be at least {MIN_SECRET_LEN} characters of random data \
                 (e.g. `openssl rand -hex 32`)"
            ),
        ));
    }
    Ok(())
}

/// The verified content of a mesh token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MeshClaims {
    /// The tenant the peer authenticated.
    pub tenant: Tenant,
    /// The criticality the peer sent: the highest the call may claim.
    pub criticality: Criticality,
    /// When the token expires, Unix milliseconds.
    pub expires_ms: u64,
}

/// A token that does not verify (the reason is only logged, never sent to the caller).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum InvalidToken {
    /// Not `v1;t=..;c=..;e=..;m=..` with valid fields.
    #[error("malformed mesh token")]
    Malformed,
    /// The MAC matches none of the accepted secrets (forged, tampered, other method, or signed
    /// with a secret this service does not know).
    #[error("mesh token signature does not match")]
    BadSignature,
    /// Expired (beyond the tolerated clock skew).
    #[error("mesh token expired")]
    Expired,
    /// Expires further ahead than the TTL allows.
    #[error("mesh token lifetime exceeds the configured token_ttl")]
    TooLong,
}

impl From<InvalidToken> for ApiError {
    fn from(error: InvalidToken) -> Self {
        metrics::counter!("weir_auth_failures_total", "reason" => "MESH_TOKEN_INVALID")
            .increment(1);
        tracing::debug!(%error, "mesh token refused");
        ApiError::new(
            tonic::Code::Unauthenticated,
            "MESH_TOKEN_INVALID",
            "the weir-mesh-token is not valid for this call: services of one mesh need the same \
             [mesh] secret; other callers authenticate with `authorization: Bearer <key>`",
        )
    }
}

/// This process's membership of the mesh: signs outgoing calls and verifies incoming ones. Cheap
/// to clone. [`MeshIdentity::disabled`] signs nothing and verifies nothing.
#[derive(Clone, Default)]
pub struct MeshIdentity {
    inner: Option<Arc<Keys>>,
}

struct Keys {
    signing: hmac::Key,
    accepted: Vec<hmac::Key>,
    ttl: Duration,
    skew: Duration,
}

impl fmt::Debug for MeshIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the secrets.
        f.debug_struct("MeshIdentity")
            .field("enabled", &self.is_enabled())
            .field(
                "accepted_secrets",
                &self.inner.as_ref().map_or(0, |k| k.accepted.len()),
            )
            .finish()
    }
}

impl MeshIdentity {
    /// No identity: outgoing calls are not signed, and no token verifies.
    pub fn disabled() -> Self {
        Self { inner: None }
    }

    /// An identity signing with `secret` and accepting `secret` and `previous` (see the module
    /// doc), with the TTL and skew of `config`.
    pub fn new(secret: &str, config: &MeshConfig) -> Self {
        let key = |s: &str| hmac::Key::new(hmac::HMAC_SHA256, s.trim().as_bytes());
        let mut accepted = vec![key(secret)];
        accepted.extend(config.previous_secrets.iter().map(|s| key(s)));
        Self {
            inner: Some(Arc::new(Keys {
                signing: key(secret),
                accepted,
                ttl: config.token_ttl,
                skew: config.clock_skew,
            })),
        }
    }

    /// An identity with a fresh random 256-bit secret, for a process that hosts every service
    /// that will ever verify its tokens (`weir up`).
    pub fn random(config: &MeshConfig) -> Result<Self, ConfigError> {
        let mut bytes = [0u8; 32];
        SystemRandom::new().fill(&mut bytes).map_err(|_| {
            ConfigError::invalid("mesh.secret", "no OS randomness to generate one; set it")
        })?;
        let secret: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        Ok(Self::new(&secret, config))
    }

    /// Whether this identity signs and verifies.
    pub fn is_enabled(&self) -> bool {
        self.inner.is_some()
    }

    /// The token for a call of `path` by `tenant` at `criticality`, expiring after `lifetime`
    /// (capped at the TTL) from `now_ms`; `None` when disabled.
    pub fn sign_at(
        &self,
        path: &str,
        tenant: &Tenant,
        criticality: Criticality,
        lifetime: Duration,
        now_ms: u64,
    ) -> Option<String> {
        let keys = self.inner.as_ref()?;
        let lifetime = u64::try_from(lifetime.min(keys.ttl).as_millis()).unwrap_or(u64::MAX);
        let expires = now_ms.saturating_add(lifetime);
        let claims = format!("{VERSION};t={tenant};c={criticality};e={expires}");
        let tag = hmac::sign(&keys.signing, &message(path, &claims));
        Some(format!("{claims};m={}", hex(tag.as_ref())))
    }

    /// Verifies `token` for a call of `path` at `now_ms` (see the module doc).
    pub fn verify_at(
        &self,
        token: &str,
        path: &str,
        now_ms: u64,
    ) -> Result<MeshClaims, InvalidToken> {
        let keys = self.inner.as_ref().ok_or(InvalidToken::BadSignature)?;
        let (claims, mac) = token.rsplit_once(";m=").ok_or(InvalidToken::Malformed)?;
        let mac = unhex(mac).ok_or(InvalidToken::Malformed)?;
        let signed = message(path, claims);
        if !keys
            .accepted
            .iter()
            .any(|key| hmac::verify(key, &signed, &mac).is_ok())
        {
            return Err(InvalidToken::BadSignature);
        }
        // Only authentic tokens are parsed further.
        let mut fields = claims.split(';');
        let (Some(VERSION), Some(tenant), Some(criticality), Some(expires), None) = (
            fields.next(),
            fields.next().and_then(|f| f.strip_prefix("t=")),
            fields.next().and_then(|f| f.strip_prefix("c=")),
            fields.next().and_then(|f| f.strip_prefix("e=")),
            fields.next(),
        ) else {
            return Err(InvalidToken::Malformed);
        };
        let tenant = Tenant::new(tenant).map_err(|_| InvalidToken::Malformed)?;
        let criticality = criticality
            .parse::<Criticality>()
            .map_err(|_| InvalidToken::Malformed)?;
        let expires_ms: u64 = expires.parse().map_err(|_| InvalidToken::Malformed)?;
        let skew = millis(keys.skew);
        if expires_ms.saturating_add(skew) < now_ms {
            return Err(InvalidToken::Expired);
        }
        if expires_ms > now_ms.saturating_add(millis(keys.ttl)).saturating_add(skew) {
            return Err(InvalidToken::TooLong);
        }
        Ok(MeshClaims {
            tenant,
            criticality,
            expires_ms,
        })
    }

    /// [`MeshIdentity::verify_at`] now.
    pub fn verify(&self, token: &str, path: &str) -> Result<MeshClaims, InvalidToken> {
        self.verify_at(token, path, now_ms())
    }

    /// Signs an outgoing request from its `weir-tenant` and `weir-criticality` headers: replaces
    /// any `weir-mesh-token` it carries. A request without `weir-tenant` (or with an invalid one)
    /// gets no token: the callee treats it as an external caller.
    pub fn sign_request<B>(&self, request: &mut http::Request<B>) {
        request.headers_mut().remove(MESH_TOKEN);
        if !self.is_enabled() {
            return;
        }
        let Some(tenant) = request
            .headers()
            .get(TENANT)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| Tenant::new(v).ok())
        else {
            return;
        };
        let criticality = Criticality::from_headers(request.headers()).unwrap_or_default();
        let lifetime = Deadline::of_http(request).map_or(Duration::MAX, |d| d.remaining());
        let token = self.sign_at(
            request.uri().path(),
            &tenant,
            criticality,
            lifetime,
            now_ms(),
        );
        if let Some(value) = token.and_then(|t| http::HeaderValue::from_str(&t).ok()) {
            // The criticality is signed as sent: make the header say exactly that.
            criticality.insert_into_headers(request.headers_mut());
            request.headers_mut().insert(MESH_TOKEN, value);
        }
    }
}

fn message(path: &str, claims: &str) -> Vec<u8> {
    format!("{CONTEXT}\n{path}\n{claims}").into_bytes()
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, millis)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &str) -> Option<Vec<u8>> {
    if text.len() != 64 {
        return None;
    }
    text.as_bytes()
        .chunks_exact(2)
        .map(|pair| {
            let digit = |c: u8| (c as char).to_digit(16);
            u8::try_from(digit(pair[0])? * 16 + digit(pair[1])?).ok()
        })
        .collect()
}

/// Adds [`Sign`] to a client stack: every outgoing call that names a tenant carries a fresh mesh
/// token (see the module doc).
#[derive(Debug, Clone)]
pub struct SignLayer {
    identity: MeshIdentity,
}

impl SignLayer {
    /// A layer signing with `identity` (a disabled identity only strips stray tokens).
    pub fn new(identity: MeshIdentity) -> Self {
        Self { identity }
    }
}

impl<S> Layer<S> for SignLayer {
    type Service = Sign<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Sign {
            inner,
            identity: self.identity.clone(),
        }
    }
}

/// The service of a [`SignLayer`].
#[derive(Debug, Clone)]
pub struct Sign<S> {
    inner: S,
    identity: MeshIdentity,
}

impl<S, B> Service<http::Request<B>> for Sign<S>
where
    S: Service<http::Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        self.identity.sign_request(&mut request);
        self.inner.call(request)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::metadata::CRITICALITY;

    const SECRET: &str = "test-mesh-secret-0123456789abcdef0123456789";
    const OTHER: &str = "another-secret-0123456789abcdef0123456789ab";
    const PATH: &str = "/weir.session.v1.SessionService/GetSession";
    const NOW: u64 = 1_800_000_000_000;

    fn identity(secret: &str) -> MeshIdentity {
        MeshIdentity::new(secret, &MeshConfig::default())
    }

    fn acme() -> Tenant {
        Tenant::new("acme").unwrap()
    }

    fn token(id: &MeshIdentity, lifetime: Duration) -> String {
        id.sign_at(PATH, &acme(), Criticality::Critical, lifetime, NOW)
            .unwrap()
    }

    #[test]
    fn a_signed_token_verifies_with_its_claims() {
        let id = identity(SECRET);
        let token = token(&id, Duration::from_secs(5));
        let claims = id.verify_at(&token, PATH, NOW + 1000).unwrap();
        assert_eq!(claims.tenant, acme());
        assert_eq!(claims.criticality, Criticality::Critical);
        assert_eq!(claims.expires_ms, NOW + 5000);
        assert!(!token.contains(SECRET));
    }

    #[test]
    fn expiry_is_the_deadline_or_the_ttl_and_tolerates_the_skew() {
        let id = identity(SECRET);
        let short = token(&id, Duration::from_millis(50));
        assert!(id.verify_at(&short, PATH, NOW + 50).is_ok());
        assert!(id.verify_at(&short, PATH, NOW + 50 + 2000).is_ok(), "skew");
        assert_eq!(
            id.verify_at(&short, PATH, NOW + 50 + 2001),
            Err(InvalidToken::Expired)
        );
        // No deadline: the TTL bounds it.
        let long = token(&id, Duration::MAX);
        let claims = id.verify_at(&long, PATH, NOW).unwrap();
        assert_eq!(claims.expires_ms, NOW + 30_000);
        assert_eq!(
            id.verify_at(&long, PATH, NOW + 32_001),
            Err(InvalidToken::Expired)
        );
        // A token from a peer with a longer TTL than ours is refused.
        let lax = MeshIdentity::new(
            SECRET,
            &MeshConfig {
                token_ttl: Duration::from_secs(600),
                ..MeshConfig::default()
            },
        );
        let too_long = token(&lax, Duration::MAX);
        assert_eq!(
            id.verify_at(&too_long, PATH, NOW),
            Err(InvalidToken::TooLong)
        );
    }

    #[test]
    fn tampering_or_another_method_or_secret_is_refused() {
        let id = identity(SECRET);
        let good = token(&id, Duration::from_secs(5));
        for (tampered, what) in [
            (good.replace("t=acme", "t=victim"), "tenant"),
            (good.replace("c=CRITICAL", "c=CRITICAL_PLUS"), "criticality"),
            (
                good.replace(&format!("e={}", NOW + 5000), "e=9999999999999"),
                "expiry",
            ),
        ] {
            assert_ne!(tampered, good, "{what}");
            assert_eq!(
                id.verify_at(&tampered, PATH, NOW),
                Err(InvalidToken::BadSignature),
                "{what}"
            );
        }
        assert_eq!(
            id.verify_at(&good, "/weir.budget.v1.BudgetService/SetBudget", NOW),
            Err(InvalidToken::BadSignature)
        );
        assert_eq!(
            identity(OTHER).verify_at(&good, PATH, NOW),
            Err(InvalidToken::BadSignature)
        );
        for junk in ["", "v1", "v1;t=acme;m=zz", &format!("{good}0")] {
            assert_eq!(
                id.verify_at(junk, PATH, NOW),
                Err(InvalidToken::Malformed),
                "{junk}"
            );
        }
        assert!(
            MeshIdentity::disabled()
                .verify_at(&good, PATH, NOW)
                .is_err()
        );
        assert!(
            MeshIdentity::disabled()
                .sign_at(PATH, &acme(), Criticality::Critical, Duration::MAX, NOW)
                .is_none()
        );
    }

    #[test]
    fn rotation_accepts_previous_secrets_and_signs_with_the_new_one() {
        let old = identity(OTHER);
        let rotated = MeshIdentity::new(
            SECRET,
            &MeshConfig {
                previous_secrets: vec![OTHER.to_string()],
                ..MeshConfig::default()
            },
        );
        let from_old = token(&old, Duration::from_secs(5));
        assert!(rotated.verify_at(&from_old, PATH, NOW).is_ok());
        let from_new = token(&rotated, Duration::from_secs(5));
        assert!(identity(SECRET).verify_at(&from_new, PATH, NOW).is_ok());
        assert!(old.verify_at(&from_new, PATH, NOW).is_err());
    }

    #[test]
    fn requests_are_signed_from_their_tenant_header() {
        let id = identity(SECRET);
        let mut request = http::Request::builder()
            .uri(PATH)
            .header(TENANT, "acme")
            .header(CRITICALITY, "sheddable")
            .header(MESH_TOKEN, "stale")
            .body(())
            .unwrap();
        id.sign_request(&mut request);
        let token = request.headers().get(MESH_TOKEN).unwrap().to_str().unwrap();
        let claims = id.verify(token, PATH).unwrap();
        assert_eq!(claims.tenant, acme());
        assert_eq!(claims.criticality, Criticality::Sheddable);
        assert_eq!(request.headers().get(CRITICALITY).unwrap(), "SHEDDABLE");

        let mut anonymous = http::Request::builder()
            .uri(PATH)
            .header(MESH_TOKEN, "stale")
            .body(())
            .unwrap();
        id.sign_request(&mut anonymous);
        assert!(anonymous.headers().get(MESH_TOKEN).is_none());
    }

    #[test]
    fn config_errors_name_the_key() {
        let error = |config: MeshConfig| {
            config
                .resolve_secret("mesh", |_| None)
                .and_then(|_| config.validate("mesh"))
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default()
        };
        assert!(
            error(MeshConfig {
                secret: Some("short".into()),
                ..MeshConfig::default()
            })
            .contains("`mesh.secret`")
        );
        assert!(
            error(MeshConfig {
                secret_env: Some("NOPE".into()),
                ..MeshConfig::default()
            })
            .contains("`mesh.secret_env`")
        );
        assert!(
            error(MeshConfig {
                previous_secrets: vec!["x".into()],
                ..MeshConfig::default()
            })
            .contains("`mesh.previous_secrets[0]`")
        );
        assert!(
            error(MeshConfig {
                token_ttl: Duration::from_secs(3600),
                ..MeshConfig::default()
            })
            .contains("`mesh.token_ttl`")
        );
        let config = MeshConfig {
            secret_env: Some("S".into()),
            ..MeshConfig::default()
        };
        assert_eq!(
            config
                .resolve_secret("mesh", |_| Some(format!(" {SECRET} ")))
                .unwrap()
                .as_deref(),
            Some(SECRET)
        );
        assert_eq!(
            MeshConfig::default()
                .resolve_secret("mesh", |_| None)
                .unwrap(),
            None
        );
    }
}
