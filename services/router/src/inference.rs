//! The model call: the router's client of the inference service.
//!
//! One channel ([`weir_mesh::client::lazy_channel`]) carries every call; it connects on first use
//! and reconnects on its own, so a call made while inference is down fails with UNAVAILABLE rather
//! than the router failing to start.
//!
//! Each call carries, from the caller's request, the metadata in [`FORWARDED_METADATA`]: the
//! tenant, the criticality (the request body's `criticality` wins when set, as the API documents)
//! and `grpc-timeout`, so the inference call is bounded by the caller's deadline. Forwarding the
//! header unchanged gives inference the caller's whole budget, not what is left of it; the
//! deadline layer of libs/mesh will send only the remaining time, and replaces
//! `outgoing_request`. Until tenant authentication lands in the router, the `weir-tenant` a
//! caller sends is passed on as is; the auth layer will set it from the API key instead.
//!
//! Errors are passed through with their `google.rpc` details: the client of the router sees the
//! code, reason, RetryInfo and BadRequest that inference produced.

use tonic::{
    Streaming,
    metadata::{MetadataMap, MetadataValue},
    transport::Channel,
};
use weir_mesh::{
    ApiError,
    metadata::{CRITICALITY, GRPC_TIMEOUT, TENANT},
};
use weir_proto::{
    common::Criticality,
    inference::{
        GenerateRequest, GenerateResponse, GenerateStreamRequest, GenerateStreamResponse,
        inference_service_client::InferenceServiceClient,
    },
};

/// Metadata copied from the caller's request onto each inference call, when present.
pub const FORWARDED_METADATA: [&str; 3] = [TENANT, CRITICALITY, GRPC_TIMEOUT];

/// A cheap-to-clone client of the inference service.
#[derive(Debug, Clone)]
pub(crate) struct Inference {
    client: InferenceServiceClient<Channel>,
}

impl Inference {
    /// A client over `channel`.
    pub fn new(channel: Channel) -> Self {
        Self {
            client: InferenceServiceClient::new(channel),
        }
    }

    /// `Generate`: the whole answer.
    pub async fn generate(
        &self,
        request: GenerateRequest,
        incoming: &MetadataMap,
        criticality: Option<Criticality>,
    ) -> Result<GenerateResponse, ApiError> {
        let request = outgoing_request(request, incoming, criticality);
        let mut client = self.client.clone();
        match client.generate(request).await {
            Ok(response) => Ok(response.into_inner()),
            Err(status) => Err(ApiError::from_status(&status)),
        }
    }

    /// `GenerateStream`: the answer's events. Dropping the returned stream cancels the call.
    pub async fn generate_stream(
        &self,
        request: GenerateStreamRequest,
        incoming: &MetadataMap,
        criticality: Option<Criticality>,
    ) -> Result<Streaming<GenerateStreamResponse>, ApiError> {
        let request = outgoing_request(request, incoming, criticality);
        let mut client = self.client.clone();
        match client.generate_stream(request).await {
            Ok(response) => Ok(response.into_inner()),
            Err(status) => Err(ApiError::from_status(&status)),
        }
    }
}

/// Wraps `message` in a request carrying the [`FORWARDED_METADATA`] of `incoming`, with the body's
/// criticality (if set) in place of the caller's `weir-criticality`.
pub(crate) fn outgoing_request<T>(
    message: T,
    incoming: &MetadataMap,
    criticality: Option<Criticality>,
) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    let outgoing = request.metadata_mut();
    for key in FORWARDED_METADATA {
        if let Some(value) = incoming.get(key) {
            outgoing.insert(key, value.clone());
        }
    }
    if let Some(name) = criticality.and_then(criticality_name) {
        outgoing.insert(CRITICALITY, MetadataValue::from_static(name));
    }
    request
}

/// The `weir-criticality` spelling of a criticality (`CRITICAL_PLUS`, ...); none for UNSPECIFIED.
fn criticality_name(criticality: Criticality) -> Option<&'static str> {
    match criticality {
        Criticality::Unspecified => None,
        known => known.as_str_name().strip_prefix("CRITICALITY_"),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn incoming(pairs: &[(&'static str, &'static str)]) -> MetadataMap {
        let mut map = MetadataMap::new();
        for (key, value) in pairs {
            map.insert(*key, MetadataValue::from_static(value));
        }
        map
    }

    fn get<'a>(request: &'a tonic::Request<()>, key: &str) -> Option<&'a str> {
        request.metadata().get(key).and_then(|v| v.to_str().ok())
    }

    #[test]
    fn forwards_tenant_criticality_and_deadline_only() {
        let incoming = incoming(&[
            (TENANT, "acme"),
            (CRITICALITY, "SHEDDABLE"),
            (GRPC_TIMEOUT, "1500m"),
            ("authorization", "Bearer secret"),
            ("x-other", "1"),
        ]);
        let request = outgoing_request((), &incoming, None);
        assert_eq!(get(&request, TENANT), Some("acme"));
        assert_eq!(get(&request, CRITICALITY), Some("SHEDDABLE"));
        assert_eq!(get(&request, GRPC_TIMEOUT), Some("1500m"));
        assert_eq!(get(&request, "authorization"), None);
        assert_eq!(get(&request, "x-other"), None);
    }

    #[test]
    fn absent_metadata_stays_absent() {
        let request = outgoing_request((), &MetadataMap::new(), None);
        assert!(request.metadata().is_empty());
    }

    #[test]
    fn body_criticality_overrides_metadata() {
        let incoming = incoming(&[(CRITICALITY, "SHEDDABLE")]);
        let request = outgoing_request((), &incoming, Some(Criticality::CriticalPlus));
        assert_eq!(get(&request, CRITICALITY), Some("CRITICAL_PLUS"));
        let request = outgoing_request((), &incoming, Some(Criticality::Unspecified));
        assert_eq!(get(&request, CRITICALITY), Some("SHEDDABLE"));
    }

    #[test]
    fn criticality_names_match_the_metadata_spelling() {
        assert_eq!(criticality_name(Criticality::Critical), Some("CRITICAL"));
        assert_eq!(
            criticality_name(Criticality::SheddablePlus),
            Some("SHEDDABLE_PLUS")
        );
        assert_eq!(criticality_name(Criticality::Unspecified), None);
    }
}
