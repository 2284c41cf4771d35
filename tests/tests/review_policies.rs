//! Review policies end to end: a real router → inference, and the router → a real review service
//! (on a real Redis), with users and reviewers calling over real sockets.
//!
//! The simulated model quotes the first words of the user's message, so a prompt saying "refund"
//! gets an answer that says "refund" too: what the answer rule below matches.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use tokio_stream::StreamExt;
use tonic::Code;
use weir::stack::Service;
use weir_proto::{
    review::{
        ClaimNextRequest, GetItemRequest, ItemState, ListItemsRequest, ReviewItem, ReviewMode,
        SubmitDecisionRequest, Verdict, WatchItemRequest,
    },
    router::{
        CompleteResponse, ReviewStatus, complete_stream_response::Event,
        router_service_client::RouterServiceClient,
    },
    session::{CreateSessionRequest, ListTurnsRequest},
};
use weir_router::{replay::IDEMPOTENT_REPLAY, review_gate::REVIEW_UNAVAILABLE};
use weir_tests::{
    Mesh, complete, complete_stream, delete_prefix, reason, redis_url, unique_prefix, with_key,
};

const USER_KEY: &str = "review-user-key-0123456789abcdef0123456";
const REVIEWER_KEY: &str = "review-reviewer-key-0123456789abcdef01";
const SECRET: &str = "review-policies-test-secret-0123456789ab";
/// The blocking policy's queue.
const HELD: &str = "held";
/// The post-hoc policy's queue.
const AUDIT: &str = "audit";

fn config(prefix: &str) -> String {
    format!(
        r#"
[mesh]
secret = "{SECRET}"

[[auth.api_keys]]
id = "user"
tenant = "acme"
key = "{USER_KEY}"

[[auth.api_keys]]
id = "reviewer"
tenant = "acme"
key = "{REVIEWER_KEY}"
roles = ["reviewer"]

[router.rate_limit]
enabled = false

[router.review]
review_url = "http://127.0.0.1:50055"   # replaced by the review service started with it

[[router.review.policies]]
name = "refunds"
queue = "{HELD}"
priority = 7
answer_keywords = ["refund"]

[[router.review.policies]]
name = "audit"
mode = "post_hoc"
queue = "{AUDIT}"
prompt_regex = "(?i)audit[- ]me"

[review]
redis_url = "{redis}"
key_prefix = "{prefix}"
"#,
        redis = redis_url(),
    )
}

/// A whole stack (router, inference, review on Redis) under a fresh key prefix.
struct Stack {
    mesh: Mesh,
    prefix: String,
}

impl Stack {
    async fn start() -> Self {
        let prefix = unique_prefix();
        let mesh = Mesh::start_services(
            &config(&prefix),
            &[
                Service::Inference,
                Service::Session,
                Service::Review,
                Service::Router,
            ],
        )
        .await;
        Self { mesh, prefix }
    }

    fn router(&self) -> RouterServiceClient<tonic::transport::Channel> {
        self.mesh.router()
    }

    async fn ask(&self, text: &str) -> CompleteResponse {
        self.router()
            .complete(with_key(complete("sim-large", text), USER_KEY))
            .await
            .unwrap()
            .into_inner()
    }

    /// The item `id` as `key` sees it.
    async fn item(&self, id: &str, key: &str) -> ReviewItem {
        let request = GetItemRequest {
            item_id: id.to_string(),
        };
        self.mesh
            .review()
            .get_item(with_key(request, key))
            .await
            .unwrap()
            .into_inner()
            .item
            .unwrap()
    }

    /// A reviewer claims the next item of `queue` and decides it; the claimed item.
    async fn decide(&self, queue: &str, verdict: Verdict, edited: &str) -> ReviewItem {
        let mut review = self.mesh.review();
        let claim = ClaimNextRequest {
            queue: queue.to_string(),
            reviewer: "alice".to_string(),
            ..ClaimNextRequest::default()
        };
        let item = review
            .claim_next(with_key(claim, REVIEWER_KEY))
            .await
            .unwrap()
            .into_inner()
            .item
            .expect("an item to claim");
        let decision = SubmitDecisionRequest {
            item_id: item.id.clone(),
            lease_id: item.lease.as_ref().unwrap().lease_id.clone(),
            verdict: verdict.into(),
            edited_content: edited.to_string(),
            comment: String::new(),
        };
        review
            .submit_decision(with_key(decision, REVIEWER_KEY))
            .await
            .unwrap();
        item
    }

    /// A user watching item `id`: the last item the watch shows (the stream ends once decided).
    fn watch(&self, id: &str) -> tokio::task::JoinHandle<ReviewItem> {
        let mut review = self.mesh.review();
        let request = WatchItemRequest {
            item_id: id.to_string(),
        };
        tokio::spawn(async move {
            let mut stream = review
                .watch_item(with_key(request, USER_KEY))
                .await
                .unwrap()
                .into_inner();
            let mut last = None;
            while let Some(item) = stream.next().await {
                let item = item.unwrap().item.unwrap();
                let terminal = item.state == i32::from(ItemState::Decided);
                last = Some(item);
                if terminal {
                    break;
                }
            }
            last.expect("the watch showed the item")
        })
    }

    async fn items(&self, queue: &str) -> Vec<ReviewItem> {
        let request = ListItemsRequest {
            queue: queue.to_string(),
            ..ListItemsRequest::default()
        };
        self.mesh
            .review()
            .list_items(with_key(request, REVIEWER_KEY))
            .await
            .unwrap()
            .into_inner()
            .items
    }

    async fn stop(self) {
        self.mesh.stop().await;
        delete_prefix(&self.prefix).await;
    }
}

/// Waits for `watch` to end, within a bound.
async fn watched(watch: tokio::task::JoinHandle<ReviewItem>) -> ReviewItem {
    tokio::time::timeout(Duration::from_secs(10), watch)
        .await
        .expect("the watch ends once the item is decided")
        .unwrap()
}

fn assert_pending(response: &CompleteResponse) {
    assert_eq!(
        response.review_status,
        i32::from(ReviewStatus::Pending),
        "{response:?}"
    );
    assert!(!response.review_id.is_empty());
    assert!(
        response
            .message
            .as_ref()
            .is_none_or(|m| m.content.is_empty()),
        "{response:?}"
    );
    let usage = response.usage.unwrap();
    assert!(usage.output_tokens > 0, "the model ran and is reported");
}

#[tokio::test]
async fn a_flagged_answer_is_held_then_delivered_to_a_watcher_on_approval() {
    let stack = Stack::start().await;
    let response = stack.ask("Can I get a refund please?").await;
    assert_pending(&response);
    let id = &response.review_id;

    // Before a decision the user cannot read the answer through the review service either.
    let item = stack.item(id, USER_KEY).await;
    assert_eq!(item.mode, i32::from(ReviewMode::Blocking));
    assert_eq!(item.reasons, ["refunds"]);
    assert_eq!(item.priority, 7);
    assert!(item.output.is_none(), "{item:?}");
    let watch = stack.watch(id);

    let claimed = stack.decide(HELD, Verdict::Approve, "").await;
    assert_eq!(&claimed.id, id);
    let answer = claimed.output.unwrap().content;
    assert!(
        answer.contains("refund"),
        "the reviewer sees the answer: {answer}"
    );
    assert_eq!(claimed.model, "sim-large");
    assert_eq!(
        claimed.conversation[0].content,
        "Can I get a refund please?"
    );

    let decided = watched(watch).await;
    assert_eq!(decided.state, i32::from(ItemState::Decided));
    assert_eq!(
        decided.output.unwrap().content,
        answer,
        "approved: the answer"
    );
    stack.stop().await;
}

#[tokio::test]
async fn a_rejected_answer_never_reaches_the_caller() {
    let stack = Stack::start().await;
    let response = stack.ask("I want a refund now").await;
    assert_pending(&response);
    let watch = stack.watch(&response.review_id);
    let claimed = stack.decide(HELD, Verdict::Reject, "").await;
    let answer = claimed.output.unwrap().content;

    let decided = watched(watch).await;
    assert_eq!(
        decided.decision.unwrap().verdict,
        i32::from(Verdict::Reject)
    );
    assert!(decided.output.is_none(), "rejected: no text for the user");
    let item = stack.item(&response.review_id, USER_KEY).await;
    assert!(item.output.is_none());
    assert!(!format!("{response:?}").contains(&answer));
    stack.stop().await;
}

#[tokio::test]
async fn an_edited_answer_delivers_the_edit() {
    let stack = Stack::start().await;
    let response = stack.ask("refund my order").await;
    assert_pending(&response);
    let watch = stack.watch(&response.review_id);
    stack
        .decide(HELD, Verdict::Edit, "We will look into your order.")
        .await;
    let decided = watched(watch).await;
    assert_eq!(
        decided.decision.unwrap().edited_content,
        "We will look into your order."
    );
    assert_eq!(
        decided.output.unwrap().content,
        "We will look into your order."
    );
    stack.stop().await;
}

#[tokio::test]
async fn post_hoc_delivers_at_once_and_queues_a_copy() {
    let stack = Stack::start().await;
    let response = stack.ask("audit me: what is a weir?").await;
    assert_eq!(response.review_status, i32::from(ReviewStatus::Sampled));
    let text = response.message.unwrap().content;
    assert!(!text.is_empty());
    let item = stack.item(&response.review_id, USER_KEY).await;
    assert_eq!(item.mode, i32::from(ReviewMode::PostHoc));
    assert_eq!(item.output.unwrap().content, text);
    let queued = stack.items(AUDIT).await;
    assert_eq!(queued.len(), 1);
    assert_eq!(queued[0].id, response.review_id);
    assert!(stack.items(HELD).await.is_empty());
    stack.stop().await;
}

#[tokio::test]
async fn a_held_answer_is_not_added_to_the_session() {
    let stack = Stack::start().await;
    let create = CreateSessionRequest {
        session_id: "s-held".to_string(),
        model: "sim-large".to_string(),
        ..CreateSessionRequest::default()
    };
    stack
        .mesh
        .session()
        .create_session(with_key(create, USER_KEY))
        .await
        .unwrap();
    for (text, status) in [
        ("a refund for my order", ReviewStatus::Pending),
        ("what is a weir?", ReviewStatus::NotRequired),
    ] {
        let mut request = complete("sim-large", text);
        request.session_id = "s-held".to_string();
        let response = stack
            .router()
            .complete(with_key(request, USER_KEY))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(response.review_status, i32::from(status), "{response:?}");
    }
    let list = ListTurnsRequest {
        session_id: "s-held".to_string(),
        page_size: 100,
        ..ListTurnsRequest::default()
    };
    let turns = stack
        .mesh
        .session()
        .list_turns(with_key(list, USER_KEY))
        .await
        .unwrap()
        .into_inner()
        .turns;
    let texts: Vec<String> = turns
        .iter()
        .map(|turn| turn.message.as_ref().unwrap().content.clone())
        .collect();
    assert_eq!(texts.len(), 2, "only the delivered exchange: {texts:?}");
    assert_eq!(texts[0], "what is a weir?");
    assert!(!texts.iter().any(|t| t.contains("refund")), "{texts:?}");
    stack.stop().await;
}

#[tokio::test]
async fn an_unflagged_request_is_untouched() {
    let stack = Stack::start().await;
    let response = stack.ask("what is a weir?").await;
    assert_eq!(response.review_status, i32::from(ReviewStatus::NotRequired));
    assert!(response.review_id.is_empty());
    assert!(response.message.unwrap().content.contains("weir"));
    assert!(stack.items(HELD).await.is_empty());
    assert!(stack.items(AUDIT).await.is_empty());
    stack.stop().await;
}

#[tokio::test]
async fn a_blocking_stream_relays_no_delta_before_the_decision() {
    let stack = Stack::start().await;
    let mut router = stack.router();
    let events: Vec<Event> = router
        .complete_stream(with_key(
            complete_stream("sim-large", "refund, please"),
            USER_KEY,
        ))
        .await
        .unwrap()
        .into_inner()
        .map(|item| item.unwrap().event.unwrap())
        .collect()
        .await;
    assert_eq!(events.len(), 2, "start and done only: {events:?}");
    assert!(matches!(events[0], Event::Start(_)));
    let Event::Done(done) = &events[1] else {
        panic!("expected done: {events:?}");
    };
    assert_eq!(done.review_status, i32::from(ReviewStatus::Pending));
    let item = stack.item(&done.review_id, REVIEWER_KEY).await;
    assert!(item.output.unwrap().content.contains("refund"));

    // Held back too (the answer rule could match), but not flagged: every delta, then done.
    let events: Vec<Event> = router
        .complete_stream(with_key(
            complete_stream("sim-large", "hello there"),
            USER_KEY,
        ))
        .await
        .unwrap()
        .into_inner()
        .map(|item| item.unwrap().event.unwrap())
        .collect()
        .await;
    let deltas = events
        .iter()
        .filter(|e| matches!(e, Event::Delta(_)))
        .count();
    assert!(deltas > 1, "{events:?}");
    let Some(Event::Done(done)) = events.last() else {
        panic!("expected done: {events:?}");
    };
    assert_eq!(done.review_status, i32::from(ReviewStatus::NotRequired));
    stack.stop().await;
}

#[tokio::test]
async fn a_retry_replays_the_same_review_outcome() {
    let stack = Stack::start().await;
    let mut request = complete("sim-large", "refund?");
    request.request_id = "review-replay-1".to_string();
    let first = stack
        .router()
        .complete(with_key(request.clone(), USER_KEY))
        .await
        .unwrap()
        .into_inner();
    assert_pending(&first);
    let again = stack
        .router()
        .complete(with_key(request, USER_KEY))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.review_id, first.review_id);
    assert_eq!(again.review_status, first.review_status);
    assert!(again.message.is_none_or(|m| m.content.is_empty()));
    assert!(again.notices.iter().any(|n| n.reason == IDEMPOTENT_REPLAY));

    let mut stream_request = complete_stream("sim-large", "refund?");
    stream_request.request_id = "review-replay-2".to_string();
    let mut done_ids = Vec::new();
    for _ in 0..2 {
        let events: Vec<Event> = stack
            .router()
            .complete_stream(with_key(stream_request.clone(), USER_KEY))
            .await
            .unwrap()
            .into_inner()
            .map(|item| item.unwrap().event.unwrap())
            .collect()
            .await;
        assert!(
            !events.iter().any(|e| matches!(e, Event::Delta(_))),
            "{events:?}"
        );
        let Some(Event::Done(done)) = events.last() else {
            panic!("expected done: {events:?}");
        };
        done_ids.push(done.review_id.clone());
    }
    assert_eq!(done_ids[0], done_ids[1]);
    assert_eq!(
        stack.items(HELD).await.len(),
        2,
        "one item per request, none per replay"
    );
    stack.stop().await;
}

#[tokio::test]
async fn a_review_service_that_cannot_answer_fails_blocking_closed_and_post_hoc_open() {
    let prefix = unique_prefix();
    // No review service is started: the router's review_url stays a closed port.
    let mesh = Mesh::start_with(
        &config(&prefix),
        &[Service::Inference, Service::Router],
        |config| config.router.review.review_url = "http://127.0.0.1:1".to_string(),
    )
    .await;
    let mut router = mesh.router();
    let status = router
        .complete(with_key(complete("sim-large", "refund please"), USER_KEY))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert_eq!(reason(&status), REVIEW_UNAVAILABLE);

    let response = router
        .complete(with_key(complete("sim-large", "audit me"), USER_KEY))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(response.review_status, i32::from(ReviewStatus::Sampled));
    assert!(response.review_id.is_empty());
    assert!(!response.message.unwrap().content.is_empty());
    assert!(
        response
            .notices
            .iter()
            .any(|n| n.reason == REVIEW_UNAVAILABLE)
    );

    let mut stream = router
        .complete_stream(with_key(
            complete_stream("sim-large", "refund please"),
            USER_KEY,
        ))
        .await
        .unwrap()
        .into_inner();
    let mut deltas = 0;
    let mut error = None;
    while let Some(item) = stream.next().await {
        match item {
            Ok(response) if matches!(response.event, Some(Event::Delta(_))) => deltas += 1,
            Ok(_) => {}
            Err(status) => error = Some(status),
        }
    }
    assert_eq!(deltas, 0, "no unreviewed text");
    assert_eq!(
        reason(&error.expect("the stream fails")),
        REVIEW_UNAVAILABLE
    );
    mesh.stop().await;
}
