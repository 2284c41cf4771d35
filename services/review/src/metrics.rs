//! The review service's Prometheus metrics (through the `metrics` facade, which `/metrics`
//! exports). Counts are per process: sum them over replicas.

use weir_proto::review::Verdict;

use crate::config::TimeoutAction;

/// Counter: items created (replays of a `request_id` not counted).
pub const ITEMS_CREATED_TOTAL: &str = "weir_review_items_created_total";
/// Counter: reviewer decisions by `verdict` (`approve`, `reject`, `edit`).
pub const DECISIONS_TOTAL: &str = "weir_review_decisions_total";
/// Counter: SLA timeout actions applied by this replica, by `action` (`reject`, `approve`,
/// `escalate`).
pub const SLA_ACTIONS_TOTAL: &str = "weir_review_sla_actions_total";
/// Counter: leases that lapsed and returned their item to PENDING (applied by this replica).
pub const LEASE_EXPIRIES_TOTAL: &str = "weir_review_lease_expiries_total";

/// Registers every series at zero, so dashboards see them before the first event.
pub fn register() {
    metrics::counter!(ITEMS_CREATED_TOTAL).increment(0);
    for verdict in ["approve", "reject", "edit"] {
        metrics::counter!(DECISIONS_TOTAL, "verdict" => verdict).increment(0);
    }
    for action in ["reject", "approve", "escalate"] {
        metrics::counter!(SLA_ACTIONS_TOTAL, "action" => action).increment(0);
    }
    metrics::counter!(LEASE_EXPIRIES_TOTAL).increment(0);
}

pub(crate) fn item_created() {
    metrics::counter!(ITEMS_CREATED_TOTAL).increment(1);
}

pub(crate) fn decision(verdict: Verdict) {
    let verdict = match verdict {
        Verdict::Approve => "approve",
        Verdict::Edit => "edit",
        Verdict::Reject | Verdict::Unspecified => "reject",
    };
    metrics::counter!(DECISIONS_TOTAL, "verdict" => verdict).increment(1);
}

pub(crate) fn sla_action(action: TimeoutAction) {
    metrics::counter!(SLA_ACTIONS_TOTAL, "action" => action.as_str()).increment(1);
}

pub(crate) fn lease_expired() {
    metrics::counter!(LEASE_EXPIRIES_TOTAL).increment(1);
}
