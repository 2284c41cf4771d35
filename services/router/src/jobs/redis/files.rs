//! Uploaded files on Redis (keys in [`crate::jobs::files`]): one hash per file with the ttl as
//! its expiry, and the tenant's index of ids by upload time. A file is written once and never
//! changed, so plain commands in a MULTI suffice (no script).

use weir_mesh::{store::KeySpace, tenant::Tenant};

use super::RedisJobs;
use crate::jobs::{
    JobsError,
    files::{FileMeta, StoredFile},
};

/// The index entries one `list_files` reads.
const LIST_LIMIT: isize = 10_000;

impl RedisJobs {
    fn file_key(&self, tenant: &Tenant, id: &str) -> String {
        KeySpace::new(&self.prefix, tenant, "file").key(id)
    }

    fn file_index(&self, tenant: &Tenant) -> String {
        KeySpace::new(&self.prefix, tenant, "file").key("_index")
    }

    pub(in crate::jobs) async fn put_file(
        &self,
        tenant: &Tenant,
        file: StoredFile,
        now_ms: i64,
    ) -> Result<(), JobsError> {
        let meta = serde_json::to_string(&file.meta)
            .map_err(|error| JobsError::Corrupt(error.to_string()))?;
        let ttl_ms = (file.meta.expires_ms - now_ms).max(1);
        let key = self.file_key(tenant, &file.meta.id);
        let index = self.file_index(tenant);
        let mut conn = self.conn.clone();
        let _: () = redis::pipe()
            .atomic()
            .hset(&key, "meta", meta)
            .ignore()
            .hset(&key, "content", file.content)
            .ignore()
            .cmd("PEXPIRE")
            .arg(&key)
            .arg(ttl_ms)
            .ignore()
            .zadd(&index, &file.meta.id, file.meta.created_ms)
            .ignore()
            // The index lives as long as its newest file: NX gives a new index its expiry, GT
            // extends an existing one.
            .cmd("PEXPIRE")
            .arg(&index)
            .arg(ttl_ms)
            .arg("NX")
            .ignore()
            .cmd("PEXPIRE")
            .arg(&index)
            .arg(ttl_ms)
            .arg("GT")
            .ignore()
            .query_async(&mut conn)
            .await?;
        Ok(())
    }

    pub(in crate::jobs) async fn get_file(
        &self,
        tenant: &Tenant,
        id: &str,
        _now_ms: i64,
    ) -> Result<Option<StoredFile>, JobsError> {
        let mut conn = self.conn.clone();
        let (meta, content): (Option<String>, Option<Vec<u8>>) = redis::cmd("HMGET")
            .arg(self.file_key(tenant, id))
            .arg("meta")
            .arg("content")
            .query_async(&mut conn)
            .await?;
        let (Some(meta), Some(content)) = (meta, content) else {
            return Ok(None);
        };
        Ok(Some(StoredFile {
            meta: parse_meta(&meta)?,
            content,
        }))
    }

    pub(in crate::jobs) async fn list_files(
        &self,
        tenant: &Tenant,
        _now_ms: i64,
    ) -> Result<Vec<FileMeta>, JobsError> {
        let index = self.file_index(tenant);
        let mut conn = self.conn.clone();
        let ids: Vec<String> = redis::cmd("ZRANGE")
            .arg(&index)
            .arg(0)
            .arg(LIST_LIMIT - 1)
            .arg("REV")
            .query_async(&mut conn)
            .await?;
        let mut files = Vec::with_capacity(ids.len());
        for id in ids {
            let meta: Option<String> = redis::cmd("HGET")
                .arg(self.file_key(tenant, &id))
                .arg("meta")
                .query_async(&mut conn)
                .await?;
            match meta {
                Some(meta) => files.push(parse_meta(&meta)?),
                None => {
                    // Expired (or deleted): drop it from the index too.
                    let _: i64 = redis::cmd("ZREM")
                        .arg(&index)
                        .arg(&id)
                        .query_async(&mut conn)
                        .await?;
                }
            }
        }
        Ok(files)
    }

    pub(in crate::jobs) async fn delete_file(
        &self,
        tenant: &Tenant,
        id: &str,
        _now_ms: i64,
    ) -> Result<bool, JobsError> {
        let mut conn = self.conn.clone();
        let (deleted, _): (i64, i64) = redis::pipe()
            .atomic()
            .del(self.file_key(tenant, id))
            .zrem(self.file_index(tenant), id)
            .query_async(&mut conn)
            .await?;
        Ok(deleted > 0)
    }
}

fn parse_meta(meta: &str) -> Result<FileMeta, JobsError> {
    serde_json::from_str(meta).map_err(|error| JobsError::Corrupt(format!("file meta: {error}")))
}
