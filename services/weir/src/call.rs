//! What the `weir` subcommands that call a service share: the API key on each request, and a
//! failed call as a readable error.

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
