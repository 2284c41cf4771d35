//! Step 7 of the walk: sending a flagged answer to the review service.
//!
//! With `router.review.review_url` set and policies configured ([`crate::review`]), each model
//! call gets a `Gate` when some policy's early conditions (prompt, tenant, model, route,
//! sampling) hold for it. When the answer is complete, `conclude` judges it with the answer's
//! conditions (text, cost) and settles the request (step 6):
//!
//! - **No policy matches**: settled as usual; `review_status = NOT_REQUIRED`.
//! - **Blocking**: a review item is created (`CreateItem`, mode BLOCKING) and the answer is
//!   **withheld**: the caller gets `review_status = PENDING`, the item's id as `review_id`, the
//!   usage and the cost (the model ran, so the request is charged), and no text. The exchange is
//!   not appended to the session (its answer is not the caller's yet). If the item cannot be
//!   created, the request fails closed: UNAVAILABLE, reason [`REVIEW_UNAVAILABLE`]; the unreviewed
//!   text is never delivered (the cost is still committed).
//! - **Post-hoc**: the answer is delivered as usual, with `review_status = SAMPLED` and the
//!   `review_id` of the item created for the audit (mode POST_HOC). Post-hoc review never fails a
//!   request: if the item cannot be created, the answer still goes out, `review_id` empty, with a
//!   [`REVIEW_UNAVAILABLE`] notice.
//!
//! A stream whose gate has a blocking candidate is **held back** (`Gate::holds_back`): `start`
//! goes out at once, but its deltas are kept until the upstream `done`, then either all sent
//! before `done` (not flagged, or only post-hoc) or never (`done` with PENDING). See
//! [`crate::relay`]. Other streams are relayed token by token as always.
//!
//! The item carries the prompt sent to the model (session context included) as its
//! `conversation`, the answer as its `output`, the serving model, the matching policies' names as
//! `reasons`, their queue, priority and SLA, the request's labels, its trace id, and its
//! `request_id` as `source_request_id`. Its own idempotency key is derived from the request's
//! `request_id` (`router:<request_id>`, or `router:sha256:<hex>` when that is longer than the
//! review service takes), so a retried request that runs again finds the item its first try
//! created; without one a fresh UUID is used.
//!
//! `CreateItem` is a bookkeeping call (`crate::inference::Call::bookkeeping`: CRITICAL, backend
//! [`REVIEW_BACKEND`], the `[router.client.review]` stack). A blocking item is created within the
//! caller's deadline (the caller waits for it); a post-hoc one with the settlement's own deadline
//! ([`crate::settlement::SETTLE_TIMEOUT`]), as the audit copy must not depend on the caller.
//!
//! A caller gets a held answer only from the review service: `WatchItem` (or `GetItem`) on the
//! `review_id` shows the decision; after APPROVE the item's `output`, after EDIT
//! `decision.edited_content`. After REJECT the answer is never delivered. See docs/review.md.
//!
//! Metric: `weir_router_reviews_total{mode, outcome}`, `mode` `blocking` or `post_hoc`,
//! `outcome` `queued` (item created), `failed` (it could not be), or `released` (an answer that a
//! blocking policy could have held, a held-back stream for example, and that none flagged).

use std::{fmt, sync::Arc};

use weir_mesh::{
    ApiError,
    catalog::Catalog,
    client::{BoxedClient, ClientStack},
    deadline::Deadline,
    pricing::{self, Tier, Tokens},
};
use weir_proto::{
    common::{Message, Role, Usage},
    review::{CreateItemRequest, ReviewMode, review_service_client::ReviewServiceClient},
    router::{Notice, ReviewStatus},
};

use crate::{
    inference::Call,
    request::Completion,
    review::{AnswerFacts, Facts, Flag, Mode, Policies},
    settlement::{SETTLE_TIMEOUT, Settled, Settlement},
};

/// Backend key of the calls to the review service (its breaker, bulkhead and retry budget).
pub const REVIEW_BACKEND: &str = "review";
/// ErrorInfo reason of a blocking review that could not be queued (the answer is withheld), and
/// notice reason of a post-hoc one (the answer was delivered).
pub const REVIEW_UNAVAILABLE: &str = "REVIEW_UNAVAILABLE";

/// The router's client of the review service and its policies; off when `review_url` is empty.
/// Cheap to clone.
#[derive(Clone, Default)]
pub(crate) struct Reviews {
    inner: Option<Arc<Inner>>,
}

struct Inner {
    client: ReviewServiceClient<BoxedClient>,
    stack: ClientStack,
    policies: Policies,
    catalog: Arc<Catalog>,
}

impl fmt::Debug for Reviews {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Reviews")
            .field("enabled", &self.inner.is_some())
            .finish()
    }
}

impl Reviews {
    /// Review off.
    pub fn off() -> Self {
        Self::default()
    }

    /// Review through `stack` (a client stack over a channel to the review service) with
    /// `policies`, pricing answers with `catalog`.
    pub fn new(stack: ClientStack, policies: Policies, catalog: Arc<Catalog>) -> Self {
        Self {
            inner: Some(Arc::new(Inner {
                client: ReviewServiceClient::new(stack.service()),
                stack,
                policies,
                catalog,
            })),
        }
    }

    /// The client stack of the calls to the review service, when review is on.
    pub fn stack(&self) -> Option<&ClientStack> {
        self.inner.as_ref().map(|inner| &inner.stack)
    }

    /// The gate of one call to `model` for `completion` (by `tenant`, through route alias
    /// `route`, with `prompt` sent to the model); `None` when no policy can match it.
    pub fn gate(
        &self,
        call: &Call,
        completion: &Completion,
        tenant: &str,
        route: &str,
        model: &str,
        prompt: &[Message],
    ) -> Option<Gate> {
        let inner = self.inner.as_ref()?;
        if inner.policies.is_empty() {
            return None;
        }
        let text = crate::matching::prompt_text(&completion.messages);
        let facts = Facts {
            tenant,
            model,
            route,
            prompt: &text,
        };
        let candidates = inner.policies.candidates(&facts, &mut rand::random::<f64>);
        if candidates.is_empty() {
            return None;
        }
        Some(Gate {
            inner: Arc::clone(inner),
            call: call.clone(),
            item: CreateItemRequest {
                request_id: item_request_id(&completion.request_id),
                conversation: prompt.to_vec(),
                model: model.to_string(),
                labels: completion.labels.clone(),
                trace_id: weir_mesh::trace::current_trace_id().unwrap_or_default(),
                source_request_id: completion.request_id.clone(),
                ..CreateItemRequest::default()
            },
            candidates,
        })
    }
}

/// The longest `request_id` the review service accepts.
pub const MAX_ITEM_REQUEST_ID: usize = 128;

/// The idempotency key of the item of a request with `request_id` (see the module doc): the same
/// for every run of the same request, and never longer than the review service accepts
/// ([`MAX_ITEM_REQUEST_ID`]); a longer one is replaced by its SHA-256.
fn item_request_id(request_id: &str) -> String {
    if request_id.is_empty() {
        return uuid::Uuid::new_v4().to_string();
    }
    let derived = format!("router:{request_id}");
    if derived.len() <= MAX_ITEM_REQUEST_ID {
        return derived;
    }
    let digest = ring::digest::digest(&ring::digest::SHA256, request_id.as_bytes());
    let hex: String = digest.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    format!("router:sha256:{hex}")
}

/// One model call's review: the policies that may still match it and what its item would carry.
pub(crate) struct Gate {
    inner: Arc<Inner>,
    call: Call,
    /// Everything but the answer-dependent fields.
    item: CreateItemRequest,
    candidates: Vec<usize>,
}

impl fmt::Debug for Gate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Gate")
            .field("model", &self.item.model)
            .field("candidates", &self.candidates)
            .finish()
    }
}

impl Gate {
    /// Whether a blocking policy may match: a stream must then be held back until its end.
    pub fn holds_back(&self) -> bool {
        self.inner.policies.any_blocking(&self.candidates)
    }

    /// The answer's cost at the catalog price of its model; `None` without a price or usage.
    fn cost_micros(&self, usage: Option<&Usage>) -> Option<i64> {
        let price = pricing::price_of(&self.inner.catalog, &self.item.model).ok()?;
        pricing::cost_micros(price, &Tokens::from_usage(usage?), Tier::Standard).ok()
    }

    /// Creates the item for `flag` with `output`; its id.
    async fn create(mut self, flag: &Flag, output: Message) -> Result<String, ApiError> {
        let (mode, call) = match flag.mode {
            Mode::Blocking => (ReviewMode::Blocking, self.call.clone()),
            Mode::PostHoc => (
                ReviewMode::PostHoc,
                self.call.with_deadline(Deadline::after(SETTLE_TIMEOUT)),
            ),
        };
        self.item.mode = mode.into();
        self.item.queue = flag.queue.clone();
        self.item.reasons = flag.reasons.clone();
        self.item.priority = flag.priority;
        self.item.sla = flag
            .sla
            .and_then(|sla| prost_types::Duration::try_from(sla).ok());
        self.item.output = Some(output);
        let mut client = self.inner.client.clone();
        let created = client
            .create_item(call.bookkeeping(self.item, REVIEW_BACKEND))
            .await;
        let outcome = match created {
            Ok(response) => response
                .into_inner()
                .item
                .map(|item| item.id)
                .filter(|id| !id.is_empty())
                .ok_or_else(|| ApiError::internal("the review service returned no item id")),
            Err(status) => Err(ApiError::from_status(&status)),
        };
        count(flag.mode, if outcome.is_ok() { "queued" } else { "failed" });
        outcome
    }
}

fn count(mode: Mode, outcome: &'static str) {
    metrics::counter!("weir_router_reviews_total", "mode" => mode.as_str(), "outcome" => outcome)
        .increment(1);
}

/// The end of a served answer: its settlement and its review.
#[derive(Debug, Default)]
pub(crate) struct Concluded {
    /// The committed cost and the settlement's notices (and a post-hoc review's failure).
    pub settled: Settled,
    /// The review status for the answer.
    pub status: ReviewStatus,
    /// The review item's id, when one was created.
    pub review_id: String,
    /// Whether the answer's text must not reach the caller (held for a blocking review).
    pub withheld: bool,
}

/// Judges the answer `text` (with `usage`) at `gate`, creates its review item if a policy
/// matches, and settles the request, appending `answer` to the session unless it is withheld
/// (`None`: the streamed text). See the module documentation; `Err` only for a blocking review
/// that could not be queued.
pub(crate) async fn conclude(
    gate: Option<Gate>,
    mut settlement: Settlement,
    usage: Option<Usage>,
    text: &str,
    answer: Option<Message>,
) -> Result<Concluded, ApiError> {
    let not_required = |settled| Concluded {
        settled,
        status: ReviewStatus::NotRequired,
        ..Concluded::default()
    };
    let Some(gate) = gate else {
        return Ok(not_required(settlement.settle(usage, answer).await));
    };
    let flag = gate.inner.policies.judge(
        &gate.candidates,
        &AnswerFacts {
            text,
            cost_micros: gate.cost_micros(usage.as_ref()),
        },
    );
    if gate.holds_back() && flag.as_ref().is_none_or(|flag| flag.mode != Mode::Blocking) {
        count(Mode::Blocking, "released");
    }
    let Some(flag) = flag else {
        return Ok(not_required(settlement.settle(usage, answer).await));
    };
    if flag.mode == Mode::Blocking {
        settlement.withhold();
    }
    let output = Message {
        role: Role::Assistant.into(),
        content: text.to_string(),
        ..Message::default()
    };
    let (created, mut settled) =
        tokio::join!(gate.create(&flag, output), settlement.settle(usage, answer));
    let reasons = flag.reasons.join(", ");
    match (flag.mode, created) {
        (Mode::Blocking, Ok(review_id)) => Ok(Concluded {
            settled,
            status: ReviewStatus::Pending,
            review_id,
            withheld: true,
        }),
        (Mode::Blocking, Err(error)) => {
            tracing::warn!(
                reasons,
                reason = error.reason(),
                "review item not created; answer withheld"
            );
            Err(ApiError::unavailable(
                REVIEW_UNAVAILABLE,
                format!(
                    "the answer matched review policy {reasons} and could not be queued for \
                     review ({}: {}); it is withheld, never delivered unreviewed",
                    error.reason(),
                    error.message()
                ),
            ))
        }
        (Mode::PostHoc, Ok(review_id)) => Ok(Concluded {
            settled,
            status: ReviewStatus::Sampled,
            review_id,
            withheld: false,
        }),
        (Mode::PostHoc, Err(error)) => {
            tracing::warn!(
                reasons,
                reason = error.reason(),
                "post-hoc review item not created"
            );
            settled.notices.push(Notice {
                reason: REVIEW_UNAVAILABLE.to_string(),
                message: format!(
                    "this answer was selected for review by policy {reasons} but could not be \
                     queued ({}); it was delivered unreviewed",
                    error.reason()
                ),
            });
            Ok(Concluded {
                settled,
                status: ReviewStatus::Sampled,
                review_id: String::new(),
                withheld: false,
            })
        }
    }
}

/// A fake review service and gates to it, for the tests of the walk and the relay.
#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
pub(crate) mod testing {
    use std::sync::Mutex;

    use tonic::{Request, Response, Status};
    use weir_mesh::{config::Source, identity::MeshIdentity};
    use weir_proto::{
        review::{
            CreateItemResponse, ReviewItem,
            review_service_server::{ReviewService, ReviewServiceServer},
        },
        router::CompleteRequest,
    };

    use super::*;
    use crate::{Config, RouteTable, clients::bookkeeping_defaults};

    /// A review service whose `CreateItem` records its requests and answers `item-<n>`.
    #[derive(Clone, Default)]
    pub struct Fake {
        /// Every `CreateItem` request received.
        pub created: Arc<Mutex<Vec<CreateItemRequest>>>,
    }

    #[tonic::async_trait]
    impl ReviewService for Fake {
        async fn create_item(
            &self,
            request: Request<CreateItemRequest>,
        ) -> Result<Response<CreateItemResponse>, Status> {
            let mut created = self.created.lock().unwrap();
            created.push(request.into_inner());
            let item = ReviewItem {
                id: format!("item-{}", created.len()),
                ..ReviewItem::default()
            };
            Ok(Response::new(CreateItemResponse { item: Some(item) }))
        }
    }

    /// Serves `fake` on a local port; its URL.
    pub async fn serve(fake: Fake) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(ReviewServiceServer::new(fake))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        url
    }

    /// A URL nothing listens on.
    pub const DOWN: &str = "http://127.0.0.1:1";

    /// The gate of a request `prompt` (request_id `r-1`, tenant `acme`, route `auto`, model
    /// `sim-large`) under `policies` (`[[router.review.policies]]` tables) with the review service
    /// at `url`.
    pub fn gate(policies: &str, url: &str, prompt: &str) -> Option<Gate> {
        let toml = format!("[router.review]\nreview_url = \"{url}\"\n{policies}");
        let config: Config = Source::from_toml(&toml).section("router").unwrap();
        let catalog = Arc::new(Catalog::default());
        let routes = RouteTable::new(&config, catalog.clone()).unwrap();
        let policies = Policies::new(&config.review, &catalog, &routes).unwrap();
        let channel = weir_mesh::client::lazy_channel(url).unwrap();
        let stack = ClientStack::signed(channel, &bookkeeping_defaults(), MeshIdentity::disabled());
        let completion = Completion::from(CompleteRequest {
            model: "auto".to_string(),
            messages: vec![Message {
                role: Role::User.into(),
                content: prompt.to_string(),
                ..Message::default()
            }],
            request_id: "r-1".to_string(),
            ..CompleteRequest::default()
        });
        Reviews::new(stack, policies, catalog).gate(
            &Call::default(),
            &completion,
            "acme",
            "auto",
            "sim-large",
            &completion.messages,
        )
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn item_keys_derive_from_the_request_id() {
        assert_eq!(item_request_id("r-1"), "router:r-1");
        let fresh = item_request_id("");
        assert_eq!(fresh.len(), 36, "{fresh}");
        assert_ne!(item_request_id(""), fresh);
        let fits = "x".repeat(MAX_ITEM_REQUEST_ID - "router:".len());
        assert_eq!(item_request_id(&fits), format!("router:{fits}"));
        let long = "x".repeat(255);
        let hashed = item_request_id(&long);
        assert!(hashed.starts_with("router:sha256:"), "{hashed}");
        assert!(hashed.len() <= MAX_ITEM_REQUEST_ID);
        assert_eq!(
            item_request_id(&long),
            hashed,
            "the same request, the same item"
        );
        assert_ne!(item_request_id(&"y".repeat(255)), hashed);
    }

    use super::testing::{DOWN, Fake, gate, serve};

    const BLOCK_REFUNDS: &str = "[[router.review.policies]]\nname = \"refunds\"\nqueue = \"money\"\npriority = 3\n\
         sla = \"10m\"\nanswer_keywords = [\"refund\"]\n";
    const AUDIT_ALL: &str =
        "[[router.review.policies]]\nname = \"audit\"\nmode = \"post_hoc\"\nsample_rate = 1.0\n";

    async fn conclude_text(gate: Option<Gate>, text: &str) -> Result<Concluded, ApiError> {
        let answer = Message {
            role: Role::Assistant.into(),
            content: text.to_string(),
            ..Message::default()
        };
        conclude(gate, Settlement::none(), None, text, Some(answer)).await
    }

    #[tokio::test]
    async fn no_gate_or_no_match_is_not_required() {
        let concluded = conclude_text(None, "a refund").await.unwrap();
        assert_eq!(concluded.status, ReviewStatus::NotRequired);
        assert!(gate(BLOCK_REFUNDS, DOWN, "hi").unwrap().holds_back());
        assert!(
            gate(
                "[[router.review.policies]]\nname = \"x\"\ntenants = [\"other\"]\n",
                DOWN,
                "hi"
            )
            .is_none()
        );
        let concluded = conclude_text(gate(BLOCK_REFUNDS, DOWN, "hi"), "no money back")
            .await
            .unwrap();
        assert_eq!(concluded.status, ReviewStatus::NotRequired);
        assert!(!concluded.withheld);
        assert!(concluded.review_id.is_empty());
    }

    #[tokio::test]
    async fn a_blocking_match_is_queued_and_withheld() {
        let fake = Fake::default();
        let url = serve(fake.clone()).await;
        let concluded = conclude_text(gate(BLOCK_REFUNDS, &url, "money back?"), "A full REFUND.")
            .await
            .unwrap();
        assert_eq!(concluded.status, ReviewStatus::Pending);
        assert_eq!(concluded.review_id, "item-1");
        assert!(concluded.withheld);
        let created = fake.created.lock().unwrap().clone();
        let [item] = &created[..] else {
            panic!("one item expected: {created:?}");
        };
        assert_eq!(item.mode, i32::from(ReviewMode::Blocking));
        assert_eq!(item.queue, "money");
        assert_eq!(item.priority, 3);
        assert_eq!(item.sla.map(|sla| sla.seconds), Some(600));
        assert_eq!(item.reasons, ["refunds"]);
        assert_eq!(item.model, "sim-large");
        assert_eq!(item.output.as_ref().unwrap().content, "A full REFUND.");
        assert_eq!(item.conversation[0].content, "money back?");
        assert_eq!(item.request_id, "router:r-1");
        assert_eq!(item.source_request_id, "r-1");
    }

    #[tokio::test]
    async fn a_blocking_match_fails_closed_when_it_cannot_be_queued() {
        let error = conclude_text(gate(BLOCK_REFUNDS, DOWN, "hi"), "a refund")
            .await
            .unwrap_err();
        assert_eq!(error.code(), tonic::Code::Unavailable);
        assert_eq!(error.reason(), REVIEW_UNAVAILABLE);
        assert!(!error.message().contains("a refund"), "{}", error.message());
    }

    #[tokio::test]
    async fn a_post_hoc_match_is_delivered_and_queued_even_when_the_queue_is_down() {
        let fake = Fake::default();
        let url = serve(fake.clone()).await;
        let concluded = conclude_text(gate(AUDIT_ALL, &url, "hi"), "hello")
            .await
            .unwrap();
        assert_eq!(concluded.status, ReviewStatus::Sampled);
        assert_eq!(concluded.review_id, "item-1");
        assert!(!concluded.withheld);
        assert_eq!(
            fake.created.lock().unwrap()[0].mode,
            i32::from(ReviewMode::PostHoc)
        );

        let concluded = conclude_text(gate(AUDIT_ALL, DOWN, "hi"), "hello")
            .await
            .unwrap();
        assert_eq!(concluded.status, ReviewStatus::Sampled);
        assert!(concluded.review_id.is_empty());
        assert!(!concluded.withheld);
        assert_eq!(concluded.settled.notices[0].reason, REVIEW_UNAVAILABLE);
    }
}
