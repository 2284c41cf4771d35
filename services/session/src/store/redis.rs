//! The Redis store.
//!
//! # Key layout
//!
//! Keys are built with [`KeySpace`] (`<prefix>:{<tenant>}:session:...`), so every key carries the
//! tenant and a session id never resolves across tenants, and every key of a tenant is in one
//! Redis Cluster slot (the `{<tenant>}` hash tag). For session `<id>`:
//!
//! | key | type | contents |
//! |---|---|---|
//! | `…:s:<id>:meta` | hash | `user`, `model`, `family`, `ttl`, `created`, `updated`, `inc` (incarnation), `last` (last_seq), `raw_tokens`, and `m:<key>` per metadata entry |
//! | `…:s:<id>:turns` | list | raw turns, oldest first, each `"<seq>:"` + a protobuf `Turn` (without `seq`) |
//! | `…:s:<id>:summary` | hash | `version`, `covers`, `text`, `tokens`, `family`, `created` |
//! | `…:s:<id>:reqs` | hash | `request_id` → `"<first>:<last>:<fingerprint>"` |
//! | `…:s:<id>:reqord` | sorted set | `request_id` scored by its first seq, to forget the oldest |
//! | `…:s:<id>:lock` | string | summarizer lock token, with its own short expiry |
//! | `…:s:<id>:tomb` | string | tombstone of a deleted session, for `tombstone_ttl` |
//! | `…:user:<user_id>` | set | ids of the user's sessions |
//!
//! The first five share the session's TTL: every append sets it again on all of them together
//! (in the same script), and a summary commit gives the summary the metadata's remaining TTL, so
//! the keys of a session expire together. The user index lives at least as long as the longest of
//! its sessions; entries of expired sessions are removed when the user's sessions are deleted.
//!
//! # Why Lua
//!
//! Every read and write is one script (`lua/*.lua`, each starting with `lua/prelude.lua`), so each
//! is atomic across the session's keys: an append racing a summary commit either lands before it
//! (and the summary, which did not read it, leaves it raw) or after it, and the list's numbering
//! (`first = last - LLEN + 1`) is never observed half-updated. A script returns a status word
//! (`ok`, `not_found`, `aborted`, ...) and, where useful, the session state, so each RPC is one
//! round trip. Scripts are sent with EVALSHA (redis-rs loads them on `NOSCRIPT`).
//!
//! The user index key is derived inside the create, append and delete scripts from the stored
//! user id (the script gets its prefix), because the caller of an append does not know the user.
//! It is in the tenant's slot like the keys the script declares, and Redis Cluster lets a script
//! touch undeclared keys of its declared keys' slot, so every script runs on one node of a
//! cluster, atomically, exactly as on one server (docs/redis.md lists every key).
//!
//! # Failures
//!
//! A Redis error is returned as [`StoreError::Redis`]; the API maps connection failures and
//! timeouts to UNAVAILABLE (`REDIS_UNAVAILABLE`). A script either ran completely or not at all,
//! so a client that retries an append with its `request_id` after such an error never gets it
//! twice.

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use prost::Message as _;
use redis::{Script, Value};
use weir_mesh::{
    store::{KeySpace, RedisConnection, connect},
    tenant::Tenant,
};
use weir_proto::session::Turn;

use super::{
    AppendBatch, Appended, NewSession, SessionRecord, SessionRef, Store, StoreError, SummaryCommit,
    SummaryRecord, TurnPage, millis,
};

const PRELUDE: &str = include_str!("lua/prelude.lua");

/// Service name in keys.
const SERVICE: &str = "session";

/// The session store on Redis. Cheap to clone (clones share the connection).
#[derive(Clone)]
pub struct RedisStore {
    conn: RedisConnection,
    prefix: Arc<str>,
    scripts: Arc<Scripts>,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

struct Scripts {
    create: Script,
    append: Script,
    commit: Script,
    delete: Script,
    read: Script,
    lock: Script,
    unlock: Script,
}

impl Scripts {
    fn new() -> Self {
        let script = |body: &str| Script::new(&format!("{PRELUDE}\n{body}"));
        Self {
            create: script(include_str!("lua/create.lua")),
            append: script(include_str!("lua/append.lua")),
            commit: script(include_str!("lua/commit.lua")),
            delete: script(include_str!("lua/delete.lua")),
            read: script(include_str!("lua/read.lua")),
            lock: script(include_str!("lua/lock.lua")),
            unlock: script(include_str!("lua/unlock.lua")),
        }
    }
}

/// The keys of one session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionKeys {
    /// Metadata hash.
    pub meta: String,
    /// Raw turn list.
    pub turns: String,
    /// Summary hash.
    pub summary: String,
    /// Idempotency records.
    pub reqs: String,
    /// Order of the idempotency records.
    pub reqord: String,
    /// Tombstone.
    pub tomb: String,
    /// Summarizer lock.
    pub lock: String,
    /// Prefix of the user index keys (the user id follows).
    pub user_base: String,
}

impl SessionKeys {
    /// The keys of `session` under `prefix`.
    pub fn new(prefix: &str, session: &SessionRef) -> Self {
        let space = KeySpace::new(prefix, &session.tenant, SERVICE);
        let base = space.key(&format!("s:{}", session.id));
        Self {
            meta: format!("{base}:meta"),
            turns: format!("{base}:turns"),
            summary: format!("{base}:summary"),
            reqs: format!("{base}:reqs"),
            reqord: format!("{base}:reqord"),
            tomb: format!("{base}:tomb"),
            lock: format!("{base}:lock"),
            user_base: user_base(prefix, &session.tenant),
        }
    }

    /// The keys that carry the session's TTL, in script order.
    fn data(&self) -> [&str; 5] {
        [
            &self.meta,
            &self.turns,
            &self.summary,
            &self.reqs,
            &self.reqord,
        ]
    }
}

fn user_base(prefix: &str, tenant: &Tenant) -> String {
    KeySpace::new(prefix, tenant, SERVICE).key("user:")
}

/// The key of `user_id`'s session index in `tenant`.
pub fn user_index_key(prefix: &str, tenant: &Tenant, user_id: &str) -> String {
    format!("{}{user_id}", user_base(prefix, tenant))
}

impl RedisStore {
    /// Connects to `url` (the first connection is made now, so a wrong URL fails at start-up).
    pub async fn connect(url: &str, prefix: &str) -> Result<Self, weir_mesh::store::ConnectError> {
        Ok(Self::new(connect(url).await?, prefix))
    }

    /// A store on an existing connection.
    pub fn new(conn: RedisConnection, prefix: &str) -> Self {
        Self {
            conn,
            prefix: prefix.into(),
            scripts: Arc::new(Scripts::new()),
        }
    }

    /// The keys of a session (for tools and tests that inspect Redis).
    pub fn keys(&self, session: &SessionRef) -> SessionKeys {
        SessionKeys::new(&self.prefix, session)
    }

    async fn run(&self, invocation: &redis::ScriptInvocation<'_>) -> Result<Reply, StoreError> {
        let mut conn = self.conn.clone();
        let value: Value = invocation.invoke_async(&mut conn).await?;
        Reply::parse(value)
    }

    async fn delete_one(
        &self,
        session: &SessionRef,
        tombstone_ttl: Duration,
        only_user: &str,
    ) -> Result<(), StoreError> {
        let keys = self.keys(session);
        let mut invocation = self.scripts.delete.prepare_invoke();
        for key in keys.data() {
            invocation.key(key);
        }
        invocation
            .key(&keys.tomb)
            .key(&keys.lock)
            .arg(&session.id)
            .arg(&keys.user_base)
            .arg(millis(tombstone_ttl).max(1))
            .arg(only_user);
        let reply = self.run(&invocation).await?;
        match reply.status.as_str() {
            "ok" => Ok(()),
            "not_found" => Err(StoreError::NotFound),
            other => Err(unexpected(other)),
        }
    }
}

impl Store for RedisStore {
    async fn create(
        &self,
        session: &SessionRef,
        new: NewSession,
    ) -> Result<SessionRecord, StoreError> {
        let keys = self.keys(session);
        let mut invocation = self.scripts.create.prepare_invoke();
        for key in keys.data() {
            invocation.key(key);
        }
        invocation
            .key(&keys.tomb)
            .key(&keys.lock)
            .arg(&session.id)
            .arg(&keys.user_base)
            .arg(&new.user_id)
            .arg(&new.model)
            .arg(&new.family)
            .arg(millis(new.ttl).max(1))
            .arg(new.now_ms)
            .arg(&new.incarnation)
            .arg(new.metadata.len());
        for (key, value) in &new.metadata {
            invocation.arg(key).arg(value);
        }
        let reply = self.run(&invocation).await?;
        match reply.status.as_str() {
            "ok" => reply.session(),
            "exists" => Err(StoreError::AlreadyExists),
            "deleted" => Err(StoreError::RecentlyDeleted),
            other => Err(unexpected(other)),
        }
    }

    async fn get(&self, session: &SessionRef) -> Result<SessionRecord, StoreError> {
        Ok(self.read_before(session, i64::MAX, 0).await?.session)
    }

    async fn append(
        &self,
        session: &SessionRef,
        batch: AppendBatch,
    ) -> Result<Appended, StoreError> {
        let keys = self.keys(session);
        let mut invocation = self.scripts.append.prepare_invoke();
        for key in keys.data() {
            invocation.key(key);
        }
        invocation
            .key(&keys.tomb)
            .arg(&keys.user_base)
            .arg(batch.now_ms)
            .arg(&batch.request_id)
            .arg(
                batch
                    .expected_last_seq
                    .map(|seq| seq.to_string())
                    .unwrap_or_default(),
            )
            .arg(&batch.fingerprint)
            .arg(batch.max_request_ids.max(1))
            .arg(batch.token_sums.len());
        for (family, tokens) in &batch.token_sums {
            invocation.arg(family).arg(*tokens);
        }
        invocation.arg(batch.turns.len());
        for turn in &batch.turns {
            invocation.arg(turn.encode_to_vec());
        }
        let reply = self.run(&invocation).await?;
        match reply.status.as_str() {
            "ok" | "replayed" => Ok(Appended {
                first_seq: reply.int(0)?,
                last_seq: reply.int(1)?,
                replayed: reply.status == "replayed",
                session: reply.session()?,
            }),
            "not_found" => Err(StoreError::NotFound),
            "request_mismatch" => Err(StoreError::RequestIdReused),
            "aborted" => Err(StoreError::Aborted {
                expected: batch.expected_last_seq.unwrap_or_default(),
                actual: reply.int(0)?,
            }),
            other => Err(unexpected(other)),
        }
    }

    async fn read_before(
        &self,
        session: &SessionRef,
        before: i64,
        limit: usize,
    ) -> Result<TurnPage, StoreError> {
        self.read(session, "before", before, limit).await
    }

    async fn read_after(
        &self,
        session: &SessionRef,
        after: i64,
        limit: usize,
    ) -> Result<TurnPage, StoreError> {
        self.read(session, "after", after, limit).await
    }

    async fn request_first_seq(
        &self,
        session: &SessionRef,
        request_id: &str,
    ) -> Result<Option<i64>, StoreError> {
        let mut conn = self.conn.clone();
        let entry: Option<String> = redis::cmd("HGET")
            .arg(&self.keys(session).reqs)
            .arg(request_id)
            .query_async(&mut conn)
            .await?;
        // "<first>:<last>:<fingerprint>" (module doc).
        entry
            .map(|entry| {
                entry
                    .split(':')
                    .next()
                    .and_then(|first| first.parse().ok())
                    .ok_or_else(|| StoreError::Corrupt(format!("request entry {entry:?}")))
            })
            .transpose()
    }

    async fn commit_summary(
        &self,
        session: &SessionRef,
        commit: SummaryCommit,
    ) -> Result<i64, StoreError> {
        let keys = self.keys(session);
        let reply = self
            .run(
                self.scripts
                    .commit
                    .key(&keys.meta)
                    .key(&keys.turns)
                    .key(&keys.summary)
                    .key(&keys.tomb)
                    .arg(&commit.incarnation)
                    .arg(commit.expected_version)
                    .arg(commit.covers_through_seq)
                    .arg(&commit.text)
                    .arg(commit.token_count)
                    .arg(commit.now_ms)
                    .arg(commit.dropped_tokens),
            )
            .await?;
        match reply.status.as_str() {
            "ok" => reply.int(0),
            "not_found" => Err(StoreError::NotFound),
            "conflict" => Err(StoreError::VersionConflict {
                expected: commit.expected_version,
                current: reply.int(0)?,
            }),
            "bad_cover" => Err(StoreError::InvalidCover {
                covers: commit.covers_through_seq,
                first: reply.int(0)?,
                last: reply.int(1)?,
            }),
            other => Err(unexpected(other)),
        }
    }

    async fn delete(
        &self,
        session: &SessionRef,
        tombstone_ttl: Duration,
    ) -> Result<(), StoreError> {
        self.delete_one(session, tombstone_ttl, "").await
    }

    async fn delete_user(
        &self,
        tenant: &Tenant,
        user_id: &str,
        tombstone_ttl: Duration,
    ) -> Result<u64, StoreError> {
        let index = user_index_key(&self.prefix, tenant, user_id);
        let mut deleted = 0;
        // Sessions created while this runs are caught by the next pass; the loop ends when the
        // index is empty (each pass removes every id it saw, live or stale).
        loop {
            let mut conn = self.conn.clone();
            let ids: Vec<String> = redis::cmd("SRANDMEMBER")
                .arg(&index)
                .arg(256)
                .query_async(&mut conn)
                .await?;
            if ids.is_empty() {
                return Ok(deleted);
            }
            for id in ids {
                let session = SessionRef::new(tenant.clone(), id);
                match self.delete_one(&session, tombstone_ttl, user_id).await {
                    Ok(()) => deleted += 1,
                    Err(StoreError::NotFound) => {}
                    Err(error) => return Err(error),
                }
            }
        }
    }

    async fn try_lock(
        &self,
        session: &SessionRef,
        token: &str,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        let keys = self.keys(session);
        let reply = self
            .run(
                self.scripts
                    .lock
                    .key(&keys.meta)
                    .key(&keys.tomb)
                    .key(&keys.lock)
                    .arg(token)
                    .arg(millis(ttl).max(1)),
            )
            .await?;
        match reply.status.as_str() {
            "ok" => Ok(true),
            "busy" => Ok(false),
            "not_found" => Err(StoreError::NotFound),
            other => Err(unexpected(other)),
        }
    }

    async fn unlock(&self, session: &SessionRef, token: &str) -> Result<(), StoreError> {
        let keys = self.keys(session);
        self.run(self.scripts.unlock.key(&keys.lock).arg(token))
            .await
            .map(drop)
    }
}

impl RedisStore {
    async fn read(
        &self,
        session: &SessionRef,
        mode: &str,
        seq: i64,
        limit: usize,
    ) -> Result<TurnPage, StoreError> {
        let keys = self.keys(session);
        let reply = self
            .run(
                self.scripts
                    .read
                    .key(&keys.meta)
                    .key(&keys.turns)
                    .key(&keys.summary)
                    .key(&keys.tomb)
                    .arg(mode)
                    .arg(seq)
                    .arg(limit),
            )
            .await?;
        match reply.status.as_str() {
            "ok" => {
                let session = reply.session()?;
                let mut turns = reply.turns()?;
                super::fill_token_counts(&mut turns, &session.family);
                Ok(TurnPage { session, turns })
            }
            "not_found" => Err(StoreError::NotFound),
            other => Err(unexpected(other)),
        }
    }
}

fn unexpected(status: &str) -> StoreError {
    StoreError::Corrupt(format!("unexpected script status {status:?}"))
}

/// A script's reply: `{status, {ints...}, {meta, summary, llen}, turns}`, the last three optional.
#[derive(Debug, Default)]
struct Reply {
    status: String,
    ints: Vec<i64>,
    state: Option<Vec<Value>>,
    turns: Vec<Value>,
}

impl Reply {
    fn parse(value: Value) -> Result<Self, StoreError> {
        let Value::Array(items) = value else {
            return Err(StoreError::Corrupt("script reply is not an array".into()));
        };
        let mut items = items.into_iter();
        let status = match items.next() {
            Some(value) => string(value)?,
            None => return Err(StoreError::Corrupt("empty script reply".into())),
        };
        let ints = match items.next() {
            Some(Value::Array(values)) => values.into_iter().map(int).collect::<Result<_, _>>()?,
            _ => Vec::new(),
        };
        let state = match items.next() {
            Some(Value::Array(values)) => Some(values),
            _ => None,
        };
        let turns = match items.next() {
            Some(Value::Array(values)) => values,
            _ => Vec::new(),
        };
        Ok(Self {
            status,
            ints,
            state,
            turns,
        })
    }

    fn int(&self, index: usize) -> Result<i64, StoreError> {
        self.ints
            .get(index)
            .copied()
            .ok_or_else(|| StoreError::Corrupt(format!("script reply lacks integer {index}")))
    }

    fn session(&self) -> Result<SessionRecord, StoreError> {
        let Some(state) = &self.state else {
            return Err(StoreError::Corrupt("script reply lacks the session".into()));
        };
        let [meta, summary, len] = state.as_slice() else {
            return Err(StoreError::Corrupt(
                "session state has the wrong shape".into(),
            ));
        };
        let meta = hash(meta)?;
        if meta.is_empty() {
            return Err(StoreError::NotFound);
        }
        let field = |name: &str| meta.get(name).cloned().unwrap_or_default();
        let number = |name: &str| -> Result<i64, StoreError> {
            meta.get(name)
                .and_then(|v| v.parse().ok())
                .ok_or_else(|| StoreError::Corrupt(format!("session field {name} is not a number")))
        };
        let metadata = meta
            .iter()
            .filter_map(|(k, v)| k.strip_prefix("m:").map(|k| (k.to_string(), v.clone())))
            .collect();
        let summary = hash(summary)?;
        let summary = if summary.is_empty() {
            None
        } else {
            let number = |name: &str| -> Result<i64, StoreError> {
                summary
                    .get(name)
                    .and_then(|v| v.parse().ok())
                    .ok_or_else(|| {
                        StoreError::Corrupt(format!("summary field {name} is not a number"))
                    })
            };
            Some(SummaryRecord {
                text: summary.get("text").cloned().unwrap_or_default(),
                covers_through_seq: number("covers")?,
                version: number("version")?,
                token_count: number("tokens")?,
                family: summary.get("family").cloned().unwrap_or_default(),
                create_ms: number("created")?,
            })
        };
        let record = SessionRecord {
            user_id: field("user"),
            model: field("model"),
            family: field("family"),
            metadata,
            create_ms: number("created")?,
            update_ms: number("updated")?,
            ttl_ms: number("ttl")?,
            last_seq: number("last")?,
            raw_tokens: number("raw_tokens")?,
            incarnation: field("inc"),
            summary,
        };
        // The numbering invariant: raw turns are exactly covers+1..=last.
        let len = int(len.clone())?;
        if record.last_seq - len != record.covers_through_seq() {
            return Err(StoreError::Corrupt(format!(
                "{len} raw turns do not end at {} after summary through {}",
                record.last_seq,
                record.covers_through_seq()
            )));
        }
        Ok(record)
    }

    fn turns(&self) -> Result<Vec<Turn>, StoreError> {
        self.turns.iter().map(decode_turn).collect()
    }
}

/// Decodes a list entry `"<seq>:<protobuf Turn>"`.
fn decode_turn(value: &Value) -> Result<Turn, StoreError> {
    let Value::BulkString(bytes) = value else {
        return Err(StoreError::Corrupt("turn entry is not a string".into()));
    };
    let colon = bytes
        .iter()
        .position(|b| *b == b':')
        .ok_or_else(|| StoreError::Corrupt("turn entry has no sequence number".into()))?;
    let seq: i64 = std::str::from_utf8(&bytes[..colon])
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| StoreError::Corrupt("turn entry has a bad sequence number".into()))?;
    let mut turn = Turn::decode(&bytes[colon + 1..])
        .map_err(|e| StoreError::Corrupt(format!("turn {seq}: {e}")))?;
    turn.seq = seq;
    Ok(turn)
}

fn string(value: Value) -> Result<String, StoreError> {
    match value {
        Value::BulkString(bytes) => String::from_utf8(bytes)
            .map_err(|_| StoreError::Corrupt("script reply is not UTF-8".into())),
        Value::SimpleString(s) => Ok(s),
        Value::Okay => Ok("OK".to_string()),
        other => Err(StoreError::Corrupt(format!(
            "expected a string, got {other:?}"
        ))),
    }
}

fn int(value: Value) -> Result<i64, StoreError> {
    match value {
        Value::Int(n) => Ok(n),
        other => string(other)?
            .parse()
            .map_err(|_| StoreError::Corrupt("expected an integer".into())),
    }
}

fn hash(value: &Value) -> Result<BTreeMap<String, String>, StoreError> {
    let Value::Array(items) = value else {
        return Err(StoreError::Corrupt("expected a hash".into()));
    };
    let mut map = BTreeMap::new();
    let mut items = items.iter();
    while let (Some(key), Some(value)) = (items.next(), items.next()) {
        map.insert(string(key.clone())?, string(value.clone())?);
    }
    Ok(map)
}
