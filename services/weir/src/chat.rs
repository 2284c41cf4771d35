//! `weir chat`: send one prompt to the router and print the answer, streamed token by token.

use std::{io::Write, time::Instant};

use tokio_stream::StreamExt;
use tonic::{Request, Status, metadata::MetadataValue};
use weir_mesh::ApiError;
use weir_proto::{
    common::{GenerationParams, Message, Role, Usage},
    router::{
        CompleteRequest, CompleteStreamRequest, complete_stream_response::Event,
        router_service_client::RouterServiceClient,
    },
};

/// What to send.
#[derive(Debug, Clone)]
pub struct ChatOptions {
    /// Router URL, e.g. `http://127.0.0.1:50051`.
    pub router: String,
    /// Model name or route alias.
    pub model: String,
    /// The user's prompt.
    pub prompt: String,
    /// Optional system message.
    pub system: Option<String>,
    /// Optional max_tokens.
    pub max_tokens: Option<i32>,
    /// API key sent as `authorization: Bearer <key>`.
    pub api_key: Option<String>,
    /// Stream tokens as they arrive (default) or wait for the whole answer.
    pub stream: bool,
}

/// Why a chat failed.
#[derive(Debug, thiserror::Error)]
pub enum ChatError {
    /// The router URL is not valid.
    #[error("invalid router URL {url:?}: {source}")]
    Url {
        /// The URL.
        url: String,
        /// Why.
        source: tonic::transport::Error,
    },
    /// The API key cannot be sent as a header.
    #[error("the API key contains characters that cannot be sent in a header")]
    ApiKey,
    /// The router answered with an error.
    #[error("{0}")]
    Status(ApiError),
    /// Writing to the terminal failed.
    #[error("writing the answer: {0}")]
    Io(#[from] std::io::Error),
}

impl From<Status> for ChatError {
    fn from(status: Status) -> Self {
        Self::Status(ApiError::from_status(&status))
    }
}

/// Sends the prompt and writes the answer to `out`, then a one-line summary to standard error.
pub async fn run(options: ChatOptions, out: &mut impl Write) -> Result<(), ChatError> {
    let channel =
        weir_mesh::client::lazy_channel(&options.router).map_err(|source| ChatError::Url {
            url: options.router.clone(),
            source,
        })?;
    let mut client = RouterServiceClient::new(channel);
    let mut messages = Vec::new();
    if let Some(system) = &options.system {
        messages.push(text_message(Role::System, system));
    }
    messages.push(text_message(Role::User, &options.prompt));
    let params = GenerationParams {
        max_tokens: options.max_tokens,
        ..GenerationParams::default()
    };
    let started = Instant::now();

    if options.stream {
        let request = authorized(
            CompleteStreamRequest {
                model: options.model.clone(),
                messages,
                params: Some(params),
                ..CompleteStreamRequest::default()
            },
            options.api_key.as_deref(),
        )?;
        let mut stream = client.complete_stream(request).await?.into_inner();
        let mut model = String::new();
        while let Some(event) = stream.next().await {
            match event?.event {
                Some(Event::Start(start)) => model = start.model,
                Some(Event::Delta(delta)) => {
                    out.write_all(delta.text.as_bytes())?;
                    out.flush()?;
                }
                Some(Event::Done(done)) => {
                    writeln!(out)?;
                    summary(&model, done.usage.as_ref(), done.cost_micros, started);
                }
                None => {}
            }
        }
    } else {
        let request = authorized(
            CompleteRequest {
                model: options.model.clone(),
                messages,
                params: Some(params),
                ..CompleteRequest::default()
            },
            options.api_key.as_deref(),
        )?;
        let response = client.complete(request).await?.into_inner();
        let text = response.message.map(|m| m.content).unwrap_or_default();
        writeln!(out, "{text}")?;
        summary(
            &response.model,
            response.usage.as_ref(),
            response.cost_micros,
            started,
        );
    }
    Ok(())
}

fn text_message(role: Role, content: &str) -> Message {
    Message {
        role: role as i32,
        content: content.to_string(),
        ..Message::default()
    }
}

fn authorized<T>(message: T, api_key: Option<&str>) -> Result<Request<T>, ChatError> {
    let mut request = Request::new(message);
    if let Some(key) = api_key {
        let value =
            MetadataValue::try_from(format!("Bearer {key}")).map_err(|_| ChatError::ApiKey)?;
        request
            .metadata_mut()
            .insert(weir_mesh::metadata::AUTHORIZATION, value);
    }
    Ok(request)
}

fn summary(model: &str, usage: Option<&Usage>, cost_micros: i64, started: Instant) {
    let usage = usage.cloned().unwrap_or_default();
    eprintln!(
        "[{model} · {} in / {} out tokens · ${:.6} · {:.2}s]",
        usage.input_tokens,
        usage.output_tokens,
        cost_micros as f64 / 1_000_000.0,
        started.elapsed().as_secs_f64()
    );
}
