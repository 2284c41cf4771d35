//! Where sessions live: the [`Store`] trait and its two implementations.
//!
//! - [`RedisStore`] (`redis.rs`): the real one. Every update is one Lua script, so it is atomic
//!   across the session's keys, and any replica of the service can serve any session.
//! - [`MemoryStore`] (`memory.rs`): the same semantics in one process's memory, for `weir up`
//!   without Redis. It loses everything on restart.
//!
//! [`AnyStore`] picks one at start-up (the trait's methods return `impl Future`, which keeps the
//! futures `Send` without boxing, so the choice is an enum rather than a trait object).
//!
//! # The model every store implements
//!
//! A session has metadata, a list of *raw* turns with contiguous sequence numbers
//! `covers_through_seq + 1 ..= last_seq`, and at most one summary covering every turn up to
//! `covers_through_seq` (0 without a summary). Raw turns are only ever added at the tail (by an
//! append) and dropped at the head (by a summary commit), so a turn's content never changes once
//! it has a sequence number, and every sequence number `1..=last_seq` is always either raw or
//! covered by the summary, never both and never neither.
//!
//! - `append` checks, in this order: the session is live (not unknown, expired or deleted →
//!   [`StoreError::NotFound`]); a known `request_id` returns the first append's sequence numbers
//!   and adds nothing (the same `request_id` with other messages → [`StoreError::RequestIdReused`]);
//!   `expected_last_seq`, when set, equals `last_seq` (else [`StoreError::Aborted`]). Then it adds
//!   the turns and restarts the TTL of every key of the session together.
//! - `commit_summary` is a compare-and-swap on the summary version: it succeeds only if the
//!   session is still the same incarnation (not deleted, expired or re-created since the
//!   summarizer read it) and nobody committed another summary meanwhile. Only then are the raw
//!   turns it covers dropped. A summarizer that lost the race changes nothing.
//! - `delete` leaves a tombstone for `tombstone_ttl` and removes every other key at once; a live
//!   check refuses every later write, and `create` with the same id is refused while the
//!   tombstone lives, so nothing of the deleted session can reappear.

use std::{collections::BTreeMap, future::Future, time::Duration};

use weir_mesh::tenant::Tenant;
use weir_proto::session::Turn;

pub mod memory;
pub mod redis;

pub use memory::MemoryStore;
pub use redis::RedisStore;

/// Names one session: its tenant and id. Stores scope every key by tenant, so the same id in
/// another tenant is another session.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SessionRef {
    /// The tenant (from the `weir-tenant` metadata).
    pub tenant: Tenant,
    /// The session id (validated: letters, digits, `-`, `_`, at most 128).
    pub id: String,
}

impl SessionRef {
    /// The session `id` of `tenant`.
    pub fn new(tenant: Tenant, id: impl Into<String>) -> Self {
        Self {
            tenant,
            id: id.into(),
        }
    }
}

/// A session as stored.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SessionRecord {
    /// The end user (may be empty).
    pub user_id: String,
    /// Default model.
    pub model: String,
    /// Tokenizer family that `raw_tokens` and each turn's `token_count` are counted in (the
    /// session model's family when it was created).
    pub family: String,
    /// Caller-defined metadata.
    pub metadata: BTreeMap<String, String>,
    /// Creation time, Unix milliseconds.
    pub create_ms: i64,
    /// Time of the last append (or the creation), Unix milliseconds.
    pub update_ms: i64,
    /// Idle time before expiry, milliseconds.
    pub ttl_ms: i64,
    /// Sequence number of the last turn (0 when empty).
    pub last_seq: i64,
    /// Tokens of the raw turns (sum of their `token_count`).
    pub raw_tokens: i64,
    /// Random id of this incarnation of the session: a session deleted or expired and created
    /// again under the same id has another one, so a summary of the old one cannot commit.
    pub incarnation: String,
    /// The current summary.
    pub summary: Option<SummaryRecord>,
}

impl SessionRecord {
    /// Sequence number covered by the summary (0 without one).
    pub fn covers_through_seq(&self) -> i64 {
        self.summary.as_ref().map_or(0, |s| s.covers_through_seq)
    }

    /// Version of the summary (0 without one).
    pub fn summary_version(&self) -> i64 {
        self.summary.as_ref().map_or(0, |s| s.version)
    }

    /// Number of raw turns.
    pub fn raw_turns(&self) -> i64 {
        self.last_seq - self.covers_through_seq()
    }
}

/// A committed summary.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SummaryRecord {
    /// The text.
    pub text: String,
    /// Every turn with `seq <= covers_through_seq` is covered.
    pub covers_through_seq: i64,
    /// Incremented by every commit.
    pub version: i64,
    /// Tokens of the summary as a chat message, in `family`.
    pub token_count: i64,
    /// Family `token_count` is counted in.
    pub family: String,
    /// Commit time, Unix milliseconds.
    pub create_ms: i64,
}

/// A session to create.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NewSession {
    /// The end user (may be empty: then the session is in no user's index).
    pub user_id: String,
    /// Default model.
    pub model: String,
    /// Tokenizer family of the model.
    pub family: String,
    /// Caller-defined metadata.
    pub metadata: BTreeMap<String, String>,
    /// Idle time before expiry.
    pub ttl: Duration,
    /// Now, Unix milliseconds.
    pub now_ms: i64,
    /// Random incarnation id.
    pub incarnation: String,
}

/// Turns to append.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AppendBatch {
    /// The turns, in order, each with `message` and `create_time` set (`seq` is assigned by the
    /// store; `token_count` is not stored but counted on read, see [`fill_token_counts`]).
    pub turns: Vec<Turn>,
    /// Tokens of all the turns, per tokenizer family: one entry per family the session may have,
    /// plus [`ANY_FAMILY`] for any other. The caller does not know the session's family before
    /// the append, so the store picks the right one.
    pub token_sums: Vec<(String, i64)>,
    /// Idempotency key (empty: none).
    pub request_id: String,
    /// Fingerprint of the messages, to tell a retry from a reused `request_id`.
    pub fingerprint: String,
    /// Optimistic concurrency: append only if `last_seq` equals this.
    pub expected_last_seq: Option<i64>,
    /// Now, Unix milliseconds.
    pub now_ms: i64,
    /// How many `request_id`s the session remembers.
    pub max_request_ids: usize,
}

/// Key of [`AppendBatch::token_sums`] used for a family that has no entry of its own.
pub const ANY_FAMILY: &str = "*";

impl AppendBatch {
    /// Tokens of the turns in `family`.
    pub fn tokens_for(&self, family: &str) -> i64 {
        let find = |name: &str| {
            self.token_sums
                .iter()
                .find(|(f, _)| f == name)
                .map(|(_, n)| *n)
        };
        find(family).or_else(|| find(ANY_FAMILY)).unwrap_or(0)
    }

    /// A batch of `turns` with token sums for `families` (and [`ANY_FAMILY`], counted as an
    /// unknown family is).
    pub fn count(turns: Vec<Turn>, families: &[String]) -> Self {
        let sum = |family: &str| -> i64 {
            turns
                .iter()
                .filter_map(|t| t.message.as_ref())
                .map(|m| i64::from(weir_mesh::tokens::count_message(family, m)))
                .sum()
        };
        let mut token_sums: Vec<(String, i64)> =
            families.iter().map(|f| (f.clone(), sum(f))).collect();
        token_sums.push((ANY_FAMILY.to_string(), sum(ANY_FAMILY)));
        Self {
            turns,
            token_sums,
            ..Self::default()
        }
    }
}

/// Sets each turn's `token_count` to its count in `family` (counts are not stored: they are
/// cheap to compute from the text, and the family is only known for sure once the session is
/// read).
pub fn fill_token_counts(turns: &mut [Turn], family: &str) {
    for turn in turns {
        turn.token_count = turn.message.as_ref().map_or(0, |m| {
            i64::from(weir_mesh::tokens::count_message(family, m))
        });
    }
}

/// The result of an append.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Appended {
    /// Sequence number of the first turn appended.
    pub first_seq: i64,
    /// Sequence number of the last turn appended.
    pub last_seq: i64,
    /// True when this was a retry of an earlier append with the same `request_id` (nothing was
    /// added).
    pub replayed: bool,
    /// The session after the append.
    pub session: SessionRecord,
}

/// Raw turns read consistently with the session they belong to.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TurnPage {
    /// The session at the time of the read.
    pub session: SessionRecord,
    /// The turns, oldest first, `seq` set.
    pub turns: Vec<Turn>,
}

/// A summary to commit.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SummaryCommit {
    /// Incarnation of the session the summarizer read.
    pub incarnation: String,
    /// Version of the summary the summarizer read (0: none); the compare of compare-and-swap.
    pub expected_version: i64,
    /// Last sequence number the new summary covers. Raw turns up to it are dropped.
    pub covers_through_seq: i64,
    /// The text.
    pub text: String,
    /// Tokens of the summary as a chat message, in the session's family.
    pub token_count: i64,
    /// Sum of the `token_count` of the raw turns it replaces (in the session's family).
    pub dropped_tokens: i64,
    /// Now, Unix milliseconds.
    pub now_ms: i64,
}

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The session does not exist for this tenant, expired, or was deleted.
    #[error("session not found")]
    NotFound,
    /// `create` with an id that is taken.
    #[error("session id is taken")]
    AlreadyExists,
    /// `create` with the id of a session deleted less than `tombstone_ttl` ago.
    #[error("session id belongs to a recently deleted session")]
    RecentlyDeleted,
    /// `expected_last_seq` did not match.
    #[error("expected last_seq {expected}, the session is at {actual}")]
    Aborted {
        /// What the caller expected.
        expected: i64,
        /// The session's `last_seq`.
        actual: i64,
    },
    /// The `request_id` was used before with other messages.
    #[error("request_id was used before with other messages")]
    RequestIdReused,
    /// Another summary committed since the summarizer read the session.
    #[error("summary version is {current}, not {expected}")]
    VersionConflict {
        /// The version the summarizer read.
        expected: i64,
        /// The version now.
        current: i64,
    },
    /// The summary would not cover a contiguous prefix of the raw turns (a summarizer bug).
    #[error("summary through seq {covers} does not fit raw turns {first}..={last}")]
    InvalidCover {
        /// The proposed `covers_through_seq`.
        covers: i64,
        /// First raw sequence number.
        first: i64,
        /// Last sequence number.
        last: i64,
    },
    /// Redis failed or could not be reached.
    #[error("redis: {0}")]
    Redis(#[from] ::redis::RedisError),
    /// Stored data could not be read (a bug, or keys written by something else).
    #[error("corrupt session data: {0}")]
    Corrupt(String),
}

/// Storage of sessions. See the module doc for the semantics every implementation keeps.
pub trait Store: Send + Sync + Clone + 'static {
    /// Creates a session (`AlreadyExists` if the id is live, `RecentlyDeleted` if tombstoned).
    fn create(
        &self,
        session: &SessionRef,
        new: NewSession,
    ) -> impl Future<Output = Result<SessionRecord, StoreError>> + Send;

    /// Reads a session.
    fn get(
        &self,
        session: &SessionRef,
    ) -> impl Future<Output = Result<SessionRecord, StoreError>> + Send;

    /// Appends turns (see the module doc for the checks).
    fn append(
        &self,
        session: &SessionRef,
        batch: AppendBatch,
    ) -> impl Future<Output = Result<Appended, StoreError>> + Send;

    /// The newest raw turns with `seq < before` (at most `limit`), oldest first, read from the
    /// tail: the cost depends on `limit`, not on the length of the history.
    fn read_before(
        &self,
        session: &SessionRef,
        before: i64,
        limit: usize,
    ) -> impl Future<Output = Result<TurnPage, StoreError>> + Send;

    /// The first seq of the turns appended with `request_id` (`AppendTurns.request_id`), while
    /// the session remembers that id; `None` when it does not (never appended, or forgotten).
    fn request_first_seq(
        &self,
        session: &SessionRef,
        request_id: &str,
    ) -> impl Future<Output = Result<Option<i64>, StoreError>> + Send;

    /// The oldest raw turns with `seq > after` (at most `limit`), oldest first.
    fn read_after(
        &self,
        session: &SessionRef,
        after: i64,
        limit: usize,
    ) -> impl Future<Output = Result<TurnPage, StoreError>> + Send;

    /// Commits a summary by compare-and-swap on its version and drops the raw turns it covers;
    /// returns the new version.
    fn commit_summary(
        &self,
        session: &SessionRef,
        commit: SummaryCommit,
    ) -> impl Future<Output = Result<i64, StoreError>> + Send;

    /// Deletes a session: tombstone, then every other key at once.
    fn delete(
        &self,
        session: &SessionRef,
        tombstone_ttl: Duration,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Deletes every session of `user_id` in `tenant`; returns how many were live.
    fn delete_user(
        &self,
        tenant: &Tenant,
        user_id: &str,
        tombstone_ttl: Duration,
    ) -> impl Future<Output = Result<u64, StoreError>> + Send;

    /// Takes the session's summarizer lock for `ttl` unless someone holds it. `NotFound` when
    /// the session is not live (so a lock is never created for a deleted session).
    fn try_lock(
        &self,
        session: &SessionRef,
        token: &str,
        ttl: Duration,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send;

    /// Releases the lock if `token` still holds it.
    fn unlock(
        &self,
        session: &SessionRef,
        token: &str,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;
}

/// The store chosen at start-up.
#[derive(Debug, Clone)]
pub enum AnyStore {
    /// Redis.
    Redis(RedisStore),
    /// In-process memory.
    Memory(MemoryStore),
}

macro_rules! dispatch {
    ($self:ident, $store:ident => $call:expr) => {
        match $self {
            AnyStore::Redis($store) => $call.await,
            AnyStore::Memory($store) => $call.await,
        }
    };
}

impl Store for AnyStore {
    async fn create(
        &self,
        session: &SessionRef,
        new: NewSession,
    ) -> Result<SessionRecord, StoreError> {
        dispatch!(self, s => s.create(session, new))
    }

    async fn get(&self, session: &SessionRef) -> Result<SessionRecord, StoreError> {
        dispatch!(self, s => s.get(session))
    }

    async fn append(
        &self,
        session: &SessionRef,
        batch: AppendBatch,
    ) -> Result<Appended, StoreError> {
        dispatch!(self, s => s.append(session, batch))
    }

    async fn read_before(
        &self,
        session: &SessionRef,
        before: i64,
        limit: usize,
    ) -> Result<TurnPage, StoreError> {
        dispatch!(self, s => s.read_before(session, before, limit))
    }

    async fn read_after(
        &self,
        session: &SessionRef,
        after: i64,
        limit: usize,
    ) -> Result<TurnPage, StoreError> {
        dispatch!(self, s => s.read_after(session, after, limit))
    }

    async fn request_first_seq(
        &self,
        session: &SessionRef,
        request_id: &str,
    ) -> Result<Option<i64>, StoreError> {
        dispatch!(self, s => s.request_first_seq(session, request_id))
    }

    async fn commit_summary(
        &self,
        session: &SessionRef,
        commit: SummaryCommit,
    ) -> Result<i64, StoreError> {
        dispatch!(self, s => s.commit_summary(session, commit))
    }

    async fn delete(
        &self,
        session: &SessionRef,
        tombstone_ttl: Duration,
    ) -> Result<(), StoreError> {
        dispatch!(self, s => s.delete(session, tombstone_ttl))
    }

    async fn delete_user(
        &self,
        tenant: &Tenant,
        user_id: &str,
        tombstone_ttl: Duration,
    ) -> Result<u64, StoreError> {
        dispatch!(self, s => s.delete_user(tenant, user_id, tombstone_ttl))
    }

    async fn try_lock(
        &self,
        session: &SessionRef,
        token: &str,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        dispatch!(self, s => s.try_lock(session, token, ttl))
    }

    async fn unlock(&self, session: &SessionRef, token: &str) -> Result<(), StoreError> {
        dispatch!(self, s => s.unlock(session, token))
    }
}

/// Milliseconds of a duration, saturating.
pub(crate) fn millis(duration: Duration) -> i64 {
    i64::try_from(duration.as_millis()).unwrap_or(i64::MAX)
}
