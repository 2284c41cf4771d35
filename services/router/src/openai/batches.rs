//! OpenAI's Batch API on the HTTP edge, onto Weir's batches (docs/http-edge.md, "Files and
//! batches").
//!
//! | HTTP | gRPC |
//! |---|---|
//! | `POST /v1/batches` | the input file read from the store, parsed, then `CreateBatch` |
//! | `GET /v1/batches/{id}` | `GetBatch` |
//! | `GET /v1/batches` (`limit`, `after`) | `ListBatches` |
//! | `POST /v1/batches/{id}/cancel` | `CancelBatch` |
//! | `GET /v1/files/{output or error file id}/content` | `GetBatch`, then `StreamBatchResults` |
//!
//! Every call carries the caller's `Authorization` into the router's own stack, as chat
//! completions do, so another tenant's batch is 404 there. The OpenAI fields Weir has no place
//! for (the input file id, the completion window as written) are kept in the batch's labels under
//! [`INPUT_FILE_LABEL`] and [`WINDOW_LABEL`]; the others are labels too and come back as
//! `metadata`.

use std::collections::{BTreeMap, HashMap};

use axum::{
    body::Bytes,
    extract::{Path, Query, State, rejection::BytesRejection},
    http::{HeaderMap, StatusCode},
    response::{IntoResponse, Response},
};
use serde::{Deserialize, Serialize};
use tonic::{Code, Status};
use weir_proto::router::{
    Batch, BatchState, CancelBatchRequest, CreateBatchRequest, GetBatchRequest, ListBatchesRequest,
    StreamBatchResultsRequest, StreamBatchResultsResponse,
};

use super::{
    batch_input::{self, CHAT_COMPLETIONS_URL},
    batch_output::{self, Line},
    edge::{Edge, IDEMPOTENCY_KEY, grpc_request, header_text, json},
    errors::{self, OpenAiError},
    files::{self, BATCH_OUTPUT_PURPOSE, FileObject, ResultFile},
};

/// The label holding the batch's input file id.
pub const INPUT_FILE_LABEL: &str = "openai_input_file_id";
/// The label holding the batch's completion window as it was written (`24h`).
pub const WINDOW_LABEL: &str = "openai_completion_window";
/// `metadata` pairs a batch may carry: the router's 16 labels less the two above.
pub const MAX_METADATA: usize = crate::request::MAX_LABELS - 2;
/// Batches read per `ListBatches` call while listing.
const LIST_PAGE: i32 = 100;

/// OpenAI's batch object.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BatchObject {
    /// The batch id (Weir's).
    pub id: String,
    /// Always `batch`.
    pub object: String,
    /// Always `/v1/chat/completions`.
    pub endpoint: String,
    /// Always null: a bad input file is refused when uploaded.
    pub errors: Option<serde_json::Value>,
    /// The file the batch was created from.
    pub input_file_id: String,
    /// The completion window as given (`24h`).
    pub completion_window: String,
    /// `in_progress`, `cancelling`, `completed`, `cancelled` or `expired` (see [`status`]).
    pub status: String,
    /// The succeeded items' file, once the batch has ended with some.
    pub output_file_id: Option<String>,
    /// The other items' file, once the batch has ended with some.
    pub error_file_id: Option<String>,
    /// Unix seconds.
    pub created_at: i64,
    /// When items may start (creation, or `not_before`).
    pub in_progress_at: Option<i64>,
    /// When unfinished items expire.
    pub expires_at: Option<i64>,
    /// Never set: Weir has no finalizing step.
    pub finalizing_at: Option<i64>,
    /// When it ended COMPLETED.
    pub completed_at: Option<i64>,
    /// Never set: a batch does not fail as a whole.
    pub failed_at: Option<i64>,
    /// When it ended EXPIRED.
    pub expired_at: Option<i64>,
    /// Not recorded by Weir: null.
    pub cancelling_at: Option<i64>,
    /// When it ended CANCELLED.
    pub cancelled_at: Option<i64>,
    /// Items in all, succeeded, and ended otherwise (failed, cancelled, expired).
    pub request_counts: RequestCounts,
    /// The labels given as `metadata` (null when none).
    pub metadata: Option<BTreeMap<String, String>>,
}

/// OpenAI's `request_counts`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestCounts {
    /// Items in all.
    pub total: i64,
    /// Items that succeeded (lines of the output file).
    pub completed: i64,
    /// Items that failed, were cancelled or expired (lines of the error file).
    pub failed: i64,
}

/// OpenAI's status of a batch state. Weir has no `validating` (a file is checked when uploaded
/// and a batch is created whole), `finalizing` (results are read straight from the items) or
/// `failed` (items fail one by one, into the error file).
pub fn status(state: i32) -> &'static str {
    match BatchState::try_from(state) {
        Ok(BatchState::InProgress) => "in_progress",
        Ok(BatchState::Completed) => "completed",
        Ok(BatchState::Cancelling) => "cancelling",
        Ok(BatchState::Cancelled) => "cancelled",
        Ok(BatchState::Expired) => "expired",
        // Never returned by the router (a batch is IN_PROGRESS once created).
        Ok(BatchState::Unspecified) | Err(_) => "validating",
    }
}

fn seconds(time: Option<&prost_types::Timestamp>) -> Option<i64> {
    time.map(|t| t.seconds)
}

/// Whether a batch state is terminal.
fn ended(state: i32) -> bool {
    matches!(
        BatchState::try_from(state),
        Ok(BatchState::Completed | BatchState::Cancelled | BatchState::Expired)
    )
}

/// Weir's batch as OpenAI's batch object.
pub fn batch_object(batch: &Batch) -> BatchObject {
    let counts = batch.counts.unwrap_or_default();
    let completed = counts.succeeded;
    let failed = counts.failed + counts.cancelled;
    let terminal = ended(batch.state);
    let end = seconds(batch.end_time.as_ref());
    let at = |wanted: BatchState| (batch.state == wanted as i32).then_some(end).flatten();
    let created_at = seconds(batch.create_time.as_ref()).unwrap_or(0);
    let metadata: BTreeMap<String, String> = batch
        .labels
        .iter()
        .filter(|(key, _)| key.as_str() != INPUT_FILE_LABEL && key.as_str() != WINDOW_LABEL)
        .map(|(key, value)| (key.clone(), value.clone()))
        .collect();
    BatchObject {
        id: batch.id.clone(),
        object: "batch".to_string(),
        endpoint: CHAT_COMPLETIONS_URL.to_string(),
        errors: None,
        input_file_id: batch
            .labels
            .get(INPUT_FILE_LABEL)
            .cloned()
            .unwrap_or_default(),
        completion_window: batch
            .labels
            .get(WINDOW_LABEL)
            .cloned()
            .unwrap_or_else(|| "24h".to_string()),
        status: status(batch.state).to_string(),
        // As OpenAI's: set once the batch has ended, and only for a file with lines.
        output_file_id: (terminal && completed > 0).then(|| files::output_file_id(&batch.id)),
        error_file_id: (terminal && failed > 0).then(|| files::error_file_id(&batch.id)),
        created_at,
        in_progress_at: Some(
            seconds(batch.not_before.as_ref()).map_or(created_at, |t| t.max(created_at)),
        ),
        expires_at: seconds(batch.expire_time.as_ref()),
        finalizing_at: None,
        completed_at: at(BatchState::Completed),
        failed_at: None,
        expired_at: at(BatchState::Expired),
        cancelling_at: None,
        cancelled_at: at(BatchState::Cancelled),
        request_counts: RequestCounts {
            total: counts.total,
            completed,
            failed,
        },
        metadata: (!metadata.is_empty()).then_some(metadata),
    }
}

fn respond(result: Result<Response, OpenAiError>) -> Response {
    result.unwrap_or_else(IntoResponse::into_response)
}

fn grpc_error(status: &Status) -> OpenAiError {
    errors::from_status(status)
}

/// The body of `POST /v1/batches`.
#[derive(Debug, Deserialize)]
struct CreateBody {
    input_file_id: String,
    endpoint: String,
    completion_window: Option<String>,
    metadata: Option<HashMap<String, String>>,
}

/// `POST /v1/batches`.
pub(super) async fn create(
    State(edge): State<Edge>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    respond(create_batch(edge, headers, body).await)
}

async fn create_batch(
    edge: Edge,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, OpenAiError> {
    let tenant = edge.tenant(&headers, "/v1/batches")?;
    let body = body.map_err(|rejection| {
        let mut error = OpenAiError::invalid_request(None, rejection.body_text());
        error.status = rejection.status().as_u16();
        error
    })?;
    let body: CreateBody = serde_json::from_slice(&body).map_err(|error| {
        OpenAiError::invalid_request(None, format!("the body is not a batch request: {error}"))
    })?;
    if body.endpoint != CHAT_COMPLETIONS_URL {
        return Err(OpenAiError::invalid_request(
            Some("endpoint"),
            format!(
                "endpoint {:?} is not supported: Weir batches run {CHAT_COMPLETIONS_URL}",
                body.endpoint
            ),
        ));
    }
    let window_text = body.completion_window.unwrap_or_else(|| "24h".to_string());
    let window =
        humantime_serde::re::humantime::parse_duration(window_text.trim()).map_err(|error| {
            OpenAiError::invalid_request(
                Some("completion_window"),
                format!(
                    "completion_window {window_text:?} is not a duration such as \"24h\": {error}"
                ),
            )
        })?;
    let metadata = body.metadata.unwrap_or_default();
    if metadata.len() > MAX_METADATA {
        return Err(OpenAiError::invalid_request(
            Some("metadata"),
            format!(
                "at most {MAX_METADATA} metadata pairs, got {}",
                metadata.len()
            ),
        ));
    }
    if let Some(key) = metadata
        .keys()
        .find(|key| key.as_str() == INPUT_FILE_LABEL || key.as_str() == WINDOW_LABEL)
    {
        return Err(OpenAiError::invalid_request(
            Some("metadata"),
            format!("metadata key {key:?} is reserved by Weir"),
        ));
    }
    let file = files::load(&edge, &tenant, &body.input_file_id)
        .await
        .map_err(|mut error| {
            error.body.error.param = Some("input_file_id".to_string());
            error
        })?;
    let text = String::from_utf8_lossy(&file.content);
    let input = batch_input::parse(&text).map_err(|invalid| {
        OpenAiError::invalid_request(Some("input_file_id"), invalid.to_string())
    })?;
    let mut labels = metadata;
    labels.insert(INPUT_FILE_LABEL.to_string(), body.input_file_id.clone());
    labels.insert(WINDOW_LABEL.to_string(), window_text.trim().to_string());
    let message = CreateBatchRequest {
        items: input.items,
        completion_window: Some(prost_types::Duration {
            seconds: i64::try_from(window.as_secs()).unwrap_or(i64::MAX),
            nanos: i32::try_from(window.subsec_nanos()).unwrap_or(0),
        }),
        request_id: header_text(&headers, IDEMPOTENCY_KEY)?,
        labels,
        ..CreateBatchRequest::default()
    };
    let mut router = edge.router.clone();
    let batch = router
        .create_batch(grpc_request(&headers, message)?)
        .await
        .map_err(|status| grpc_error(&status))?
        .into_inner()
        .batch
        .unwrap_or_default();
    Ok(json(StatusCode::OK, &batch_object(&batch)))
}

/// `GET /v1/batches/{id}`.
pub(super) async fn retrieve(
    State(edge): State<Edge>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    respond(
        get_batch(&edge, &headers, &id)
            .await
            .map(|batch| json(StatusCode::OK, &batch_object(&batch))),
    )
}

async fn get_batch(edge: &Edge, headers: &HeaderMap, id: &str) -> Result<Batch, OpenAiError> {
    let mut router = edge.router.clone();
    let request = GetBatchRequest {
        batch_id: id.to_string(),
    };
    Ok(router
        .get_batch(grpc_request(headers, request)?)
        .await
        .map_err(|status| grpc_error(&status))?
        .into_inner()
        .batch
        .unwrap_or_default())
}

/// `POST /v1/batches/{id}/cancel`.
pub(super) async fn cancel(
    State(edge): State<Edge>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    respond(cancel_batch(edge, headers, id).await)
}

async fn cancel_batch(edge: Edge, headers: HeaderMap, id: String) -> Result<Response, OpenAiError> {
    let mut router = edge.router.clone();
    let batch = router
        .cancel_batch(grpc_request(&headers, CancelBatchRequest { batch_id: id })?)
        .await
        .map_err(|status| grpc_error(&status))?
        .into_inner()
        .batch
        .unwrap_or_default();
    Ok(json(StatusCode::OK, &batch_object(&batch)))
}

/// `GET /v1/batches` query.
#[derive(Debug, Default, Deserialize)]
pub struct ListQuery {
    /// Most batches (default 20, 1 to 100).
    limit: Option<usize>,
    /// Only batches after (older than) this one.
    after: Option<String>,
}

#[derive(Debug, Serialize)]
struct BatchList {
    object: &'static str,
    data: Vec<BatchObject>,
    first_id: Option<String>,
    last_id: Option<String>,
    has_more: bool,
}

/// `GET /v1/batches`: newest first. `after` is a batch id, as OpenAI's cursor is; Weir's pages
/// are read from the newest until it is passed.
pub(super) async fn list(
    State(edge): State<Edge>,
    headers: HeaderMap,
    query: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    respond(list_batches(edge, headers, query).await)
}

async fn list_batches(
    edge: Edge,
    headers: HeaderMap,
    query: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, OpenAiError> {
    let Query(query) =
        query.map_err(|rejection| OpenAiError::invalid_request(None, rejection.body_text()))?;
    let limit = query.limit.unwrap_or(20);
    if !(1..=100).contains(&limit) {
        return Err(OpenAiError::invalid_request(
            Some("limit"),
            "limit must be 1 to 100",
        ));
    }
    let mut router = edge.router.clone();
    let mut passed = query.after.is_none();
    let mut data = Vec::new();
    let mut token = String::new();
    let has_more = loop {
        let request = ListBatchesRequest {
            page_size: LIST_PAGE,
            page_token: token,
        };
        let page = router
            .list_batches(grpc_request(&headers, request)?)
            .await
            .map_err(|status| grpc_error(&status))?
            .into_inner();
        let mut more = false;
        for batch in &page.batches {
            if !passed {
                passed = query.after.as_deref() == Some(batch.id.as_str());
                continue;
            }
            if data.len() == limit {
                more = true;
                break;
            }
            data.push(batch_object(batch));
        }
        if more {
            break true;
        }
        if page.next_page_token.is_empty() {
            break false;
        }
        token = page.next_page_token;
    };
    Ok(json(
        StatusCode::OK,
        &BatchList {
            object: "list",
            first_id: data.first().map(|batch| batch.id.clone()),
            last_id: data.last().map(|batch| batch.id.clone()),
            data,
            has_more,
        },
    ))
}

/// The position of a result's item in the input file: its job id is `<batch id>-<n>`.
fn item_index(result: &StreamBatchResultsResponse) -> u64 {
    result
        .job_id
        .rsplit('-')
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or(u64::MAX)
}

/// A batch's output or error file (`id`): its object and content, made from the batch's results
/// in input order. 404 until the batch has ended, and for a file without lines (whose id the
/// batch object does not give).
pub(super) async fn result_file(
    edge: &Edge,
    headers: &HeaderMap,
    batch_id: &str,
    kind: ResultFile,
    id: &str,
) -> Result<(FileObject, Vec<u8>), OpenAiError> {
    let batch = match get_batch(edge, headers, batch_id).await {
        Ok(batch) => batch,
        Err(error) if error.status == 404 => return Err(files::no_file(id)),
        Err(error) => return Err(error),
    };
    let object = batch_object(&batch);
    let listed = match kind {
        ResultFile::Output => object.output_file_id.as_deref(),
        ResultFile::Errors => object.error_file_id.as_deref(),
    };
    if listed != Some(id) {
        return Err(files::no_file(id));
    }
    let mut router = edge.router.clone();
    let request = StreamBatchResultsRequest {
        batch_id: batch_id.to_string(),
        follow: false,
    };
    let mut stream = router
        .stream_batch_results(grpc_request(headers, request)?)
        .await
        .map_err(|status| grpc_error(&status))?
        .into_inner();
    let mut results = Vec::new();
    while let Some(result) = stream
        .message()
        .await
        .map_err(|status| grpc_error(&status))?
    {
        results.push(result);
    }
    results.sort_by_key(item_index);
    let created = object
        .completed_at
        .or(object.expired_at)
        .or(object.cancelled_at)
        .unwrap_or(object.created_at);
    let mut content = Vec::new();
    for result in &results {
        let line = batch_output::line(result, created).map_err(|error| {
            grpc_error(&Status::new(
                Code::Internal,
                format!("a result line: {error}"),
            ))
        })?;
        let text = match (kind, line) {
            (ResultFile::Output, Line::Output(text)) | (ResultFile::Errors, Line::Error(text)) => {
                text
            }
            _ => continue,
        };
        content.extend_from_slice(text.as_bytes());
        content.push(b'\n');
    }
    let suffix = match kind {
        ResultFile::Output => "output",
        ResultFile::Errors => "errors",
    };
    let file = FileObject {
        id: id.to_string(),
        object: "file".to_string(),
        bytes: u64::try_from(content.len()).unwrap_or(u64::MAX),
        created_at: created,
        expires_at: None,
        filename: format!("{batch_id}_{suffix}.jsonl"),
        purpose: BATCH_OUTPUT_PURPOSE.to_string(),
        status: "processed".to_string(),
    };
    Ok((file, content))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use weir_proto::router::BatchCounts;

    use super::*;

    fn time(seconds: i64) -> Option<prost_types::Timestamp> {
        Some(prost_types::Timestamp { seconds, nanos: 0 })
    }

    fn batch(state: BatchState, counts: (i64, i64, i64)) -> Batch {
        let (succeeded, failed, cancelled) = counts;
        let ended = matches!(
            state,
            BatchState::Completed | BatchState::Cancelled | BatchState::Expired
        );
        Batch {
            id: "batch-7".to_string(),
            state: state as i32,
            counts: Some(BatchCounts {
                total: 10,
                succeeded,
                failed,
                cancelled,
                pending: 10 - succeeded - failed - cancelled,
            }),
            create_time: time(1_000),
            expire_time: time(1_000 + 86_400),
            end_time: if ended { time(2_000) } else { None },
            labels: HashMap::from([
                (INPUT_FILE_LABEL.to_string(), "file-abc".to_string()),
                (WINDOW_LABEL.to_string(), "24h".to_string()),
                ("team".to_string(), "search".to_string()),
            ]),
            ..Batch::default()
        }
    }

    #[test]
    fn every_state_has_its_status_times_and_files() {
        // (state, counts, status, output file, error file, completed/expired/cancelled at)
        let cases = [
            (
                BatchState::InProgress,
                (3, 1, 0),
                "in_progress",
                false,
                false,
                [None, None, None],
            ),
            (
                BatchState::Cancelling,
                (3, 1, 2),
                "cancelling",
                false,
                false,
                [None, None, None],
            ),
            (
                BatchState::Completed,
                (9, 1, 0),
                "completed",
                true,
                true,
                [Some(2_000), None, None],
            ),
            (
                BatchState::Completed,
                (10, 0, 0),
                "completed",
                true,
                false,
                [Some(2_000), None, None],
            ),
            (
                BatchState::Cancelled,
                (0, 0, 10),
                "cancelled",
                false,
                true,
                [None, None, Some(2_000)],
            ),
            (
                BatchState::Expired,
                (4, 0, 6),
                "expired",
                true,
                true,
                [None, Some(2_000), None],
            ),
            (
                BatchState::Unspecified,
                (0, 0, 0),
                "validating",
                false,
                false,
                [None, None, None],
            ),
        ];
        for (state, counts, name, output, errors, [completed, expired, cancelled]) in cases {
            let object = batch_object(&batch(state, counts));
            assert_eq!(object.status, name, "{state:?}");
            assert_eq!(object.object, "batch");
            assert_eq!(object.id, "batch-7");
            assert_eq!(object.endpoint, "/v1/chat/completions");
            assert_eq!(object.input_file_id, "file-abc");
            assert_eq!(object.completion_window, "24h");
            assert_eq!(
                object.output_file_id.as_deref(),
                output.then_some("file-batch-7-output"),
                "{state:?}"
            );
            assert_eq!(
                object.error_file_id.as_deref(),
                errors.then_some("file-batch-7-errors"),
                "{state:?}"
            );
            assert_eq!(object.created_at, 1_000);
            assert_eq!(object.in_progress_at, Some(1_000));
            assert_eq!(object.expires_at, Some(87_400));
            assert_eq!(object.completed_at, completed, "{state:?}");
            assert_eq!(object.expired_at, expired, "{state:?}");
            assert_eq!(object.cancelled_at, cancelled, "{state:?}");
            assert_eq!(object.failed_at, None);
            assert_eq!(object.finalizing_at, None);
            assert_eq!(
                object.request_counts,
                RequestCounts {
                    total: 10,
                    completed: counts.0,
                    failed: counts.1 + counts.2,
                }
            );
            assert_eq!(
                object.metadata,
                Some(BTreeMap::from([("team".to_string(), "search".to_string())])),
                "reserved labels are not metadata"
            );
        }
    }

    #[test]
    fn a_batch_without_metadata_or_a_later_start_maps_to_nulls_and_not_before() {
        let mut weir = batch(BatchState::InProgress, (0, 0, 0));
        weir.labels.remove("team");
        weir.not_before = time(5_000);
        let object = batch_object(&weir);
        assert_eq!(object.metadata, None);
        assert_eq!(object.in_progress_at, Some(5_000));
        let json = serde_json::to_value(&object).unwrap();
        assert_eq!(json["output_file_id"], serde_json::Value::Null);
        assert_eq!(json["request_counts"]["total"], 10);
    }

    #[test]
    fn results_sort_by_their_place_in_the_input() {
        let result = |job: &str| StreamBatchResultsResponse {
            job_id: job.to_string(),
            ..StreamBatchResultsResponse::default()
        };
        let mut results = [
            result("batch-ab-10"),
            result("batch-ab-2"),
            result("batch-ab-0"),
        ];
        results.sort_by_key(item_index);
        let order: Vec<&str> = results.iter().map(|r| r.job_id.as_str()).collect();
        assert_eq!(order, ["batch-ab-0", "batch-ab-2", "batch-ab-10"]);
    }
}
