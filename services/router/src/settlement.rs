//! Step 6 of the walk: settling a request once its answer is known.
//!
//! A `Settlement` carries what a served request still owes: the budget hold to commit (see
//! [`crate::spend`]) and the exchange to append to the session (see [`crate::session`]).
//! `Settlement::settle` does both, at once, when the answer is complete (a unary answer, or a
//! stream's `done`), and returns the committed cost and any notices for the answer. Neither ever
//! fails the answer: a failed commit or append becomes a notice.
//!
//! The settlement runs on a task of its own, with its own deadline ([`SETTLE_TIMEOUT`]), rather
//! than on the caller's: it must finish even if the caller's deadline passes or the caller goes
//! away while it runs, or the spend would be lost (the hold would expire and be released). The
//! caller still waits for it, so the cost is in the answer.
//!
//! A stream records its text as it is relayed (`Settlement::record`). If the settlement is dropped
//! before `done` (the client cancelled, the model failed mid-answer), its hold commits the prompt
//! and the output tokens relayed so far, counted with the model's tokenizer family, and nothing is
//! appended (see [`crate::session`]). `Settlement::failed` is for a model call that failed before
//! its first token: the hold is released only if the model certainly never ran
//! ([`model_never_ran`]); otherwise the prompt is charged.

use std::{fmt, time::Duration};

use tonic::Code;
use tracing::Instrument;
use weir_mesh::{ApiError, deadline::Deadline, tokens};
use weir_proto::{
    common::{Message, Role, Usage},
    router::Notice,
};

use crate::{
    inference::Call,
    session::{Append, SESSION_APPEND_FAILED},
    spend::{BUDGET_COMMIT_FAILED, Hold},
};

/// Deadline of the bookkeeping calls after an answer (commit, append) and of those for an
/// abandoned request, which must finish without the caller: 10 s.
pub const SETTLE_TIMEOUT: Duration = Duration::from_secs(10);

/// What a served request owes once its answer is known.
pub(crate) struct Settlement {
    call: Call,
    hold: Option<Hold>,
    append: Option<Append>,
    /// Tokenizer family of the serving model, to count a stream's output.
    family: String,
    /// The streamed answer so far (only kept when there is something to settle).
    streamed: String,
}

impl fmt::Debug for Settlement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Settlement")
            .field("hold", &self.hold)
            .field("append", &self.append)
            .finish()
    }
}

/// The outcome of a settlement, for the answer.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Settled {
    /// The committed cost in micro-USD (0 when nothing was committed).
    pub cost_micros: i64,
    /// What went wrong, as notices.
    pub notices: Vec<Notice>,
}

impl Settlement {
    /// A settlement for a request served by a model of tokenizer `family`, with the forwarded
    /// metadata of `call`.
    pub fn new(call: &Call, hold: Option<Hold>, append: Option<Append>, family: &str) -> Self {
        Self {
            call: call.clone(),
            hold,
            append,
            family: family.to_string(),
            streamed: String::new(),
        }
    }

    /// Nothing to settle (no budget, no session).
    #[cfg(test)]
    pub fn none() -> Self {
        Self::new(&Call::default(), None, None, tokens::SIM_FAMILY)
    }

    /// Records a piece of a streamed answer.
    pub fn record(&mut self, text: &str) {
        if self.hold.is_some() || self.append.is_some() {
            self.streamed.push_str(text);
        }
    }

    /// The streamed answer as the assistant message to append.
    fn streamed_message(&mut self) -> Message {
        Message {
            role: Role::Assistant.into(),
            content: std::mem::take(&mut self.streamed),
            ..Message::default()
        }
    }

    /// Appends nothing to the session: the answer is withheld from the caller (held for review),
    /// so it is not the conversation's yet. The hold is still committed.
    pub fn withhold(&mut self) {
        self.append = None;
    }

    /// Commits the hold with `usage` (the model's report; estimated from the prompt and the
    /// streamed text when it sent none) and appends the exchange with `answer` (the streamed text
    /// when `None`), concurrently, on a task of its own (see the module documentation).
    pub async fn settle(mut self, usage: Option<Usage>, answer: Option<Message>) -> Settled {
        let hold = self.hold.take();
        let append = self.append.take();
        if hold.is_none() && append.is_none() {
            return Settled::default();
        }
        let output_tokens = i64::from(tokens::count_text(&self.family, &self.streamed));
        let answer = answer.unwrap_or_else(|| self.streamed_message());
        let call = self.call.with_deadline(Deadline::after(SETTLE_TIMEOUT));
        // In the request's span, so the commit and append belong to the request's trace.
        let task = tokio::spawn(
            settle_now(call, hold, append, usage, answer, output_tokens).in_current_span(),
        );
        match task.await {
            Ok(settled) => settled,
            Err(error) => {
                tracing::error!(%error, "settlement task failed");
                Settled::default()
            }
        }
    }

    /// The model call failed with `error` before an answer (or, for a stream, before its first
    /// event): nothing is appended, and the hold is released only if the model certainly never
    /// ran ([`model_never_ran`]); otherwise the prompt is charged (see the module doc).
    pub fn failed(mut self, error: &ApiError) {
        self.append = None;
        if model_never_ran(error)
            && let Some(hold) = self.hold.take()
        {
            hold.release();
        }
        // Otherwise dropping `self` commits the prompt and whatever was relayed.
    }
}

/// Whether a model call that failed with `error` certainly did not run the model, so that its hold
/// can be given back without charging anything.
///
/// The rule is the settlement rule of the walk: **a hold is released only when the model was
/// never called**. Once the request may have reached a model, the upstream may bill for it, so the
/// prompt (and for a stream, every token relayed) is charged whatever happened afterwards.
///
/// | failure | the model ran? | settlement |
/// |---|---|---|
/// | DEADLINE_EXCEEDED, CANCELLED (time ran out or the caller left while it worked) | maybe | charge the prompt |
/// | UNAVAILABLE `STREAM_CUT` (the connection broke before the answer ended) | yes | charge the prompt and what was relayed |
/// | any other failure: refused before the call (circuit open, bulkhead full, shed, unreachable), or an answer that the model did not run (5xx, 429, a refused request) | no | release |
pub fn model_never_ran(error: &ApiError) -> bool {
    !matches!(error.code(), Code::DeadlineExceeded | Code::Cancelled)
        && error.reason() != weir_mesh::transport::STREAM_CUT
}

/// The settlement's task: commit and append at once, each failure a notice.
async fn settle_now(
    call: Call,
    hold: Option<Hold>,
    append: Option<Append>,
    usage: Option<Usage>,
    answer: Message,
    output_tokens: i64,
) -> Settled {
    let commit = async {
        let mut hold = hold?;
        hold.set_output_tokens(output_tokens);
        let usage = usage.unwrap_or_else(|| hold.estimated_usage());
        Some(hold.commit(&call, usage).await)
    };
    let append = async { Some(append?.send(&call, answer).await) };
    let (committed, appended) = tokio::join!(commit, append);
    let mut settled = Settled::default();
    match committed {
        Some(Ok(cost)) => settled.cost_micros = cost,
        Some(Err(error)) => settled.notices.push(Notice {
            reason: BUDGET_COMMIT_FAILED.to_string(),
            message: format!(
                "the cost of this answer could not be recorded ({}); its reservation expires on \
                 its own",
                error.reason()
            ),
        }),
        None => {}
    }
    if let Some(Err(error)) = appended {
        settled.notices.push(Notice {
            reason: SESSION_APPEND_FAILED.to_string(),
            message: format!(
                "this exchange could not be added to the session ({}: {})",
                error.reason(),
                error.message()
            ),
        });
    }
    settled
}

impl Drop for Settlement {
    fn drop(&mut self) {
        // Not settled: the stream ended early. The hold commits what was relayed (its own Drop).
        if let Some(mut hold) = self.hold.take() {
            hold.set_output_tokens(i64::from(tokens::count_text(&self.family, &self.streamed)));
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn nothing_to_settle_costs_nothing_and_says_nothing() {
        let mut settlement = Settlement::none();
        settlement.record("hello");
        assert!(
            settlement.streamed.is_empty(),
            "nothing kept without a reason"
        );
        assert_eq!(settlement.settle(None, None).await, Settled::default());
        Settlement::none().failed(&ApiError::unavailable("CIRCUIT_OPEN", "open"));
    }
}
