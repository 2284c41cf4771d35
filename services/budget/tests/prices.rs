//! Prices: cached-input and batch prices, unknown models failing closed, the price list.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;

use common::*;
use tonic::Code;
use weir_mesh::{
    ApiError,
    catalog::{Catalog, ModelSpec},
};
use weir_proto::{budget as pb, common::Usage};

fn catalog_with_unpriced() -> Arc<Catalog> {
    let mut models: Vec<(String, ModelSpec)> = Catalog::default()
        .iter()
        .map(|(n, s)| (n.to_string(), s.clone()))
        .collect();
    models.push(("unpriced".into(), ModelSpec::default()));
    Arc::new(Catalog::new(models))
}

fn estimate(
    model: &str,
    input: i64,
    cached: i64,
    output: i64,
    tier: pb::PriceTier,
) -> pb::EstimateCostRequest {
    pb::EstimateCostRequest {
        model: model.into(),
        input_tokens: input,
        cached_input_tokens: cached,
        max_output_tokens: output,
        tier: tier.into(),
    }
}

#[tokio::test]
async fn cached_input_and_batch_prices_apply() {
    let server = start(config()).await;
    let mut c = server.client.clone();
    let cost = |r: tonic::Response<pb::EstimateCostResponse>| r.into_inner().cost_micros;
    // sim-small: $0.15 / $0.60 per Mtok, cached and batch at half.
    let standard = c
        .estimate_cost(req(
            "acme",
            estimate(
                "sim-small",
                1_000_000,
                600_000,
                1_000_000,
                pb::PriceTier::Standard,
            ),
        ))
        .await
        .unwrap();
    assert_eq!(
        cost(standard),
        400_000 * 15 / 100 + 600_000 * 75 / 1000 + 600_000
    );
    let batch = c
        .estimate_cost(req(
            "acme",
            estimate(
                "sim-small",
                1_000_000,
                600_000,
                1_000_000,
                pb::PriceTier::Batch,
            ),
        ))
        .await
        .unwrap();
    assert_eq!(cost(batch), 30_000 + 45_000 + 300_000);

    // A commit priced from usage uses the same prices.
    let r = reserve(&mut c, "acme", "r", vec![tenant_scope()], 1_000_000)
        .await
        .unwrap();
    let settled = c
        .commit(req(
            "acme",
            pb::CommitRequest {
                reservation_id: r.id,
                usage: Some(Usage {
                    input_tokens: 1_000_000,
                    cached_input_tokens: 600_000,
                    output_tokens: 1_000_000,
                    total_tokens: 2_000_000,
                }),
                tier: pb::PriceTier::Batch.into(),
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(settled.cost_micros, 375_000);
    assert_eq!(settled.refunded_micros, 625_000);
    cleanup(&server.prefix).await;
}

#[tokio::test]
async fn unknown_prices_fail_closed() {
    let config = config();
    let server = start_with(config.clone(), catalog_with_unpriced()).await;
    let mut c = server.client.clone();
    for model in ["unpriced", "ghost"] {
        let error = c
            .estimate_cost(req(
                "acme",
                estimate(model, 10, 0, 10, pb::PriceTier::Standard),
            ))
            .await
            .map_err(|s| ApiError::from_status(&s))
            .unwrap_err();
        assert_eq!(error.code(), Code::FailedPrecondition, "{model}");
        assert_eq!(error.reason(), "PRICE_UNKNOWN");
    }
    // A reservation for a model this service cannot price is refused before anything is held
    // (and so before any model runs): its answer could not be charged, and would be free.
    set_budget(&mut c, "acme", tenant_scope(), 1_000_000, 0.0).await;
    for model in ["unpriced", "ghost"] {
        let error = c
            .reserve(req(
                "acme",
                reserve_request(&format!("r-{model}"), vec![tenant_scope()], 1000, model),
            ))
            .await
            .map_err(|s| ApiError::from_status(&s))
            .unwrap_err();
        assert_eq!(error.code(), Code::FailedPrecondition, "{model}");
        assert_eq!(error.reason(), "PRICE_UNKNOWN");
        assert!(
            error.message().contains(model),
            "names the model: {error:?}"
        );
    }
    let budget = get_budget(&mut c, "acme", tenant_scope()).await;
    assert_eq!((budget.held_micros, budget.spent_micros), (0, 0));
    cleanup(&config.key_prefix).await;
}

#[tokio::test]
async fn prices_are_listed_in_pages() {
    let server = start_with(config(), catalog_with_unpriced()).await;
    let mut c = server.client.clone();
    let page = |token: String| pb::ListPricesRequest {
        page_size: 1,
        page_token: token,
    };
    let first = c
        .list_prices(req("acme", page(String::new())))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(first.prices.len(), 1);
    assert_eq!(first.prices[0].model, "sim-large");
    assert_eq!(first.prices[0].input_micros_per_mtok, 2_500_000);
    let second = c
        .list_prices(req("acme", page(first.next_page_token)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(second.prices[0].model, "sim-small");
    assert!(
        second.next_page_token.is_empty(),
        "unpriced models are not listed"
    );
    let bad = c
        .list_prices(req("acme", page("garbage".into())))
        .await
        .unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument);
}
