//! The reviewer console: a web page, served over HTTP on a port of its own, from which people
//! approve, reject or edit what the review queue holds.
//!
//! ```toml
//! [review.console]
//! listen = "127.0.0.1:50056"   # WEIR_REVIEW__CONSOLE__LISTEN; "" turns the console off
//! ```
//!
//! # Design
//!
//! - **No build step.** The page is three static files (`console/index.html`, `console.js`,
//!   `console.css` in this crate) compiled into the binary with `include_str!`: plain HTML, CSS
//!   and a JavaScript module, nothing to install or bundle.
//! - **A thin gateway, not a second API.** Every `/api/...` call of the page becomes one gRPC call
//!   to this review service's own `ReviewService`, carrying the reviewer's key as
//!   `authorization: Bearer <key>`. So the console authenticates, authorizes (the `reviewer`
//!   role), isolates tenants and audits exactly as the gRPC API does: a reviewer sees only their
//!   own tenant's queues because the service only ever answers for the key's tenant. The console
//!   keeps no state and stores no key; the page keeps the key in the tab's `sessionStorage`.
//! - **Live updates** are server-sent events (`GET /api/queues/{queue}/events`) relayed from
//!   `WatchQueue`; the page reads them with `fetch` (so it can send the key in a header, which
//!   `EventSource` cannot) and reconnects when the stream ends.
//!
//! # HTTP API (JSON)
//!
//! | Method and path | gRPC call |
//! |---|---|
//! | `GET /api/queues` | the configured queue names, once `WatchQueue` has shown the key is a reviewer's |
//! | `GET /api/queues/{queue}/items?state=pending` | `ListItems` |
//! | `GET /api/queues/{queue}/stats` | `GetQueueStats` |
//! | `GET /api/queues/{queue}/events` | `WatchQueue`, as `text/event-stream` |
//! | `GET /api/items/{id}` | `GetItem` |
//! | `POST /api/items/{id}/claim` `{queue, reviewer}` | `ClaimNext` for that item |
//! | `POST /api/items/{id}/renew` `{lease_id}` | `RenewLease` |
//! | `POST /api/items/{id}/decision` `{lease_id, verdict, edited_content, comment}` | `SubmitDecision` |
//!
//! Errors are `{"code": "FAILED_PRECONDITION", "reason": "LEASE_NOT_HELD", "message": ...}` with
//! the HTTP status that matches the gRPC code (401, 403, 404, 409, 400, 503, ...).

mod api;
mod json;

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};

use axum::{
    Router,
    http::header,
    response::{Html, IntoResponse},
    routing::{get, post},
};
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Default address of the console.
pub const DEFAULT_LISTEN: SocketAddr =
    SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::new(127, 0, 0, 1), 50056));

/// The page, its script and its style sheet.
const INDEX_HTML: &str = include_str!("../../console/index.html");
const CONSOLE_JS: &str = include_str!("../../console/console.js");
const CONSOLE_CSS: &str = include_str!("../../console/console.css");

/// The `[review.console]` table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ConsoleConfig {
    /// Address of the console's HTTP server (default [`DEFAULT_LISTEN`]); `""` turns it off.
    #[serde(with = "weir_mesh::config::optional_addr")]
    pub listen: Option<SocketAddr>,
}

impl Default for ConsoleConfig {
    fn default() -> Self {
        Self {
            listen: Some(DEFAULT_LISTEN),
        }
    }
}

/// What the console's handlers share.
#[derive(Debug, Clone)]
struct Console {
    /// The review service this console fronts.
    review:
        weir_proto::review::review_service_client::ReviewServiceClient<tonic::transport::Channel>,
    /// The queue names offered in the page's queue picker, `default` first.
    queues: Vec<String>,
}

/// Serves the console on `listener` until `shutdown` is cancelled. `review_url` is the review
/// service's gRPC address (`http://127.0.0.1:50055`); `queues` the queue names the page offers
/// (the configured ones; `default` is always offered).
pub async fn serve(
    listener: TcpListener,
    review_url: &str,
    queues: impl IntoIterator<Item = String>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let channel = weir_mesh::client::lazy_channel(review_url)
        .map_err(|error| std::io::Error::new(std::io::ErrorKind::InvalidInput, error))?;
    let mut names = vec!["default".to_string()];
    for queue in queues {
        if !names.contains(&queue) {
            names.push(queue);
        }
    }
    let console = Console {
        review: weir_proto::review::review_service_client::ReviewServiceClient::new(channel),
        queues: names,
    };
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, "serving the reviewer console");
    }
    axum::serve(listener, app(console))
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
}

fn app(console: Console) -> Router {
    Router::new()
        .route("/", get(|| async { Html(INDEX_HTML) }))
        .route(
            "/console.js",
            get(|| async { static_file("text/javascript; charset=utf-8", CONSOLE_JS) }),
        )
        .route(
            "/console.css",
            get(|| async { static_file("text/css; charset=utf-8", CONSOLE_CSS) }),
        )
        .route("/api/queues", get(api::queues))
        .route("/api/queues/{queue}/items", get(api::list_items))
        .route("/api/queues/{queue}/stats", get(api::stats))
        .route("/api/queues/{queue}/events", get(api::events))
        .route("/api/items/{id}", get(api::get_item))
        .route("/api/items/{id}/claim", post(api::claim))
        .route("/api/items/{id}/renew", post(api::renew))
        .route("/api/items/{id}/decision", post(api::decide))
        .with_state(console)
}

fn static_file(content_type: &'static str, body: &'static str) -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
}

/// The console's page weight: the bytes a browser downloads to open it (page, script, style
/// sheet; no images, fonts or libraries).
pub fn page_weight() -> usize {
    INDEX_HTML.len() + CONSOLE_JS.len() + CONSOLE_CSS.len()
}
