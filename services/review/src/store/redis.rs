//! The Redis store.
//!
//! # Key layout
//!
//! Every key of a tenant starts with `<prefix>:{<tenant>}:review` ([`KeySpace`]), so an item id
//! never resolves across tenants, and on a Redis Cluster all of a tenant's keys are in one hash
//! slot (the tenant is the hash tag). The full layout is documented at the top of
//! `lua/prelude.lua`: the item is a hash (its immutable content is one protobuf `body` field, the
//! state that transitions change is in plain fields the scripts read), and each queue has
//! indexes of its pending, claimed and open items, of its recent decisions and of its counts.
//! Shared by all tenants: the sweeper's index of tenants with a lease or SLA due
//! ([`DueTenants`], `<prefix>:{review:due}:at` and `:gen`) and the pub/sub channel
//! `<prefix>:review:changes`.
//!
//! # Why Lua
//!
//! Every transition is one script (`lua/*.lua`, each starting with `lua/prelude.lua`) that checks
//! its precondition, moves the item between the indexes, appends its audit event and publishes
//! the change, atomically. Concurrent decisions on one item are serialized by Redis: the first
//! finds its lease and decides, the others find the item DECIDED and are refused. Scripts are
//! sent with EVALSHA (redis-rs loads them on `NOSCRIPT`). Each script declares the tenant's key
//! space as its one key and derives every other key from it, so it runs in the tenant's slot.
//!
//! # The sweeper's index
//!
//! No script touches the shared index of due tenants (on a cluster it is in another slot). A
//! transition that gives a tenant something due (a new item's SLA deadline, a claim's lease, an
//! escalation's new deadline) marks the tenant after its script; the sweeper settles a tenant
//! when nothing of it is due any more ([`DueTenants`] explains why no mark is lost). A replica
//! that dies between a script and its mark leaves that lease or deadline unswept until the
//! tenant's next mark: the item is still decided, claimed or listed normally meanwhile.
//!
//! # Changes
//!
//! A background task (started on the first [`Store::subscribe`]) holds one SUBSCRIBE connection
//! per store and fans the channel's messages out to the process's watchers. On a Redis Cluster a
//! PUBLISH reaches the subscribers of every node, so the task subscribes through one node (the
//! first seed node that answers, the next one after a failure). When it
//! (re)subscribes it sends [`Change::Resync`], so a watcher re-reads its item after the feed is
//! live and misses nothing.

use std::{
    collections::BTreeMap,
    sync::{Arc, OnceLock, Weak},
    time::Duration,
};

use futures::StreamExt;
use prost::Message as _;
use redis::{Script, Value};
use tokio::sync::{broadcast, watch};
use weir_mesh::{
    due::DueTenants,
    store::{KeySpace, RedisConnection},
    tenant::Tenant,
};
use weir_proto::review::ReviewItem;

use super::{
    AuditRecord, Change, Claim, Created, Decide, DecisionRecord, DueItems, ItemPage, ItemRecord,
    LeaseRecord, NewItem, QueueCounts, SlaAction, Store, StoreError,
};

const PRELUDE: &str = include_str!("lua/prelude.lua");
/// Service name in keys.
const SERVICE: &str = "review";
/// Longest a new watcher waits for the change feed to be subscribed.
const FEED_WAIT: Duration = Duration::from_secs(2);
/// How often a claim retries past stale index entries.
const CLAIM_ATTEMPTS: usize = 8;

/// The review store on Redis. Cheap to clone (clones share the connection).
#[derive(Clone)]
pub struct RedisStore {
    conn: RedisConnection,
    /// The servers the change feed may subscribe through, tried in turn (one for a single
    /// Redis, the seed nodes of a cluster).
    feed_nodes: Arc<[redis::Client]>,
    prefix: Arc<str>,
    due: DueTenants,
    scripts: Arc<Scripts>,
    changes: Arc<broadcast::Sender<Change>>,
    feed: Arc<OnceLock<()>>,
    live: Arc<watch::Sender<bool>>,
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
    claim: Script,
    renew: Script,
    decide: Script,
    cancel: Script,
    expire: Script,
    sla: Script,
    list: Script,
    stats: Script,
    reindex: Script,
}

impl Scripts {
    fn new() -> Self {
        let script = |body: &str| Script::new(&format!("{PRELUDE}\n{body}"));
        Self {
            create: script(include_str!("lua/create.lua")),
            claim: script(include_str!("lua/claim.lua")),
            renew: script(include_str!("lua/renew.lua")),
            decide: script(include_str!("lua/decide.lua")),
            cancel: script(include_str!("lua/cancel.lua")),
            expire: script(include_str!("lua/expire.lua")),
            sla: script(include_str!("lua/sla.lua")),
            list: script(include_str!("lua/list.lua")),
            stats: script(include_str!("lua/stats.lua")),
            reindex: script(include_str!("lua/reindex.lua")),
        }
    }
}

impl RedisStore {
    /// Connects to `url` (the first connection is made now, so a wrong URL fails at start-up).
    pub async fn connect(url: &str, prefix: &str) -> Result<Self, weir_mesh::store::ConnectError> {
        let conn = weir_mesh::store::connect(url).await?;
        let nodes = weir_mesh::store::cluster_nodes(url).unwrap_or_else(|| vec![url.to_string()]);
        let feed_nodes = nodes
            .iter()
            .map(|node| redis::Client::open(node.as_str()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|source| weir_mesh::store::ConnectError {
                url: weir_mesh::store::redact(url),
                source,
            })?;
        let mut store = Self::new(conn, prefix);
        store.feed_nodes = feed_nodes.into();
        // Subscribe now, so the first watcher finds the feed live.
        store.start_feed();
        Ok(store)
    }

    /// A store on an existing connection. Without [`Self::connect`]'s servers it has no change
    /// feed across replicas: watchers see this process's changes only by their periodic re-read.
    pub fn new(conn: RedisConnection, prefix: &str) -> Self {
        Self {
            conn,
            feed_nodes: Arc::new([]),
            prefix: prefix.into(),
            due: DueTenants::new(prefix, SERVICE),
            scripts: Arc::new(Scripts::new()),
            changes: Arc::new(broadcast::channel(4096).0),
            feed: Arc::new(OnceLock::new()),
            live: Arc::new(watch::channel(false).0),
        }
    }

    /// `<prefix>:{<tenant>}:review`.
    fn base(&self, tenant: &Tenant) -> String {
        KeySpace::new(&self.prefix, tenant, SERVICE)
            .base()
            .to_string()
    }

    fn item_key(&self, tenant: &Tenant, id: &str) -> String {
        format!("{}:i:{id}", self.base(tenant))
    }

    fn invocation<'a>(
        &self,
        script: &'a Script,
        tenant: &Tenant,
        now_ms: i64,
    ) -> redis::ScriptInvocation<'a> {
        let mut invocation = script.prepare_invoke();
        invocation
            .key(self.base(tenant))
            .arg(&*self.prefix)
            .arg(tenant.as_str())
            .arg(now_ms);
        invocation
    }

    async fn run(&self, invocation: &redis::ScriptInvocation<'_>) -> Result<Reply, StoreError> {
        let mut conn = self.conn.clone();
        let value: Value = invocation.invoke_async(&mut conn).await?;
        Reply::parse(value)
    }

    /// Marks `tenant` due at `due_ms` in the sweeper's index, after a script gave it a lease or
    /// a deadline.
    async fn mark_due(&self, tenant: &Tenant, due_ms: i64) -> Result<(), StoreError> {
        let mut conn = self.conn.clone();
        Ok(self.due.mark(&mut conn, tenant.as_str(), due_ms).await?)
    }

    /// Starts the change feed once.
    fn start_feed(&self) {
        if self.feed_nodes.is_empty() {
            return;
        }
        let nodes = self.feed_nodes.clone();
        self.feed.get_or_init(|| {
            let channel = format!("{}:review:changes", self.prefix);
            let sender = Arc::downgrade(&self.changes);
            tokio::spawn(run_feed(nodes, channel, sender, self.live.clone()));
        });
    }
}

/// Forwards the pub/sub channel to the process's watchers until the store is dropped,
/// resubscribing after a failure through the next of `nodes`.
async fn run_feed(
    nodes: Arc<[redis::Client]>,
    channel: String,
    sender: Weak<broadcast::Sender<Change>>,
    live: Arc<watch::Sender<bool>>,
) {
    for client in nodes.iter().cycle() {
        match client.get_async_pubsub().await {
            Ok(mut pubsub) => match pubsub.subscribe(&channel).await {
                Ok(()) => {
                    let mut messages = pubsub.into_on_message();
                    let Some(tx) = sender.upgrade() else { return };
                    let _ = tx.send(Change::Resync);
                    drop(tx);
                    live.send_replace(true);
                    loop {
                        let next =
                            tokio::time::timeout(Duration::from_secs(5), messages.next()).await;
                        let Some(tx) = sender.upgrade() else { return };
                        match next {
                            Ok(Some(message)) => {
                                let payload: String = message.get_payload().unwrap_or_default();
                                let mut parts = payload.splitn(3, ' ');
                                if let (Some(tenant), Some(queue), Some(id)) =
                                    (parts.next(), parts.next(), parts.next())
                                {
                                    let _ = tx.send(Change::Item {
                                        tenant: tenant.to_string(),
                                        queue: queue.to_string(),
                                        id: id.to_string(),
                                    });
                                }
                            }
                            Ok(None) => break,
                            // Idle: loop to notice a dropped store.
                            Err(_) => {}
                        }
                    }
                    live.send_replace(false);
                    tracing::warn!("review change feed: subscription ended; resubscribing");
                }
                Err(error) => tracing::warn!(%error, "review change feed: SUBSCRIBE failed"),
            },
            Err(error) => tracing::warn!(%error, "review change feed: cannot connect"),
        }
        if sender.strong_count() == 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

impl Store for RedisStore {
    async fn create(&self, tenant: &Tenant, new: NewItem) -> Result<Created, StoreError> {
        let mut invocation = self.invocation(&self.scripts.create, tenant, new.now_ms);
        invocation
            .arg(&new.request_id)
            .arg(&new.id)
            .arg(&new.queue)
            .arg(new.priority)
            .arg(new.sla_ms)
            .arg(new.body.encode_to_vec())
            .arg(&new.actor);
        let reply = self.run(&invocation).await?;
        match reply.status.as_str() {
            "ok" => {
                self.mark_due(tenant, new.sla_ms).await?;
                Ok((reply.item()?, true))
            }
            "exists" => Ok((reply.item()?, false)),
            other => Err(unexpected(other)),
        }
    }

    async fn get(&self, tenant: &Tenant, id: &str) -> Result<ItemRecord, StoreError> {
        let mut conn = self.conn.clone();
        let value: Value = redis::cmd("HGETALL")
            .arg(self.item_key(tenant, id))
            .query_async(&mut conn)
            .await?;
        match value {
            Value::Array(ref v) if v.is_empty() => Err(StoreError::NotFound),
            Value::Map(ref v) if v.is_empty() => Err(StoreError::NotFound),
            value => parse_item(&value),
        }
    }

    async fn list(
        &self,
        tenant: &Tenant,
        queue: &str,
        state: i32,
        after: &str,
        limit: usize,
    ) -> Result<ItemPage, StoreError> {
        let mut invocation = self.invocation(&self.scripts.list, tenant, 0);
        invocation.arg(queue).arg(state).arg(after).arg(limit);
        let mut conn = self.conn.clone();
        let value: Value = invocation.invoke_async(&mut conn).await?;
        let Value::Array(mut parts) = value else {
            return Err(corrupt("list reply"));
        };
        let items = match parts.pop() {
            Some(Value::Array(items)) => items
                .iter()
                .map(parse_item)
                .collect::<Result<Vec<_>, _>>()?,
            _ => return Err(corrupt("list items")),
        };
        let next = parts.pop().map(|v| text(&v)).unwrap_or_default();
        Ok(ItemPage { items, next })
    }

    async fn claim(&self, tenant: &Tenant, claim: Claim) -> Result<Option<ItemRecord>, StoreError> {
        for _ in 0..CLAIM_ATTEMPTS {
            let mut invocation = self.invocation(&self.scripts.claim, tenant, claim.now_ms);
            invocation
                .arg(&claim.queue)
                .arg(claim.item_id.as_deref().unwrap_or(""))
                .arg(&claim.lease.lease_id)
                .arg(&claim.lease.reviewer)
                .arg(claim.lease.expire_ms)
                .arg(&claim.actor);
            let reply = self.run(&invocation).await?;
            return match reply.status.as_str() {
                "ok" => {
                    self.mark_due(tenant, claim.lease.expire_ms).await?;
                    Ok(Some(reply.item()?))
                }
                "empty" => Ok(None),
                "retry" => continue,
                status => Err(refusal(status, &reply)),
            };
        }
        Ok(None)
    }

    async fn renew(
        &self,
        tenant: &Tenant,
        id: &str,
        lease_id: &str,
        expire_ms: i64,
        key_label: &str,
        now_ms: i64,
    ) -> Result<ItemRecord, StoreError> {
        let mut invocation = self.invocation(&self.scripts.renew, tenant, now_ms);
        invocation
            .arg(id)
            .arg(lease_id)
            .arg(expire_ms)
            .arg(key_label);
        let reply = self.run(&invocation).await?;
        match reply.status.as_str() {
            "ok" => reply.item(),
            status => Err(refusal(status, &reply)),
        }
    }

    async fn decide(&self, tenant: &Tenant, decide: Decide) -> Result<ItemRecord, StoreError> {
        let mut invocation = self.invocation(&self.scripts.decide, tenant, decide.now_ms);
        invocation
            .arg(&decide.item_id)
            .arg(&decide.lease_id)
            .arg(decide.verdict)
            .arg(&decide.edited_content)
            .arg(&decide.comment)
            .arg(&decide.key_label);
        let reply = self.run(&invocation).await?;
        match reply.status.as_str() {
            "ok" => reply.item(),
            status => Err(refusal(status, &reply)),
        }
    }

    async fn cancel(
        &self,
        tenant: &Tenant,
        id: &str,
        reason: &str,
        actor: &str,
        now_ms: i64,
    ) -> Result<(ItemRecord, bool), StoreError> {
        let mut invocation = self.invocation(&self.scripts.cancel, tenant, now_ms);
        invocation.arg(id).arg(reason).arg(actor);
        let reply = self.run(&invocation).await?;
        match reply.status.as_str() {
            "ok" => Ok((reply.item()?, true)),
            "unchanged" => Ok((reply.item()?, false)),
            status => Err(refusal(status, &reply)),
        }
    }

    async fn stats(
        &self,
        tenant: &Tenant,
        queue: &str,
        now_ms: i64,
    ) -> Result<QueueCounts, StoreError> {
        let mut invocation = self.invocation(&self.scripts.stats, tenant, now_ms);
        invocation.arg(queue);
        let mut conn = self.conn.clone();
        let value: Value = invocation.invoke_async(&mut conn).await?;
        let Value::Array(parts) = value else {
            return Err(corrupt("stats reply"));
        };
        let int = |i: usize| parts.get(i).map_or(0, number);
        let oldest = parts.get(3).map(text).unwrap_or_default();
        let counts = parts.get(5).map(pairs).unwrap_or_default();
        let mut reviewers: BTreeMap<String, (i64, i64)> = BTreeMap::new();
        for (field, value) in &counts {
            let n = value.parse::<i64>().unwrap_or(0);
            if let Some(name) = field.strip_prefix("n:") {
                reviewers.entry(name.to_string()).or_default().0 = n;
            } else if let Some(name) = field.strip_prefix("a:") {
                reviewers.entry(name.to_string()).or_default().1 = n;
            }
        }
        let get = |name: &str| {
            counts
                .iter()
                .find(|(f, _)| f == name)
                .and_then(|(_, v)| v.parse::<i64>().ok())
                .unwrap_or(0)
        };
        Ok(QueueCounts {
            pending: int(0),
            claimed: int(1),
            sla_breached: int(2),
            oldest_pending_ms: oldest.parse::<f64>().ok().map(|ms| ms as i64),
            decided_last_hour: int(4),
            decided_total: get("decided"),
            approved_total: get("approved"),
            reviewers,
        })
    }

    async fn audit(
        &self,
        tenant: &Tenant,
        item_id: Option<&str>,
        offset: u64,
        limit: usize,
    ) -> Result<(Vec<AuditRecord>, Option<u64>), StoreError> {
        let mut conn = self.conn.clone();
        let list = match item_id {
            Some(id) => {
                let item = self.item_key(tenant, id);
                let exists: bool = redis::cmd("EXISTS")
                    .arg(&item)
                    .query_async(&mut conn)
                    .await?;
                if !exists {
                    return Err(StoreError::NotFound);
                }
                format!("{item}:audit")
            }
            None => format!("{}:audit", self.base(tenant)),
        };
        let start = i64::try_from(offset).unwrap_or(i64::MAX);
        let stop = start.saturating_add(i64::try_from(limit).unwrap_or(i64::MAX));
        // One more than asked, to know whether another page follows.
        let raw: Vec<String> = redis::cmd("LRANGE")
            .arg(&list)
            .arg(start)
            .arg(stop)
            .query_async(&mut conn)
            .await?;
        let more = raw.len() > limit;
        let events = raw
            .iter()
            .take(limit)
            .map(|event| parse_audit(event))
            .collect::<Result<Vec<_>, _>>()?;
        let next = more.then(|| offset.saturating_add(events.len() as u64));
        Ok((events, next))
    }

    async fn due_tenants(&self, now_ms: i64, limit: usize) -> Result<Vec<Tenant>, StoreError> {
        let mut conn = self.conn.clone();
        let names = self.due.due(&mut conn, now_ms, limit).await?;
        Ok(names
            .iter()
            .filter_map(|name| Tenant::new(name).ok())
            .collect())
    }

    async fn due_items(
        &self,
        tenant: &Tenant,
        now_ms: i64,
        limit: usize,
    ) -> Result<DueItems, StoreError> {
        let base = self.base(tenant);
        let mut conn = self.conn.clone();
        let (leases, slas): (Vec<String>, Vec<String>) = redis::pipe()
            .cmd("ZRANGEBYSCORE")
            .arg(format!("{base}:leases"))
            .arg("-inf")
            .arg(now_ms)
            .arg("LIMIT")
            .arg(0)
            .arg(limit)
            .cmd("ZRANGEBYSCORE")
            .arg(format!("{base}:sla"))
            .arg("-inf")
            .arg(now_ms)
            .arg("LIMIT")
            .arg(0)
            .arg(limit)
            .query_async(&mut conn)
            .await?;
        let mut with_queues = Vec::with_capacity(slas.len());
        if !slas.is_empty() {
            let mut pipe = redis::pipe();
            for id in &slas {
                pipe.cmd("HGET").arg(format!("{base}:i:{id}")).arg("queue");
            }
            let queues: Vec<Option<String>> = pipe.query_async(&mut conn).await?;
            for (id, queue) in slas.into_iter().zip(queues) {
                with_queues.push((id, queue.unwrap_or_default()));
            }
        }
        Ok((leases, with_queues))
    }

    async fn expire_lease(
        &self,
        tenant: &Tenant,
        id: &str,
        now_ms: i64,
    ) -> Result<Option<ItemRecord>, StoreError> {
        let mut invocation = self.invocation(&self.scripts.expire, tenant, now_ms);
        invocation.arg(id);
        let reply = self.run(&invocation).await?;
        match reply.status.as_str() {
            "ok" => Ok(Some(reply.item()?)),
            "skip" => Ok(None),
            other => Err(unexpected(other)),
        }
    }

    async fn apply_sla(
        &self,
        tenant: &Tenant,
        id: &str,
        action: SlaAction,
    ) -> Result<Option<ItemRecord>, StoreError> {
        let mut invocation = self.invocation(&self.scripts.sla, tenant, action.now_ms);
        invocation
            .arg(id)
            .arg(action.action.as_str())
            .arg(&action.expected_queue)
            .arg(&action.escalate_to)
            .arg(action.new_sla_ms);
        let reply = self.run(&invocation).await?;
        match reply.status.as_str() {
            "ok" => {
                // An escalated item has a new deadline (the others left every index).
                self.mark_due(tenant, action.new_sla_ms).await?;
                Ok(Some(reply.item()?))
            }
            "skip" => Ok(None),
            other => Err(unexpected(other)),
        }
    }

    async fn refresh_due(&self, tenant: &Tenant) -> Result<(), StoreError> {
        let invocation = self.invocation(&self.scripts.reindex, tenant, 0);
        let mut conn = self.conn.clone();
        self.due
            .settle(&mut conn, tenant.as_str(), || async {
                let reply = self.run(&invocation).await?;
                let next = reply.payload.as_ref().map(text).unwrap_or_default();
                Ok::<_, StoreError>(next.parse::<i64>().ok())
            })
            .await
            .map(|_| ())
    }

    async fn subscribe(&self) -> broadcast::Receiver<Change> {
        let receiver = self.changes.subscribe();
        self.start_feed();
        let mut live = self.live.subscribe();
        // Bounded: with Redis unreachable the watcher still works by its periodic re-read.
        let _ = tokio::time::timeout(FEED_WAIT, live.wait_for(|live| *live)).await;
        receiver
    }
}

/// A script's reply: a status word and its payload.
struct Reply {
    status: String,
    payload: Option<Value>,
}

impl Reply {
    fn parse(value: Value) -> Result<Self, StoreError> {
        let Value::Array(mut parts) = value else {
            return Err(corrupt("script reply is not an array"));
        };
        if parts.is_empty() {
            return Err(corrupt("empty script reply"));
        }
        let status = text(&parts.remove(0));
        Ok(Self {
            status,
            payload: parts.into_iter().next(),
        })
    }

    fn item(&self) -> Result<ItemRecord, StoreError> {
        self.payload
            .as_ref()
            .map_or_else(|| Err(corrupt("reply without item")), parse_item)
    }
}

fn refusal(status: &str, reply: &Reply) -> StoreError {
    match status {
        "not_found" => StoreError::NotFound,
        "lease_not_held" => StoreError::LeaseNotHeld,
        "not_pending" => StoreError::NotPending,
        "terminal" => StoreError::Terminal(
            reply
                .payload
                .as_ref()
                .map_or(0, |v| i32::try_from(number(v)).unwrap_or(0)),
        ),
        other => unexpected(other),
    }
}

fn unexpected(status: &str) -> StoreError {
    corrupt(&format!("unexpected script status {status:?}"))
}

fn corrupt(what: &str) -> StoreError {
    StoreError::Corrupt(what.to_string())
}

fn bytes(value: &Value) -> &[u8] {
    match value {
        Value::BulkString(b) => b,
        Value::SimpleString(s) => s.as_bytes(),
        _ => &[],
    }
}

fn text(value: &Value) -> String {
    match value {
        Value::Int(n) => n.to_string(),
        other => String::from_utf8_lossy(bytes(other)).into_owned(),
    }
}

fn number(value: &Value) -> i64 {
    match value {
        Value::Int(n) => *n,
        other => text(other).parse().unwrap_or(0),
    }
}

/// Field/value pairs of a flat HGETALL array (or a RESP3 map).
fn pairs(value: &Value) -> Vec<(String, String)> {
    match value {
        Value::Array(flat) => flat
            .chunks(2)
            .filter_map(|pair| match pair {
                [field, value] => Some((text(field), text(value))),
                _ => None,
            })
            .collect(),
        Value::Map(map) => map.iter().map(|(f, v)| (text(f), text(v))).collect(),
        _ => Vec::new(),
    }
}

/// An item from its hash.
fn parse_item(value: &Value) -> Result<ItemRecord, StoreError> {
    let entries: Vec<(String, &Value)> = match value {
        Value::Array(flat) => flat
            .chunks(2)
            .filter_map(|pair| match pair {
                [field, value] => Some((text(field), value)),
                _ => None,
            })
            .collect(),
        Value::Map(map) => map.iter().map(|(f, v)| (text(f), v)).collect(),
        _ => return Err(corrupt("item is not a hash")),
    };
    let field = |name: &str| entries.iter().find(|(f, _)| f == name).map(|(_, v)| *v);
    let string = |name: &str| field(name).map(text).unwrap_or_default();
    let int = |name: &str| field(name).map_or(0, number);
    let id = string("id");
    if id.is_empty() {
        return Err(StoreError::NotFound);
    }
    let body = ReviewItem::decode(field("body").map_or(&[][..], bytes))
        .map_err(|e| corrupt(&format!("item {id} body: {e}")))?;
    let lease_id = string("lease");
    let lease = (!lease_id.is_empty()).then(|| LeaseRecord {
        lease_id,
        reviewer: string("reviewer"),
        expire_ms: int("lease_exp"),
    });
    let decision = field("verdict").map(|_| DecisionRecord {
        verdict: i32::try_from(int("verdict")).unwrap_or(0),
        edited_content: string("edited"),
        reviewer: string("decider"),
        comment: string("comment"),
        decide_ms: int("decided"),
    });
    Ok(ItemRecord {
        id,
        queue: string("queue"),
        state: i32::try_from(int("state")).unwrap_or(0),
        priority: i32::try_from(int("prio")).unwrap_or(0),
        create_ms: int("created"),
        sla_ms: int("sla"),
        version: int("ver"),
        lease,
        decision,
        body,
    })
}

#[derive(serde::Deserialize)]
struct RawAudit {
    id: String,
    item: String,
    action: i32,
    actor: String,
    time: String,
    detail: String,
}

fn parse_audit(event: &str) -> Result<AuditRecord, StoreError> {
    let raw: RawAudit =
        serde_json::from_str(event).map_err(|e| corrupt(&format!("audit event: {e}")))?;
    Ok(AuditRecord {
        id: raw.id,
        item: raw.item,
        action: raw.action,
        actor: raw.actor,
        time: raw.time.parse().unwrap_or(0),
        // cjson encodes an empty table as `{}`; keep it an object.
        detail: raw.detail,
    })
}
