//! The tenants with work due, for a sweeper that does not know the tenants (the budget's expired
//! holds, the review queue's lapsed leases and SLA deadlines).
//!
//! # Why not one sorted set written by the scripts
//!
//! A tenant's work (its holds, its leases) lives in the tenant's hash slot, and the sweeper needs
//! one index of every tenant. On a single Redis the scripts used to keep that index themselves; on
//! a Redis Cluster the index is in a slot of its own ([`KeySpace::shared`]), so no script can touch
//! it together with a tenant's keys. The index is therefore kept next to the scripts, never inside
//! them, by a protocol that never loses work:
//!
//! - After a script gives a tenant work due at `t`, the caller [marks](DueTenants::mark) it: the
//!   tenant's score becomes `min(score, t)` and its *generation* goes up, in one step. Marks only
//!   ever lower a score, so they commute: concurrent marks leave the earliest.
//! - The sweeper takes the [due](DueTenants::due) tenants, does their work, then
//!   [settles](DueTenants::settle) each: it reads the generation first, recomputes the tenant's next
//!   due time in the tenant's slot, and then sets the score to it (or removes the tenant) only if
//!   the generation is unchanged. A mark that landed after the read changed the generation, so the
//!   settle keeps the earlier score instead and the tenant is looked at again; a mark that landed
//!   before the read belongs to work the recomputation saw.
//!
//! A caller that dies between its script and its mark leaves work the index does not know of
//! until the tenant's next mark; each store says what that costs it (a hold past its expiry
//! still counts against the budget until then, it never lets a reservation overspend).
//!
//! # Keys
//!
//! `<prefix>:{<service>:due}:at`, a sorted set of tenants by the earliest time something of theirs
//! is due, and `<prefix>:{<service>:due}:gen`, a hash of tenant to generation. Both share one hash
//! tag, so each step is one atomic script on a cluster too.

use redis::Script;

use crate::store::{KeySpace, RedisConnection};

/// `min(score, due)` and a new generation, atomically. KEYS: at, gen. ARGV: tenant, due.
const MARK: &str = r"
redis.call('HINCRBY', KEYS[2], ARGV[1], 1)
redis.call('ZADD', KEYS[1], 'LT', ARGV[2], ARGV[1])
return 0
";

/// Sets or removes the tenant's score if its generation is still the one read before the
/// recomputation; otherwise only lowers it. KEYS: at, gen. ARGV: tenant, generation read, next due
/// ('' when nothing is due).
const SETTLE: &str = r"
local current = redis.call('HGET', KEYS[2], ARGV[1]) or '0'
if current == ARGV[2] then
  if ARGV[3] == '' then
    redis.call('ZREM', KEYS[1], ARGV[1])
    redis.call('HDEL', KEYS[2], ARGV[1])
    return 1
  end
  redis.call('ZADD', KEYS[1], ARGV[3], ARGV[1])
  return 1
end
if ARGV[3] ~= '' then
  redis.call('ZADD', KEYS[1], 'LT', ARGV[3], ARGV[1])
end
return 0
";

/// The index of tenants with work due of one service ([module docs](self)). Cheap to clone.
#[derive(Debug, Clone)]
pub struct DueTenants {
    at: String,
    generation: String,
    scripts: std::sync::Arc<(Script, Script)>,
}

impl DueTenants {
    /// The index of `service` (e.g. `"budget"`) under `prefix`.
    pub fn new(prefix: &str, service: &str) -> Self {
        let keys = KeySpace::shared(prefix, service, "due");
        Self {
            at: keys.key("at"),
            generation: keys.key("gen"),
            scripts: std::sync::Arc::new((Script::new(MARK), Script::new(SETTLE))),
        }
    }

    /// Records that `tenant` has work due at `due_ms` (Unix ms), after the script that gave it
    /// the work. Idempotent; an earlier mark wins.
    pub async fn mark(
        &self,
        conn: &mut RedisConnection,
        tenant: &str,
        due_ms: i64,
    ) -> redis::RedisResult<()> {
        self.scripts
            .0
            .key(&self.at)
            .key(&self.generation)
            .arg(tenant)
            .arg(due_ms)
            .invoke_async::<i64>(conn)
            .await
            .map(|_| ())
    }

    /// Up to `limit` tenants with something due at `now_ms`, most overdue first.
    pub async fn due(
        &self,
        conn: &mut RedisConnection,
        now_ms: i64,
        limit: usize,
    ) -> redis::RedisResult<Vec<String>> {
        redis::cmd("ZRANGE")
            .arg(&self.at)
            .arg("-inf")
            .arg(now_ms)
            .arg("BYSCORE")
            .arg("LIMIT")
            .arg(0)
            .arg(limit)
            .query_async(conn)
            .await
    }

    /// Recomputes when `tenant` is next due with `next` (which reads the tenant's own keys: None
    /// when nothing is) and records it, without losing a concurrent [`DueTenants::mark`]. Returns
    /// what `next` returned.
    pub async fn settle<F, Fut, E>(
        &self,
        conn: &mut RedisConnection,
        tenant: &str,
        next: F,
    ) -> Result<Option<i64>, E>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = Result<Option<i64>, E>>,
        E: From<redis::RedisError>,
    {
        let read: Option<i64> = redis::cmd("HGET")
            .arg(&self.generation)
            .arg(tenant)
            .query_async(conn)
            .await?;
        let due = next().await?;
        let _: i64 = self
            .scripts
            .1
            .key(&self.at)
            .key(&self.generation)
            .arg(tenant)
            .arg(read.unwrap_or(0))
            .arg(due.map(|due| due.to_string()).unwrap_or_default())
            .invoke_async(conn)
            .await?;
        Ok(due)
    }
}
