//! `weir jobs`: asynchronous jobs from a terminal.
//!
//! ```text
//! weir jobs submit "prompt" [--model auto] [--request-id ID] [--wait]   # prints the job id
//! weir jobs get ID                                                      # state, answer or error
//! weir jobs watch ID                                                    # each change, until it ends
//! weir jobs cancel ID
//! weir jobs list [--limit 20]                                           # newest first
//! ```
//!
//! The router's address is `--router` (`WEIR_ROUTER_URL`, default `http://127.0.0.1:50051`); the
//! key is `--api-key` (`WEIR_API_KEY`). `submit --wait` watches the job to its end and exits
//! non-zero unless it succeeded, so scripts can use it.

use std::io::Write;

use clap::Subcommand;
use tokio_stream::StreamExt;
use tonic::{Request, transport::Channel};
use weir_proto::{
    common::{Message, Role},
    router::{
        CancelJobRequest, CompleteRequest, GetJobRequest, Job, JobState, ListJobsRequest,
        SubmitJobRequest, WatchJobRequest, router_service_client::RouterServiceClient,
    },
};

use crate::call::{RouterOptions, failed};

/// A `weir jobs` subcommand.
#[derive(Debug, Clone, Subcommand)]
pub enum JobsCommand {
    /// Queue a prompt as a job; prints its id.
    Submit {
        /// The prompt.
        prompt: String,
        /// Model name or route alias.
        #[arg(long, short, default_value = "auto")]
        model: String,
        /// Idempotency key: submitting again with it returns the same job.
        #[arg(long)]
        request_id: Option<String>,
        /// Watch the job until it ends; exit non-zero unless it succeeded.
        #[arg(long)]
        wait: bool,
    },
    /// Show a job: its state, and its answer or error once it has ended.
    Get {
        /// Job id.
        id: String,
    },
    /// Print each change of a job until it ends; exit non-zero unless it succeeded.
    Watch {
        /// Job id.
        id: String,
    },
    /// Cancel a job that has not ended.
    Cancel {
        /// Job id.
        id: String,
    },
    /// List your jobs, newest first.
    List {
        /// Most jobs to show.
        #[arg(long, default_value_t = 20)]
        limit: usize,
    },
}

/// Runs one subcommand, writing its output to `out`.
pub async fn run(
    options: RouterOptions,
    command: JobsCommand,
    out: &mut impl Write,
) -> anyhow::Result<()> {
    let channel = Channel::from_shared(options.router.clone())
        .map_err(|e| anyhow::anyhow!("invalid router URL {:?}: {e}", options.router))?
        .connect()
        .await
        .map_err(|e| anyhow::anyhow!("cannot reach the router at {}: {e}", options.router))?;
    let mut client = Client {
        inner: RouterServiceClient::new(channel),
        key: options.api_key,
    };
    match command {
        JobsCommand::Submit {
            prompt,
            model,
            request_id,
            wait,
        } => {
            let request = CompleteRequest {
                model,
                messages: vec![Message {
                    role: Role::User as i32,
                    content: prompt,
                    ..Message::default()
                }],
                ..CompleteRequest::default()
            };
            let body = SubmitJobRequest {
                request: Some(request),
                request_id: request_id.unwrap_or_default(),
                ..SubmitJobRequest::default()
            };
            let job = client
                .inner
                .submit_job(client.request(body)?)
                .await
                .map_err(|s| failed(&s))?
                .into_inner()
                .job
                .ok_or_else(no_job)?;
            writeln!(out, "{}", job.id)?;
            if wait {
                watch(&mut client, &job.id, out).await
            } else {
                Ok(())
            }
        }
        JobsCommand::Get { id } => {
            let job = client
                .inner
                .get_job(client.request(GetJobRequest { job_id: id })?)
                .await
                .map_err(|s| failed(&s))?
                .into_inner()
                .job
                .ok_or_else(no_job)?;
            show(&job, out)
        }
        JobsCommand::Watch { id } => watch(&mut client, &id, out).await,
        JobsCommand::Cancel { id } => {
            let job = client
                .inner
                .cancel_job(client.request(CancelJobRequest { job_id: id })?)
                .await
                .map_err(|s| failed(&s))?
                .into_inner()
                .job
                .ok_or_else(no_job)?;
            show(&job, out)
        }
        JobsCommand::List { limit } => list(&mut client, limit, out).await,
    }
}

struct Client {
    inner: RouterServiceClient<Channel>,
    key: Option<String>,
}

impl Client {
    fn request<T>(&self, body: T) -> anyhow::Result<Request<T>> {
        crate::call::request(self.key.as_deref(), body)
    }
}

/// The error for an answer that should carry a job and does not (a router bug).
fn no_job() -> anyhow::Error {
    anyhow::anyhow!("the router answered without a job")
}

/// `queued`, `running`, `succeeded`, ...
fn state_name(job: &Job) -> &'static str {
    match job.state() {
        JobState::Queued => "queued",
        JobState::Running => "running",
        JobState::Succeeded => "succeeded",
        JobState::Failed => "failed",
        JobState::Cancelled => "cancelled",
        JobState::Expired => "expired",
        JobState::Unspecified => "unknown",
    }
}

fn is_terminal(job: &Job) -> bool {
    !matches!(
        job.state(),
        JobState::Queued | JobState::Running | JobState::Unspecified
    )
}

/// `<id> <state> attempts=<n>`, then the answer or the error once it has ended.
fn show(job: &Job, out: &mut impl Write) -> anyhow::Result<()> {
    writeln!(
        out,
        "{} {} attempts={}",
        job.id,
        state_name(job),
        job.attempts
    )?;
    if let Some(result) = &job.result {
        let usage = result.usage.unwrap_or_default();
        writeln!(
            out,
            "model {}  in {} / out {} tokens  cost {} micro-USD",
            result.model, usage.input_tokens, usage.output_tokens, result.cost_micros
        )?;
        if let Some(message) = &result.message {
            writeln!(out, "{}", message.content)?;
        }
    }
    if let Some(error) = &job.error {
        writeln!(out, "error {}: {}", error.reason, error.message)?;
    }
    Ok(())
}

/// Prints each change of the job until it ends; an error unless it succeeded.
async fn watch(client: &mut Client, id: &str, out: &mut impl Write) -> anyhow::Result<()> {
    let request = client.request(WatchJobRequest {
        job_id: id.to_string(),
    })?;
    let mut stream = client
        .inner
        .watch_job(request)
        .await
        .map_err(|s| failed(&s))?
        .into_inner();
    let mut last = None;
    while let Some(change) = stream.next().await {
        let Some(job) = change.map_err(|s| failed(&s))?.job else {
            continue;
        };
        if is_terminal(&job) {
            show(&job, out)?;
        } else {
            writeln!(out, "{} {}", job.id, state_name(&job))?;
        }
        out.flush()?;
        last = Some(job);
    }
    match last {
        Some(job) if job.state() == JobState::Succeeded => Ok(()),
        Some(job) if is_terminal(&job) => {
            anyhow::bail!("job {} ended {}", job.id, state_name(&job))
        }
        _ => anyhow::bail!("the watch of job {id} ended before the job did"),
    }
}

async fn list(client: &mut Client, limit: usize, out: &mut impl Write) -> anyhow::Result<()> {
    let mut shown = 0;
    let mut token = String::new();
    while shown < limit {
        let body = ListJobsRequest {
            page_size: i32::try_from(limit.min(100)).unwrap_or(100),
            page_token: token,
            ..ListJobsRequest::default()
        };
        let page = client
            .inner
            .list_jobs(client.request(body)?)
            .await
            .map_err(|s| failed(&s))?
            .into_inner();
        for job in page.jobs.iter().take(limit - shown) {
            writeln!(
                out,
                "{} {} attempts={}",
                job.id,
                state_name(job),
                job.attempts
            )?;
            shown += 1;
        }
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    if shown == 0 {
        writeln!(out, "no jobs")?;
    }
    Ok(())
}
