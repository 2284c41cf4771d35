//! Idempotency records in the process (the `weir up` default): lost on restart, never shared.

use std::{
    collections::HashMap,
    sync::{Mutex, PoisonError},
    time::Duration,
};

use tokio::time::Instant;

use super::Record;

/// Records by key, each with its owner's token and its expiry.
#[derive(Debug, Default)]
pub(super) struct MemoryStore {
    records: Mutex<HashMap<String, Entry>>,
}

#[derive(Debug)]
struct Entry {
    record: Record,
    token: String,
    expires: Instant,
}

impl MemoryStore {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Entry>> {
        self.records.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Claims `key` (`None`), or returns the live record that holds it.
    pub(super) fn try_claim(
        &self,
        key: &str,
        token: &str,
        fingerprint: &str,
        lease: Duration,
    ) -> Option<Record> {
        let now = Instant::now();
        let mut records = self.lock();
        // Expired records are dropped as they are met, and all of them now and then, so the map
        // only holds live records plus those of the last sweep interval.
        if records.len() % 1024 == 1023 {
            records.retain(|_, entry| entry.expires > now);
        }
        if let Some(entry) = records.get(key)
            && entry.expires > now
        {
            return Some(entry.record.clone());
        }
        records.insert(
            key.to_string(),
            Entry {
                record: Record {
                    done: false,
                    fingerprint: fingerprint.to_string(),
                    answer: Vec::new(),
                },
                token: token.to_string(),
                expires: now + lease,
            },
        );
        None
    }

    /// Stores the answer if `token` still owns `key`.
    pub(super) fn complete(
        &self,
        key: &str,
        token: &str,
        answer: &[u8],
        retention: Duration,
    ) -> bool {
        let mut records = self.lock();
        match records.get_mut(key) {
            Some(entry) if entry.token == token && !entry.record.done => {
                entry.record.done = true;
                entry.record.answer = answer.to_vec();
                entry.expires = Instant::now() + retention;
                true
            }
            _ => false,
        }
    }

    /// Deletes the in-progress record of `key` if `token` owns it.
    pub(super) fn release(&self, key: &str, token: &str) {
        let mut records = self.lock();
        if records
            .get(key)
            .is_some_and(|entry| entry.token == token && !entry.record.done)
        {
            records.remove(key);
        }
    }
}
