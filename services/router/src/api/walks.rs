//! The unary and streaming walks end to end, with the response cache and the idempotency claim in
//! front.

use super::*;

impl RouterApi {
    /// The response cache's step, between the idempotency claim and step 3: an identical
    /// deterministic request's stored answer (no budget hold, no model call), once the rate limit
    /// has admitted the request; or `None`, with what the answer is to be offered to.
    pub(super) async fn look_up(&self, walk: &Walk, rpc: Rpc) -> Result<Looked, Status> {
        let looked = self
            .cache
            .look(walk.cache, rpc, walk.payer.tenant(), &walk.completion)
            .await;
        if matches!(looked, Looked::Hit(_))
            && let Some(verdict) = &walk.verdict
            && !verdict.admitted().await
        {
            return Err(refused(rate_limited(walk)));
        }
        Ok(looked)
    }

    /// What a cache hit is charged: the stored answer's usage scaled by
    /// `router.cache.cached_price_fraction` at `model`'s price, reserved and committed like a
    /// model call's (so a spent budget refuses it); 0, with nothing reserved, by default.
    pub(super) async fn charge_hit(
        &self,
        walk: &Walk,
        model: &str,
        usage: Option<Usage>,
        notices: &mut Vec<Notice>,
    ) -> Result<i64, Status> {
        let fraction = self.cache.price_fraction();
        let Some(usage) = usage.filter(|_| fraction > 0.0) else {
            return Ok(0);
        };
        let usage = cache::scaled(usage, fraction);
        let tokens = |n: i64| u32::try_from(n.max(0)).unwrap_or(u32::MAX);
        let hold = self
            .spend
            .reserve(
                &walk.call,
                &walk.payer,
                HoldFor {
                    model,
                    purpose: Purpose::CacheHit,
                    prompt_tokens: tokens(usage.input_tokens),
                    max_output_tokens: tokens(usage.output_tokens),
                },
                notices,
            )
            .await
            .map_err(refused)?;
        let Some(hold) = hold else {
            return Ok(0);
        };
        match hold.commit(&walk.call, usage).await {
            Ok(cost) => Ok(cost),
            Err(error) => {
                tracing::warn!(
                    reason = error.reason(),
                    "a cache hit's charge was not committed"
                );
                Ok(0)
            }
        }
    }

    /// Steps 5 to 8 of a unary request, or its answer from the response cache.
    pub(super) async fn complete_walk(&self, walk: Walk) -> Result<CompleteResponse, Status> {
        let pending = match self.look_up(&walk, Rpc::Complete).await? {
            Looked::Hit(entry) => match cache::hit_answer(&entry, current_trace_id()) {
                Some(mut response) => {
                    let model = response.model.clone();
                    response.cost_micros = self
                        .charge_hit(&walk, &model, response.usage, &mut response.notices)
                        .await?;
                    return Ok(response);
                }
                None => None,
            },
            Looked::Miss(pending) => pending,
        };
        let result = self.complete_model_walk(walk).await;
        if let (Some(pending), Ok(response)) = (pending, &result) {
            pending.store_answer(response).await;
        }
        result
    }

    /// Steps 5 to 8 of a unary request.
    pub(super) async fn complete_model_walk(
        &self,
        mut walk: Walk,
    ) -> Result<CompleteResponse, Status> {
        Ok(match self.serve(&mut walk, Delivery::Unary).await? {
            Served::Model {
                answer:
                    Answer::Unary {
                        response,
                        settlement,
                        gate,
                    },
                model,
                position,
            } => Self::respond(walk, (response, settlement, gate), &model, position).await?,
            Served::Model {
                answer: Answer::Stream(_),
                ..
            } => return Err(Status::internal("a unary walk produced a stream")),
            Served::Degraded { text } => CompleteResponse {
                message: Some(Message {
                    role: Role::Assistant.into(),
                    content: text,
                    ..Message::default()
                }),
                model: String::new(),
                requested_model: walk.plan.requested_model().to_string(),
                route: walk.plan.route_alias().to_string(),
                served_by: ServedBy::Degraded.into(),
                finish_reason: FinishReason::Stop.into(),
                usage: Some(Usage::default()),
                cost_micros: 0,
                review_status: ReviewStatus::NotRequired.into(),
                review_id: String::new(),
                trace_id: current_trace_id(),
                notices: walk.notices,
            },
        })
    }

    /// Steps 5 to 8 of a streamed request, or its answer from the response cache (replayed as
    /// the stream it was stored as).
    pub(super) async fn stream_walk(&self, walk: Walk) -> Result<CompleteStream, Status> {
        let pending = match self.look_up(&walk, Rpc::CompleteStream).await? {
            Looked::Hit(entry) => match cache::hit_events(&entry, current_trace_id()) {
                Some(mut events) => {
                    let (model, usage) = cache::served(&events);
                    let mut notices = Vec::new();
                    let cost = self.charge_hit(&walk, &model, usage, &mut notices).await?;
                    cache::set_cost(&mut events, cost, notices);
                    return Ok(cache::replayed(events));
                }
                None => None,
            },
            Looked::Miss(pending) => pending,
        };
        let stream = self.stream_model_walk(walk).await?;
        Ok(match pending {
            Some(pending) => pending.storing(stream),
            None => stream,
        })
    }

    /// Steps 5 to 8 of a streamed request: the stream, which settles itself as it ends.
    pub(super) async fn stream_model_walk(&self, mut walk: Walk) -> Result<CompleteStream, Status> {
        // 6./7. Budget commit, session append and review of a streamed answer run when the relay
        //    sees `done` (or the stream ends early).
        match self.serve(&mut walk, Delivery::Stream).await? {
            Served::Model {
                answer: Answer::Stream(stream),
                model,
                position,
            } => {
                tracing::debug!(
                    requested = walk.plan.requested_model(),
                    route = walk.plan.route_alias(),
                    model,
                    position,
                    "streaming"
                );
                Ok(stream)
            }
            Served::Model {
                answer: Answer::Unary { .. },
                ..
            } => Err(Status::internal("a streaming walk produced a unary answer")),
            Served::Degraded { text } => {
                let start = start_event(&walk.plan, "", ServedBy::Degraded);
                Ok(relay::degraded(start, text, walk.notices))
            }
        }
    }

    /// Claims the request's `request_id`, if it has one (see [`crate::replay`]).
    pub(super) async fn claim(&self, walk: &Walk, rpc: Rpc) -> Result<Option<Claim>, Status> {
        if walk.completion.request_id.is_empty() {
            return Ok(None);
        }
        // A refused request claims nothing: its retry must run, not replay the refusal.
        if let Some(verdict) = &walk.verdict
            && !verdict.admitted().await
        {
            return Err(refused(rate_limited(walk)));
        }
        self.idempotency
            .claim(
                walk.payer.tenant(),
                &walk.completion.request_id,
                replay::fingerprint(rpc, &walk.completion),
                walk.call.deadline(),
            )
            .await
            .map(Some)
            .map_err(refused)
    }
}
