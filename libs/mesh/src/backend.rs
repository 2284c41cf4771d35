//! Which backend a client call goes to, so per-backend layers keep separate state.
//!
//! One gRPC channel can reach several logical backends: the router reaches every model through
//! one channel to the inference service. The circuit breaker and the bulkhead must still isolate
//! them (a failing `gpt-4o` must not open the breaker of `sim-small`), so the caller tags each
//! request with a [`BackendKey`] in its extensions, and keyed layers look it up with
//! [`BackendKey::of`]. Untagged requests share the layer's default key.

use std::{fmt, sync::Arc};

/// The name of the backend a request is for (a model name, an upstream host, a service name).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BackendKey(Arc<str>);

impl BackendKey {
    /// A key named `name`.
    pub fn new(name: &str) -> Self {
        Self(Arc::from(name))
    }

    /// The key in `extensions`, if the caller set one.
    pub fn of(extensions: &http::Extensions) -> Option<&BackendKey> {
        extensions.get::<BackendKey>()
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for BackendKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}
