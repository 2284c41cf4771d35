//! The console's `/api` handlers: each turns one HTTP request into one gRPC call to the review
//! service, with the reviewer's key, and the answer (or the gRPC error) into JSON.

use std::{convert::Infallible, time::Duration};

use axum::{
    Json,
    extract::{Path, Query, State},
    http::{HeaderMap, StatusCode, header},
    response::{
        IntoResponse, Response,
        sse::{Event, KeepAlive, Sse},
    },
};
use futures::{Stream, StreamExt};
use serde::Deserialize;
use serde_json::json;
use tonic::{Code, Status, metadata::MetadataValue};
use weir_mesh::{ApiError, error::code_name};
use weir_proto::review::{
    ClaimNextRequest, GetItemRequest, GetQueueStatsRequest, ListItemsRequest, RenewLeaseRequest,
    SubmitDecisionRequest, WatchQueueRequest,
};

use super::{Console, json};

/// Deadline of every unary call the console makes.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// How often an idle event stream sends a comment, so proxies do not close it.
const KEEP_ALIVE: Duration = Duration::from_secs(15);

/// An error answer: the gRPC code, reason and message as JSON, with the matching HTTP status.
#[derive(Debug)]
pub(super) struct ApiFailure {
    status: StatusCode,
    code: Code,
    reason: String,
    message: String,
}

impl ApiFailure {
    fn bad_request(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            code: Code::InvalidArgument,
            reason: "INVALID_ARGUMENT".to_string(),
            message: message.into(),
        }
    }

    fn unauthenticated() -> Self {
        Self {
            status: StatusCode::UNAUTHORIZED,
            code: Code::Unauthenticated,
            reason: "MISSING_CREDENTIALS".to_string(),
            message: "sign in: send your reviewer key as `Authorization: Bearer <key>`".to_string(),
        }
    }
}

impl From<Status> for ApiFailure {
    fn from(status: Status) -> Self {
        let error = ApiError::from_status(&status);
        let http = match status.code() {
            Code::InvalidArgument | Code::OutOfRange => StatusCode::BAD_REQUEST,
            Code::Unauthenticated => StatusCode::UNAUTHORIZED,
            Code::PermissionDenied => StatusCode::FORBIDDEN,
            Code::NotFound => StatusCode::NOT_FOUND,
            Code::AlreadyExists | Code::FailedPrecondition | Code::Aborted => StatusCode::CONFLICT,
            Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
            Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            Code::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        Self {
            status: http,
            code: status.code(),
            reason: error.reason().to_string(),
            message: status.message().to_string(),
        }
    }
}

impl IntoResponse for ApiFailure {
    fn into_response(self) -> Response {
        (
            self.status,
            Json(json!({
                "code": code_name(self.code),
                "reason": self.reason,
                "message": self.message,
            })),
        )
            .into_response()
    }
}

type ApiResult = Result<Response, ApiFailure>;

/// A gRPC request carrying the caller's `Authorization` header (the reviewer's key) and the
/// console's deadline.
fn authorized<T>(headers: &HeaderMap, message: T) -> Result<tonic::Request<T>, ApiFailure> {
    let value = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .filter(|v| v.len() > "Bearer ".len() && v.starts_with("Bearer "))
        .ok_or_else(ApiFailure::unauthenticated)?;
    let value: MetadataValue<_> = value
        .parse()
        .map_err(|_| ApiFailure::bad_request("the Authorization header is not valid ASCII"))?;
    let mut request = tonic::Request::new(message);
    request.metadata_mut().insert("authorization", value);
    request.set_timeout(CALL_TIMEOUT);
    Ok(request)
}

/// `GET /api/queues`: the queues the page offers. The key is checked first with a call only a
/// reviewer may make (opening the live queue, closed at once), so a wrong key, or a key without
/// the `reviewer` role, fails at sign-in rather than on the first action.
pub(super) async fn queues(State(console): State<Console>, headers: HeaderMap) -> ApiResult {
    let request = authorized(
        &headers,
        WatchQueueRequest {
            queue: "default".to_string(),
        },
    )?;
    drop(console.review.clone().watch_queue(request).await?);
    Ok(Json(json!({ "queues": console.queues })).into_response())
}

#[derive(Debug, Deserialize)]
pub(super) struct ListQuery {
    #[serde(default)]
    state: String,
    #[serde(default)]
    page_token: String,
}

/// `GET /api/queues/{queue}/items?state=pending`: a page of items, most urgent first.
pub(super) async fn list_items(
    State(console): State<Console>,
    Path(queue): Path<String>,
    Query(query): Query<ListQuery>,
    headers: HeaderMap,
) -> ApiResult {
    let state = match json::parse_state(&query.state) {
        None => 0,
        Some(Ok(state)) => state as i32,
        Some(Err(message)) => return Err(ApiFailure::bad_request(message)),
    };
    let request = authorized(
        &headers,
        ListItemsRequest {
            queue,
            state,
            page_size: 200,
            page_token: query.page_token,
        },
    )?;
    let page = console
        .review
        .clone()
        .list_items(request)
        .await?
        .into_inner();
    Ok(Json(json!({
        "items": page.items.iter().map(json::item).collect::<Vec<_>>(),
        "next_page_token": page.next_page_token,
    }))
    .into_response())
}

/// `GET /api/queues/{queue}/stats`.
pub(super) async fn stats(
    State(console): State<Console>,
    Path(queue): Path<String>,
    headers: HeaderMap,
) -> ApiResult {
    let request = authorized(&headers, GetQueueStatsRequest { queue })?;
    let stats = console
        .review
        .clone()
        .get_queue_stats(request)
        .await?
        .into_inner();
    Ok(Json(json::stats(&stats)).into_response())
}

/// `GET /api/queues/{queue}/events`: every change of the queue's items, as server-sent events
/// (`event: item`, the item as JSON). The stream ends when the review service ends it; the page
/// reconnects and reloads the list.
pub(super) async fn events(
    State(console): State<Console>,
    Path(queue): Path<String>,
    headers: HeaderMap,
) -> ApiResult {
    let mut request = authorized(&headers, WatchQueueRequest { queue })?;
    // A watch lasts as long as the page is open: no deadline.
    request.metadata_mut().remove("grpc-timeout");
    let stream = console
        .review
        .clone()
        .watch_queue(request)
        .await?
        .into_inner();
    let events = stream.map(|next| -> Result<Event, Infallible> {
        Ok(match next {
            Ok(change) => match change.item {
                Some(item) => Event::default()
                    .event("item")
                    .data(json::item(&item).to_string()),
                None => Event::default().comment("empty change"),
            },
            Err(status) => Event::default().event("error").data(
                json!({ "code": code_name(status.code()), "message": status.message() })
                    .to_string(),
            ),
        })
    });
    Ok(sse(events))
}

fn sse(events: impl Stream<Item = Result<Event, Infallible>> + Send + 'static) -> Response {
    Sse::new(events)
        .keep_alive(KeepAlive::new().interval(KEEP_ALIVE))
        .into_response()
}

/// `GET /api/items/{id}`.
pub(super) async fn get_item(
    State(console): State<Console>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> ApiResult {
    let request = authorized(&headers, GetItemRequest { item_id: id })?;
    let item = console.review.clone().get_item(request).await?.into_inner();
    Ok(Json(json!({ "item": item.item.as_ref().map(json::item) })).into_response())
}

#[derive(Debug, Deserialize)]
pub(super) struct ClaimBody {
    #[serde(default)]
    queue: String,
    reviewer: String,
}

/// `POST /api/items/{id}/claim` `{queue, reviewer}`: leases this item to the reviewer.
pub(super) async fn claim(
    State(console): State<Console>,
    Path(id): Path<String>,
    headers: HeaderMap,
    Json(body): Json<ClaimBody>,
) -> ApiResult {
    let request = authorized(
        &headers,
        ClaimNextRequest {
            queue: body.queue,
            reviewer: body.reviewer,
            lease_duration: None,
            item_id: id,
        },
    )?;
    let claimed = console
        .review
        .clone()
        .claim_next(request)
        .await?
        .into_inner();
    match claimed.item {
        Some(item) => Ok(Json(json!({ "item": json::item(&item) })).into_response()),
        // ClaimNext answers "nothing" when the item is no longer pending.
        None => Err(ApiFailure {
            status: StatusCode::CONFLICT,
            code: Code::FailedPrecondition,
            reason: "NOT_PENDING".to_string(),
            message: "the item is no longer pending: another reviewer took it or it was decided"
                .to_string(),
        }),
    }
}

#[derive(Debug, Deserialize)]
pub(super) struct RenewBody {
    lease_id: String,
}

/// `POST /api/items/{id}/renew` `{lease_id}`.
pub(super) async fn renew(
    State(console): State<Console>,
    Path(id): Path<String>,
    headers: HeaderMap,
    Json(body): Json<RenewBody>,
) -> ApiResult {
    let request = authorized(
        &headers,
        RenewLeaseRequest {
            item_id: id,
            lease_id: body.lease_id,
            lease_duration: None,
        },
    )?;
    let renewed = console
        .review
        .clone()
        .renew_lease(request)
        .await?
        .into_inner();
    Ok(Json(json!({ "lease": json::lease_only(renewed.lease.as_ref()) })).into_response())
}

#[derive(Debug, Deserialize)]
pub(super) struct DecisionBody {
    lease_id: String,
    verdict: String,
    #[serde(default)]
    edited_content: String,
    #[serde(default)]
    comment: String,
}

/// `POST /api/items/{id}/decision` `{lease_id, verdict, edited_content, comment}`.
pub(super) async fn decide(
    State(console): State<Console>,
    Path(id): Path<String>,
    headers: HeaderMap,
    Json(body): Json<DecisionBody>,
) -> ApiResult {
    let verdict = json::parse_verdict(&body.verdict).map_err(ApiFailure::bad_request)?;
    let request = authorized(
        &headers,
        SubmitDecisionRequest {
            item_id: id,
            lease_id: body.lease_id,
            verdict: verdict as i32,
            edited_content: body.edited_content,
            comment: body.comment,
        },
    )?;
    let decided = console
        .review
        .clone()
        .submit_decision(request)
        .await?
        .into_inner();
    Ok(Json(json!({ "item": decided.item.as_ref().map(json::item) })).into_response())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn codes_are_written_as_grpc_names() {
        for (status, name) in [
            (Status::failed_precondition("x"), "FAILED_PRECONDITION"),
            (Status::not_found("x"), "NOT_FOUND"),
            (Status::ok("x"), "OK"),
        ] {
            let response = ApiFailure::from(status).into_response();
            let body = axum::body::to_bytes(response.into_body(), 4096)
                .await
                .unwrap();
            let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
            assert_eq!(json["code"], name);
        }
    }

    #[test]
    fn grpc_errors_keep_their_code_and_reason_over_http() {
        let failure = ApiFailure::from(Status::failed_precondition("lease lapsed"));
        assert_eq!(failure.status, StatusCode::CONFLICT);
        assert_eq!(failure.code, Code::FailedPrecondition);
        assert_eq!(failure.message, "lease lapsed");
        let failure = ApiFailure::from(Status::permission_denied("reviewer role needed"));
        assert_eq!(failure.status, StatusCode::FORBIDDEN);
    }

    #[test]
    fn a_request_without_a_bearer_key_is_refused_before_any_call() {
        let headers = HeaderMap::new();
        let failure = authorized(&headers, ()).unwrap_err();
        assert_eq!(failure.status, StatusCode::UNAUTHORIZED);
        let mut headers = HeaderMap::new();
        headers.insert(header::AUTHORIZATION, "Bearer ".parse().unwrap());
        assert!(authorized(&headers, ()).is_err());
        headers.insert(header::AUTHORIZATION, "Bearer rk_1".parse().unwrap());
        let request = authorized(&headers, ()).unwrap();
        assert_eq!(
            request.metadata().get("authorization").unwrap(),
            "Bearer rk_1"
        );
    }
}
