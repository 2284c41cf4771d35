//! Job callbacks: a job that ends with a `callback` is POSTed to its URL, signed per Standard
//! Webhooks, from an outbox.
//!
//! - The outbox entry is written by the transition that ends the job (the same Lua script that
//!   stores the result, or the same lock in memory), so nothing is sent before the result is
//!   stored and nothing is lost if the process dies right after.
//! - The [`Dispatcher`] claims due entries by moving their due time forward by a lease
//!   ([`CallbacksConfig::lease`]), POSTs, and records the outcome; the entry is removed only after
//!   the outcome is recorded. A dispatcher that dies mid-delivery leaves the entry due again once
//!   its lease passes: the delivery is retried (at least once), never lost.
//! - Every attempt carries the same `webhook-id` (the job id) and a fresh `webhook-timestamp`.
//! - The callback URL is checked at submit and again before every attempt ([`check_url`]).
//!
//! docs/jobs.md documents the body and the configuration.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    time::Duration,
};

use base64::{Engine as _, engine::general_purpose::STANDARD};
use rand::Rng as _;
use ring::hmac;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use weir_mesh::{config::ConfigError, tenant::Tenant};

use super::{JobRecord, JobStore, state_name};

/// Reason of a `SubmitJob` whose tenant has no signing secret configured.
pub const NO_CALLBACK_SECRET: &str = "NO_CALLBACK_SECRET";
/// How often the dispatcher looks for due deliveries.
const POLL: Duration = Duration::from_millis(100);
/// Longest a callback host's resolution may take.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(3);
/// Most deliveries claimed at once.
const CLAIM_BATCH: usize = 16;

/// The `[router.jobs.callbacks]` table.
///
/// ```toml
/// [router.jobs.callbacks]
/// allow_private = false        # true: loopback/private/link-local URLs are allowed (local tests)
/// allowed_hosts = ["hooks.internal.example"]  # hosts allowed even when they resolve privately
/// timeout = "10s"              # per POST
/// retry_delays = ["5s", "30s", "2m", "10m", "30m", "1h", "2h", "4h"]  # then give up
/// lease = "1m"                 # a claimed delivery not recorded by then is attempted again
/// [router.jobs.callbacks.tenants.acme]
/// secret_env = "ACME_WEBHOOK_SECRET"  # or secret = "whsec_..."
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CallbacksConfig {
    /// Whether callback URLs may point at loopback, private, link-local or unspecified addresses.
    pub allow_private: bool,
    /// Hosts allowed whatever they resolve to.
    pub allowed_hosts: Vec<String>,
    /// Timeout of one POST.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// Delay before each retry (±20% jitter); after the last, the delivery is given up.
    pub retry_delays: Vec<humantime_serde::Serde<Duration>>,
    /// How long a claimed delivery is reserved for its dispatcher (longer than `timeout`).
    #[serde(with = "humantime_serde")]
    pub lease: Duration,
    /// Signing secrets by tenant.
    pub tenants: BTreeMap<String, TenantSecret>,
}

/// A tenant's signing secret: `secret`, or the environment variable `secret_env`. Either a
/// `whsec_<base64>` secret (the Standard Webhooks form) or any other string, used as bytes.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TenantSecret {
    /// The secret itself.
    pub secret: Option<String>,
    /// The environment variable holding it.
    pub secret_env: Option<String>,
}

impl std::fmt::Debug for TenantSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // A logged config must not leak the key.
        f.debug_struct("TenantSecret")
            .field("secret", &self.secret.as_ref().map(|_| "<redacted>"))
            .field("secret_env", &self.secret_env)
            .finish()
    }
}

impl Default for CallbacksConfig {
    fn default() -> Self {
        let delays = [5, 30, 120, 600, 1800, 3600, 7200, 14400];
        Self {
            allow_private: false,
            allowed_hosts: Vec::new(),
            timeout: Duration::from_secs(10),
            retry_delays: delays
                .iter()
                .map(|s| Duration::from_secs(*s).into())
                .collect(),
            lease: Duration::from_secs(60),
            tenants: BTreeMap::new(),
        }
    }
}

impl CallbacksConfig {
    /// Checks the values, naming the bad key under `key` (`router.jobs.callbacks`).
    pub fn validate(&self, key: &str) -> Result<(), ConfigError> {
        if self.timeout.is_zero() || self.lease <= self.timeout {
            return Err(ConfigError::invalid(
                format!("{key}.lease"),
                "timeout must be > 0 and lease longer than timeout",
            ));
        }
        for (tenant, secret) in &self.tenants {
            if secret.secret.is_some() == secret.secret_env.is_some() {
                return Err(ConfigError::invalid(
                    format!("{key}.tenants.{tenant}"),
                    "set exactly one of secret and secret_env",
                ));
            }
            if let Some(Err(error)) = secret.secret.as_deref().map(decode_secret) {
                return Err(ConfigError::invalid(
                    format!("{key}.tenants.{tenant}.secret"),
                    error,
                ));
            }
        }
        Ok(())
    }

    /// The tenant's signing key, if one is configured (and its variable set).
    pub fn secret(&self, tenant: &str) -> Result<Vec<u8>, String> {
        let missing = || {
            format!(
                "no callback signing secret for tenant {tenant}: set \
                 [router.jobs.callbacks.tenants.{tenant}] secret_env (or secret)"
            )
        };
        let configured = self.tenants.get(tenant).ok_or_else(missing)?;
        let text = match (&configured.secret, &configured.secret_env) {
            (Some(secret), _) => secret.clone(),
            (None, Some(var)) => std::env::var(var)
                .map_err(|_| format!("{} (the variable {var} is not set)", missing()))?,
            (None, None) => return Err(missing()),
        };
        decode_secret(&text)
    }

    /// Attempts in all: the first and one per retry delay.
    pub fn attempts(&self) -> u32 {
        u32::try_from(self.retry_delays.len())
            .unwrap_or(u32::MAX)
            .saturating_add(1)
    }

    /// The delay after attempt `attempt` (1-based) failed, with ±20% jitter; None after the last.
    pub fn retry_after(&self, attempt: u32) -> Option<Duration> {
        let index = usize::try_from(attempt).ok()?.checked_sub(1)?;
        let delay: Duration = **self.retry_delays.get(index)?;
        Some(delay.mul_f64(rand::rng().random_range(0.8..1.2)))
    }
}

/// The key bytes of a secret: `whsec_<base64>` is decoded, anything else is used as is.
pub fn decode_secret(text: &str) -> Result<Vec<u8>, String> {
    let key = match text.strip_prefix("whsec_") {
        Some(encoded) => STANDARD
            .decode(encoded)
            .map_err(|error| format!("a whsec_ secret must be base64 after the prefix: {error}"))?,
        None => text.as_bytes().to_vec(),
    };
    if key.is_empty() {
        return Err("the secret is empty".to_string());
    }
    Ok(key)
}

/// `v1,<base64 of HMAC-SHA256(key, "{id}.{timestamp}.{body}")>`, the `webhook-signature` value.
pub fn sign(key: &[u8], id: &str, timestamp: i64, body: &[u8]) -> String {
    let key = hmac::Key::new(hmac::HMAC_SHA256, key);
    let mut context = hmac::Context::with_key(&key);
    context.update(format!("{id}.{timestamp}.").as_bytes());
    context.update(body);
    format!("v1,{}", STANDARD.encode(context.sign().as_ref()))
}

/// The JSON body POSTed for a job that ended.
pub fn body(tenant: &Tenant, job: &JobRecord) -> serde_json::Value {
    let state = state_name(job.state);
    let result = job.result.as_ref().map(|r| {
        let usage = r.usage.unwrap_or_default();
        serde_json::json!({
            "text": r.message.as_ref().map(|m| m.content.clone()).unwrap_or_default(),
            "model": r.model,
            "usage": {
                "input_tokens": usage.input_tokens,
                "output_tokens": usage.output_tokens,
                "cached_input_tokens": usage.cached_input_tokens,
                "total_tokens": usage.total_tokens,
            },
            "cost_micros": r.cost_micros,
            "review_status": r.review_status,
            "review_id": r.review_id,
        })
    });
    let error = job
        .error
        .as_ref()
        .map(|e| serde_json::json!({"code": e.code, "message": e.message, "reason": e.reason}));
    serde_json::json!({
        "type": format!("job.{}", state.trim_start_matches("JOB_STATE_").to_lowercase()),
        "timestamp_ms": job.end_ms,
        "data": {
            "id": job.id,
            "tenant": tenant.as_str(),
            "state": state,
            "attempts": job.attempts,
            "result": result,
            "error": error,
        },
    })
}

/// Why a callback URL is refused (a message for `callback.url`).
pub async fn check_url(url: &str, config: &CallbacksConfig) -> Result<(), String> {
    let parsed = reqwest::Url::parse(url).map_err(|error| {
        format!("{error}: give an absolute http(s) URL, e.g. https://example.com/hooks")
    })?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(format!(
            "scheme {} is not allowed: use https (or http)",
            parsed.scheme()
        ));
    }
    let Some(host) = parsed.host_str() else {
        return Err("the URL has no host".to_string());
    };
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    if config
        .allowed_hosts
        .iter()
        .any(|h| h.eq_ignore_ascii_case(bare))
        || config.allow_private
    {
        return Ok(());
    }
    let port = parsed.port_or_known_default().unwrap_or(443);
    let addrs: Vec<IpAddr> = match bare.parse::<IpAddr>() {
        Ok(ip) => vec![ip],
        Err(_) => tokio::time::timeout(RESOLVE_TIMEOUT, tokio::net::lookup_host((bare, port)))
            .await
            .map_err(|_| format!("host {bare} could not be resolved in time"))?
            .map_err(|error| format!("host {bare} could not be resolved ({error})"))?
            .map(|a| a.ip())
            .collect(),
    };
    if addrs.is_empty() {
        return Err(format!("host {bare} resolves to no address"));
    }
    if let Some(ip) = addrs.iter().find(|ip| !is_public(**ip)) {
        return Err(format!(
            "host {bare} resolves to {ip}, a loopback, private, link-local or unspecified \
             address: use a public URL, or list the host in [router.jobs.callbacks] \
             allowed_hosts (allow_private = true allows every such address)"
        ));
    }
    Ok(())
}

/// Whether `ip` is a public unicast address.
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => is_public_v4(v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => is_public_v4(v4),
            None => is_public_v6(v6),
        },
    }
}

fn is_public_v4(ip: Ipv4Addr) -> bool {
    let [a, b, ..] = ip.octets();
    !(ip.is_loopback()
        || ip.is_private()
        || ip.is_link_local()
        || ip.is_unspecified()
        || ip.is_broadcast()
        || ip.is_multicast()
        || a == 0
        || (a == 100 && (64..128).contains(&b)))
}

fn is_public_v6(ip: Ipv6Addr) -> bool {
    let first = ip.segments()[0];
    !(ip.is_loopback()
        || ip.is_unspecified()
        || ip.is_multicast()
        || (first & 0xfe00) == 0xfc00
        || (first & 0xffc0) == 0xfe80)
}

/// What an attempt came to, as recorded in the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// A 2xx: `callback_delivered` is set and the entry removed.
    Delivered,
    /// HTTP 410: the receiver asked to stop; the entry is removed.
    Gone,
    /// The last attempt failed (or the URL is no longer allowed); the entry is removed.
    GaveUp,
    /// Attempted again at this Unix ms.
    Retry(i64),
}

impl Outcome {
    /// The stored `callback_status` (empty for a retry).
    pub fn status(self) -> &'static str {
        match self {
            Self::Delivered => "delivered",
            Self::Gone => "gone",
            Self::GaveUp => "failed",
            Self::Retry(_) => "",
        }
    }
}

/// Delivers the outbox: one task per process running workers.
#[derive(Debug, Clone)]
pub struct Dispatcher {
    store: JobStore,
    config: CallbacksConfig,
    client: reqwest::Client,
}

impl Dispatcher {
    /// A dispatcher of `store`'s outbox.
    pub fn new(store: JobStore, config: CallbacksConfig) -> Result<Self, ConfigError> {
        let client = reqwest::Client::builder()
            .timeout(config.timeout)
            // The connection goes to an address checked at connect time, not one that DNS may
            // have changed since check_url (DNS rebinding).
            .dns_resolver(std::sync::Arc::new(CheckedResolver {
                config: config.clone(),
            }))
            // A redirect could lead past the allow-list.
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|error| ConfigError::invalid("router.jobs.callbacks", error.to_string()))?;
        Ok(Self {
            store,
            config,
            client,
        })
    }

    /// Delivers due callbacks until `shutdown`.
    pub async fn run(self, shutdown: CancellationToken) {
        loop {
            let claimed = match self
                .store
                .claim_callbacks(self.config.lease, CLAIM_BATCH)
                .await
            {
                Ok(claimed) => claimed,
                Err(error) => {
                    tracing::warn!(%error, "callback outbox unreachable");
                    Vec::new()
                }
            };
            let idle = claimed.is_empty();
            // Concurrently, so one slow receiver does not hold up the others' callbacks.
            let this = &self;
            let attempts = claimed.iter().map(|(tenant, id)| async move {
                if let Err(error) = this.deliver(tenant, id).await {
                    // The claim's lease runs out and the entry is attempted again.
                    tracing::warn!(%error, %tenant, job = id, "callback outcome not recorded");
                }
            });
            tokio::select! {
                // A delivery cut short here is attempted again after its lease.
                () = shutdown.cancelled() => return,
                _ = futures::future::join_all(attempts) => {}
            }
            if idle {
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = tokio::time::sleep(POLL) => {}
                }
            }
        }
    }

    /// One attempt for a claimed entry, and its recorded outcome.
    async fn deliver(&self, tenant: &Tenant, id: &str) -> Result<(), super::JobsError> {
        let Some(job) = self.store.get(tenant, id).await? else {
            // Gone past its retention: nothing left to send.
            return self
                .store
                .callback_outcome(tenant, id, Outcome::GaveUp)
                .await;
        };
        let attempt = job.callback_attempts.saturating_add(1);
        let outcome = match self.post(tenant, &job).await {
            Ok(status) if status.is_success() => Outcome::Delivered,
            Ok(status) if status == reqwest::StatusCode::GONE => Outcome::Gone,
            Ok(status) => self.failed(tenant, id, attempt, &status.to_string()),
            Err(Refused(message)) => {
                tracing::warn!(%tenant, job = id, message, "callback given up");
                Outcome::GaveUp
            }
            Err(Transient(message)) => self.failed(tenant, id, attempt, &message),
        };
        let label = match outcome {
            Outcome::Retry(_) => "retry",
            other => other.status(),
        };
        metrics::counter!("weir_router_job_callbacks_total", "outcome" => label).increment(1);
        self.store.callback_outcome(tenant, id, outcome).await
    }

    fn failed(&self, tenant: &Tenant, id: &str, attempt: u32, why: &str) -> Outcome {
        match self.config.retry_after(attempt) {
            Some(delay) => {
                tracing::debug!(%tenant, job = id, attempt, why, "callback failed; will retry");
                let delay = i64::try_from(delay.as_millis()).unwrap_or(i64::MAX);
                Outcome::Retry(super::now_ms().saturating_add(delay))
            }
            None => {
                tracing::warn!(%tenant, job = id, attempt, why, "callback given up");
                Outcome::GaveUp
            }
        }
    }

    async fn post(&self, tenant: &Tenant, job: &JobRecord) -> Result<reqwest::StatusCode, Failure> {
        let url = job
            .body
            .callback
            .as_ref()
            .map(|c| c.url.clone())
            .unwrap_or_default();
        check_url(&url, &self.config).await.map_err(Refused)?;
        let key = self.config.secret(tenant.as_str()).map_err(Refused)?;
        let body =
            serde_json::to_vec(&body(tenant, job)).map_err(|error| Refused(error.to_string()))?;
        let timestamp = super::now_ms().div_euclid(1000);
        let signature = sign(&key, &job.id, timestamp, &body);
        let response = self
            .client
            .post(&url)
            .header("content-type", "application/json")
            .header("webhook-id", &job.id)
            .header("webhook-timestamp", timestamp.to_string())
            .header("webhook-signature", signature)
            .body(body)
            .send()
            .await
            .map_err(|error| Transient(error.to_string()))?;
        Ok(response.status())
    }
}

/// Resolves callback hosts for the HTTP client, refusing names that resolve to an address
/// [`check_url`] would refuse, so the address connected to is the address checked.
struct CheckedResolver {
    config: CallbacksConfig,
}

impl reqwest::dns::Resolve for CheckedResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let host = name.as_str().to_string();
        let open = self.config.allow_private
            || self
                .config
                .allowed_hosts
                .iter()
                .any(|h| h.eq_ignore_ascii_case(&host));
        Box::pin(async move {
            let addrs: Vec<std::net::SocketAddr> =
                tokio::time::timeout(RESOLVE_TIMEOUT, tokio::net::lookup_host((host.as_str(), 0)))
                    .await
                    .map_err(|_| format!("resolving {host} timed out"))??
                    .collect();
            if !open && let Some(addr) = addrs.iter().find(|a| !is_public(a.ip())) {
                return Err(
                    format!("{host} resolves to {}, which is not allowed", addr.ip()).into(),
                );
            }
            let addrs: reqwest::dns::Addrs = Box::new(addrs.into_iter());
            Ok(addrs)
        })
    }
}

/// Why an attempt did not get an HTTP status.
enum Failure {
    /// Not to be attempted again (the URL is no longer allowed, no secret).
    Refused(String),
    /// Connection or timeout: retried.
    Transient(String),
}
use Failure::{Refused, Transient};

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn the_signature_matches_the_specifications_example() {
        // The example of the Standard Webhooks specification (and svix's libraries).
        let key = decode_secret("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        let body = br#"{"test": 2432232314}"#;
        assert_eq!(
            sign(&key, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body),
            "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
        );
    }

    #[test]
    fn private_addresses_are_not_public() {
        for ip in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "0.0.0.0",
            "::1",
            "::",
            "fe80::1",
            "fd00::1",
            "::ffff:127.0.0.1",
        ] {
            assert!(!is_public(ip.parse().unwrap()), "{ip}");
        }
        for ip in ["8.8.8.8", "2606:4700::1111"] {
            assert!(is_public(ip.parse().unwrap()), "{ip}");
        }
    }

    #[tokio::test]
    async fn urls_are_checked() {
        let config = CallbacksConfig::default();
        for url in [
            "ftp://example.com/x",
            "http://127.0.0.1:8080/hook",
            "http://[::1]/hook",
            "http://localhost/hook",
            "not a url",
        ] {
            assert!(check_url(url, &config).await.is_err(), "{url}");
        }
        assert!(
            check_url("https://93.184.215.14/hook", &config)
                .await
                .is_ok()
        );
        let open = CallbacksConfig {
            allow_private: true,
            ..CallbacksConfig::default()
        };
        assert!(check_url("http://127.0.0.1:8080/hook", &open).await.is_ok());
        let listed = CallbacksConfig {
            allowed_hosts: vec!["127.0.0.1".to_string()],
            ..CallbacksConfig::default()
        };
        assert!(
            check_url("http://127.0.0.1:8080/hook", &listed)
                .await
                .is_ok()
        );
    }

    #[tokio::test]
    async fn the_client_resolver_refuses_private_addresses() {
        use reqwest::dns::Resolve as _;
        let name = |host: &str| host.parse::<reqwest::dns::Name>().unwrap();
        let strict = CheckedResolver {
            config: CallbacksConfig::default(),
        };
        assert!(strict.resolve(name("localhost")).await.is_err());
        let open = CheckedResolver {
            config: CallbacksConfig {
                allowed_hosts: vec!["localhost".to_string()],
                ..CallbacksConfig::default()
            },
        };
        assert!(
            open.resolve(name("localhost"))
                .await
                .unwrap()
                .next()
                .is_some()
        );
    }

    #[test]
    fn a_secret_is_not_debug_printed() {
        let secret = TenantSecret {
            secret: Some("whsec_c2VjcmV0".to_string()),
            secret_env: None,
        };
        assert!(!format!("{secret:?}").contains("c2VjcmV0"));
        assert_eq!(decode_secret("whsec_c2VjcmV0").unwrap(), b"secret");
        assert_eq!(decode_secret("plain").unwrap(), b"plain");
        assert!(decode_secret("whsec_!!").is_err());
    }

    #[test]
    fn the_schedule_ends() {
        let config = CallbacksConfig {
            retry_delays: vec![Duration::from_millis(100).into(); 2],
            ..CallbacksConfig::default()
        };
        assert_eq!(config.attempts(), 3);
        let first = config.retry_after(1).unwrap();
        assert!(first >= Duration::from_millis(80) && first <= Duration::from_millis(120));
        assert!(config.retry_after(3).is_none());
        assert!(config.retry_after(0).is_none());
    }
}
