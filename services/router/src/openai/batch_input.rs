//! Reading a batch input file: OpenAI's batch input format, one request per line.
//!
//! ```json
//! {"custom_id": "q1", "method": "POST", "url": "/v1/chat/completions", "body": {"model": "auto", "messages": [...]}}
//! ```
//!
//! Every line is checked before anything is sent, and every problem is reported with its line
//! number, so a file with a typo on line 40,000 is fixed in one pass instead of being half
//! submitted. Duplicate `custom_id`s are refused here too: the output file is keyed by them.

use std::collections::HashMap;

use super::{convert, types::ChatCompletionRequest};
use serde_json::Value;
use weir_proto::router::BatchItem;

/// The only endpoint a Weir batch runs.
pub const CHAT_COMPLETIONS_URL: &str = "/v1/chat/completions";

/// Problems listed in one error before the rest are counted instead.
const MAX_PROBLEMS_SHOWN: usize = 20;

/// A parsed input file: its items in file order, and the line each came from.
#[derive(Debug, Default)]
pub struct Input {
    /// The items, in file order.
    pub items: Vec<BatchItem>,
    /// The 1-based line number of each item.
    pub lines: Vec<usize>,
}

impl Input {
    /// Each `custom_id`'s position in the file, to write results in input order.
    pub fn order(&self) -> HashMap<String, usize> {
        self.items
            .iter()
            .enumerate()
            .map(|(index, item)| (item.custom_id.clone(), index))
            .collect()
    }
}

/// A line that cannot be sent, and what to fix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// 1-based line number.
    pub line: usize,
    /// What is wrong and how to fix it.
    pub message: String,
}

/// Every problem in a file; displayed one per line, `line N: ...`.
#[derive(Debug, thiserror::Error)]
#[error("{}", render(.0))]
pub struct InvalidInput(pub Vec<Problem>);

fn render(problems: &[Problem]) -> String {
    let mut text = format!(
        "the batch input has {} problem{}; nothing was sent:",
        problems.len(),
        if problems.len() == 1 { "" } else { "s" }
    );
    for problem in problems.iter().take(MAX_PROBLEMS_SHOWN) {
        text.push_str(&format!("\n  line {}: {}", problem.line, problem.message));
    }
    if problems.len() > MAX_PROBLEMS_SHOWN {
        text.push_str(&format!(
            "\n  ... and {} more",
            problems.len() - MAX_PROBLEMS_SHOWN
        ));
    }
    text
}

/// Parses and checks a whole input file. Blank lines are skipped.
pub fn parse(text: &str) -> Result<Input, InvalidInput> {
    let mut input = Input::default();
    let mut problems = Vec::new();
    let mut seen: HashMap<String, usize> = HashMap::new();
    for (index, raw) in text.lines().enumerate() {
        let line = index + 1;
        if raw.trim().is_empty() {
            continue;
        }
        match parse_line(raw) {
            Ok(item) => {
                if let Some(first) = seen.get(&item.custom_id) {
                    problems.push(Problem {
                        line,
                        message: format!(
                            "custom_id {:?} is already used on line {first}; each request needs \
                             its own custom_id",
                            item.custom_id
                        ),
                    });
                    continue;
                }
                seen.insert(item.custom_id.clone(), line);
                input.items.push(item);
                input.lines.push(line);
            }
            Err(message) => problems.push(Problem { line, message }),
        }
    }
    if input.items.is_empty() && problems.is_empty() {
        problems.push(Problem {
            line: 1,
            message: "the file has no requests; write one JSON object per line".to_string(),
        });
    }
    if problems.is_empty() {
        Ok(input)
    } else {
        Err(InvalidInput(problems))
    }
}

/// One line as an item, or what to fix.
fn parse_line(raw: &str) -> Result<BatchItem, String> {
    let value: Value = serde_json::from_str(raw).map_err(|e| {
        // serde's message ends "at line 1 column N"; within one line only the column helps.
        let text = e.to_string();
        let what = text.split(" at line ").next().unwrap_or(&text).to_string();
        format!("not valid JSON at column {}: {what}", e.column())
    })?;
    let Value::Object(object) = value else {
        return Err("expected a JSON object with custom_id, method, url and body".to_string());
    };
    let custom_id = match object.get("custom_id") {
        Some(Value::String(id)) if !id.trim().is_empty() => id.clone(),
        Some(Value::String(_)) => return Err("custom_id is empty".to_string()),
        Some(_) => return Err("custom_id must be a string".to_string()),
        None => return Err("custom_id is missing".to_string()),
    };
    match object.get("method") {
        Some(Value::String(method)) if method == "POST" => {}
        Some(other) => return Err(format!("method must be \"POST\", not {other}")),
        None => return Err("method is missing (it must be \"POST\")".to_string()),
    }
    match object.get("url") {
        Some(Value::String(url)) if url == CHAT_COMPLETIONS_URL => {}
        Some(other) => {
            return Err(format!(
                "url must be \"{CHAT_COMPLETIONS_URL}\" (Weir batches run chat completions), \
                 not {other}"
            ));
        }
        None => {
            return Err(format!(
                "url is missing (it must be \"{CHAT_COMPLETIONS_URL}\")"
            ));
        }
    }
    let body = match object.get("body") {
        Some(body @ Value::Object(_)) => body,
        Some(_) => return Err("body must be a chat completion request object".to_string()),
        None => return Err("body is missing".to_string()),
    };
    if body.get("stream").and_then(Value::as_bool) == Some(true) {
        return Err("body.stream must be false or absent: batch answers are not streamed".into());
    }
    // The HTTP edge's conversion: a batch line means what the same body means over HTTP.
    let chat: ChatCompletionRequest =
        serde_json::from_value(body.clone()).map_err(|e| format!("body: {e}"))?;
    if chat.messages.is_empty() {
        return Err("body.messages: at least one message is required".to_string());
    }
    let request =
        convert::complete_request(chat).map_err(|e| format!("body.{}: {}", e.param, e.message))?;
    Ok(BatchItem {
        custom_id,
        request: Some(request),
    })
}

/// The default idempotency key of a file: `file-sha256:<hex>` of its bytes, so running the same
/// file again (after a crash, a lost connection, a Ctrl-C) finds the batch it already created.
pub fn request_id_of(bytes: &[u8]) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, bytes);
    let mut id = String::with_capacity(12 + 64);
    id.push_str("file-sha256:");
    for byte in digest.as_ref() {
        id.push_str(&format!("{byte:02x}"));
    }
    id
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    fn line(id: &str, content: &str) -> String {
        serde_json::json!({
            "custom_id": id,
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {"model": "sim-small", "messages": [{"role": "user", "content": content}]},
        })
        .to_string()
    }

    #[test]
    fn reads_every_line_in_order_and_skips_blank_ones() {
        let text = format!(
            "{}\n\n{}\n   \n{}\n",
            line("a", "1"),
            line("b", "2"),
            line("c", "3")
        );
        let input = parse(&text).unwrap();
        let ids: Vec<_> = input.items.iter().map(|i| i.custom_id.as_str()).collect();
        assert_eq!(ids, ["a", "b", "c"]);
        assert_eq!(input.lines, [1, 3, 5]);
        let request = input.items[1].request.as_ref().unwrap();
        assert_eq!(request.model, "sim-small");
        assert_eq!(request.messages[0].content, "2");
        assert_eq!(input.order()["c"], 2);
    }

    #[test]
    fn a_duplicate_custom_id_names_both_lines() {
        let text = [line("a", "1"), line("b", "2"), line("a", "3")].join("\n");
        let error = parse(&text).unwrap_err();
        assert_eq!(error.0.len(), 1);
        assert_eq!(error.0[0].line, 3);
        assert!(
            error.0[0].message.contains("already used on line 1"),
            "{error}"
        );
        assert!(error.to_string().contains("nothing was sent"), "{error}");
    }

    #[test]
    fn every_bad_line_is_reported_with_its_number() {
        let text = [
            line("ok", "fine"),
            "{not json".to_string(),
            r#"["an array"]"#.to_string(),
            r#"{"method":"POST","url":"/v1/chat/completions","body":{}}"#.to_string(),
            r#"{"custom_id":"x","method":"GET","url":"/v1/chat/completions","body":{}}"#.into(),
            r#"{"custom_id":"y","method":"POST","url":"/v1/embeddings","body":{}}"#.into(),
            r#"{"custom_id":"z","method":"POST","url":"/v1/chat/completions"}"#.into(),
            r#"{"custom_id":"s","method":"POST","url":"/v1/chat/completions","body":{"model":"m","stream":true,"messages":[{"role":"user","content":"hi"}]}}"#.into(),
            r#"{"custom_id":"","method":"POST","url":"/v1/chat/completions","body":{}}"#.into(),
            r#"{"custom_id":7,"method":"POST","url":"/v1/chat/completions","body":{}}"#.into(),
        ]
        .join("\n");
        let problems = parse(&text).unwrap_err().0;
        let lines: Vec<_> = problems.iter().map(|p| p.line).collect();
        assert_eq!(lines, [2, 3, 4, 5, 6, 7, 8, 9, 10]);
        let says = |n: usize, what: &str| {
            let p = problems.iter().find(|p| p.line == n).unwrap();
            assert!(p.message.contains(what), "line {n}: {}", p.message);
        };
        says(2, "not valid JSON");
        says(3, "expected a JSON object");
        says(4, "custom_id is missing");
        says(5, "method must be \"POST\"");
        says(6, "url must be \"/v1/chat/completions\"");
        says(7, "body is missing");
        says(8, "stream");
        says(9, "custom_id is empty");
        says(10, "custom_id must be a string");
    }

    #[test]
    fn a_body_that_is_not_a_chat_request_is_refused_with_the_field() {
        let cases = [
            (r#"{"model":"m"}"#, "body.messages: at least one message"),
            (
                r#"{"messages":[{"role":"user","content":"hi"}]}"#,
                "body: missing field `model`",
            ),
            (
                r#"{"model":"m","n":2,"messages":[{"role":"user","content":"hi"}]}"#,
                "body.n: n must be 1",
            ),
            (
                r#"{"model":"m","messages":[{"role":"wizard","content":"hi"}]}"#,
                "body",
            ),
        ];
        for (body, expected) in cases {
            let text = format!(
                r#"{{"custom_id":"a","method":"POST","url":"/v1/chat/completions","body":{body}}}"#
            );
            let problems = parse(&text).unwrap_err().0;
            assert_eq!(problems[0].line, 1);
            assert!(
                problems[0].message.starts_with(expected),
                "{body}: {}",
                problems[0].message
            );
        }
    }

    #[test]
    fn a_body_becomes_the_request_the_http_edge_would_send() {
        let text = r#"{"custom_id":"a","method":"POST","url":"/v1/chat/completions","body":{"model":"auto","max_completion_tokens":12,"temperature":0.5,"stop":"END","metadata":{"team":"search"},"messages":[{"role":"developer","content":"be brief"},{"role":"user","content":"hi"}]}}"#;
        let input = parse(text).unwrap();
        let request = input.items[0].request.as_ref().unwrap();
        assert_eq!(request.model, "auto");
        assert_eq!(request.messages.len(), 2);
        assert_eq!(
            request.messages[0].role,
            weir_proto::common::Role::System as i32
        );
        let params = request.params.as_ref().unwrap();
        assert_eq!(params.max_tokens, Some(12));
        assert_eq!(params.stop, ["END"]);
        assert_eq!(request.labels["team"], "search");
    }

    #[test]
    fn an_empty_file_is_refused() {
        let error = parse("\n\n").unwrap_err();
        assert!(error.to_string().contains("no requests"), "{error}");
    }

    #[test]
    fn long_lists_of_problems_are_cut() {
        let text = "x\n".repeat(30);
        let error = parse(&text).unwrap_err().to_string();
        assert!(error.contains("30 problems"), "{error}");
        assert!(
            error.contains("line 20:") && !error.contains("line 21:"),
            "{error}"
        );
        assert!(error.contains("and 10 more"), "{error}");
    }

    #[test]
    fn the_default_request_id_is_the_files_hash() {
        let a = request_id_of(b"one\n");
        assert_eq!(a, request_id_of(b"one\n"));
        assert_ne!(a, request_id_of(b"one \n"));
        assert!(a.starts_with("file-sha256:") && a.len() == 12 + 64, "{a}");
        assert!(weir_mesh::idempotency::key_problem(&a).is_none());
    }
}
