//! Scale-out, as deployed on several machines: two `weir serve` processes of each service on one
//! Redis, the routers balancing over both processes of every dependency. A load of sessions with
//! budgets goes through both routers while one process of each service is killed with SIGKILL in
//! turn (inference, session, budget, then a router). Every request the client gives up on with a
//! retryable status is sent again, with the same `request_id`, to the other router, until it is
//! answered. Afterwards:
//! - every answered request's two turns are stored in its session once, in order, and nothing
//!   else is (a retried request is not appended twice);
//! - the tenant's recorded spend equals the sum of the costs the answers carried (a retried
//!   request is not charged twice, a killed process's hold is not charged);
//! - every failed attempt failed with a status a client may retry.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::{
    collections::{BTreeMap, HashMap},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use tonic::{Code, transport::Channel};
use weir_proto::{
    budget::{GetSpendRequest, Scope, ScopeKind, budget_service_client::BudgetServiceClient},
    common::{Message, Role},
    router::{CompleteRequest, router_service_client::RouterServiceClient},
    session::{
        CreateSessionRequest, ListTurnsRequest, session_service_client::SessionServiceClient,
    },
};

use common::{Serve, config_file, redis_url, serve_command};

/// Eight tokens at 400 a second: each answer takes about 20 ms, so calls are in flight on every
/// process whenever one is killed. One micro-USD per token, so a cost is a token count.
const MODELS: &str = r#"
[models.sim-scale]
context_window = 1000000
sim = { output_tokens = 8, tokens_per_second = 400.0 }
price = { input_micros_per_mtok = 1000000, output_micros_per_mtok = 1000000 }
"#;

/// Client tasks, each with its own sessions, sending one turn at a time per session.
const CLIENTS: usize = 8;
const SESSIONS_PER_CLIENT: usize = 2;
/// Time between two kills, and the load's length after the last.
const KILL_EVERY: Duration = Duration::from_millis(1500);
/// How long one request may keep being retried before the test fails.
const GIVE_UP_AFTER: Duration = Duration::from_secs(30);

/// Codes a client may retry with the same `request_id` (docs/resilience.md): the service was
/// unreachable or cut (UNAVAILABLE), the first attempt still holds the request (ABORTED
/// `REQUEST_IN_PROGRESS`), or it ran out of time.
const RETRYABLE: [Code; 3] = [Code::Unavailable, Code::Aborted, Code::DeadlineExceeded];

/// The code a client acts on. tonic's client reports what its transport saw with codes of its
/// own, with the transport error as the status's source: a connection the killed router reset is
/// UNKNOWN "transport error" (gRPC's own clients say UNAVAILABLE), and the call's own timer running
/// out is CANCELLED "Timeout expired" (the deadline passed: DEADLINE_EXCEEDED). Weir's client stack
/// reads its own calls' transport failures the same way.
fn code_of(status: &tonic::Status) -> Code {
    let transport = std::error::Error::source(status)
        .is_some_and(|source| source.is::<tonic::transport::Error>());
    match status.code() {
        Code::Unknown if transport => Code::Unavailable,
        Code::Cancelled if transport => Code::DeadlineExceeded,
        code => code,
    }
}

fn question(client: usize, session: usize, turn: usize) -> String {
    format!("client {client} session {session} turn {turn}: how is the weir?")
}

/// One request sent until answered, alternating routers from `first`: its cost and the codes of
/// the attempts that failed.
async fn send_until_answered(
    routers: &[RouterServiceClient<Channel>],
    first: usize,
    request: CompleteRequest,
) -> (i64, Vec<Code>) {
    let started = Instant::now();
    let mut failures = Vec::new();
    let mut attempt = first;
    loop {
        let mut router = routers[attempt % routers.len()].clone();
        let mut call = tonic::Request::new(request.clone());
        // A retry waits for the first attempt's outcome while that one holds the request_id; a
        // killed router's hold lapses after the deadline it was given (plus a margin).
        call.set_timeout(Duration::from_secs(2));
        match router.complete(call).await {
            Ok(answer) => return (answer.into_inner().cost_micros, failures),
            Err(status) => {
                let code = code_of(&status);
                assert!(
                    RETRYABLE.contains(&code),
                    "request {} failed with a status a client cannot retry: {status:?}",
                    request.request_id
                );
                failures.push(code);
                assert!(
                    started.elapsed() < GIVE_UP_AFTER,
                    "request {} still failing after {GIVE_UP_AFTER:?}: {failures:?}",
                    request.request_id
                );
                attempt += 1;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_process_of_each_service_killed_under_load_loses_and_doubles_nothing() {
    let prefix = format!("wtest-scale-{}", std::process::id());
    common::delete_prefix(&prefix).await;
    let stores = format!(
        r#"{MODELS}
[budget]
redis_url = "{redis}"
key_prefix = "{prefix}"

[session]
redis_url = "{redis}"
key_prefix = "{prefix}"
default_model = "sim-scale"
summarize = false
"#,
        redis = redis_url(),
    );
    let backends = config_file("scale-backends", &stores);
    let start = |service: &str| Serve::start(serve_command(service, &backends), service);
    let mut inference = [start("inference"), start("inference")];
    let mut session = [start("session"), start("session")];
    let mut budget = [start("budget"), start("budget")];
    let list = |pair: &[Serve; 2]| format!("{},{}", pair[0].url, pair[1].url);
    let router_config = config_file(
        "scale-router",
        &format!(
            r#"{stores}
[router]
inference_url = "{inference}"
session_url = "{session}"
budget_url = "{budget}"

[router.rate_limit]
enabled = false

[router.idempotency]
redis_url = "{redis}"
key_prefix = "{prefix}"
"#,
            inference = list(&inference),
            session = list(&session),
            budget = list(&budget),
            redis = redis_url(),
        ),
    );
    let mut routers = [
        Serve::start(serve_command("router", &router_config), "router"),
        Serve::start(serve_command("router", &router_config), "router"),
    ];
    let clients: Vec<_> = routers
        .iter()
        .map(|router| RouterServiceClient::new(router.channel()))
        .collect();

    // The sessions, created through the session process that will survive.
    let mut sessions = SessionServiceClient::new(session[1].channel());
    for client in 0..CLIENTS {
        for s in 0..SESSIONS_PER_CLIENT {
            sessions
                .create_session(CreateSessionRequest {
                    session_id: format!("{prefix}-c{client}-s{s}"),
                    ..CreateSessionRequest::default()
                })
                .await
                .expect("session created");
        }
    }

    // The load: each client sends its sessions' turns one after another until told to stop.
    let stop = Arc::new(AtomicBool::new(false));
    let answered: Arc<Mutex<Vec<(String, usize, i64)>>> = Arc::default();
    let failures: Arc<Mutex<Vec<Code>>> = Arc::default();
    let mut load = Vec::new();
    for client in 0..CLIENTS {
        let (clients, stop, answered, failures, prefix) = (
            clients.clone(),
            stop.clone(),
            answered.clone(),
            failures.clone(),
            prefix.clone(),
        );
        load.push(tokio::spawn(async move {
            let mut turn = 0;
            while !stop.load(Ordering::Relaxed) {
                for s in 0..SESSIONS_PER_CLIENT {
                    let session_id = format!("{prefix}-c{client}-s{s}");
                    let request = CompleteRequest {
                        model: "sim-scale".to_string(),
                        messages: vec![Message {
                            role: Role::User.into(),
                            content: question(client, s, turn),
                            ..Message::default()
                        }],
                        session_id: session_id.clone(),
                        request_id: format!("{session_id}-t{turn}"),
                        ..CompleteRequest::default()
                    };
                    let (cost, failed) =
                        send_until_answered(&clients, client + turn, request).await;
                    answered.lock().unwrap().push((session_id, turn, cost));
                    failures.lock().unwrap().extend(failed);
                }
                turn += 1;
            }
        }));
    }

    // One process of each service killed in turn, mid-load.
    tokio::time::sleep(KILL_EVERY).await;
    for (name, victim) in [
        ("inference", &mut inference[0]),
        ("session", &mut session[0]),
        ("budget", &mut budget[0]),
        ("router", &mut routers[0]),
    ] {
        let before = answered.lock().unwrap().len();
        victim.kill();
        eprintln!("killed one {name} process after {before} answers");
        tokio::time::sleep(KILL_EVERY).await;
    }
    stop.store(true, Ordering::Relaxed);
    for task in load {
        task.await.expect("a client task panicked");
    }

    let answered = answered.lock().unwrap().clone();
    let failures = failures.lock().unwrap().clone();
    let mut by_code: BTreeMap<String, usize> = BTreeMap::new();
    for code in &failures {
        *by_code.entry(format!("{code:?}")).or_default() += 1;
    }
    eprintln!(
        "{} requests answered; {} failed attempts, each retried: {by_code:?}",
        answered.len(),
        failures.len()
    );
    assert!(
        answered.len() > CLIENTS * SESSIONS_PER_CLIENT * 4,
        "the load kept running through the kills: {} answers",
        answered.len()
    );
    assert!(
        !failures.is_empty(),
        "killing a router under load failed no call in flight: the test did not exercise retries"
    );

    // Every answered request's turns are stored once, in order, and nothing else is.
    let mut expected: HashMap<String, Vec<usize>> = HashMap::new();
    for (session_id, turn, _) in &answered {
        expected.entry(session_id.clone()).or_default().push(*turn);
    }
    for (session_id, turns) in &mut expected {
        turns.sort_unstable();
        let stored = sessions
            .list_turns(ListTurnsRequest {
                session_id: session_id.clone(),
                page_size: 1000,
                ..ListTurnsRequest::default()
            })
            .await
            .expect("turns listed")
            .into_inner()
            .turns;
        let (client, s) = parse_session(session_id);
        let users: Vec<String> = stored
            .iter()
            .filter_map(|turn| turn.message.as_ref())
            .filter(|message| message.role == i32::from(Role::User))
            .map(|message| message.content.clone())
            .collect();
        let wanted: Vec<String> = turns.iter().map(|&t| question(client, s, t)).collect();
        assert_eq!(
            users, wanted,
            "session {session_id}: the stored questions are the answered ones, once each, in order"
        );
        assert_eq!(
            stored.len(),
            2 * turns.len(),
            "session {session_id}: one question and one answer per answered request"
        );
    }

    // The spend recorded equals what the answers said they cost (commits may trail the answer).
    let charged: i64 = answered.iter().map(|(_, _, cost)| cost).sum();
    assert!(charged > 0, "the answers carried their costs");
    let mut spend = BudgetServiceClient::new(budget[1].channel());
    let scope = Scope {
        kind: ScopeKind::Tenant.into(),
        id: String::new(),
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    let recorded = loop {
        let recorded = spend
            .get_spend(GetSpendRequest {
                scope: Some(scope.clone()),
                ..GetSpendRequest::default()
            })
            .await
            .expect("spend read")
            .into_inner()
            .total_micros;
        if recorded == charged || Instant::now() > deadline {
            break recorded;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(
        recorded, charged,
        "recorded spend equals the sum of the charged costs"
    );

    drop((inference, session, budget, routers));
    common::delete_prefix(&prefix).await;
}

/// `(client, session)` of a session id `<prefix>-c<client>-s<session>`.
fn parse_session(id: &str) -> (usize, usize) {
    let mut parts = id.rsplit('-');
    let s = parts
        .next()
        .unwrap()
        .trim_start_matches('s')
        .parse()
        .unwrap();
    let client = parts
        .next()
        .unwrap()
        .trim_start_matches('c')
        .parse()
        .unwrap();
    (client, s)
}
