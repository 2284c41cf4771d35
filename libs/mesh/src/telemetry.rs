//! Telemetry set-up shared by every Weir binary: logs, traces and Prometheus metrics, configured
//! by the `[telemetry]` table of `weir.toml`.
//!
//! ```toml
//! [telemetry]
//! log_format = "auto"                     # "auto" | "json" | "text"     WEIR_TELEMETRY__LOG_FORMAT
//! log_level = "info"                      # used when RUST_LOG is unset  WEIR_TELEMETRY__LOG_LEVEL
//! otlp_endpoint = "http://127.0.0.1:4317" # OTLP/gRPC; default $OTEL_EXPORTER_OTLP_ENDPOINT, else off
//! sampling_ratio = 1.0                    # share of new traces kept (parent-based)
//! metrics_listen = "127.0.0.1:9464"       # Prometheus GET /metrics; "" turns it off
//! ```
//!
//! [`init`] installs, once per process:
//!
//! - **Logs** to standard error: JSON lines when it is not a terminal (for log shippers), text on a
//!   terminal, at the level of `RUST_LOG` (default [`TelemetryConfig::log_level`]). Every JSON line
//!   logged inside a traced call carries `trace_id` and `span_id`, so logs and traces join. Weir
//!   never logs prompt or answer text, API keys or their hashes.
//! - **Traces**: every `tracing` span becomes an OpenTelemetry span (the RPC spans of
//!   [`crate::trace`], the model-call spans of the inference service), exported over OTLP/gRPC in
//!   batches from a background thread. Exporting never blocks a request: a span is handed to a
//!   bounded queue ([`SPAN_QUEUE`] spans) and dropped when it is full, and a collector that is down
//!   costs only failed exports in that thread, each bounded by [`TelemetryConfig::export_timeout`].
//!   New traces are kept with probability `sampling_ratio`; a call that continues a trace follows
//!   its caller's decision (parent-based sampling), so a trace is never kept in part. Trace ids
//!   exist even when nothing is exported, so answers and logs can always name their trace.
//!   Span events: `weir_*` crates' debug events (retries, shed requests, fallbacks) are recorded on
//!   their span whatever `RUST_LOG` says; other crates' from info up.
//! - **Metrics**: the Prometheus recorder of the `metrics` facade that every layer reports to,
//!   rendered by [`serve_metrics`] at `GET /metrics`. Histograms whose names end in `_seconds` get
//!   the buckets [`LATENCY_BUCKETS`].
//!
//! The OTLP exporter is built on the current Tokio runtime, so call [`init`] from within one, and
//! call [`Telemetry::shutdown`] before the runtime stops so the last spans are sent.

use std::{
    fmt,
    io::IsTerminal,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    sync::OnceLock,
    time::Duration,
};

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use opentelemetry::{
    KeyValue,
    trace::{TraceContextExt, TracerProvider as _},
};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::{
    Resource,
    trace::{BatchConfigBuilder, BatchSpanProcessor, Sampler, SdkTracerProvider},
};
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{Level, Subscriber};
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::{
    EnvFilter, Layer,
    filter::Targets,
    fmt::{
        FmtContext, FormatEvent, FormatFields,
        format::{Format, Json, JsonFields, Writer},
    },
    prelude::*,
    registry::LookupSpan,
};

use crate::config::ConfigError;

/// Default log filter when `RUST_LOG` is not set.
pub const DEFAULT_LOG_FILTER: &str = "info";
/// Default address of the Prometheus endpoint.
pub const DEFAULT_METRICS_LISTEN: SocketAddr =
    SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::new(127, 0, 0, 1), 9464));
/// Default time one OTLP export may take before it is abandoned.
pub const DEFAULT_EXPORT_TIMEOUT: Duration = Duration::from_secs(5);
/// Spans waiting for export; more are dropped (and counted by the SDK) rather than slowing calls.
pub const SPAN_QUEUE: usize = 4096;
/// Histogram buckets, in seconds, of every `*_seconds` metric: from 5 ms to 2 minutes, so both a
/// cache hit and a long streamed answer fall in a bucket of their own.
pub const LATENCY_BUCKETS: [f64; 14] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
];
/// The standard variable naming the OTLP endpoint, used when the config names none.
pub const OTLP_ENDPOINT_ENV: &str = "OTEL_EXPORTER_OTLP_ENDPOINT";

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// JSON when stderr is not a terminal, text otherwise (the default).
    #[default]
    Auto,
    /// One JSON object per line.
    Json,
    /// Human-readable text.
    Text,
}

/// The `[telemetry]` table (see the [module docs](self)). Every setting has a default.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TelemetryConfig {
    /// Log format (default `auto`).
    pub log_format: LogFormat,
    /// Log filter used when `RUST_LOG` is unset (default `info`; `RUST_LOG` syntax).
    pub log_level: String,
    /// OTLP/gRPC endpoint traces are exported to, such as `http://jaeger:4317`. Empty (the
    /// default): `$OTEL_EXPORTER_OTLP_ENDPOINT`, and when that is unset too, traces are not
    /// exported (they still get ids, for answers and logs).
    pub otlp_endpoint: String,
    /// Share of new traces that are recorded and exported, 0 to 1 (default 1). Calls that continue
    /// a caller's trace follow the caller's decision.
    pub sampling_ratio: f64,
    /// Address of the Prometheus endpoint (`GET /metrics`; default `127.0.0.1:9464`). `None`
    /// (`metrics_listen = ""`) turns it off.
    #[serde(with = "crate::config::optional_addr")]
    pub metrics_listen: Option<SocketAddr>,
    /// Longest time one OTLP export may take (default 5 s).
    #[serde(with = "humantime_serde")]
    pub export_timeout: Duration,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        Self {
            log_format: LogFormat::Auto,
            log_level: DEFAULT_LOG_FILTER.to_string(),
            otlp_endpoint: String::new(),
            sampling_ratio: 1.0,
            metrics_listen: Some(DEFAULT_METRICS_LISTEN),
            export_timeout: DEFAULT_EXPORT_TIMEOUT,
        }
    }
}

impl TelemetryConfig {
    /// Checks the settings, naming the bad key (`telemetry.sampling_ratio`, ...).
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !(0.0..=1.0).contains(&self.sampling_ratio) {
            return Err(ConfigError::invalid(
                "telemetry.sampling_ratio",
                format!("{} is not between 0 and 1", self.sampling_ratio),
            ));
        }
        if self.export_timeout.is_zero() {
            return Err(ConfigError::invalid(
                "telemetry.export_timeout",
                "must be longer than 0 (for example \"5s\")",
            ));
        }
        if let Some(endpoint) = self.endpoint() {
            let uri: http::Uri = endpoint.parse().map_err(|error| {
                ConfigError::invalid(
                    "telemetry.otlp_endpoint",
                    format!("{endpoint:?} is not a URL: {error}"),
                )
            })?;
            if !matches!(uri.scheme_str(), Some("http" | "https")) || uri.host().is_none() {
                return Err(ConfigError::invalid(
                    "telemetry.otlp_endpoint",
                    format!("{endpoint:?} must be an http:// URL such as http://127.0.0.1:4317"),
                ));
            }
        }
        if let Err(error) = self.log_level.parse::<EnvFilter>() {
            return Err(ConfigError::invalid(
                "telemetry.log_level",
                format!("{:?} is not a log filter: {error}", self.log_level),
            ));
        }
        Ok(())
    }

    /// The OTLP endpoint in effect: the config's, else `$OTEL_EXPORTER_OTLP_ENDPOINT`, else none.
    pub fn endpoint(&self) -> Option<String> {
        let configured = self.otlp_endpoint.trim();
        if !configured.is_empty() {
            return Some(configured.to_string());
        }
        std::env::var(OTLP_ENDPOINT_ENV)
            .ok()
            .map(|v| v.trim().to_string())
            .filter(|v| !v.is_empty())
    }
}

/// Why telemetry could not start.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// A setting is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The OTLP exporter could not be built.
    #[error("OTLP exporter for {endpoint}: {message}")]
    Exporter {
        /// The endpoint.
        endpoint: String,
        /// What failed.
        message: String,
    },
    /// Telemetry was already installed in this process with another configuration.
    #[error("telemetry is already installed in this process")]
    AlreadyInstalled,
}

/// The installed telemetry: flush and shut it down at exit.
#[derive(Clone)]
pub struct Telemetry {
    provider: SdkTracerProvider,
    exporting: bool,
    metrics: PrometheusHandle,
}

impl fmt::Debug for Telemetry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Telemetry")
            .field("exporting", &self.exporting)
            .finish_non_exhaustive()
    }
}

impl Telemetry {
    /// Whether spans are exported (an OTLP endpoint is configured).
    pub fn is_exporting(&self) -> bool {
        self.exporting
    }

    /// The Prometheus recorder's handle: `render()` gives the text exposition.
    pub fn metrics(&self) -> &PrometheusHandle {
        &self.metrics
    }

    /// Exports the spans waiting in the queue now (waits for the export, up to its timeout).
    pub async fn flush(&self) {
        let provider = self.provider.clone();
        let flushed = tokio::task::spawn_blocking(move || provider.force_flush()).await;
        if let Ok(Err(error)) = flushed {
            tracing::debug!(%error, "span flush failed");
        }
    }

    /// Sends the spans still queued and stops the exporter; spans ended afterwards are dropped.
    pub async fn shutdown(&self) {
        let provider = self.provider.clone();
        let timeout = DEFAULT_EXPORT_TIMEOUT;
        let stopped =
            tokio::task::spawn_blocking(move || provider.shutdown_with_timeout(timeout)).await;
        if let Ok(Err(error)) = stopped {
            tracing::debug!(%error, "span exporter shutdown failed");
        }
    }
}

static INSTALLED: OnceLock<Telemetry> = OnceLock::new();

/// Installs logs, traces and the metrics recorder for this process (see the
/// [module docs](self)); `service_name` is the OpenTelemetry `service.name` of every span
/// (`weir` when one process hosts several services, `weir-router` for one).
///
/// Once per process: a second call returns the telemetry already installed if it was installed by
/// this function, whatever its config (tests call it from many places). Must run inside a Tokio
/// runtime.
pub fn init(config: &TelemetryConfig, service_name: &str) -> Result<Telemetry, TelemetryError> {
    if let Some(installed) = INSTALLED.get() {
        return Ok(installed.clone());
    }
    config.validate()?;
    let metrics = install_metrics_recorder();
    let endpoint = config.endpoint();
    let mut provider = SdkTracerProvider::builder()
        .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
            config.sampling_ratio,
        ))))
        .with_resource(
            Resource::builder()
                .with_service_name(service_name.to_string())
                .with_attribute(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")))
                .build(),
        );
    if let Some(endpoint) = &endpoint {
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(endpoint.clone())
            .with_timeout(config.export_timeout)
            .build()
            .map_err(|error| TelemetryError::Exporter {
                endpoint: endpoint.clone(),
                message: error.to_string(),
            })?;
        let processor = BatchSpanProcessor::builder(exporter)
            .with_batch_config(
                BatchConfigBuilder::default()
                    .with_max_queue_size(SPAN_QUEUE)
                    .with_scheduled_delay(Duration::from_secs(1))
                    .build(),
            )
            .build();
        provider = provider.with_span_processor(processor);
    }
    let provider = provider.build();
    let tracer = provider.tracer("weir");

    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&config.log_level))
        .unwrap_or_else(|_| EnvFilter::new(DEFAULT_LOG_FILTER));
    let json = match config.log_format {
        LogFormat::Json => true,
        LogFormat::Text => false,
        LogFormat::Auto => !std::io::stderr().is_terminal(),
    };
    let logs = if json {
        tracing_subscriber::fmt::layer()
            .fmt_fields(JsonFields::new())
            .event_format(TraceIds(
                tracing_subscriber::fmt::format()
                    .json()
                    .flatten_event(true)
                    .with_current_span(true),
            ))
            .with_writer(std::io::stderr)
            .with_filter(filter)
            .boxed()
    } else {
        tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_filter(filter)
            .boxed()
    };
    // Our own decisions become span events at debug; other crates' noise stays out.
    let span_events = Targets::new()
        .with_default(Level::INFO)
        .with_target("weir", Level::DEBUG)
        .with_target("weir_mesh", Level::DEBUG)
        .with_target("weir_router", Level::DEBUG)
        .with_target("weir_inference", Level::DEBUG)
        .with_target("weir_session", Level::DEBUG)
        .with_target("weir_budget", Level::DEBUG)
        .with_target("weir_review", Level::DEBUG);
    let traces = tracing_opentelemetry::layer()
        .with_tracer(tracer)
        .with_filter(span_events);
    tracing_subscriber::registry()
        .with(logs)
        .with(traces)
        .try_init()
        .map_err(|_| TelemetryError::AlreadyInstalled)?;
    let telemetry = Telemetry {
        provider,
        exporting: endpoint.is_some(),
        metrics,
    };
    tracing::info!(
        otlp_endpoint = endpoint.as_deref().unwrap_or("(none: traces not exported)"),
        sampling_ratio = config.sampling_ratio,
        "telemetry installed"
    );
    Ok(INSTALLED.get_or_init(|| telemetry).clone())
}

/// The process's Prometheus recorder, installed on first use: every `metrics::counter!` and
/// friends from then on is rendered by the returned handle. If another recorder was installed
/// first (an embedding program's), Weir's metrics go there and the handle renders nothing.
pub fn install_metrics_recorder() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".to_string()), &LATENCY_BUCKETS);
            let recorder = match builder {
                Ok(builder) => builder.build_recorder(),
                // Only an empty bucket list fails, and ours is not empty.
                Err(_) => PrometheusBuilder::new().build_recorder(),
            };
            let handle = recorder.handle();
            if metrics::set_global_recorder(recorder).is_err() {
                tracing::warn!("a metrics recorder was already installed; /metrics will be empty");
            }
            handle
        })
        .clone()
}

/// Serves `GET /metrics` (Prometheus text format) from `handle` on `listener` until `shutdown` is
/// cancelled. Histograms are compacted every 5 s in the background.
pub async fn serve_metrics(
    listener: TcpListener,
    handle: PrometheusHandle,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let upkeep = {
        let handle = handle.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(5));
            loop {
                tokio::select! {
                    _ = tick.tick() => handle.run_upkeep(),
                    () = shutdown.cancelled() => return,
                }
            }
        })
    };
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let handle = handle.clone();
            async move {
                (
                    [(
                        http::header::CONTENT_TYPE,
                        "text/plain; version=0.0.4; charset=utf-8",
                    )],
                    handle.render(),
                )
            }
        }),
    );
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, "serving Prometheus metrics at /metrics");
    }
    let served = axum::serve(listener, app)
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await;
    upkeep.abort();
    served
}

/// The JSON log format with the current span's `trace_id` and `span_id` added to each line.
struct TraceIds(Format<Json>);

impl<S, N> FormatEvent<S, N> for TraceIds
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> fmt::Result {
        // The ids first, while no span extension is borrowed (reading them may lock one). The
        // current span is the dispatcher's, not this layer's view: the RPC spans are recorded for
        // traces even when the log filter leaves them out of the logs.
        let current = tracing::Span::current();
        let ids = (!current.is_none())
            .then(|| current.context())
            .and_then(|context| {
                let span = context.span();
                let span_context = span.span_context();
                span_context.is_valid().then(|| {
                    (
                        span_context.trace_id().to_string(),
                        span_context.span_id().to_string(),
                    )
                })
            });
        let mut line = String::new();
        self.0.format_event(ctx, Writer::new(&mut line), event)?;
        if let Some((trace_id, span_id)) = ids
            && let Some(end) = line.rfind('}')
        {
            line.insert_str(
                end,
                &format!(",\"trace_id\":\"{trace_id}\",\"span_id\":\"{span_id}\""),
            );
        }
        writer.write_str(&line)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::config::Source;

    fn parse(toml: &str) -> Result<TelemetryConfig, ConfigError> {
        Source::from_toml(toml).section("telemetry")
    }

    #[test]
    fn defaults() {
        let config = parse("").unwrap();
        assert_eq!(config, TelemetryConfig::default());
        assert_eq!(config.metrics_listen, Some(DEFAULT_METRICS_LISTEN));
        assert_eq!(config.sampling_ratio, 1.0);
        config.validate().unwrap();
    }

    #[test]
    fn settings_parse_and_bad_ones_name_their_key() {
        let config = parse(
            "[telemetry]\nmetrics_listen = \"\"\nsampling_ratio = 0.25\nlog_format = \"json\"\n\
             otlp_endpoint = \"http://jaeger:4317\"\n",
        )
        .unwrap();
        assert_eq!(config.metrics_listen, None);
        assert_eq!(config.log_format, LogFormat::Json);
        assert_eq!(config.endpoint().as_deref(), Some("http://jaeger:4317"));
        config.validate().unwrap();

        let ratio = TelemetryConfig {
            sampling_ratio: 1.5,
            ..TelemetryConfig::default()
        };
        let error = ratio.validate().unwrap_err().to_string();
        assert!(error.contains("telemetry.sampling_ratio"), "{error}");

        let endpoint = TelemetryConfig {
            otlp_endpoint: "jaeger:4317".to_string(),
            ..TelemetryConfig::default()
        };
        let error = endpoint.validate().unwrap_err().to_string();
        assert!(error.contains("telemetry.otlp_endpoint"), "{error}");

        let error = parse("[telemetry]\nmetrics_listen = \"nine\"\n")
            .unwrap_err()
            .to_string();
        assert!(error.contains("metrics_listen"), "{error}");
    }
}
