//! The model call: the router's client of the inference service.
//!
//! Every call goes through the mesh's client stack ([`weir_mesh::client::ClientStack`]): deadline
//! propagation → retry (with a per-model budget) → circuit breaker → bulkhead → per-attempt
//! timeout → one channel to inference. Each call is tagged with the model as its
//! [`BackendKey`], so a failing model opens its own breaker and spends its own retry budget
//! without touching the others.
//!
//! Each call carries, from the caller's request (a [`Call`]):
//! - the tenant (`weir-tenant`, which the auth layer set from the API key) and the criticality
//!   (the request body's `criticality` wins when set, as the API documents);
//! - the caller's [`Deadline`]: the remaining time, not the caller's whole budget, is sent on.
//!
//! Errors are passed through with their `google.rpc` details: the client of the router sees the
//! code, reason, RetryInfo and BadRequest that inference produced.

use tonic::{
    Streaming,
    metadata::{MetadataMap, MetadataValue},
};
use weir_mesh::criticality::Criticality;
use weir_mesh::{
    ApiError,
    backend::BackendKey,
    client::{BoxedClient, ClientStack},
    deadline::Deadline,
    metadata::{CRITICALITY, TENANT},
};
use weir_proto::inference::{
    GenerateRequest, GenerateResponse, GenerateStreamRequest, GenerateStreamResponse,
    inference_service_client::InferenceServiceClient,
};

/// Metadata copied from the caller's request onto each inference call, when present.
pub const FORWARDED_METADATA: [&str; 2] = [TENANT, CRITICALITY];

/// What one client request passes on to every model call it makes.
#[derive(Debug, Clone, Default)]
pub struct Call {
    metadata: MetadataMap,
    deadline: Option<Deadline>,
}

impl Call {
    /// The [`FORWARDED_METADATA`] of `incoming` (with the body's criticality, if set, in place of
    /// the caller's `weir-criticality`) and the caller's deadline.
    pub fn new(
        incoming: &MetadataMap,
        deadline: Option<Deadline>,
        criticality: Option<Criticality>,
    ) -> Self {
        let mut metadata = MetadataMap::new();
        for key in FORWARDED_METADATA {
            if let Some(value) = incoming.get(key) {
                metadata.insert(key, value.clone());
            }
        }
        if let Some(criticality) = criticality {
            criticality.insert_into_metadata(&mut metadata);
        }
        Self { metadata, deadline }
    }

    /// The caller's deadline, if it set one (the server layer always caps it, so in a server there
    /// always is one).
    pub fn deadline(&self) -> Option<Deadline> {
        self.deadline
    }

    /// The same forwarded metadata with another deadline: for the bookkeeping after an answer
    /// (budget commit, session append), which must finish even when the caller has gone.
    pub fn with_deadline(&self, deadline: Deadline) -> Self {
        Self {
            metadata: self.metadata.clone(),
            deadline: Some(deadline),
        }
    }

    /// Wraps `message` for a call to `backend` (a model for inference calls; `session` or
    /// `budget` for those services): the forwarded metadata, the remaining deadline, and the
    /// backend as the call's [`BackendKey`].
    pub(crate) fn request<T>(&self, message: T, backend: &str) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        *request.metadata_mut() = self.metadata.clone();
        if let Some(deadline) = self.deadline {
            deadline.apply_to(&mut request);
        }
        request.extensions_mut().insert(BackendKey::new(backend));
        request
    }

    /// Wraps `message` for a bookkeeping call to `backend` (`budget` or `session`): like
    /// [`Call::request`], but at criticality [`BOOKKEEPING_CRITICALITY`] whatever the caller's.
    ///
    /// Reserve, Commit, Release, GetContext and AppendTurns are part of serving the request, not
    /// extra work it asks for: shedding a SHEDDABLE request's Commit under load would leave an
    /// answer that was served unpaid (and telling it not to retry would make that final), and
    /// shedding its Release would keep its hold until it expires. The caller's criticality
    /// decided whether the request was admitted; once admitted, its books are kept.
    pub(crate) fn bookkeeping<T>(&self, message: T, backend: &str) -> tonic::Request<T> {
        let mut request = self.request(message, backend);
        request.metadata_mut().insert(
            CRITICALITY,
            MetadataValue::from_static(BOOKKEEPING_CRITICALITY.as_str()),
        );
        request
    }
}

/// The criticality of every bookkeeping call (budget, session): see `Call::bookkeeping`.
pub const BOOKKEEPING_CRITICALITY: Criticality = Criticality::Critical;

/// A cheap-to-clone client of the inference service.
#[derive(Debug, Clone)]
pub(crate) struct Inference {
    client: InferenceServiceClient<BoxedClient>,
    stack: ClientStack,
}

impl Inference {
    /// A client over `stack`.
    pub fn new(stack: ClientStack) -> Self {
        Self {
            client: InferenceServiceClient::new(stack.service()),
            stack,
        }
    }

    /// The client stack (its breakers and bulkheads, by model).
    pub fn stack(&self) -> &ClientStack {
        &self.stack
    }

    /// `Generate`: the whole answer from `model`.
    pub async fn generate(
        &self,
        call: &Call,
        model: &str,
        message: GenerateRequest,
    ) -> Result<GenerateResponse, ApiError> {
        let mut client = self.client.clone();
        match client.generate(call.request(message, model)).await {
            Ok(response) => Ok(response.into_inner()),
            Err(status) => Err(ApiError::from_status(&status)),
        }
    }

    /// `GenerateStream`: the answer's events from `model`. Dropping the returned stream cancels
    /// the call.
    pub async fn generate_stream(
        &self,
        call: &Call,
        model: &str,
        message: GenerateStreamRequest,
    ) -> Result<Streaming<GenerateStreamResponse>, ApiError> {
        let mut client = self.client.clone();
        match client.generate_stream(call.request(message, model)).await {
            Ok(response) => Ok(response.into_inner()),
            Err(status) => Err(ApiError::from_status(&status)),
        }
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
    fn forwards_tenant_criticality_and_the_remaining_deadline_only() {
        let incoming = incoming(&[
            (TENANT, "acme"),
            (CRITICALITY, "SHEDDABLE"),
            ("grpc-timeout", "1500m"),
            ("authorization", "Bearer secret"),
            ("x-other", "1"),
        ]);
        let deadline = Deadline::after(std::time::Duration::from_millis(700));
        let request = Call::new(&incoming, Some(deadline), None).request((), "m");
        assert_eq!(get(&request, TENANT), Some("acme"));
        assert_eq!(get(&request, CRITICALITY), Some("SHEDDABLE"));
        let sent = weir_mesh::deadline::remaining(request.metadata()).unwrap();
        assert!(sent <= std::time::Duration::from_millis(700), "{sent:?}");
        assert_eq!(get(&request, "authorization"), None);
        assert_eq!(get(&request, "x-other"), None);
        assert_eq!(
            request.extensions().get::<BackendKey>(),
            Some(&BackendKey::new("m"))
        );
    }

    #[test]
    fn bookkeeping_calls_are_critical_whatever_the_caller_claimed() {
        for claimed in ["SHEDDABLE", "SHEDDABLE_PLUS", "CRITICAL_PLUS"] {
            let mut incoming = incoming(&[(TENANT, "acme")]);
            incoming.insert(CRITICALITY, MetadataValue::from_static(claimed));
            let call = Call::new(&incoming, None, None);
            assert_eq!(get(&call.request((), "m"), CRITICALITY), Some(claimed));
            let books = call.bookkeeping((), "budget");
            assert_eq!(get(&books, CRITICALITY), Some("CRITICAL"));
            assert_eq!(get(&books, TENANT), Some("acme"));
        }
    }

    #[test]
    fn absent_metadata_stays_absent() {
        let request = Call::new(&MetadataMap::new(), None, None).request((), "m");
        assert!(request.metadata().is_empty());
    }

    #[test]
    fn body_criticality_overrides_metadata() {
        let incoming = incoming(&[(CRITICALITY, "SHEDDABLE")]);
        let call = Call::new(&incoming, None, Some(Criticality::CriticalPlus));
        assert_eq!(
            get(&call.request((), "m"), CRITICALITY),
            Some("CRITICAL_PLUS")
        );
        let call = Call::new(&incoming, None, None);
        assert_eq!(get(&call.request((), "m"), CRITICALITY), Some("SHEDDABLE"));
    }
}
