//! Who is calling: API keys mapped to tenants, checked at the edge.
//!
//! # Modes
//!
//! The tenant of a request decides whose data it may name, whose budget it spends and whose rate
//! limit it counts against, so a client must never be able to choose it. Where it comes from is
//! an explicit [`AuthMode`]:
//!
//! | mode | who uses it | `authorization` | client's `weir-tenant` |
//! |---|---|---|---|
//! | `api_keys` | the router with keys configured | required: `Bearer <key>` | **stripped**, replaced by the key's tenant |
//! | `default_tenant` | the router of `weir up` (no keys) | ignored | **stripped**: every request is the default tenant |
//! | `trust_header` | internal services behind the router | ignored | trusted (validated; absent = default) |
//! | `auto` (default) | | `api_keys` when keys are configured, else `default_tenant` | |
//!
//! With auth "off" (`weir up`) the router still strips the header: trusting it there would let
//! anyone who can reach the router name any tenant, and the day keys are added nothing else has
//! to change. Internal services are not exposed to end users and receive the tenant the router
//! authenticated, so they run `trust_header`; that is the only mode that reads a client's
//! `weir-tenant`, and it must be chosen explicitly.
//!
//! # Keys
//!
//! ```toml
//! [router.auth]
//! # mode = "auto"                      # api_keys | default_tenant | trust_header | auto
//!
//! [[router.auth.api_keys]]
//! tenant = "acme"
//! key_env = "WEIR_ACME_KEY"             # the key is read from this environment variable
//!
//! [[router.auth.api_keys]]
//! id = "globex-ci"                      # optional non-secret name (logs, metrics, rate limits)
//! tenant = "globex"
//! key_sha256 = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
//! ```
//!
//! Each key gives exactly one of `key_env` (the secret lives in the environment, e.g. a
//! Kubernetes secret), `key_sha256` (only the hex SHA-256 of the key is in the file, so the file
//! itself is not a secret) or `key` (the key in clear: for tests and local set-ups only). A missing
//! or empty environment variable fails start-up, naming the key.
//!
//! Keys are only ever held hashed: the layer hashes the presented key and looks the digest up, so
//! comparing never touches the secret byte by byte and its timing reveals nothing usable (finding a
//! key from digest timing would take a SHA-256 preimage). Keys should be long random strings
//! (128 bits or more); a hash is no protection for a guessable key.
//!
//! # The layer
//!
//! A request with a valid key continues with `weir-tenant` set to the key's tenant, the
//! [`Tenant`] and the key's [`ApiKeyId`] in its extensions (for the rate limiter and the handler),
//! and the `authorization` header **removed**, so the secret is not forwarded to other services or
//! logged further down. Otherwise it is answered UNAUTHENTICATED at once, reason `API_KEY_MISSING`
//! or `API_KEY_INVALID`, with a message that says what to send (never the key it got).
//! Health checks and reflection bypass auth so load balancers and grpcurl work without a key.
//!
//! Metric: `weir_auth_failures_total{reason}`.

use std::{
    collections::{HashMap, HashSet},
    fmt,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use http::{HeaderValue, Request, Response};
use serde::{Deserialize, Serialize};
use tonic::Code;
use tower::{Layer, Service};

use crate::{
    admission::is_exempt_path,
    config::ConfigError,
    error::ApiError,
    metadata::{AUTHORIZATION, TENANT},
    tenant::{MAX_TENANT_LEN, Tenant},
};

/// Default mode: API keys when any are configured, the default tenant otherwise.
pub const DEFAULT_MODE: AuthMode = AuthMode::Auto;

/// Where a request's tenant comes from (see the module doc).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AuthMode {
    /// `api_keys` when keys are configured, else `default_tenant`.
    #[default]
    Auto,
    /// Require `authorization: Bearer <key>`; the key decides the tenant.
    ApiKeys,
    /// No keys; every request is the default tenant, whatever it claims.
    DefaultTenant,
    /// No keys; trust the caller's `weir-tenant` (internal services only).
    TrustHeader,
}

/// One API key (an entry of `[[<service>.auth.api_keys]]`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ApiKeySpec {
    /// Non-secret name of the key, for logs, metrics and per-key rate limits (default
    /// `key-<first 8 hex digits of its SHA-256>`).
    pub id: Option<String>,
    /// The tenant the key belongs to (required).
    pub tenant: String,
    /// Environment variable holding the key.
    pub key_env: Option<String>,
    /// Hex SHA-256 of the key.
    pub key_sha256: Option<String>,
    /// The key in clear (tests and local set-ups only).
    pub key: Option<String>,
}

/// Settings of the auth layer (the `[<service>.auth]` table).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// Where the tenant comes from (default `auto`).
    pub mode: AuthMode,
    /// The API keys (default none).
    pub api_keys: Vec<ApiKeySpec>,
}

impl AuthConfig {
    /// The mode `auto` resolves to with these keys.
    pub fn effective_mode(&self) -> AuthMode {
        match self.mode {
            AuthMode::Auto if self.api_keys.is_empty() => AuthMode::DefaultTenant,
            AuthMode::Auto => AuthMode::ApiKeys,
            mode => mode,
        }
    }

    /// Checks the settings (not the environment); `key_prefix` is the table's path (e.g.
    /// `router.auth`).
    pub fn validate(&self, key_prefix: &str) -> Result<(), ConfigError> {
        match self.mode {
            AuthMode::ApiKeys if self.api_keys.is_empty() => {
                return Err(ConfigError::invalid(
                    format!("{key_prefix}.api_keys"),
                    "mode = \"api_keys\" needs at least one key",
                ));
            }
            AuthMode::DefaultTenant | AuthMode::TrustHeader if !self.api_keys.is_empty() => {
                return Err(ConfigError::invalid(
                    format!("{key_prefix}.mode"),
                    "keys are configured but this mode ignores them; use \"api_keys\" or \"auto\"",
                ));
            }
            _ => {}
        }
        let mut ids = HashSet::new();
        for (index, spec) in self.api_keys.iter().enumerate() {
            let key = |field: &str| format!("{key_prefix}.api_keys[{index}].{field}");
            Tenant::new(&spec.tenant).map_err(|_| {
                ConfigError::invalid(
                    key("tenant"),
                    "required: 1 to 64 letters, digits, '-', '_' or '.'",
                )
            })?;
            let sources = [&spec.key_env, &spec.key_sha256, &spec.key]
                .iter()
                .filter(|source| source.is_some())
                .count();
            if sources != 1 {
                return Err(ConfigError::invalid(
                    format!("{key_prefix}.api_keys[{index}]"),
                    "give exactly one of key_env, key_sha256 or key",
                ));
            }
            if let Some(digest) = &spec.key_sha256 {
                parse_digest(digest).ok_or_else(|| {
                    ConfigError::invalid(key("key_sha256"), "must be 64 hexadecimal digits")
                })?;
            }
            if spec.key.as_ref().is_some_and(|k| k.trim().is_empty()) {
                return Err(ConfigError::invalid(key("key"), "must not be empty"));
            }
            if let Some(id) = &spec.id {
                if !valid_id(id) {
                    return Err(ConfigError::invalid(
                        key("id"),
                        "1 to 64 letters, digits, '-', '_' or '.'",
                    ));
                }
                if !ids.insert(id.clone()) {
                    return Err(ConfigError::invalid(key("id"), "duplicate key id"));
                }
            }
        }
        Ok(())
    }
}

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

type Digest = [u8; 32];

fn sha256(bytes: &[u8]) -> Digest {
    let digest = ring::digest::digest(&ring::digest::SHA256, bytes);
    let mut out = [0u8; 32];
    out.copy_from_slice(digest.as_ref());
    out
}

fn parse_digest(hex: &str) -> Option<Digest> {
    let hex = hex.trim().as_bytes();
    if hex.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (byte, pair) in out.iter_mut().zip(hex.chunks_exact(2)) {
        let digit = |c: u8| (c as char).to_digit(16);
        *byte = u8::try_from(digit(pair[0])? * 16 + digit(pair[1])?).ok()?;
    }
    Some(out)
}

fn hex_prefix(digest: &Digest, bytes: usize) -> String {
    digest
        .iter()
        .take(bytes)
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_TENANT_LEN
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// The resolved key table and mode, shared by every clone of the layer.
#[derive(Clone)]
pub struct Authenticator {
    inner: Arc<Inner>,
}

struct Inner {
    mode: AuthMode,
    keys: HashMap<Digest, (Tenant, ApiKeyId)>,
}

impl fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Digests only; never the tenants' keys.
        f.debug_struct("Authenticator")
            .field("mode", &self.inner.mode)
            .field("keys", &self.inner.keys.len())
            .finish()
    }
}

impl Authenticator {
    /// Validates `config` and resolves its keys (reading `key_env` variables); errors name the
    /// key under `key_prefix` (e.g. `router.auth`).
    pub fn from_config(config: &AuthConfig, key_prefix: &str) -> Result<Self, ConfigError> {
        Self::resolve(config, key_prefix, |name| std::env::var(name).ok())
    }

    fn resolve(
        config: &AuthConfig,
        key_prefix: &str,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, ConfigError> {
        config.validate(key_prefix)?;
        let mut keys = HashMap::new();
        for (index, spec) in config.api_keys.iter().enumerate() {
            let key = |field: &str| format!("{key_prefix}.api_keys[{index}].{field}");
            let digest = match (&spec.key_env, &spec.key_sha256, &spec.key) {
                (Some(var), _, _) => {
                    let secret = env(var).filter(|v| !v.trim().is_empty()).ok_or_else(|| {
                        ConfigError::invalid(
                            key("key_env"),
                            format!("environment variable {var} is not set or empty"),
                        )
                    })?;
                    sha256(secret.trim().as_bytes())
                }
                (None, Some(hex), _) => parse_digest(hex).ok_or_else(|| {
                    ConfigError::invalid(key("key_sha256"), "must be 64 hexadecimal digits")
                })?,
                (None, None, Some(secret)) => sha256(secret.trim().as_bytes()),
                (None, None, None) => {
                    return Err(ConfigError::invalid(
                        format!("{key_prefix}.api_keys[{index}]"),
                        "give exactly one of key_env, key_sha256 or key",
                    ));
                }
            };
            let tenant = Tenant::new(&spec.tenant)
                .map_err(|_| ConfigError::invalid(key("tenant"), "invalid tenant id"))?;
            let id = match &spec.id {
                Some(id) => ApiKeyId::new(id),
                None => ApiKeyId::new(&format!("key-{}", hex_prefix(&digest, 4))),
            };
            if keys.insert(digest, (tenant, id)).is_some() {
                return Err(ConfigError::invalid(
                    format!("{key_prefix}.api_keys[{index}]"),
                    "the same key is configured twice",
                ));
            }
        }
        Ok(Self {
            inner: Arc::new(Inner {
                mode: config.effective_mode(),
                keys,
            }),
        })
    }

    /// Every request is the default tenant; client `weir-tenant` is stripped (the router with no
    /// keys).
    pub fn default_tenant() -> Self {
        Self::with_mode(AuthMode::DefaultTenant)
    }

    /// The caller's `weir-tenant` is trusted (internal services behind the router).
    pub fn trust_header() -> Self {
        Self::with_mode(AuthMode::TrustHeader)
    }

    fn with_mode(mode: AuthMode) -> Self {
        Self {
            inner: Arc::new(Inner {
                mode,
                keys: HashMap::new(),
            }),
        }
    }

    /// The mode in force (never `auto`).
    pub fn mode(&self) -> AuthMode {
        self.inner.mode
    }

    /// Decides the tenant of a request and rewrites its headers and extensions accordingly (see
    /// the module doc).
    pub fn authenticate<B>(&self, request: &mut Request<B>) -> Result<(), ApiError> {
        if self.inner.mode == AuthMode::TrustHeader {
            let tenant = match request.headers().get(TENANT) {
                None => Tenant::default(),
                Some(value) => {
                    let id = value.to_str().map_err(|_| {
                        ApiError::invalid_argument(TENANT, "tenant metadata must be ASCII")
                    })?;
                    Tenant::new(id)?
                }
            };
            request.extensions_mut().insert(tenant);
            return Ok(());
        }
        // A client never picks its tenant.
        request.headers_mut().remove(TENANT);
        let (tenant, id) = match self.inner.mode {
            AuthMode::ApiKeys | AuthMode::Auto => {
                let (tenant, id) = self.check_key(request.headers())?;
                (tenant, Some(id))
            }
            AuthMode::DefaultTenant | AuthMode::TrustHeader => (Tenant::default(), None),
        };
        // The secret goes no further than this layer.
        request.headers_mut().remove(AUTHORIZATION);
        if let Ok(value) = HeaderValue::from_str(tenant.as_str()) {
            request.headers_mut().insert(TENANT, value);
        }
        if let Some(id) = id {
            request.extensions_mut().insert(id);
        }
        request.extensions_mut().insert(tenant);
        Ok(())
    }

    fn check_key(&self, headers: &http::HeaderMap) -> Result<(Tenant, ApiKeyId), ApiError> {
        let mut values = headers.get_all(AUTHORIZATION).iter();
        let Some(value) = values.next() else {
            return Err(failure(
                "API_KEY_MISSING",
                "no API key: send it as `authorization: Bearer <key>` metadata",
            ));
        };
        let invalid = || {
            failure(
                "API_KEY_INVALID",
                "the API key is not valid: send one `authorization: Bearer <key>` with a key \
                 issued for your tenant",
            )
        };
        if values.next().is_some() {
            return Err(invalid());
        }
        let text = value.to_str().map_err(|_| invalid())?.trim();
        let (scheme, key) = text.split_once(' ').ok_or_else(invalid)?;
        let key = key.trim();
        if !scheme.eq_ignore_ascii_case("bearer") || key.is_empty() {
            return Err(invalid());
        }
        self.inner
            .keys
            .get(&sha256(key.as_bytes()))
            .cloned()
            .ok_or_else(invalid)
    }
}

fn failure(reason: &'static str, message: &str) -> ApiError {
    metrics::counter!("weir_auth_failures_total", "reason" => reason).increment(1);
    tracing::debug!(reason, "authentication failed");
    ApiError::new(Code::Unauthenticated, reason, message)
}

/// Adds [`Auth`] to a server stack.
#[derive(Debug, Clone)]
pub struct AuthLayer {
    authenticator: Authenticator,
}

impl AuthLayer {
    /// A layer that authenticates with `authenticator`.
    pub fn new(authenticator: Authenticator) -> Self {
        Self { authenticator }
    }
}

impl<S> Layer<S> for AuthLayer {
    type Service = Auth<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Auth {
            inner,
            authenticator: self.authenticator.clone(),
        }
    }
}

/// The auth service (see the module doc).
#[derive(Debug, Clone)]
pub struct Auth<S> {
    inner: S,
    authenticator: Authenticator,
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for Auth<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    ResBody: Default,
{
    type Response = Response<ResBody>;
    type Error = S::Error;
    type Future = future::ResponseFuture<S::Future, ResBody>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<ReqBody>) -> Self::Future {
        if is_exempt_path(request.uri().path()) {
            return future::ResponseFuture::inner(self.inner.call(request));
        }
        match self.authenticator.authenticate(&mut request) {
            Ok(()) => future::ResponseFuture::inner(self.inner.call(request)),
            Err(error) => future::ResponseFuture::rejected(tonic::Status::from(error).into_http()),
        }
    }
}

/// The response future of [`Auth`].
pub mod future {
    use std::future::Future;

    use super::*;

    pin_project_lite::pin_project! {
        /// The inner service's response, or the UNAUTHENTICATED answer.
        pub struct ResponseFuture<F, B> {
            #[pin]
            state: State<F, B>,
        }
    }

    pin_project_lite::pin_project! {
        #[project = StateProj]
        enum State<F, B> {
            Rejected { response: Option<Response<B>> },
            Inner { #[pin] inner: F },
        }
    }

    impl<F, B> ResponseFuture<F, B> {
        pub(super) fn inner(inner: F) -> Self {
            Self {
                state: State::Inner { inner },
            }
        }

        pub(super) fn rejected(response: Response<B>) -> Self {
            Self {
                state: State::Rejected {
                    response: Some(response),
                },
            }
        }
    }

    impl<F, B, E> Future for ResponseFuture<F, B>
    where
        F: Future<Output = Result<Response<B>, E>>,
        B: Default,
    {
        type Output = Result<Response<B>, E>;

        fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
            match self.project().state.project() {
                StateProj::Rejected { response } => {
                    Poll::Ready(Ok(response.take().unwrap_or_default()))
                }
                StateProj::Inner { inner } => inner.poll(cx),
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use std::{convert::Infallible, sync::Mutex};

    use tower::ServiceExt;

    use super::*;

    const ACME_KEY: &str = "acme-0123456789abcdef0123456789abcdef";

    #[derive(Debug, Clone, Default)]
    struct Seen {
        headers: http::HeaderMap,
        tenant: Option<Tenant>,
        key: Option<ApiKeyId>,
    }

    type Log = Arc<Mutex<Vec<Seen>>>;

    /// A handler that records what it was called with.
    fn recorder() -> (
        Log,
        impl Service<Request<()>, Response = Response<tonic::body::Body>, Error = Infallible> + Clone,
    ) {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let service = {
            let seen = seen.clone();
            tower::service_fn(move |request: Request<()>| {
                seen.lock().unwrap().push(Seen {
                    headers: request.headers().clone(),
                    tenant: request.extensions().get::<Tenant>().cloned(),
                    key: ApiKeyId::of(request.extensions()).cloned(),
                });
                async { Ok::<_, Infallible>(Response::new(tonic::body::Body::default())) }
            })
        };
        (seen, service)
    }

    fn config() -> AuthConfig {
        AuthConfig {
            mode: AuthMode::Auto,
            api_keys: vec![
                ApiKeySpec {
                    id: Some("acme-prod".into()),
                    tenant: "acme".into(),
                    key: Some(ACME_KEY.into()),
                    ..ApiKeySpec::default()
                },
                ApiKeySpec {
                    tenant: "globex".into(),
                    key_env: Some("GLOBEX_KEY".into()),
                    ..ApiKeySpec::default()
                },
            ],
        }
    }

    fn authenticator() -> Authenticator {
        Authenticator::resolve(&config(), "router.auth", |name| {
            (name == "GLOBEX_KEY").then(|| "globex-secret-key".to_string())
        })
        .unwrap()
    }

    fn request(path: &str, headers: &[(&'static str, &'static str)]) -> Request<()> {
        let mut request = Request::builder().uri(path).body(()).unwrap();
        for (name, value) in headers {
            request
                .headers_mut()
                .append(*name, HeaderValue::from_static(value));
        }
        request
    }

    fn status<B>(response: &Response<B>) -> Option<tonic::Status> {
        tonic::Status::from_header_map(response.headers())
    }

    #[tokio::test(start_paused = true)]
    async fn valid_key_sets_the_tenant_and_strips_the_client_header() {
        let (seen, service) = recorder();
        let service = AuthLayer::new(authenticator()).layer(service);
        let response = service
            .clone()
            .oneshot(request(
                "/weir.router.v1.RouterService/Generate",
                &[
                    (
                        "authorization",
                        "Bearer acme-0123456789abcdef0123456789abcdef",
                    ),
                    ("weir-tenant", "globex"),
                ],
            ))
            .await
            .unwrap();
        assert!(status(&response).is_none());
        let response = service
            .oneshot(request(
                "/weir.router.v1.RouterService/Generate",
                &[("authorization", "bearer  globex-secret-key ")],
            ))
            .await
            .unwrap();
        assert!(status(&response).is_none());

        let seen = seen.lock().unwrap().clone();
        assert_eq!(seen[0].headers.get_all(TENANT).iter().count(), 1);
        assert_eq!(
            seen[0].headers.get(TENANT),
            Some(&HeaderValue::from_static("acme")),
            "the key's tenant, not the one the client claimed"
        );
        assert_eq!(seen[0].tenant.as_ref().map(Tenant::as_str), Some("acme"));
        assert_eq!(
            seen[0].key.as_ref().map(ApiKeyId::as_str),
            Some("acme-prod")
        );
        assert!(
            seen[0].headers.get(AUTHORIZATION).is_none(),
            "the key is not forwarded"
        );
        assert_eq!(seen[1].tenant.as_ref().map(Tenant::as_str), Some("globex"));
        let generated = seen[1].key.as_ref().map(ApiKeyId::as_str).unwrap_or("");
        assert!(
            generated.starts_with("key-") && generated.len() == 12,
            "{generated}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn missing_or_bad_key_is_unauthenticated() {
        let (seen, service) = recorder();
        let service = AuthLayer::new(authenticator()).layer(service);
        let cases: [(&[(&'static str, &'static str)], &str); 5] = [
            (&[], "API_KEY_MISSING"),
            (&[("weir-tenant", "acme")], "API_KEY_MISSING"),
            (&[("authorization", "Bearer nope")], "API_KEY_INVALID"),
            (&[("authorization", ACME_KEY)], "API_KEY_INVALID"),
            (
                &[
                    (
                        "authorization",
                        "Bearer acme-0123456789abcdef0123456789abcdef",
                    ),
                    ("authorization", "Bearer nope"),
                ],
                "API_KEY_INVALID",
            ),
        ];
        for (headers, reason) in cases {
            let response = service
                .clone()
                .oneshot(request("/weir.router.v1.RouterService/Generate", headers))
                .await
                .unwrap();
            let status = status(&response).unwrap();
            assert_eq!(status.code(), Code::Unauthenticated, "{headers:?}");
            assert_eq!(ApiError::from_status(&status).reason(), reason);
            assert!(status.message().contains("authorization: Bearer <key>"));
            assert!(!status.message().contains("nope"), "never echo the key");
        }
        assert!(seen.lock().unwrap().is_empty(), "the handler never ran");
    }

    #[tokio::test(start_paused = true)]
    async fn health_and_reflection_bypass_auth() {
        let (seen, service) = recorder();
        let service = AuthLayer::new(authenticator()).layer(service);
        for path in [
            "/grpc.health.v1.Health/Check",
            "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
        ] {
            let response = service.clone().oneshot(request(path, &[])).await.unwrap();
            assert!(status(&response).is_none(), "{path}");
        }
        assert_eq!(seen.lock().unwrap().len(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn modes_without_keys() {
        // The router of `weir up`: everyone is the default tenant, whatever they claim.
        let (seen, service) = recorder();
        let auth = Authenticator::from_config(&AuthConfig::default(), "router.auth").unwrap();
        assert_eq!(auth.mode(), AuthMode::DefaultTenant);
        let service = AuthLayer::new(auth).layer(service);
        service
            .oneshot(request("/x/Y", &[("weir-tenant", "acme")]))
            .await
            .unwrap();
        let tenant = seen.lock().unwrap()[0].headers.get(TENANT).cloned();
        assert_eq!(tenant, Some(HeaderValue::from_static("default")));

        // Internal services trust the router's header.
        let (seen, service) = recorder();
        let service = AuthLayer::new(Authenticator::trust_header()).layer(service);
        service
            .clone()
            .oneshot(request("/x/Y", &[("weir-tenant", "acme")]))
            .await
            .unwrap();
        let response = service
            .oneshot(request("/x/Y", &[("weir-tenant", "a:b")]))
            .await
            .unwrap();
        assert_eq!(
            status(&response).map(|s| s.code()),
            Some(Code::InvalidArgument)
        );
        let seen = seen.lock().unwrap().clone();
        assert_eq!(seen.len(), 1);
        assert_eq!(seen[0].tenant.as_ref().map(Tenant::as_str), Some("acme"));
    }

    #[test]
    fn config_errors_name_the_key() {
        let error = |config: &AuthConfig| {
            Authenticator::resolve(config, "router.auth", |_| None)
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default()
        };
        assert!(error(&config()).contains("router.auth.api_keys[1].key_env"));
        let mut two = config();
        two.api_keys[1].key = Some("x".into());
        assert!(error(&two).contains("exactly one"), "{}", error(&two));
        let bad_hash = AuthConfig {
            api_keys: vec![ApiKeySpec {
                tenant: "acme".into(),
                key_sha256: Some("abc".into()),
                ..ApiKeySpec::default()
            }],
            ..AuthConfig::default()
        };
        assert!(error(&bad_hash).contains("router.auth.api_keys[0].key_sha256"));
        let keys_ignored = AuthConfig {
            mode: AuthMode::TrustHeader,
            ..config()
        };
        assert!(error(&keys_ignored).contains("router.auth.mode"));

        let text = "mode = \"api_keys\"\n[[api_keys]]\ntenant = \"acme\"\n\
                    key_sha256 = \"9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08\"\n";
        let parsed: AuthConfig = toml::from_str(text).unwrap();
        let auth = Authenticator::from_config(&parsed, "router.auth").unwrap();
        // sha256("test")
        let mut request = request("/x/Y", &[("authorization", "Bearer test")]);
        assert!(auth.authenticate(&mut request).is_ok());
        assert_eq!(
            request.extensions().get::<Tenant>().map(Tenant::as_str),
            Some("acme")
        );
    }
}
