//! Uploaded files: the input files of OpenAI's Batch API (`POST /v1/files` on the HTTP edge,
//! [`crate::openai::files`]), kept where the jobs are (Redis or memory) so a batch created from
//! a file on one router replica can be read back on another.
//!
//! A file belongs to the tenant that uploaded it (every key carries the tenant, so another
//! tenant's file id is unknown), is immutable, and is dropped after `ttl` (the edge's
//! `file_retention`, 30 days by default) or when deleted. Batch output and error files are not
//! stored: the edge derives them from the batch's results when they are read.
//!
//! On Redis, in the tenant's key space (`<prefix>:{<tenant>}:file`, so a file's keys are in the
//! tenant's Redis Cluster hash slot; no script touches them with the jobs' keys):
//!
//! | Key | Type | Content |
//! |---|---|---|
//! | `<prefix>:{<tenant>}:file:<id>` | hash | `meta` (the [`FileMeta`] as JSON), `content` (the bytes); expires after the ttl |
//! | `<prefix>:{<tenant>}:file:_index` | zset | the tenant's file ids by upload time (ms); an id whose hash has expired is dropped when listed |

use serde::{Deserialize, Serialize};

/// What is known of a stored file besides its content.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileMeta {
    /// `file-<uuid>`.
    pub id: String,
    /// The name it was uploaded with.
    pub filename: String,
    /// Its purpose (`batch`).
    pub purpose: String,
    /// Its size in bytes.
    pub bytes: u64,
    /// Upload time, Unix ms.
    pub created_ms: i64,
    /// When it is dropped, Unix ms.
    pub expires_ms: i64,
}

/// A stored file: what is known of it and its content.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StoredFile {
    /// Id, name, purpose, size, times.
    pub meta: FileMeta,
    /// The bytes as uploaded.
    pub content: Vec<u8>,
}
