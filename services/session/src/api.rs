//! The gRPC implementation of `weir.session.v1.SessionService`.
//!
//! Every RPC acts for the tenant the server's auth layer authenticated ([`Tenant::authenticated`]:
//! an API key, or the router's mesh token; never a bare `weir-tenant` header) and addresses the
//! session within it only, so another tenant's session is simply NOT_FOUND. Input
//! is validated first (INVALID_ARGUMENT naming the field, see [`crate::validate`]); store failures
//! become statuses through [`crate::error`].
//!
//! - `CreateSession`: an empty `session_id` gets a random one (`s_` + 32 hex digits); an empty
//!   model the configured default; a zero TTL the configured default.
//! - `AppendTurns`: see [`crate::store`] for `request_id` and `expected_last_seq`. An append
//!   that pushes the raw turns over the threshold starts a summary in the background
//!   ([`crate::summarizer`]); the response does not wait for it.
//! - `GetContext`: reads raw turns from the newest backwards, a growing chunk at a time, only
//!   until the budget is spent, so its cost depends on the budget and not on the length of the
//!   history; then picks the newest whole units that fit ([`crate::context`]). Token counts in
//!   the answer (each turn's, the summary's and the total) are in the tokenizer family of the
//!   model asked for, so they add up to `token_count`. With a `request_id` the session still
//!   remembers (its turns were appended under it), the newest turn read is the one before that
//!   request's first: a retried request gets the context its first attempt got.
//! - `ListTurns`: raw turns oldest first; `page_size` 0 means [`DEFAULT_PAGE_SIZE`], larger
//!   than [`MAX_PAGE_SIZE`] is treated as that; `page_token` is opaque (it encodes the last
//!   sequence number returned, so turns summarized away between pages are simply skipped).
//! - `DeleteSession` / `DeleteUserSessions`: see [`crate::store`]. `DeleteUserSessions` erases a
//!   user's whole history (a data-protection request), so it needs a key with the `admin` role.

use std::{collections::HashMap, sync::Arc, time::Duration};

use tonic::{Request, Response, Status};
use weir_mesh::{ApiError, catalog::Catalog, tenant::Tenant};
use weir_proto::session::{
    AppendTurnsRequest, AppendTurnsResponse, CreateSessionRequest, CreateSessionResponse,
    DeleteSessionRequest, DeleteSessionResponse, DeleteUserSessionsRequest,
    DeleteUserSessionsResponse, GetContextRequest, GetContextResponse, GetSessionRequest,
    GetSessionResponse, ListTurnsRequest, ListTurnsResponse, Session, Summary, Turn,
    session_service_server::{SessionService, SessionServiceServer},
};

use crate::{
    config::{Config, context_budget},
    context::{context_messages, select_suffix, summary_tokens, unit_start},
    error::api_error,
    ids,
    store::{AnyStore, AppendBatch, NewSession, SessionRecord, SessionRef, Store},
    summarizer::{Summarizer, SummaryStats},
    validate,
};

/// Turns per `ListTurns` page when the request says 0.
pub const DEFAULT_PAGE_SIZE: usize = 100;
/// Most turns per `ListTurns` page.
pub const MAX_PAGE_SIZE: usize = 1000;
/// First chunk of turns `GetContext` reads; each further chunk doubles, up to [`MAX_CHUNK`].
const FIRST_CHUNK: usize = 32;
/// Largest chunk `GetContext` reads at once.
const MAX_CHUNK: usize = 1024;
/// How often `GetContext` starts over when the session is re-created under it.
const MAX_READ_ATTEMPTS: usize = 3;

/// The session service. Cheap to clone.
#[derive(Debug, Clone)]
pub struct SessionApi {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    store: AnyStore,
    catalog: Arc<Catalog>,
    config: Config,
    families: Vec<String>,
    summarizer: Summarizer,
}

impl SessionApi {
    /// The service on `store`, summarizing with `summarizer`. `config` must have been validated
    /// against `catalog`.
    pub fn new(
        store: AnyStore,
        catalog: Arc<Catalog>,
        config: Config,
        summarizer: Summarizer,
    ) -> Self {
        let mut families: Vec<String> = catalog
            .iter()
            .map(|(_, spec)| spec.family().to_string())
            .collect();
        families.sort();
        families.dedup();
        Self {
            inner: Arc::new(Inner {
                store,
                catalog,
                config,
                families,
                summarizer,
            }),
        }
    }

    /// The store.
    pub fn store(&self) -> &AnyStore {
        &self.inner.store
    }

    /// Counters of the background summarizer in this process.
    pub fn summary_stats(&self) -> SummaryStats {
        self.inner.summarizer.stats()
    }

    /// The tonic service, to host on a server.
    pub fn into_service(self) -> SessionServiceServer<Self> {
        SessionServiceServer::new(self)
    }

    fn session_ref<T>(request: &Request<T>, id: &str) -> Result<SessionRef, ApiError> {
        let tenant = Tenant::authenticated(request.extensions())?;
        ids::check_session_id(id)?;
        Ok(SessionRef::new(tenant, id))
    }

    /// The catalog entry of `model`.
    fn model(&self, model: &str) -> Option<&weir_mesh::catalog::ModelSpec> {
        self.inner.catalog.get(model)
    }

    async fn create(
        &self,
        request: Request<CreateSessionRequest>,
    ) -> Result<CreateSessionResponse, ApiError> {
        let tenant = Tenant::authenticated(request.extensions())?;
        let body = request.into_inner();
        let config = &self.inner.config;
        let id = if body.session_id.is_empty() {
            ids::new_session_id()?
        } else {
            ids::check_session_id(&body.session_id)?;
            body.session_id.clone()
        };
        validate::user_id(&body.user_id, false)?;
        let model = if body.model.is_empty() {
            config.default_model.clone()
        } else {
            body.model.clone()
        };
        if model.is_empty() {
            return Err(ApiError::invalid_argument(
                "model",
                "required: name a model of the catalog (no [session] default_model is configured)",
            ));
        }
        let Some(spec) = self.model(&model) else {
            return Err(ApiError::invalid_argument(
                "model",
                format!("{model:?} is not a model of the catalog"),
            ));
        };
        let ttl = validate::ttl(body.ttl.as_ref(), config)?;
        validate::metadata(&body.metadata)?;
        let session = SessionRef::new(tenant, id);
        let record = self
            .inner
            .store
            .create(
                &session,
                NewSession {
                    user_id: body.user_id,
                    model,
                    family: spec.family().to_string(),
                    metadata: body.metadata.into_iter().collect(),
                    ttl,
                    now_ms: crate::now_ms(),
                    incarnation: ids::random_hex(8)?,
                },
            )
            .await
            .map_err(|e| api_error(e, &session.id))?;
        tracing::debug!(session = %session.id, tenant = %session.tenant, "session created");
        Ok(CreateSessionResponse {
            session: Some(session_proto(&session.id, &record)),
        })
    }

    async fn append(
        &self,
        request: Request<AppendTurnsRequest>,
    ) -> Result<AppendTurnsResponse, ApiError> {
        let session = Self::session_ref(&request, &request.get_ref().session_id)?;
        let body = request.into_inner();
        let config = &self.inner.config;
        validate::messages(&body.messages, config)?;
        validate::request_id(&body.request_id)?;
        if let Some(expected) = body.expected_last_seq
            && expected < 0
        {
            return Err(ApiError::invalid_argument(
                "expected_last_seq",
                format!("must not be negative, got {expected}"),
            ));
        }
        let fingerprint = ids::fingerprint(&body.messages);
        let now = crate::now_ms();
        let turns = body
            .messages
            .into_iter()
            .map(|message| Turn {
                message: Some(message),
                create_time: Some(timestamp(now)),
                ..Turn::default()
            })
            .collect();
        let batch = AppendBatch {
            request_id: body.request_id,
            fingerprint,
            expected_last_seq: body.expected_last_seq,
            now_ms: now,
            max_request_ids: config.max_request_ids,
            ..AppendBatch::count(turns, &self.inner.families)
        };
        let appended = self
            .inner
            .store
            .append(&session, batch)
            .await
            .map_err(|e| api_error(e, &session.id))?;
        if !appended.replayed {
            self.inner
                .summarizer
                .maybe_start(&session, &appended.session);
        }
        tracing::debug!(
            session = %session.id, first_seq = appended.first_seq, last_seq = appended.last_seq,
            replayed = appended.replayed, "turns appended"
        );
        Ok(AppendTurnsResponse {
            first_seq: appended.first_seq,
            last_seq: appended.last_seq,
            session: Some(session_proto(&session.id, &appended.session)),
        })
    }

    async fn context(
        &self,
        request: Request<GetContextRequest>,
    ) -> Result<GetContextResponse, ApiError> {
        let session = Self::session_ref(&request, &request.get_ref().session_id)?;
        let body = request.into_inner();
        if body.max_tokens < 0 {
            return Err(ApiError::invalid_argument(
                "max_tokens",
                format!("must not be negative, got {}", body.max_tokens),
            ));
        }
        if !body.model.is_empty() && self.model(&body.model).is_none() {
            return Err(ApiError::invalid_argument(
                "model",
                format!("{:?} is not a model of the catalog", body.model),
            ));
        }
        validate::request_id(&body.request_id)?;
        let mut attempt = 0;
        loop {
            attempt += 1;
            match self.read_context(&session, &body).await? {
                Some(context) => return Ok(context),
                None if attempt < MAX_READ_ATTEMPTS => continue,
                None => {
                    return Err(ApiError::new(
                        tonic::Code::Aborted,
                        "SESSION_CHANGED",
                        "the session changed while its context was read; retry",
                    ));
                }
            }
        }
    }

    /// One attempt at `GetContext`; `None` when the session changed under it.
    async fn read_context(
        &self,
        session: &SessionRef,
        body: &GetContextRequest,
    ) -> Result<Option<GetContextResponse>, ApiError> {
        let store = &self.inner.store;
        let error = |e| api_error(e, &session.id);
        // A request whose turns are stored already (a retry) gets the context from before them.
        let before = match body.request_id.as_str() {
            "" => None,
            id => store.request_first_seq(session, id).await.map_err(error)?,
        }
        .unwrap_or(i64::MAX);
        let mut limit = FIRST_CHUNK;
        let first = store
            .read_before(session, before, limit)
            .await
            .map_err(error)?;
        let snapshot = first.session;
        let newest = snapshot.last_seq.min(before.saturating_sub(1));
        let model = if body.model.is_empty() {
            snapshot.model.as_str()
        } else {
            body.model.as_str()
        };
        let spec = self
            .model(model)
            .or_else(|| self.model(&self.inner.config.default_model))
            .ok_or_else(|| ApiError::internal("the default model left the catalog"))?;
        let family = spec.family();
        let budget = match u64::try_from(body.max_tokens) {
            Ok(0) | Err(_) => context_budget(spec),
            Ok(tokens) => tokens,
        };

        // Read backwards until the turns read exceed the budget (and do not start inside a tool
        // unit) or the raw history is exhausted. `summary` is the newest one seen: a summary that
        // commits meanwhile replaces the raw turns it covers.
        let mut summary = snapshot.summary.clone();
        let mut turns: Vec<Turn> = first.turns;
        let mut costs: Vec<u64> = Vec::new();
        let recount = |turns: &mut [Turn]| {
            for turn in turns.iter_mut() {
                if snapshot.family != family {
                    turn.token_count = turn.message.as_ref().map_or(0, |m| {
                        i64::from(weir_mesh::tokens::count_message(family, m))
                    });
                }
            }
        };
        recount(&mut turns);
        costs.extend(
            turns
                .iter()
                .map(|t| u64::try_from(t.token_count).unwrap_or(0)),
        );
        loop {
            let covers = summary.as_ref().map_or(0, |s| s.covers_through_seq);
            let oldest = turns.first().map_or(newest + 1, |t| t.seq);
            let complete = oldest <= covers + 1;
            let read: u64 = costs.iter().sum();
            let inside_unit = unit_start(&turns, 0).is_none();
            if complete || (read > budget && !inside_unit) {
                break;
            }
            limit = (limit * 2).min(MAX_CHUNK);
            let page = store
                .read_before(session, oldest, limit)
                .await
                .map_err(error)?;
            if page.session.incarnation != snapshot.incarnation {
                return Ok(None);
            }
            if page.session.summary_version() != summary.as_ref().map_or(0, |s| s.version) {
                summary = page.session.summary.clone();
                let covers = summary.as_ref().map_or(0, |s| s.covers_through_seq);
                if covers >= snapshot.last_seq {
                    return Ok(None);
                }
                let keep = turns
                    .iter()
                    .position(|t| t.seq > covers)
                    .unwrap_or(turns.len());
                turns.drain(..keep);
                costs.drain(..keep);
            }
            let mut older = page.turns;
            if older.is_empty() {
                break;
            }
            recount(&mut older);
            costs.splice(
                0..0,
                older
                    .iter()
                    .map(|t| u64::try_from(t.token_count).unwrap_or(0)),
            );
            turns.splice(0..0, older);
        }

        let covers = summary.as_ref().map_or(0, |s| s.covers_through_seq);
        let complete = turns.first().is_none_or(|t| t.seq <= covers + 1);
        let summary = summary.map(|s| Summary {
            token_count: if s.family == family {
                s.token_count
            } else {
                summary_tokens(family, &s.text)
            },
            text: s.text,
            covers_through_seq: s.covers_through_seq,
            version: s.version,
            create_time: Some(timestamp(s.create_ms)),
        });
        let summary_cost = summary
            .as_ref()
            .map_or(0, |s| u64::try_from(s.token_count).unwrap_or(0));
        let (summary, turn_budget) = if summary_cost <= budget {
            (summary, budget - summary_cost)
        } else {
            // A summary larger than the whole budget is left out; the newest turns matter more.
            (None, budget)
        };
        let (start, used) = select_suffix(&turns, &costs, turn_budget, complete);
        let chosen: Vec<Turn> = turns.split_off(start);
        let raw = (newest - covers).max(0);
        let omitted = raw - i64::try_from(chosen.len()).unwrap_or(0);
        let token_count =
            summary.as_ref().map_or(0, |s| s.token_count) + i64::try_from(used).unwrap_or(i64::MAX);
        let mut context = GetContextResponse {
            summary,
            turns: chosen,
            token_count,
            omitted_turns: omitted.max(0),
            messages: Vec::new(),
        };
        context.messages = context_messages(&context);
        Ok(Some(context))
    }

    async fn list(
        &self,
        request: Request<ListTurnsRequest>,
    ) -> Result<ListTurnsResponse, ApiError> {
        let session = Self::session_ref(&request, &request.get_ref().session_id)?;
        let body = request.into_inner();
        let size = match usize::try_from(body.page_size) {
            Err(_) => {
                return Err(ApiError::invalid_argument(
                    "page_size",
                    format!("must not be negative, got {}", body.page_size),
                ));
            }
            Ok(0) => DEFAULT_PAGE_SIZE,
            Ok(size) => size.min(MAX_PAGE_SIZE),
        };
        let after = if body.page_token.is_empty() {
            0
        } else {
            ids::decode_page_token(&body.page_token).ok_or_else(|| {
                ApiError::invalid_argument(
                    "page_token",
                    "is not a next_page_token from a previous ListTurns response",
                )
            })?
        };
        let page = self
            .inner
            .store
            .read_after(&session, after, size)
            .await
            .map_err(|e| api_error(e, &session.id))?;
        let next_page_token = match page.turns.last() {
            Some(last) if last.seq < page.session.last_seq => ids::encode_page_token(last.seq),
            _ => String::new(),
        };
        Ok(ListTurnsResponse {
            turns: page.turns,
            next_page_token,
        })
    }
}

#[tonic::async_trait]
impl SessionService for SessionApi {
    async fn create_session(
        &self,
        request: Request<CreateSessionRequest>,
    ) -> Result<Response<CreateSessionResponse>, Status> {
        Ok(Response::new(self.create(request).await?))
    }

    async fn get_session(
        &self,
        request: Request<GetSessionRequest>,
    ) -> Result<Response<GetSessionResponse>, Status> {
        let session = Self::session_ref(&request, &request.get_ref().session_id)?;
        let record = self
            .inner
            .store
            .get(&session)
            .await
            .map_err(|e| api_error(e, &session.id))?;
        Ok(Response::new(GetSessionResponse {
            session: Some(session_proto(&session.id, &record)),
        }))
    }

    async fn append_turns(
        &self,
        request: Request<AppendTurnsRequest>,
    ) -> Result<Response<AppendTurnsResponse>, Status> {
        Ok(Response::new(self.append(request).await?))
    }

    async fn get_context(
        &self,
        request: Request<GetContextRequest>,
    ) -> Result<Response<GetContextResponse>, Status> {
        Ok(Response::new(self.context(request).await?))
    }

    async fn list_turns(
        &self,
        request: Request<ListTurnsRequest>,
    ) -> Result<Response<ListTurnsResponse>, Status> {
        Ok(Response::new(self.list(request).await?))
    }

    async fn delete_session(
        &self,
        request: Request<DeleteSessionRequest>,
    ) -> Result<Response<DeleteSessionResponse>, Status> {
        let session = Self::session_ref(&request, &request.get_ref().session_id)?;
        self.inner
            .store
            .delete(&session, self.inner.config.tombstone_ttl)
            .await
            .map_err(|e| api_error(e, &session.id))?;
        tracing::debug!(session = %session.id, tenant = %session.tenant, "session deleted");
        Ok(Response::new(DeleteSessionResponse {}))
    }

    async fn delete_user_sessions(
        &self,
        request: Request<DeleteUserSessionsRequest>,
    ) -> Result<Response<DeleteUserSessionsResponse>, Status> {
        let tenant = Tenant::authenticated(request.extensions())?;
        let user_id = request.into_inner().user_id;
        validate::user_id(&user_id, true)?;
        let deleted = self
            .inner
            .store
            .delete_user(&tenant, &user_id, self.inner.config.tombstone_ttl)
            .await
            .map_err(|e| api_error(e, &format!("of user {user_id}")))?;
        tracing::info!(tenant = %tenant, deleted, "user sessions deleted");
        Ok(Response::new(DeleteUserSessionsResponse {
            deleted_count: i64::try_from(deleted).unwrap_or(i64::MAX),
        }))
    }
}

/// The API view of a stored session.
pub fn session_proto(id: &str, record: &SessionRecord) -> Session {
    Session {
        id: id.to_string(),
        user_id: record.user_id.clone(),
        model: record.model.clone(),
        metadata: record
            .metadata
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect::<HashMap<_, _>>(),
        create_time: Some(timestamp(record.create_ms)),
        update_time: Some(timestamp(record.update_ms)),
        expire_time: Some(timestamp(record.update_ms.saturating_add(record.ttl_ms))),
        ttl: Some(duration(record.ttl_ms)),
        last_seq: record.last_seq,
        summary: record.summary.as_ref().map(|s| Summary {
            text: s.text.clone(),
            covers_through_seq: s.covers_through_seq,
            version: s.version,
            token_count: s.token_count,
            create_time: Some(timestamp(s.create_ms)),
        }),
    }
}

fn timestamp(ms: i64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: ms.div_euclid(1000),
        nanos: i32::try_from(ms.rem_euclid(1000) * 1_000_000).unwrap_or(0),
    }
}

fn duration(ms: i64) -> prost_types::Duration {
    let d = Duration::from_millis(u64::try_from(ms).unwrap_or(0));
    prost_types::Duration {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(d.subsec_nanos()).unwrap_or(0),
    }
}
