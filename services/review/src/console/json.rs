//! Review items and statistics as the JSON the console page reads. Times are RFC 3339 strings in
//! UTC, durations are milliseconds, enums are lower-case words (`pending`, `approve`).

use serde_json::{Value, json};
use weir_proto::{
    common::{Message, Role},
    review::{Decision, GetQueueStatsResponse, ItemState, Lease, ReviewItem, ReviewMode, Verdict},
};

/// A protobuf timestamp as RFC 3339 (`null` when unset).
fn time(timestamp: Option<&prost_types::Timestamp>) -> Value {
    timestamp.map_or(Value::Null, |t| {
        let nanos = u32::try_from(t.nanos).unwrap_or(0);
        chrono::DateTime::from_timestamp(t.seconds, nanos)
            .map_or(Value::Null, |time| Value::String(time.to_rfc3339()))
    })
}

/// A protobuf duration in milliseconds.
fn millis(duration: Option<&prost_types::Duration>) -> i64 {
    duration.map_or(0, |d| {
        d.seconds.saturating_mul(1000) + i64::from(d.nanos / 1_000_000)
    })
}

/// `pending`, `claimed`, `decided`, `cancelled`, `expired`.
pub fn state_name(state: i32) -> &'static str {
    match ItemState::try_from(state).unwrap_or(ItemState::Unspecified) {
        ItemState::Pending => "pending",
        ItemState::Claimed => "claimed",
        ItemState::Decided => "decided",
        ItemState::Cancelled => "cancelled",
        ItemState::Expired => "expired",
        ItemState::Unspecified => "unspecified",
    }
}

/// The state of a `?state=` query; `None` for `all` (or nothing).
pub fn parse_state(name: &str) -> Option<Result<ItemState, String>> {
    match name.to_ascii_lowercase().as_str() {
        "" | "all" => None,
        "pending" => Some(Ok(ItemState::Pending)),
        "claimed" => Some(Ok(ItemState::Claimed)),
        "decided" => Some(Ok(ItemState::Decided)),
        "cancelled" => Some(Ok(ItemState::Cancelled)),
        "expired" => Some(Ok(ItemState::Expired)),
        other => Some(Err(format!(
            "state {other:?} is not one of all, pending, claimed, decided, cancelled, expired"
        ))),
    }
}

/// The verdict of a decision body: `approve`, `reject` or `edit`.
pub fn parse_verdict(name: &str) -> Result<Verdict, String> {
    match name.to_ascii_lowercase().as_str() {
        "approve" => Ok(Verdict::Approve),
        "reject" => Ok(Verdict::Reject),
        "edit" => Ok(Verdict::Edit),
        other => Err(format!(
            "verdict {other:?} is not one of approve, reject, edit"
        )),
    }
}

fn verdict_name(verdict: i32) -> &'static str {
    match Verdict::try_from(verdict).unwrap_or(Verdict::Unspecified) {
        Verdict::Approve => "approve",
        Verdict::Edit => "edit",
        // Unset means rejected (fail closed), as the proto says.
        Verdict::Reject | Verdict::Unspecified => "reject",
    }
}

/// `system`, `user`, `assistant`, `tool`.
fn role_name(role: i32) -> &'static str {
    match Role::try_from(role).unwrap_or(Role::Unspecified) {
        Role::System => "system",
        Role::User => "user",
        Role::Assistant => "assistant",
        Role::Tool => "tool",
        Role::Unspecified => "unknown",
    }
}

fn message(message: &Message) -> Value {
    json!({ "role": role_name(message.role), "content": message.content.clone() })
}

fn lease(lease: &Lease) -> Value {
    json!({
        "lease_id": lease.lease_id.clone(),
        "reviewer": lease.reviewer.clone(),
        "expire_time": time(lease.expire_time.as_ref()),
    })
}

fn decision(decision: &Decision) -> Value {
    json!({
        "verdict": verdict_name(decision.verdict),
        "edited_content": decision.edited_content.clone(),
        "reviewer": decision.reviewer.clone(),
        "comment": decision.comment.clone(),
        "decide_time": time(decision.decide_time.as_ref()),
    })
}

/// One review item.
pub fn item(item: &ReviewItem) -> Value {
    let mode = match ReviewMode::try_from(item.mode).unwrap_or(ReviewMode::Unspecified) {
        ReviewMode::PostHoc => "post_hoc",
        ReviewMode::Blocking | ReviewMode::Unspecified => "blocking",
    };
    json!({
        "id": item.id.clone(),
        "queue": item.queue.clone(),
        "state": state_name(item.state),
        "mode": mode,
        "conversation": item.conversation.iter().map(message).collect::<Vec<_>>(),
        "output": item.output.as_ref().map(message),
        "model": item.model.clone(),
        "reasons": item.reasons.clone(),
        "priority": item.priority,
        "labels": item.labels.clone(),
        "create_time": time(item.create_time.as_ref()),
        "sla_deadline_time": time(item.sla_deadline_time.as_ref()),
        "lease": item.lease.as_ref().map(lease),
        "decision": item.decision.as_ref().map(decision),
        "trace_id": item.trace_id.clone(),
        "source_request_id": item.source_request_id.clone(),
    })
}

/// A lease on its own (the answer of a renewal).
pub fn lease_only(value: Option<&Lease>) -> Value {
    value.map_or(Value::Null, lease)
}

/// Queue statistics.
pub fn stats(stats: &GetQueueStatsResponse) -> Value {
    json!({
        "queue": stats.queue.clone(),
        "pending": stats.pending,
        "claimed": stats.claimed,
        "sla_breached": stats.sla_breached,
        "oldest_pending_age_ms": millis(stats.oldest_pending_age.as_ref()),
        "decided_last_hour": stats.decided_last_hour,
        "decided_total": stats.decided_total,
        "approval_rate": stats.approval_rate,
        "reviewers": stats.reviewers.iter().map(|r| json!({
            "reviewer": r.reviewer.clone(),
            "decided": r.decided,
            "approved": r.approved,
        })).collect::<Vec<_>>(),
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn states_and_verdicts_round_trip_through_their_names() {
        for state in [
            ItemState::Pending,
            ItemState::Claimed,
            ItemState::Decided,
            ItemState::Cancelled,
            ItemState::Expired,
        ] {
            let name = state_name(state as i32);
            assert_eq!(parse_state(name), Some(Ok(state)));
        }
        assert_eq!(parse_state("all"), None);
        assert!(matches!(parse_state("done"), Some(Err(message)) if message.contains("pending")));
        for verdict in [Verdict::Approve, Verdict::Reject, Verdict::Edit] {
            assert_eq!(parse_verdict(verdict_name(verdict as i32)), Ok(verdict));
        }
        assert_eq!(verdict_name(Verdict::Unspecified as i32), "reject");
        assert_eq!(role_name(Role::Assistant as i32), "assistant");
        assert!(parse_verdict("maybe").is_err());
    }

    #[test]
    fn times_are_rfc3339_and_durations_milliseconds() {
        let t = prost_types::Timestamp {
            seconds: 1_800_000_000,
            nanos: 0,
        };
        assert_eq!(time(Some(&t)), json!("2027-01-15T08:00:00+00:00"));
        assert_eq!(time(None), Value::Null);
        let d = prost_types::Duration {
            seconds: 2,
            nanos: 500_000_000,
        };
        assert_eq!(millis(Some(&d)), 2500);
    }
}
