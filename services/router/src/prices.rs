//! Do the router and the budget service agree on prices?
//!
//! The router reserves each request's worst case at *its* catalog's price; the budget service
//! commits the actual usage at *its* price. During a config roll-out the two catalogs can differ.
//! A model the budget service cannot price at all is refused at `Reserve`, before the model runs
//! (see [`crate::spend`]); a model priced differently (another `price.version`) still works, since
//! the commit is priced by the budget service, but holds are then sized by the wrong price. So at
//! start-up the router reads the budget service's prices (`ListPrices`, retried until the service
//! answers, for up to [`CHECK_FOR`]) and says where they differ:
//!
//! - a WARN log line per model the budget service has no price for, or prices at another version;
//! - the gauge `weir_price_version_skew{model}`: 1 while the two disagree on the model, 0 when they
//!   agree (the budget service also counts reservations priced at another version,
//!   `weir_budget_price_version_skew_total{model}`).

use std::{collections::HashMap, sync::Arc, time::Duration};

use tracing::Instrument;
use weir_mesh::{catalog::Catalog, client::BoxedClient, deadline::Deadline};
use weir_proto::budget::{ListPricesRequest, budget_service_client::BudgetServiceClient};

use crate::{inference::Call, spend::BUDGET_BACKEND};

/// How long the start-up check keeps trying to reach the budget service.
pub const CHECK_FOR: Duration = Duration::from_secs(60);
/// Pause between two tries.
const RETRY_EVERY: Duration = Duration::from_secs(1);
/// Deadline of one `ListPrices` page.
const PAGE_TIMEOUT: Duration = Duration::from_secs(2);

/// How the two catalogs compare on one model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Skew {
    /// The budget service has no price for the model: its requests are refused.
    Missing,
    /// The budget service prices it at another version.
    Version {
        /// The router's version.
        ours: String,
        /// The budget service's.
        theirs: String,
    },
}

/// Compares the router's `catalog` with the budget service's `prices` (model → version): the
/// models on which they disagree. Free and unpriced models of the router are not compared.
pub fn compare(catalog: &Catalog, prices: &HashMap<String, String>) -> Vec<(String, Skew)> {
    let mut skews = Vec::new();
    for (name, spec) in catalog.iter() {
        let Some(price) = spec.price.as_ref() else {
            continue;
        };
        let skew = match prices.get(name) {
            None => Some(Skew::Missing),
            Some(theirs) if *theirs != price.version => Some(Skew::Version {
                ours: price.version.clone(),
                theirs: theirs.clone(),
            }),
            Some(_) => None,
        };
        metrics::gauge!("weir_price_version_skew", "model" => name.to_string())
            .set(if skew.is_some() { 1.0 } else { 0.0 });
        if let Some(skew) = skew {
            skews.push((name.to_string(), skew));
        }
    }
    skews
}

/// Starts the start-up check on the current runtime (see the module doc).
pub(crate) fn check_at_start(client: BudgetServiceClient<BoxedClient>, catalog: Arc<Catalog>) {
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        return;
    };
    let task = async move {
        let until = tokio::time::Instant::now() + CHECK_FOR;
        loop {
            match list_prices(client.clone()).await {
                Ok(prices) => {
                    for (model, skew) in compare(&catalog, &prices) {
                        match skew {
                            Skew::Missing => tracing::warn!(
                                %model,
                                "the budget service has no price for this model: its requests \
                                 will be refused (FAILED_PRECONDITION PRICE_UNKNOWN) until both \
                                 catalogs price it"
                            ),
                            Skew::Version { ours, theirs } => tracing::warn!(
                                %model, router_version = %ours, budget_version = %theirs,
                                "the router and the budget service price this model at different \
                                 versions: holds are sized by the router's price, commits charged \
                                 at the budget service's"
                            ),
                        }
                    }
                    return;
                }
                Err(status) if tokio::time::Instant::now() >= until => {
                    tracing::warn!(
                        code = ?status.code(),
                        "could not read the budget service's prices to compare them with ours"
                    );
                    return;
                }
                Err(_) => tokio::time::sleep(RETRY_EVERY).await,
            }
        }
    };
    runtime.spawn(task.in_current_span());
}

/// Every price of the budget service: model → version.
async fn list_prices(
    mut client: BudgetServiceClient<BoxedClient>,
) -> Result<HashMap<String, String>, tonic::Status> {
    let mut prices = HashMap::new();
    let mut page_token = String::new();
    loop {
        let call = Call::default().with_deadline(Deadline::after(PAGE_TIMEOUT));
        let page = client
            .list_prices(call.bookkeeping(
                ListPricesRequest {
                    page_size: 1000,
                    page_token,
                },
                BUDGET_BACKEND,
            ))
            .await?
            .into_inner();
        prices.extend(page.prices.into_iter().map(|p| (p.model, p.version)));
        if page.next_page_token.is_empty() {
            return Ok(prices);
        }
        page_token = page.next_page_token;
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use weir_mesh::config::Source;

    use super::*;

    #[test]
    fn missing_prices_and_other_versions_are_skews() {
        let catalog = Catalog::from_source(&Source::from_toml(
            r#"
[models.a]
sim = {}
price = { version = "2026-11", input_micros_per_mtok = 1, output_micros_per_mtok = 1 }
[models.b]
sim = {}
price = { version = "2026-11", input_micros_per_mtok = 1, output_micros_per_mtok = 1 }
[models.c]
sim = {}
price = { version = "2026-12", input_micros_per_mtok = 1, output_micros_per_mtok = 1 }
"#,
        ))
        .unwrap();
        let theirs = HashMap::from([
            ("a".to_string(), "2026-11".to_string()),
            ("c".to_string(), "2026-11".to_string()),
        ]);
        let mut skews = compare(&catalog, &theirs);
        skews.sort_by(|x, y| x.0.cmp(&y.0));
        assert_eq!(
            skews,
            vec![
                ("b".to_string(), Skew::Missing),
                (
                    "c".to_string(),
                    Skew::Version {
                        ours: "2026-12".to_string(),
                        theirs: "2026-11".to_string()
                    }
                ),
            ]
        );
    }
}
