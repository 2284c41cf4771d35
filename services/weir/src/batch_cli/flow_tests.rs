//! `weir batch` against a fake router in the test process: the whole flow of each subcommand
//! (create, progress polls, results into files, exit status) without the real batch machinery,
//! which has tests of its own.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use serde_json::Value;
use tonic::{Request, Response, Status, codegen::BoxStream};
use weir_proto::{
    common::{FinishReason, Message, Role, Usage},
    router::{
        Batch, BatchCounts, BatchItem, BatchState, CancelBatchRequest, CancelBatchResponse,
        CompleteResponse, CreateBatchRequest, CreateBatchResponse, GetBatchRequest,
        GetBatchResponse, JobError, JobState, StreamBatchResultsRequest,
        StreamBatchResultsResponse,
        router_service_server::{RouterService, RouterServiceServer},
        stream_batch_results_response::Outcome,
    },
};

use super::{BatchCommand, SubmitArgs, input, run};
use crate::call::RouterOptions;

/// Items end a few per poll; `bad-*` items fail; a `cancel-*` item cancels the batch at the
/// second poll, when some items have ended.
#[derive(Default)]
struct State {
    created: Vec<CreateBatchRequest>,
    items: Vec<BatchItem>,
    ended: usize,
    polls: usize,
    cancelled: bool,
}

#[derive(Clone, Default)]
struct Fake(Arc<Mutex<State>>);

const ID: &str = "batch-fake";
const PER_POLL: usize = 7;

impl State {
    fn batch(&self) -> Batch {
        let total = self.items.len();
        let ended = &self.items[..self.ended];
        let failed = ended
            .iter()
            .filter(|i| i.custom_id.starts_with("bad"))
            .count();
        let cancelled = if self.cancelled {
            total - self.ended
        } else {
            0
        };
        let state = if self.cancelled {
            BatchState::Cancelled
        } else if self.ended == total {
            BatchState::Completed
        } else {
            BatchState::InProgress
        };
        Batch {
            id: ID.into(),
            state: state as i32,
            counts: Some(BatchCounts {
                total: total as i64,
                succeeded: (self.ended - failed) as i64,
                failed: failed as i64,
                cancelled: cancelled as i64,
                pending: (total - self.ended - cancelled) as i64,
            }),
            ..Batch::default()
        }
    }

    fn result(&self, index: usize) -> StreamBatchResultsResponse {
        let item = &self.items[index];
        let job_id = format!("job-{index}");
        if index >= self.ended {
            return StreamBatchResultsResponse {
                custom_id: item.custom_id.clone(),
                job_id,
                state: JobState::Cancelled as i32,
                outcome: None,
            };
        }
        if item.custom_id.starts_with("bad") {
            return StreamBatchResultsResponse {
                custom_id: item.custom_id.clone(),
                job_id,
                state: JobState::Failed as i32,
                outcome: Some(Outcome::Error(JobError {
                    code: tonic::Code::NotFound as i32,
                    message: "no model named nope".into(),
                    reason: "MODEL_NOT_FOUND".into(),
                })),
            };
        }
        let prompt = &item.request.as_ref().unwrap().messages[0].content;
        StreamBatchResultsResponse {
            custom_id: item.custom_id.clone(),
            job_id,
            state: JobState::Succeeded as i32,
            outcome: Some(Outcome::Response(CompleteResponse {
                message: Some(Message {
                    role: Role::Assistant as i32,
                    content: format!("answer to {prompt}"),
                    ..Message::default()
                }),
                model: "sim-small".into(),
                finish_reason: FinishReason::Stop as i32,
                usage: Some(Usage {
                    input_tokens: 3,
                    output_tokens: 4,
                    total_tokens: 7,
                    ..Usage::default()
                }),
                trace_id: format!("{index:032x}"),
                ..CompleteResponse::default()
            })),
        }
    }
}

#[tonic::async_trait]
impl RouterService for Fake {
    async fn create_batch(
        &self,
        request: Request<CreateBatchRequest>,
    ) -> Result<Response<CreateBatchResponse>, Status> {
        let mut state = self.0.lock().unwrap();
        let request = request.into_inner();
        if state.created.is_empty() {
            state.items = request.items.clone();
        }
        state.created.push(request);
        Ok(Response::new(CreateBatchResponse {
            batch: Some(state.batch()),
        }))
    }

    async fn get_batch(
        &self,
        request: Request<GetBatchRequest>,
    ) -> Result<Response<GetBatchResponse>, Status> {
        if request.get_ref().batch_id != ID {
            return Err(Status::not_found("no such batch"));
        }
        let mut state = self.0.lock().unwrap();
        state.polls += 1;
        if !state.cancelled {
            state.ended = (state.ended + PER_POLL).min(state.items.len());
            if state.polls >= 2
                && state
                    .items
                    .iter()
                    .any(|i| i.custom_id.starts_with("cancel"))
            {
                state.cancelled = true;
            }
        }
        Ok(Response::new(GetBatchResponse {
            batch: Some(state.batch()),
        }))
    }

    async fn stream_batch_results(
        &self,
        _: Request<StreamBatchResultsRequest>,
    ) -> Result<Response<BoxStream<StreamBatchResultsResponse>>, Status> {
        let state = self.0.lock().unwrap();
        let count = if state.cancelled {
            state.items.len()
        } else {
            state.ended
        };
        // Newest first: the files are written in input order anyway.
        let results: Vec<_> = (0..count).rev().map(|i| Ok(state.result(i))).collect();
        Ok(Response::new(Box::pin(tokio_stream::iter(results))))
    }

    async fn cancel_batch(
        &self,
        _: Request<CancelBatchRequest>,
    ) -> Result<Response<CancelBatchResponse>, Status> {
        let mut state = self.0.lock().unwrap();
        state.cancelled = true;
        let mut batch = state.batch();
        batch.state = BatchState::Cancelling as i32;
        Ok(Response::new(CancelBatchResponse { batch: Some(batch) }))
    }
}

/// The fake on a free port; its state and `RouterOptions` that reach it.
async fn start() -> (Fake, RouterOptions) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let fake = Fake::default();
    let service = RouterServiceServer::new(fake.clone());
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let options = RouterOptions {
        router: format!("http://{addr}"),
        api_key: None,
    };
    (fake, options)
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("weir-batch-flow-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn write_input(dir: &Path, ids: &[String]) -> (PathBuf, Vec<u8>) {
    let text: String = ids
        .iter()
        .map(|id| {
            serde_json::json!({
                "custom_id": id, "method": "POST", "url": "/v1/chat/completions",
                "body": {"model": "sim-small", "messages": [{"role": "user", "content": id}]},
            })
            .to_string()
                + "\n"
        })
        .collect();
    let path = dir.join("in.jsonl");
    std::fs::write(&path, &text).unwrap();
    (path, text.into_bytes())
}

fn lines(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn submit(input: PathBuf) -> BatchCommand {
    BatchCommand::Submit(SubmitArgs {
        input,
        output: None,
        errors: None,
        completion_window: std::time::Duration::from_secs(3600),
        not_before: None,
        request_id: None,
        labels: vec![("team".into(), "search".into())],
        no_wait: false,
    })
}

#[tokio::test]
async fn submit_waits_and_writes_both_files_in_input_order() {
    let (fake, options) = start().await;
    let dir = scratch("submit");
    let mut ids: Vec<String> = (0..20).map(|i| format!("q{i:02}")).collect();
    ids[5] = "bad-5".into();
    ids[12] = "bad-12".into();
    let (input, bytes) = write_input(&dir, &ids);

    let mut out = Vec::new();
    run(options, submit(input), &mut out).await.unwrap();
    assert_eq!(String::from_utf8(out).unwrap(), format!("{ID}\n"));

    // The create carried every item, the file's hash as its key, the window and the labels.
    {
        let state = fake.0.lock().unwrap();
        let created = &state.created[0];
        assert_eq!(created.items.len(), 20);
        assert_eq!(created.request_id, input::request_id_of(&bytes));
        assert_eq!(created.completion_window.unwrap().seconds, 3600);
        assert_eq!(created.labels["team"], "search");
        assert!(state.polls >= 3, "polled until it ended: {}", state.polls);
    }

    // Succeeded items in input order, each a chat.completion; failed ones in the errors file.
    let output = lines(&dir.join("in.output.jsonl"));
    let expected: Vec<&str> = ids
        .iter()
        .filter(|id| !id.starts_with("bad"))
        .map(String::as_str)
        .collect();
    let written: Vec<&str> = output
        .iter()
        .map(|l| l["custom_id"].as_str().unwrap())
        .collect();
    assert_eq!(written, expected);
    let first = &output[0];
    assert_eq!(first["id"], "job-0");
    assert_eq!(first["response"]["status_code"], 200);
    assert_eq!(first["response"]["body"]["object"], "chat.completion");
    assert_eq!(
        first["response"]["body"]["choices"][0]["message"]["content"],
        "answer to q00"
    );
    assert_eq!(first["response"]["body"]["usage"]["total_tokens"], 7);
    let errors = lines(&dir.join("in.errors.jsonl"));
    let failed: Vec<&str> = errors
        .iter()
        .map(|l| l["custom_id"].as_str().unwrap())
        .collect();
    assert_eq!(failed, ["bad-5", "bad-12"]);
    assert_eq!(errors[0]["error"]["code"], "MODEL_NOT_FOUND");
    assert_eq!(errors[0]["response"], Value::Null);
    // No partial files are left behind.
    let mut names: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["in.errors.jsonl", "in.jsonl", "in.output.jsonl"]);
    std::fs::remove_dir_all(dir).unwrap();
}

#[tokio::test]
async fn a_batch_that_ends_cancelled_writes_what_ran_and_fails() {
    let (_fake, options) = start().await;
    let dir = scratch("cancelled");
    let mut ids: Vec<String> = (0..30).map(|i| format!("q{i:02}")).collect();
    ids[29] = "cancel-me".into();
    let (input, _) = write_input(&dir, &ids);

    let error = run(options, submit(input), &mut Vec::new())
        .await
        .unwrap_err();
    assert_eq!(error.to_string(), format!("batch {ID} ended cancelled"));
    let output = lines(&dir.join("in.output.jsonl"));
    let errors = lines(&dir.join("in.errors.jsonl"));
    assert_eq!(output.len() + errors.len(), 30);
    assert!(!output.is_empty() && !errors.is_empty());
    assert!(
        errors
            .iter()
            .all(|l| l["error"]["code"] == "batch_cancelled")
    );
    std::fs::remove_dir_all(dir).unwrap();
}

#[tokio::test]
async fn no_wait_get_results_and_cancel() {
    let (_fake, options) = start().await;
    let dir = scratch("commands");
    let ids: Vec<String> = (0..10).map(|i| format!("q{i}")).collect();
    let (input, _) = write_input(&dir, &ids);

    let mut command = submit(input);
    if let BatchCommand::Submit(args) = &mut command {
        args.no_wait = true;
    }
    let mut out = Vec::new();
    run(options.clone(), command, &mut out).await.unwrap();
    assert_eq!(String::from_utf8(out).unwrap(), format!("{ID}\n"));
    assert!(
        !dir.join("in.output.jsonl").exists(),
        "--no-wait writes nothing"
    );

    // One poll: 7 of 10 ended.
    let mut out = Vec::new();
    let get = BatchCommand::Get { id: ID.into() };
    run(options.clone(), get, &mut out).await.unwrap();
    assert_eq!(
        String::from_utf8(out).unwrap(),
        format!(
            "{ID} in_progress\n\
             total 10  succeeded 7  failed 0  cancelled/expired 0  pending 3\n"
        )
    );

    // Results so far, into the files asked for.
    let output = dir.join("so-far.jsonl");
    let errors = dir.join("so-far-errors.jsonl");
    let results = BatchCommand::Results {
        id: ID.into(),
        follow: false,
        output: Some(output.clone()),
        errors: Some(errors.clone()),
    };
    run(options.clone(), results, &mut Vec::new())
        .await
        .unwrap();
    assert_eq!(lines(&output).len(), 7);
    assert!(lines(&errors).is_empty());

    let mut out = Vec::new();
    let cancel = BatchCommand::Cancel { id: ID.into() };
    run(options.clone(), cancel, &mut out).await.unwrap();
    assert!(
        String::from_utf8(out)
            .unwrap()
            .starts_with(&format!("{ID} cancelling\n")),
        "cancel shows the batch"
    );

    // An unknown batch: the router's error, readable.
    let get = BatchCommand::Get {
        id: "batch-other".into(),
    };
    let error = run(options, get, &mut Vec::new()).await.unwrap_err();
    assert!(error.to_string().contains("NOT_FOUND"), "{error}");
    std::fs::remove_dir_all(dir).unwrap();
}
