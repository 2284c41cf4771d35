//! What one model call tells observers: a GenAI span and the model metrics.
//!
//! Every call that passed validation gets a span named `chat <model>` (kind client: the inference
//! service calling its backend), a child of the RPC's server span, with the OpenTelemetry GenAI
//! conventions:
//!
//! - at the start: `gen_ai.operation.name = "chat"`, `gen_ai.provider.name` (`weir.sim` for the
//!   simulated backend, `openai` for any OpenAI-compatible API), `gen_ai.request.model`,
//!   `gen_ai.request.max_tokens` (the output limit the call runs with), `weir.streaming`;
//! - at the end: `gen_ai.response.model`, `gen_ai.usage.input_tokens`,
//!   `gen_ai.usage.output_tokens`, `gen_ai.response.finish_reasons`, and for streams
//!   `gen_ai.server.time_to_first_token` (seconds); or, for a failure, the span's error status and
//!   `error.type` (the gRPC code name); or `error.type = "CANCELLED"` when the caller dropped the
//!   stream first.
//!
//! Metrics, labelled by model:
//! - `weir_model_calls_total{model, grpc_code}`: calls that ended, by code;
//! - `weir_model_tokens_total{model, type}`: tokens, `type` = `input` or `output`;
//! - `weir_model_time_to_first_token_seconds{model}`: a histogram, streams only (a unary answer
//!   arrives whole, so its first token says nothing a client could see).
//!
//! No prompt or answer text is recorded anywhere.

use std::time::Duration;

use tokio::time::Instant;
use tonic::Code;
use tracing::Span;
use weir_mesh::{
    catalog::BackendKind,
    error::code_name,
    trace::{set_attribute, set_error},
};
use weir_proto::common::{FinishReason, Usage};

/// Counter of finished model calls by code.
pub const CALLS_TOTAL: &str = "weir_model_calls_total";
/// Counter of tokens by model and type (`input`, `output`).
pub const TOKENS_TOTAL: &str = "weir_model_tokens_total";
/// Histogram of streams' time to first token, in seconds.
pub const TIME_TO_FIRST_TOKEN_SECONDS: &str = "weir_model_time_to_first_token_seconds";

/// The OpenTelemetry `gen_ai.provider.name` of a backend.
fn provider(kind: BackendKind) -> &'static str {
    match kind {
        BackendKind::Sim => "weir.sim",
        BackendKind::Openai => "openai",
    }
}

/// One model call being observed; recorded exactly once, when it ends (or as cancelled when it
/// is dropped first).
#[derive(Debug)]
pub struct ModelCall {
    span: Span,
    model: String,
    started: Instant,
    streaming: bool,
    ended: bool,
}

impl ModelCall {
    /// Starts observing a call to `model` on a backend of `kind`, allowed `output_limit` tokens.
    pub fn start(model: &str, kind: BackendKind, output_limit: u32, streaming: bool) -> Self {
        let name = format!("chat {model}");
        let span = tracing::info_span!(
            "gen_ai.chat",
            otel.name = name.as_str(),
            otel.kind = "client",
            gen_ai.operation.name = "chat",
            gen_ai.provider.name = provider(kind),
            gen_ai.request.model = model,
            gen_ai.request.max_tokens = i64::from(output_limit),
            weir.streaming = streaming,
        );
        Self {
            span,
            model: model.to_string(),
            started: Instant::now(),
            streaming,
            ended: false,
        }
    }

    /// The call's span, to run the backend call in.
    pub fn span(&self) -> &Span {
        &self.span
    }

    /// The call answered: `usage`, why it stopped, and (streams) its time to first token.
    pub fn finished(
        mut self,
        usage: &Usage,
        finish_reason: FinishReason,
        time_to_first_token: Duration,
    ) {
        self.ended = true;
        let input = u64::try_from(usage.input_tokens).unwrap_or(0);
        let output = u64::try_from(usage.output_tokens).unwrap_or(0);
        metrics::counter!(CALLS_TOTAL, "model" => self.model.clone(), "grpc_code" => "OK")
            .increment(1);
        metrics::counter!(TOKENS_TOTAL, "model" => self.model.clone(), "type" => "input")
            .increment(input);
        metrics::counter!(TOKENS_TOTAL, "model" => self.model.clone(), "type" => "output")
            .increment(output);
        if self.streaming {
            metrics::histogram!(TIME_TO_FIRST_TOKEN_SECONDS, "model" => self.model.clone())
                .record(time_to_first_token.as_secs_f64());
        }
        let span = &self.span;
        set_attribute(span, "gen_ai.response.model", self.model.clone());
        set_attribute(span, "gen_ai.usage.input_tokens", usage.input_tokens);
        set_attribute(span, "gen_ai.usage.output_tokens", usage.output_tokens);
        set_attribute(
            span,
            "gen_ai.response.finish_reasons",
            finish_reason_name(finish_reason),
        );
        if self.streaming {
            set_attribute(
                span,
                "gen_ai.server.time_to_first_token",
                time_to_first_token.as_secs_f64(),
            );
        }
    }

    /// The call failed with `code`.
    pub fn failed(mut self, code: Code) {
        self.ended = true;
        self.record_error(code);
    }

    fn record_error(&self, code: Code) {
        metrics::counter!(CALLS_TOTAL, "model" => self.model.clone(), "grpc_code" => code_name(code))
            .increment(1);
        set_error(&self.span, code);
        set_attribute(
            &self.span,
            "weir.elapsed_seconds",
            self.started.elapsed().as_secs_f64(),
        );
    }
}

impl Drop for ModelCall {
    fn drop(&mut self) {
        if !self.ended {
            self.record_error(Code::Cancelled);
        }
    }
}

/// The OpenTelemetry name of a finish reason (`stop`, `length`, ...).
fn finish_reason_name(reason: FinishReason) -> &'static str {
    match reason {
        FinishReason::Unspecified => "unspecified",
        FinishReason::Stop => "stop",
        FinishReason::Length => "length",
        FinishReason::ToolCalls => "tool_calls",
        FinishReason::ContentFilter => "content_filter",
    }
}
