//! `weir batch`: many chat completions at once, from an OpenAI batch input file.
//!
//! ```text
//! weir batch submit input.jsonl [--output out.jsonl] [--errors errors.jsonl] [--no-wait]
//! weir batch get ID                              # state and counts
//! weir batch results ID [--follow]               # writes the output and errors files
//! weir batch cancel ID
//! ```
//!
//! `submit` checks every line of the file first (nothing is sent if one is wrong), creates the
//! batch, prints its id, shows its progress until it ends, then writes the results in OpenAI's
//! batch output format ([`output`]). It exits non-zero unless the batch completed. The router's
//! address is `--router` (`WEIR_ROUTER_URL`, default `http://127.0.0.1:50051`); the key is
//! `--api-key` (`WEIR_API_KEY`).

pub use weir_router::openai::batch_input as input;
pub mod output;
pub mod progress;

#[cfg(test)]
mod flow_tests;

use std::{
    collections::HashMap,
    io::Write,
    path::{Path, PathBuf},
    time::Duration,
};

use clap::Subcommand;
use tokio_stream::StreamExt;
use tonic::{Code, Request, transport::Channel};
use weir_proto::router::{
    Batch, BatchState, CancelBatchRequest, CreateBatchRequest, GetBatchRequest,
    StreamBatchResultsRequest, StreamBatchResultsResponse,
    router_service_client::RouterServiceClient,
};

use crate::call::{RouterOptions, failed};
use output::{JsonlFile, Line};
use progress::Progress;

/// Time between two reads of a running batch's counts.
const POLL_INTERVAL: Duration = Duration::from_millis(500);
/// How long `submit` keeps trying to read a batch while the router cannot be reached, before it
/// gives up (the batch goes on running on the server).
const UNREACHABLE_LIMIT: Duration = Duration::from_secs(60);

/// A `weir batch` subcommand.
#[derive(Debug, Clone, Subcommand)]
pub enum BatchCommand {
    /// Run an OpenAI batch input file (JSONL: custom_id, method, url, body per line), show its
    /// progress and write the results.
    ///
    /// Every line is checked before anything is sent. The batch is created with an idempotency
    /// key that defaults to the SHA-256 of the file's bytes: running the same file again (after a
    /// crash, a lost connection or Ctrl-C) returns the batch it already created instead of
    /// running it twice. Pass --request-id to run the same file again as a new batch. Exits
    /// non-zero unless the batch completed (cancelled or expired batches still write what ran).
    Submit(SubmitArgs),
    /// Show a batch: its state and item counts.
    Get {
        /// Batch id.
        id: String,
    },
    /// Write a batch's results so far (or, with --follow, until it ends) to the output and
    /// errors files.
    Results {
        /// Batch id.
        id: String,
        /// Keep reading as items end, until the batch ends; exit non-zero unless it completed.
        #[arg(long)]
        follow: bool,
        /// Where to write the succeeded items (default: <ID>.output.jsonl).
        #[arg(long, short)]
        output: Option<PathBuf>,
        /// Where to write the other items (default: <ID>.errors.jsonl).
        #[arg(long, short)]
        errors: Option<PathBuf>,
    },
    /// Cancel a batch: items not started yet are cancelled; running ones may finish.
    Cancel {
        /// Batch id.
        id: String,
    },
}

/// What `weir batch submit` runs, and how.
#[derive(Debug, Clone, clap::Args)]
pub struct SubmitArgs {
    /// The input file (JSONL).
    pub input: PathBuf,
    /// Where to write the succeeded items (default: <input stem>.output.jsonl beside it).
    #[arg(long, short)]
    pub output: Option<PathBuf>,
    /// Where to write the failed, cancelled and expired items (default:
    /// <input stem>.errors.jsonl beside it).
    #[arg(long, short)]
    pub errors: Option<PathBuf>,
    /// Time within which the items should run (e.g. 24h, 90m); unfinished items then expire.
    #[arg(long, default_value = "24h", value_parser = parse_duration)]
    pub completion_window: Duration,
    /// No item starts before this time (RFC 3339, e.g. 2026-12-04T02:00:00Z).
    #[arg(long, value_parser = parse_time)]
    pub not_before: Option<prost_types::Timestamp>,
    /// Idempotency key (default: file-sha256:<hash of the file>).
    #[arg(long)]
    pub request_id: Option<String>,
    /// A label for the batch and its items, key=value (repeatable).
    #[arg(long = "label", value_name = "KEY=VALUE", value_parser = parse_label)]
    pub labels: Vec<(String, String)>,
    /// Print the batch id and exit without waiting (fetch results later with `results`).
    #[arg(long)]
    pub no_wait: bool,
}

/// Runs one subcommand, writing its output to `out` (progress goes to stderr).
pub async fn run(
    options: RouterOptions,
    command: BatchCommand,
    out: &mut impl Write,
) -> anyhow::Result<()> {
    match command {
        BatchCommand::Submit(args) => submit(options, args, out).await,
        BatchCommand::Get { id } => {
            let batch = Client::connect(options).await?.get(&id).await?;
            show(&batch, out)
        }
        BatchCommand::Results {
            id,
            follow,
            output,
            errors,
        } => {
            let mut client = Client::connect(options).await?;
            let paths = Paths {
                output: output.unwrap_or_else(|| PathBuf::from(format!("{id}.output.jsonl"))),
                errors: errors.unwrap_or_else(|| PathBuf::from(format!("{id}.errors.jsonl"))),
            };
            let written = write_results(&mut client, &id, follow, &paths, None, unix_now()).await?;
            let batch = client.get(&id).await?;
            if follow {
                report(&batch, &written, &paths)
            } else {
                eprintln!("{}", progress::summary(&batch));
                eprintln!("{}", written.describe(&paths));
                Ok(())
            }
        }
        BatchCommand::Cancel { id } => {
            let mut client = Client::connect(options).await?;
            let batch = client
                .inner
                .cancel_batch(client.request(CancelBatchRequest { batch_id: id })?)
                .await
                .map_err(|s| failed(&s))?
                .into_inner()
                .batch
                .ok_or_else(no_batch)?;
            show(&batch, out)
        }
    }
}

/// `weir batch submit`: check the file, create the batch, wait for it, write its results.
async fn submit(
    options: RouterOptions,
    args: SubmitArgs,
    out: &mut impl Write,
) -> anyhow::Result<()> {
    // A bad input file is reported before any connection is made.
    let (input, digest) = read_input(&args.input)?;
    let (default_output, default_errors) = output::default_paths(&args.input);
    let paths = Paths {
        output: args.output.unwrap_or(default_output),
        errors: args.errors.unwrap_or(default_errors),
    };
    let mut client = Client::connect(options).await?;
    let body = CreateBatchRequest {
        items: input.items.clone(),
        completion_window: Some(prost_types::Duration {
            seconds: i64::try_from(args.completion_window.as_secs()).unwrap_or(i64::MAX),
            nanos: 0,
        }),
        request_id: args.request_id.unwrap_or(digest),
        labels: args.labels.into_iter().collect(),
        not_before: args.not_before,
        ..CreateBatchRequest::default()
    };
    let batch = client
        .inner
        .create_batch(client.request(body)?)
        .await
        .map_err(|s| refused(&s, &input, &args.input))?
        .into_inner()
        .batch
        .ok_or_else(no_batch)?;
    writeln!(out, "{}", batch.id)?;
    out.flush()?;
    if args.no_wait {
        return Ok(());
    }
    let batch = wait(&mut client, batch).await?;
    // The batch's end, so writing the same batch's results again gives the same files.
    let created = batch.end_time.map_or_else(unix_now, |t| t.seconds);
    let written =
        write_results(&mut client, &batch.id, false, &paths, Some(&input), created).await?;
    report(&batch, &written, &paths)
}

/// A refused create, with the input line of the item the router named (`items[7]...` is line 8
/// of a file without blank lines), since the file is what the user edits.
fn refused(status: &tonic::Status, input: &input::Input, path: &Path) -> anyhow::Error {
    let error = weir_mesh::ApiError::from_status(status);
    let named = error
        .field_violations()
        .iter()
        .map(|(field, _)| field.as_str())
        .chain([error.message()])
        .find_map(item_index);
    let located = named.and_then(|index| Some((input.lines.get(index)?, input.items.get(index)?)));
    match located {
        Some((line, item)) => failed(status).context(format!(
            "{} line {line} (custom_id {:?}) was refused",
            path.display(),
            item.custom_id
        )),
        None => failed(status),
    }
}

/// `7` in `items[7].request.model: ...`.
fn item_index(text: &str) -> Option<usize> {
    let start = text.find("items[")? + "items[".len();
    let end = start + text[start..].find(']')?;
    text[start..end].parse().ok()
}

/// Reads and checks an input file; returns its items and its default idempotency key.
fn read_input(path: &Path) -> anyhow::Result<(input::Input, String)> {
    let bytes =
        std::fs::read(path).map_err(|e| anyhow::anyhow!("cannot read {}: {e}", path.display()))?;
    let text = std::str::from_utf8(&bytes)
        .map_err(|e| anyhow::anyhow!("{} is not UTF-8 text: {e}", path.display()))?;
    let parsed = input::parse(text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    Ok((parsed, input::request_id_of(&bytes)))
}

struct Client {
    inner: RouterServiceClient<Channel>,
    key: Option<String>,
}

impl Client {
    async fn connect(options: RouterOptions) -> anyhow::Result<Self> {
        let channel = Channel::from_shared(options.router.clone())
            .map_err(|e| anyhow::anyhow!("invalid router URL {:?}: {e}", options.router))?
            .connect()
            .await
            .map_err(|e| anyhow::anyhow!("cannot reach the router at {}: {e}", options.router))?;
        Ok(Self {
            inner: RouterServiceClient::new(channel),
            key: options.api_key,
        })
    }

    fn request<T>(&self, body: T) -> anyhow::Result<Request<T>> {
        crate::call::request(self.key.as_deref(), body)
    }

    async fn get(&mut self, id: &str) -> anyhow::Result<Batch> {
        self.try_get(id).await.map_err(|s| failed(&s))
    }

    async fn try_get(&mut self, id: &str) -> Result<Batch, tonic::Status> {
        let request = self
            .request(GetBatchRequest {
                batch_id: id.to_string(),
            })
            .map_err(|e| tonic::Status::invalid_argument(e.to_string()))?;
        self.inner
            .get_batch(request)
            .await?
            .into_inner()
            .batch
            .ok_or_else(|| tonic::Status::internal("the router answered without a batch"))
    }
}

/// The error for an answer that should carry a batch and does not (a router bug).
fn no_batch() -> anyhow::Error {
    anyhow::anyhow!("the router answered without a batch")
}

/// `in_progress`, `completed`, ... (OpenAI's batch status names).
pub fn state_name(batch: &Batch) -> &'static str {
    match batch.state() {
        BatchState::InProgress => "in_progress",
        BatchState::Completed => "completed",
        BatchState::Cancelling => "cancelling",
        BatchState::Cancelled => "cancelled",
        BatchState::Expired => "expired",
        BatchState::Unspecified => "unknown",
    }
}

fn is_terminal(batch: &Batch) -> bool {
    matches!(
        batch.state(),
        BatchState::Completed | BatchState::Cancelled | BatchState::Expired
    )
}

/// `<id> <state>`, then the counts.
fn show(batch: &Batch, out: &mut impl Write) -> anyhow::Result<()> {
    let counts = batch.counts.unwrap_or_default();
    writeln!(out, "{} {}", batch.id, state_name(batch))?;
    writeln!(
        out,
        "total {}  succeeded {}  failed {}  cancelled/expired {}  pending {}",
        counts.total, counts.succeeded, counts.failed, counts.cancelled, counts.pending
    )?;
    for (name, time) in [
        ("created", batch.create_time),
        ("not before", batch.not_before),
        ("expires", batch.expire_time),
        ("ended", batch.end_time),
    ] {
        if let Some(time) = time.and_then(rfc3339) {
            writeln!(out, "{name} {time}")?;
        }
    }
    Ok(())
}

/// A protobuf time as RFC 3339 (UTC, whole seconds).
fn rfc3339(time: prost_types::Timestamp) -> Option<String> {
    chrono::DateTime::from_timestamp(time.seconds, 0)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
}

/// Polls the batch, showing its progress, until it ends. A router that cannot be reached for a
/// while is waited for (the batch runs on the server regardless); Ctrl-C stops waiting and says
/// how to pick the batch up again.
async fn wait(client: &mut Client, batch: Batch) -> anyhow::Result<Batch> {
    let total = batch.counts.unwrap_or_default().total.max(0) as u64;
    let mut progress = Progress::new(total);
    progress.update(&batch);
    let id = batch.id.clone();
    let mut batch = batch;
    let mut unreachable_since: Option<tokio::time::Instant> = None;
    let interrupted = tokio::signal::ctrl_c();
    tokio::pin!(interrupted);
    while !is_terminal(&batch) {
        tokio::select! {
            _ = &mut interrupted => {
                progress.finish();
                anyhow::bail!(
                    "stopped waiting; batch {id} goes on running on the server: \
                     `weir batch get {id}`, `weir batch results {id} --follow`, \
                     `weir batch cancel {id}`"
                );
            }
            () = tokio::time::sleep(POLL_INTERVAL) => {}
        }
        match client.try_get(&id).await {
            Ok(now) => {
                unreachable_since = None;
                batch = now;
                progress.update(&batch);
            }
            Err(status) if is_transient(status.code()) => {
                let since = *unreachable_since.get_or_insert_with(tokio::time::Instant::now);
                if since.elapsed() > UNREACHABLE_LIMIT {
                    progress.finish();
                    return Err(failed(&status).context(format!(
                        "cannot read batch {id} (it goes on running on the server; \
                         `weir batch results {id} --follow` picks it up)"
                    )));
                }
            }
            Err(status) => {
                progress.finish();
                return Err(failed(&status));
            }
        }
    }
    progress.finish();
    Ok(batch)
}

fn is_transient(code: Code) -> bool {
    matches!(
        code,
        Code::Unavailable | Code::DeadlineExceeded | Code::Aborted | Code::ResourceExhausted
    )
}

/// The output and errors files.
struct Paths {
    output: PathBuf,
    errors: PathBuf,
}

/// What was written.
struct Written {
    succeeded: usize,
    errors: usize,
    /// Input items without a result (only known when the input is).
    missing: Vec<String>,
}

impl Written {
    fn describe(&self, paths: &Paths) -> String {
        format!(
            "wrote {} result{} to {} and {} error{} to {}",
            self.succeeded,
            if self.succeeded == 1 { "" } else { "s" },
            paths.output.display(),
            self.errors,
            if self.errors == 1 { "" } else { "s" },
            paths.errors.display()
        )
    }
}

/// Reads the batch's results and writes both files. With `input`, lines are written in the
/// input's order and items without a result are returned; otherwise in the order they arrive.
/// `created` is the answers' `created` time (Unix seconds): results carry no time of their own.
async fn write_results(
    client: &mut Client,
    id: &str,
    follow: bool,
    paths: &Paths,
    input: Option<&input::Input>,
    created: i64,
) -> anyhow::Result<Written> {
    let request = client.request(StreamBatchResultsRequest {
        batch_id: id.to_string(),
        follow,
    })?;
    let mut stream = client
        .inner
        .stream_batch_results(request)
        .await
        .map_err(|s| failed(&s))?
        .into_inner();
    let mut output = JsonlFile::create(&paths.output)?;
    let mut errors = JsonlFile::create(&paths.errors)?;
    let mut results: Vec<StreamBatchResultsResponse> = Vec::new();
    while let Some(result) = stream.next().await {
        let result = result.map_err(|s| failed(&s))?;
        if input.is_some() {
            results.push(result);
        } else {
            write_line(&result, created, &mut output, &mut errors)?;
            if follow {
                output.flush()?;
                errors.flush()?;
            }
        }
    }
    let mut missing = Vec::new();
    if let Some(input) = input {
        let order = input.order();
        results.sort_by_key(|r| order.get(&r.custom_id).copied().unwrap_or(usize::MAX));
        let seen: HashMap<&str, ()> = results.iter().map(|r| (r.custom_id.as_str(), ())).collect();
        missing = input
            .items
            .iter()
            .filter(|item| !seen.contains_key(item.custom_id.as_str()))
            .map(|item| item.custom_id.clone())
            .collect();
        for result in &results {
            write_line(result, created, &mut output, &mut errors)?;
        }
    }
    Ok(Written {
        succeeded: output.finish()?,
        errors: errors.finish()?,
        missing,
    })
}

fn write_line(
    result: &StreamBatchResultsResponse,
    created: i64,
    output: &mut JsonlFile,
    errors: &mut JsonlFile,
) -> anyhow::Result<()> {
    match output::line(result, created)? {
        Line::Output(text) => output.write(&text),
        Line::Error(text) => errors.write(&text),
    }
}

/// Prints where the results went and how the batch ended; an error unless it completed.
fn report(batch: &Batch, written: &Written, paths: &Paths) -> anyhow::Result<()> {
    eprintln!("{}", progress::summary(batch));
    eprintln!("{}", written.describe(paths));
    if !written.missing.is_empty() {
        let shown: Vec<_> = written.missing.iter().take(5).map(String::as_str).collect();
        eprintln!(
            "weir: {} items have no result yet (e.g. {}); `weir batch results {}` later",
            written.missing.len(),
            shown.join(", "),
            batch.id
        );
    }
    match batch.state() {
        BatchState::Completed => Ok(()),
        _ => anyhow::bail!("batch {} ended {}", batch.id, state_name(batch)),
    }
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    let duration = humantime::parse_duration(text).map_err(|e| format!("{e} (e.g. 24h, 90m)"))?;
    if duration.is_zero() {
        return Err("must be longer than 0".to_string());
    }
    Ok(duration)
}

fn parse_time(text: &str) -> Result<prost_types::Timestamp, String> {
    let time = chrono::DateTime::parse_from_rfc3339(text)
        .map_err(|e| format!("{e} (expected RFC 3339, e.g. 2026-12-04T02:00:00Z)"))?;
    Ok(prost_types::Timestamp {
        seconds: time.timestamp(),
        nanos: i32::try_from(time.timestamp_subsec_nanos()).unwrap_or(0),
    })
}

fn parse_label(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((key, value)) if !key.is_empty() => Ok((key.to_string(), value.to_string())),
        _ => Err(format!("expected key=value, not {text:?}")),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    #[test]
    fn options_parse() {
        assert_eq!(parse_duration("24h").unwrap(), Duration::from_secs(86_400));
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("soon").is_err());
        let time = parse_time("2026-12-04T02:00:00Z").unwrap();
        assert_eq!(time.seconds, 1_796_349_600);
        assert_eq!(parse_time("2026-12-04T03:00:00+01:00").unwrap(), time);
        assert!(parse_time("tomorrow").is_err());
        assert_eq!(
            parse_label("team=search").unwrap(),
            ("team".into(), "search".into())
        );
        assert_eq!(parse_label("a=b=c").unwrap(), ("a".into(), "b=c".into()));
        assert!(parse_label("=x").is_err());
        assert!(parse_label("novalue").is_err());
        assert_eq!(rfc3339(time).unwrap(), "2026-12-04T02:00:00Z");
    }

    #[test]
    fn a_refused_item_is_named_by_its_line() {
        let text = "{\"custom_id\":\"a\",\"method\":\"POST\",\"url\":\"/v1/chat/completions\",\"body\":{\"model\":\"m\",\"messages\":[{\"role\":\"user\",\"content\":\"x\"}]}}";
        let input = input::parse(&format!("{text}\n\n{}", text.replace("\"a\"", "\"b\""))).unwrap();
        let error = weir_mesh::ApiError::invalid_argument(
            "items[1].request.model",
            "model \"m\" not found",
        );
        let status = tonic::Status::from(error);
        let text = format!("{:#}", refused(&status, &input, Path::new("in.jsonl")));
        assert!(
            text.starts_with("in.jsonl line 3 (custom_id \"b\") was refused: "),
            "{text}"
        );
        assert!(text.contains("not found"), "{text}");
        assert_eq!(item_index("items[12].request: bad"), Some(12));
        assert_eq!(item_index("items: empty"), None);
        // No item named: the router's error as it is.
        let status = tonic::Status::invalid_argument("too many items");
        let text = format!("{:#}", refused(&status, &input, Path::new("in.jsonl")));
        assert!(!text.contains("line"), "{text}");
    }
}
