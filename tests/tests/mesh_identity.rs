//! Mesh identity, end to end on real sockets (session and budget on a real Redis): no caller can
//! reach another tenant's data by naming it in `weir-tenant`, over every RPC of the session,
//! budget and review services; administrative RPCs need their role; the router's calls (mesh
//! tokens) still act for the tenant it authenticated; and a key's criticality ceiling is what
//! admission sees.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio_stream::StreamExt;
use tonic::{Code, Request, Status};
use weir_mesh::{
    ApiError,
    criticality::Criticality,
    identity::{MeshConfig, MeshIdentity},
    metadata::{CRITICALITY, MESH_TOKEN, TENANT},
    tenant::Tenant,
};
use weir_proto::{
    budget::{
        self as budget, CalendarPeriod, CommitRequest, EstimateCostRequest, GetBudgetRequest,
        GetSpendRequest, ListPricesRequest, Period, PeriodUnit, ReleaseRequest, ReservationState,
        ReserveRequest, Scope, ScopeKind, SetBudgetRequest,
    },
    common::Usage,
    review::{
        CancelItemRequest, ClaimNextRequest, CreateItemRequest, GetItemRequest,
        GetQueueStatsRequest, ListAuditEventsRequest, ListItemsRequest, RenewLeaseRequest,
        ReviewItem, SubmitDecisionRequest, Verdict, WatchItemRequest,
    },
    router::{CompleteRequest, GetBatchRequest},
    service_names,
    session::{
        AppendTurnsRequest, CreateSessionRequest, DeleteSessionRequest, DeleteUserSessionsRequest,
        GetContextRequest, GetSessionRequest, ListTurnsRequest,
    },
};
use weir_tests::{Mesh, assistant, complete_stream, redis_url, unique_prefix, user, with_key};

const SECRET: &str = "mesh-identity-test-secret-0123456789abcdef";
/// The victim: an admin of its own tenant, so it can set its budget, allowed CRITICAL_PLUS.
const VICTIM_KEY: &str = "victim-key-0123456789abcdef0123456789";
/// The attacker's ordinary key (no role).
const ATTACKER_KEY: &str = "attacker-key-0123456789abcdef01234567";
/// An admin of the attacker's tenant.
const ADMIN_KEY: &str = "attacker-admin-key-0123456789abcdef012";
/// A reviewer of the attacker's tenant.
const REVIEWER_KEY: &str = "attacker-reviewer-key-0123456789abcdef";
/// A batch key that may claim SHEDDABLE at most.
const BATCH_KEY: &str = "batch-key-0123456789abcdef0123456789ab";

const PRICED: &str = "sim-priced";
const SLOW: &str = "sim-slow";
const VICTIM_SESSION: &str = "victim-s1";
const VICTIM_USER: &str = "victim-user";

fn keys() -> String {
    format!(
        r#"
[mesh]
secret = "{SECRET}"

[[auth.api_keys]]
id = "victim"
tenant = "victim"
key = "{VICTIM_KEY}"
roles = ["admin"]
max_criticality = "CRITICAL_PLUS"

[[auth.api_keys]]
id = "attacker"
tenant = "attacker"
key = "{ATTACKER_KEY}"

[[auth.api_keys]]
id = "attacker-admin"
tenant = "attacker"
key = "{ADMIN_KEY}"
roles = ["admin"]

[[auth.api_keys]]
id = "attacker-reviewer"
tenant = "attacker"
key = "{REVIEWER_KEY}"
roles = ["reviewer"]

[[auth.api_keys]]
id = "batch"
tenant = "batch"
key = "{BATCH_KEY}"
max_criticality = "SHEDDABLE"
"#
    )
}

fn config(prefix: &str) -> String {
    format!(
        r#"
{keys}
[models.sim-priced]
sim = {{ output_tokens = 8 }}
price = {{ input_micros_per_mtok = 1000000, output_micros_per_mtok = 1000000 }}

[router]
budget_url = "http://127.0.0.1:50054"   # replaced by the budget service started with it

[router.rate_limit]
enabled = false

[budget]
redis_url = "{redis}"
key_prefix = "{prefix}"

[session]
redis_url = "{redis}"
key_prefix = "{prefix}"
default_model = "sim-priced"
"#,
        keys = keys(),
        redis = redis_url()
    )
}

/// Defines [`Rpc`] and the list of all of its values.
macro_rules! rpcs {
    ($($name:ident),+ $(,)?) => {
        /// Every RPC of the session, budget and review services.
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        enum Rpc {
            $($name),+
        }

        const RPCS: &[Rpc] = &[$(Rpc::$name),+];
    };
}

rpcs! {
    CreateSession,
    GetSession,
    AppendTurns,
    GetContext,
    ListTurns,
    DeleteSession,
    DeleteUserSessions,
    EstimateCost,
    Reserve,
    Commit,
    Release,
    SetBudget,
    GetBudget,
    GetSpend,
    ListPrices,
    CreateItem,
    GetItem,
    ListItems,
    ClaimNext,
    RenewLease,
    SubmitDecision,
    WatchItem,
    CancelItem,
    GetQueueStats,
    ListAuditEvents,
}

use Rpc::*;

/// What the attacker's own key gets: refused, or acting on the attacker's tenant only.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    /// Served, for the attacker's own tenant.
    Ok,
    /// Refused with this code.
    Code(Code),
}

impl Rpc {
    fn service(self) -> &'static str {
        match self {
            CreateSession | GetSession | AppendTurns | GetContext | ListTurns | DeleteSession
            | DeleteUserSessions => service_names::SESSION,
            EstimateCost | Reserve | Commit | Release | SetBudget | GetBudget | GetSpend
            | ListPrices => service_names::BUDGET,
            _ => service_names::REVIEW,
        }
    }

    fn path(self) -> String {
        format!("/{}/{self:?}", self.service())
    }

    /// With the attacker's key and `weir-tenant: victim`, naming the victim's session, user,
    /// reservation and review item.
    fn as_attacker(self) -> Expect {
        match self {
            // Its own new session, budget hold, review item, price list, (empty) spend and queue.
            CreateSession | EstimateCost | Reserve | GetSpend | ListPrices | CreateItem
            | ListItems | GetQueueStats => Expect::Ok,
            // The victim's session, reservation and review item do not exist in the attacker's
            // tenant.
            GetSession | AppendTurns | GetContext | ListTurns | DeleteSession | Commit
            | Release | GetBudget | GetItem | WatchItem | ListAuditEvents => {
                Expect::Code(Code::NotFound)
            }
            // Administrative: a role the attacker's key does not have.
            DeleteUserSessions | SetBudget | ClaimNext | RenewLease | SubmitDecision
            | CancelItem => Expect::Code(Code::PermissionDenied),
        }
    }
}

/// How a call presents itself.
#[derive(Debug, Clone)]
enum Credentials {
    None,
    Key(&'static str),
    Token(String),
}

fn request<T>(body: T, credentials: &Credentials) -> Request<T> {
    let mut request = match credentials {
        Credentials::Key(key) => with_key(body, key),
        _ => Request::new(body),
    };
    let metadata = request.metadata_mut();
    // Every attack names the victim.
    metadata.insert(TENANT, "victim".parse().unwrap());
    if let Credentials::Token(token) = credentials {
        metadata.insert(MESH_TOKEN, token.parse().unwrap());
    }
    request
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

fn token(secret: &str, path: &str, tenant: &str, issued_ms: u64) -> String {
    MeshIdentity::new(secret, &MeshConfig::default())
        .sign_at(
            path,
            &Tenant::new(tenant).unwrap(),
            Criticality::Critical,
            Duration::from_secs(5),
            issued_ms,
        )
        .unwrap()
}

/// The bad mesh tokens for a call of `rpc`: forged with another secret, expired, tampered (the
/// attacker's valid token with the tenant changed), and the victim's valid token for another
/// method.
fn bad_tokens(rpc: Rpc) -> Vec<(&'static str, String)> {
    let path = rpc.path();
    let other_method = if rpc == GetSession {
        ListTurns.path()
    } else {
        GetSession.path()
    };
    vec![
        (
            "forged",
            token(&SECRET.replace('0', "9"), &path, "victim", now_ms()),
        ),
        ("expired", token(SECRET, &path, "victim", now_ms() - 60_000)),
        (
            "tampered",
            token(SECRET, &path, "attacker", now_ms()).replace("t=attacker", "t=victim"),
        ),
        (
            "other method",
            token(SECRET, &other_method, "victim", now_ms()),
        ),
    ]
}

fn tenant_scope() -> Scope {
    Scope {
        kind: ScopeKind::Tenant.into(),
        id: String::new(),
    }
}

fn daily() -> Period {
    Period {
        kind: Some(budget::period::Kind::Calendar(CalendarPeriod {
            unit: PeriodUnit::Daily.into(),
            time_zone: String::new(),
        })),
    }
}

/// What of the victim's the calls name: a held reservation and a pending review item.
#[derive(Debug, Default)]
struct Victim {
    reservation: String,
    item: String,
}

/// Makes one call of `rpc`, naming the victim's data.
async fn call(
    mesh: &Mesh,
    rpc: Rpc,
    credentials: &Credentials,
    victim: &Victim,
) -> Result<(), Status> {
    let c = credentials;
    let reservation = victim.reservation.as_str();
    let item = victim.item.clone();
    let session = VICTIM_SESSION.to_string();
    match rpc {
        CreateSession => {
            let body = CreateSessionRequest {
                session_id: "attacker-made".into(),
                ..CreateSessionRequest::default()
            };
            mesh.session()
                .create_session(request(body, c))
                .await
                .map(drop)
        }
        GetSession => {
            let body = GetSessionRequest {
                session_id: session,
            };
            mesh.session().get_session(request(body, c)).await.map(drop)
        }
        AppendTurns => {
            let body = AppendTurnsRequest {
                session_id: session,
                messages: vec![user("injected")],
                ..AppendTurnsRequest::default()
            };
            mesh.session()
                .append_turns(request(body, c))
                .await
                .map(drop)
        }
        GetContext => {
            let body = GetContextRequest {
                session_id: session,
                ..GetContextRequest::default()
            };
            mesh.session().get_context(request(body, c)).await.map(drop)
        }
        ListTurns => {
            let body = ListTurnsRequest {
                session_id: session,
                ..ListTurnsRequest::default()
            };
            mesh.session().list_turns(request(body, c)).await.map(drop)
        }
        DeleteSession => {
            let body = DeleteSessionRequest {
                session_id: session,
            };
            mesh.session()
                .delete_session(request(body, c))
                .await
                .map(drop)
        }
        DeleteUserSessions => {
            let body = DeleteUserSessionsRequest {
                user_id: VICTIM_USER.into(),
            };
            let mut client = mesh.session();
            client
                .delete_user_sessions(request(body, c))
                .await
                .map(drop)
        }
        EstimateCost => {
            let body = EstimateCostRequest {
                model: PRICED.into(),
                input_tokens: 10,
                max_output_tokens: 10,
                ..EstimateCostRequest::default()
            };
            mesh.budget()
                .estimate_cost(request(body, c))
                .await
                .map(drop)
        }
        Reserve => {
            let body = ReserveRequest {
                request_id: format!("attack-{}", now_ms()),
                scopes: vec![tenant_scope()],
                amount_micros: 999_999,
                model: PRICED.into(),
                ..ReserveRequest::default()
            };
            mesh.budget().reserve(request(body, c)).await.map(drop)
        }
        Commit => {
            let body = CommitRequest {
                reservation_id: reservation.into(),
                request_id: "attack-commit".into(),
                usage: Some(Usage {
                    input_tokens: 1000,
                    output_tokens: 1000,
                    ..Usage::default()
                }),
                ..CommitRequest::default()
            };
            mesh.budget().commit(request(body, c)).await.map(drop)
        }
        Release => {
            let body = ReleaseRequest {
                reservation_id: reservation.into(),
            };
            mesh.budget().release(request(body, c)).await.map(drop)
        }
        SetBudget => {
            let body = SetBudgetRequest {
                scope: Some(tenant_scope()),
                hard_limit_micros: 999_000_000,
                soft_limit_fraction: 0.0,
                period: Some(daily()),
            };
            mesh.budget().set_budget(request(body, c)).await.map(drop)
        }
        GetBudget => {
            let body = GetBudgetRequest {
                scope: Some(tenant_scope()),
            };
            mesh.budget().get_budget(request(body, c)).await.map(drop)
        }
        GetSpend => {
            let body = GetSpendRequest {
                scope: Some(tenant_scope()),
                ..GetSpendRequest::default()
            };
            let spend = mesh
                .budget()
                .get_spend(request(body, c))
                .await?
                .into_inner();
            assert_eq!(
                spend.total_micros, 0,
                "the attacker's spend, not the victim's"
            );
            Ok(())
        }
        ListPrices => {
            let body = ListPricesRequest::default();
            mesh.budget().list_prices(request(body, c)).await.map(drop)
        }
        CreateItem => {
            // The attacker's own item, in the attacker's tenant.
            let body = CreateItemRequest {
                output: Some(assistant("attacker's output")),
                ..CreateItemRequest::default()
            };
            mesh.review().create_item(request(body, c)).await.map(drop)
        }
        GetItem => {
            let body = GetItemRequest { item_id: item };
            mesh.review().get_item(request(body, c)).await.map(drop)
        }
        ListItems => {
            let body = ListItemsRequest::default();
            let items = mesh
                .review()
                .list_items(request(body, c))
                .await?
                .into_inner();
            assert!(
                items.items.iter().all(|i| i.id != victim.item),
                "the attacker's queue, not the victim's"
            );
            Ok(())
        }
        ClaimNext => {
            let body = ClaimNextRequest {
                reviewer: "mallory".into(),
                item_id: item,
                ..ClaimNextRequest::default()
            };
            mesh.review().claim_next(request(body, c)).await.map(drop)
        }
        RenewLease => {
            let body = RenewLeaseRequest {
                item_id: item,
                ..RenewLeaseRequest::default()
            };
            mesh.review().renew_lease(request(body, c)).await.map(drop)
        }
        SubmitDecision => {
            let body = SubmitDecisionRequest {
                item_id: item,
                verdict: Verdict::Approve as i32,
                ..SubmitDecisionRequest::default()
            };
            mesh.review()
                .submit_decision(request(body, c))
                .await
                .map(drop)
        }
        WatchItem => {
            let body = WatchItemRequest { item_id: item };
            let mut stream = mesh
                .review()
                .watch_item(request(body, c))
                .await?
                .into_inner();
            match stream.next().await {
                Some(Err(status)) => Err(status),
                _ => Ok(()),
            }
        }
        CancelItem => {
            let body = CancelItemRequest {
                item_id: item,
                ..CancelItemRequest::default()
            };
            mesh.review().cancel_item(request(body, c)).await.map(drop)
        }
        GetQueueStats => {
            let body = GetQueueStatsRequest::default();
            mesh.review()
                .get_queue_stats(request(body, c))
                .await
                .map(drop)
        }
        ListAuditEvents => {
            let body = ListAuditEventsRequest {
                item_id: item,
                ..ListAuditEventsRequest::default()
            };
            let mut client = mesh.review();
            let events = client
                .list_audit_events(request(body, c))
                .await?
                .into_inner();
            assert!(events.events.is_empty(), "no event of the victim's item");
            Ok(())
        }
    }
}

/// What the victim can see of its own data.
#[derive(Debug, PartialEq)]
struct VictimState {
    session: weir_proto::session::Session,
    turns: Vec<weir_proto::session::Turn>,
    budget: budget::Budget,
    spend: budget::GetSpendResponse,
    item: ReviewItem,
}

async fn victim_state(mesh: &Mesh, victim: &Victim) -> VictimState {
    let key = |body| with_key(body, VICTIM_KEY);
    let session = mesh
        .session()
        .get_session(with_key(
            GetSessionRequest {
                session_id: VICTIM_SESSION.into(),
            },
            VICTIM_KEY,
        ))
        .await
        .expect("the victim's session is still there")
        .into_inner()
        .session
        .unwrap();
    let turns = mesh
        .session()
        .list_turns(with_key(
            ListTurnsRequest {
                session_id: VICTIM_SESSION.into(),
                page_size: 100,
                ..ListTurnsRequest::default()
            },
            VICTIM_KEY,
        ))
        .await
        .unwrap()
        .into_inner()
        .turns;
    let budget = mesh
        .budget()
        .get_budget(key(GetBudgetRequest {
            scope: Some(tenant_scope()),
        }))
        .await
        .unwrap()
        .into_inner()
        .budget
        .unwrap();
    let spend = mesh
        .budget()
        .get_spend(with_key(
            GetSpendRequest {
                scope: Some(tenant_scope()),
                ..GetSpendRequest::default()
            },
            VICTIM_KEY,
        ))
        .await
        .unwrap()
        .into_inner();
    let item = mesh
        .review()
        .get_item(with_key(
            GetItemRequest {
                item_id: victim.item.clone(),
            },
            VICTIM_KEY,
        ))
        .await
        .expect("the victim's review item is still there")
        .into_inner()
        .item
        .unwrap();
    VictimState {
        session,
        turns,
        budget,
        spend,
        item,
    }
}

/// Creates the victim's session (two turns), budget, a held reservation and a pending review
/// item.
async fn victim_data(mesh: &Mesh) -> Victim {
    mesh.session()
        .create_session(with_key(
            CreateSessionRequest {
                session_id: VICTIM_SESSION.into(),
                user_id: VICTIM_USER.into(),
                ..CreateSessionRequest::default()
            },
            VICTIM_KEY,
        ))
        .await
        .unwrap();
    mesh.session()
        .append_turns(with_key(
            AppendTurnsRequest {
                session_id: VICTIM_SESSION.into(),
                messages: vec![user("my secret plans"), user("more of them")],
                ..AppendTurnsRequest::default()
            },
            VICTIM_KEY,
        ))
        .await
        .unwrap();
    mesh.budget()
        .set_budget(with_key(
            SetBudgetRequest {
                scope: Some(tenant_scope()),
                hard_limit_micros: 1_000_000,
                soft_limit_fraction: 0.0,
                period: Some(daily()),
            },
            VICTIM_KEY,
        ))
        .await
        .unwrap();
    let reservation = mesh
        .budget()
        .reserve(with_key(
            ReserveRequest {
                request_id: "victim-r1".into(),
                scopes: vec![tenant_scope()],
                amount_micros: 1000,
                model: PRICED.into(),
                ..ReserveRequest::default()
            },
            VICTIM_KEY,
        ))
        .await
        .unwrap()
        .into_inner()
        .reservation
        .unwrap()
        .id;
    let item = mesh
        .review()
        .create_item(with_key(
            CreateItemRequest {
                conversation: vec![user("my secret question")],
                output: Some(assistant("the victim's held answer")),
                ..CreateItemRequest::default()
            },
            VICTIM_KEY,
        ))
        .await
        .unwrap()
        .into_inner()
        .item
        .unwrap()
        .id;
    Victim { reservation, item }
}

fn reason(status: &Status) -> String {
    ApiError::from_status(status).reason().to_string()
}

#[tokio::test]
async fn a_spoofed_tenant_never_reaches_another_tenants_data_over_any_rpc() {
    let prefix = unique_prefix();
    let mesh = Mesh::start(&config(&prefix)).await;
    let victim = victim_data(&mesh).await;
    let before = victim_state(&mesh, &victim).await;
    assert_eq!(before.turns.len(), 2);
    assert_eq!(before.item.state(), weir_proto::review::ItemState::Pending);
    assert_eq!(before.budget.hard_limit_micros, 1_000_000);
    assert_eq!(before.budget.held_micros, 1000);

    for &rpc in RPCS {
        // (a) No credentials: the header alone is worth nothing.
        let status = call(&mesh, rpc, &Credentials::None, &victim)
            .await
            .expect_err(&format!("{rpc:?} without credentials"));
        assert_eq!(status.code(), Code::Unauthenticated, "{rpc:?}: {status:?}");
        assert_eq!(reason(&status), "API_KEY_MISSING", "{rpc:?}");

        // (b) The attacker's own key: its own tenant, or refused.
        let result = call(&mesh, rpc, &Credentials::Key(ATTACKER_KEY), &victim).await;
        match (rpc.as_attacker(), &result) {
            (Expect::Ok, Ok(())) => {}
            (Expect::Code(code), Err(status)) if status.code() == code => {
                if code == Code::PermissionDenied {
                    assert_eq!(reason(status), "ROLE_REQUIRED", "{rpc:?}");
                }
            }
            (expected, got) => panic!("{rpc:?} with the attacker's key: {got:?}, not {expected:?}"),
        }

        // (c) Forged, expired, tampered and misdirected mesh tokens.
        for (what, token) in bad_tokens(rpc) {
            let status = call(&mesh, rpc, &Credentials::Token(token), &victim)
                .await
                .expect_err(&format!("{rpc:?} with a {what} token"));
            assert_eq!(status.code(), Code::Unauthenticated, "{rpc:?} {what}");
            assert_eq!(reason(&status), "MESH_TOKEN_INVALID", "{rpc:?} {what}");
        }
    }

    // Nothing of the victim's was read or changed: same session, turns, budget, hold and spend,
    // and the hold is still the victim's to release.
    assert_eq!(victim_state(&mesh, &victim).await, before);
    let released = mesh
        .budget()
        .release(with_key(
            ReleaseRequest {
                reservation_id: victim.reservation,
            },
            VICTIM_KEY,
        ))
        .await
        .expect("the victim's hold is still held")
        .into_inner()
        .reservation
        .unwrap();
    assert_eq!(released.state(), ReservationState::Released);
    mesh.stop().await;
    weir_tests::delete_prefix(&prefix).await;
}

#[tokio::test]
async fn administrative_rpcs_need_their_role() {
    let prefix = unique_prefix();
    let mesh = Mesh::start(&config(&prefix)).await;
    let victim = victim_data(&mesh).await;
    let before = victim_state(&mesh, &victim).await;
    let key = |k| Credentials::Key(k);

    // SetBudget and DeleteUserSessions: admin only (and the admin's own tenant).
    for rpc in [SetBudget, DeleteUserSessions] {
        for k in [ATTACKER_KEY, REVIEWER_KEY] {
            let status = call(&mesh, rpc, &key(k), &Victim::default())
                .await
                .unwrap_err();
            assert_eq!(status.code(), Code::PermissionDenied, "{rpc:?} {k}");
            assert!(status.message().contains("`admin`"), "{}", status.message());
        }
        call(&mesh, rpc, &key(ADMIN_KEY), &Victim::default())
            .await
            .unwrap_or_else(|status| panic!("{rpc:?} as admin: {status:?}"));
    }
    // The review decisions: reviewer or admin. Past the role check the service reads the
    // request, which names no item here.
    for rpc in [ClaimNext, RenewLease, SubmitDecision, CancelItem] {
        let status = call(&mesh, rpc, &key(ATTACKER_KEY), &Victim::default())
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::PermissionDenied, "{rpc:?}");
        assert!(
            status.message().contains("`reviewer`"),
            "{}",
            status.message()
        );
        for k in [REVIEWER_KEY, ADMIN_KEY] {
            // ClaimNext finds nothing to claim; the others name no item.
            match call(&mesh, rpc, &key(k), &Victim::default()).await {
                Ok(()) => assert_eq!(rpc, ClaimNext),
                Err(status) => assert_eq!(status.code(), Code::InvalidArgument, "{rpc:?} {k}"),
            }
        }
    }
    // The admin acted on its own tenant: the victim's budget and sessions are as they were.
    assert_eq!(victim_state(&mesh, &victim).await, before);
    let attacker_budget = mesh
        .budget()
        .get_budget(with_key(
            GetBudgetRequest {
                scope: Some(tenant_scope()),
            },
            ATTACKER_KEY,
        ))
        .await
        .unwrap()
        .into_inner()
        .budget
        .unwrap();
    assert_eq!(attacker_budget.hard_limit_micros, 999_000_000);
    mesh.stop().await;
    weir_tests::delete_prefix(&prefix).await;
}

#[tokio::test]
async fn the_router_calls_session_and_budget_for_the_tenant_it_authenticated() {
    let prefix = unique_prefix();
    let mesh = Mesh::start(&config(&prefix)).await;
    mesh.session()
        .create_session(with_key(
            CreateSessionRequest {
                session_id: "chat".into(),
                ..CreateSessionRequest::default()
            },
            ATTACKER_KEY,
        ))
        .await
        .unwrap();
    // Through the router with a key and a spoofed tenant: the router authenticates the key and
    // its mesh tokens tell session and budget who it is.
    let mut spoofed = with_key(
        CompleteRequest {
            model: PRICED.into(),
            messages: vec![user("hello")],
            session_id: "chat".into(),
            ..CompleteRequest::default()
        },
        ATTACKER_KEY,
    );
    spoofed
        .metadata_mut()
        .insert(TENANT, "victim".parse().unwrap());
    let answer = mesh.router().complete(spoofed).await.unwrap().into_inner();
    assert!(answer.message.is_some());

    let turns = mesh
        .session()
        .list_turns(with_key(
            ListTurnsRequest {
                session_id: "chat".into(),
                ..ListTurnsRequest::default()
            },
            ATTACKER_KEY,
        ))
        .await
        .unwrap()
        .into_inner()
        .turns;
    assert_eq!(
        turns.len(),
        2,
        "the question and the answer, in the attacker's session"
    );
    let spend = |key| {
        let mesh = &mesh;
        async move {
            mesh.budget()
                .get_spend(with_key(
                    GetSpendRequest {
                        scope: Some(tenant_scope()),
                        ..GetSpendRequest::default()
                    },
                    key,
                ))
                .await
                .unwrap()
                .into_inner()
                .total_micros
        }
    };
    assert!(spend(ATTACKER_KEY).await > 0, "metered to the key's tenant");
    assert_eq!(
        spend(VICTIM_KEY).await,
        0,
        "nothing charged to the spoofed tenant"
    );
    let status = mesh
        .session()
        .get_session(with_key(
            GetSessionRequest {
                session_id: "chat".into(),
            },
            VICTIM_KEY,
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);

    // Without a key the router refuses, whatever tenant is named.
    let mut anonymous = Request::new(CompleteRequest {
        model: PRICED.into(),
        messages: vec![user("hello")],
        ..CompleteRequest::default()
    });
    anonymous
        .metadata_mut()
        .insert(TENANT, "victim".parse().unwrap());
    let status = mesh.router().complete(anonymous).await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    mesh.stop().await;
    weir_tests::delete_prefix(&prefix).await;
}

/// A router with a fixed admission limit of 2 (SHEDDABLE may use 1 slot, CRITICAL 2,
/// CRITICAL_PLUS 3) and a model slow enough to hold a slot.
fn admission_config() -> String {
    format!(
        r#"
{keys}
[models.sim-slow]
sim = {{ output_tokens = 200, tokens_per_second = 20.0 }}

[router]
session_url = ""

[router.rate_limit]
enabled = false

[server.admission]
algorithm = "static"
initial_limit = 2
min_limit = 1
"#,
        keys = keys()
    )
}

/// A router call that admission must decide on (GetBatch without an id answers INVALID_ARGUMENT
/// once admitted): `key` claims CRITICAL_PLUS.
async fn claim_critical_plus(mesh: &Mesh, key: &str) -> Code {
    // GetBatch without an id answers INVALID_ARGUMENT once admitted: a cheap call that never
    // reaches a model or a store.
    let mut request = with_key(GetBatchRequest::default(), key);
    request
        .metadata_mut()
        .insert(CRITICALITY, "CRITICAL_PLUS".parse().unwrap());
    mesh.router().get_batch(request).await.unwrap_err().code()
}

#[tokio::test]
async fn a_keys_criticality_ceiling_is_what_admission_sees() {
    let mesh = Mesh::start(&admission_config()).await;
    // With nothing in flight every claim is admitted.
    assert_eq!(
        claim_critical_plus(&mesh, BATCH_KEY).await,
        Code::InvalidArgument
    );

    // One slow stream holds one of the router's two slots.
    let mut stream = mesh
        .router()
        .complete_stream(with_key(
            complete_stream(SLOW, "take your time"),
            ATTACKER_KEY,
        ))
        .await
        .unwrap()
        .into_inner();
    stream.next().await.unwrap().unwrap();

    // The batch key may claim SHEDDABLE at most: its CRITICAL_PLUS is SHEDDABLE to admission,
    // whose share (one slot) is taken, so it is shed...
    let shed = claim_critical_plus(&mesh, BATCH_KEY).await;
    assert_eq!(
        shed,
        Code::Unavailable,
        "SHEDDABLE is shed at one in flight"
    );
    // ...while an ordinary key's CRITICAL_PLUS counts as CRITICAL (its default ceiling), which
    // still has a slot.
    assert_eq!(
        claim_critical_plus(&mesh, ATTACKER_KEY).await,
        Code::InvalidArgument
    );

    // With both slots held, CRITICAL is shed too: only a key configured for CRITICAL_PLUS still
    // gets the headroom above the limit.
    let mut second = mesh
        .router()
        .complete_stream(with_key(complete_stream(SLOW, "and you"), ATTACKER_KEY))
        .await
        .unwrap()
        .into_inner();
    second.next().await.unwrap().unwrap();
    assert_eq!(
        claim_critical_plus(&mesh, ATTACKER_KEY).await,
        Code::Unavailable
    );
    assert_eq!(
        claim_critical_plus(&mesh, VICTIM_KEY).await,
        Code::InvalidArgument
    );
    drop((stream, second));
    mesh.stop().await;
}
