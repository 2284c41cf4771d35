//! The gRPC implementation of `weir.review.v1.ReviewService`.
//!
//! Every RPC acts for the tenant the server's auth layer authenticated ([`Tenant::authenticated`]:
//! an API key, or a peer's mesh token; never a bare `weir-tenant` header) and names items within
//! it only, so another tenant's item is simply NOT_FOUND. Input is validated first
//! (INVALID_ARGUMENT naming the field); store failures become statuses through [`crate::error`].
//!
//! - `CreateItem`: `output` is required; an empty `queue` is `default`; a zero `sla` is the
//!   queue's; a known `request_id` returns the item it created (nothing new, no new audit event).
//! - `ClaimNext`: `reviewer` is required; a zero `lease_duration` is `default_lease`, more than
//!   `max_lease` is refused. With `item_id` it claims that item, which must be PENDING in the
//!   queue (else FAILED_PRECONDITION `ITEM_NOT_PENDING`): what `weir review approve ID` uses.
//! - `SubmitDecision`: `VERDICT_UNSPECIFIED` counts as a rejection (fail closed), as the API
//!   says; `VERDICT_EDIT` needs `edited_content`.
//! - `WatchItem`: the current state, then the item after every change, until a terminal state.
//! - `GetItem`, `ListItems`, `WatchItem` and `CreateItem` answer a caller without the reviewer
//!   role with a blocking item's output withheld until it is approved ([`crate::reveal`]).
//!   The stream re-reads the item when the change feed names it (and every
//!   [`WATCH_POLL`] regardless), so two changes in quick succession may arrive as one.
//! - `WatchQueue`: every item of the queue after each change, from the moment of the call (list
//!   the queue first for its current contents). A watcher too slow to keep up misses changes
//!   (logged); it should list again.
//! - `ListItems` / `ListAuditEvents`: `page_token`s are opaque.
//!
//! Audit actors: the reviewer's name for claims, renewals and decisions, and the identity of the
//! authenticated key beside it (`alice (key:ops)`); for calls without a reviewer name (create,
//! cancel) the key (`key:ops`), `mesh` for a peer service, or `anonymous` in single-tenant dev
//! mode. The sweeper's actors are `system` (lease expiries) and `system:sla` (SLA actions).

use std::{collections::HashMap, pin::Pin, sync::Arc, time::Duration};

use tokio::sync::{broadcast, mpsc};
use tokio_stream::{Stream, wrappers::ReceiverStream};
use tonic::{Request, Response, Status};
use weir_mesh::{
    ApiError,
    auth::{ApiKeyId, Caller, Via},
    tenant::Tenant,
};
use weir_proto::review::{
    AuditEvent, CancelItemRequest, CancelItemResponse, ClaimNextRequest, ClaimNextResponse,
    CreateItemRequest, CreateItemResponse, Decision, GetItemRequest, GetItemResponse,
    GetQueueStatsRequest, GetQueueStatsResponse, Lease, ListAuditEventsRequest,
    ListAuditEventsResponse, ListItemsRequest, ListItemsResponse, RenewLeaseRequest,
    RenewLeaseResponse, ReviewItem, ReviewMode, ReviewerStats, SubmitDecisionRequest,
    SubmitDecisionResponse, Verdict, WatchItemRequest, WatchItemResponse, WatchQueueRequest,
    WatchQueueResponse, review_service_server::ReviewService,
};

use crate::{
    config::{self, Config, MAX_SLA},
    error::{api_error, edit_without_content},
    metrics, reveal,
    store::{
        AnyStore, Change, Claim, Decide, ItemRecord, LeaseRecord, NewItem, Store, actor, state,
    },
};

/// Items per `ListItems` page when the request says 0.
pub const DEFAULT_ITEMS_PAGE: usize = 50;
/// Most items per `ListItems` page.
pub const MAX_ITEMS_PAGE: usize = 500;
/// Events per `ListAuditEvents` page when the request says 0.
pub const DEFAULT_AUDIT_PAGE: usize = 100;
/// Most events per `ListAuditEvents` page.
pub const MAX_AUDIT_PAGE: usize = 1000;
/// A watched item is re-read at least this often, whatever the change feed says.
pub const WATCH_POLL: Duration = Duration::from_secs(2);
/// Longest id, reviewer name or request id accepted.
const MAX_NAME: usize = 128;
/// Longest comment, reason or edited text accepted.
const MAX_TEXT: usize = 64 * 1024;

/// The review service. Cheap to clone.
#[derive(Debug, Clone)]
pub struct ReviewApi {
    pub(crate) inner: Arc<Inner>,
}

#[derive(Debug)]
pub(crate) struct Inner {
    pub(crate) store: AnyStore,
    pub(crate) config: Config,
}

type Result<T> = std::result::Result<T, ApiError>;
type WatchStream<T> = Pin<Box<dyn Stream<Item = std::result::Result<T, Status>> + Send>>;

impl ReviewApi {
    /// The service on `store`; `config` must have been validated.
    pub fn new(store: AnyStore, config: Config) -> Self {
        Self {
            inner: Arc::new(Inner { store, config }),
        }
    }

    /// The store.
    pub fn store(&self) -> &AnyStore {
        &self.inner.store
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.inner.config
    }
}

/// Now, in Unix milliseconds.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

pub(crate) fn millis(duration: Duration) -> i64 {
    i64::try_from(duration.as_millis()).unwrap_or(i64::MAX)
}

/// `key:<id>` for a key holder, `mesh` for a peer service, empty in dev mode.
fn key_label(extensions: &http::Extensions) -> String {
    if let Some(key) = ApiKeyId::of(extensions) {
        return format!("key:{key}");
    }
    match Caller::of(extensions) {
        Some(caller) if caller.via == Via::MeshToken => "mesh".to_string(),
        _ => String::new(),
    }
}

fn queue_name(queue: &str, field: &str) -> Result<String> {
    if queue.is_empty() {
        return Ok(config::DEFAULT_QUEUE.to_string());
    }
    if config::valid_queue_name(queue) {
        Ok(queue.to_string())
    } else {
        Err(ApiError::invalid_argument(
            field,
            "queue names are 1 to 64 letters, digits, '-', '_' or '.'",
        ))
    }
}

fn item_id(id: &str, field: &str) -> Result<()> {
    let ok = !id.is_empty()
        && id.len() <= MAX_NAME
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_'));
    if ok {
        Ok(())
    } else {
        Err(ApiError::invalid_argument(
            field,
            "item ids are 1 to 128 letters, digits, '-' or '_'",
        ))
    }
}

/// A printable name (reviewer, request id): no spaces or control characters.
fn name(value: &str, field: &str, required: bool) -> Result<()> {
    if value.is_empty() {
        return if required {
            Err(ApiError::invalid_argument(field, "required"))
        } else {
            Ok(())
        };
    }
    if value.len() > MAX_NAME || value.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err(ApiError::invalid_argument(
            field,
            "at most 128 bytes, without spaces or control characters",
        ));
    }
    Ok(())
}

fn text(value: &str, field: &str) -> Result<()> {
    if value.len() > MAX_TEXT {
        return Err(ApiError::invalid_argument(field, "at most 64 KiB"));
    }
    Ok(())
}

/// A protobuf duration: `None` for zero/unset, an error for a negative one.
fn duration(value: Option<&prost_types::Duration>, field: &str) -> Result<Option<Duration>> {
    let Some(d) = value else { return Ok(None) };
    if d.seconds < 0 || d.nanos < 0 {
        return Err(ApiError::invalid_argument(field, "must not be negative"));
    }
    let d = Duration::new(
        u64::try_from(d.seconds).unwrap_or(0),
        u32::try_from(d.nanos).unwrap_or(0),
    );
    Ok((!d.is_zero()).then_some(d))
}

fn timestamp(ms: i64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: ms.div_euclid(1000),
        nanos: i32::try_from(ms.rem_euclid(1000) * 1_000_000).unwrap_or(0),
    }
}

fn proto_duration(ms: i64) -> prost_types::Duration {
    let ms = ms.max(0);
    prost_types::Duration {
        seconds: ms / 1000,
        nanos: i32::try_from((ms % 1000) * 1_000_000).unwrap_or(0),
    }
}

/// The API view of a stored item.
pub fn item_proto(record: &ItemRecord) -> ReviewItem {
    let mut item = record.body.clone();
    item.id = record.id.clone();
    item.queue = record.queue.clone();
    item.state = record.state;
    item.priority = record.priority;
    item.create_time = Some(timestamp(record.create_ms));
    item.sla_deadline_time = Some(timestamp(record.sla_ms));
    item.lease = record.lease.as_ref().map(|l| Lease {
        lease_id: l.lease_id.clone(),
        reviewer: l.reviewer.clone(),
        expire_time: Some(timestamp(l.expire_ms)),
    });
    item.decision = record.decision.as_ref().map(|d| Decision {
        verdict: d.verdict,
        edited_content: d.edited_content.clone(),
        reviewer: d.reviewer.clone(),
        comment: d.comment.clone(),
        decide_time: Some(timestamp(d.decide_ms)),
    });
    item
}

fn new_id(prefix: &str) -> String {
    format!("{prefix}{}", uuid::Uuid::new_v4().simple())
}

impl ReviewApi {
    fn lease_until(&self, requested: Option<&prost_types::Duration>, now: i64) -> Result<i64> {
        let config = &self.inner.config;
        let lease = duration(requested, "lease_duration")?.unwrap_or(config.default_lease);
        if lease > config.max_lease {
            return Err(ApiError::invalid_argument(
                "lease_duration",
                format!("at most {:?} (review.max_lease)", config.max_lease),
            ));
        }
        Ok(now.saturating_add(millis(lease)))
    }

    async fn create(&self, request: Request<CreateItemRequest>) -> Result<CreateItemResponse> {
        let tenant = Tenant::authenticated(request.extensions())?;
        let reviewer = reveal::may_review(request.extensions());
        let label = key_label(request.extensions());
        let body = request.into_inner();
        let queue = queue_name(&body.queue, "queue")?;
        name(&body.request_id, "request_id", false)?;
        if body.output.is_none() {
            return Err(ApiError::invalid_argument(
                "output",
                "required: the output under review",
            ));
        }
        let sla = match duration(body.sla.as_ref(), "sla")? {
            Some(sla) if sla > MAX_SLA => {
                return Err(ApiError::invalid_argument("sla", "at most 30 days"));
            }
            Some(sla) => sla,
            None => self.inner.config.sla(&queue),
        };
        let mode = match ReviewMode::try_from(body.mode) {
            Ok(ReviewMode::PostHoc) => ReviewMode::PostHoc,
            Ok(_) => ReviewMode::Blocking,
            Err(_) => return Err(ApiError::invalid_argument("mode", "unknown review mode")),
        };
        let now = now_ms();
        let content = ReviewItem {
            mode: mode as i32,
            conversation: body.conversation,
            output: body.output,
            model: body.model,
            reasons: body.reasons,
            labels: body.labels,
            trace_id: body.trace_id,
            source_request_id: body.source_request_id,
            ..ReviewItem::default()
        };
        let id = new_id("rv_");
        let (record, created) = self
            .inner
            .store
            .create(
                &tenant,
                NewItem {
                    request_id: body.request_id,
                    id: id.clone(),
                    queue,
                    priority: body.priority,
                    sla_ms: now.saturating_add(millis(sla)),
                    body: content,
                    actor: actor("", &label),
                    now_ms: now,
                },
            )
            .await
            .map_err(|e| api_error(e, &id))?;
        if created {
            metrics::item_created();
            tracing::debug!(item = %record.id, %tenant, queue = %record.queue, "review item created");
        }
        Ok(CreateItemResponse {
            item: Some(reveal::for_caller(item_proto(&record), reviewer)),
        })
    }

    async fn get(&self, request: Request<GetItemRequest>) -> Result<GetItemResponse> {
        let tenant = Tenant::authenticated(request.extensions())?;
        let reviewer = reveal::may_review(request.extensions());
        let id = &request.get_ref().item_id;
        item_id(id, "item_id")?;
        let record = self
            .inner
            .store
            .get(&tenant, id)
            .await
            .map_err(|e| api_error(e, id))?;
        Ok(GetItemResponse {
            item: Some(reveal::for_caller(item_proto(&record), reviewer)),
        })
    }

    async fn list(&self, request: Request<ListItemsRequest>) -> Result<ListItemsResponse> {
        let tenant = Tenant::authenticated(request.extensions())?;
        let reviewer = reveal::may_review(request.extensions());
        let body = request.into_inner();
        let queue = queue_name(&body.queue, "queue")?;
        if !(0..=state::EXPIRED).contains(&body.state) {
            return Err(ApiError::invalid_argument("state", "unknown item state"));
        }
        if body.page_size < 0 {
            return Err(ApiError::invalid_argument(
                "page_size",
                "must not be negative",
            ));
        }
        let limit = match usize::try_from(body.page_size).unwrap_or(0) {
            0 => DEFAULT_ITEMS_PAGE,
            n => n.min(MAX_ITEMS_PAGE),
        };
        let token_ok = body.page_token.len() <= 256
            && body
                .page_token
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b':'));
        if !token_ok {
            return Err(ApiError::invalid_argument("page_token", "not a page token"));
        }
        let page = self
            .inner
            .store
            .list(&tenant, &queue, body.state, &body.page_token, limit)
            .await
            .map_err(|e| api_error(e, ""))?;
        Ok(ListItemsResponse {
            items: page
                .items
                .iter()
                .map(|record| reveal::for_caller(item_proto(record), reviewer))
                .collect(),
            next_page_token: page.next,
        })
    }

    async fn claim(&self, request: Request<ClaimNextRequest>) -> Result<ClaimNextResponse> {
        let tenant = Tenant::authenticated(request.extensions())?;
        let label = key_label(request.extensions());
        let body = request.into_inner();
        let queue = queue_name(&body.queue, "queue")?;
        name(&body.reviewer, "reviewer", true)?;
        let wanted = if body.item_id.is_empty() {
            None
        } else {
            item_id(&body.item_id, "item_id")?;
            Some(body.item_id.clone())
        };
        let now = now_ms();
        let expire_ms = self.lease_until(body.lease_duration.as_ref(), now)?;
        let claimed = self
            .inner
            .store
            .claim(
                &tenant,
                Claim {
                    queue,
                    item_id: wanted,
                    lease: LeaseRecord {
                        lease_id: new_id("ls_"),
                        reviewer: body.reviewer.clone(),
                        expire_ms,
                    },
                    actor: actor(&body.reviewer, &label),
                    now_ms: now,
                },
            )
            .await
            .map_err(|e| api_error(e, &body.item_id))?;
        Ok(ClaimNextResponse {
            item: claimed.as_ref().map(item_proto),
        })
    }

    async fn renew(&self, request: Request<RenewLeaseRequest>) -> Result<RenewLeaseResponse> {
        let tenant = Tenant::authenticated(request.extensions())?;
        let label = key_label(request.extensions());
        let body = request.into_inner();
        item_id(&body.item_id, "item_id")?;
        name(&body.lease_id, "lease_id", true)?;
        let now = now_ms();
        let expire_ms = self.lease_until(body.lease_duration.as_ref(), now)?;
        let record = self
            .inner
            .store
            .renew(
                &tenant,
                &body.item_id,
                &body.lease_id,
                expire_ms,
                &label,
                now,
            )
            .await
            .map_err(|e| api_error(e, &body.item_id))?;
        Ok(RenewLeaseResponse {
            lease: item_proto(&record).lease,
        })
    }

    async fn decide(
        &self,
        request: Request<SubmitDecisionRequest>,
    ) -> Result<SubmitDecisionResponse> {
        let tenant = Tenant::authenticated(request.extensions())?;
        let label = key_label(request.extensions());
        let body = request.into_inner();
        item_id(&body.item_id, "item_id")?;
        name(&body.lease_id, "lease_id", true)?;
        let verdict = match Verdict::try_from(body.verdict) {
            Ok(Verdict::Approve) => Verdict::Approve,
            Ok(Verdict::Edit) => Verdict::Edit,
            // Not set means rejected (fail closed).
            Ok(Verdict::Reject | Verdict::Unspecified) => Verdict::Reject,
            Err(_) => return Err(ApiError::invalid_argument("verdict", "unknown verdict")),
        };
        if verdict == Verdict::Edit && body.edited_content.is_empty() {
            return Err(edit_without_content());
        }
        text(&body.edited_content, "edited_content")?;
        text(&body.comment, "comment")?;
        let record = self
            .inner
            .store
            .decide(
                &tenant,
                Decide {
                    item_id: body.item_id.clone(),
                    lease_id: body.lease_id,
                    verdict: verdict as i32,
                    edited_content: if verdict == Verdict::Edit {
                        body.edited_content
                    } else {
                        String::new()
                    },
                    comment: body.comment,
                    key_label: label,
                    now_ms: now_ms(),
                },
            )
            .await
            .map_err(|e| api_error(e, &body.item_id))?;
        metrics::decision(verdict);
        Ok(SubmitDecisionResponse {
            item: Some(item_proto(&record)),
        })
    }

    async fn cancel(&self, request: Request<CancelItemRequest>) -> Result<CancelItemResponse> {
        let tenant = Tenant::authenticated(request.extensions())?;
        let label = key_label(request.extensions());
        let body = request.into_inner();
        item_id(&body.item_id, "item_id")?;
        text(&body.reason, "reason")?;
        let (record, _) = self
            .inner
            .store
            .cancel(
                &tenant,
                &body.item_id,
                &body.reason,
                &actor("", &label),
                now_ms(),
            )
            .await
            .map_err(|e| api_error(e, &body.item_id))?;
        Ok(CancelItemResponse {
            item: Some(item_proto(&record)),
        })
    }

    async fn stats(&self, request: Request<GetQueueStatsRequest>) -> Result<GetQueueStatsResponse> {
        let tenant = Tenant::authenticated(request.extensions())?;
        let queue = queue_name(&request.get_ref().queue, "queue")?;
        let now = now_ms();
        let counts = self
            .inner
            .store
            .stats(&tenant, &queue, now)
            .await
            .map_err(|e| api_error(e, ""))?;
        let mut reviewers: Vec<ReviewerStats> = counts
            .reviewers
            .iter()
            .map(|(reviewer, (decided, approved))| ReviewerStats {
                reviewer: reviewer.clone(),
                decided: *decided,
                approved: *approved,
            })
            .collect();
        reviewers.sort_by(|a, b| b.decided.cmp(&a.decided).then(a.reviewer.cmp(&b.reviewer)));
        #[allow(clippy::cast_precision_loss)]
        let approval_rate = if counts.decided_total > 0 {
            counts.approved_total as f64 / counts.decided_total as f64
        } else {
            0.0
        };
        Ok(GetQueueStatsResponse {
            queue,
            pending: counts.pending,
            claimed: counts.claimed,
            sla_breached: counts.sla_breached,
            oldest_pending_age: Some(proto_duration(
                counts.oldest_pending_ms.map_or(0, |oldest| now - oldest),
            )),
            decided_last_hour: counts.decided_last_hour,
            reviewers,
            decided_total: counts.decided_total,
            approval_rate,
        })
    }

    async fn audit(
        &self,
        request: Request<ListAuditEventsRequest>,
    ) -> Result<ListAuditEventsResponse> {
        let tenant = Tenant::authenticated(request.extensions())?;
        let body = request.into_inner();
        let item = if body.item_id.is_empty() {
            None
        } else {
            item_id(&body.item_id, "item_id")?;
            Some(body.item_id.as_str())
        };
        if body.page_size < 0 {
            return Err(ApiError::invalid_argument(
                "page_size",
                "must not be negative",
            ));
        }
        let limit = match usize::try_from(body.page_size).unwrap_or(0) {
            0 => DEFAULT_AUDIT_PAGE,
            n => n.min(MAX_AUDIT_PAGE),
        };
        let offset = if body.page_token.is_empty() {
            0
        } else {
            body.page_token
                .parse::<u64>()
                .map_err(|_| ApiError::invalid_argument("page_token", "not a page token"))?
        };
        let (events, next) = self
            .inner
            .store
            .audit(&tenant, item, offset, limit)
            .await
            .map_err(|e| api_error(e, &body.item_id))?;
        Ok(ListAuditEventsResponse {
            events: events
                .into_iter()
                .map(|e| AuditEvent {
                    id: e.id,
                    item_id: e.item,
                    action: e.action,
                    actor: e.actor,
                    time: Some(timestamp(e.time)),
                    detail_json: e.detail,
                })
                .collect(),
            next_page_token: next.map(|n| n.to_string()).unwrap_or_default(),
        })
    }

    async fn watch_item(
        &self,
        request: Request<WatchItemRequest>,
    ) -> Result<WatchStream<WatchItemResponse>> {
        let tenant = Tenant::authenticated(request.extensions())?;
        let reviewer = reveal::may_review(request.extensions());
        let id = request.into_inner().item_id;
        item_id(&id, "item_id")?;
        // Subscribe before reading, so no change falls between the read and the feed.
        let changes = self.inner.store.subscribe().await;
        let first = self
            .inner
            .store
            .get(&tenant, &id)
            .await
            .map_err(|e| api_error(e, &id))?;
        let (tx, rx) = mpsc::channel(16);
        tokio::spawn(watch_item(
            self.inner.store.clone(),
            tenant,
            first,
            changes,
            tx,
            reviewer,
        ));
        Ok(Box::pin(ReceiverStream::new(rx)))
    }

    async fn watch_queue(
        &self,
        request: Request<WatchQueueRequest>,
    ) -> Result<WatchStream<WatchQueueResponse>> {
        let tenant = Tenant::authenticated(request.extensions())?;
        let queue = queue_name(&request.get_ref().queue, "queue")?;
        let changes = self.inner.store.subscribe().await;
        let (tx, rx) = mpsc::channel(64);
        tokio::spawn(watch_queue(
            self.inner.store.clone(),
            tenant,
            queue,
            changes,
            tx,
        ));
        Ok(Box::pin(ReceiverStream::new(rx)))
    }
}

type Sender<T> = mpsc::Sender<std::result::Result<T, Status>>;

async fn watch_item(
    store: AnyStore,
    tenant: Tenant,
    first: ItemRecord,
    mut changes: broadcast::Receiver<Change>,
    tx: Sender<WatchItemResponse>,
    reviewer: bool,
) {
    let id = first.id.clone();
    let mut version = first.version;
    let mut done = state::is_terminal(first.state);
    let send = |record: &ItemRecord| WatchItemResponse {
        item: Some(reveal::for_caller(item_proto(record), reviewer)),
    };
    if tx.send(Ok(send(&first))).await.is_err() || done {
        return;
    }
    let mut poll = tokio::time::interval(WATCH_POLL);
    poll.tick().await;
    while !done {
        let reread = tokio::select! {
            () = tx.closed() => return,
            change = changes.recv() => match change {
                Ok(Change::Item { tenant: t, id: i, .. }) => t == tenant.as_str() && i == id,
                Ok(Change::Resync) | Err(broadcast::error::RecvError::Lagged(_)) => true,
                Err(broadcast::error::RecvError::Closed) => return,
            },
            _ = poll.tick() => true,
        };
        if !reread {
            continue;
        }
        match store.get(&tenant, &id).await {
            Ok(record) if record.version > version => {
                version = record.version;
                done = state::is_terminal(record.state);
                if tx.send(Ok(send(&record))).await.is_err() {
                    return;
                }
            }
            Ok(_) => {}
            Err(error) => {
                let _ = tx.send(Err(api_error(error, &id).into())).await;
                return;
            }
        }
    }
}

async fn watch_queue(
    store: AnyStore,
    tenant: Tenant,
    queue: String,
    mut changes: broadcast::Receiver<Change>,
    tx: Sender<WatchQueueResponse>,
) {
    // The version last sent per item, so a change announced twice is sent once.
    let mut sent: HashMap<String, i64> = HashMap::new();
    loop {
        let (id, change_queue) = tokio::select! {
            () = tx.closed() => return,
            change = changes.recv() => match change {
                Ok(Change::Item { tenant: t, queue: q, id }) if t == tenant.as_str() => (id, q),
                Ok(_) => continue,
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    tracing::warn!(missed = n, %queue, "WatchQueue fell behind; changes missed");
                    continue;
                }
                Err(broadcast::error::RecvError::Closed) => return,
            },
        };
        if change_queue != queue {
            continue;
        }
        match store.get(&tenant, &id).await {
            Ok(record) => {
                if sent.get(&id).is_some_and(|v| *v >= record.version) {
                    continue;
                }
                if sent.len() > 10_000 {
                    sent.clear();
                }
                sent.insert(id, record.version);
                let response = WatchQueueResponse {
                    item: Some(item_proto(&record)),
                };
                if tx.send(Ok(response)).await.is_err() {
                    return;
                }
            }
            Err(crate::store::StoreError::NotFound) => {}
            Err(error) => {
                let _ = tx.send(Err(api_error(error, &id).into())).await;
                return;
            }
        }
    }
}

#[tonic::async_trait]
impl ReviewService for ReviewApi {
    async fn create_item(
        &self,
        request: Request<CreateItemRequest>,
    ) -> std::result::Result<Response<CreateItemResponse>, Status> {
        Ok(Response::new(self.create(request).await?))
    }

    async fn get_item(
        &self,
        request: Request<GetItemRequest>,
    ) -> std::result::Result<Response<GetItemResponse>, Status> {
        Ok(Response::new(self.get(request).await?))
    }

    async fn list_items(
        &self,
        request: Request<ListItemsRequest>,
    ) -> std::result::Result<Response<ListItemsResponse>, Status> {
        Ok(Response::new(self.list(request).await?))
    }

    async fn claim_next(
        &self,
        request: Request<ClaimNextRequest>,
    ) -> std::result::Result<Response<ClaimNextResponse>, Status> {
        Ok(Response::new(self.claim(request).await?))
    }

    async fn renew_lease(
        &self,
        request: Request<RenewLeaseRequest>,
    ) -> std::result::Result<Response<RenewLeaseResponse>, Status> {
        Ok(Response::new(self.renew(request).await?))
    }

    async fn submit_decision(
        &self,
        request: Request<SubmitDecisionRequest>,
    ) -> std::result::Result<Response<SubmitDecisionResponse>, Status> {
        Ok(Response::new(self.decide(request).await?))
    }

    async fn watch_item(
        &self,
        request: Request<WatchItemRequest>,
    ) -> std::result::Result<Response<WatchStream<WatchItemResponse>>, Status> {
        Ok(Response::new(ReviewApi::watch_item(self, request).await?))
    }

    async fn cancel_item(
        &self,
        request: Request<CancelItemRequest>,
    ) -> std::result::Result<Response<CancelItemResponse>, Status> {
        Ok(Response::new(self.cancel(request).await?))
    }

    async fn get_queue_stats(
        &self,
        request: Request<GetQueueStatsRequest>,
    ) -> std::result::Result<Response<GetQueueStatsResponse>, Status> {
        Ok(Response::new(self.stats(request).await?))
    }

    async fn list_audit_events(
        &self,
        request: Request<ListAuditEventsRequest>,
    ) -> std::result::Result<Response<ListAuditEventsResponse>, Status> {
        Ok(Response::new(self.audit(request).await?))
    }

    async fn watch_queue(
        &self,
        request: Request<WatchQueueRequest>,
    ) -> std::result::Result<Response<WatchStream<WatchQueueResponse>>, Status> {
        Ok(Response::new(ReviewApi::watch_queue(self, request).await?))
    }
}
