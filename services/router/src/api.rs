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

use tonic::{Request, Response, Status};
use weir_mesh::{ApiError, client::ClientStack, deadline::Deadline};
use weir_proto::{
    common::{FinishReason, Message, Role, Usage},
    router::{
        CompleteRequest, CompleteResponse, CompleteStreamRequest, Notice, ReviewStatus, ServedBy,
        complete_stream_response::Start, router_service_server::RouterService,
    },
};

use crate::{
    fallback,
    inference::{Call, Inference},
    relay::{self, CompleteStream},
    request::{Completion, RequestError},
    route::{Plan, ResolveError, RouteTable},
};

/// The router's gRPC service. Cheap to clone: the route table is shared and the inference
/// channel multiplexes every call.
#[derive(Debug, Clone)]
pub struct RouterApi {
    routes: Arc<RouteTable>,
    inference: Inference,
}

impl RouterApi {
    /// A router over validated `routes`, calling inference through `client` (the mesh's client
    /// stack over a channel to the inference service).
    pub fn new(routes: RouteTable, client: ClientStack) -> Self {
        Self {
            routes: Arc::new(routes),
            inference: Inference::new(client),
        }
    }

    /// The client stack of the calls to inference: its circuit breakers and bulkheads by model.
    pub fn inference_client(&self) -> &ClientStack {
        self.inference.stack()
    }

    /// The route table requests are resolved against.
    pub fn routes(&self) -> &RouteTable {
        &self.routes
    }

    /// Steps 2 to 4 of the walk, shared by every execution model: from a request to the plan that
    /// serves it.
    fn walk(&self, completion: &Completion) -> Result<Plan, Refused> {
        completion.check()?;
        let sticky = Some(completion.session_id.as_str()).filter(|s| !s.is_empty());
        let plan = self.routes.resolve(&completion.model, sticky)?;
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
        let deadline = Deadline::from_request(&request);
        let (metadata, _, body) = request.into_parts();
        let completion = Completion::from(body);
        let plan = self.walk(&completion).map_err(refused)?;
        let call = Call::new(&metadata, deadline, completion.criticality());
        // 5. Model call: the candidates in order, each later one only after a fallback-worthy
        //    failure of the one before (crate::fallback), then the route's degraded answer.
        let mut notices = Vec::new();
        let mut last_error = None;
        for (position, candidate) in plan.candidates().iter().enumerate() {
            let model = candidate.model();
            if position > 0 && out_of_time(&call) {
                break;
            }
            let result = self
                .inference
                .generate(&call, model, completion.generate_request(model))
                .await;
            let answer = match result {
                Ok(answer) => answer,
                Err(error) => {
                    let error = failed(&plan, model, error)?;
                    notices.push(fallback_notice(model, &error));
                    last_error = Some(error);
                    continue;
                }
            };
            // 6. `budget.Commit` the usage and `session.AppendTurns` go here; 7. the review
            //    policy may hold or sample the answer here.
            let usage = answer.usage;
            tracing::debug!(
                requested = plan.requested_model(),
                route = plan.route_alias(),
                model,
                position,
                input_tokens = usage.map(|u| u.input_tokens),
                output_tokens = usage.map(|u| u.output_tokens),
                "completed"
            );
            // 8. Respond.
            let served_model = if answer.model.is_empty() {
                model.to_string()
            } else {
                answer.model
            };
            return Ok(Response::new(CompleteResponse {
                message: answer.message,
                model: served_model,
                requested_model: plan.requested_model().to_string(),
                route: plan.route_alias().to_string(),
                served_by: plan.served_by(position).into(),
                finish_reason: answer.finish_reason,
                usage,
                cost_micros: 0,
                review_status: ReviewStatus::NotRequired.into(),
                review_id: String::new(),
                trace_id: String::new(),
                notices,
            }));
        }
        let (text, notices) = degraded(&plan, &completion, last_error, notices)?;
        Ok(Response::new(CompleteResponse {
            message: Some(Message {
                role: Role::Assistant.into(),
                content: text,
                ..Message::default()
            }),
            model: String::new(),
            requested_model: plan.requested_model().to_string(),
            route: plan.route_alias().to_string(),
            served_by: ServedBy::Degraded.into(),
            finish_reason: FinishReason::Stop.into(),
            usage: Some(Usage::default()),
            cost_micros: 0,
            review_status: ReviewStatus::NotRequired.into(),
            review_id: String::new(),
            trace_id: String::new(),
            notices,
        }))
    }

    async fn complete_stream(
        &self,
        request: Request<CompleteStreamRequest>,
    ) -> Result<Response<CompleteStream>, Status> {
        let deadline = Deadline::from_request(&request);
        let (metadata, _, body) = request.into_parts();
        let completion = Completion::from(body);
        let plan = self.walk(&completion).map_err(refused)?;
        let call = Call::new(&metadata, deadline, completion.criticality());
        // 5. Model call. Until a candidate's first event the client has seen nothing, so a
        //    failure before it moves on to the next candidate exactly as for `Complete`; after
        //    it, the stream ends with the error (never a silent switch mid-answer).
        let mut notices = Vec::new();
        let mut last_error = None;
        for (position, candidate) in plan.candidates().iter().enumerate() {
            let model = candidate.model();
            if position > 0 && out_of_time(&call) {
                break;
            }
            let start = start_event(&plan, model, plan.served_by(position));
            let opened = open_stream(
                &self.inference,
                &call,
                &completion,
                model,
                start,
                notices.clone(),
            )
            .await;
            match opened {
                Ok(stream) => {
                    // 6./7. Budget commit, session append and review of a streamed answer run
                    //    when the relay sees `done` (or the stream ends early).
                    tracing::debug!(
                        requested = plan.requested_model(),
                        route = plan.route_alias(),
                        model,
                        position,
                        "streaming"
                    );
                    return Ok(Response::new(stream));
                }
                Err(error) => {
                    let error = failed(&plan, model, error)?;
                    notices.push(fallback_notice(model, &error));
                    last_error = Some(error);
                }
            }
        }
        let (text, notices) = degraded(&plan, &completion, last_error, notices)?;
        let start = start_event(&plan, "", ServedBy::Degraded);
        Ok(Response::new(relay::degraded(start, text, notices)))
    }
}

/// The `start` event of a stream served by `model`.
fn start_event(plan: &Plan, model: &str, served_by: ServedBy) -> Start {
    Start {
        model: model.to_string(),
        requested_model: plan.requested_model().to_string(),
        route: plan.route_alias().to_string(),
        served_by: served_by.into(),
        trace_id: String::new(),
    }
}

/// Starts the stream of one model: calls inference and waits for its first event (see
/// [`relay::open`]).
async fn open_stream(
    inference: &Inference,
    call: &Call,
    completion: &Completion,
    model: &str,
    start: Start,
    notices: Vec<Notice>,
) -> Result<CompleteStream, ApiError> {
    let upstream = inference
        .generate_stream(call, model, completion.generate_stream_request(model))
        .await?;
    relay::open(start, notices, upstream).await
}

/// Whether the caller's deadline has passed, so no further candidate is worth trying.
fn out_of_time(call: &Call) -> bool {
    call.deadline()
        .is_some_and(|deadline| deadline.is_expired())
}

/// A failed model call: `Ok(error)` when the walk may try the next candidate, `Err(status)` when
/// the failure ends the request (passed through with its details).
fn failed(plan: &Plan, model: &str, error: ApiError) -> Result<ApiError, Status> {
    tracing::debug!(
        requested = plan.requested_model(),
        route = plan.route_alias(),
        model,
        code = ?error.code(),
        reason = error.reason(),
        "model call failed"
    );
    if fallback::falls_back(&error) {
        Ok(error)
    } else {
        Err(Status::from(error))
    }
}

/// The notice recording that `model` failed and the walk moved on.
fn fallback_notice(model: &str, error: &ApiError) -> Notice {
    Notice {
        reason: FALLBACK_USED.to_string(),
        message: format!("{model} failed ({}); tried the next model", error.reason()),
    }
}

/// Every candidate failed: the route's degraded answer with a notice, or the last error.
fn degraded(
    plan: &Plan,
    completion: &Completion,
    last_error: Option<ApiError>,
    mut notices: Vec<Notice>,
) -> Result<(String, Vec<Notice>), Status> {
    let last_error =
        last_error.unwrap_or_else(|| ApiError::internal("the route has no candidate to call"));
    match plan.degraded() {
        Some(degraded) => {
            tracing::warn!(
                requested = plan.requested_model(),
                route = plan.route_alias(),
                reason = last_error.reason(),
                "every model failed; serving the degraded answer"
            );
            notices.push(Notice {
                reason: DEGRADED.to_string(),
                message: format!(
                    "every model of route {} failed (last: {}); this is the route's degraded answer",
                    plan.route_alias(),
                    last_error.reason()
                ),
            });
            Ok((degraded.text(&completion.messages), notices))
        }
        None => Err(Status::from(last_error)),
    }
}

/// Notice reason: an earlier candidate failed and a later one served the answer.
pub const FALLBACK_USED: &str = "FALLBACK_USED";
/// Notice reason: every candidate failed and the route's degraded answer was served.
pub const DEGRADED: &str = "DEGRADED";

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
