//! gRPC metadata keys Weir reads and writes. Keys are lower case, as HTTP/2 requires.

/// The caller's API key: `authorization: Bearer <key>`, checked by the router.
pub const AUTHORIZATION: &str = "authorization";
/// The tenant that the router authenticated, forwarded to every service it calls. Services other
/// than the router trust it (they are not exposed to end users).
pub const TENANT: &str = "weir-tenant";
/// Request criticality: `CRITICAL_PLUS`, `CRITICAL` (the default), `SHEDDABLE_PLUS`, `SHEDDABLE`.
pub const CRITICALITY: &str = "weir-criticality";
/// The gRPC deadline header (`grpc-timeout`), parsed by the deadline layer.
pub const GRPC_TIMEOUT: &str = "grpc-timeout";
/// Server pushback (gRFC A6): milliseconds the client should wait before retrying; negative means
/// do not retry.
pub const RETRY_PUSHBACK_MS: &str = "grpc-retry-pushback-ms";
/// Number of earlier attempts of this call, sent on retries (gRFC A6).
pub const PREVIOUS_RPC_ATTEMPTS: &str = "grpc-previous-rpc-attempts";
