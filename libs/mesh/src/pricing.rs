//! Pricing: integer micro-USD from a model's [`PriceSpec`] and token counts.
//!
//! [`cost_micros`] is pure and cheap, so the router can price the worst case of a request (prompt
//! tokens + `max_tokens` at the model's price) without a network call, and the budget service
//! prices a commit's actual usage with the same function: both link this module, so the two can
//! only disagree through their catalogs (which [`PriceSpec::version`] tells apart).
//!
//! - Input tokens include cached ones: `input - cached` tokens pay the input price and `cached`
//!   tokens the cached-input price.
//! - At the batch tier, input pays the batch input price, output the batch output price, and
//!   cached input the lower of the cached-input and batch-input prices (a cache hit never costs
//!   more than a miss).
//! - The sum is computed exactly (128-bit) and divided by one million once, rounding up, so a
//!   request is never priced below its true cost and a thousand tiny requests are never free.
//! - Costs are capped at [`MAX_MICROS`]: larger ones are refused as overflow.

use crate::{
    ApiError,
    catalog::{Catalog, PriceSpec},
};
use weir_proto::budget::{ModelPrice, PriceTier};

/// The largest amount of money Weir handles, in micro-USD: 2^53 - 1 (about $9 billion). Redis
/// scripts do arithmetic in Lua numbers (doubles), which are exact up to this value.
pub const MAX_MICROS: i64 = (1 << 53) - 1;

/// Tokens per price unit: prices are per million tokens.
const TOKENS_PER_PRICE_UNIT: i128 = 1_000_000;

/// Which price list applies.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum Tier {
    /// Interactive requests (the default).
    #[default]
    Standard,
    /// Batch requests.
    Batch,
}

impl Tier {
    /// The tier of a protobuf `PriceTier` (unspecified means standard).
    pub fn from_proto(value: i32) -> Result<Self, ApiError> {
        match PriceTier::try_from(value) {
            Ok(PriceTier::Unspecified | PriceTier::Standard) => Ok(Self::Standard),
            Ok(PriceTier::Batch) => Ok(Self::Batch),
            Err(_) => Err(ApiError::invalid_argument(
                "tier",
                format!("unknown price tier {value}"),
            )),
        }
    }
}

/// Token counts to price.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Tokens {
    /// Prompt tokens, including cached ones.
    pub input: i64,
    /// Of which served from the prompt cache.
    pub cached_input: i64,
    /// Generated tokens (or, for an estimate, the most the answer may have).
    pub output: i64,
}

impl Tokens {
    /// Tokens of a `weir.common.v1.Usage`.
    pub fn from_usage(usage: &weir_proto::common::Usage) -> Self {
        Self {
            input: usage.input_tokens,
            cached_input: usage.cached_input_tokens,
            output: usage.output_tokens,
        }
    }

    /// Checks the counts; `prefix` is the request field holding them (e.g. `usage.`).
    pub fn validate(&self, prefix: &str) -> Result<(), CostError> {
        for (field, value) in [
            ("input_tokens", self.input),
            ("cached_input_tokens", self.cached_input),
            ("output_tokens", self.output),
        ] {
            if value < 0 {
                return Err(CostError::Negative {
                    field: format!("{prefix}{field}"),
                    value,
                });
            }
        }
        if self.cached_input > self.input {
            return Err(CostError::CachedExceedsInput {
                field: format!("{prefix}cached_input_tokens"),
            });
        }
        Ok(())
    }
}

/// Why a cost could not be computed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CostError {
    /// The model is not in the catalog, or has no price and is not marked free.
    #[error("model \"{0}\" has no price: refusing to count it as free")]
    PriceUnknown(String),
    /// A token count is negative.
    #[error("{field}: must not be negative, got {value}")]
    Negative {
        /// The request field.
        field: String,
        /// The value.
        value: i64,
    },
    /// More cached tokens than input tokens.
    #[error("{field}: cannot exceed input_tokens")]
    CachedExceedsInput {
        /// The request field.
        field: String,
    },
    /// The cost is above [`MAX_MICROS`].
    #[error("the cost exceeds the largest amount handled ({MAX_MICROS} micro-USD)")]
    Overflow,
}

impl From<CostError> for ApiError {
    fn from(error: CostError) -> Self {
        match &error {
            CostError::PriceUnknown(model) => ApiError::new(
                tonic::Code::FailedPrecondition,
                "PRICE_UNKNOWN",
                error.to_string(),
            )
            .with_metadata("model", model.clone()),
            CostError::Negative { field, .. } | CostError::CachedExceedsInput { field } => {
                ApiError::invalid_argument(field.clone(), error.to_string())
            }
            CostError::Overflow => ApiError::invalid_argument("tokens", error.to_string()),
        }
    }
}

/// The price of `model`: fails closed when the model is unknown or has no price.
pub fn price_of<'a>(catalog: &'a Catalog, model: &str) -> Result<&'a PriceSpec, CostError> {
    catalog
        .get(model)
        .and_then(|spec| spec.price.as_ref())
        .ok_or_else(|| CostError::PriceUnknown(model.to_string()))
}

/// The cost of `tokens` at `price` and `tier`, in micro-USD, rounded up (see the module doc).
pub fn cost_micros(price: &PriceSpec, tokens: &Tokens, tier: Tier) -> Result<i64, CostError> {
    tokens.validate("")?;
    if price.free {
        return Ok(0);
    }
    let (input_price, cached_price, output_price) = match tier {
        Tier::Standard => (
            price.input_micros_per_mtok,
            price.effective_cached_input(),
            price.output_micros_per_mtok,
        ),
        Tier::Batch => (
            price.effective_batch_input(),
            price
                .effective_cached_input()
                .min(price.effective_batch_input()),
            price.effective_batch_output(),
        ),
    };
    let uncached = i128::from(tokens.input) - i128::from(tokens.cached_input);
    // Each product is below 2^63 * 2^63 = 2^126, and the sum of three below 2^128: no overflow.
    let total = uncached
        .checked_mul(i128::from(input_price))
        .and_then(|a| {
            i128::from(tokens.cached_input)
                .checked_mul(i128::from(cached_price))
                .and_then(|b| a.checked_add(b))
        })
        .and_then(|ab| {
            i128::from(tokens.output)
                .checked_mul(i128::from(output_price))
                .and_then(|c| ab.checked_add(c))
        })
        .ok_or(CostError::Overflow)?;
    let micros = (total + TOKENS_PER_PRICE_UNIT - 1).div_euclid(TOKENS_PER_PRICE_UNIT);
    i64::try_from(micros)
        .ok()
        .filter(|m| (0..=MAX_MICROS).contains(m))
        .ok_or(CostError::Overflow)
}

/// The worst-case cost of a request to `model`: its prompt at full input price minus the cache
/// discount, plus `max_output_tokens` at the output price. What the router reserves.
pub fn estimate(
    catalog: &Catalog,
    model: &str,
    tokens: &Tokens,
    tier: Tier,
) -> Result<i64, CostError> {
    cost_micros(price_of(catalog, model)?, tokens, tier)
}

/// The protobuf form of a price, with the effective cached-input and batch prices.
pub fn to_proto(model: &str, price: &PriceSpec) -> ModelPrice {
    ModelPrice {
        model: model.to_string(),
        version: price.version.clone(),
        input_micros_per_mtok: price.input_micros_per_mtok,
        output_micros_per_mtok: price.output_micros_per_mtok,
        cached_input_micros_per_mtok: price.effective_cached_input(),
        batch_input_micros_per_mtok: price.effective_batch_input(),
        batch_output_micros_per_mtok: price.effective_batch_output(),
        free: price.free,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokens(input: i64, cached_input: i64, output: i64) -> Tokens {
        Tokens {
            input,
            cached_input,
            output,
        }
    }

    fn small() -> PriceSpec {
        // $0.15 / $0.60 per Mtok, cached and batch at half price.
        PriceSpec::per_mtok("t", 150_000, 600_000)
    }

    #[test]
    fn standard_price_per_million_tokens() {
        assert_eq!(
            cost_micros(&small(), &tokens(1_000_000, 0, 1_000_000), Tier::Standard),
            Ok(750_000)
        );
        // 1000 in + 500 out = 150 + 300 micro-USD.
        assert_eq!(
            cost_micros(&small(), &tokens(1000, 0, 500), Tier::Standard),
            Ok(450)
        );
    }

    #[test]
    fn rounds_up_never_down() {
        // One input token costs 0.15 micro-USD: charged 1.
        assert_eq!(
            cost_micros(&small(), &tokens(1, 0, 0), Tier::Standard),
            Ok(1)
        );
        assert_eq!(
            cost_micros(&small(), &tokens(0, 0, 0), Tier::Standard),
            Ok(0)
        );
        // 7 tokens * 0.15 = 1.05 -> 2.
        assert_eq!(
            cost_micros(&small(), &tokens(7, 0, 0), Tier::Standard),
            Ok(2)
        );
    }

    #[test]
    fn cached_input_is_priced_lower() {
        // 1M input of which 600k cached: 400k * 0.15 + 600k * 0.075 = 60_000 + 45_000.
        assert_eq!(
            cost_micros(&small(), &tokens(1_000_000, 600_000, 0), Tier::Standard),
            Ok(105_000)
        );
    }

    #[test]
    fn batch_tier_uses_batch_prices_and_caps_cached_at_batch_input() {
        assert_eq!(
            cost_micros(&small(), &tokens(1_000_000, 0, 1_000_000), Tier::Batch),
            Ok(375_000)
        );
        let mut price = small();
        price.cached_input_micros_per_mtok = Some(100_000);
        price.batch_input_micros_per_mtok = Some(50_000);
        // Cached input at batch tier: min(100_000, 50_000).
        assert_eq!(
            cost_micros(&price, &tokens(1_000_000, 1_000_000, 0), Tier::Batch),
            Ok(50_000)
        );
    }

    #[test]
    fn unset_discounts_charge_the_standard_price() {
        let price = PriceSpec {
            input_micros_per_mtok: 1_000_000,
            output_micros_per_mtok: 2_000_000,
            ..PriceSpec::default()
        };
        assert_eq!(
            cost_micros(
                &price,
                &tokens(1_000_000, 1_000_000, 1_000_000),
                Tier::Batch
            ),
            Ok(3_000_000)
        );
    }

    #[test]
    fn free_models_cost_nothing_and_unknown_ones_fail_closed() {
        assert_eq!(
            cost_micros(&PriceSpec::free(), &tokens(10, 0, 10), Tier::Standard),
            Ok(0)
        );
        let catalog = Catalog::default();
        assert_eq!(
            estimate(&catalog, "nope", &tokens(1, 0, 1), Tier::Standard),
            Err(CostError::PriceUnknown("nope".into()))
        );
        let unpriced = crate::catalog::ModelSpec::default();
        let catalog = Catalog::new([("m".to_string(), unpriced)]);
        assert!(matches!(
            price_of(&catalog, "m"),
            Err(CostError::PriceUnknown(_))
        ));
        let status = ApiError::from(CostError::PriceUnknown("m".into()));
        assert_eq!(status.code(), tonic::Code::FailedPrecondition);
        assert_eq!(status.reason(), "PRICE_UNKNOWN");
    }

    #[test]
    fn bad_counts_and_overflow_are_refused() {
        assert!(matches!(
            cost_micros(&small(), &tokens(-1, 0, 0), Tier::Standard),
            Err(CostError::Negative { .. })
        ));
        assert!(matches!(
            cost_micros(&small(), &tokens(1, 2, 0), Tier::Standard),
            Err(CostError::CachedExceedsInput { .. })
        ));
        let expensive = PriceSpec::per_mtok("t", 1_000_000_000_000, 1_000_000_000_000);
        assert_eq!(
            cost_micros(&expensive, &tokens(i64::MAX, 0, i64::MAX), Tier::Standard),
            Err(CostError::Overflow)
        );
    }

    #[test]
    fn proto_price_carries_effective_prices() {
        let price = to_proto("sim-small", &small());
        assert_eq!(price.cached_input_micros_per_mtok, 75_000);
        assert_eq!(price.batch_output_micros_per_mtok, 300_000);
        assert!(!price.free);
    }
}
