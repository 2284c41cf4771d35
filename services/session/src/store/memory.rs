//! The in-memory store: the semantics of [`super::RedisStore`] in one process, for `weir up`
//! without Redis. Everything is lost when the process stops, and two processes do not share
//! sessions, so it is a zero-setup default for trying Weir, never for production.
//!
//! One mutex guards all state; every operation holds it for its whole duration, which makes each
//! operation atomic, as a Lua script is on Redis. Expiry uses tokio's clock (so tests can pause
//! it): an expired session is treated as absent on access, and a sweep every
//! [`SWEEP_EVERY`] operations frees expired sessions, tombstones and locks.

use std::{
    collections::{BTreeSet, HashMap, VecDeque},
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use tokio::time::Instant;
use weir_mesh::tenant::Tenant;
use weir_proto::session::Turn;

use super::{
    AppendBatch, Appended, NewSession, SessionRecord, SessionRef, Store, StoreError, SummaryCommit,
    SummaryRecord, TurnPage,
};

/// Operations between two sweeps of expired entries.
pub const SWEEP_EVERY: u64 = 1024;

type Key = (Tenant, String);

/// The in-memory store. Cheap to clone (clones share the state).
#[derive(Debug, Clone, Default)]
pub struct MemoryStore {
    state: Arc<Mutex<State>>,
}

#[derive(Debug, Default)]
struct State {
    sessions: HashMap<Key, Session>,
    tombs: HashMap<Key, Instant>,
    users: HashMap<Key, BTreeSet<String>>,
    locks: HashMap<Key, (String, Instant)>,
    ops: u64,
}

#[derive(Debug)]
struct Session {
    record: SessionRecord,
    turns: VecDeque<Turn>,
    requests: HashMap<String, (i64, i64, String)>,
    request_order: BTreeSet<(i64, String)>,
    expires: Instant,
}

impl Session {
    fn first_seq(&self) -> i64 {
        self.record.covers_through_seq() + 1
    }
}

fn key(session: &SessionRef) -> Key {
    (session.tenant.clone(), session.id.clone())
}

fn ttl_of(record: &SessionRecord) -> Duration {
    Duration::from_millis(u64::try_from(record.ttl_ms).unwrap_or(0))
}

impl State {
    /// Counts an operation and sweeps expired entries now and then.
    fn tick(&mut self, now: Instant) {
        self.ops += 1;
        if !self.ops.is_multiple_of(SWEEP_EVERY) {
            return;
        }
        self.sessions.retain(|_, s| s.expires > now);
        self.tombs.retain(|_, until| *until > now);
        self.locks.retain(|_, (_, until)| *until > now);
        let sessions = &self.sessions;
        self.users.retain(|(tenant, _), ids| {
            ids.retain(|id| sessions.contains_key(&(tenant.clone(), id.clone())));
            !ids.is_empty()
        });
    }

    fn tombstoned(&mut self, key: &Key, now: Instant) -> bool {
        match self.tombs.get(key) {
            Some(until) if *until > now => true,
            Some(_) => {
                self.tombs.remove(key);
                false
            }
            None => false,
        }
    }

    /// The live session at `key`, forgetting it if it expired.
    fn live(&mut self, key: &Key, now: Instant) -> Result<&mut Session, StoreError> {
        if self.tombstoned(key, now) {
            return Err(StoreError::NotFound);
        }
        if self.sessions.get(key).is_some_and(|s| s.expires <= now) {
            self.sessions.remove(key);
            self.locks.remove(key);
        }
        self.sessions.get_mut(key).ok_or(StoreError::NotFound)
    }

    fn with<T>(
        &mut self,
        session: &SessionRef,
        f: impl FnOnce(&mut Session) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let now = Instant::now();
        self.tick(now);
        f(self.live(&key(session), now)?)
    }
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave a half-applied operation behind: every
        // operation checks before it mutates. So a poisoned lock is safe to keep using.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn delete_one(
        state: &mut State,
        session: &SessionRef,
        tombstone_ttl: Duration,
        only_user: Option<&str>,
    ) -> Result<(), StoreError> {
        let now = Instant::now();
        let key = key(session);
        let user = state.live(&key, now).map(|s| s.record.user_id.clone());
        if let Some(only) = only_user
            && user.as_deref().ok() != Some(only)
        {
            if let Some(ids) = state
                .users
                .get_mut(&(session.tenant.clone(), only.to_string()))
            {
                ids.remove(&session.id);
            }
            return Err(StoreError::NotFound);
        }
        let user = user?;
        state.sessions.remove(&key);
        state.locks.remove(&key);
        state.tombs.insert(key, now + tombstone_ttl);
        let user_key = (session.tenant.clone(), user);
        if let Some(ids) = state.users.get_mut(&user_key) {
            ids.remove(&session.id);
            if ids.is_empty() {
                state.users.remove(&user_key);
            }
        }
        Ok(())
    }
}

impl Store for MemoryStore {
    async fn create(
        &self,
        session: &SessionRef,
        new: NewSession,
    ) -> Result<SessionRecord, StoreError> {
        let mut state = self.lock();
        let now = Instant::now();
        state.tick(now);
        let key = key(session);
        if state.tombstoned(&key, now) {
            return Err(StoreError::RecentlyDeleted);
        }
        if state.live(&key, now).is_ok() {
            return Err(StoreError::AlreadyExists);
        }
        let record = SessionRecord {
            user_id: new.user_id.clone(),
            model: new.model,
            family: new.family,
            metadata: new.metadata,
            create_ms: new.now_ms,
            update_ms: new.now_ms,
            ttl_ms: super::millis(new.ttl),
            last_seq: 0,
            raw_tokens: 0,
            incarnation: new.incarnation,
            summary: None,
        };
        state.sessions.insert(
            key,
            Session {
                record: record.clone(),
                turns: VecDeque::new(),
                requests: HashMap::new(),
                request_order: BTreeSet::new(),
                expires: now + new.ttl,
            },
        );
        if !new.user_id.is_empty() {
            state
                .users
                .entry((session.tenant.clone(), new.user_id))
                .or_default()
                .insert(session.id.clone());
        }
        Ok(record)
    }

    async fn get(&self, session: &SessionRef) -> Result<SessionRecord, StoreError> {
        self.lock().with(session, |s| Ok(s.record.clone()))
    }

    async fn append(
        &self,
        session: &SessionRef,
        batch: AppendBatch,
    ) -> Result<Appended, StoreError> {
        self.lock().with(session, |s| {
            if !batch.request_id.is_empty()
                && let Some((first, last, fingerprint)) = s.requests.get(&batch.request_id)
            {
                if *fingerprint != batch.fingerprint {
                    return Err(StoreError::RequestIdReused);
                }
                return Ok(Appended {
                    first_seq: *first,
                    last_seq: *last,
                    replayed: true,
                    session: s.record.clone(),
                });
            }
            if let Some(expected) = batch.expected_last_seq
                && expected != s.record.last_seq
            {
                return Err(StoreError::Aborted {
                    expected,
                    actual: s.record.last_seq,
                });
            }
            let tokens = batch.tokens_for(&s.record.family);
            let first = s.record.last_seq + 1;
            for (i, mut turn) in batch.turns.into_iter().enumerate() {
                turn.seq = first + i64::try_from(i).unwrap_or(i64::MAX);
                s.turns.push_back(turn);
            }
            s.record.last_seq = s.first_seq() + i64::try_from(s.turns.len()).unwrap_or(0) - 1;
            let last = s.record.last_seq;
            s.record.update_ms = batch.now_ms;
            s.record.raw_tokens += tokens;
            if !batch.request_id.is_empty() {
                s.requests.insert(
                    batch.request_id.clone(),
                    (first, last, batch.fingerprint.clone()),
                );
                s.request_order.insert((first, batch.request_id));
                while s.request_order.len() > batch.max_request_ids.max(1) {
                    if let Some((_, oldest)) = s.request_order.pop_first() {
                        s.requests.remove(&oldest);
                    }
                }
            }
            s.expires = Instant::now() + ttl_of(&s.record);
            Ok(Appended {
                first_seq: first,
                last_seq: last,
                replayed: false,
                session: s.record.clone(),
            })
        })
    }

    async fn read_before(
        &self,
        session: &SessionRef,
        before: i64,
        limit: usize,
    ) -> Result<TurnPage, StoreError> {
        self.lock().with(session, |s| {
            let first = s.first_seq();
            let to = before.saturating_sub(1).min(s.record.last_seq);
            let count = i64::try_from(limit).unwrap_or(i64::MAX);
            let from = first.max(to.saturating_sub(count) + 1);
            Ok(page(s, first, from, to))
        })
    }

    async fn request_first_seq(
        &self,
        session: &SessionRef,
        request_id: &str,
    ) -> Result<Option<i64>, StoreError> {
        self.lock().with(session, |s| {
            Ok(s.requests.get(request_id).map(|(first, _, _)| *first))
        })
    }

    async fn read_after(
        &self,
        session: &SessionRef,
        after: i64,
        limit: usize,
    ) -> Result<TurnPage, StoreError> {
        self.lock().with(session, |s| {
            let first = s.first_seq();
            let from = first.max(after.saturating_add(1));
            let count = i64::try_from(limit).unwrap_or(i64::MAX);
            let to = s.record.last_seq.min(from.saturating_add(count) - 1);
            Ok(page(s, first, from, to))
        })
    }

    async fn commit_summary(
        &self,
        session: &SessionRef,
        commit: SummaryCommit,
    ) -> Result<i64, StoreError> {
        self.lock().with(session, |s| {
            if s.record.incarnation != commit.incarnation {
                return Err(StoreError::NotFound);
            }
            let current = s.record.summary_version();
            if current != commit.expected_version {
                return Err(StoreError::VersionConflict {
                    expected: commit.expected_version,
                    current,
                });
            }
            let first = s.first_seq();
            let last = s.record.last_seq;
            let covers = commit.covers_through_seq;
            if covers < first || covers > last {
                return Err(StoreError::InvalidCover {
                    covers,
                    first,
                    last,
                });
            }
            let drop = usize::try_from(covers - first + 1).unwrap_or(0);
            s.turns.drain(..drop.min(s.turns.len()));
            let version = current + 1;
            s.record.summary = Some(SummaryRecord {
                text: commit.text,
                covers_through_seq: covers,
                version,
                token_count: commit.token_count,
                family: s.record.family.clone(),
                create_ms: commit.now_ms,
            });
            s.record.raw_tokens -= commit.dropped_tokens;
            Ok(version)
        })
    }

    async fn delete(
        &self,
        session: &SessionRef,
        tombstone_ttl: Duration,
    ) -> Result<(), StoreError> {
        let mut state = self.lock();
        state.tick(Instant::now());
        Self::delete_one(&mut state, session, tombstone_ttl, None)
    }

    async fn delete_user(
        &self,
        tenant: &Tenant,
        user_id: &str,
        tombstone_ttl: Duration,
    ) -> Result<u64, StoreError> {
        let mut state = self.lock();
        state.tick(Instant::now());
        let ids: Vec<String> = state
            .users
            .get(&(tenant.clone(), user_id.to_string()))
            .map(|ids| ids.iter().cloned().collect())
            .unwrap_or_default();
        let mut deleted = 0;
        for id in ids {
            let session = SessionRef::new(tenant.clone(), id);
            if Self::delete_one(&mut state, &session, tombstone_ttl, Some(user_id)).is_ok() {
                deleted += 1;
            }
        }
        state.users.remove(&(tenant.clone(), user_id.to_string()));
        Ok(deleted)
    }

    async fn try_lock(
        &self,
        session: &SessionRef,
        token: &str,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        let mut state = self.lock();
        let now = Instant::now();
        state.tick(now);
        let key = key(session);
        state.live(&key, now)?;
        if state.locks.get(&key).is_some_and(|(_, until)| *until > now) {
            return Ok(false);
        }
        state.locks.insert(key, (token.to_string(), now + ttl));
        Ok(true)
    }

    async fn unlock(&self, session: &SessionRef, token: &str) -> Result<(), StoreError> {
        let mut state = self.lock();
        let key = key(session);
        if state.locks.get(&key).is_some_and(|(held, _)| held == token) {
            state.locks.remove(&key);
        }
        Ok(())
    }
}

/// Turns with `from <= seq <= to` of a deque whose first element has seq `first`.
/// The turns `from..=to` of `s` (whose first stored turn is `first`) with their token counts, and
/// the session record: what both directions of reading return.
fn page(s: &Session, first: i64, from: i64, to: i64) -> TurnPage {
    let mut turns = slice(&s.turns, first, from, to);
    super::fill_token_counts(&mut turns, &s.record.family);
    TurnPage {
        session: s.record.clone(),
        turns,
    }
}

fn slice(turns: &VecDeque<Turn>, first: i64, from: i64, to: i64) -> Vec<Turn> {
    if from > to {
        return Vec::new();
    }
    let start = usize::try_from(from - first).unwrap_or(0);
    let end = usize::try_from(to - first + 1)
        .unwrap_or(0)
        .min(turns.len());
    turns.range(start.min(end)..end).cloned().collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use weir_proto::common::{Message, Role};

    use super::*;

    fn session(id: &str) -> SessionRef {
        SessionRef::new(Tenant::new("acme").unwrap(), id)
    }

    fn new_session(user: &str, ttl: Duration) -> NewSession {
        NewSession {
            user_id: user.to_string(),
            model: "sim-small".to_string(),
            family: "sim".to_string(),
            ttl,
            incarnation: "inc-1".to_string(),
            ..NewSession::default()
        }
    }

    /// Each message is "w w w w w <text>": 6 sim tokens + 4 per message = 10.
    fn batch(texts: &[&str]) -> AppendBatch {
        let turns = texts
            .iter()
            .map(|text| Turn {
                message: Some(Message {
                    role: Role::User.into(),
                    content: format!("w w w w w {text}"),
                    ..Message::default()
                }),
                ..Turn::default()
            })
            .collect();
        AppendBatch {
            fingerprint: texts.join("|"),
            max_request_ids: 2,
            ..AppendBatch::count(turns, &["sim".to_string()])
        }
    }

    fn contents(turns: &[Turn]) -> Vec<(i64, String)> {
        turns
            .iter()
            .map(|t| {
                let content = t.message.clone().unwrap_or_default().content;
                (t.seq, content.trim_start_matches("w w w w w ").to_string())
            })
            .collect()
    }

    #[tokio::test]
    async fn appends_number_contiguously_and_retries_add_nothing() {
        let store = MemoryStore::new();
        let s = session("s1");
        store
            .create(&s, new_session("u", Duration::from_secs(60)))
            .await
            .unwrap();
        assert!(matches!(
            store
                .create(&s, new_session("u", Duration::from_secs(60)))
                .await,
            Err(StoreError::AlreadyExists)
        ));
        let a = store.append(&s, batch(&["a", "b"])).await.unwrap();
        assert_eq!((a.first_seq, a.last_seq, a.replayed), (1, 2, false));
        let mut retried = batch(&["c"]);
        retried.request_id = "r1".to_string();
        let first = store.append(&s, retried.clone()).await.unwrap();
        let again = store.append(&s, retried.clone()).await.unwrap();
        assert_eq!(
            (again.first_seq, again.last_seq, again.replayed),
            (3, 3, true)
        );
        assert_eq!(first.session.last_seq, 3);
        assert_eq!(again.session.last_seq, 3);
        let mut reused = batch(&["other"]);
        reused.request_id = "r1".to_string();
        assert!(matches!(
            store.append(&s, reused).await,
            Err(StoreError::RequestIdReused)
        ));
        let mut stale = batch(&["d"]);
        stale.expected_last_seq = Some(2);
        assert!(matches!(
            store.append(&s, stale).await,
            Err(StoreError::Aborted {
                expected: 2,
                actual: 3
            })
        ));
        let page = store.read_after(&s, 0, 10).await.unwrap();
        assert_eq!(
            contents(&page.turns),
            [(1, "a".into()), (2, "b".into()), (3, "c".into())]
        );
        assert_eq!(page.session.raw_tokens, 30);
    }

    #[tokio::test]
    async fn only_the_newest_request_ids_are_remembered() {
        let store = MemoryStore::new();
        let s = session("s1");
        store
            .create(&s, new_session("", Duration::from_secs(60)))
            .await
            .unwrap();
        for id in ["r1", "r2", "r3"] {
            let mut b = batch(&[id]);
            b.request_id = id.to_string();
            store.append(&s, b).await.unwrap();
        }
        // max_request_ids is 2: r1 was forgotten, so it appends again; r3 is still known.
        let mut b = batch(&["r1"]);
        b.request_id = "r1".to_string();
        assert!(!store.append(&s, b).await.unwrap().replayed);
        let mut b = batch(&["r3"]);
        b.request_id = "r3".to_string();
        assert!(store.append(&s, b).await.unwrap().replayed);
    }

    #[tokio::test]
    async fn reads_from_either_end_and_summaries_drop_only_what_they_cover() {
        let store = MemoryStore::new();
        let s = session("s1");
        store
            .create(&s, new_session("", Duration::from_secs(60)))
            .await
            .unwrap();
        let texts: Vec<String> = (1..=10).map(|i| format!("t{i}")).collect();
        let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
        store.append(&s, batch(&refs)).await.unwrap();
        let tail = store.read_before(&s, i64::MAX, 3).await.unwrap();
        assert_eq!(
            tail.turns.iter().map(|t| t.seq).collect::<Vec<_>>(),
            [8, 9, 10]
        );
        let before = store.read_before(&s, 8, 3).await.unwrap();
        assert_eq!(
            before.turns.iter().map(|t| t.seq).collect::<Vec<_>>(),
            [5, 6, 7]
        );

        let commit = SummaryCommit {
            incarnation: "inc-1".to_string(),
            expected_version: 0,
            covers_through_seq: 4,
            text: "summary".to_string(),
            token_count: 7,
            dropped_tokens: 40,
            now_ms: 1,
        };
        assert_eq!(store.commit_summary(&s, commit.clone()).await.unwrap(), 1);
        // The same commit again lost the compare-and-swap: nothing changes.
        assert!(matches!(
            store.commit_summary(&s, commit.clone()).await,
            Err(StoreError::VersionConflict { current: 1, .. })
        ));
        let page = store.read_after(&s, 0, 100).await.unwrap();
        assert_eq!(page.turns.first().map(|t| t.seq), Some(5));
        assert_eq!(page.turns.len(), 6);
        assert_eq!(page.session.covers_through_seq(), 4);
        assert_eq!(page.session.raw_tokens, 60);
        // A cover that skips raw turns or reaches past the end is refused.
        for covers in [3, 11] {
            let bad = SummaryCommit {
                expected_version: 1,
                covers_through_seq: covers,
                ..commit.clone()
            };
            assert!(matches!(
                store.commit_summary(&s, bad).await,
                Err(StoreError::InvalidCover { .. })
            ));
        }
        // Another incarnation's summary is refused as not found.
        let foreign = SummaryCommit {
            incarnation: "inc-0".to_string(),
            expected_version: 1,
            covers_through_seq: 6,
            ..commit
        };
        assert!(matches!(
            store.commit_summary(&s, foreign).await,
            Err(StoreError::NotFound)
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn sessions_expire_unless_appended_to() {
        let store = MemoryStore::new();
        let s = session("s1");
        store
            .create(&s, new_session("", Duration::from_secs(10)))
            .await
            .unwrap();
        tokio::time::advance(Duration::from_secs(8)).await;
        store.append(&s, batch(&["a"])).await.unwrap();
        tokio::time::advance(Duration::from_secs(8)).await;
        assert!(store.get(&s).await.is_ok(), "the append restarted the TTL");
        tokio::time::advance(Duration::from_secs(3)).await;
        assert!(matches!(store.get(&s).await, Err(StoreError::NotFound)));
        assert!(matches!(
            store.append(&s, batch(&["late"])).await,
            Err(StoreError::NotFound)
        ));
        // An expired id is free again (no tombstone).
        assert!(
            store
                .create(&s, new_session("", Duration::from_secs(10)))
                .await
                .is_ok()
        );
    }

    #[tokio::test(start_paused = true)]
    async fn deleted_sessions_refuse_everything_until_the_tombstone_expires() {
        let store = MemoryStore::new();
        let s = session("s1");
        store
            .create(&s, new_session("u1", Duration::from_secs(60)))
            .await
            .unwrap();
        store.append(&s, batch(&["a", "b"])).await.unwrap();
        assert!(
            store
                .try_lock(&s, "tok", Duration::from_secs(5))
                .await
                .unwrap()
        );
        store.delete(&s, Duration::from_secs(30)).await.unwrap();
        assert!(matches!(
            store.delete(&s, Duration::from_secs(30)).await,
            Err(StoreError::NotFound)
        ));
        assert!(matches!(
            store.append(&s, batch(&["late"])).await,
            Err(StoreError::NotFound)
        ));
        let late = SummaryCommit {
            incarnation: "inc-1".to_string(),
            covers_through_seq: 1,
            ..SummaryCommit::default()
        };
        assert!(matches!(
            store.commit_summary(&s, late).await,
            Err(StoreError::NotFound)
        ));
        assert!(matches!(
            store.try_lock(&s, "tok2", Duration::from_secs(5)).await,
            Err(StoreError::NotFound)
        ));
        assert!(matches!(
            store
                .create(&s, new_session("u1", Duration::from_secs(60)))
                .await,
            Err(StoreError::RecentlyDeleted)
        ));
        tokio::time::advance(Duration::from_secs(31)).await;
        let again = store
            .create(&s, new_session("u1", Duration::from_secs(60)))
            .await
            .unwrap();
        assert_eq!(
            again.last_seq, 0,
            "nothing of the deleted session reappears"
        );
    }

    #[tokio::test]
    async fn deleting_a_user_deletes_only_their_sessions() {
        let store = MemoryStore::new();
        for (id, user) in [("a1", "alice"), ("a2", "alice"), ("b1", "bob")] {
            store
                .create(&session(id), new_session(user, Duration::from_secs(60)))
                .await
                .unwrap();
        }
        let other_tenant = SessionRef::new(Tenant::new("other").unwrap(), "x1");
        store
            .create(&other_tenant, new_session("alice", Duration::from_secs(60)))
            .await
            .unwrap();
        let tenant = Tenant::new("acme").unwrap();
        assert_eq!(
            store
                .delete_user(&tenant, "alice", Duration::from_secs(1))
                .await
                .unwrap(),
            2
        );
        assert_eq!(
            store
                .delete_user(&tenant, "alice", Duration::from_secs(1))
                .await
                .unwrap(),
            0
        );
        assert!(store.get(&session("b1")).await.is_ok());
        assert!(store.get(&other_tenant).await.is_ok());
        assert!(store.get(&session("a1")).await.is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn the_summarizer_lock_is_exclusive_until_released_or_expired() {
        let store = MemoryStore::new();
        let s = session("s1");
        store
            .create(&s, new_session("", Duration::from_secs(600)))
            .await
            .unwrap();
        assert!(
            store
                .try_lock(&s, "a", Duration::from_secs(5))
                .await
                .unwrap()
        );
        assert!(
            !store
                .try_lock(&s, "b", Duration::from_secs(5))
                .await
                .unwrap()
        );
        store.unlock(&s, "b").await.unwrap();
        assert!(
            !store
                .try_lock(&s, "b", Duration::from_secs(5))
                .await
                .unwrap()
        );
        store.unlock(&s, "a").await.unwrap();
        assert!(
            store
                .try_lock(&s, "b", Duration::from_secs(5))
                .await
                .unwrap()
        );
        tokio::time::advance(Duration::from_secs(6)).await;
        assert!(
            store
                .try_lock(&s, "c", Duration::from_secs(5))
                .await
                .unwrap()
        );
    }
}
