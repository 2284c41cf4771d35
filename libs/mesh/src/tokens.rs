//! Token counting, shared by every service that must agree on how long a prompt or an answer is
//! (inference validates context windows, the router and budget price requests, the session
//! service trims history to a token budget).
//!
//! Counts depend on the model's tokenizer *family* (`ModelSpec::family` in the catalog):
//!
//! - `sim`, the simulated model: **exact**. A token is a word (a maximal run of letters and
//!   digits, as [`char::is_alphanumeric`] defines them) or any other single non-whitespace
//!   character (punctuation, symbols, emoji). Whitespace separates tokens and is not counted.
//!   `"Hello, world!"` is 4 tokens; `"don't"` is 3 (`don`, `'`, `t`). The simulated backend
//!   generates and counts with this very rule, so its reported usage always matches
//!   [`count_text`].
//! - every other family (`o200k`, `cl100k`, or any name): an **estimate** of ⌈characters / 4⌉,
//!   OpenAI's rule of thumb for English text. It is only used where the upstream reports no
//!   usage of its own and for admission checks (context window, budget reservations), so it errs
//!   on the side of simplicity rather than embedding a BPE vocabulary.
//!
//! A chat prompt costs more than its text: [`count_messages`] adds [`TOKENS_PER_MESSAGE`] per
//! message (role and separators) and [`REPLY_PRIMER_TOKENS`] for the assistant turn the model is
//! about to write, following the accounting OpenAI documents for its chat models.

use weir_proto::common::Message;

/// Tokenizer family of the simulated model, the only family counted exactly.
pub const SIM_FAMILY: &str = "sim";
/// Tokens added for each chat message on top of its text (role and message delimiters).
pub const TOKENS_PER_MESSAGE: u32 = 4;
/// Tokens added once per prompt for the assistant reply the model is primed to write.
pub const REPLY_PRIMER_TOKENS: u32 = 3;
/// Characters per token assumed by the estimate used for non-`sim` families.
pub const CHARS_PER_TOKEN: u32 = 4;

/// Tokens in `text` for a model of the given tokenizer family (exact for `sim`, estimated
/// otherwise; see the module doc). Saturates at `u32::MAX`.
pub fn count_text(family: &str, text: &str) -> u32 {
    if family == SIM_FAMILY {
        saturate(sim_tokens(text).count())
    } else {
        saturate(text.chars().count().div_ceil(CHARS_PER_TOKEN as usize))
    }
}

/// Tokens of a chat prompt: each message's content, participant name, tool calls and tool call
/// id, plus [`TOKENS_PER_MESSAGE`] per message and [`REPLY_PRIMER_TOKENS`] once. An empty prompt
/// still costs the reply primer. Saturates at `u32::MAX`.
pub fn count_messages(family: &str, messages: &[Message]) -> u32 {
    messages.iter().fold(REPLY_PRIMER_TOKENS, |total, message| {
        total.saturating_add(count_message(family, message))
    })
}

/// Tokens of one message, including its [`TOKENS_PER_MESSAGE`] overhead.
pub fn count_message(family: &str, message: &Message) -> u32 {
    let tool_calls = message.tool_calls.iter().fold(0u32, |total, call| {
        total
            .saturating_add(count_text(family, &call.id))
            .saturating_add(count_text(family, &call.name))
            .saturating_add(count_text(family, &call.arguments_json))
    });
    TOKENS_PER_MESSAGE
        .saturating_add(count_text(family, &message.content))
        .saturating_add(count_text(family, &message.name))
        .saturating_add(count_text(family, &message.tool_call_id))
        .saturating_add(tool_calls)
}

/// The tokens of `text` under the `sim` rule, as `(byte offset, token)` slices of `text`, in
/// order. [`count_text`]`("sim", text)` is the number of items.
///
/// Concatenating tokens with the whitespace that separated them in `text` (or any whitespace, or
/// none between a word and a non-word token) yields text with the same tokens, which is what lets
/// the simulated model emit exactly the number of tokens it reports.
pub fn sim_tokens(text: &str) -> SimTokens<'_> {
    SimTokens { text, pos: 0 }
}

/// Iterator over the `sim` tokens of a text; see [`sim_tokens`].
#[derive(Debug, Clone)]
pub struct SimTokens<'a> {
    text: &'a str,
    pos: usize,
}

impl<'a> Iterator for SimTokens<'a> {
    type Item = (usize, &'a str);

    fn next(&mut self) -> Option<Self::Item> {
        let rest = &self.text[self.pos..];
        let (skip, first) = rest.char_indices().find(|(_, c)| !c.is_whitespace())?;
        let start = self.pos + skip;
        let len = if first.is_alphanumeric() {
            rest[skip..]
                .char_indices()
                .find(|(_, c)| !c.is_alphanumeric())
                .map_or(rest.len() - skip, |(end, _)| end)
        } else {
            first.len_utf8()
        };
        self.pos = start + len;
        Some((start, &self.text[start..start + len]))
    }
}

fn saturate(count: usize) -> u32 {
    u32::try_from(count).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use weir_proto::common::{Role, ToolCall};

    use super::*;

    fn message(role: Role, content: &str) -> Message {
        Message {
            role: role.into(),
            content: content.to_string(),
            ..Message::default()
        }
    }

    #[test]
    fn sim_counts_words_and_punctuation() {
        assert_eq!(count_text("sim", ""), 0);
        assert_eq!(count_text("sim", "   \n\t "), 0);
        assert_eq!(count_text("sim", "Hello, world!"), 4);
        assert_eq!(count_text("sim", "don't"), 3);
        assert_eq!(count_text("sim", "snake_case 42 x2"), 5);
        assert_eq!(count_text("sim", "héllo wörld 東京"), 3);
        assert_eq!(count_text("sim", "...?!"), 5);
        assert_eq!(count_text("sim", "a🙂b"), 3);
    }

    #[test]
    fn sim_tokens_are_slices_with_offsets() {
        let tokens: Vec<_> = sim_tokens("  Hi, you!").collect();
        assert_eq!(tokens, [(2, "Hi"), (4, ","), (6, "you"), (9, "!")]);
    }

    #[test]
    fn rejoined_tokens_count_the_same() {
        let text = "Quick: what's 2+2? (Answer “four”…) — ok\r\nthanks";
        let joined: String = sim_tokens(text)
            .map(|(_, t)| t)
            .collect::<Vec<_>>()
            .join(" ");
        assert_eq!(count_text("sim", &joined), count_text("sim", text));
    }

    #[test]
    fn other_families_estimate_a_quarter_of_the_characters() {
        assert_eq!(count_text("o200k", ""), 0);
        assert_eq!(count_text("o200k", "abc"), 1);
        assert_eq!(count_text("o200k", "abcd"), 1);
        assert_eq!(count_text("cl100k", "abcde"), 2);
        // Characters, not bytes: four 3-byte characters are one token.
        assert_eq!(count_text("anything", "東京東京"), 1);
    }

    #[test]
    fn messages_add_overhead_per_message_and_a_reply_primer() {
        assert_eq!(count_messages("sim", &[]), REPLY_PRIMER_TOKENS);
        let messages = [
            message(Role::System, "Be brief."),
            message(Role::User, "Hello, world!"),
        ];
        assert_eq!(
            count_messages("sim", &messages),
            REPLY_PRIMER_TOKENS + 2 * TOKENS_PER_MESSAGE + 3 + 4
        );
    }

    #[test]
    fn names_tool_calls_and_tool_call_ids_count() {
        let assistant = Message {
            role: Role::Assistant.into(),
            tool_calls: vec![ToolCall {
                id: "call1".to_string(),
                name: "search".to_string(),
                arguments_json: r#"{"q":"x"}"#.to_string(),
            }],
            ..Message::default()
        };
        // call1 + search + { " q " : " x " }
        assert_eq!(
            count_message("sim", &assistant),
            TOKENS_PER_MESSAGE + 1 + 1 + 9
        );
        let tool = Message {
            role: Role::Tool.into(),
            content: "found".to_string(),
            name: "search".to_string(),
            tool_call_id: "call1".to_string(),
            ..Message::default()
        };
        assert_eq!(count_message("sim", &tool), TOKENS_PER_MESSAGE + 3);
    }
}
