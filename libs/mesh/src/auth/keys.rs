//! The key table: API keys held as SHA-256 digests, and the `authorization` header check.

use std::collections::HashMap;

use tonic::Code;

use super::{ApiKeyId, AuthConfig, Role};
use crate::{
    config::ConfigError,
    criticality::Criticality,
    error::ApiError,
    metadata::AUTHORIZATION,
    tenant::{MAX_TENANT_LEN, Tenant},
};

pub(super) type Digest = [u8; 32];

/// What a key grants.
#[derive(Debug, Clone)]
pub(super) struct KeyEntry {
    pub(super) tenant: Tenant,
    pub(super) id: ApiKeyId,
    pub(super) roles: Vec<Role>,
    pub(super) ceiling: Criticality,
}

/// The configured keys, by digest.
#[derive(Debug, Clone, Default)]
pub(super) struct KeyTable {
    keys: HashMap<Digest, KeyEntry>,
}

pub(super) fn sha256(bytes: &[u8]) -> Digest {
    let digest = ring::digest::digest(&ring::digest::SHA256, bytes);
    let mut out = [0u8; 32];
    out.copy_from_slice(digest.as_ref());
    out
}

pub(super) fn parse_digest(hex: &str) -> Option<Digest> {
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

pub(super) fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_TENANT_LEN
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

impl KeyTable {
    /// Validates `config` and resolves its keys (reading `key_env` through `env`); errors name
    /// the key under `key_prefix`.
    pub(super) fn resolve(
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
            let entry = KeyEntry {
                tenant,
                id,
                roles: spec.roles.clone(),
                ceiling: spec.ceiling(),
            };
            if keys.insert(digest, entry).is_some() {
                return Err(ConfigError::invalid(
                    format!("{key_prefix}.api_keys[{index}]"),
                    "the same key is configured twice",
                ));
            }
        }
        Ok(Self { keys })
    }

    /// Number of keys.
    pub(super) fn len(&self) -> usize {
        self.keys.len()
    }

    /// The key presented in `authorization: Bearer <key>`.
    pub(super) fn check(&self, headers: &http::HeaderMap) -> Result<KeyEntry, ApiError> {
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
        self.keys
            .get(&sha256(key.as_bytes()))
            .cloned()
            .ok_or_else(invalid)
    }
}

/// An authentication or authorization refusal, counted by reason.
pub(super) fn failure(reason: &'static str, message: &str) -> ApiError {
    metrics::counter!("weir_auth_failures_total", "reason" => reason).increment(1);
    tracing::debug!(reason, "authentication failed");
    let code = if reason == "ROLE_REQUIRED" {
        Code::PermissionDenied
    } else {
        Code::Unauthenticated
    };
    ApiError::new(code, reason, message)
}
