//! Step 5 to 8 of the walk: the candidates are called in order, the answer settled, reviewed and
//! delivered.

use super::*;

impl RouterApi {
    /// Step 5, the same for every execution model: the candidates in order, each later one only
    /// after a fallback-worthy failure of the one before ([`crate::fallback`]), then the route's
    /// degraded answer. Steps 3 and 4 run again for each candidate tried (its own context size and
    /// price); a failed candidate is settled by the one rule of [`Settlement::failed`].
    pub(super) async fn serve(
        &self,
        walk: &mut Walk,
        delivery: Delivery,
    ) -> Result<Served, Status> {
        let plan = walk.plan.clone();
        let mut last_error = None;
        for (position, candidate) in plan.candidates().iter().enumerate() {
            let model = candidate.model();
            if position > 0 && out_of_time(&walk.call) {
                break;
            }
            // 3., 4. Context and reservation for this candidate.
            let prepared = self.prepare(walk, model).await.map_err(refused)?;
            let started = tokio::time::Instant::now();
            let result = self
                .attempt(walk, delivery, model, position, prepared)
                .await;
            // The canary's rollback checks compare its calls with the primary's.
            if let Some(canary) = plan.route().and_then(|route| route.canary()) {
                let error = result.as_ref().err();
                canary.record(model, error, walk.call.deadline(), started.elapsed());
            }
            match result {
                Ok(answer) => {
                    return Ok(Served::Model {
                        answer,
                        model: model.to_string(),
                        position,
                    });
                }
                Err(error) => {
                    let error = failed(&plan, model, error)?;
                    walk.notices.push(fallback_notice(model, &error));
                    last_error = Some(error);
                }
            }
        }
        let text = degraded(&plan, &walk.completion, last_error, &mut walk.notices)?;
        Ok(Served::Degraded { text })
    }

    /// One candidate's model call. A stream is only returned once its first event has arrived: a
    /// failure before it can still fall back, as the client has seen nothing yet.
    pub(super) async fn attempt(
        &self,
        walk: &Walk,
        delivery: Delivery,
        model: &str,
        position: usize,
        prepared: Prepared,
    ) -> Result<Answer, ApiError> {
        let Prepared {
            prompt,
            max_output,
            settlement,
        } = prepared;
        let (call, completion) = (&walk.call, &walk.completion);
        let tenant = walk.payer.tenant().as_str();
        let route = walk.plan.route_alias();
        let gate = self
            .reviews
            .gate(call, completion, tenant, route, model, &prompt);
        match delivery {
            Delivery::Unary => {
                let request = completion.generate_request(model, prompt, max_output);
                match self.inference.generate(call, model, request).await {
                    Ok(response) => Ok(Answer::Unary {
                        response,
                        settlement,
                        gate,
                    }),
                    Err(error) => {
                        settlement.failed(&error);
                        Err(error)
                    }
                }
            }
            Delivery::Stream => {
                let request = completion.generate_stream_request(model, prompt, max_output);
                let upstream = match self.inference.generate_stream(call, model, request).await {
                    Ok(upstream) => upstream,
                    Err(error) => {
                        settlement.failed(&error);
                        return Err(error);
                    }
                };
                let start = start_event(&walk.plan, model, walk.plan.served_by(position));
                let notices = walk.notices.clone();
                let stream = relay::open(start, notices, upstream, settlement, gate).await?;
                Ok(Answer::Stream(stream))
            }
        }
    }

    /// Steps 6 to 8 of a unary answer: settle and review it (commit, append, queue), then the
    /// response; an error only for a blocking review that could not be queued.
    pub(super) async fn respond(
        walk: Walk,
        answer: (GenerateResponse, Settlement, Option<Gate>),
        model: &str,
        position: usize,
    ) -> Result<CompleteResponse, Status> {
        let (response, settlement, gate) = answer;
        let Walk {
            plan, mut notices, ..
        } = walk;
        let usage = response.usage;
        let message = response.message.clone().unwrap_or_else(|| Message {
            role: Role::Assistant.into(),
            ..Message::default()
        });
        // 6. Commit the usage and append the exchange; 7. the review policy may hold or sample
        //    the answer.
        let text = message.content.clone();
        let concluded = review_gate::conclude(gate, settlement, usage, &text, Some(message))
            .await
            .map_err(refused)?;
        let settled = concluded.settled;
        notices.extend(settled.notices);
        tracing::debug!(
            requested = plan.requested_model(),
            route = plan.route_alias(),
            model,
            position,
            input_tokens = usage.map(|u| u.input_tokens),
            output_tokens = usage.map(|u| u.output_tokens),
            cost_micros = settled.cost_micros,
            "completed"
        );
        let served_model = if response.model.is_empty() {
            model.to_string()
        } else {
            response.model
        };
        Ok(CompleteResponse {
            // Withheld for a blocking review: the caller gets it from the review service.
            message: response.message.filter(|_| !concluded.withheld),
            model: served_model,
            requested_model: plan.requested_model().to_string(),
            route: plan.route_alias().to_string(),
            served_by: plan.served_by(position).into(),
            finish_reason: response.finish_reason,
            usage,
            cost_micros: settled.cost_micros,
            review_status: concluded.status.into(),
            review_id: concluded.review_id,
            trace_id: current_trace_id(),
            notices,
        })
    }
}

/// The `start` event of a stream served by `model`.
pub(super) fn start_event(plan: &Plan, model: &str, served_by: ServedBy) -> Start {
    Start {
        model: model.to_string(),
        requested_model: plan.requested_model().to_string(),
        route: plan.route_alias().to_string(),
        served_by: served_by.into(),
        trace_id: current_trace_id(),
    }
}

/// Whether the caller's deadline has passed, so no further candidate is worth trying.
pub(super) fn out_of_time(call: &Call) -> bool {
    call.deadline()
        .is_some_and(|deadline| deadline.is_expired())
}

/// A failed model call: `Ok(error)` when the walk may try the next candidate, `Err(status)` when
/// the failure ends the request (passed through with its details).
pub(super) fn failed(plan: &Plan, model: &str, error: ApiError) -> Result<ApiError, Status> {
    tracing::debug!(
        requested = plan.requested_model(),
        route = plan.route_alias(),
        model,
        code = ?error.code(),
        reason = error.reason(),
        "model call failed"
    );
    if fallback::falls_back(&error) {
        Ok(error)
    } else {
        Err(Status::from(error))
    }
}

/// The notice recording that `model` failed and the walk moved on.
pub(super) fn fallback_notice(model: &str, error: &ApiError) -> Notice {
    Notice {
        reason: FALLBACK_USED.to_string(),
        message: format!("{model} failed ({}); tried the next model", error.reason()),
    }
}

/// Every candidate failed: the route's degraded answer (its notice pushed onto `notices`), or the
/// last error.
pub(super) fn degraded(
    plan: &Plan,
    completion: &Completion,
    last_error: Option<ApiError>,
    notices: &mut Vec<Notice>,
) -> Result<String, Status> {
    let last_error =
        last_error.unwrap_or_else(|| ApiError::internal("the route has no candidate to call"));
    match plan.degraded() {
        Some(degraded) => {
            tracing::warn!(
                requested = plan.requested_model(),
                route = plan.route_alias(),
                reason = last_error.reason(),
                "every model failed; serving the degraded answer"
            );
            notices.push(Notice {
                reason: DEGRADED.to_string(),
                message: format!(
                    "every model of route {} failed (last: {}); this is the route's degraded answer",
                    plan.route_alias(),
                    last_error.reason()
                ),
            });
            Ok(degraded.text(&completion.messages))
        }
        None => Err(Status::from(last_error)),
    }
}

/// The trace id of the call being answered (empty when telemetry is not installed).
pub(super) fn current_trace_id() -> String {
    weir_mesh::trace::current_trace_id().unwrap_or_default()
}

/// Notice reason: an earlier candidate failed and a later one served the answer.
pub const FALLBACK_USED: &str = "FALLBACK_USED";
/// Notice reason: every candidate failed and the route's degraded answer was served.
pub const DEGRADED: &str = "DEGRADED";

/// A request refused before (or between) model calls, with its details.
pub(super) fn refused(error: ApiError) -> Status {
    tracing::debug!(code = ?error.code(), reason = error.reason(), "refused");
    Status::from(error)
}
