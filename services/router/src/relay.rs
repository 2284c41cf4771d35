//! Relaying an inference stream to the router's client.
//!
//! The router's stream is `start`, deltas, `done`, built from the inference stream (deltas, `done`)
//! as events arrive:
//!
//! - `open` waits for the first upstream event before anything is sent, so a failure before the
//!   first token fails the whole RPC with the upstream status. This is where a later fallback can
//!   still try another model: the client has seen nothing yet.
//! - Then `start` goes out, followed by each delta the moment it arrives: nothing is buffered.
//! - The upstream `done` becomes the router's `done`, which ends the stream.
//! - After `start`, an upstream error ends the stream with that status (its `google.rpc` details
//!   intact), and an upstream stream that ends without `done` ends it with UNAVAILABLE, reason
//!   [`STREAM_CUT`]: a partial answer is never passed off as a whole one.
//!
//! The returned stream owns the upstream stream. When the client goes away, tonic drops the
//! router's stream, which drops the inference stream and so cancels the upstream call.
//!
//! The stream also owns the request's `Settlement` (step 6 of the walk): each delta's text is
//! recorded as it goes out; on the upstream `done` the settlement commits the usage and appends the
//! exchange to the session before the router's `done` goes out with the committed cost and any
//! notices; if the stream ends any other way (an error, a cut, the client going away), dropping the
//! settlement commits what was relayed and appends nothing (see [`crate::settlement`]). If the
//! upstream fails before its first event, the settlement is told how (`Settlement::failed`): the
//! hold is released only if the model never ran.
//!
//! Upstream messages with no event set (from a newer inference version) are skipped.
//!
//! # Review (step 7)
//!
//! With a review `Gate`, the relay also keeps the answer's text, and on the upstream `done`
//! the gate judges it (`crate::review_gate::conclude`): the router's `done` then carries the
//! review status and item id. When a blocking policy may match (`Gate::holds_back`) the stream
//! is **held back**: `start` goes out at once, every delta is kept, and on `done` either the kept
//! deltas then `done` go out (not flagged, or sampled post-hoc), or only `done` with
//! `review_status = PENDING` and the `review_id` (flagged: the text is withheld), or, if the
//! review item cannot be created, the error REVIEW_UNAVAILABLE. A held-back stream that fails or is
//! cut before `done` ends with its error and none of its text.

use std::pin::Pin;

use futures::{Stream, StreamExt, stream};
use tonic::Status;
use weir_mesh::ApiError;
use weir_proto::{
    common::{FinishReason, Usage},
    inference::{
        GenerateStreamResponse, generate_stream_response::Done as UpstreamDone,
        generate_stream_response::Event as UpstreamEvent,
    },
    router::{
        CompleteStreamResponse, Notice, ReviewStatus,
        complete_stream_response::{Delta, Done, Event, Start},
    },
};

use crate::{
    review_gate::{self, Gate},
    settlement::Settlement,
};

/// The router's outgoing answer stream.
pub type CompleteStream =
    Pin<Box<dyn Stream<Item = Result<CompleteStreamResponse, Status>> + Send + 'static>>;

/// ErrorInfo reason of a stream that ended without its `done` event.
pub const STREAM_CUT: &str = "STREAM_CUT";

/// Waits for the first event of `upstream`, then returns the router's stream: `start`, then the
/// upstream's events as they arrive (see the module documentation). Fails with the upstream status
/// if the upstream fails before its first event, and with [`STREAM_CUT`] if it ends without one.
///
/// `notices` (for example that a fallback served the answer) go out in the final `done`, with
/// those of the `settlement`, which settles when the answer ends (see the module documentation).
/// With a `gate` the answer is reviewed at its end, and held back until then if the gate says so.
pub(crate) async fn open<S>(
    start: Start,
    notices: Vec<Notice>,
    mut upstream: S,
    settlement: Settlement,
    gate: Option<Gate>,
) -> Result<CompleteStream, ApiError>
where
    S: Stream<Item = Result<GenerateStreamResponse, Status>> + Send + Unpin + 'static,
{
    let first = match next_event(&mut upstream).await {
        Ok(Some(event)) => event,
        Ok(None) => return Err(failed(settlement, stream_cut(false))),
        Err(status) => return Err(failed(settlement, ApiError::from_status(&status))),
    };
    let held = gate.as_ref().is_some_and(Gate::holds_back);
    let upstream = Upstream {
        stream: upstream,
        notices,
        settlement,
        gate,
        text: String::new(),
    };
    if held {
        let start = stream::iter([Ok(event(Event::Start(start)))]);
        let rest = stream::once(hold(first, upstream)).flat_map(stream::iter);
        return Ok(Box::pin(start.chain(rest)));
    }
    let state = State::Start {
        start,
        first,
        upstream,
    };
    Ok(Box::pin(stream::unfold(state, step)))
}

/// A route's degraded answer as a stream: `start`, the text as one delta, `done` with no usage.
pub(crate) fn degraded(start: Start, text: String, notices: Vec<Notice>) -> CompleteStream {
    let done = Done {
        finish_reason: FinishReason::Stop.into(),
        usage: Some(Usage::default()),
        cost_micros: 0,
        review_status: ReviewStatus::NotRequired.into(),
        review_id: String::new(),
        notices,
    };
    Box::pin(stream::iter([
        Ok(event(Event::Start(start))),
        Ok(event(Event::Delta(Delta { text }))),
        Ok(event(Event::Done(done))),
    ]))
}

/// The upstream stream, what the final `done` must carry, and what the request owes.
struct Upstream<S> {
    stream: S,
    notices: Vec<Notice>,
    settlement: Settlement,
    /// The answer's review, if a policy may match it.
    gate: Option<Gate>,
    /// The answer so far (only kept with a gate).
    text: String,
}

impl<S> Upstream<S> {
    /// Records a delta's text, for the settlement and the review.
    fn record(&mut self, text: &str) {
        self.settlement.record(text);
        if self.gate.is_some() {
            self.text.push_str(text);
        }
    }
}

/// A held-back stream after `start`: reads the whole answer, then gives what goes out (see the
/// module documentation).
async fn hold<S>(
    first: UpstreamEvent,
    mut upstream: Upstream<S>,
) -> Vec<Result<CompleteStreamResponse, Status>>
where
    S: Stream<Item = Result<GenerateStreamResponse, Status>> + Send + Unpin,
{
    let mut deltas = Vec::new();
    let mut next = Some(first);
    loop {
        let upstream_event = match next.take() {
            Some(upstream_event) => upstream_event,
            None => match next_event(&mut upstream.stream).await {
                Ok(Some(upstream_event)) => upstream_event,
                Ok(None) => return vec![Err(Status::from(stream_cut(true)))],
                Err(status) => return vec![Err(Status::from(ApiError::from_status(&status)))],
            },
        };
        match upstream_event {
            UpstreamEvent::Delta(delta) => {
                upstream.record(&delta.text);
                deltas.push(delta.text);
            }
            UpstreamEvent::Done(done) => {
                return match finish(done, upstream).await {
                    Ok((done, true)) => vec![Ok(event(Event::Done(done)))],
                    Ok((done, false)) => deltas
                        .into_iter()
                        .map(|text| Ok(event(Event::Delta(Delta { text }))))
                        .chain([Ok(event(Event::Done(done)))])
                        .collect(),
                    Err(status) => vec![Err(status)],
                };
            }
        }
    }
}

/// Where the relay is.
enum State<S> {
    /// `start` is next, then the already received first event.
    Start {
        start: Start,
        first: UpstreamEvent,
        upstream: Upstream<S>,
    },
    /// The first upstream event is next.
    First {
        first: UpstreamEvent,
        upstream: Upstream<S>,
    },
    /// Relaying: the next upstream event is next.
    Relaying { upstream: Upstream<S> },
    /// `done` or an error has been sent; the upstream is dropped.
    Finished,
}

/// Produces the next outgoing item and the state after it.
async fn step<S>(state: State<S>) -> Option<(Result<CompleteStreamResponse, Status>, State<S>)>
where
    S: Stream<Item = Result<GenerateStreamResponse, Status>> + Send + Unpin,
{
    match state {
        State::Start {
            start,
            first,
            upstream,
        } => Some((
            Ok(event(Event::Start(start))),
            State::First { first, upstream },
        )),
        State::First { first, upstream } => Some(relay(first, upstream).await),
        State::Relaying { mut upstream } => Some(match next_event(&mut upstream.stream).await {
            Ok(Some(upstream_event)) => relay(upstream_event, upstream).await,
            Ok(None) => (Err(Status::from(stream_cut(true))), State::Finished),
            Err(status) => (
                Err(Status::from(ApiError::from_status(&status))),
                State::Finished,
            ),
        }),
        State::Finished => None,
    }
}

/// Translates one upstream event; `done` settles the request and finishes the relay (dropping the
/// upstream first).
async fn relay<S>(
    upstream_event: UpstreamEvent,
    mut upstream: Upstream<S>,
) -> (Result<CompleteStreamResponse, Status>, State<S>)
where
    S: Stream<Item = Result<GenerateStreamResponse, Status>> + Unpin,
{
    match upstream_event {
        UpstreamEvent::Delta(delta) => {
            upstream.record(&delta.text);
            (
                Ok(event(Event::Delta(Delta { text: delta.text }))),
                State::Relaying { upstream },
            )
        }
        UpstreamEvent::Done(done) => (
            finish(done, upstream)
                .await
                .map(|(done, _)| event(Event::Done(done))),
            State::Finished,
        ),
    }
}

/// The router's `done` for the upstream's, once the request is settled and reviewed: the committed
/// cost, the review status and item, and the notices of the walk, the settlement and the review;
/// with whether the answer's text is withheld. An error if a blocking review could not be queued.
async fn finish<S>(done: UpstreamDone, upstream: Upstream<S>) -> Result<(Done, bool), Status>
where
    S: Stream<Item = Result<GenerateStreamResponse, Status>> + Unpin,
{
    let Upstream {
        stream,
        mut notices,
        settlement,
        gate,
        text,
    } = upstream;
    // The model has finished: read its call to the end (the trailers follow `done` at once, and
    // a call dropped before them is a cancelled call to every observer) and let it go before
    // waiting on the bookkeeping. A misbehaving upstream gets a short grace, no more.
    let mut stream = stream;
    let _ = tokio::time::timeout(UPSTREAM_END_GRACE, async {
        while stream.next().await.is_some() {}
    })
    .await;
    drop(stream);
    let concluded = review_gate::conclude(gate, settlement, done.usage, &text, None)
        .await
        .map_err(Status::from)?;
    notices.extend(concluded.settled.notices);
    let done = Done {
        finish_reason: done.finish_reason,
        usage: done.usage,
        cost_micros: concluded.settled.cost_micros,
        review_status: concluded.status.into(),
        review_id: concluded.review_id,
        notices,
    };
    Ok((done, concluded.withheld))
}

/// How long the relay waits, after the upstream's `done`, for the upstream call to end.
const UPSTREAM_END_GRACE: std::time::Duration = std::time::Duration::from_millis(100);

/// The next upstream event, skipping messages without one; `None` when the stream ended.
async fn next_event<S>(upstream: &mut S) -> Result<Option<UpstreamEvent>, Status>
where
    S: Stream<Item = Result<GenerateStreamResponse, Status>> + Unpin,
{
    while let Some(message) = upstream.next().await {
        if let Some(event) = message?.event {
            return Ok(Some(event));
        }
    }
    Ok(None)
}

/// Settles a stream that failed before its first event (see `Settlement::failed`).
fn failed(settlement: Settlement, error: ApiError) -> ApiError {
    settlement.failed(&error);
    error
}

fn stream_cut(started: bool) -> ApiError {
    let when = if started {
        "after the answer had started"
    } else {
        "before the first token"
    };
    ApiError::unavailable(
        STREAM_CUT,
        format!("the model's stream ended without finishing the answer ({when})"),
    )
}

fn event(event: Event) -> CompleteStreamResponse {
    CompleteStreamResponse { event: Some(event) }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use std::{
        sync::{
            Arc,
            atomic::{AtomicBool, Ordering},
        },
        task::Poll,
        time::Duration,
    };

    use futures::channel::mpsc;
    use tonic::Code;
    use tonic_types::StatusExt;
    use weir_proto::{
        common::{FinishReason, Usage},
        inference::generate_stream_response::Delta as UpstreamDelta,
        router::ServedBy,
    };

    use super::*;

    type Item = Result<GenerateStreamResponse, Status>;

    fn start() -> Start {
        Start {
            model: "sim-large".to_string(),
            requested_model: "auto".to_string(),
            route: "auto".to_string(),
            served_by: ServedBy::Primary.into(),
            trace_id: String::new(),
        }
    }

    fn delta(text: &str) -> Item {
        Ok(GenerateStreamResponse {
            event: Some(UpstreamEvent::Delta(UpstreamDelta {
                text: text.to_string(),
                index: 0,
            })),
        })
    }

    fn done() -> Item {
        Ok(GenerateStreamResponse {
            event: Some(UpstreamEvent::Done(UpstreamDone {
                finish_reason: FinishReason::Stop.into(),
                usage: Some(Usage {
                    input_tokens: 3,
                    output_tokens: 2,
                    cached_input_tokens: 0,
                    total_tokens: 5,
                }),
                model: "sim-large".to_string(),
                ..UpstreamDone::default()
            })),
        })
    }

    fn retryable() -> Status {
        Status::from(
            ApiError::unavailable("UPSTREAM_UNAVAILABLE", "backend down")
                .with_retry_after(Duration::from_millis(250)),
        )
    }

    async fn collect(items: Vec<Item>) -> Result<Vec<Result<Event, Status>>, ApiError> {
        let stream = open(
            start(),
            Vec::new(),
            stream::iter(items),
            Settlement::none(),
            None,
        )
        .await?;
        Ok(stream
            .map(|item| item.map(|response| response.event.unwrap()))
            .collect()
            .await)
    }

    fn text(event: &Result<Event, Status>) -> &str {
        match event {
            Ok(Event::Delta(delta)) => &delta.text,
            other => panic!("expected a delta, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn start_deltas_done_in_order() {
        let events = collect(vec![delta("Hel"), delta("lo"), done()])
            .await
            .unwrap();
        assert_eq!(events.len(), 4);
        assert!(matches!(&events[0], Ok(Event::Start(s)) if *s == start()));
        assert_eq!(text(&events[1]), "Hel");
        assert_eq!(text(&events[2]), "lo");
        let Ok(Event::Done(done)) = &events[3] else {
            panic!("expected done, got {:?}", events[3]);
        };
        assert_eq!(done.finish_reason, i32::from(FinishReason::Stop));
        assert_eq!(done.usage.map(|u| u.total_tokens), Some(5));
        assert_eq!(done.cost_micros, 0);
        assert_eq!(done.review_status, i32::from(ReviewStatus::NotRequired));
    }

    #[tokio::test]
    async fn an_answer_with_no_delta_still_starts_and_finishes() {
        let events = collect(vec![done()]).await.unwrap();
        assert!(matches!(
            &events[..],
            [Ok(Event::Start(_)), Ok(Event::Done(_))]
        ));
    }

    #[tokio::test]
    async fn nothing_after_done_is_relayed() {
        let events = collect(vec![delta("a"), done(), delta("late"), Err(retryable())])
            .await
            .unwrap();
        assert_eq!(events.len(), 3);
        assert!(matches!(events[2], Ok(Event::Done(_))));
    }

    #[tokio::test]
    async fn an_error_before_the_first_event_fails_the_call_with_its_details() {
        let error = collect(vec![Err(retryable())]).await.unwrap_err();
        assert_eq!(error.code(), Code::Unavailable);
        assert_eq!(error.reason(), "UPSTREAM_UNAVAILABLE");
        assert_eq!(error.retry_after(), Some(Duration::from_millis(250)));
    }

    #[tokio::test]
    async fn an_empty_upstream_is_a_cut_stream() {
        let error = collect(vec![]).await.unwrap_err();
        assert_eq!(error.code(), Code::Unavailable);
        assert_eq!(error.reason(), STREAM_CUT);
    }

    #[tokio::test]
    async fn an_error_after_start_ends_the_stream_with_its_details() {
        let events = collect(vec![delta("a"), Err(retryable()), delta("never")])
            .await
            .unwrap();
        assert_eq!(events.len(), 3);
        assert_eq!(text(&events[1]), "a");
        let status = events[2].as_ref().unwrap_err();
        assert_eq!(status.code(), Code::Unavailable);
        let details = status.get_error_details();
        assert_eq!(
            details.error_info().map(|i| i.reason.as_str()),
            Some("UPSTREAM_UNAVAILABLE")
        );
        assert_eq!(
            details.retry_info().and_then(|r| r.retry_delay),
            Some(Duration::from_millis(250))
        );
    }

    #[tokio::test]
    async fn a_stream_ending_without_done_is_never_silently_cut() {
        let events = collect(vec![delta("a"), delta("b")]).await.unwrap();
        assert_eq!(events.len(), 4);
        let status = events[3].as_ref().unwrap_err();
        assert_eq!(status.code(), Code::Unavailable);
        let reason = status
            .get_error_details()
            .error_info()
            .map(|i| i.reason.clone());
        assert_eq!(reason.as_deref(), Some(STREAM_CUT));
    }

    #[tokio::test]
    async fn messages_without_an_event_are_skipped() {
        let empty = Ok(GenerateStreamResponse { event: None });
        let events = collect(vec![empty.clone(), delta("a"), empty, done()])
            .await
            .unwrap();
        assert_eq!(events.len(), 3);
        assert_eq!(text(&events[1]), "a");
    }

    #[tokio::test]
    async fn each_delta_is_relayed_as_soon_as_it_arrives() {
        let (tx, rx) = mpsc::unbounded::<Item>();
        tx.unbounded_send(delta("first")).unwrap();
        let mut stream = open(start(), Vec::new(), rx, Settlement::none(), None)
            .await
            .unwrap();
        assert!(matches!(
            stream.next().await,
            Some(Ok(CompleteStreamResponse {
                event: Some(Event::Start(_))
            }))
        ));
        assert_eq!(
            text(&stream.next().await.unwrap().map(|r| r.event.unwrap())),
            "first"
        );
        // Nothing more has arrived, so nothing more is sent: the relay waits, it does not batch.
        assert!(futures::poll!(stream.next()).is_pending());
        tx.unbounded_send(delta("second")).unwrap();
        assert_eq!(
            text(&stream.next().await.unwrap().map(|r| r.event.unwrap())),
            "second"
        );
        tx.unbounded_send(done()).unwrap();
        assert!(matches!(
            stream.next().await,
            Some(Ok(CompleteStreamResponse {
                event: Some(Event::Done(_))
            }))
        ));
        assert!(stream.next().await.is_none());
    }

    /// An upstream that records when it is dropped (as dropping a tonic `Streaming` cancels the
    /// call).
    struct Upstream {
        rx: mpsc::UnboundedReceiver<Item>,
        dropped: Arc<AtomicBool>,
    }

    impl Stream for Upstream {
        type Item = Item;
        fn poll_next(
            mut self: Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
        ) -> Poll<Option<Item>> {
            self.rx.poll_next_unpin(cx)
        }
    }

    impl Drop for Upstream {
        fn drop(&mut self) {
            self.dropped.store(true, Ordering::SeqCst);
        }
    }

    #[tokio::test]
    async fn dropping_the_router_stream_drops_the_upstream() {
        let (tx, rx) = mpsc::unbounded::<Item>();
        let dropped = Arc::new(AtomicBool::new(false));
        tx.unbounded_send(delta("a")).unwrap();
        let upstream = Upstream {
            rx,
            dropped: Arc::clone(&dropped),
        };
        let mut stream = open(start(), Vec::new(), upstream, Settlement::none(), None)
            .await
            .unwrap();
        stream.next().await.unwrap().unwrap();
        stream.next().await.unwrap().unwrap();
        // The client goes away mid-answer.
        assert!(futures::poll!(stream.next()).is_pending());
        assert!(!dropped.load(Ordering::SeqCst));
        drop(stream);
        assert!(dropped.load(Ordering::SeqCst));
    }

    #[tokio::test]
    async fn done_releases_the_upstream_at_once() {
        let (tx, rx) = mpsc::unbounded::<Item>();
        let dropped = Arc::new(AtomicBool::new(false));
        tx.unbounded_send(done()).unwrap();
        let upstream = Upstream {
            rx,
            dropped: Arc::clone(&dropped),
        };
        let mut stream = open(start(), Vec::new(), upstream, Settlement::none(), None)
            .await
            .unwrap();
        stream.next().await.unwrap().unwrap();
        stream.next().await.unwrap().unwrap();
        assert!(dropped.load(Ordering::SeqCst));
        assert!(stream.next().await.is_none());
    }

    mod held {
        //! Streams with a review gate.

        use super::*;
        use crate::review_gate::testing::{Fake, gate, serve};

        const BLOCK_REFUNDS: &str =
            "[[router.review.policies]]\nname = \"refunds\"\nanswer_keywords = [\"refund\"]\n";
        const AUDIT_ALL: &str =
            "[[router.review.policies]]\nname = \"audit\"\nmode = \"post_hoc\"\n";

        async fn events(policies: &str, items: Vec<Item>) -> Vec<Result<Event, Status>> {
            let url = serve(Fake::default()).await;
            let gate = gate(policies, &url, "money back?");
            let stream = open(
                start(),
                Vec::new(),
                stream::iter(items),
                Settlement::none(),
                gate,
            )
            .await
            .unwrap();
            stream
                .map(|item| item.map(|response| response.event.unwrap()))
                .collect()
                .await
        }

        fn done_of(event: &Result<Event, Status>) -> &Done {
            match event {
                Ok(Event::Done(done)) => done,
                other => panic!("expected done, got {other:?}"),
            }
        }

        #[tokio::test]
        async fn a_flagged_stream_sends_no_delta_only_pending() {
            let events = events(BLOCK_REFUNDS, vec![delta("a re"), delta("fund"), done()]).await;
            assert_eq!(events.len(), 2, "{events:?}");
            assert!(matches!(events[0], Ok(Event::Start(_))));
            let done = done_of(&events[1]);
            assert_eq!(done.review_status, i32::from(ReviewStatus::Pending));
            assert_eq!(done.review_id, "item-1");
            assert_eq!(
                done.usage.map(|u| u.total_tokens),
                Some(5),
                "usage still reported"
            );
        }

        #[tokio::test]
        async fn an_unflagged_held_stream_flushes_its_deltas_at_the_end() {
            let events = events(BLOCK_REFUNDS, vec![delta("no "), delta("money"), done()]).await;
            assert_eq!(events.len(), 4, "{events:?}");
            assert_eq!(text(&events[1]), "no ");
            assert_eq!(text(&events[2]), "money");
            assert_eq!(
                done_of(&events[3]).review_status,
                i32::from(ReviewStatus::NotRequired)
            );
        }

        #[tokio::test]
        async fn a_held_stream_cut_short_reveals_nothing() {
            let events = events(BLOCK_REFUNDS, vec![delta("a re"), delta("fund")]).await;
            assert_eq!(events.len(), 2, "{events:?}");
            assert!(matches!(events[0], Ok(Event::Start(_))));
            assert_eq!(events[1].as_ref().unwrap_err().code(), Code::Unavailable);
        }

        #[tokio::test]
        async fn nothing_but_start_goes_out_before_the_answer_ends() {
            let url = serve(Fake::default()).await;
            let (tx, rx) = mpsc::unbounded::<Item>();
            tx.unbounded_send(delta("first")).unwrap();
            let gate = gate(BLOCK_REFUNDS, &url, "hi");
            let mut stream = open(start(), Vec::new(), rx, Settlement::none(), gate)
                .await
                .unwrap();
            assert!(matches!(
                stream.next().await.unwrap().unwrap().event,
                Some(Event::Start(_))
            ));
            tx.unbounded_send(delta(" refund")).unwrap();
            tokio::time::sleep(Duration::from_millis(20)).await;
            assert!(
                futures::poll!(stream.next()).is_pending(),
                "deltas are held"
            );
            tx.unbounded_send(done()).unwrap();
            let done = stream.next().await.unwrap().unwrap();
            assert!(
                matches!(&done.event, Some(Event::Done(d)) if d.review_status == i32::from(ReviewStatus::Pending)),
                "{done:?}"
            );
            assert!(stream.next().await.is_none());
        }

        #[tokio::test]
        async fn a_post_hoc_stream_relays_at_once_and_is_sampled_at_its_end() {
            let events = events(AUDIT_ALL, vec![delta("hel"), delta("lo"), done()]).await;
            assert_eq!(events.len(), 4, "{events:?}");
            let done = done_of(&events[3]);
            assert_eq!(done.review_status, i32::from(ReviewStatus::Sampled));
            assert_eq!(done.review_id, "item-1");
            // Not held: the first delta goes out before the answer ends.
            let url = serve(Fake::default()).await;
            let (tx, rx) = mpsc::unbounded::<Item>();
            tx.unbounded_send(delta("first")).unwrap();
            let gate = gate(AUDIT_ALL, &url, "hi");
            let mut stream = open(start(), Vec::new(), rx, Settlement::none(), gate)
                .await
                .unwrap();
            stream.next().await.unwrap().unwrap();
            assert_eq!(
                text(&stream.next().await.unwrap().map(|r| r.event.unwrap())),
                "first"
            );
        }
    }
}
