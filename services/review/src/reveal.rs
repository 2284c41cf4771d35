//! Who may read an item's output.
//!
//! In blocking mode the whole point of review is that the answer is not delivered until a person
//! has approved it, so the service must not hand it out by another door: a caller without the
//! `reviewer` (or `admin`) role (the user waiting in `WatchItem`, the router's mesh token, any
//! key of the tenant) sees a blocking item's output only once it is DECIDED and approved, and an
//! edited item's output is the edited text. Pending, claimed, rejected, cancelled and expired
//! items carry no output for them. Reviewers see everything, since judging the output is their
//! job. Post-hoc items were delivered before they were queued: nothing to withhold.

use weir_mesh::auth::{Caller, Role};
use weir_proto::review::{ItemState, ReviewItem, ReviewMode, Verdict};

/// Whether the caller of a request may read every output (it has the `reviewer` role; every
/// caller has it in single-tenant dev mode).
pub fn may_review(extensions: &http::Extensions) -> bool {
    Caller::of(extensions).is_some_and(|caller| caller.has_role(Role::Reviewer))
}

/// `item` as a caller who may or may not review sees it (see the module doc).
pub fn for_caller(mut item: ReviewItem, reviewer: bool) -> ReviewItem {
    if reviewer || item.mode == ReviewMode::PostHoc as i32 {
        return item;
    }
    let decided = item.state == ItemState::Decided as i32;
    match item.decision.as_ref().map(|d| d.verdict) {
        Some(v) if decided && v == Verdict::Approve as i32 => {}
        Some(v) if decided && v == Verdict::Edit as i32 => {
            if let (Some(output), Some(decision)) = (item.output.as_mut(), item.decision.as_ref()) {
                output.content = decision.edited_content.clone();
            }
        }
        _ => item.output = None,
    }
    item
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use weir_proto::{common::Message, review::Decision};

    use super::*;

    fn item(state: ItemState, verdict: Option<Verdict>, mode: ReviewMode) -> ReviewItem {
        ReviewItem {
            state: state as i32,
            mode: mode as i32,
            output: Some(Message {
                content: "the model's answer".into(),
                ..Message::default()
            }),
            decision: verdict.map(|v| Decision {
                verdict: v as i32,
                edited_content: "the reviewer's text".into(),
                ..Decision::default()
            }),
            ..ReviewItem::default()
        }
    }

    fn output(item: &ReviewItem) -> Option<&str> {
        item.output.as_ref().map(|m| m.content.as_str())
    }

    #[test]
    fn a_blocking_output_is_withheld_until_approved() {
        let blocking = ReviewMode::Blocking;
        for (state, verdict) in [
            (ItemState::Pending, None),
            (ItemState::Claimed, None),
            (ItemState::Decided, Some(Verdict::Reject)),
            (ItemState::Cancelled, None),
            (ItemState::Expired, None),
        ] {
            let seen = for_caller(item(state, verdict, blocking), false);
            assert_eq!(output(&seen), None, "{state:?} {verdict:?}");
            let reviewer = for_caller(item(state, verdict, blocking), true);
            assert_eq!(output(&reviewer), Some("the model's answer"));
        }
        let approved = item(ItemState::Decided, Some(Verdict::Approve), blocking);
        assert_eq!(
            output(&for_caller(approved, false)),
            Some("the model's answer")
        );
        let edited = item(ItemState::Decided, Some(Verdict::Edit), blocking);
        assert_eq!(
            output(&for_caller(edited, false)),
            Some("the reviewer's text")
        );
    }

    #[test]
    fn a_post_hoc_output_was_already_delivered() {
        let sampled = item(ItemState::Pending, None, ReviewMode::PostHoc);
        assert_eq!(
            output(&for_caller(sampled, false)),
            Some("the model's answer")
        );
    }
}
