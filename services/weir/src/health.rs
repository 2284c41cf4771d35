//! `weir health`: asks a Weir service whether it serves, over the standard gRPC health protocol
//! (`grpc.health.v1.Health/Check`), for container health checks and scripts.
//!
//! ```text
//! weir health 127.0.0.1:50051                     # the whole server; exit 0 when SERVING
//! weir health router:50051 --service weir.router.v1.RouterService
//! ```
//!
//! Exit status 0 when the answer is SERVING; 1 for any other answer (NOT_SERVING while a
//! service drains or before it is ready), an unknown service name, a refused connection or no
//! answer within `--timeout`, with the reason on stderr. So a Docker `HEALTHCHECK`, a compose
//! `healthcheck` or a Kubernetes `exec` probe needs nothing but the `weir` binary.

use std::time::Duration;

use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

/// Default `--timeout`.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(3);

/// `addr` as a URL: `host:port` gets `http://`.
fn url(addr: &str) -> String {
    if addr.contains("://") {
        addr.to_string()
    } else {
        format!("http://{addr}")
    }
}

/// Checks `service` ("" for the whole server) at `addr`: Ok when SERVING, else why not.
pub async fn check(addr: &str, service: &str, timeout: Duration) -> anyhow::Result<()> {
    let endpoint = tonic::transport::Endpoint::from_shared(url(addr))
        .map_err(|error| anyhow::anyhow!("{addr} is not an address ({error}): use host:port"))?
        .connect_timeout(timeout)
        .timeout(timeout);
    let channel = endpoint
        .connect()
        .await
        .map_err(|error| anyhow::anyhow!("cannot connect to {addr}: {error}"))?;
    let answer = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: service.to_string(),
        })
        .await;
    let what = if service.is_empty() {
        addr.to_string()
    } else {
        format!("{service} at {addr}")
    };
    match answer {
        Ok(response) => match response.into_inner().status() {
            ServingStatus::Serving => Ok(()),
            status => Err(anyhow::anyhow!("{what} is {}", status.as_str_name())),
        },
        Err(status) if status.code() == tonic::Code::NotFound => Err(anyhow::anyhow!(
            "{addr} does not serve {service:?}: name a service it runs, e.g. \
             weir.router.v1.RouterService, or leave --service out for the whole server"
        )),
        Err(status) => Err(anyhow::anyhow!(
            "{what} did not answer the health check: {}",
            weir_mesh::ApiError::from_status(&status)
        )),
    }
}
