//! Budget scopes: the tenant, one of its API keys, users or sessions.

use std::fmt;

use weir_mesh::{ApiError, tenant::Tenant};
use weir_proto::budget as pb;

/// Longest scope id accepted.
pub const MAX_SCOPE_ID_LEN: usize = 128;
/// Most scopes one reservation may hold against (the tenant included).
pub const MAX_SCOPES: usize = 8;

/// The kind of a scope.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ScopeKind {
    /// The whole tenant.
    Tenant,
    /// One API key.
    ApiKey,
    /// One end user.
    User,
    /// One session.
    Session,
}

impl ScopeKind {
    /// The name used in keys and QuotaFailure subjects.
    pub fn name(self) -> &'static str {
        match self {
            Self::Tenant => "tenant",
            Self::ApiKey => "api_key",
            Self::User => "user",
            Self::Session => "session",
        }
    }
}

/// A validated scope inside a tenant.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Scope {
    kind: ScopeKind,
    id: String,
}

impl Scope {
    /// The tenant scope.
    pub fn tenant() -> Self {
        Self {
            kind: ScopeKind::Tenant,
            id: String::new(),
        }
    }

    /// A scope of `kind` with `id` (ignored for the tenant), validated: 1 to 128 characters, no
    /// `:`, whitespace or control characters (they would be ambiguous inside keys).
    pub fn new(kind: ScopeKind, id: &str) -> Result<Self, String> {
        if kind == ScopeKind::Tenant {
            return Ok(Self::tenant());
        }
        if id.is_empty() || id.len() > MAX_SCOPE_ID_LEN {
            return Err(format!(
                "a {} scope needs an id of 1 to {MAX_SCOPE_ID_LEN} bytes",
                kind.name()
            ));
        }
        if id
            .chars()
            .any(|c| c == ':' || c.is_whitespace() || c.is_control())
        {
            return Err("scope ids may not contain ':', whitespace or control characters".into());
        }
        Ok(Self {
            kind,
            id: id.to_string(),
        })
    }

    /// Reads a protobuf scope; `field` names it in errors.
    pub fn from_proto(scope: Option<&pb::Scope>, field: &str) -> Result<Self, ApiError> {
        let scope = scope.ok_or_else(|| ApiError::invalid_argument(field, "required"))?;
        let kind = match pb::ScopeKind::try_from(scope.kind) {
            Ok(pb::ScopeKind::Tenant) => ScopeKind::Tenant,
            Ok(pb::ScopeKind::ApiKey) => ScopeKind::ApiKey,
            Ok(pb::ScopeKind::User) => ScopeKind::User,
            Ok(pb::ScopeKind::Session) => ScopeKind::Session,
            Ok(pb::ScopeKind::Unspecified) | Err(_) => {
                return Err(ApiError::invalid_argument(
                    format!("{field}.kind"),
                    "must be TENANT, API_KEY, USER or SESSION",
                ));
            }
        };
        Self::new(kind, &scope.id)
            .map_err(|message| ApiError::invalid_argument(format!("{field}.id"), message))
    }

    /// The protobuf form.
    pub fn to_proto(&self) -> pb::Scope {
        let kind = match self.kind {
            ScopeKind::Tenant => pb::ScopeKind::Tenant,
            ScopeKind::ApiKey => pb::ScopeKind::ApiKey,
            ScopeKind::User => pb::ScopeKind::User,
            ScopeKind::Session => pb::ScopeKind::Session,
        };
        pb::Scope {
            kind: kind.into(),
            id: self.id.clone(),
        }
    }

    /// The kind.
    pub fn kind(&self) -> ScopeKind {
        self.kind
    }

    /// The id (empty for the tenant).
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The form used inside keys: `tenant`, `api_key:k1`, `user:u1`, `session:s1`.
    pub fn key(&self) -> String {
        match self.kind {
            ScopeKind::Tenant => "tenant".to_string(),
            kind => format!("{}:{}", kind.name(), self.id),
        }
    }

    /// Parses [`Scope::key`].
    pub fn from_key(key: &str) -> Option<Self> {
        if key == "tenant" {
            return Some(Self::tenant());
        }
        let (kind, id) = key.split_once(':')?;
        let kind = match kind {
            "api_key" => ScopeKind::ApiKey,
            "user" => ScopeKind::User,
            "session" => ScopeKind::Session,
            _ => return None,
        };
        Self::new(kind, id).ok()
    }

    /// The QuotaFailure subject: `tenant:acme` for the tenant, else `user:u1` and so on.
    pub fn subject(&self, tenant: &Tenant) -> String {
        match self.kind {
            ScopeKind::Tenant => format!("tenant:{tenant}"),
            _ => self.key(),
        }
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.key())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_and_subjects() {
        let tenant = Tenant::new("acme").unwrap_or_default();
        assert_eq!(Scope::tenant().subject(&tenant), "tenant:acme");
        let user = Scope::new(ScopeKind::User, "u1").unwrap_or_else(|_| Scope::tenant());
        assert_eq!(user.subject(&tenant), "user:u1");
        assert_eq!(Scope::from_key(&user.key()), Some(user));
        assert_eq!(Scope::from_key("tenant"), Some(Scope::tenant()));
        assert_eq!(Scope::from_key("planet:x"), None);
    }

    #[test]
    fn ids_are_validated() {
        assert!(Scope::new(ScopeKind::User, "").is_err());
        assert!(Scope::new(ScopeKind::User, "a:b").is_err());
        assert!(Scope::new(ScopeKind::Session, "a b").is_err());
        assert!(Scope::new(ScopeKind::ApiKey, &"k".repeat(129)).is_err());
        assert!(Scope::new(ScopeKind::Tenant, "ignored").is_ok());
    }
}
