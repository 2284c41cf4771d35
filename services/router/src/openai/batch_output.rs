//! A batch's results in OpenAI's batch output format: one JSON object per line, the succeeded
//! items in the output file and every other item in the error file. Written by `weir batch` and
//! served by the HTTP edge as a batch's `output_file_id` / `error_file_id` content.
//!
//! ```json
//! {"id": "<job id>", "custom_id": "q1", "response": {"status_code": 200, "request_id": "<job id>", "body": {"object": "chat.completion", ...}}, "error": null}
//! {"id": "<job id>", "custom_id": "q2", "response": null, "error": {"code": "INVALID_ARGUMENT", "message": "..."}}
//! ```
//!
//! `id` and `request_id` are the id of the job that ran the item (`weir jobs get <id>` shows it);
//! `error.code` is Weir's reason (`UPPER_SNAKE`), or OpenAI's `batch_cancelled` /
//! `batch_expired` for an item that never ran.

use serde::Serialize;
use weir_proto::router::{
    JobError, JobState, StreamBatchResultsResponse, stream_batch_results_response::Outcome,
};

use super::{convert, types::ChatCompletion};

/// Which file a result goes to, and its line (JSON, without the newline).
#[derive(Debug, Clone, PartialEq)]
pub enum Line {
    /// A succeeded item: a line of the output file.
    Output(String),
    /// A failed, cancelled or expired item: a line of the errors file.
    Error(String),
}

/// One line of either file, its fields in OpenAI's order.
#[derive(Serialize)]
struct Record<'a> {
    id: &'a str,
    custom_id: &'a str,
    response: Option<Answer>,
    error: Option<ErrorBody>,
}

#[derive(Serialize)]
struct Answer {
    status_code: u16,
    request_id: String,
    body: ChatCompletion,
}

#[derive(Serialize)]
struct ErrorBody {
    code: String,
    message: String,
}

/// The line of one item's result. `created` is the `chat.completion`'s time (Unix seconds).
pub fn line(result: &StreamBatchResultsResponse, created: i64) -> serde_json::Result<Line> {
    if let (JobState::Succeeded, Some(Outcome::Response(response))) =
        (result.state(), &result.outcome)
    {
        let record = Record {
            id: &result.job_id,
            custom_id: &result.custom_id,
            response: Some(Answer {
                status_code: 200,
                request_id: result.job_id.clone(),
                // The HTTP edge's conversion: the body is what `POST /v1/chat/completions`
                // answers.
                body: convert::chat_completion(response.clone(), created),
            }),
            error: None,
        };
        return Ok(Line::Output(serde_json::to_string(&record)?));
    }
    let error = match &result.outcome {
        Some(Outcome::Error(error)) => Some(error),
        _ => None,
    };
    // Cancelled and expired items take OpenAI's codes (Weir's reasons are BATCH_CANCELLED and
    // BATCH_EXPIRED), so tools written for OpenAI's error files read them as they expect.
    let message_or = |default: &str| {
        error
            .map(|e| e.message.clone())
            .filter(|m| !m.is_empty())
            .unwrap_or_else(|| default.to_string())
    };
    let (code, message) = match (result.state(), error) {
        (JobState::Cancelled, _) => (
            "batch_cancelled".to_string(),
            message_or("the batch was cancelled before this request ran"),
        ),
        (JobState::Expired, _) => (
            "batch_expired".to_string(),
            message_or("this request did not run before the batch's completion window ended"),
        ),
        (_, Some(error)) => error_fields(error),
        (state, None) => (
            "UNKNOWN".to_string(),
            format!("the item ended {} without an answer", state.as_str_name()),
        ),
    };
    let record = Record {
        id: &result.job_id,
        custom_id: &result.custom_id,
        response: None,
        error: Some(ErrorBody { code, message }),
    };
    Ok(Line::Error(serde_json::to_string(&record)?))
}

/// `(code, message)` of a failed item: its reason, else its gRPC code's name.
fn error_fields(error: &JobError) -> (String, String) {
    let code = if error.reason.is_empty() {
        weir_mesh::error::code_name(tonic::Code::from_i32(error.code)).to_string()
    } else {
        error.reason.clone()
    };
    (code, error.message.clone())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use serde_json::Value;
    use weir_proto::{
        common::{FinishReason, Message, Role, Usage},
        router::CompleteResponse,
    };

    use super::*;

    /// The line's file and its JSON.
    fn parsed(line: Line) -> (bool, Value) {
        match line {
            Line::Output(text) => (true, serde_json::from_str(&text).unwrap()),
            Line::Error(text) => (false, serde_json::from_str(&text).unwrap()),
        }
    }

    fn answered() -> StreamBatchResultsResponse {
        StreamBatchResultsResponse {
            custom_id: "q1".into(),
            job_id: "job-1".into(),
            state: JobState::Succeeded as i32,
            outcome: Some(Outcome::Response(CompleteResponse {
                message: Some(Message {
                    role: Role::Assistant as i32,
                    content: "hello".into(),
                    ..Message::default()
                }),
                model: "sim-small".into(),
                finish_reason: FinishReason::Stop as i32,
                usage: Some(Usage {
                    input_tokens: 3,
                    output_tokens: 2,
                    total_tokens: 5,
                    ..Usage::default()
                }),
                ..CompleteResponse::default()
            })),
        }
    }

    #[test]
    fn a_succeeded_item_is_an_output_line_with_a_chat_completion() {
        let Line::Output(text) = line(&answered(), 1_700_000_000).unwrap() else {
            panic!("not an output line");
        };
        assert!(
            text.starts_with(r#"{"id":"job-1","custom_id":"q1","response":{"#),
            "{text}"
        );
        let value: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(value["id"], "job-1");
        assert_eq!(value["custom_id"], "q1");
        assert_eq!(value["error"], Value::Null);
        assert_eq!(value["response"]["status_code"], 200);
        assert_eq!(value["response"]["request_id"], "job-1");
        let body = &value["response"]["body"];
        assert_eq!(body["object"], "chat.completion");
        assert_eq!(body["created"], 1_700_000_000);
        assert_eq!(body["model"], "sim-small");
        assert_eq!(body["choices"][0]["message"]["content"], "hello");
        assert_eq!(body["choices"][0]["finish_reason"], "stop");
        assert_eq!(body["usage"]["total_tokens"], 5);
    }

    #[test]
    fn a_failed_item_is_an_error_line_with_its_reason_or_code() {
        let mut failed = answered();
        failed.state = JobState::Failed as i32;
        failed.outcome = Some(Outcome::Error(JobError {
            code: tonic::Code::InvalidArgument as i32,
            message: "max_tokens too large".into(),
            reason: "INVALID_ARGUMENT".into(),
        }));
        let (false, value) = parsed(line(&failed, 0).unwrap()) else {
            panic!("not an error line");
        };
        assert_eq!(value["custom_id"], "q1");
        assert_eq!(value["response"], Value::Null);
        assert_eq!(value["error"]["code"], "INVALID_ARGUMENT");
        assert_eq!(value["error"]["message"], "max_tokens too large");

        failed.outcome = Some(Outcome::Error(JobError {
            code: tonic::Code::Unavailable as i32,
            message: "down".into(),
            reason: String::new(),
        }));
        let (false, value) = parsed(line(&failed, 0).unwrap()) else {
            panic!("not an error line");
        };
        assert_eq!(value["error"]["code"], "UNAVAILABLE");
    }

    #[test]
    fn cancelled_and_expired_items_use_openais_codes() {
        for (state, reason, code) in [
            (JobState::Cancelled, "BATCH_CANCELLED", "batch_cancelled"),
            (JobState::Expired, "BATCH_EXPIRED", "batch_expired"),
        ] {
            let mut item = answered();
            item.state = state as i32;
            item.outcome = None;
            let (false, value) = parsed(line(&item, 0).unwrap()) else {
                panic!("not an error line");
            };
            assert_eq!(value["error"]["code"], code);
            assert!(!value["error"]["message"].as_str().unwrap().is_empty());
            // With Weir's error: its message, OpenAI's code.
            item.outcome = Some(Outcome::Error(JobError {
                code: tonic::Code::Cancelled as i32,
                message: "batch batch-1 ended first".into(),
                reason: reason.into(),
            }));
            let (false, value) = parsed(line(&item, 0).unwrap()) else {
                panic!("not an error line");
            };
            assert_eq!(value["error"]["code"], code);
            assert_eq!(value["error"]["message"], "batch batch-1 ended first");
        }
        // A result that says SUCCEEDED without an answer is not counted as a success.
        let mut odd = answered();
        odd.outcome = None;
        assert!(matches!(line(&odd, 0).unwrap(), Line::Error(_)));
    }
}
