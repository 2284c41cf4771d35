//! gRPC metadata keys Weir reads and writes. Keys are lower case, as HTTP/2 requires.

/// The caller's API key: `authorization: Bearer <key>`, checked by every service's auth layer
/// ([`crate::auth`]) and never forwarded.
pub const AUTHORIZATION: &str = "authorization";
/// The tenant of a call. A service believes it only with a valid [`MESH_TOKEN`] from a mesh peer;
/// the auth layer drops it from anyone else and sets it to the tenant it authenticated, so
/// handlers (and the calls they forward) see the authenticated tenant only.
pub const TENANT: &str = "weir-tenant";
/// Proof that a call comes from a service of this mesh, naming its tenant
/// ([`crate::identity`]): added by the client stack, checked and removed by the auth layer.
pub const MESH_TOKEN: &str = "weir-mesh-token";
/// Request criticality: `CRITICAL_PLUS`, `CRITICAL` (the default), `SHEDDABLE_PLUS`, `SHEDDABLE`.
/// The auth layer clamps it to what the caller's key (or mesh token) allows.
pub const CRITICALITY: &str = "weir-criticality";
/// The gRPC deadline header (`grpc-timeout`), parsed by the deadline layer.
pub const GRPC_TIMEOUT: &str = "grpc-timeout";
/// Server pushback (gRFC A6): milliseconds the client should wait before retrying; negative means
/// do not retry.
pub const RETRY_PUSHBACK_MS: &str = "grpc-retry-pushback-ms";
/// Number of earlier attempts of this call, sent on retries (gRFC A6).
pub const PREVIOUS_RPC_ATTEMPTS: &str = "grpc-previous-rpc-attempts";
/// The price tier a job worker asks for its call: [`BATCH_PRICE_TIER`] for a batch item. The
/// router believes it only from a call with a valid [`MESH_TOKEN`] (a Weir worker); from anyone
/// else it is ignored and the standard tier applies, so a client cannot buy at batch prices.
pub const PRICE_TIER: &str = "weir-price-tier";
/// The [`PRICE_TIER`] value of a batch item: priced at the model's batch prices.
pub const BATCH_PRICE_TIER: &str = "batch";
/// Per-request control of the router's response cache: `bypass` (neither read nor write the
/// cache) or `refresh` (ask the model again and replace the entry). Absent: the cache applies.
pub const CACHE_CONTROL: &str = "weir-cache";
/// The quality a request asks for (`high`, `low`, ...), which a route's rules may test to pick a
/// tier; the `quality` label of the request says the same.
pub const QUALITY: &str = "weir-quality";
