//! Choosing what of a session goes into a model's context.
//!
//! # Units
//!
//! Turns are chosen in *units* that are never split: an assistant message with `tool_calls`
//! together with the `ROLE_TOOL` messages that directly follow it (the results of those calls) is
//! one unit; every other message is a unit of its own. Chat APIs reject a tool result whose call
//! is missing, and a call without its result misleads the model, so a context holds both or
//! neither. (`ROLE_TOOL` messages that follow no call, which a client may append, form a unit of
//! their own.) Summaries cut the history at unit boundaries too.
//!
//! # Budget
//!
//! [`select_suffix`] takes the newest units that fit the token budget, newest first, and stops at
//! the first unit that does not fit, so the context is always a contiguous, most recent part of the
//! history. The summary, when there is one and it fits, is paid for first: it is the only record
//! of everything older.
//!
//! # Token counts
//!
//! Every count is of a chat message as sent, with [`weir_mesh::tokens::count_message`] in the
//! tokenizer family of the model asked for (exact for the `sim` family; an estimate of characters
//! / 4 for the others, see [`weir_mesh::tokens`]). The summary is sent as one system message,
//! [`summary_message`]. The prompt a model finally receives also costs the reply primer
//! ([`weir_mesh::tokens::REPLY_PRIMER_TOKENS`]) and whatever new messages the caller adds.

use weir_mesh::tokens;
use weir_proto::{
    common::{Message, Role},
    session::{GetContextResponse, Turn},
};

/// Text before the summary in the system message that carries it.
pub const SUMMARY_PREFIX: &str = "Summary of the earlier conversation: ";

/// The system message that carries a summary into a model's context.
pub fn summary_message(text: &str) -> Message {
    Message {
        role: Role::System.into(),
        content: format!("{SUMMARY_PREFIX}{text}"),
        ..Message::default()
    }
}

/// Tokens of the summary message for `text` in `family`.
pub fn summary_tokens(family: &str, text: &str) -> i64 {
    i64::from(tokens::count_message(family, &summary_message(text)))
}

/// The messages to put before a new request: the summary (as [`summary_message`]) and the turns
/// of a `GetContext` answer, oldest first. This is what the router prepends.
pub fn context_messages(context: &GetContextResponse) -> Vec<Message> {
    let summary = context
        .summary
        .as_ref()
        .filter(|s| !s.text.is_empty())
        .map(|s| summary_message(&s.text));
    summary
        .into_iter()
        .chain(context.turns.iter().filter_map(|t| t.message.clone()))
        .collect()
}

fn role(turn: &Turn) -> Option<Role> {
    turn.message
        .as_ref()
        .and_then(|m| Role::try_from(m.role).ok())
}

/// Whether the turn is a tool result.
pub fn is_tool_result(turn: &Turn) -> bool {
    role(turn) == Some(Role::Tool)
}

/// Whether the turn is an assistant message asking for tool calls.
pub fn is_tool_call(turn: &Turn) -> bool {
    role(turn) == Some(Role::Assistant)
        && turn
            .message
            .as_ref()
            .is_some_and(|m| !m.tool_calls.is_empty())
}

/// Start index of the unit that ends at `end` (inclusive) in `turns`, walking back over tool
/// results to their call. Returns `None` when the unit may begin before `turns[0]` (the first
/// turn is a tool result whose call was not read), so the caller must read further back.
pub fn unit_start(turns: &[Turn], end: usize) -> Option<usize> {
    if !turns.get(end).is_some_and(is_tool_result) {
        return Some(end);
    }
    let mut start = end;
    while start > 0 && is_tool_result(&turns[start - 1]) {
        start -= 1;
    }
    if start == 0 {
        return None;
    }
    if is_tool_call(&turns[start - 1]) {
        Some(start - 1)
    } else {
        // Results that follow no call: a unit of their own.
        Some(start)
    }
}

/// End index (exclusive) of the unit that starts at `start`: a tool call takes the tool results
/// after it. Returns `None` when the unit may continue past the end of `turns`.
pub fn unit_end(turns: &[Turn], start: usize) -> Option<usize> {
    let mut end = start + 1;
    if turns.get(start).is_some_and(is_tool_call) || turns.get(start).is_some_and(is_tool_result) {
        while end < turns.len() && is_tool_result(&turns[end]) {
            end += 1;
        }
        if end == turns.len() {
            return None;
        }
    }
    Some(end)
}

/// The newest whole units of `turns` (oldest first) whose `costs` fit `budget`.
///
/// Returns the index of the first chosen turn (`turns.len()` when none fits) and the tokens used.
/// `complete` says that `turns` begins at the session's first raw turn; when it does not and
/// the oldest unit cannot be delimited, selection stops before it.
pub fn select_suffix(turns: &[Turn], costs: &[u64], budget: u64, complete: bool) -> (usize, u64) {
    let mut start = turns.len();
    let mut used = 0u64;
    while start > 0 {
        let end = start - 1;
        let unit = match unit_start(turns, end) {
            Some(unit) => unit,
            None if complete => 0,
            None => break,
        };
        let cost: u64 = costs[unit..start].iter().sum();
        if used + cost > budget {
            break;
        }
        used += cost;
        start = unit;
    }
    (start, used)
}

#[cfg(test)]
mod tests {
    use weir_proto::common::ToolCall;

    use super::*;

    fn turn(role: Role, calls: usize) -> Turn {
        Turn {
            message: Some(Message {
                role: role.into(),
                content: "x".to_string(),
                tool_calls: (0..calls)
                    .map(|i| ToolCall {
                        id: format!("c{i}"),
                        name: "f".to_string(),
                        arguments_json: "{}".to_string(),
                    })
                    .collect(),
                tool_call_id: if role == Role::Tool {
                    "c0".to_string()
                } else {
                    String::new()
                },
                ..Message::default()
            }),
            ..Turn::default()
        }
    }

    fn history() -> Vec<Turn> {
        vec![
            turn(Role::User, 0),      // 0
            turn(Role::Assistant, 2), // 1 call
            turn(Role::Tool, 0),      // 2 result
            turn(Role::Tool, 0),      // 3 result
            turn(Role::Assistant, 0), // 4
            turn(Role::User, 0),      // 5
        ]
    }

    #[test]
    fn units_keep_calls_with_their_results() {
        let turns = history();
        assert_eq!(unit_start(&turns, 5), Some(5));
        assert_eq!(unit_start(&turns, 3), Some(1));
        assert_eq!(unit_start(&turns, 2), Some(1));
        assert_eq!(unit_start(&turns[2..], 1), None, "the call was not read");
        assert_eq!(unit_end(&turns, 1), Some(4));
        assert_eq!(unit_end(&turns, 0), Some(1));
        assert_eq!(unit_end(&turns[..3], 1), None, "more results may follow");
        let orphans = [
            turn(Role::User, 0),
            turn(Role::Tool, 0),
            turn(Role::Tool, 0),
        ];
        assert_eq!(unit_start(&orphans, 2), Some(1));
    }

    #[test]
    fn selection_is_the_newest_units_that_fit() {
        let turns = history();
        let costs = [10, 10, 10, 10, 10, 10];
        // 25 tokens: the last two turns (20); the tool unit (30) does not fit.
        assert_eq!(select_suffix(&turns, &costs, 25, true), (4, 20));
        // 49 tokens: still 20, because the call and its results come together or not at all.
        assert_eq!(select_suffix(&turns, &costs, 49, true), (4, 20));
        assert_eq!(select_suffix(&turns, &costs, 50, true), (1, 50));
        assert_eq!(select_suffix(&turns, &costs, 1000, true), (0, 60));
        assert_eq!(select_suffix(&turns, &costs, 5, true), (6, 0));
        // A partial read that starts inside a tool unit stops before it.
        assert_eq!(
            select_suffix(&turns[2..], &costs[2..], 1000, false),
            (2, 20)
        );
    }

    #[test]
    fn selection_never_splits_a_pair_whatever_the_budget() {
        let turns = history();
        let costs = [3, 7, 2, 9, 4, 1];
        for budget in 0..40 {
            let (start, used) = select_suffix(&turns, &costs, budget, true);
            assert!(used <= budget);
            assert!(
                !turns.get(start).is_some_and(is_tool_result),
                "budget {budget} starts at a tool result"
            );
        }
    }

    #[test]
    fn context_messages_put_the_summary_first() {
        let context = GetContextResponse {
            summary: Some(weir_proto::session::Summary {
                text: "earlier".to_string(),
                ..Default::default()
            }),
            turns: vec![turn(Role::User, 0)],
            ..Default::default()
        };
        let messages = context_messages(&context);
        assert_eq!(messages.len(), 2);
        assert_eq!(messages[0].content, format!("{SUMMARY_PREFIX}earlier"));
        assert_eq!(messages[0].role, i32::from(Role::System));
    }
}
