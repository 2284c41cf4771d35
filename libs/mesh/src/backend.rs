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

/// Per-backend state created on first use: the one registry behind the keyed layers (breaker,
/// bulkhead). Cheap to clone; clones share the map.
#[derive(Debug)]
pub struct PerBackend<T> {
    default_key: BackendKey,
    map: std::sync::RwLock<std::collections::HashMap<BackendKey, Arc<T>>>,
}

impl<T> PerBackend<T> {
    /// An empty map whose untagged requests use `default_key`.
    pub fn new(default_key: BackendKey) -> Self {
        Self {
            default_key,
            map: std::sync::RwLock::new(std::collections::HashMap::new()),
        }
    }

    /// The key of untagged requests.
    pub fn default_key(&self) -> &BackendKey {
        &self.default_key
    }

    /// The key of a request: its [`BackendKey`] extension, or the default key.
    pub fn key_of<'a, B>(&'a self, request: &'a http::Request<B>) -> &'a BackendKey {
        BackendKey::of(request.extensions()).unwrap_or(&self.default_key)
    }

    /// The state of `key`, if it has been created.
    pub fn peek(&self, key: &BackendKey) -> Option<Arc<T>> {
        self.map
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(key)
            .cloned()
    }

    /// The state of `key`, created with `create` on first use.
    pub fn get_or_create(&self, key: &BackendKey, create: impl FnOnce() -> T) -> Arc<T> {
        if let Some(state) = self.peek(key) {
            return state;
        }
        self.map
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .entry(key.clone())
            .or_insert_with(|| Arc::new(create()))
            .clone()
    }
}
