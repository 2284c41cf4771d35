//! Soft limits, rolling windows and spend reports.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use common::*;
use tonic::Code;
use weir_proto::{budget as pb, common::Usage};

/// An HTTP receiver that records the JSON bodies POSTed to it.
async fn webhook_receiver() -> (String, Arc<Mutex<Vec<serde_json::Value>>>) {
    let received = Arc::new(Mutex::new(Vec::new()));
    let sink = received.clone();
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |axum::Json(body): axum::Json<serde_json::Value>| {
            let sink = sink.clone();
            async move {
                sink.lock().unwrap().push(body);
                "ok"
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (format!("http://{addr}/hook"), received)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soft_limit_event_fires_once_per_period() {
    let (url, received) = webhook_receiver().await;
    let mut config = config();
    config.soft_limit_webhook = Some(url);
    // Two replicas commit concurrently: the event is still raised once.
    let a = start(config.clone()).await;
    let b = start(config.clone()).await;
    let mut c = a.client.clone();
    let budget = set_budget(&mut c, "acme", tenant_scope(), 1_000_000, 0.5).await;
    assert!(!budget.soft_limit_reached);

    let mut reservations = Vec::new();
    for i in 0..20 {
        reservations.push(
            reserve(
                &mut c,
                "acme",
                &format!("r{i}"),
                vec![tenant_scope()],
                50_000,
            )
            .await
            .unwrap()
            .id,
        );
    }
    let commits = reservations.iter().enumerate().map(|(i, id)| {
        let mut client = if i % 2 == 0 {
            a.client.clone()
        } else {
            b.client.clone()
        };
        let id = id.clone();
        async move { commit_cost(&mut client, "acme", &id, "", 50_000).await }
    });
    for result in futures::future::join_all(commits).await {
        result.unwrap();
    }
    let events = a.api.metrics().soft_limit_events() + b.api.metrics().soft_limit_events();
    assert_eq!(events, 1, "one soft-limit event for the period");
    assert!(
        get_budget(&mut c, "acme", tenant_scope())
            .await
            .soft_limit_reached
    );
    let delivered = eventually(Duration::from_secs(5), || {
        let received = received.clone();
        async move { !received.lock().unwrap().is_empty() }
    })
    .await;
    assert!(delivered, "the webhook was called");
    tokio::time::sleep(Duration::from_millis(100)).await; // let a wrong second delivery arrive
    let bodies = received.lock().unwrap().clone();
    assert_eq!(bodies.len(), 1);
    assert_eq!(bodies[0]["type"], "budget.soft_limit_reached");
    assert_eq!(bodies[0]["subject"], "tenant:acme");
    assert_eq!(bodies[0]["soft_limit_micros"], 500_000);
    cleanup(&config.key_prefix).await;
}

#[tokio::test]
async fn rolling_window_frees_spend_as_it_slides() {
    let server = start(config()).await;
    let mut c = server.client.clone();
    c.set_budget(req(
        "acme",
        pb::SetBudgetRequest {
            scope: Some(tenant_scope()),
            hard_limit_micros: 1_000_000,
            soft_limit_fraction: 0.0,
            period: Some(pb::Period {
                kind: Some(pb::period::Kind::Rolling(prost_types::Duration {
                    seconds: 2,
                    nanos: 0,
                })),
            }),
        },
    ))
    .await
    .unwrap();
    let r = reserve(&mut c, "acme", "a", vec![tenant_scope()], 1_000_000)
        .await
        .unwrap();
    commit_cost(&mut c, "acme", &r.id, "", 1_000_000)
        .await
        .unwrap();
    let refused = reserve(&mut c, "acme", "b", vec![tenant_scope()], 1)
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted);
    let retry = refused.retry_after().unwrap();
    assert!(retry <= Duration::from_secs(3), "{retry:?}");
    let freed = eventually(Duration::from_secs(5), || {
        let mut c = c.clone();
        async move {
            reserve(&mut c, "acme", "later", vec![tenant_scope()], 1)
                .await
                .is_ok()
        }
    })
    .await;
    assert!(freed, "spend leaves a rolling window");
    cleanup(&server.prefix).await;
}

fn usage(input: i64, cached: i64, output: i64) -> Usage {
    Usage {
        input_tokens: input,
        output_tokens: output,
        cached_input_tokens: cached,
        total_tokens: input + output,
    }
}

#[tokio::test]
async fn spend_is_reported_by_model() {
    let server = start(config()).await;
    let mut c = server.client.clone();
    for (i, model) in ["sim-small", "sim-large", "sim-large"].iter().enumerate() {
        let r = c
            .reserve(req(
                "acme",
                reserve_request(&format!("r{i}"), vec![user("u1")], 1_000_000, model),
            ))
            .await
            .unwrap()
            .into_inner()
            .reservation
            .unwrap();
        c.commit(req(
            "acme",
            pb::CommitRequest {
                reservation_id: r.id,
                usage: Some(usage(1000, 0, 100)),
                ..Default::default()
            },
        ))
        .await
        .unwrap();
    }
    for scope in [tenant_scope(), user("u1")] {
        let spend = c
            .get_spend(req(
                "acme",
                pb::GetSpendRequest {
                    scope: Some(scope),
                    ..Default::default()
                },
            ))
            .await
            .unwrap()
            .into_inner();
        // sim-large: 1000 * 2.5 + 100 * 10 = 3500 micro-USD each; sim-small: 150 + 60 = 210.
        assert_eq!(spend.total_micros, 2 * 3500 + 210);
        let models: Vec<(&str, i64, i64)> = spend
            .by_model
            .iter()
            .map(|m| (m.model.as_str(), m.cost_micros, m.requests))
            .collect();
        assert_eq!(models, [("sim-large", 7000, 2), ("sim-small", 210, 1)]);
        assert_eq!(spend.by_model[0].usage.as_ref().unwrap().input_tokens, 2000);
    }
    // Another user spent nothing.
    let spend = c
        .get_spend(req(
            "acme",
            pb::GetSpendRequest {
                scope: Some(user("u2")),
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(spend.total_micros, 0);
    cleanup(&server.prefix).await;
}
