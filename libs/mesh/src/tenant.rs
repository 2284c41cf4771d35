//! The tenant a request belongs to.
//!
//! Every server's auth layer ([`crate::auth`]) decides the tenant from an API key or a mesh token
//! (never from a bare `weir-tenant` header), stores it in the request's extensions and rewrites
//! `weir-tenant` to it. Handlers read it with [`Tenant::authenticated`] and put it in every storage
//! key, so one tenant can never name another's data. With no API keys configured every caller is
//! [`DEFAULT_TENANT`] (what `weir up` uses).

use std::fmt;

use tonic::metadata::MetadataMap;

use crate::{error::ApiError, metadata::TENANT};

/// The tenant of requests that carry no `weir-tenant` metadata.
pub const DEFAULT_TENANT: &str = "default";

/// Longest tenant id accepted.
pub const MAX_TENANT_LEN: usize = 64;

/// A validated tenant id: 1 to 64 ASCII letters, digits, `-`, `_` or `.`, so it is safe inside
/// storage keys and metric labels.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Tenant(String);

impl Tenant {
    /// Validates `id`.
    pub fn new(id: &str) -> Result<Self, ApiError> {
        let valid = !id.is_empty()
            && id.len() <= MAX_TENANT_LEN
            && id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
        if valid {
            Ok(Self(id.to_string()))
        } else {
            Err(ApiError::invalid_argument(
                TENANT,
                "tenant ids are 1 to 64 characters of letters, digits, '-', '_' or '.'",
            ))
        }
    }

    /// The tenant the auth layer authenticated, from a request's extensions. UNAUTHENTICATED when
    /// no auth layer ran (a handler hosted outside [`crate::server::GrpcServer`]): a handler must
    /// never fall back to a header the client chose.
    pub fn authenticated(extensions: &http::Extensions) -> Result<Self, ApiError> {
        extensions.get::<Tenant>().cloned().ok_or_else(|| {
            ApiError::new(
                tonic::Code::Unauthenticated,
                "API_KEY_MISSING",
                "this call was not authenticated: send `authorization: Bearer <key>` metadata",
            )
        })
    }

    /// The tenant named by the `weir-tenant` metadata, or the default tenant when it is absent.
    /// Only meaningful behind the auth layer, which replaces the header with the authenticated
    /// tenant; prefer [`Tenant::authenticated`].
    pub fn from_metadata(metadata: &MetadataMap) -> Result<Self, ApiError> {
        match metadata.get(TENANT) {
            None => Ok(Self(DEFAULT_TENANT.to_string())),
            Some(value) => {
                let id = value.to_str().map_err(|_| {
                    ApiError::invalid_argument(TENANT, "tenant metadata must be ASCII")
                })?;
                Self::new(id)
            }
        }
    }

    /// The id.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Default for Tenant {
    fn default() -> Self {
        Self(DEFAULT_TENANT.to_string())
    }
}

impl fmt::Display for Tenant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn absent_header_is_the_default_tenant() {
        let tenant = Tenant::from_metadata(&MetadataMap::new()).ok();
        assert_eq!(tenant.as_ref().map(Tenant::as_str), Some(DEFAULT_TENANT));
    }

    #[test]
    fn only_the_auth_layers_tenant_counts() {
        let mut extensions = http::Extensions::new();
        assert_eq!(
            Tenant::authenticated(&extensions).err().map(|e| e.code()),
            Some(tonic::Code::Unauthenticated)
        );
        extensions.insert(Tenant::new("acme").unwrap_or_default());
        assert_eq!(
            Tenant::authenticated(&extensions).ok().map(|t| t.0),
            Some("acme".to_string())
        );
    }

    #[test]
    fn header_is_validated() {
        let mut metadata = MetadataMap::new();
        metadata.insert(TENANT, "acme-1".parse().unwrap_or_else(|_| unreachable!()));
        assert_eq!(
            Tenant::from_metadata(&metadata).ok().map(|t| t.0),
            Some("acme-1".to_string())
        );
        for bad in ["", "a:b", "x y", &"a".repeat(65)] {
            assert!(Tenant::new(bad).is_err(), "{bad:?} must be refused");
        }
    }
}
