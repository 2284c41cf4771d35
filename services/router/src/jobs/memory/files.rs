//! Uploaded files in memory (see [`crate::jobs::files`]): under the store's one lock, dropped
//! when read after they expire.

use weir_mesh::tenant::Tenant;

use super::MemoryJobs;
use crate::jobs::{
    JobsError,
    files::{FileMeta, StoredFile},
};

impl MemoryJobs {
    pub(in crate::jobs) async fn put_file(
        &self,
        tenant: &Tenant,
        file: StoredFile,
        _now_ms: i64,
    ) -> Result<(), JobsError> {
        let mut state = self.lock()?;
        state
            .files
            .insert((tenant.clone(), file.meta.id.clone()), file);
        Ok(())
    }

    pub(in crate::jobs) async fn get_file(
        &self,
        tenant: &Tenant,
        id: &str,
        now_ms: i64,
    ) -> Result<Option<StoredFile>, JobsError> {
        let mut state = self.lock()?;
        let key = (tenant.clone(), id.to_string());
        match state.files.get(&key) {
            Some(file) if file.meta.expires_ms <= now_ms => {
                state.files.remove(&key);
                Ok(None)
            }
            found => Ok(found.cloned()),
        }
    }

    pub(in crate::jobs) async fn list_files(
        &self,
        tenant: &Tenant,
        now_ms: i64,
    ) -> Result<Vec<FileMeta>, JobsError> {
        let mut state = self.lock()?;
        state.files.retain(|_, file| file.meta.expires_ms > now_ms);
        let mut files: Vec<FileMeta> = state
            .files
            .iter()
            .filter(|((owner, _), _)| owner == tenant)
            .map(|(_, file)| file.meta.clone())
            .collect();
        files.sort_by(|a, b| (b.created_ms, &b.id).cmp(&(a.created_ms, &a.id)));
        Ok(files)
    }

    pub(in crate::jobs) async fn delete_file(
        &self,
        tenant: &Tenant,
        id: &str,
        now_ms: i64,
    ) -> Result<bool, JobsError> {
        let mut state = self.lock()?;
        let removed = state.files.remove(&(tenant.clone(), id.to_string()));
        Ok(removed.is_some_and(|file| file.meta.expires_ms > now_ms))
    }
}
