//! How the cost of `AppendTurns` and `GetContext` depends on the length of the history.
//!
//! Fills sessions with 10, 1,000 and 100,000 turns on a real Redis (`WEIR_TEST_REDIS_URL`, default
//! `redis://127.0.0.1:6379`), then times appends and GetContext calls over real gRPC on each.
//! Summarization is off, so every turn stays raw: GetContext must find the newest turns without
//! reading the whole history. Prints figures; asserts nothing.
//!
//! ```text
//! cargo run --release -p weir-session --example session_scale
//! SESSION_SCALE_NODELAY=1 cargo run --release -p weir-session --example session_scale
//! ```
//!
//! With `SESSION_SCALE_NODELAY` set, the service is hosted on a plain tonic server with
//! TCP_NODELAY instead of `weir_mesh::server::GrpcServer`, whose listener leaves Nagle's
//! algorithm on: a response of tens of kilobytes (a full context) then waits for the client's
//! delayed ACK, about 40 ms, which hides the service's own cost.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stdout)]

use std::{
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use tokio_util::sync::CancellationToken;
use weir_mesh::{catalog::Catalog, metadata::TENANT};
use weir_proto::{
    common::{Message, Role},
    session::{
        AppendTurnsRequest, CreateSessionRequest, GetContextRequest,
        session_service_client::SessionServiceClient,
    },
};

const SIZES: [usize; 3] = [10, 1_000, 100_000];
const SAMPLES: usize = 300;
const FILL_BATCH: usize = 1000;

fn request<T>(body: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(body);
    request
        .metadata_mut()
        .insert(TENANT, "bench".parse().unwrap());
    request
}

fn message(i: usize) -> Message {
    Message {
        role: if i.is_multiple_of(2) {
            Role::User
        } else {
            Role::Assistant
        }
        .into(),
        content: format!(
            "turn {i}: a message of about twenty tokens, like a short chat line about rivers and bridges."
        ),
        ..Message::default()
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index]
}

#[tokio::main]
async fn main() {
    let redis_url =
        std::env::var("WEIR_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let prefix = format!("wbench-{}", std::process::id());
    let config = weir_session::Config {
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        redis_url: Some(redis_url.clone()),
        key_prefix: prefix.clone(),
        summarize: false,
        default_ttl: Duration::from_secs(600),
        max_turns_per_append: FILL_BATCH,
        ..weir_session::Config::default()
    };
    let api = weir_session::api(
        &config,
        Arc::new(Catalog::default()),
        weir_mesh::identity::MeshIdentity::disabled(),
    )
    .await
    .unwrap();
    let listener = weir_mesh::server::bind(config.listen).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let shutdown = CancellationToken::new();
    if std::env::var_os("SESSION_SCALE_NODELAY").is_some() {
        // Diagnostic: the same service on a plain tonic server with TCP_NODELAY.
        let token = shutdown.clone();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(api.into_service())
                .serve_with_incoming_shutdown(
                    tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
                    async move { token.cancelled().await },
                ),
        );
    } else {
        tokio::spawn(weir_session::server_with(api).serve(listener, shutdown.clone()));
    }
    let mut client = SessionServiceClient::connect(format!("http://{addr}"))
        .await
        .unwrap();

    println!("session_scale: {SAMPLES} calls per figure, real gRPC + Redis at {redis_url}");
    println!("GetContext uses sim-small's own budget (7,168 tokens, about 280 of these turns)\n");
    println!(
        "{:>9}  {:>12} {:>12}  {:>14} {:>14}  {:>8}",
        "turns", "append p50", "append p99", "context p50", "context p99", "ctx turns"
    );
    for size in SIZES {
        let id = format!("scale-{size}");
        client
            .create_session(request(CreateSessionRequest {
                session_id: id.clone(),
                ..Default::default()
            }))
            .await
            .unwrap();
        let mut filled = 0;
        while filled < size {
            let n = FILL_BATCH.min(size - filled);
            client
                .append_turns(request(AppendTurnsRequest {
                    session_id: id.clone(),
                    messages: (filled..filled + n).map(message).collect(),
                    ..Default::default()
                }))
                .await
                .unwrap();
            filled += n;
        }

        let mut appends = Vec::with_capacity(SAMPLES);
        let mut contexts = Vec::with_capacity(SAMPLES);
        let mut context_turns = 0;
        for i in 0..SAMPLES {
            let start = Instant::now();
            client
                .append_turns(request(AppendTurnsRequest {
                    session_id: id.clone(),
                    messages: vec![message(size + i)],
                    request_id: format!("bench-{i}"),
                    ..Default::default()
                }))
                .await
                .unwrap();
            appends.push(start.elapsed());
            let start = Instant::now();
            let context = client
                .get_context(request(GetContextRequest {
                    session_id: id.clone(),
                    ..Default::default()
                }))
                .await
                .unwrap()
                .into_inner();
            contexts.push(start.elapsed());
            context_turns = context.turns.len();
        }
        appends.sort();
        contexts.sort();
        println!(
            "{:>9}  {:>12.2?} {:>12.2?}  {:>14.2?} {:>14.2?}  {:>8}",
            size,
            percentile(&appends, 0.5),
            percentile(&appends, 0.99),
            percentile(&contexts, 0.5),
            percentile(&contexts, 0.99),
            context_turns
        );
        client
            .delete_session(request(weir_proto::session::DeleteSessionRequest {
                session_id: id,
            }))
            .await
            .unwrap();
    }
    shutdown.cancel();
}
