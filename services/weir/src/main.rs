//! `weir`: run the Weir mesh, or talk to it.
//!
//! - `weir up`: every service in one process, each on its own port, with the simulated model and
//!   in-memory defaults: nothing to install, no config file needed. `weir up --replicas N`: N
//!   processes of each service on Redis, balanced over ([`weir::replicas`]).
//! - `weir serve <service>`: one service, as deployed in production.
//! - `weir chat "prompt"`: stream an answer from the router.
//! - `weir models`: list the models the inference service can call.
//! - `weir review list|show|approve|reject`: the human review queue.
//! - `weir jobs submit|get|watch|cancel|list`: asynchronous jobs.
//! - `weir batch submit|get|results|cancel`: batches from an OpenAI batch input file.
//! - `weir routes [canary resume|pause ROUTE]`: routes, canary state and cache hit rate; resume a
//!   rolled-back canary or pause one.
//! - `weir health <addr>`: whether a service serves (grpc.health.v1), for container health checks.

use std::{path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};
use weir::{
    batch_cli::{self, BatchCommand},
    call::RouterOptions,
    chat::{self, ChatOptions},
    jobs_cli::{self, JobsCommand},
    replicas,
    review_cli::{self, ReviewCommand, ReviewOptions},
    routes_cli::{self, RoutesCommand, RoutesOptions},
    stack::{self, Service, StackConfig},
};
use weir_mesh::telemetry;

/// Every call allocates its headers, frames and messages: with glibc's malloc, allocation and
/// free were about a third of a loaded mesh's CPU time; mimalloc's thread-local free lists cost a
/// fraction of that.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Debug, Parser)]
#[command(
    name = "weir",
    version,
    about = "Weir: a gRPC service mesh that keeps LLM calls working under load, faults and budgets"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run every service in one process (router, inference, session, budget, review), or with
    /// `--replicas N`, N processes of each, balanced over.
    Up {
        /// Config file (default: $WEIR_CONFIG, else built-in defaults).
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Run N `weir serve` processes of every service instead, each calling all N of the
        /// services it depends on (client-side load balancing); their state is in Redis.
        #[arg(long, value_name = "N")]
        replicas: Option<usize>,
        /// The Redis every replica shares (with --replicas).
        #[arg(long, value_name = "URL", default_value = replicas::DEFAULT_REDIS_URL, requires = "replicas")]
        redis: String,
    },
    /// Run one service, or several in one process (`weir serve router budget inference`), which
    /// then call each other in the process (`[mesh] in_process`).
    Serve {
        /// Which service(s).
        #[arg(required = true, num_args = 1..)]
        services: Vec<Service>,
        /// Config file (default: $WEIR_CONFIG, else built-in defaults).
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Send a prompt to the router and stream the answer.
    Chat {
        /// The prompt.
        prompt: String,
        /// Model name or route alias.
        #[arg(long, short, default_value = "auto")]
        model: String,
        /// Wait for the whole answer instead of streaming tokens.
        #[arg(long)]
        no_stream: bool,
        /// Optional system message.
        #[arg(long)]
        system: Option<String>,
        /// Most tokens to generate.
        #[arg(long)]
        max_tokens: Option<i32>,
        /// Router address.
        #[arg(
            long,
            env = "WEIR_ROUTER_URL",
            default_value = "http://127.0.0.1:50051"
        )]
        router: String,
        /// API key, sent as `authorization: Bearer <key>`.
        #[arg(long, env = "WEIR_API_KEY", hide_env_values = true)]
        api_key: Option<String>,
    },
    /// List the models the inference service can call.
    Models {
        /// Inference service address.
        #[arg(
            long,
            env = "WEIR_INFERENCE_URL",
            default_value = "http://127.0.0.1:50052"
        )]
        inference: String,
    },
    /// Asynchronous jobs: submit, get, watch, cancel or list them.
    Jobs {
        #[command(flatten)]
        options: RouterOptions,
        #[command(subcommand)]
        command: JobsCommand,
    },
    /// Batches: run an OpenAI batch input file, read its progress and results, cancel it.
    Batch {
        #[command(flatten)]
        options: RouterOptions,
        #[command(subcommand)]
        command: BatchCommand,
    },
    /// Ask a service whether it serves (grpc.health.v1); exit 0 when SERVING. For container
    /// health checks.
    Health {
        /// The service's address (host:port).
        #[arg(default_value = "127.0.0.1:50051")]
        addr: String,
        /// A service name (e.g. weir.router.v1.RouterService); empty asks for the whole server.
        #[arg(long, default_value = "")]
        service: String,
        /// How long to wait for the connection and the answer.
        #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
        timeout: std::time::Duration,
    },
    /// The human review queue: list, show, approve or reject items.
    Review {
        #[command(flatten)]
        options: ReviewOptions,
        #[command(subcommand)]
        command: ReviewCommand,
    },
    /// Each route with its models, canary weights and state, and the cache hit rate; `canary
    /// resume ROUTE` turns a rolled-back canary back on, `canary pause ROUTE` takes one off.
    /// Needs an `admin` key.
    Routes {
        #[command(flatten)]
        options: RoutesOptions,
        #[command(subcommand)]
        command: Option<RoutesCommand>,
    },
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Up {
            config,
            replicas: Some(replicas),
            redis,
        } => replicas::up(replicas, &redis, config.as_deref()).await,
        Command::Up { config, .. } => serve(config, &Service::ALL).await,
        Command::Serve { services, config } => serve(config, &services).await,
        Command::Chat {
            prompt,
            model,
            no_stream,
            system,
            max_tokens,
            router,
            api_key,
        } => {
            let options = ChatOptions {
                router,
                model,
                prompt,
                system,
                max_tokens,
                api_key,
                stream: !no_stream,
            };
            chat::run(options, &mut std::io::stdout().lock())
                .await
                .map_err(anyhow::Error::from)
        }
        Command::Models { inference } => list_models(&inference).await,
        Command::Health {
            addr,
            service,
            timeout,
        } => weir::health::check(&addr, &service, timeout)
            .await
            .map(|()| println!("SERVING")),
        Command::Jobs { options, command } => {
            jobs_cli::run(options, command, &mut std::io::stdout().lock()).await
        }
        Command::Batch { options, command } => {
            batch_cli::run(options, command, &mut std::io::stdout().lock()).await
        }
        Command::Review { options, command } => {
            review_cli::run(options, command, &mut std::io::stdout().lock()).await
        }
        Command::Routes { options, command } => {
            routes_cli::run(options, command, &mut std::io::stdout().lock()).await
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("weir: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(config: Option<PathBuf>, services: &[Service]) -> anyhow::Result<()> {
    let config = StackConfig::load(config.as_deref())?;
    // One service per process is `weir-<service>` in traces; `weir up` hosts them all as `weir`.
    let service_name = match services {
        [one] => format!("weir-{}", one.name()),
        _ => "weir".to_string(),
    };
    let telemetry = telemetry::init(&config.telemetry, &service_name)?;
    let shutdown = weir_mesh::shutdown::on_signal();
    let metrics = match config.telemetry.metrics_listen {
        Some(addr) => {
            let listener = tokio::net::TcpListener::bind(addr).await.map_err(|error| {
                anyhow::anyhow!(
                    "cannot listen on {addr} for /metrics: {error} (set [telemetry] \
                     metrics_listen in weir.toml or WEIR_TELEMETRY__METRICS_LISTEN; \"\" turns it off)"
                )
            })?;
            let local = listener.local_addr()?;
            let handle = telemetry.metrics().clone();
            let token = shutdown.clone();
            let task = tokio::spawn(telemetry::serve_metrics(listener, handle, token));
            Some((local, task))
        }
        None => None,
    };
    let running = stack::start(config, services, shutdown.clone()).await?;
    let mut banner = String::new();
    for (service, addr) in running.addrs() {
        banner.push_str(&format!("{service:<10} grpc://{addr}\n"));
    }
    if let Some(router) = running.worker_router() {
        let router = router.trim_start_matches("http://");
        // The router the job workers call.
        banner.push_str(&format!("{:<10} grpc://{router}\n", "worker"));
    }
    if let Some(addr) = running.openai_addr() {
        banner.push_str(&format!("{:<10} http://{addr}/v1\n", "openai"));
    }
    if let Some(addr) = running.console_addr() {
        banner.push_str(&format!(
            "{:<10} http://{addr}/   reviewer console\n",
            "console"
        ));
    }
    if let Some((addr, _)) = &metrics {
        banner.push_str(&format!("{:<10} http://{addr}/metrics\n", "metrics"));
    }
    banner.push_str(&match running.auth_mode() {
        weir_mesh::auth::AuthMode::ApiKeys => format!(
            "{:<10} API keys ([auth]): send `authorization: Bearer <key>`\n",
            "auth"
        ),
        _ => format!(
            "{:<10} none configured: every caller is the `default` tenant (dev mode)\n",
            "auth"
        ),
    });
    banner.push_str("Weir is up. Try: weir chat \"hello\"   (Ctrl-C to stop)\n");
    // The addresses are for whoever started us; a closed stdout (a supervisor that stopped
    // reading, `weir up | head -1`) must not take the services down, as `println!` would.
    {
        use std::io::Write;
        let mut stdout = std::io::stdout().lock();
        if stdout
            .write_all(banner.as_bytes())
            .and_then(|()| stdout.flush())
            .is_err()
        {
            tracing::warn!("stdout is closed; the services keep running");
        }
    }
    let result = running
        .wait()
        .await
        .map_err(|(service, error)| anyhow::anyhow!("{service}: {error}"));
    shutdown.cancel();
    if let Some((_, task)) = metrics {
        let _ = task.await;
    }
    telemetry.shutdown().await;
    result
}

async fn list_models(url: &str) -> anyhow::Result<()> {
    use weir_proto::inference::{
        ListModelsRequest, inference_service_client::InferenceServiceClient,
    };
    let mut client = InferenceServiceClient::new(weir_mesh::client::lazy_channel(url)?);
    let mut page_token = String::new();
    loop {
        let page = client
            .list_models(ListModelsRequest {
                page_size: 0,
                page_token: page_token.clone(),
            })
            .await
            .map_err(|status| weir_mesh::ApiError::from_status(&status))?
            .into_inner();
        for model in page.models {
            println!(
                "{:<24} {:<7} ctx {:>7}  {}",
                model.name, model.backend, model.context_window, model.description
            );
        }
        if page.next_page_token.is_empty() {
            return Ok(());
        }
        page_token = page.next_page_token;
    }
}
