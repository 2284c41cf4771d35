//! Channels to other Weir services.
//!
//! A [`Channel`] connects lazily and reconnects on its own, so a service can start before its
//! dependencies and survive their restarts; calls made while a dependency is down fail with
//! UNAVAILABLE, which the router's resilience layers (retry, breaker, fallback) act on.

use std::time::Duration;

use tonic::transport::{Channel, Endpoint};

/// Default TCP connect timeout for calls between services.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Default HTTP/2 keep-alive ping interval, so dead connections are noticed.
pub const DEFAULT_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);

/// A channel to `url` (e.g. `http://127.0.0.1:50052`), connecting on first use.
pub fn lazy_channel(url: &str) -> Result<Channel, tonic::transport::Error> {
    Ok(Endpoint::from_shared(url.to_string())?
        .connect_timeout(DEFAULT_CONNECT_TIMEOUT)
        .http2_keep_alive_interval(DEFAULT_KEEPALIVE_INTERVAL)
        .keep_alive_while_idle(true)
        .tcp_nodelay(true)
        .connect_lazy())
}
