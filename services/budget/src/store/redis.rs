//! The Redis store: every state change is one Lua script, so each is atomic.
//!
//! # Key layout
//!
//! Every key of a tenant goes through [`KeySpace`] (`<prefix>:{<tenant>}:budget:...`), so tenants
//! are isolated and, on a Redis Cluster, all of a tenant's keys are in one hash slot (the tenant is
//! the hash tag):
//!
//! | key | type | holds |
//! |---|---|---|
//! | `budget:<scope>` | hash | `gen`, `hard`, `soft` (micro-USD), `frac`, period (`pk`, `unit`, `tz`, `win`) |
//! | `ctr:<scope>:<period>` | hash | `held`; `spent` (calendar) or `b<bucket>` (rolling); `soft` once the soft-limit event fired |
//! | `res:<id>` | hash | the reservation: state, amount, model, times, and per scope its counter and budget keys |
//! | `idem:<request_id>` | string | `<reservation key>\|<fingerprint>` for the idempotency TTL |
//! | `use:<scope>:<hour>` | hash | per model: cost, requests, input/output/cached tokens, for GetSpend |
//! | `expiries` | sorted set | the tenant's HELD reservation keys by expiry, for the sweeper |
//!
//! `<scope>` is `tenant`, `api_key:<id>`, `user:<id>` or `session:<id>`: every scope is a
//! tenant's, so a reservation over several scopes is still one slot and one script. `<period>`
//! comes from [`crate::period::Window::counter_id`], so a new period is a new, empty counter (the
//! reset is atomic because nothing has to be reset). The only keys shared by all tenants are the
//! sweeper's index of tenants with holds ([`DueTenants`], `<prefix>:{budget:due}:at` and `:gen`),
//! which no script touches.
//!
//! # Scripts
//!
//! - `reserve.lua`: checks every scope and then holds on every scope, in one step; a retry with
//!   the same request id returns the first reservation. Invariant: held + spent <= hard.
//! - `commit.lua`: gives the hold back and adds the actual cost to spend in one step; charged at
//!   most once; claims the soft-limit event of the period with HSETNX (exactly once).
//! - `release.lua`: HELD -> RELEASED, giving the hold back.
//! - `sweep.lua`: HELD -> EXPIRED for one tenant's due reservations; atomic with respect to
//!   Commit and Release, so a hold is given back exactly once.
//! - `set_budget.lua`: replaces a budget and bumps its generation; Reserve refuses to apply a plan
//!   made with an older generation, so a period or limit change never races a reservation.
//!
//! Each script touches the keys of one tenant only (the scripts also read key names recorded in
//! the reservation hash, which are the same tenant's), so they run unchanged on a Redis Cluster.
//!
//! # Sweeping
//!
//! After a reservation is held, the store marks its tenant in [`DueTenants`] with the hold's
//! expiry; the sweeper expires each due tenant's holds and settles the tenant's next expiry. A
//! refused reservation marks its tenant due now, so a hold whose mark was lost (the process died
//! between the script and the mark) is swept as soon as the tenant is refused for it. Until then a
//! lost mark costs only budget held longer than its TTL, never an overspend: a hold only ever
//! makes Reserve stricter, and Commit or Release of an expired hold expires it on the spot.

use ::redis::{AsyncCommands, Script};
use weir_mesh::due::DueTenants;
use weir_mesh::store::RedisConnection;
use weir_mesh::{store::KeySpace, tenant::Tenant};

use super::{
    BudgetRecord, CommitInput, CommitOutcome, CounterState, ModelSpendRow, ReservationRecord,
    ReserveInput, ReserveOutcome, SoftCrossing, State, StoreError, merge_rows,
};
use crate::{
    period::{CalendarUnit, Period, Window, parse_tz},
    scope::Scope,
};

const PRELUDE: &str = include_str!("lua/prelude.lua");

/// The Redis store.
#[derive(Clone)]
pub struct RedisStore {
    conn: RedisConnection,
    prefix: String,
    retention_ms: i64,
    idempotency_ttl_ms: i64,
    usage_retention_ms: i64,
    scripts: std::sync::Arc<Scripts>,
    due: DueTenants,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

struct Scripts {
    reserve: Script,
    commit: Script,
    release: Script,
    sweep: Script,
    set_budget: Script,
}

fn script(body: &str) -> Script {
    Script::new(&format!("{PRELUDE}\n{body}"))
}

impl RedisStore {
    /// A store on `conn` under `prefix`. Settled reservations are kept `retention` (what a retried
    /// Commit can replay), idempotency records `idempotency_ttl`, per-hour spend `usage_retention`.
    pub fn new(
        conn: RedisConnection,
        prefix: &str,
        retention: std::time::Duration,
        idempotency_ttl: std::time::Duration,
        usage_retention: std::time::Duration,
    ) -> Self {
        let ms = |d: std::time::Duration| i64::try_from(d.as_millis()).unwrap_or(i64::MAX).max(1);
        Self {
            conn,
            prefix: prefix.to_string(),
            retention_ms: ms(retention),
            idempotency_ttl_ms: ms(idempotency_ttl),
            usage_retention_ms: ms(usage_retention),
            scripts: std::sync::Arc::new(Scripts {
                reserve: script(include_str!("lua/reserve.lua")),
                commit: script(include_str!("lua/commit.lua")),
                release: script(include_str!("lua/release.lua")),
                sweep: script(include_str!("lua/sweep.lua")),
                set_budget: script(include_str!("lua/set_budget.lua")),
            }),
            due: DueTenants::new(prefix, "budget"),
        }
    }

    fn keys(&self, tenant: &Tenant) -> KeySpace {
        KeySpace::new(&self.prefix, tenant, "budget")
    }

    fn expiries(keys: &KeySpace) -> String {
        keys.key("expiries")
    }

    fn budget_key(keys: &KeySpace, scope: &Scope) -> String {
        keys.key2("budget", &scope.key())
    }

    fn counter_key(keys: &KeySpace, scope: &Scope, window: &Window) -> String {
        keys.key2("ctr", &format!("{}:{}", scope.key(), window.counter_id))
    }

    fn usage_key(keys: &KeySpace, scope: &Scope) -> String {
        keys.key2("use", &scope.key())
    }

    pub(super) async fn budgets(
        &self,
        tenant: &Tenant,
        scopes: &[Scope],
    ) -> Result<Vec<Option<BudgetRecord>>, StoreError> {
        let keys = self.keys(tenant);
        let mut pipe = ::redis::pipe();
        for scope in scopes {
            pipe.hgetall(Self::budget_key(&keys, scope));
        }
        let mut conn = self.conn.clone();
        let maps: Vec<std::collections::HashMap<String, String>> =
            pipe.query_async(&mut conn).await?;
        maps.into_iter().map(|m| parse_budget(&m)).collect()
    }

    pub(super) async fn reserve(
        &self,
        tenant: &Tenant,
        input: &ReserveInput,
    ) -> Result<ReserveOutcome, StoreError> {
        let keys = self.keys(tenant);
        let rkey = keys.key2("res", &input.id);
        let mut call = self.scripts.reserve.prepare_invoke();
        call.key(keys.key2("idem", &input.request_id))
            .key(&rkey)
            .key(Self::expiries(&keys));
        call.arg(&input.id)
            .arg(&input.fingerprint)
            .arg(input.amount)
            .arg(input.now_ms)
            .arg(input.expire_ms)
            .arg(self.idempotency_ttl_ms)
            .arg(self.retention_ms)
            .arg(&input.model)
            .arg(input.scopes.len());
        for plan in &input.scopes {
            call.key(Self::budget_key(&keys, &plan.scope));
            match &plan.window {
                Some(window) => call.key(Self::counter_key(&keys, &plan.scope, window)),
                // No counter: a placeholder in the tenant's slot (see reserve.lua).
                None => call.key(&rkey),
            };
            let (bucket_ms, buckets) = plan
                .window
                .as_ref()
                .map_or((0, 0), |w| (w.bucket_ms, w.buckets));
            call.arg(plan.scope.key())
                .arg(plan.generation)
                .arg(bucket_ms)
                .arg(buckets);
        }
        for plan in &input.scopes {
            call.arg(plan.window.as_ref().map_or(0, |w| w.end_ms))
                .arg(Self::usage_key(&keys, &plan.scope));
        }
        let mut conn = self.conn.clone();
        let reply: Vec<String> = call.invoke_async(&mut conn).await?;
        let code = reply.first().map(String::as_str).unwrap_or_default();
        match code {
            "OK" => {
                self.due
                    .mark(&mut conn, tenant.as_str(), input.expire_ms)
                    .await?
            }
            // Whatever holds the budget, make sure the sweeper looks at it (see the module docs).
            "EXHAUSTED" => {
                self.due
                    .mark(&mut conn, tenant.as_str(), input.now_ms)
                    .await?
            }
            _ => {}
        }
        Ok(match code {
            "OK" | "REPLAY" => ReserveOutcome::Held(parse_reservation(&reply)?.0),
            "STALE" => ReserveOutcome::Stale,
            "MISMATCH" => ReserveOutcome::Mismatch,
            "GONE" => ReserveOutcome::Gone,
            "EXHAUSTED" => {
                let num = |i: usize| -> Result<i64, StoreError> { int(reply.get(i)) };
                let index = usize::try_from(num(1)?)
                    .ok()
                    .and_then(|i| i.checked_sub(1))
                    .ok_or_else(|| StoreError::Corrupt("scope index".into()))?;
                let oldest = num(2)?;
                ReserveOutcome::Exhausted {
                    index,
                    oldest_bucket: (oldest >= 0).then_some(oldest),
                    held: num(3)?,
                    spent: num(4)?,
                    hard: num(5)?,
                }
            }
            other => return Err(StoreError::Corrupt(format!("reserve replied {other:?}"))),
        })
    }

    pub(super) async fn reservation(
        &self,
        tenant: &Tenant,
        id: &str,
    ) -> Result<Option<ReservationRecord>, StoreError> {
        let rkey = self.keys(tenant).key2("res", id);
        let mut conn = self.conn.clone();
        let map: std::collections::HashMap<String, String> = conn.hgetall(&rkey).await?;
        if map.is_empty() {
            return Ok(None);
        }
        let get = |f: &str| map.get(f).cloned().unwrap_or_default();
        let n = int(map.get("n"))?;
        let mut reply = vec![
            "OK".to_string(),
            get("id"),
            get("st"),
            get("amt"),
            get("com"),
            map.get("ref").cloned().unwrap_or_else(|| "0".into()),
            map.get("ovr").cloned().unwrap_or_else(|| "0".into()),
            get("ct"),
            get("ex"),
            get("mdl"),
            get("n"),
        ];
        for i in 1..=n {
            reply.push(get(&format!("s{i}")));
        }
        Ok(Some(parse_reservation(&reply)?.0))
    }

    pub(super) async fn commit(
        &self,
        tenant: &Tenant,
        input: &CommitInput,
    ) -> Result<CommitOutcome, StoreError> {
        let keys = self.keys(tenant);
        let rkey = keys.key2("res", &input.id);
        let mut call = self.scripts.commit.prepare_invoke();
        call.key(&rkey)
            .key(Self::expiries(&keys))
            .arg(input.now_ms)
            .arg(input.cost)
            .arg(&input.request_id)
            .arg(input.tokens.input)
            .arg(input.tokens.output)
            .arg(input.tokens.cached_input)
            .arg(self.retention_ms)
            .arg(self.usage_retention_ms);
        let mut conn = self.conn.clone();
        let reply: Vec<String> = call.invoke_async(&mut conn).await?;
        let code = reply.first().map(String::as_str).unwrap_or_default();
        if code == "NOTFOUND" {
            return Ok(CommitOutcome::NotFound);
        }
        let (record, extra) = parse_reservation(&reply)?;
        Ok(match code {
            "OK" => {
                let mut crossings = Vec::new();
                for chunk in extra.chunks(3) {
                    if let [scope, spent, soft] = chunk {
                        crossings.push(SoftCrossing {
                            scope: Scope::from_key(scope)
                                .ok_or_else(|| StoreError::Corrupt(format!("scope {scope}")))?,
                            spent: int(Some(spent))?,
                            soft: int(Some(soft))?,
                        });
                    }
                }
                CommitOutcome::Charged(record, crossings)
            }
            "REPLAY" => CommitOutcome::Replayed(record),
            "RELEASED" => CommitOutcome::Released(record),
            "CONFLICT" => CommitOutcome::Conflict(record),
            other => return Err(StoreError::Corrupt(format!("commit replied {other:?}"))),
        })
    }

    pub(super) async fn release(
        &self,
        tenant: &Tenant,
        id: &str,
        now_ms: i64,
    ) -> Result<Option<ReservationRecord>, StoreError> {
        let keys = self.keys(tenant);
        let rkey = keys.key2("res", id);
        let mut call = self.scripts.release.prepare_invoke();
        call.key(&rkey)
            .key(Self::expiries(&keys))
            .arg(now_ms)
            .arg(self.retention_ms);
        let mut conn = self.conn.clone();
        let reply: Vec<String> = call.invoke_async(&mut conn).await?;
        if reply.first().map(String::as_str) == Some("NOTFOUND") {
            return Ok(None);
        }
        Ok(Some(parse_reservation(&reply)?.0))
    }

    /// Expires the due holds of up to `limit` due tenants (each tenant's, `limit` at a time,
    /// until none is due). Returns the tenants looked at and the reservations expired.
    pub(super) async fn sweep(
        &self,
        now_ms: i64,
        limit: usize,
    ) -> Result<(usize, usize), StoreError> {
        let mut conn = self.conn.clone();
        let tenants = self.due.due(&mut conn, now_ms, limit).await?;
        let mut expired = 0;
        for name in &tenants {
            let Ok(tenant) = Tenant::new(name) else {
                continue;
            };
            let zkey = Self::expiries(&self.keys(&tenant));
            let mut sweeper = conn.clone();
            self.due
                .settle(&mut conn, name, || async {
                    loop {
                        let (seen, gone, next): (usize, usize, i64) = self
                            .scripts
                            .sweep
                            .key(&zkey)
                            .arg(now_ms)
                            .arg(limit)
                            .arg(self.retention_ms)
                            .invoke_async(&mut sweeper)
                            .await?;
                        expired += gone;
                        if seen < limit {
                            return Ok::<_, StoreError>((next >= 0).then_some(next));
                        }
                    }
                })
                .await?;
        }
        Ok((tenants.len(), expired))
    }

    pub(super) async fn set_budget(
        &self,
        tenant: &Tenant,
        scope: &Scope,
        budget: &BudgetRecord,
    ) -> Result<i64, StoreError> {
        let key = Self::budget_key(&self.keys(tenant), scope);
        let (kind, unit, tz, window_ms) = match budget.period {
            Period::Calendar { unit, tz } => ("c", unit.code(), tz.name().to_string(), 0),
            Period::Rolling { window } => (
                "r",
                "",
                String::new(),
                i64::try_from(window.as_millis()).unwrap_or(i64::MAX),
            ),
        };
        let mut call = self.scripts.set_budget.prepare_invoke();
        call.key(key)
            .arg(budget.hard)
            .arg(budget.soft)
            .arg(budget.fraction.to_string())
            .arg(kind)
            .arg(unit)
            .arg(tz)
            .arg(window_ms);
        let mut conn = self.conn.clone();
        Ok(call.invoke_async(&mut conn).await?)
    }

    pub(super) async fn counter(
        &self,
        tenant: &Tenant,
        scope: &Scope,
        window: &Window,
        now_ms: i64,
    ) -> Result<CounterState, StoreError> {
        let key = Self::counter_key(&self.keys(tenant), scope, window);
        let mut conn = self.conn.clone();
        let map: std::collections::HashMap<String, String> = conn.hgetall(&key).await?;
        let held = map
            .get("held")
            .map(|v| int(Some(v)))
            .transpose()?
            .unwrap_or(0);
        let (spent, oldest) = if window.bucket_ms == 0 {
            (
                map.get("spent")
                    .map(|v| int(Some(v)))
                    .transpose()?
                    .unwrap_or(0),
                None,
            )
        } else {
            let first = now_ms.div_euclid(window.bucket_ms) - window.buckets + 1;
            let mut sum = 0i64;
            let mut oldest: Option<i64> = None;
            for (field, value) in &map {
                let Some(bucket) = field.strip_prefix('b').and_then(|b| b.parse::<i64>().ok())
                else {
                    continue;
                };
                let value = int(Some(value))?;
                if bucket >= first && value != 0 {
                    sum = sum.saturating_add(value);
                    oldest = Some(oldest.map_or(bucket, |o| o.min(bucket)));
                }
            }
            (sum, oldest)
        };
        Ok(CounterState {
            held,
            spent,
            soft_reached: map.contains_key("soft"),
            oldest_bucket: oldest,
        })
    }

    pub(super) async fn spend(
        &self,
        tenant: &Tenant,
        scope: &Scope,
        hours: &[i64],
    ) -> Result<Vec<ModelSpendRow>, StoreError> {
        let base = Self::usage_key(&self.keys(tenant), scope);
        let mut rows = Vec::new();
        let mut conn = self.conn.clone();
        for chunk in hours.chunks(512) {
            let mut pipe = ::redis::pipe();
            for hour in chunk {
                pipe.hgetall(format!("{base}:{hour}"));
            }
            let maps: Vec<std::collections::HashMap<String, String>> =
                pipe.query_async(&mut conn).await?;
            for map in maps {
                let mut by_model: std::collections::BTreeMap<String, ModelSpendRow> =
                    Default::default();
                for (field, value) in &map {
                    let Some((model, stat)) = field.rsplit_once('|') else {
                        continue;
                    };
                    let row = by_model
                        .entry(model.to_string())
                        .or_insert_with(|| ModelSpendRow {
                            model: model.to_string(),
                            ..ModelSpendRow::default()
                        });
                    let value = int(Some(value))?;
                    match stat {
                        "c" => row.cost = value,
                        "n" => row.requests = value,
                        "i" => row.input = value,
                        "o" => row.output = value,
                        "h" => row.cached_input = value,
                        _ => {}
                    }
                }
                rows.extend(by_model.into_values());
            }
        }
        Ok(merge_rows(rows))
    }
}

fn int(value: Option<&String>) -> Result<i64, StoreError> {
    value
        .and_then(|v| v.parse::<i64>().ok())
        .ok_or_else(|| StoreError::Corrupt(format!("expected an integer, got {value:?}")))
}

/// Parses a budget hash (empty: no budget).
fn parse_budget(
    map: &std::collections::HashMap<String, String>,
) -> Result<Option<BudgetRecord>, StoreError> {
    if map.is_empty() {
        return Ok(None);
    }
    let get = |f: &str| map.get(f).map(String::as_str).unwrap_or_default();
    let period = match get("pk") {
        "c" => Period::Calendar {
            unit: CalendarUnit::from_code(get("unit"))
                .ok_or_else(|| StoreError::Corrupt(format!("period unit {:?}", get("unit"))))?,
            tz: parse_tz(get("tz")).map_err(|e| StoreError::Corrupt(e.to_string()))?,
        },
        "r" => Period::Rolling {
            window: std::time::Duration::from_millis(
                u64::try_from(int(map.get("win"))?).unwrap_or(0),
            ),
        },
        other => return Err(StoreError::Corrupt(format!("period kind {other:?}"))),
    };
    Ok(Some(BudgetRecord {
        generation: int(map.get("gen"))?,
        hard: int(map.get("hard"))?,
        soft: int(map.get("soft"))?,
        fraction: get("frac").parse().unwrap_or(0.0),
        period,
    }))
}

/// Parses the reservation part of a script reply; returns it and the rest of the reply.
fn parse_reservation(reply: &[String]) -> Result<(ReservationRecord, &[String]), StoreError> {
    let field = |i: usize| reply.get(i).map(String::as_str).unwrap_or_default();
    let num = |i: usize| int(reply.get(i));
    let n = usize::try_from(num(10)?).map_err(|_| StoreError::Corrupt("scope count".into()))?;
    let scopes = (0..n)
        .map(|i| {
            Scope::from_key(field(11 + i))
                .ok_or_else(|| StoreError::Corrupt(format!("scope {:?}", field(11 + i))))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let record = ReservationRecord {
        id: field(1).to_string(),
        state: State::from_code(field(2))
            .ok_or_else(|| StoreError::Corrupt(format!("state {:?}", field(2))))?,
        amount: num(3)?,
        committed: if field(4).is_empty() {
            None
        } else {
            Some(num(4)?)
        },
        refunded: num(5)?,
        overrun: num(6)?,
        created_ms: num(7)?,
        expire_ms: num(8)?,
        model: field(9).to_string(),
        scopes,
    };
    Ok((record, reply.get(11 + n..).unwrap_or_default()))
}
