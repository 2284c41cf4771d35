//! What the `weir` subcommands that call a service share: where the router is and the API key
//! ([`RouterOptions`]), the key on each request, and a failed call as a readable error.

use tonic::{Request, metadata::MetadataValue};
use weir_mesh::ApiError;

/// `body` as a request, with `key` (if any) as `authorization: Bearer <key>`.
pub fn request<T>(key: Option<&str>, body: T) -> anyhow::Result<Request<T>> {
    let mut request = Request::new(body);
    if let Some(key) = key {
        let value = MetadataValue::try_from(format!("Bearer {key}")).map_err(|_| {
            anyhow::anyhow!("the API key contains characters that cannot be sent in a header")
        })?;
        request
            .metadata_mut()
            .insert(weir_mesh::metadata::AUTHORIZATION, value);
    }
    Ok(request)
}

/// A failed call: its code, reason and message (`NOT_FOUND (JOB_NOT_FOUND): ...`).
pub fn failed(status: &tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{}", ApiError::from_status(status))
}

/// Where the router is and who calls it: `--router` (`WEIR_ROUTER_URL`) and `--api-key`
/// (`WEIR_API_KEY`), shared by `weir jobs` and `weir batch`.
#[derive(Debug, Clone, clap::Args)]
pub struct RouterOptions {
    /// Router address.
    #[arg(
        long,
        global = true,
        env = "WEIR_ROUTER_URL",
        default_value = "http://127.0.0.1:50051"
    )]
    pub router: String,
    /// API key, sent as `authorization: Bearer <key>`.
    #[arg(long, global = true, env = "WEIR_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
}
