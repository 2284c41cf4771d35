//! OpenAI's Files API on the HTTP edge, for batch input files (docs/http-edge.md, "Files and
//! batches").
//!
//! | HTTP | What it does |
//! |---|---|
//! | `POST /v1/files` (multipart: `file`, `purpose=batch`) | checks the JSONL with [`batch_input::parse`] and stores it |
//! | `GET /v1/files` | the tenant's uploaded files, newest first |
//! | `GET /v1/files/{id}` | one file's object |
//! | `GET /v1/files/{id}/content` | its bytes; for a batch's output or error file, its results |
//! | `DELETE /v1/files/{id}` | deletes an uploaded file |
//!
//! Uploaded files are kept in the router's job store ([`crate::jobs::files`]), as the tenant's
//! that the `Authorization` key names (checked by the same `Authenticator` as the router's), so
//! another tenant's id is 404. A batch's output and error files are not stored: their ids name the
//! batch ([`output_file_id`], [`error_file_id`]) and their content is made from the batch's
//! results when read ([`super::batches::result_file`]).

use axum::{
    body::Bytes,
    extract::{FromRequest, Path, Query, Request, State, rejection::BytesRejection},
    http::{HeaderMap, StatusCode, header},
    response::{IntoResponse, Response},
};
use prost::Message as _;
use serde::{Deserialize, Serialize};
use tonic::{Code, Status};
use weir_mesh::{ApiError, tenant::Tenant};
use weir_proto::router::CreateBatchRequest;

use super::{
    batch_input,
    edge::{Edge, json},
    errors::{self, OpenAiError},
};
use crate::jobs::{
    JOBS_DISABLED, JobStore,
    files::{FileMeta, StoredFile},
    now_ms,
};

/// Most bytes the items of one file may take as a `CreateBatch` message: the router's gRPC server
/// decodes at most [`crate::MAX_MESSAGE_BYTES`] (64 MiB) per message, less room for the labels
/// and options.
pub const MAX_BATCH_ITEMS_BYTES: usize = crate::MAX_MESSAGE_BYTES - 64 * 1024;

/// The only `purpose` accepted.
pub const BATCH_PURPOSE: &str = "batch";
/// The `purpose` of a batch's output and error files, as OpenAI names it.
pub const BATCH_OUTPUT_PURPOSE: &str = "batch_output";

/// The id of a batch's output file: `file-<batch id>-output`.
pub fn output_file_id(batch_id: &str) -> String {
    format!("file-{batch_id}-output")
}

/// The id of a batch's error file: `file-<batch id>-errors`.
pub fn error_file_id(batch_id: &str) -> String {
    format!("file-{batch_id}-errors")
}

/// Which of a batch's result files an id names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResultFile {
    /// The succeeded items.
    Output,
    /// Every other item.
    Errors,
}

/// The batch and file kind a derived id names, None for an uploaded file's id.
pub fn result_file(id: &str) -> Option<(&str, ResultFile)> {
    let rest = id.strip_prefix("file-")?;
    if !rest.starts_with("batch-") {
        return None;
    }
    if let Some(batch) = rest.strip_suffix("-output") {
        return Some((batch, ResultFile::Output));
    }
    rest.strip_suffix("-errors")
        .map(|batch| (batch, ResultFile::Errors))
}

/// OpenAI's file object.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileObject {
    /// The id.
    pub id: String,
    /// Always `file`.
    pub object: String,
    /// Size in bytes.
    pub bytes: u64,
    /// Upload time, Unix seconds.
    pub created_at: i64,
    /// When it is dropped, Unix seconds (None: with its batch).
    pub expires_at: Option<i64>,
    /// The name it was uploaded with.
    pub filename: String,
    /// `batch` (uploaded) or `batch_output` (a batch's results).
    pub purpose: String,
    /// Always `processed`: a file is checked when uploaded.
    pub status: String,
}

impl FileObject {
    /// The object of an uploaded file.
    pub fn of(meta: &FileMeta) -> Self {
        Self {
            id: meta.id.clone(),
            object: "file".to_string(),
            bytes: meta.bytes,
            created_at: meta.created_ms.div_euclid(1000),
            expires_at: Some(meta.expires_ms.div_euclid(1000)),
            filename: meta.filename.clone(),
            purpose: meta.purpose.clone(),
            status: "processed".to_string(),
        }
    }
}

#[derive(Debug, Serialize)]
struct FileList {
    object: &'static str,
    data: Vec<FileObject>,
    first_id: Option<String>,
    last_id: Option<String>,
    has_more: bool,
}

#[derive(Debug, Serialize)]
struct Deleted {
    id: String,
    object: &'static str,
    deleted: bool,
}

/// `GET /v1/files` query.
#[derive(Debug, Default, Deserialize)]
pub struct ListQuery {
    /// Only files of this purpose.
    purpose: Option<String>,
    /// Most files (default and cap 10,000).
    limit: Option<usize>,
    /// Only files after this id (in the list's order).
    after: Option<String>,
    /// `desc` (newest first, the default) or `asc`.
    order: Option<String>,
}

/// The job store, or 422 JOBS_DISABLED (files live with the jobs).
pub(super) fn store(edge: &Edge) -> Result<&JobStore, OpenAiError> {
    edge.files.as_ref().ok_or_else(|| {
        errors::from_status(&Status::from(ApiError::new(
            Code::FailedPrecondition,
            JOBS_DISABLED,
            "files and batches need the router's jobs ([router.jobs] enabled = true)",
        )))
    })
}

fn store_error(error: crate::jobs::JobsError) -> OpenAiError {
    errors::from_status(&Status::from(ApiError::from(error)))
}

/// 404 for a file id the tenant does not have.
pub(super) fn no_file(id: &str) -> OpenAiError {
    errors::from_status(&Status::from(ApiError::not_found("file", id)))
}

/// The tenant's uploaded file, or 404.
pub(super) async fn load(
    edge: &Edge,
    tenant: &Tenant,
    id: &str,
) -> Result<StoredFile, OpenAiError> {
    store(edge)?
        .get_file(tenant, id)
        .await
        .map_err(store_error)?
        .ok_or_else(|| no_file(id))
}

fn respond(result: Result<Response, OpenAiError>) -> Response {
    result.unwrap_or_else(IntoResponse::into_response)
}

/// `POST /v1/files`. The key is checked before the body is read, so a caller without one cannot
/// make the edge read `max_file_bytes`.
pub(super) async fn upload(State(edge): State<Edge>, request: Request) -> Response {
    let headers = request.headers().clone();
    let tenant = match edge.tenant(&headers, "/v1/files") {
        Ok(tenant) => tenant,
        Err(error) => return error.into_response(),
    };
    let body = Bytes::from_request(request, &edge).await;
    respond(upload_file(edge, tenant, headers, body).await)
}

async fn upload_file(
    edge: Edge,
    tenant: Tenant,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, OpenAiError> {
    let store = store(&edge)?.clone();
    let body = body.map_err(|rejection| too_large(&edge, rejection))?;
    let boundary = headers
        .get(header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .and_then(boundary)
        .ok_or_else(|| {
            OpenAiError::invalid_request(
                None,
                "POST /v1/files takes multipart/form-data with the fields file and purpose",
            )
        })?;
    let parts = multipart(&body, &boundary)
        .ok_or_else(|| OpenAiError::invalid_request(None, "the multipart body is malformed"))?;
    let purpose = parts
        .iter()
        .find(|part| part.name == "purpose")
        .map(|part| String::from_utf8_lossy(part.content).trim().to_string())
        .ok_or_else(|| OpenAiError::invalid_request(Some("purpose"), "purpose is required"))?;
    if purpose != BATCH_PURPOSE {
        return Err(OpenAiError::invalid_request(
            Some("purpose"),
            format!(
                "purpose {purpose:?} is not supported: Weir stores batch input files only (purpose \"batch\")"
            ),
        ));
    }
    let file = parts
        .iter()
        .find(|part| part.name == "file")
        .ok_or_else(|| OpenAiError::invalid_request(Some("file"), "file is required"))?;
    if file.content.len() > edge.config.max_file_bytes {
        return Err(over_cap(&edge));
    }
    let text = std::str::from_utf8(file.content).map_err(|error| {
        OpenAiError::invalid_request(Some("file"), format!("the file is not UTF-8 text: {error}"))
    })?;
    // Checked now, so a bad line is named at upload, not when a batch is created from the file.
    let input = batch_input::parse(text)
        .map_err(|invalid| OpenAiError::invalid_request(Some("file"), invalid.to_string()))?;
    let encoded = CreateBatchRequest {
        items: input.items,
        ..CreateBatchRequest::default()
    }
    .encoded_len();
    if encoded > MAX_BATCH_ITEMS_BYTES {
        let mut error = OpenAiError::invalid_request(
            Some("file"),
            format!(
                "the file's requests take {encoded} bytes as one CreateBatch call; the router \
                 takes at most {MAX_BATCH_ITEMS_BYTES} (its gRPC message limit): split the file"
            ),
        );
        error.status = 413;
        return Err(error);
    }
    let now = now_ms();
    let retention = i64::try_from(edge.config.file_retention.as_millis()).unwrap_or(i64::MAX);
    let meta = FileMeta {
        id: format!("file-{}", uuid::Uuid::new_v4().simple()),
        filename: file
            .filename
            .clone()
            .unwrap_or_else(|| "input.jsonl".to_string()),
        purpose,
        bytes: u64::try_from(file.content.len()).unwrap_or(u64::MAX),
        created_ms: now,
        expires_ms: now.saturating_add(retention),
    };
    let object = FileObject::of(&meta);
    store
        .put_file(
            &tenant,
            StoredFile {
                meta,
                content: file.content.to_vec(),
            },
        )
        .await
        .map_err(store_error)?;
    tracing::info!(%tenant, file = object.id, bytes = object.bytes, "file uploaded");
    Ok(json(StatusCode::OK, &object))
}

fn over_cap(edge: &Edge) -> OpenAiError {
    let mut error = OpenAiError::invalid_request(
        Some("file"),
        format!(
            "the file is larger than {} bytes ([router.http] max_file_bytes): split it",
            edge.config.max_file_bytes
        ),
    );
    error.status = 413;
    error
}

fn too_large(edge: &Edge, rejection: BytesRejection) -> OpenAiError {
    if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
        return over_cap(edge);
    }
    let mut error = OpenAiError::invalid_request(None, rejection.body_text());
    error.status = rejection.status().as_u16();
    error
}

/// `GET /v1/files`.
pub(super) async fn list(
    State(edge): State<Edge>,
    headers: HeaderMap,
    query: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    respond(list_files(edge, headers, query).await)
}

async fn list_files(
    edge: Edge,
    headers: HeaderMap,
    query: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, OpenAiError> {
    let tenant = edge.tenant(&headers, "/v1/files")?;
    let Query(query) =
        query.map_err(|rejection| OpenAiError::invalid_request(None, rejection.body_text()))?;
    let mut files = store(&edge)?
        .list_files(&tenant)
        .await
        .map_err(store_error)?;
    if let Some(purpose) = &query.purpose {
        files.retain(|file| &file.purpose == purpose);
    }
    match query.order.as_deref() {
        None | Some("desc") => {}
        Some("asc") => files.reverse(),
        Some(other) => {
            return Err(OpenAiError::invalid_request(
                Some("order"),
                format!("order must be \"asc\" or \"desc\", not {other:?}"),
            ));
        }
    }
    if let Some(after) = &query.after {
        // An unknown `after` gives an empty page, as OpenAI's does.
        let skip = files
            .iter()
            .position(|file| &file.id == after)
            .map_or(files.len(), |at| at + 1);
        files.drain(..skip);
    }
    let limit = query.limit.unwrap_or(10_000).clamp(1, 10_000);
    let has_more = files.len() > limit;
    files.truncate(limit);
    let data: Vec<FileObject> = files.iter().map(FileObject::of).collect();
    Ok(json(
        StatusCode::OK,
        &FileList {
            object: "list",
            first_id: data.first().map(|file| file.id.clone()),
            last_id: data.last().map(|file| file.id.clone()),
            data,
            has_more,
        },
    ))
}

/// `GET /v1/files/{id}`.
pub(super) async fn retrieve(
    State(edge): State<Edge>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    respond(retrieve_file(edge, headers, id).await)
}

async fn retrieve_file(
    edge: Edge,
    headers: HeaderMap,
    id: String,
) -> Result<Response, OpenAiError> {
    let tenant = edge.tenant(&headers, "/v1/files")?;
    if let Some((batch, kind)) = result_file(&id) {
        let (object, _) = super::batches::result_file(&edge, &headers, batch, kind, &id).await?;
        return Ok(json(StatusCode::OK, &object));
    }
    let file = load(&edge, &tenant, &id).await?;
    Ok(json(StatusCode::OK, &FileObject::of(&file.meta)))
}

/// `GET /v1/files/{id}/content`.
pub(super) async fn content(
    State(edge): State<Edge>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    respond(file_content(edge, headers, id).await)
}

async fn file_content(edge: Edge, headers: HeaderMap, id: String) -> Result<Response, OpenAiError> {
    let tenant = edge.tenant(&headers, "/v1/files")?;
    let content = match result_file(&id) {
        Some((batch, kind)) => {
            super::batches::result_file(&edge, &headers, batch, kind, &id)
                .await?
                .1
        }
        None => load(&edge, &tenant, &id).await?.content,
    };
    Ok((
        [(header::CONTENT_TYPE, "application/octet-stream")],
        Bytes::from(content),
    )
        .into_response())
}

/// `DELETE /v1/files/{id}`.
pub(super) async fn delete(
    State(edge): State<Edge>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    respond(delete_file(edge, headers, id).await)
}

async fn delete_file(edge: Edge, headers: HeaderMap, id: String) -> Result<Response, OpenAiError> {
    let tenant = edge.tenant(&headers, "/v1/files")?;
    if result_file(&id).is_some() {
        return Err(OpenAiError::invalid_request(
            None,
            "a batch's output and error files are made from its results and go with the batch; \
             they cannot be deleted",
        ));
    }
    let deleted = store(&edge)?
        .delete_file(&tenant, &id)
        .await
        .map_err(store_error)?;
    if !deleted {
        return Err(no_file(&id));
    }
    Ok(json(
        StatusCode::OK,
        &Deleted {
            id,
            object: "file",
            deleted: true,
        },
    ))
}

/// One part of a multipart body.
#[derive(Debug, PartialEq, Eq)]
struct Part<'a> {
    name: String,
    filename: Option<String>,
    content: &'a [u8],
}

/// The boundary of a `multipart/form-data` content type.
fn boundary(content_type: &str) -> Option<String> {
    let mut params = content_type.split(';');
    let kind = params.next()?.trim();
    if !kind.eq_ignore_ascii_case("multipart/form-data") {
        return None;
    }
    params.find_map(|param| {
        let (key, value) = param.split_once('=')?;
        key.trim()
            .eq_ignore_ascii_case("boundary")
            .then(|| value.trim().trim_matches('"').to_string())
            .filter(|boundary| !boundary.is_empty())
    })
}

fn find(haystack: &[u8], needle: &[u8], from: usize) -> Option<usize> {
    haystack
        .get(from..)?
        .windows(needle.len())
        .position(|window| window == needle)
        .map(|at| at + from)
}

/// The parts of a multipart body (RFC 7578), None when it is malformed.
fn multipart<'a>(body: &'a [u8], boundary: &str) -> Option<Vec<Part<'a>>> {
    let opening = format!("--{boundary}");
    let delimiter = format!("\r\n--{boundary}");
    let mut at = find(body, opening.as_bytes(), 0)? + opening.len();
    let mut parts = Vec::new();
    loop {
        let rest = body.get(at..)?;
        if rest.starts_with(b"--") {
            return Some(parts);
        }
        let headers_start = at + find(rest, b"\r\n", 0)? + 2;
        let headers_end = find(body, b"\r\n\r\n", headers_start)?;
        let head = std::str::from_utf8(body.get(headers_start..headers_end)?).ok()?;
        let content_start = headers_end + 4;
        let content_end = find(body, delimiter.as_bytes(), content_start)?;
        let (mut name, mut filename) = (None, None);
        for line in head.split("\r\n") {
            let Some((key, value)) = line.split_once(':') else {
                continue;
            };
            if !key.trim().eq_ignore_ascii_case("content-disposition") {
                continue;
            }
            for param in value.split(';').skip(1) {
                let Some((key, value)) = param.split_once('=') else {
                    continue;
                };
                let value = value.trim().trim_matches('"').to_string();
                match key.trim() {
                    "name" => name = Some(value),
                    "filename" => filename = Some(value),
                    _ => {}
                }
            }
        }
        parts.push(Part {
            name: name?,
            filename,
            content: body.get(content_start..content_end)?,
        });
        at = content_end + delimiter.len();
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    #[test]
    fn a_multipart_body_gives_its_parts() {
        let body = b"--XyZ\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nbatch\r\n--XyZ\r\nContent-Disposition: form-data; name=\"file\"; filename=\"in.jsonl\"\r\nContent-Type: application/jsonl\r\n\r\n{\"a\":1}\r\n{\"b\":2}\n\r\n--XyZ--\r\n";
        let boundary = boundary("multipart/form-data; boundary=\"XyZ\"").unwrap();
        let parts = multipart(body, &boundary).unwrap();
        assert_eq!(parts.len(), 2);
        assert_eq!(parts[0].name, "purpose");
        assert_eq!(parts[0].content, b"batch");
        assert_eq!(parts[1].filename.as_deref(), Some("in.jsonl"));
        assert_eq!(parts[1].content, b"{\"a\":1}\r\n{\"b\":2}\n");
        assert_eq!(boundary_of_json(), None);
        assert_eq!(multipart(b"--XyZ\r\nno end", "XyZ"), None);
    }

    fn boundary_of_json() -> Option<String> {
        boundary("application/json")
    }

    #[test]
    fn derived_ids_name_their_batch() {
        let id = output_file_id("batch-1f");
        assert_eq!(result_file(&id), Some(("batch-1f", ResultFile::Output)));
        assert_eq!(
            result_file(&error_file_id("batch-1f")),
            Some(("batch-1f", ResultFile::Errors))
        );
        assert_eq!(result_file("file-0123abcd"), None);
    }
}
