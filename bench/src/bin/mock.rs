//! The benchmark's OpenAI-compatible upstream: `POST /v1/chat/completions` (JSON, or SSE with
//! `--chunks` content chunks) and `GET /v1/models`, answered from memory in microseconds. It is
//! `weir-test-upstream` with recording off, so memory stays flat however long it runs, and with
//! `TCP_NODELAY` on, as real upstreams' servers have it, so streamed chunks are not held back.
//!
//! ```text
//! weir-bench-mock --listen 127.0.0.1:18080 --chunks 16
//! ```

use std::net::SocketAddr;

use clap::Parser;
use weir_test_upstream::{Options, Reply, Upstream};

#[derive(Parser)]
struct Args {
    /// Where to listen.
    #[arg(long, default_value = "127.0.0.1:18080")]
    listen: SocketAddr,
    /// Words in every answer: a streamed answer sends one content chunk per word.
    #[arg(long, default_value_t = 16)]
    chunks: usize,
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let content = (0..args.chunks)
        .map(|i| format!("tok{i}"))
        .collect::<Vec<_>>()
        .join(" ");
    let upstream = Upstream::start_with(
        Reply::answer(&content),
        Options {
            addr: args.listen,
            record: false,
            nodelay: true,
        },
    )
    .await?;
    println!("mock upstream at {}", upstream.base_url());
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    drop(upstream);
    Ok(())
}
