//! Per-tenant rate limits, local or shared by every router replica through Redis.
//!
//! # Why GCRA
//!
//! A tenant gets `requests_per_second` on average with bursts of up to `burst` requests, enforced
//! by the generic cell rate algorithm: each subject keeps one timestamp, the *theoretical arrival
//! time* (TAT) of its next request at the sustained rate, and a request is allowed when it arrives
//! no earlier than `TAT − burst × interval`. That is a token bucket (bursts, then the rate) with
//! one number of state instead of a counter and a refill timer, so the check is exact at any
//! arrival pattern, needs no background refill, and tells a refused caller exactly when the next
//! token comes (`retry-after`).
//!
//! # Local and distributed
//!
//! - Without `redis_url`, limits are kept in the process with `governor` (one keyed limiter by
//!   tenant, plus one limiter per tenant or API key with an override).
//! - With `redis_url`, N router replicas share **one** limit: [`GCRA_SCRIPT`] runs the same
//!   algorithm atomically inside Redis, reading the time from Redis' own `TIME`, so replicas whose
//!   clocks disagree still agree on the limit. It returns limited / remaining / retry-after /
//!   reset-after. Keys are `<key_prefix>:{<tenant>}:ratelimit` (and
//!   `<key_prefix>:{<tenant>}:ratelimit:key:<api key id>` for a key with its own limit) and expire
//!   once idle, so an idle tenant costs nothing. When a request is subject to both a tenant and a
//!   key limit, the script checks both and charges both or neither.
//! - A limiter must never take the service down with it: if Redis fails or does not answer within
//!   `redis_timeout` (50 ms), the request is decided by the local limiter at the limit ÷
//!   `replicas` (each replica's fair share of the global limit), the fallback is counted in
//!   `weir_rate_limit_fallback_total`, and a warning is logged at most every
//!   [`FALLBACK_WARN_INTERVAL`]. For `redis_retry_interval` (1 s) after a failure, requests go
//!   straight to the local limiter instead of paying the timeout again; then Redis is tried again.
//!   The request itself is never failed because the limiter's store is down.
//!
//! The tenant's and the key's buckets are two keys of one script call: both carry the tenant's
//! hash tag `{<tenant>}`, so on a Redis Cluster (`redis+cluster://` URL) they are in one slot and
//! the script runs on one node, as on a single server.
//!
//! The configured rate is always the **global** rate of the tenant. Without Redis each replica
//! enforces its share, rate ÷ `replicas` (so with the default `replicas = 1`, a single router
//! enforces exactly the configured rate).
//!
//! # Answers
//!
//! A refused request gets RESOURCE_EXHAUSTED, reason `RATE_LIMITED`, with a QuotaFailure whose
//! subject is `tenant:<id>` (or `api_key:<id>` when a key's own limit refused it) and RetryInfo /
//! `grpc-retry-pushback-ms` = the time until the next token. The tenant is the one the auth layer
//! put in the request's extensions, or the `weir-tenant` header when no auth layer ran. Health
//! checks and reflection are never limited.
//!
//! # Defaults
//!
//! Enabled, 100 requests per second per tenant with bursts of 200, local; override per tenant
//! (`[router.rate_limit.tenants.<tenant>]`) and per API key id (`[router.rate_limit.api_keys.<id>]`,
//! in addition to the tenant's limit).
//!
//! ```toml
//! [router.rate_limit]
//! requests_per_second = 50.0
//! burst = 100
//! redis_url = "redis://127.0.0.1:6379"   # share the limit between replicas
//! replicas = 3                           # each replica's fallback share is 1/3
//!
//! [router.rate_limit.tenants.acme]
//! requests_per_second = 500.0           # burst stays 100 (the global value)
//!
//! [router.rate_limit.api_keys.acme-batch]
//! requests_per_second = 5.0
//! burst = 5
//! ```
//!
//! # Details beyond docs/resilience.md
//!
//! - Per-key limits exist only for the key ids listed under `api_keys`, and apply on top of the
//!   tenant's limit (a key cannot raise its tenant's limit).
//! - Without Redis the local limit is also the configured rate ÷ `replicas`, so `replicas` means
//!   the same thing with and without Redis (default 1: no change).
//! - After a Redis failure the limiter skips Redis for `redis_retry_interval`, so an outage costs
//!   one timeout per second instead of 50 ms on every request.
//!
//! Metrics: `weir_rate_limited_total{tenant}`, `weir_rate_limit_fallback_total`.

mod config;
mod layer;
mod limiter;

use std::time::Duration;

pub use config::{LimitOverride, RateLimitConfig};
pub use layer::{PendingVerdict, RateLimit, RateLimitLayer, future};
pub use limiter::{DecidedBy, Decision, GCRA_SCRIPT, Rate, Subject, TenantLimiter};

/// Default sustained rate per tenant.
pub const DEFAULT_REQUESTS_PER_SECOND: f64 = 100.0;
/// Default burst per tenant.
pub const DEFAULT_BURST: u32 = 200;
/// Default number of router replicas sharing the limit.
pub const DEFAULT_REPLICAS: u32 = 1;
/// Default time a Redis check may take before the local limiter decides.
pub const DEFAULT_REDIS_TIMEOUT: Duration = Duration::from_millis(50);
/// Default time requests skip Redis after it failed.
pub const DEFAULT_REDIS_RETRY_INTERVAL: Duration = Duration::from_secs(1);
/// Shortest interval between two "Redis unreachable" warnings.
pub const FALLBACK_WARN_INTERVAL: Duration = Duration::from_secs(10);
/// Fewest requests a tenant's last Redis check must have left in its burst for its next request
/// to start while its check runs ([`RateLimitLayer::overlapping`]): a tenant at its limit is
/// checked first, so a flood of refused requests costs no handler work.
pub const OVERLAP_MIN_HEADROOM: u64 = 8;
/// Most tenants whose headroom is remembered (the map is emptied when full).
const MAX_HEADROOM_ENTRIES: usize = 100_000;
/// Time to establish a connection to Redis for rate limiting.
pub const REDIS_CONNECT_TIMEOUT: Duration = Duration::from_millis(500);

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use std::convert::Infallible;

    use http::{Request, Response};
    use tonic::{Code, Status};
    use tonic_types::StatusExt;
    use tower::{Layer, Service, ServiceExt};

    use super::*;
    use crate::{auth::ApiKeyId, error::ApiError, metadata::TENANT, tenant::Tenant};

    fn config(rate: f64, burst: u32) -> RateLimitConfig {
        RateLimitConfig {
            requests_per_second: rate,
            burst,
            ..RateLimitConfig::default()
        }
    }

    fn ok_service()
    -> impl Service<Request<()>, Response = Response<tonic::body::Body>, Error = Infallible>
    + Clone
    + Send
    + 'static {
        tower::service_fn(|_request: Request<()>| async {
            Ok::<_, Infallible>(Response::new(tonic::body::Body::default()))
        })
    }

    fn request(tenant: Option<&str>) -> Request<()> {
        let mut request = Request::builder().uri("/weir.Test/Run").body(()).unwrap();
        if let Some(tenant) = tenant {
            request
                .extensions_mut()
                .insert(Tenant::new(tenant).unwrap());
        }
        request
    }

    fn status<B>(response: &Response<B>) -> Option<Status> {
        Status::from_header_map(response.headers())
    }

    #[tokio::test(start_paused = true)]
    async fn gcra_bursts_then_holds_the_rate() {
        let limiter = TenantLimiter::local(&config(10.0, 5));
        let service = RateLimitLayer::new(limiter).layer(ok_service());
        // The burst goes through at once.
        for i in 0..5 {
            let response = service
                .clone()
                .oneshot(request(Some("acme")))
                .await
                .unwrap();
            assert!(status(&response).is_none(), "request {i} of the burst");
        }
        // Then the next is refused with the time until the next token.
        let response = service
            .clone()
            .oneshot(request(Some("acme")))
            .await
            .unwrap();
        let refused = status(&response).unwrap();
        assert_eq!(refused.code(), Code::ResourceExhausted);
        let details = refused.get_error_details();
        assert_eq!(
            details
                .quota_failure()
                .map(|q| q.violations[0].subject.clone()),
            Some("tenant:acme".to_string())
        );
        let retry = details.retry_info().and_then(|r| r.retry_delay).unwrap();
        assert!(
            retry > Duration::from_millis(90) && retry <= Duration::from_millis(100),
            "{retry:?}"
        );
        assert_eq!(ApiError::from_status(&refused).reason(), "RATE_LIMITED");
        // Another tenant has its own bucket.
        let response = service
            .clone()
            .oneshot(request(Some("globex")))
            .await
            .unwrap();
        assert!(status(&response).is_none());

        // Offered 100/s for 3 s, it holds 10/s.
        let mut admitted = 0;
        for _ in 0..300 {
            tokio::time::advance(Duration::from_millis(10)).await;
            let response = service
                .clone()
                .oneshot(request(Some("acme")))
                .await
                .unwrap();
            if status(&response).is_none() {
                admitted += 1;
            }
        }
        assert!(
            (30..=31).contains(&admitted),
            "admitted {admitted} in 3 s at 10/s"
        );

        // After an idle second the burst is back... up to its size, not more.
        tokio::time::advance(Duration::from_secs(10)).await;
        let mut burst = 0;
        for _ in 0..20 {
            let response = service
                .clone()
                .oneshot(request(Some("acme")))
                .await
                .unwrap();
            if status(&response).is_none() {
                burst += 1;
            }
        }
        assert_eq!(burst, 5);
    }

    #[tokio::test(start_paused = true)]
    async fn overrides_per_tenant_and_per_key() {
        let mut config = config(100.0, 10);
        config.tenants.insert(
            "small".into(),
            LimitOverride {
                burst: Some(2),
                requests_per_second: Some(1.0),
            },
        );
        config.api_keys.insert(
            "acme-batch".into(),
            LimitOverride {
                burst: Some(3),
                requests_per_second: Some(1.0),
            },
        );
        config.validate("router.rate_limit").unwrap();
        let limiter = TenantLimiter::local(&config);
        let tenant = |id: &str| Tenant::new(id).unwrap();
        let admitted = |tenant: Tenant, key: Option<ApiKeyId>, n: usize| {
            let limiter = limiter.clone();
            async move {
                let mut count = 0;
                for _ in 0..n {
                    if limiter.check(&tenant, key.as_ref()).await.allowed() {
                        count += 1;
                    }
                }
                count
            }
        };
        assert_eq!(admitted(tenant("small"), None, 20).await, 2);
        // The batch key stops at its own limit...
        let batch = Some(ApiKeyId::new("acme-batch"));
        assert_eq!(admitted(tenant("acme"), batch.clone(), 20).await, 3);
        let refused = limiter.check(&tenant("acme"), batch.as_ref()).await;
        assert_eq!(
            refused.refusal().map(|e| e.quota_violations()[0].0.clone()),
            Some("api_key:acme-batch".to_string())
        );
        // ...without spending its tenant's: other keys of acme still get the tenant's burst.
        assert_eq!(
            admitted(tenant("acme"), Some(ApiKeyId::new("other")), 20).await,
            7
        );
    }

    #[tokio::test(start_paused = true)]
    async fn tenant_header_health_bypass_and_disabled() {
        let service =
            RateLimitLayer::new(TenantLimiter::local(&config(1.0, 1))).layer(ok_service());
        let with_header = |tenant: &'static str| {
            let mut request = Request::builder().uri("/weir.Test/Run").body(()).unwrap();
            request
                .headers_mut()
                .insert(TENANT, http::HeaderValue::from_static(tenant));
            request
        };
        assert!(status(&service.clone().oneshot(with_header("acme")).await.unwrap()).is_none());
        let second = service.clone().oneshot(with_header("acme")).await.unwrap();
        assert_eq!(
            status(&second).map(|s| s.code()),
            Some(Code::ResourceExhausted)
        );
        let bad = service.clone().oneshot(with_header("a b")).await.unwrap();
        assert_eq!(status(&bad).map(|s| s.code()), Some(Code::InvalidArgument));
        for _ in 0..5 {
            let health = Request::builder()
                .uri("/grpc.health.v1.Health/Check")
                .body(())
                .unwrap();
            assert!(status(&service.clone().oneshot(health).await.unwrap()).is_none());
        }

        let disabled = RateLimitConfig {
            enabled: false,
            ..config(1.0, 1)
        };
        let service = RateLimitLayer::new(TenantLimiter::local(&disabled)).layer(ok_service());
        for _ in 0..5 {
            assert!(status(&service.clone().oneshot(request(None)).await.unwrap()).is_none());
        }
    }

    #[test]
    fn config_parses_and_validation_names_the_key() {
        let text = "requests_per_second = 5.0\nredis_timeout = \"20ms\"\nreplicas = 3\n\
                    [tenants.acme]\nburst = 50\n[api_keys.acme-batch]\nrequests_per_second = 1.0\n";
        let config: RateLimitConfig = toml::from_str(text).unwrap();
        assert!(config.validate("router.rate_limit").is_ok());
        assert_eq!(config.redis_timeout, Duration::from_millis(20));
        assert_eq!(config.burst, DEFAULT_BURST);
        assert_eq!(
            config.tenants["acme"].over(config.global()),
            Rate {
                per_second: 5.0,
                burst: 50
            }
        );
        assert_eq!(config.global().share(3).burst, DEFAULT_BURST / 3);

        let cases = [
            (
                config_with(|c| c.requests_per_second = 0.0),
                "router.rate_limit.requests_per_second",
            ),
            (
                config_with(|c| c.replicas = 0),
                "router.rate_limit.replicas",
            ),
            (
                config_with(|c| c.redis_url = Some("nope://x".into())),
                "router.rate_limit.redis_url",
            ),
            (
                config_with(|c| {
                    c.tenants.insert("a:b".into(), LimitOverride::default());
                }),
                "router.rate_limit.tenants.a:b",
            ),
            (
                config_with(|c| {
                    c.api_keys.insert(
                        "k".into(),
                        LimitOverride {
                            burst: Some(0),
                            ..LimitOverride::default()
                        },
                    );
                }),
                "router.rate_limit.api_keys.k.burst",
            ),
        ];
        for (config, key) in cases {
            let error = config
                .validate("router.rate_limit")
                .err()
                .map(|e| e.to_string());
            assert!(
                error.as_deref().is_some_and(|e| e.contains(key)),
                "{key}: {error:?}"
            );
        }
    }

    fn config_with(change: impl FnOnce(&mut RateLimitConfig)) -> RateLimitConfig {
        let mut config = RateLimitConfig::default();
        change(&mut config);
        config
    }
}
