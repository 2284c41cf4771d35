//! The auth layer: decides the caller of every call (see the [module doc](super)).

use std::{
    collections::HashMap,
    fmt,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use http::{HeaderValue, Request, Response};
use tower::{Layer, Service};
use tracing::Span;

use super::{
    AuthConfig, AuthMode, Caller, Role, Via,
    keys::{KeyTable, failure},
};
use crate::{
    admission::is_exempt_path,
    config::ConfigError,
    criticality::Criticality,
    error::ApiError,
    identity::MeshIdentity,
    metadata::{AUTHORIZATION, MESH_TOKEN, TENANT},
    tenant::Tenant,
};

/// The resolved key table, mode and mesh identity, shared by every clone of the layer.
#[derive(Clone)]
pub struct Authenticator {
    inner: Arc<Inner>,
}

#[derive(Clone)]
struct Inner {
    mode: AuthMode,
    keys: KeyTable,
    identity: MeshIdentity,
}

impl fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Counts only; never the tenants' keys or the mesh secret.
        f.debug_struct("Authenticator")
            .field("mode", &self.inner.mode)
            .field("keys", &self.inner.keys.len())
            .field("identity", &self.inner.identity)
            .finish()
    }
}

impl Default for Authenticator {
    fn default() -> Self {
        Self::default_tenant()
    }
}

impl Authenticator {
    /// Validates `config` and resolves its keys (reading `key_env` variables); errors name the
    /// key under `key_prefix` (e.g. `auth`). No mesh identity: see [`Authenticator::with_identity`].
    pub fn from_config(config: &AuthConfig, key_prefix: &str) -> Result<Self, ConfigError> {
        Self::resolve(config, key_prefix, |name| std::env::var(name).ok())
    }

    fn resolve(
        config: &AuthConfig,
        key_prefix: &str,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, ConfigError> {
        Ok(Self {
            inner: Arc::new(Inner {
                mode: config.effective_mode(),
                keys: KeyTable::resolve(config, key_prefix, env)?,
                identity: MeshIdentity::disabled(),
            }),
        })
    }

    /// Every request is the default tenant with every role (single-tenant dev mode); the
    /// client's `weir-tenant` is dropped.
    pub fn default_tenant() -> Self {
        Self {
            inner: Arc::new(Inner {
                mode: AuthMode::DefaultTenant,
                keys: KeyTable::default(),
                identity: MeshIdentity::disabled(),
            }),
        }
    }

    /// The same, also verifying mesh tokens with `identity` (the process's mesh secret).
    pub fn with_identity(self, identity: MeshIdentity) -> Self {
        let mut inner = Inner::clone(&self.inner);
        inner.identity = identity;
        Self {
            inner: Arc::new(inner),
        }
    }

    /// The mode in force (never `auto`).
    pub fn mode(&self) -> AuthMode {
        self.inner.mode
    }

    /// The mesh identity tokens are verified with (and that client stacks sign with).
    pub fn identity(&self) -> &MeshIdentity {
        &self.inner.identity
    }

    /// Decides the caller of a request and rewrites its headers and extensions accordingly (see
    /// the module doc): drops `weir-tenant`, `authorization` and `weir-mesh-token`, sets
    /// `weir-tenant` to the authenticated tenant, clamps `weir-criticality` to the caller's
    /// ceiling, and stores the [`Caller`], its [`Tenant`] and [`ApiKeyId`](super::ApiKeyId) in the extensions.
    pub fn authenticate<B>(&self, request: &mut Request<B>) -> Result<Caller, ApiError> {
        let headers = request.headers_mut();
        // A client never picks its tenant.
        headers.remove(TENANT);
        let token = headers.remove(MESH_TOKEN);
        let path = request.uri().path();
        let claims = token.map(|token| {
            let token = token.to_str().unwrap_or_default();
            self.inner.identity.verify(token, path)
        });
        let caller = match (claims, self.inner.mode) {
            (Some(Ok(claims)), _) => Caller {
                tenant: claims.tenant,
                key: None,
                roles: Vec::new(),
                ceiling: claims.criticality,
                via: Via::MeshToken,
            },
            (Some(Err(invalid)), AuthMode::ApiKeys | AuthMode::Auto) => return Err(invalid.into()),
            (None, AuthMode::ApiKeys | AuthMode::Auto) => {
                let entry = self.inner.keys.check(request.headers())?;
                Caller {
                    tenant: entry.tenant,
                    key: Some(entry.id),
                    roles: entry.roles,
                    ceiling: entry.ceiling,
                    via: Via::ApiKey,
                }
            }
            // Dev mode: a token that does not verify (e.g. from another `weir up` with its own
            // secret) grants nothing that having no token would not.
            (_, AuthMode::DefaultTenant) => Caller {
                tenant: Tenant::default(),
                key: None,
                roles: vec![Role::Admin],
                ceiling: Criticality::CriticalPlus,
                via: Via::DefaultTenant,
            },
        };
        let headers = request.headers_mut();
        // The secret goes no further than this layer.
        headers.remove(AUTHORIZATION);
        if let Ok(value) = HeaderValue::from_str(caller.tenant.as_str()) {
            headers.insert(TENANT, value);
        }
        // Admission (next) reads the header: it must see what the caller is allowed, not what it
        // asked for. A malformed value is left for admission to refuse.
        if let Ok(claimed) = Criticality::from_headers(headers)
            && claimed < caller.ceiling
        {
            caller.ceiling.insert_into_headers(headers);
        }
        let extensions = request.extensions_mut();
        if let Some(id) = &caller.key {
            extensions.insert(id.clone());
        }
        extensions.insert(caller.tenant.clone());
        extensions.insert(caller.clone());
        Ok(caller)
    }
}

/// What the layer checks beyond authentication: the role each method needs.
#[derive(Debug, Clone, Default)]
struct Policy {
    roles: HashMap<String, Role>,
}

impl Policy {
    fn check(&self, path: &str, caller: &Caller) -> Result<(), ApiError> {
        let Some(&role) = self.roles.get(path) else {
            return Ok(());
        };
        if caller.has_role(role) {
            return Ok(());
        }
        let method = path.rsplit('/').next().unwrap_or(path);
        let needs = match role {
            Role::Admin => "role `admin`".to_string(),
            other => format!("role `{}` (or `admin`)", other.as_str()),
        };
        Err(failure(
            "ROLE_REQUIRED",
            &format!(
                "{method} needs an API key with {needs}; this caller (tenant {}) does not have it",
                caller.tenant
            ),
        ))
    }
}

/// Adds [`Auth`] to a server stack.
#[derive(Debug, Clone)]
pub struct AuthLayer {
    authenticator: Authenticator,
    policy: Arc<Policy>,
}

impl AuthLayer {
    /// A layer that authenticates with `authenticator`.
    pub fn new(authenticator: Authenticator) -> Self {
        Self {
            authenticator,
            policy: Arc::default(),
        }
    }

    /// Calls of `path` (`/package.Service/Method`) need `role` (`admin` always suffices):
    /// PERMISSION_DENIED `ROLE_REQUIRED` otherwise.
    pub fn require_role(mut self, path: impl Into<String>, role: Role) -> Self {
        Arc::make_mut(&mut self.policy)
            .roles
            .insert(path.into(), role);
        self
    }
}

impl<S> Layer<S> for AuthLayer {
    type Service = Auth<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Auth {
            inner,
            authenticator: self.authenticator.clone(),
            policy: self.policy.clone(),
        }
    }
}

/// The auth service (see the module doc).
#[derive(Debug, Clone)]
pub struct Auth<S> {
    inner: S,
    authenticator: Authenticator,
    policy: Arc<Policy>,
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
        let checked = self
            .authenticator
            .authenticate(&mut request)
            .and_then(|caller| {
                self.policy.check(request.uri().path(), &caller)?;
                Ok(caller)
            });
        match checked {
            Ok(caller) => {
                // The server span (entered by the trace layer) names the authenticated tenant
                // only; the raw header is never recorded.
                let span = Span::current();
                crate::trace::set_attribute(&span, "weir.tenant", caller.tenant.to_string());
                if let Some(key) = &caller.key {
                    crate::trace::set_attribute(&span, "weir.api_key", key.to_string());
                }
                future::ResponseFuture::inner(self.inner.call(request))
            }
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
    use std::{convert::Infallible, sync::Mutex, time::Duration};

    use tonic::Code;
    use tower::ServiceExt;

    use super::*;
    use crate::{
        auth::{ApiKeyId, ApiKeySpec, criticality_ceiling},
        identity::MeshConfig,
        metadata::CRITICALITY,
    };

    const ACME_KEY: &str = "acme-0123456789abcdef0123456789abcdef";
    const SECRET: &str = "mesh-secret-0123456789abcdef0123456789abcdef";
    const PATH: &str = "/weir.session.v1.SessionService/GetSession";
    const ADMIN_PATH: &str = "/weir.budget.v1.BudgetService/SetBudget";

    #[derive(Debug, Clone)]
    struct Seen {
        headers: http::HeaderMap,
        tenant: Option<Tenant>,
        key: Option<ApiKeyId>,
        ceiling: Criticality,
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
                    ceiling: criticality_ceiling(request.extensions()),
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
                    max_criticality: Some("SHEDDABLE_PLUS".into()),
                    ..ApiKeySpec::default()
                },
                ApiKeySpec {
                    tenant: "globex".into(),
                    key_env: Some("GLOBEX_KEY".into()),
                    roles: vec![Role::Admin],
                    ..ApiKeySpec::default()
                },
            ],
        }
    }

    fn identity() -> MeshIdentity {
        MeshIdentity::new(SECRET, &MeshConfig::default())
    }

    fn authenticator() -> Authenticator {
        Authenticator::resolve(&config(), "auth", |name| {
            (name == "GLOBEX_KEY").then(|| "globex-secret-key".to_string())
        })
        .unwrap()
        .with_identity(identity())
    }

    fn request(path: &str, headers: &[(&'static str, &str)]) -> Request<()> {
        let mut request = Request::builder().uri(path).body(()).unwrap();
        for (name, value) in headers {
            request
                .headers_mut()
                .append(*name, HeaderValue::from_str(value).unwrap());
        }
        request
    }

    fn status<B>(response: &Response<B>) -> Option<tonic::Status> {
        tonic::Status::from_header_map(response.headers())
    }

    fn layer() -> AuthLayer {
        AuthLayer::new(authenticator()).require_role(ADMIN_PATH, Role::Admin)
    }

    #[tokio::test(start_paused = true)]
    async fn valid_key_sets_the_tenant_and_strips_the_client_header() {
        let (seen, service) = recorder();
        let service = layer().layer(service);
        let response = service
            .clone()
            .oneshot(request(
                PATH,
                &[
                    ("authorization", &format!("Bearer {ACME_KEY}")),
                    ("weir-tenant", "globex"),
                ],
            ))
            .await
            .unwrap();
        assert!(status(&response).is_none());
        let response = service
            .oneshot(request(
                PATH,
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
        let service = layer().layer(service);
        let acme = format!("Bearer {ACME_KEY}");
        let cases: [(&[(&'static str, &str)], &str); 5] = [
            (&[], "API_KEY_MISSING"),
            (&[("weir-tenant", "acme")], "API_KEY_MISSING"),
            (&[("authorization", "Bearer nope")], "API_KEY_INVALID"),
            (&[("authorization", ACME_KEY)], "API_KEY_INVALID"),
            (
                &[("authorization", &acme), ("authorization", "Bearer nope")],
                "API_KEY_INVALID",
            ),
        ];
        for (headers, reason) in cases {
            let response = service
                .clone()
                .oneshot(request(PATH, headers))
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
    async fn a_mesh_token_names_the_tenant_and_a_bad_one_is_refused() {
        let (seen, service) = recorder();
        let service = layer().layer(service);
        let token_with = |id: &MeshIdentity, path: &str, tenant: &str| {
            id.sign_at(
                path,
                &Tenant::new(tenant).unwrap(),
                Criticality::CriticalPlus,
                Duration::from_secs(5),
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_millis() as u64,
            )
            .unwrap()
        };
        let token = |path: &str, tenant: &str| token_with(&identity(), path, tenant);
        let good = token(PATH, "acme");
        let response = service
            .clone()
            .oneshot(request(
                PATH,
                &[
                    ("weir-mesh-token", &good),
                    ("weir-tenant", "victim"),
                    ("weir-criticality", "CRITICAL_PLUS"),
                ],
            ))
            .await
            .unwrap();
        assert!(status(&response).is_none());
        let seen_now = seen.lock().unwrap().clone();
        assert_eq!(
            seen_now[0].tenant.as_ref().map(Tenant::as_str),
            Some("acme")
        );
        assert_eq!(seen_now[0].headers.get(TENANT).unwrap(), "acme");
        assert!(seen_now[0].headers.get(MESH_TOKEN).is_none());
        assert_eq!(
            seen_now[0].headers.get(CRITICALITY).unwrap(),
            "CRITICAL_PLUS",
            "the criticality the peer signed is kept"
        );

        let other_method = token(ADMIN_PATH, "acme");
        let stranger = MeshIdentity::new(&SECRET.replace('0', "1"), &MeshConfig::default());
        let other_secret = token_with(&stranger, PATH, "acme");
        for bad in [
            good.replace("t=acme", "t=victim"),
            other_method,
            other_secret,
            "v1;t=victim".to_string(),
        ] {
            let response = service
                .clone()
                .oneshot(request(PATH, &[("weir-mesh-token", &bad)]))
                .await
                .unwrap();
            let status = status(&response).unwrap();
            assert_eq!(status.code(), Code::Unauthenticated, "{bad}");
            assert_eq!(
                ApiError::from_status(&status).reason(),
                "MESH_TOKEN_INVALID"
            );
        }
        assert_eq!(seen.lock().unwrap().len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn roles_and_criticality_ceilings() {
        let (seen, service) = recorder();
        let service = layer().layer(service);
        let acme = format!("Bearer {ACME_KEY}");
        // acme has no role: SetBudget is PERMISSION_DENIED naming the role.
        let response = service
            .clone()
            .oneshot(request(ADMIN_PATH, &[("authorization", &acme)]))
            .await
            .unwrap();
        let refused = status(&response).unwrap();
        assert_eq!(refused.code(), Code::PermissionDenied);
        assert_eq!(ApiError::from_status(&refused).reason(), "ROLE_REQUIRED");
        assert!(
            refused.message().contains("`admin`"),
            "{}",
            refused.message()
        );
        // globex is an admin.
        let response = service
            .clone()
            .oneshot(request(
                ADMIN_PATH,
                &[("authorization", "Bearer globex-secret-key")],
            ))
            .await
            .unwrap();
        assert!(status(&response).is_none());
        // acme may claim at most SHEDDABLE_PLUS, globex the default CRITICAL.
        for (key, claimed, kept) in [
            (acme.as_str(), Some("CRITICAL_PLUS"), "SHEDDABLE_PLUS"),
            (acme.as_str(), None, "SHEDDABLE_PLUS"),
            (acme.as_str(), Some("SHEDDABLE"), "SHEDDABLE"),
            (
                "Bearer globex-secret-key",
                Some("CRITICAL_PLUS"),
                "CRITICAL",
            ),
        ] {
            let mut headers = vec![("authorization", key)];
            if let Some(claimed) = claimed {
                headers.push(("weir-criticality", claimed));
            }
            let response = service
                .clone()
                .oneshot(request(PATH, &headers))
                .await
                .unwrap();
            assert!(status(&response).is_none());
            let last = seen.lock().unwrap().last().cloned().unwrap();
            assert_eq!(last.headers.get(CRITICALITY).unwrap(), kept, "{claimed:?}");
        }
        let ceilings: Vec<Criticality> = seen.lock().unwrap().iter().map(|s| s.ceiling).collect();
        assert_eq!(
            ceilings,
            [
                Criticality::Critical,
                Criticality::SheddablePlus,
                Criticality::SheddablePlus,
                Criticality::SheddablePlus,
                Criticality::Critical
            ]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn health_and_reflection_bypass_auth() {
        let (seen, service) = recorder();
        let service = layer().layer(service);
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
    async fn without_keys_everyone_is_the_default_tenant_with_every_role() {
        let (seen, service) = recorder();
        let auth = Authenticator::from_config(&AuthConfig::default(), "auth")
            .unwrap()
            .with_identity(identity());
        assert_eq!(auth.mode(), AuthMode::DefaultTenant);
        let service = AuthLayer::new(auth)
            .require_role(ADMIN_PATH, Role::Admin)
            .layer(service);
        // A token that does not verify is ignored, not believed.
        let forged = format!("v1;t=acme;c=CRITICAL;e=1;m={}", "0".repeat(64));
        let response = service
            .oneshot(request(
                ADMIN_PATH,
                &[("weir-tenant", "acme"), ("weir-mesh-token", &forged)],
            ))
            .await
            .unwrap();
        assert!(status(&response).is_none());
        let seen = seen.lock().unwrap().clone();
        assert_eq!(seen[0].headers.get(TENANT).unwrap(), "default");
        assert_eq!(seen[0].ceiling, Criticality::CriticalPlus);
    }

    #[test]
    fn config_errors_name_the_key() {
        let error = |config: &AuthConfig| {
            Authenticator::resolve(config, "auth", |_| None)
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default()
        };
        assert!(error(&config()).contains("auth.api_keys[1].key_env"));
        let mut two = config();
        two.api_keys[1].key = Some("x".into());
        assert!(error(&two).contains("exactly one"), "{}", error(&two));
        let mut ceiling = config();
        ceiling.api_keys[0].max_criticality = Some("URGENT".into());
        assert!(error(&ceiling).contains("auth.api_keys[0].max_criticality"));
        let bad_hash = AuthConfig {
            api_keys: vec![ApiKeySpec {
                tenant: "acme".into(),
                key_sha256: Some("abc".into()),
                ..ApiKeySpec::default()
            }],
            ..AuthConfig::default()
        };
        assert!(error(&bad_hash).contains("auth.api_keys[0].key_sha256"));
        let keys_ignored = AuthConfig {
            mode: AuthMode::DefaultTenant,
            ..config()
        };
        assert!(error(&keys_ignored).contains("auth.mode"));
        assert!(
            toml::from_str::<AuthConfig>("mode = \"trust_header\"\n").is_err(),
            "nothing trusts a bare header"
        );

        let text = "mode = \"api_keys\"\n[[api_keys]]\ntenant = \"acme\"\nroles = [\"reviewer\"]\n\
                    key_sha256 = \"9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08\"\n";
        let parsed: AuthConfig = toml::from_str(text).unwrap();
        let auth = Authenticator::from_config(&parsed, "auth").unwrap();
        // sha256("test")
        let mut request = request("/x/Y", &[("authorization", "Bearer test")]);
        let caller = auth.authenticate(&mut request).unwrap();
        assert_eq!(caller.tenant.as_str(), "acme");
        assert!(caller.has_role(Role::Reviewer) && !caller.has_role(Role::Admin));
    }
}
