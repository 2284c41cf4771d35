//! The gRPC implementation: the request walk of `Complete` and `CompleteStream`.
//!
//! Both RPCs walk the same steps (DESIGN.md section 4), each in its own module:
//!
//! 1. Server layers run before the handler (deadline, admission, auth, rate limit; libs/mesh).
//! 2. Checks and route: [`crate::request`] refuses what the router alone can tell is wrong, and
//!    [`crate::route`] turns `model` into a [`Plan`] of ordered candidates.
//! 3. Context (session history), 4. budget reservation: not in this version; the comments in
//!    `RouterApi::walk` say where they go.
//! 5. Model call: [`crate::inference`] calls the plan's primary; [`crate::relay`] streams its
//!    answer.
//! 6. Budget commit and session append, 7. review policy: not in this version.
//! 8. Respond with what happened: served model, requested name, route, served-by, usage.
//!
//! The answer's `cost_micros` is 0, `review_status` is NOT_REQUIRED, and `trace_id` and `notices`
//! are empty until the budget, review and observability steps fill them.
//!
//! Jobs and batches answer UNIMPLEMENTED (the generated defaults) until their issue lands.

use std::sync::Arc;

use tonic::{Request, Response, Status, metadata::MetadataMap};
use weir_mesh::ApiError;
use weir_proto::router::{
    CompleteRequest, CompleteResponse, CompleteStreamRequest, ReviewStatus, ServedBy,
    complete_stream_response::Start, router_service_server::RouterService,
};

use crate::{
    inference::Inference,
    relay::{self, CompleteStream},
    request::{Completion, RequestError},
    route::{Candidate, Plan, ResolveError, RouteTable},
};

/// The router's gRPC service. Cheap to clone: the route table is shared and the inference
/// channel multiplexes every call.
#[derive(Debug, Clone)]
pub struct RouterApi {
    routes: Arc<RouteTable>,
    inference: Inference,
}

impl RouterApi {
    /// A router over validated `routes`, calling inference over `channel`.
    pub fn new(routes: RouteTable, channel: tonic::transport::Channel) -> Self {
        Self {
            routes: Arc::new(routes),
            inference: Inference::new(channel),
        }
    }

    /// The route table requests are resolved against.
    pub fn routes(&self) -> &RouteTable {
        &self.routes
    }

    /// Steps 2 to 4 of the walk, shared by every execution model: from a request to the plan that
    /// serves it.
    fn walk(&self, completion: &Completion) -> Result<Plan, Refused> {
        completion.check()?;
        let plan = self.routes.resolve(&completion.model)?;
        // 3. Context: with a session, `session.GetContext` prepends its summary and recent turns
        //    to `completion.messages` here (until then, `check` refuses `session_id`).
        // 4. Budget: `budget.Reserve` the worst-case cost of the primary here; a tenant near its
        //    soft limit may be steered to a cheaper candidate of the plan.
        Ok(plan)
    }
}

#[tonic::async_trait]
impl RouterService for RouterApi {
    async fn complete(
        &self,
        request: Request<CompleteRequest>,
    ) -> Result<Response<CompleteResponse>, Status> {
        let (metadata, _, body) = request.into_parts();
        let completion = Completion::from(body);
        let plan = self.walk(&completion).map_err(refused)?;
        // 5. Model call. The fallback chain walks the rest of `plan.candidates()` here when the
        //    primary fails, and ends in the route's degraded answer.
        let position = 0;
        let candidate = plan.primary();
        let answer = self
            .inference
            .generate(
                completion.generate_request(candidate.model()),
                &metadata,
                completion.criticality(),
            )
            .await
            .map_err(|error| upstream_failed(&plan, candidate.model(), error))?;
        // 6. `budget.Commit` the usage and `session.AppendTurns` go here; 7. the review policy
        //    may hold or sample the answer here.
        let usage = answer.usage;
        tracing::debug!(
            requested = plan.requested_model(),
            route = plan.route_alias(),
            model = candidate.model(),
            input_tokens = usage.map(|u| u.input_tokens),
            output_tokens = usage.map(|u| u.output_tokens),
            "completed"
        );
        // 8. Respond.
        let model = if answer.model.is_empty() {
            candidate.model().to_string()
        } else {
            answer.model
        };
        Ok(Response::new(CompleteResponse {
            message: answer.message,
            model,
            requested_model: plan.requested_model().to_string(),
            route: plan.route_alias().to_string(),
            served_by: plan.served_by(position).into(),
            finish_reason: answer.finish_reason,
            usage,
            cost_micros: 0,
            review_status: ReviewStatus::NotRequired.into(),
            review_id: String::new(),
            trace_id: String::new(),
            notices: Vec::new(),
        }))
    }

    async fn complete_stream(
        &self,
        request: Request<CompleteStreamRequest>,
    ) -> Result<Response<CompleteStream>, Status> {
        let (metadata, _, body) = request.into_parts();
        let completion = Completion::from(body);
        let plan = self.walk(&completion).map_err(refused)?;
        // 5. Model call. Until the first upstream event the client has seen nothing, so the
        //    fallback chain can still try the next candidate here.
        let position = 0;
        let candidate = plan.primary();
        let served_by = plan.served_by(position);
        let stream = open_stream(
            &self.inference,
            &completion,
            &plan,
            candidate,
            served_by,
            &metadata,
        )
        .await
        .map_err(|error| upstream_failed(&plan, candidate.model(), error))?;
        // 6./7. Budget commit, session append and review of a streamed answer run when the relay
        //    sees `done` (or the stream ends early, committing the partial usage).
        tracing::debug!(
            requested = plan.requested_model(),
            route = plan.route_alias(),
            model = candidate.model(),
            "streaming"
        );
        Ok(Response::new(stream))
    }
}

/// Starts the stream of one candidate of `plan`: calls inference and waits for its first event
/// (see [`relay::open`]).
async fn open_stream(
    inference: &Inference,
    completion: &Completion,
    plan: &Plan,
    candidate: &Candidate,
    served_by: ServedBy,
    metadata: &MetadataMap,
) -> Result<CompleteStream, ApiError> {
    let model = candidate.model();
    let upstream = inference
        .generate_stream(
            completion.generate_stream_request(model),
            metadata,
            completion.criticality(),
        )
        .await?;
    let start = Start {
        model: model.to_string(),
        requested_model: plan.requested_model().to_string(),
        route: plan.route_alias().to_string(),
        served_by: served_by.into(),
        trace_id: String::new(),
    };
    relay::open(start, upstream).await
}

/// Why the walk refused a request before any model call.
#[derive(Debug, thiserror::Error)]
enum Refused {
    /// The request itself is wrong or asks for what this version lacks.
    #[error(transparent)]
    Request(#[from] RequestError),
    /// `model` names no model or route.
    #[error(transparent)]
    Route(#[from] ResolveError),
}

impl From<Refused> for ApiError {
    fn from(refused: Refused) -> Self {
        match refused {
            Refused::Request(error) => error.into(),
            Refused::Route(error) => error.into(),
        }
    }
}

/// A request refused before any model call.
fn refused(refused: Refused) -> Status {
    let error = ApiError::from(refused);
    tracing::debug!(code = ?error.code(), reason = error.reason(), "refused");
    Status::from(error)
}

/// An inference failure, passed through with its details.
fn upstream_failed(plan: &Plan, model: &str, error: ApiError) -> Status {
    tracing::debug!(
        requested = plan.requested_model(),
        route = plan.route_alias(),
        model,
        code = ?error.code(),
        reason = error.reason(),
        "model call failed"
    );
    Status::from(error)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    //! The handlers' own refusals, and an unreachable inference service. Answers from a running
    //! inference service are covered end to end in tests/.

    use tonic::Code;
    use tonic_types::StatusExt;
    use weir_mesh::catalog::Catalog;
    use weir_proto::common::{Message, Role};

    use super::*;
    use crate::Config;

    /// A router whose inference service is a closed port.
    fn api() -> RouterApi {
        let config = Config {
            inference_url: "http://127.0.0.1:1".to_string(),
            ..Config::default()
        };
        crate::router_api(&config, Arc::new(Catalog::default())).unwrap()
    }

    fn request(model: &str) -> CompleteRequest {
        CompleteRequest {
            model: model.to_string(),
            messages: vec![Message {
                role: Role::User.into(),
                content: "hello".to_string(),
                ..Message::default()
            }],
            ..CompleteRequest::default()
        }
    }

    fn stream_request(model: &str) -> CompleteStreamRequest {
        let request = request(model);
        CompleteStreamRequest {
            model: request.model,
            messages: request.messages,
            ..CompleteStreamRequest::default()
        }
    }

    fn reason(status: &Status) -> Option<String> {
        status
            .get_error_details()
            .error_info()
            .map(|i| i.reason.clone())
    }

    #[tokio::test]
    async fn refusals_come_before_any_model_call() {
        let api = api();
        let mut no_messages = request("auto");
        no_messages.messages.clear();
        let status = api.complete(Request::new(no_messages)).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument);

        let mut session = request("auto");
        session.session_id = "s-1".to_string();
        let status = api.complete(Request::new(session)).await.unwrap_err();
        assert_eq!(status.code(), Code::Unimplemented);
        assert_eq!(reason(&status).as_deref(), Some("SESSIONS_UNAVAILABLE"));

        let status = api.complete(Request::new(request(""))).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument);

        let status = api
            .complete(Request::new(request("gpt-9")))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::NotFound);
        assert_eq!(reason(&status).as_deref(), Some("MODEL_NOT_FOUND"));

        let status = api
            .complete_stream(Request::new(stream_request("gpt-9")))
            .await
            .err()
            .unwrap();
        assert_eq!(status.code(), Code::NotFound);
    }

    #[tokio::test]
    async fn an_unreachable_inference_service_is_unavailable() {
        let api = api();
        let status = api
            .complete(Request::new(request("auto")))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::Unavailable, "{status:?}");
        assert!(reason(&status).is_some());

        let status = api
            .complete_stream(Request::new(stream_request("sim-small")))
            .await
            .err()
            .unwrap();
        assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    }
}
