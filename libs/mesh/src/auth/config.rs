//! The `[auth]` table: mode, API keys, their roles and criticality ceilings.

use std::collections::HashSet;

use serde::{Deserialize, Serialize};

use super::keys::{parse_digest, valid_id};
use crate::{config::ConfigError, criticality::Criticality, tenant::Tenant};

/// Default mode: API keys when any are configured, the default tenant otherwise.
pub const DEFAULT_MODE: AuthMode = AuthMode::Auto;
/// Default highest criticality a key may claim: CRITICAL_PLUS only when configured.
pub const DEFAULT_MAX_CRITICALITY: Criticality = Criticality::Critical;

/// Where a request's tenant comes from (see the module doc).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AuthMode {
    /// `api_keys` when keys are configured, else `default_tenant`.
    #[default]
    Auto,
    /// Require `authorization: Bearer <key>` (or a mesh token); the key decides the tenant.
    ApiKeys,
    /// No keys; every request is the default tenant, whatever it claims (single-tenant dev mode).
    DefaultTenant,
}

/// A permission a key may hold (`roles = ["admin"]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Administrative RPCs (`SetBudget`, `DeleteUserSessions`), and every other role.
    Admin,
    /// Review decisions (`ClaimNext`, `RenewLease`, `SubmitDecision`, `CancelItem`), the live
    /// queue (`WatchQueue`), and reading a blocking item's output before it is approved.
    Reviewer,
}

impl Role {
    /// The name in configuration and messages.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Reviewer => "reviewer",
        }
    }
}

/// One API key (an entry of `[[auth.api_keys]]`).
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
    /// What the key may administer (default none).
    pub roles: Vec<Role>,
    /// The highest `weir-criticality` the key may claim (default `CRITICAL`).
    pub max_criticality: Option<String>,
}

impl ApiKeySpec {
    /// A key of `tenant` given in clear, with `roles` (tests and local set-ups).
    pub fn clear(tenant: &str, key: &str, roles: &[Role]) -> Self {
        Self {
            tenant: tenant.to_string(),
            key: Some(key.to_string()),
            roles: roles.to_vec(),
            ..Self::default()
        }
    }

    /// The key's criticality ceiling (the default when unset or invalid: see
    /// [`AuthConfig::validate`]).
    pub fn ceiling(&self) -> Criticality {
        self.max_criticality
            .as_deref()
            .and_then(|c| c.parse().ok())
            .unwrap_or(DEFAULT_MAX_CRITICALITY)
    }
}

/// Settings of the auth layer (the `[auth]` table).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// Where the tenant comes from (default `auto`).
    pub mode: AuthMode,
    /// The API keys (default none).
    pub api_keys: Vec<ApiKeySpec>,
}

impl AuthConfig {
    /// Mode `auto` with `api_keys`.
    pub fn with_keys(api_keys: Vec<ApiKeySpec>) -> Self {
        Self {
            mode: AuthMode::Auto,
            api_keys,
        }
    }

    /// The mode `auto` resolves to with these keys.
    pub fn effective_mode(&self) -> AuthMode {
        match self.mode {
            AuthMode::Auto if self.api_keys.is_empty() => AuthMode::DefaultTenant,
            AuthMode::Auto => AuthMode::ApiKeys,
            mode => mode,
        }
    }

    /// Checks the settings (not the environment); `key_prefix` is the table's path (`auth`).
    pub fn validate(&self, key_prefix: &str) -> Result<(), ConfigError> {
        match self.mode {
            AuthMode::ApiKeys if self.api_keys.is_empty() => {
                return Err(ConfigError::invalid(
                    format!("{key_prefix}.api_keys"),
                    "mode = \"api_keys\" needs at least one key",
                ));
            }
            AuthMode::DefaultTenant if !self.api_keys.is_empty() => {
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
            if let Some(ceiling) = &spec.max_criticality {
                ceiling.parse::<Criticality>().map_err(|error| {
                    ConfigError::invalid(key("max_criticality"), error.to_string())
                })?;
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
