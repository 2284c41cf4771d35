//! A Redis Cluster master killed under load (docs/redis.md, "Durability"): session appends and
//! budget reservations run through a real session service and a real budget service whose stores
//! are the cluster `WEIR_TEST_REDIS_CLUSTER_URL` (tests/cluster/start.sh), the master holding the
//! `{default}` slot (the sessions' and the tenant budget's keys) is SIGKILLed, its replica takes
//! over, and then:
//! - every failed append, Reserve and Commit failed with UNAVAILABLE (retryable), and each
//!   worker's retries of the same `request_id` succeed once the replica is promoted;
//! - no turn is duplicated, and a turn that was acknowledged but is not in the session afterwards
//!   (lost with the master) was acknowledged within [`LOSS_WINDOW`] of the kill: what the docs say
//!   a failover can lose (the master's unreplicated writes), and nothing older;
//! - the tenant's recorded spend is at most the sum of the acknowledged commits (a Commit retried
//!   across the failover charges once), and what it misses is no more than the commits
//!   acknowledged within [`LOSS_WINDOW`] of the kill; a Commit finds no reservation only if its
//!   Reserve was acknowledged in that window; every hold is settled afterwards (held comes back
//!   to 0) and held + spent stays within the hard limit;
//! - the killed node is started again from its own config and rejoins as a replica, so the
//!   cluster is whole for what runs next.
//!
//! Skipped, with a printed reason, when `WEIR_TEST_REDIS_CLUSTER_URL` is unset.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    collections::{BTreeMap, HashSet},
    future::Future,
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, SystemTime},
};

use tokio::{sync::Mutex, time::Instant};
use tonic::{Code, Status};
use weir::stack::Service;
use weir_proto::{
    budget::{
        Budget, CalendarPeriod, CommitRequest, GetBudgetRequest, GetSpendRequest, Period,
        PeriodUnit, ReserveRequest, Scope, ScopeKind, SetBudgetRequest, period,
    },
    session::{AppendTurnsRequest, CreateSessionRequest, ListTurnsRequest},
};
use weir_tests::{Mesh, delete_prefix_at, eventually, reason, unique_prefix, user};

/// Appending sessions, one worker each.
const WORKERS: usize = 8;
/// Appends acknowledged before the kill, so that the load is running when the master dies.
const ACKED_BEFORE_KILL: usize = 300;
/// Appends, and commits, acknowledged longer than [`LOSS_WINDOW`] before the kill: writes the
/// failover must not lose, so that the loss checks can fail.
const ACKED_BEFORE_WINDOW: usize = 100;
/// Reserve-then-Commit loops against the tenant's budget, one worker each.
const BUDGET_WORKERS: usize = 4;
/// Appends (and commits) each worker must have acknowledged after the promotion.
const ACKED_AFTER_PROMOTION: usize = 20;
/// What each Reserve holds, in micro-USD; every commit costs less (see [`cost`]).
const HOLD_MICROS: i64 = 5_000;
/// The tenant's hard limit: far above what the test spends, so no Reserve is refused.
const HARD_LIMIT_MICROS: i64 = 1_000_000_000_000;
/// A reservation's TTL: a hold whose acknowledged Commit is lost with the master is HELD again on
/// the replica, and nothing will commit it; the sweeper expires it at this TTL, so held comes back
/// to 0 within the test. A Commit that outlives it (delayed by the failover) is still charged.
const HOLD_TTL: Duration = Duration::from_secs(2);
/// How long a worker retries one call on UNAVAILABLE before giving up (and failing the test).
const RETRY_FOR: Duration = Duration::from_secs(30);
/// How long before the kill an acknowledged write may have been and still be lost: the replica
/// trails its master by the replication lag (milliseconds on a healthy link), and docs/redis.md
/// promises no more than the last second.
const LOSS_WINDOW: Duration = Duration::from_secs(1);
/// Without authentication every request is the `default` tenant's, and every session key carries
/// its hash tag.
const TENANT_TAG: &str = "{default}";

/// One acknowledged budget commit: what it cost, and when its answer came.
#[derive(Debug, Clone)]
struct Charge {
    worker: usize,
    cost: i64,
    at: Instant,
}

/// One acknowledged append.
#[derive(Debug, Clone)]
struct Ack {
    worker: usize,
    content: String,
    seq: i64,
    at: Instant,
}

#[derive(Debug, Default)]
struct Load {
    acks: Vec<Ack>,
    /// Acknowledged commits.
    charges: Vec<Charge>,
    /// When each Reserve was acknowledged whose Commit then found no reservation (NOT_FOUND): a
    /// hold lost with the master.
    lost_holds: Vec<Instant>,
    /// Retried failures by call, code and reason (`"Commit Unavailable REDIS_UNAVAILABLE"`).
    retried: BTreeMap<String, usize>,
    other_errors: Vec<String>,
}

impl Load {
    fn unavailable(&mut self, call: &str, status: &Status) {
        *self
            .retried
            .entry(format!("{call} {:?} {}", status.code(), reason(status)))
            .or_default() += 1;
    }
}

fn config(cluster: &str, prefix: &str) -> String {
    format!(
        r#"
[session]
redis_url = "{cluster}"
key_prefix = "{prefix}"
default_ttl = "10m"
tombstone_ttl = "10m"
default_model = "sim-small"
summarize = false

[budget]
redis_url = "{cluster}"
key_prefix = "{prefix}"
"#
    )
}

/// A plain connection to one cluster node, for the admin commands a test needs (`CLUSTER NODES`,
/// `INFO`); None when the node does not answer.
async fn node(port: u16) -> Option<redis::aio::MultiplexedConnection> {
    let client = redis::Client::open(format!("redis://127.0.0.1:{port}")).ok()?;
    tokio::time::timeout(
        Duration::from_secs(1),
        client.get_multiplexed_async_connection(),
    )
    .await
    .ok()?
    .ok()
}

/// `command` on the node at `port`, as text; None when it does not answer.
async fn ask(port: u16, command: &[&str]) -> Option<String> {
    let mut connection = node(port).await?;
    let mut cmd = redis::cmd(command[0]);
    for arg in &command[1..] {
        cmd.arg(*arg);
    }
    let value: redis::Value =
        tokio::time::timeout(Duration::from_secs(1), cmd.query_async(&mut connection))
            .await
            .ok()?
            .ok()?;
    match value {
        redis::Value::Int(n) => Some(n.to_string()),
        other => redis::from_redis_value::<String>(other).ok(),
    }
}

/// A field of an `INFO` or `CLUSTER INFO` reply.
fn field(text: &str, name: &str) -> Option<String> {
    text.lines()
        .find_map(|line| line.trim().strip_prefix(&format!("{name}:")))
        .map(str::to_string)
}

/// The port of the healthy master serving `slot`, from `CLUSTER NODES` asked of `via`.
async fn owner(via: u16, slot: u16) -> Option<u16> {
    let nodes = ask(via, &["CLUSTER", "NODES"]).await?;
    nodes.lines().find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let flags = fields.get(2)?;
        if !flags.contains("master") || flags.contains("fail") {
            return None;
        }
        let serves = fields.iter().skip(8).any(|range| {
            let (low, high) = range.split_once('-').unwrap_or((range, range));
            matches!((low.parse::<u16>(), high.parse::<u16>()), (Ok(l), Ok(h)) if (l..=h).contains(&slot))
        });
        let address = fields.get(1)?.split(['@', ',']).next()?;
        serves.then(|| address.rsplit(':').next()?.parse().ok())?
    })
}

/// Every node of the cluster: the ports `CLUSTER NODES` lists, asked of `via`.
async fn all_ports(via: u16) -> Vec<u16> {
    let nodes = ask(via, &["CLUSTER", "NODES"]).await.unwrap_or_default();
    nodes
        .lines()
        .filter_map(|line| {
            let address = line.split_whitespace().nth(1)?.split(['@', ',']).next()?;
            address.rsplit(':').next()?.parse().ok()
        })
        .collect()
}

/// Starts a killed node again from its own config when dropped, so a failing test still leaves
/// the cluster able to heal (tests/cluster/start.sh restarts dead nodes too).
struct Restart(Option<String>);

impl Restart {
    fn now(&mut self) {
        if let Some(config) = self.0.take() {
            let status = Command::new("redis-server").arg(&config).status();
            assert!(
                status.is_ok_and(|s| s.success()),
                "redis-server {config} restarts the killed node"
            );
        }
    }
}

impl Drop for Restart {
    fn drop(&mut self) {
        if let Some(config) = self.0.take() {
            let _ = Command::new("redis-server").arg(config).status();
        }
    }
}

async fn worker(
    mesh: Arc<Mesh>,
    worker: usize,
    load: Arc<Mutex<Load>>,
    stop: Arc<AtomicBool>,
) -> usize {
    let session = format!("failover-{worker}");
    let mut client = mesh.session();
    let mut n = 0;
    while !stop.load(Ordering::Relaxed) {
        let content = format!("w{worker}-{n}");
        let request = AppendTurnsRequest {
            session_id: session.clone(),
            messages: vec![user(&content)],
            request_id: content.clone(),
            ..AppendTurnsRequest::default()
        };
        match client.append_turns(request).await {
            Ok(response) => {
                let response = response.into_inner();
                assert_eq!(response.first_seq, response.last_seq, "one turn each");
                load.lock().await.acks.push(Ack {
                    worker,
                    content,
                    seq: response.last_seq,
                    at: Instant::now(),
                });
                n += 1;
            }
            // Retryable: the same request id again, after a pause (it lands at most once).
            Err(status) if status.code() == Code::Unavailable => {
                load.lock().await.unavailable("AppendTurns", &status);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(status) => {
                load.lock().await.other_errors.push(format!("{status:?}"));
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    n
}

fn tenant_scope() -> Scope {
    Scope {
        kind: ScopeKind::Tenant.into(),
        id: String::new(),
    }
}

/// The cost of a worker's `n`th commit: varied, and below [`HOLD_MICROS`].
fn cost(n: usize) -> i64 {
    1_000 + i64::try_from(n % 997).unwrap()
}

/// `call` until it answers, retrying (the same request) on UNAVAILABLE after a pause and counting
/// each retry in `load`; any other failure, or UNAVAILABLE for longer than [`RETRY_FOR`], is
/// returned.
async fn retried<T, F, Fut>(load: &Mutex<Load>, name: &str, mut call: F) -> Result<T, Status>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<tonic::Response<T>, Status>>,
{
    let deadline = Instant::now() + RETRY_FOR;
    loop {
        match call().await {
            Ok(response) => return Ok(response.into_inner()),
            Err(status) if status.code() == Code::Unavailable && Instant::now() < deadline => {
                load.lock().await.unavailable(name, &status);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(status) => return Err(status),
        }
    }
}

/// Reserves against the tenant's budget and commits a known cost, in a loop, each call retried
/// with its own `request_id` until it answers; records each acknowledged commit. A worker finishes
/// the operation it is in before it looks at `stop`, so no charge is left unacknowledged.
async fn budget_worker(
    mesh: Arc<Mesh>,
    worker: usize,
    load: Arc<Mutex<Load>>,
    stop: Arc<AtomicBool>,
) {
    let client = mesh.budget();
    let mut n = 0;
    while !stop.load(Ordering::Relaxed) {
        let op = format!("b{worker}-{n}");
        let cost = cost(n);
        n += 1;
        let reserve = ReserveRequest {
            request_id: format!("{op}-reserve"),
            scopes: vec![tenant_scope()],
            amount_micros: HOLD_MICROS,
            ttl: Some(prost_types::Duration {
                seconds: i64::try_from(HOLD_TTL.as_secs()).unwrap(),
                nanos: 0,
            }),
            ..ReserveRequest::default()
        };
        let reserved = retried(&load, "Reserve", || {
            let (mut client, request) = (client.clone(), reserve.clone());
            async move { client.reserve(request).await }
        })
        .await;
        let reserved_at = Instant::now();
        let id = match reserved.map(|r| r.reservation.map(|r| r.id)) {
            Ok(Some(id)) => id,
            other => {
                load.lock()
                    .await
                    .other_errors
                    .push(format!("Reserve {op}: {other:?}"));
                continue;
            }
        };
        let commit = CommitRequest {
            reservation_id: id,
            request_id: format!("{op}-commit"),
            cost_micros: Some(cost),
            ..CommitRequest::default()
        };
        let committed = retried(&load, "Commit", || {
            let (mut client, request) = (client.clone(), commit.clone());
            async move { client.commit(request).await }
        })
        .await;
        let mut load = load.lock().await;
        match committed {
            Ok(response) if response.cost_micros == cost => load.charges.push(Charge {
                worker,
                cost,
                at: Instant::now(),
            }),
            // The reservation is gone: the Reserve's write was lost with the master.
            Err(status) if status.code() == Code::NotFound => load.lost_holds.push(reserved_at),
            other => load.other_errors.push(format!("Commit {op}: {other:?}")),
        }
    }
}

/// The fewest appends, and the fewest commits, any worker had acknowledged since `since`.
async fn acked_by_each_since(load: &Mutex<Load>, since: Instant) -> usize {
    let load = load.lock().await;
    let appends = (0..WORKERS).map(|w| {
        load.acks
            .iter()
            .filter(|a| a.worker == w && a.at > since)
            .count()
    });
    let commits = (0..BUDGET_WORKERS).map(|w| {
        load.charges
            .iter()
            .filter(|c| c.worker == w && c.at > since)
            .count()
    });
    appends.chain(commits).min().unwrap_or(0)
}

/// The tenant's budget, read through the service.
async fn tenant_budget(mesh: &Mesh) -> Budget {
    mesh.budget()
        .get_budget(GetBudgetRequest {
            scope: Some(tenant_scope()),
        })
        .await
        .expect("GetBudget after the failover")
        .into_inner()
        .budget
        .expect("a budget")
}

#[tokio::test]
async fn a_killed_master_fails_over_and_loses_at_most_its_last_instants() {
    let Ok(cluster) = std::env::var("WEIR_TEST_REDIS_CLUSTER_URL") else {
        eprintln!(
            "skipped: WEIR_TEST_REDIS_CLUSTER_URL is unset (tests/cluster/start.sh starts one)"
        );
        return;
    };
    let seeds: Vec<u16> = weir_mesh::store::cluster_nodes(&cluster)
        .expect("WEIR_TEST_REDIS_CLUSTER_URL is a redis+cluster:// URL")
        .iter()
        .filter_map(|node| node.rsplit(':').next()?.parse().ok())
        .collect();
    let seed = seeds[0];
    let slot: u16 = ask(seed, &["CLUSTER", "KEYSLOT", TENANT_TAG])
        .await
        .expect("the cluster answers")
        .parse()
        .unwrap();
    let victim = owner(seed, slot).await.expect("a master serves the slot");
    let info = ask(victim, &["INFO", "server"]).await.unwrap();
    let pid = field(&info, "process_id").expect("INFO server has process_id");
    let config_file = field(&info, "config_file").unwrap_or_default();
    assert!(
        !config_file.is_empty(),
        "the node on port {victim} was started from a config file, so it can be restarted"
    );
    let survivor = all_ports(seed)
        .await
        .into_iter()
        .find(|port| *port != victim)
        .expect("other nodes");

    let prefix = unique_prefix();
    let started = SystemTime::now();
    let mesh = Arc::new(
        Mesh::start_services(
            &config(&cluster, &prefix),
            &[Service::Session, Service::Budget],
        )
        .await,
    );
    mesh.budget()
        .set_budget(SetBudgetRequest {
            scope: Some(tenant_scope()),
            hard_limit_micros: HARD_LIMIT_MICROS,
            soft_limit_fraction: 0.0,
            period: Some(Period {
                kind: Some(period::Kind::Calendar(CalendarPeriod {
                    unit: PeriodUnit::Daily.into(),
                    time_zone: String::new(),
                })),
            }),
        })
        .await
        .expect("tenant budget set");
    for w in 0..WORKERS {
        mesh.session()
            .create_session(CreateSessionRequest {
                session_id: format!("failover-{w}"),
                ..CreateSessionRequest::default()
            })
            .await
            .expect("session created");
    }

    let load = Arc::new(Mutex::new(Load::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let workers: Vec<_> = (0..WORKERS)
        .map(|w| tokio::spawn(worker(mesh.clone(), w, load.clone(), stop.clone())))
        .collect();
    let budget_workers: Vec<_> = (0..BUDGET_WORKERS)
        .map(|w| tokio::spawn(budget_worker(mesh.clone(), w, load.clone(), stop.clone())))
        .collect();
    assert!(
        eventually(Duration::from_secs(30), || async {
            let load = load.lock().await;
            let old = |at: Instant| at + LOSS_WINDOW < Instant::now();
            load.acks.len() >= ACKED_BEFORE_KILL
                && load.acks.iter().filter(|a| old(a.at)).count() >= ACKED_BEFORE_WINDOW
                && load.charges.iter().filter(|c| old(c.at)).count() >= ACKED_BEFORE_WINDOW
        })
        .await,
        "the load runs before the kill, for longer than the loss window"
    );

    // SIGKILL: no shutdown, no final fsync; the replica learns of it from the missed pings.
    let mut restart = Restart(Some(config_file));
    let killed_at = Instant::now();
    let killed = Command::new("kill").args(["-9", &pid]).status().unwrap();
    assert!(
        killed.success(),
        "kill -9 {pid} (the master on port {victim})"
    );
    let promoted = eventually(Duration::from_secs(30), || async {
        owner(survivor, slot)
            .await
            .is_some_and(|port| port != victim)
    })
    .await;
    assert!(promoted, "a replica of port {victim} is promoted");
    let promoted_at = Instant::now();
    let new_master = owner(survivor, slot).await.unwrap_or_default();
    assert!(
        eventually(Duration::from_secs(30), || async {
            acked_by_each_since(&load, promoted_at).await >= ACKED_AFTER_PROMOTION
        })
        .await,
        "every worker's appends and commits succeed again after the promotion"
    );
    stop.store(true, Ordering::Relaxed);
    for worker in workers {
        worker.await.unwrap();
    }
    for worker in budget_workers {
        worker.await.unwrap();
    }
    let load = load.lock().await;

    // What each session holds now, seq -> content, read through the service.
    let mut stored: Vec<BTreeMap<i64, String>> = Vec::new();
    for w in 0..WORKERS {
        let turns = mesh
            .session()
            .list_turns(ListTurnsRequest {
                session_id: format!("failover-{w}"),
                page_size: 1000,
                ..ListTurnsRequest::default()
            })
            .await
            .expect("ListTurns after the failover")
            .into_inner();
        assert!(
            turns.next_page_token.is_empty(),
            "one page holds the test's turns"
        );
        let mut seen = HashSet::new();
        let mut by_seq = BTreeMap::new();
        for turn in turns.turns {
            let content = turn.message.unwrap_or_default().content;
            assert!(seen.insert(content.clone()), "{content} is stored once");
            by_seq.insert(turn.seq, content);
        }
        stored.push(by_seq);
    }
    let lost: Vec<&Ack> = load
        .acks
        .iter()
        .filter(|ack| stored[ack.worker].get(&ack.seq) != Some(&ack.content))
        .collect();
    let before_kill = load.acks.iter().filter(|a| a.at <= killed_at).count();
    let before_window = load
        .acks
        .iter()
        .filter(|a| a.at + LOSS_WINDOW < killed_at)
        .count();
    println!(
        "failover: master on port {victim} (slot {slot}) killed after {before_kill} acknowledged \
         appends ({before_window} of them more than {LOSS_WINDOW:?} before); port {new_master} promoted after {} ms; {} appends acknowledged in all; {} \
         acknowledged appends lost, acknowledged {:?} before the kill",
        (promoted_at - killed_at).as_millis(),
        load.acks.len(),
        lost.len(),
        lost.iter()
            .map(|ack| killed_at.saturating_duration_since(ack.at))
            .collect::<Vec<_>>()
    );
    println!(
        "failover: failures retried, by call, code and reason: {:?}",
        load.retried
    );
    assert!(
        load.other_errors.is_empty(),
        "a failover only makes appends, reserves and commits UNAVAILABLE: {:?}",
        load.other_errors
    );
    for ack in &lost {
        assert!(
            ack.at + LOSS_WINDOW >= killed_at,
            "{} was acknowledged {:?} before the kill, longer than the {LOSS_WINDOW:?} the docs \
             allow, and lost",
            ack.content,
            killed_at - ack.at
        );
    }

    // Budgets: nothing charged twice; what is missing was acknowledged in the kill's last instants.
    let recorded = mesh
        .budget()
        .get_spend(GetSpendRequest {
            scope: Some(tenant_scope()),
            start_time: Some(started.into()),
            end_time: None,
        })
        .await
        .expect("GetSpend after the failover")
        .into_inner()
        .total_micros;
    let acknowledged: i64 = load.charges.iter().map(|c| c.cost).sum();
    let in_window: i64 = load
        .charges
        .iter()
        .filter(|c| c.at + LOSS_WINDOW >= killed_at && c.at <= promoted_at)
        .map(|c| c.cost)
        .sum();
    println!(
        "failover: {} commits acknowledged ({} before the kill, {} more than {LOSS_WINDOW:?} \
         before), {acknowledged} micro-USD; \
         GetSpend records {recorded} micro-USD (missing {}); {in_window} micro-USD acknowledged \
         within {LOSS_WINDOW:?} of the kill; {} Commits found their Reserve lost, acknowledged \
         {:?} before the kill",
        load.charges.len(),
        load.charges.iter().filter(|c| c.at <= killed_at).count(),
        load.charges
            .iter()
            .filter(|c| c.at + LOSS_WINDOW < killed_at)
            .count(),
        acknowledged - recorded,
        load.lost_holds.len(),
        load.lost_holds
            .iter()
            .map(|at| killed_at.saturating_duration_since(*at))
            .collect::<Vec<_>>()
    );
    assert!(
        load.charges.len() >= BUDGET_WORKERS * ACKED_AFTER_PROMOTION,
        "the budget workers committed"
    );
    assert!(
        recorded <= acknowledged,
        "spend {recorded} is at most the {acknowledged} acknowledged: nothing is charged twice"
    );
    assert!(
        acknowledged - recorded <= in_window,
        "the {} micro-USD of acknowledged commits missing from the spend were acknowledged within \
         {LOSS_WINDOW:?} of the kill (only {in_window} were)",
        acknowledged - recorded
    );
    for at in &load.lost_holds {
        assert!(
            *at + LOSS_WINDOW >= killed_at,
            "a Reserve acknowledged {:?} before the kill, longer than the {LOSS_WINDOW:?} the docs \
             allow, was lost",
            killed_at - *at
        );
    }
    // Every reservation is settled: committed, or (a hold whose commit was lost) expired by the
    // sweeper at its TTL.
    let settled = eventually(Duration::from_secs(30), || async {
        tenant_budget(&mesh).await.held_micros == 0
    })
    .await;
    let budget = tenant_budget(&mesh).await;
    println!(
        "failover: tenant budget afterwards: held {} spent {} hard {}",
        budget.held_micros, budget.spent_micros, budget.hard_limit_micros
    );
    assert!(settled, "every hold is settled: held comes back to 0");
    assert!(
        budget.held_micros + budget.spent_micros <= budget.hard_limit_micros,
        "held + spent stays within the hard limit"
    );

    // The killed node rejoins as a replica of the promoted one; the cluster is whole again.
    restart.now();
    let whole = eventually(Duration::from_secs(60), || async {
        let info = ask(victim, &["INFO", "replication"])
            .await
            .unwrap_or_default();
        let mut ok = field(&info, "role").as_deref() == Some("slave")
            && field(&info, "master_link_status").as_deref() == Some("up");
        for port in all_ports(survivor).await {
            let state = ask(port, &["CLUSTER", "INFO"]).await.unwrap_or_default();
            ok &= field(&state, "cluster_state").as_deref() == Some("ok");
        }
        ok
    })
    .await;
    assert!(
        whole,
        "port {victim} rejoined as a replica and the cluster is ok"
    );

    let mesh = Arc::into_inner(mesh).expect("the workers are done");
    mesh.stop().await;
    delete_prefix_at(&cluster, &prefix).await;
}
