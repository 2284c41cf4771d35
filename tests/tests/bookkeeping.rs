//! The router's bookkeeping calls (budget Reserve/Commit, session GetContext/AppendTurns) carry
//! their own criticality, never the caller's: a SHEDDABLE request that was admitted is still
//! reserved, charged and recorded when the budget service is shedding SHEDDABLE work.
//!
//! Real processes' worth of services on real sockets: a budget service (on a real Redis) with a
//! tiny fixed concurrency limit, and a router and inference service in front of it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use tonic::{Code, metadata::MetadataValue, transport::Channel};
use tonic_types::StatusExt;
use weir::stack::Service;
use weir_proto::budget::{GetBudgetRequest, GetBudgetResponse, GetSpendRequest, Scope, ScopeKind};
use weir_tests::{Mesh, complete, eventually, redis_url, unique_prefix};

/// The budget service's fixed limit: 2 in flight, so SHEDDABLE (50 % of it) is admitted only
/// while nothing else is in flight, and CRITICAL while fewer than 2 are.
fn budget_config(prefix: &str) -> String {
    format!(
        r#"
{MODELS}
[server.admission]
algorithm = "static"
initial_limit = 2
min_limit = 1

[budget]
redis_url = "{redis}"
key_prefix = "{prefix}"
"#,
        redis = redis_url()
    )
}

/// The catalog both sides share (the budget service prices what the router serves).
const MODELS: &str = r#"
[models.sim-priced]
sim = { output_tokens = 12 }
price = { input_micros_per_mtok = 1000000, output_micros_per_mtok = 1000000 }
"#;

const ROUTER_CONFIG: &str = r#"
[router]
budget_url = "http://127.0.0.1:50054"   # replaced by the budget service started apart

[router.rate_limit]
enabled = false
"#;

fn tenant_scope() -> Scope {
    Scope {
        kind: ScopeKind::Tenant.into(),
        id: String::new(),
    }
}

/// Holds one of the budget service's admission slots for as long as the returned task runs: a
/// unary `GetBudget` whose request message never arrives, so its handler waits with the slot.
fn hold_a_slot(channel: Channel) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut grpc = tonic::client::Grpc::new(channel);
        grpc.ready().await.unwrap();
        let codec = tonic_prost::ProstCodec::<GetBudgetRequest, GetBudgetResponse>::default();
        let path = http::uri::PathAndQuery::from_static("/weir.budget.v1.BudgetService/GetBudget");
        let never = futures::stream::pending::<GetBudgetRequest>();
        let _ = grpc
            .client_streaming(tonic::Request::new(never), path, codec)
            .await;
    })
}

/// A direct SHEDDABLE call to the budget service: whether it is shed.
async fn sheddable_is_shed(budget: &Mesh) -> bool {
    let mut request = tonic::Request::new(GetBudgetRequest {
        scope: Some(tenant_scope()),
    });
    request
        .metadata_mut()
        .insert("weir-criticality", MetadataValue::from_static("SHEDDABLE"));
    // No budget is set, so a call that gets through is answered NOT_FOUND.
    match budget.budget().get_budget(request).await {
        Err(status) if status.code() == Code::Unavailable => {
            let reason = status
                .get_error_details()
                .error_info()
                .unwrap()
                .reason
                .clone();
            assert_eq!(reason, "OVERLOADED", "{status:?}");
            true
        }
        _ => false,
    }
}

#[tokio::test]
async fn a_sheddable_requests_reserve_and_commit_land_while_the_budget_sheds_sheddable_work() {
    let budget = Mesh::start_services(&budget_config(&unique_prefix()), &[Service::Budget]).await;
    let budget_url = budget.url(Service::Budget);
    let front = Mesh::start_with(
        &format!("{MODELS}{ROUTER_CONFIG}"),
        &[Service::Inference, Service::Router],
        |c| {
            c.router.budget_url = budget_url;
        },
    )
    .await;

    // Load the budget service until it sheds SHEDDABLE calls (the control: what a SHEDDABLE
    // Commit would get if it carried its request's criticality).
    let held = hold_a_slot(budget.channel(Service::Budget));
    assert!(
        eventually(Duration::from_secs(5), || sheddable_is_shed(&budget)).await,
        "the budget service sheds SHEDDABLE calls while a slot is held"
    );

    // A SHEDDABLE request through the router: admitted there (the router is idle), and its
    // Reserve and Commit reach the loaded budget service as CRITICAL.
    let mut request = tonic::Request::new(complete("sim-priced", "pay for this"));
    request
        .metadata_mut()
        .insert("weir-criticality", MetadataValue::from_static("SHEDDABLE"));
    let answer = front
        .router()
        .complete(request)
        .await
        .expect("served and metered")
        .into_inner();
    let usage = answer.usage.unwrap();
    assert_eq!(
        answer.cost_micros,
        usage.input_tokens + usage.output_tokens,
        "charged at one micro-USD per token: {answer:?}"
    );
    assert!(
        answer
            .notices
            .iter()
            .all(|n| !n.reason.starts_with("BUDGET")),
        "no budget notice: {:?}",
        answer.notices
    );
    assert!(
        sheddable_is_shed(&budget).await,
        "still overloaded throughout"
    );

    let spend = budget
        .budget()
        .get_spend(GetSpendRequest {
            scope: Some(tenant_scope()),
            ..GetSpendRequest::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(spend.total_micros, answer.cost_micros, "the commit landed");

    held.abort();
    front.stop().await;
    budget.stop().await;
}
