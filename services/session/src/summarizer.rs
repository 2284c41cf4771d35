//! Summarization: compressing the oldest turns of a long session into a summary, off the request
//! path and without ever losing a turn.
//!
//! # When
//!
//! After every append that added turns, if the session's raw turns hold more than
//! [`Config::threshold_tokens`] (by default 80% of the context budget of the session's model), a
//! task is spawned; the append does not wait for it. At most one runs per session at a time: an
//! in-process set skips sessions that already have a task here, and a lock in the store (a Redis
//! key with an expiry, so a crashed replica cannot hold it forever) keeps other replicas out.
//!
//! # What
//!
//! A round summarizes the oldest raw turns, whole units at a time (a tool call with its results,
//! see [`crate::context`]), until the newest [`Config::keep_tokens`] (by default half the
//! threshold) are all that stay raw, and never the newest unit. The input is bounded by the
//! summary model's context window, so a long backlog is worked off over several rounds (at most
//! [`MAX_ROUNDS`] per task; the next append starts another). The inference service's `Generate`
//! gets a system instruction ([`INSTRUCTION`]) and one user message with the previous summary and
//! a transcript of the turns; the answer becomes the new summary.
//!
//! # Commit
//!
//! The summary `{text, covers_through_seq, version}` is committed by compare-and-swap on the
//! version read at the start of the round, and the raw turns it covers are dropped in the same
//! atomic step. If the session was deleted, expired or re-created meanwhile, or another summary
//! committed, the commit changes nothing. If the call to the inference service fails, nothing is
//! written at all, so the history is unchanged and the next append tries again. Why CAS rather
//! than the lock alone: a lock with an expiry can be lost by a slow holder, and the CAS makes a
//! stale summary harmless however that happens.
//!
//! Logs name the session and the outcome, never message or summary text.

use std::{
    collections::HashSet,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use tracing::Instrument;
use weir_mesh::{
    backend::BackendKey,
    catalog::{Catalog, ModelSpec},
    client::{BoxedClient, ClientConfig, ClientStack},
    identity::MeshIdentity,
    metadata::TENANT,
    tokens,
};
use weir_proto::{
    common::{GenerationParams, Message, Role},
    inference::{GenerateRequest, inference_service_client::InferenceServiceClient},
    session::Turn,
};

use crate::{
    config::Config,
    context::{summary_tokens, unit_end},
    ids::random_hex,
    store::{AnyStore, SessionRecord, SessionRef, Store, StoreError, SummaryCommit},
};

/// Most summary rounds per task.
pub const MAX_ROUNDS: u32 = 4;
/// Turns read from the store per request while gathering a round's input.
const CHUNK: usize = 128;
/// Tokens left free in the summary model's window for counting slack.
const PROMPT_MARGIN: u64 = 16;

/// What the summary model is asked to do.
pub const INSTRUCTION: &str = "You keep a running summary of a conversation between a user and \
an assistant. Rewrite the summary so that it also covers the new turns below. Keep the facts, \
names, numbers, decisions, open questions and tool results that later turns may need. Write plain \
prose in the third person, without preamble.";

/// Counters of summarization outcomes in this process.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SummaryStats {
    /// Tasks started.
    pub started: u64,
    /// Summaries committed.
    pub committed: u64,
    /// Commits that lost the compare-and-swap (another summary committed first).
    pub conflicts: u64,
    /// Rounds that found the session deleted, expired or re-created.
    pub gone: u64,
    /// Rounds that failed (inference or store errors); the history is unchanged.
    pub failed: u64,
    /// Tasks that found the lock held by another task.
    pub busy: u64,
    /// Tasks running now.
    pub running: u64,
}

#[derive(Debug, Default)]
struct Counters {
    started: AtomicU64,
    committed: AtomicU64,
    conflicts: AtomicU64,
    gone: AtomicU64,
    failed: AtomicU64,
    busy: AtomicU64,
}

/// Starts and runs summarization tasks. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Summarizer {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    store: AnyStore,
    client: InferenceServiceClient<BoxedClient>,
    catalog: Arc<Catalog>,
    config: Config,
    running: Mutex<HashSet<SessionRef>>,
    counters: Counters,
}

/// Removes a session from the running set when its task ends, however it ends.
struct Running {
    inner: Arc<Inner>,
    session: SessionRef,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.inner
            .running
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&self.session);
    }
}

/// Why a round failed.
#[derive(Debug, thiserror::Error)]
enum RoundError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("inference: {0}")]
    Inference(String),
}

/// How a round ended.
enum Round {
    Committed { still_over: bool },
    NothingToDo,
}

impl Summarizer {
    /// A summarizer that calls the inference service on `channel`, through the mesh's client
    /// stack with its defaults (trace context, deadline, retry with a budget, breaker and bulkhead
    /// per summary model), each call signed by `identity` so inference believes its tenant.
    pub fn new(
        store: AnyStore,
        channel: impl Into<weir_mesh::local::Transport>,
        identity: MeshIdentity,
        catalog: Arc<Catalog>,
        config: Config,
    ) -> Self {
        let stack = ClientStack::signed(channel, &ClientConfig::default(), identity);
        Self {
            inner: Arc::new(Inner {
                store,
                client: InferenceServiceClient::new(stack.service()),
                catalog,
                config,
                running: Mutex::new(HashSet::new()),
                counters: Counters::default(),
            }),
        }
    }

    /// The counters.
    pub fn stats(&self) -> SummaryStats {
        let c = &self.inner.counters;
        let running = self
            .inner
            .running
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len();
        SummaryStats {
            started: c.started.load(Ordering::Relaxed),
            committed: c.committed.load(Ordering::Relaxed),
            conflicts: c.conflicts.load(Ordering::Relaxed),
            gone: c.gone.load(Ordering::Relaxed),
            failed: c.failed.load(Ordering::Relaxed),
            busy: c.busy.load(Ordering::Relaxed),
            running: u64::try_from(running).unwrap_or(u64::MAX),
        }
    }

    /// The spec of the session's model (the default model's if it left the catalog).
    fn model_spec(&self, model: &str) -> Option<&ModelSpec> {
        let catalog = &self.inner.catalog;
        catalog
            .get(model)
            .or_else(|| catalog.get(&self.inner.config.default_model))
    }

    /// Spawns a summarization task for `session` if its raw turns are over the threshold and no
    /// task runs for it in this process. Returns whether one was spawned.
    pub fn maybe_start(&self, session: &SessionRef, record: &SessionRecord) -> bool {
        let config = &self.inner.config;
        if !config.summarize {
            return false;
        }
        let Some(spec) = self.model_spec(&record.model) else {
            return false;
        };
        if u64::try_from(record.raw_tokens).unwrap_or(0) <= config.threshold_tokens(spec) {
            return false;
        }
        {
            let mut running = self
                .inner
                .running
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if !running.insert(session.clone()) {
                return false;
            }
        }
        self.inner.counters.started.fetch_add(1, Ordering::Relaxed);
        let guard = Running {
            inner: self.inner.clone(),
            session: session.clone(),
        };
        let this = self.clone();
        // Its own trace, linked to the append that started it: the summary outlives that call.
        let span = tracing::info_span!(
            parent: None,
            "session.summarize",
            otel.name = "session.summarize",
            weir.session = %session.id,
        );
        span.follows_from(tracing::Span::current());
        tokio::spawn(
            async move {
                let session = guard.session.clone();
                this.run(&session).await;
                drop(guard);
            }
            .instrument(span),
        );
        true
    }

    async fn run(&self, session: &SessionRef) {
        let inner = &self.inner;
        let token = match random_hex(16) {
            Ok(token) => token,
            Err(error) => {
                tracing::error!(session = %session.id, %error, "summarizer: no lock token");
                return;
            }
        };
        let lock_ttl = (inner.config.summary_timeout + Duration::from_secs(5)) * MAX_ROUNDS;
        match inner.store.try_lock(session, &token, lock_ttl).await {
            Ok(true) => {}
            Ok(false) => {
                inner.counters.busy.fetch_add(1, Ordering::Relaxed);
                return;
            }
            Err(StoreError::NotFound) => {
                inner.counters.gone.fetch_add(1, Ordering::Relaxed);
                return;
            }
            Err(error) => {
                inner.counters.failed.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(session = %session.id, %error, "summarizer: cannot take the lock");
                return;
            }
        }
        for _ in 0..MAX_ROUNDS {
            match self.round(session).await {
                Ok(Round::Committed { still_over: true }) => continue,
                Ok(Round::Committed { still_over: false } | Round::NothingToDo) => break,
                Err(RoundError::Store(StoreError::NotFound)) => {
                    inner.counters.gone.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(session = %session.id, "summarizer: session is gone");
                    break;
                }
                Err(RoundError::Store(StoreError::VersionConflict { expected, current })) => {
                    inner.counters.conflicts.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(
                        session = %session.id, expected, current,
                        "summarizer: another summary committed first"
                    );
                    break;
                }
                Err(error) => {
                    inner.counters.failed.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(
                        session = %session.id, %error,
                        "summarizer: failed; history unchanged, the next append retries"
                    );
                    break;
                }
            }
        }
        if let Err(error) = inner.store.unlock(session, &token).await {
            // The lock expires on its own.
            tracing::debug!(session = %session.id, %error, "summarizer: unlock failed");
        }
    }

    async fn round(&self, session: &SessionRef) -> Result<Round, RoundError> {
        let inner = &self.inner;
        let config = &inner.config;
        let mut page = inner.store.read_after(session, 0, CHUNK).await?;
        let record = page.session.clone();
        let Some(spec) = self.model_spec(&record.model) else {
            return Ok(Round::NothingToDo);
        };
        let raw_tokens = u64::try_from(record.raw_tokens).unwrap_or(0);
        if raw_tokens <= config.threshold_tokens(spec) {
            return Ok(Round::NothingToDo);
        }
        let needed = raw_tokens - config.keep_tokens(spec);

        let summary_model = if config.summary_model.is_empty() {
            record.model.clone()
        } else {
            config.summary_model.clone()
        };
        let Some(summary_spec) = inner.catalog.get(&summary_model) else {
            return Ok(Round::NothingToDo);
        };
        let family = summary_spec.family().to_string();
        let max_tokens = config
            .summary_max_tokens
            .min(summary_spec.max_output_tokens);
        let previous = record.summary.as_ref().map(|s| s.text.as_str());
        let fixed = u64::from(tokens::count_messages(
            &family,
            &prompt(previous, &[String::new()]),
        ));
        let input_budget = u64::from(summary_spec.context_window)
            .saturating_sub(u64::from(max_tokens) + fixed + PROMPT_MARGIN);

        // Gather whole units from the head until enough is covered or the input is full.
        let mut turns: Vec<Turn> = std::mem::take(&mut page.turns);
        let mut lines: Vec<String> = Vec::new();
        let (mut pos, mut covered, mut input) = (0usize, 0u64, 0u64);
        loop {
            let end = match unit_end(&turns, pos) {
                Some(end) if end <= turns.len() && pos < turns.len() => end,
                _ => {
                    // The unit may continue past what was read: read more (never past the tail).
                    let after = turns.last().map_or(record.covers_through_seq(), |t| t.seq);
                    if after >= record.last_seq {
                        break;
                    }
                    let more = inner.store.read_after(session, after, CHUNK).await?;
                    if more.session.incarnation != record.incarnation
                        || more.session.summary_version() != record.summary_version()
                    {
                        return Err(StoreError::VersionConflict {
                            expected: record.summary_version(),
                            current: more.session.summary_version(),
                        }
                        .into());
                    }
                    if more.turns.is_empty() {
                        break;
                    }
                    turns.extend(more.turns);
                    continue;
                }
            };
            let unit = &turns[pos..end];
            // Never the newest unit: something recent always stays raw.
            if unit.last().is_some_and(|t| t.seq >= record.last_seq) {
                break;
            }
            let mut unit_lines: Vec<String> = unit.iter().map(render).collect();
            let mut cost: u64 = unit_lines
                .iter()
                .map(|l| u64::from(tokens::count_text(&family, l)) + 1)
                .sum();
            if input + cost > input_budget {
                if pos > 0 {
                    break;
                }
                // A single unit larger than the whole input: summarize a truncated rendering of
                // it rather than never summarizing again.
                let share = input_budget / u64::try_from(unit_lines.len()).unwrap_or(1).max(1);
                for line in &mut unit_lines {
                    *line = truncate_to_tokens(&family, line, share.saturating_sub(1));
                }
                cost = input_budget;
            }
            input += cost;
            covered += unit
                .iter()
                .map(|t| u64::try_from(t.token_count).unwrap_or(0))
                .sum::<u64>();
            lines.extend(unit_lines);
            pos = end;
            if covered >= needed {
                break;
            }
        }
        if pos == 0 {
            return Ok(Round::NothingToDo);
        }
        let covers = turns[pos - 1].seq;
        let dropped: i64 = turns[..pos].iter().map(|t| t.token_count).sum();

        let mut request = tonic::Request::new(GenerateRequest {
            model: summary_model.clone(),
            messages: prompt(previous, &lines),
            params: Some(GenerationParams {
                max_tokens: Some(i32::try_from(max_tokens).unwrap_or(i32::MAX)),
                temperature: Some(0.0),
                ..GenerationParams::default()
            }),
            request_id: format!("summary-{}-v{}", session.id, record.summary_version() + 1),
            labels: [("purpose".to_string(), "session-summary".to_string())].into(),
        });
        request.set_timeout(config.summary_timeout);
        if let Ok(tenant) = session.tenant.as_str().parse() {
            request.metadata_mut().insert(TENANT, tenant);
        }
        request
            .extensions_mut()
            .insert(BackendKey::new(summary_model.as_str()));
        let mut client = inner.client.clone();
        let response = client.generate(request).await.map_err(|status| {
            RoundError::Inference(format!(
                "inference {} ({}) from model {summary_model}",
                weir_mesh::error::code_name(status.code()),
                status.message()
            ))
        })?;
        let text = response
            .into_inner()
            .message
            .map(|m| m.content.trim().to_string())
            .unwrap_or_default();
        if text.is_empty() {
            return Err(RoundError::Inference(format!(
                "model {summary_model} wrote an empty summary"
            )));
        }
        let token_count = summary_tokens(&record.family, &text);
        let version = inner
            .store
            .commit_summary(
                session,
                SummaryCommit {
                    incarnation: record.incarnation.clone(),
                    expected_version: record.summary_version(),
                    covers_through_seq: covers,
                    text,
                    token_count,
                    dropped_tokens: dropped,
                    now_ms: crate::now_ms(),
                },
            )
            .await?;
        inner.counters.committed.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(
            session = %session.id, version, covers_through_seq = covers,
            turns = pos, "summarizer: committed"
        );
        let remaining = raw_tokens.saturating_sub(u64::try_from(dropped).unwrap_or(0));
        Ok(Round::Committed {
            still_over: remaining > config.threshold_tokens(spec),
        })
    }
}

/// The summarization prompt: the instruction, then one user message with the previous summary
/// (if any) and the transcript lines.
fn prompt(previous: Option<&str>, lines: &[String]) -> Vec<Message> {
    let mut text = String::new();
    if let Some(previous) = previous {
        text.push_str("Summary so far:\n");
        text.push_str(previous);
        text.push_str("\n\n");
    }
    text.push_str("New turns:\n");
    text.push_str(&lines.join("\n"));
    text.push_str("\n\nWrite the updated summary.");
    vec![
        Message {
            role: Role::System.into(),
            content: INSTRUCTION.to_string(),
            ..Message::default()
        },
        Message {
            role: Role::User.into(),
            content: text,
            ..Message::default()
        },
    ]
}

/// One transcript line for a turn.
fn render(turn: &Turn) -> String {
    let Some(message) = &turn.message else {
        return String::new();
    };
    let role = match Role::try_from(message.role) {
        Ok(Role::System) => "system",
        Ok(Role::User) => "user",
        Ok(Role::Assistant) => "assistant",
        Ok(Role::Tool) => "tool",
        _ => "unknown",
    };
    let mut line = role.to_string();
    if !message.name.is_empty() {
        line.push_str(&format!(" ({})", message.name));
    }
    if !message.tool_call_id.is_empty() {
        line.push_str(&format!(" [result of {}]", message.tool_call_id));
    }
    line.push_str(": ");
    line.push_str(&message.content);
    for call in &message.tool_calls {
        line.push_str(&format!(
            " [calls {} {}({})]",
            call.id, call.name, call.arguments_json
        ));
    }
    line
}

/// The longest prefix of `text` with at most `max` tokens in `family`.
fn truncate_to_tokens(family: &str, text: &str, max: u64) -> String {
    if u64::from(tokens::count_text(family, text)) <= max {
        return text.to_string();
    }
    let boundaries: Vec<usize> = text.char_indices().map(|(i, _)| i).collect();
    let (mut lo, mut hi) = (0usize, boundaries.len());
    while lo < hi {
        let mid = (lo + hi).div_ceil(2);
        let end = boundaries.get(mid).copied().unwrap_or(text.len());
        if u64::from(tokens::count_text(family, &text[..end])) <= max {
            lo = mid;
        } else {
            hi = mid - 1;
        }
    }
    let end = boundaries.get(lo).copied().unwrap_or(text.len());
    text[..end].to_string()
}

#[cfg(test)]
mod tests {
    use weir_proto::common::ToolCall;

    use super::*;

    #[test]
    fn transcript_lines_show_roles_and_tool_calls() {
        let call = Turn {
            message: Some(Message {
                role: Role::Assistant.into(),
                tool_calls: vec![ToolCall {
                    id: "c1".into(),
                    name: "search".into(),
                    arguments_json: "{\"q\":\"x\"}".into(),
                }],
                ..Message::default()
            }),
            ..Turn::default()
        };
        assert_eq!(
            render(&call),
            "assistant:  [calls c1 search({\"q\":\"x\"})]"
        );
        let result = Turn {
            message: Some(Message {
                role: Role::Tool.into(),
                content: "found".into(),
                tool_call_id: "c1".into(),
                ..Message::default()
            }),
            ..Turn::default()
        };
        assert_eq!(render(&result), "tool [result of c1]: found");
    }

    #[test]
    fn truncation_keeps_a_prefix_within_the_limit() {
        let text = "one two three four five";
        assert_eq!(truncate_to_tokens("sim", text, 100), text);
        assert_eq!(truncate_to_tokens("sim", text, 2), "one two ");
        assert_eq!(truncate_to_tokens("sim", text, 0), "");
    }

    #[test]
    fn the_prompt_carries_the_previous_summary() {
        let messages = prompt(Some("old"), &["user: hi".to_string()]);
        assert_eq!(messages.len(), 2);
        assert!(
            messages[1]
                .content
                .starts_with("Summary so far:\nold\n\nNew turns:\nuser: hi")
        );
    }
}
