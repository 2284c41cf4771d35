//! Steps 1 to 4 of the walk: the request is checked, routed (rules, steering) and prepared for
//! each candidate (context, budget hold).

use super::*;

impl RouterApi {
    /// Steps 1 and 2 for a gRPC request of any execution model.
    pub(super) async fn start<T>(&self, request: Request<T>) -> Result<Walk, Status>
    where
        Completion: From<T>,
    {
        let deadline = Deadline::from_request(&request);
        let (metadata, extensions, body) = request.into_parts();
        self.begin(&metadata, &extensions, deadline, Completion::from(body))
            .await
            .map_err(refused)
    }

    /// Step 2 of the walk, shared by every execution model: checks, route, steering.
    pub(super) async fn begin(
        &self,
        metadata: &MetadataMap,
        extensions: &http::Extensions,
        deadline: Option<Deadline>,
        completion: Completion,
    ) -> Result<Walk, ApiError> {
        completion.check()?;
        let plan = self
            .routes
            .resolve(&completion.model, completion.session())?;
        let history = self.sessions.history(&completion)?;
        // The body's criticality overrides the header's, within what the caller's key may claim
        // (the auth layer already lowered the header to that ceiling).
        let criticality = completion
            .criticality()
            .map(|claimed| claimed.max(weir_mesh::auth::criticality_ceiling(extensions)));
        // Admission ran on the header before the body was read: the body's criticality must pass
        // it too, so that this router sheds the request by the criticality it forwards.
        if let (Some(criticality), Some(admitted)) = (criticality, extensions.get::<Admitted>())
            && admitted.criticality() != criticality
        {
            admitted.readmit(criticality)?;
        }
        let cache = if self.cache.is_on() {
            Control::from_metadata(metadata)?
        } else {
            Control::Normal
        };
        let call = Call::new(metadata, deadline, criticality);
        let tenant = extensions
            .get::<Tenant>()
            .cloned()
            .or_else(|| Tenant::from_metadata(metadata).ok())
            .unwrap_or_default();
        let payer = Payer::new(tenant, ApiKeyId::of(extensions))
            .with_tier(crate::request::price_tier(metadata, extensions))
            .with_request_id(&completion.request_id);
        let mut walk = Walk {
            completion,
            plan,
            call,
            payer,
            history,
            verdict: PendingVerdict::of(extensions),
            notices: Vec::new(),
            cache,
        };
        self.steer(&mut walk, metadata).await;
        Ok(walk)
    }

    /// Lets the route's rules pick a tier ([`crate::rules`]), with a notice naming the rule: a
    /// budget rule's is [`BUDGET_STEERED`], any other's [`ROUTE_RULE`]. The tenant's budget is
    /// read (one GetBudget) only when budgets are on and a rule of the route tests it.
    pub(super) async fn steer(&self, walk: &mut Walk, metadata: &MetadataMap) {
        if !walk.plan.has_rules() {
            return;
        }
        let soft_limit_reached = self.spend.is_on()
            && walk.plan.needs_budget()
            && self.spend.soft_limit_reached(&walk.call, &walk.payer).await;
        let prompt = crate::matching::prompt_text(&walk.completion.messages);
        // Counted for the route's first model, so a rule's threshold means one thing per route.
        let family = walk
            .plan
            .route()
            .and_then(|route| route.candidates().first())
            .and_then(|candidate| self.routes.catalog().get(candidate.model()))
            .map_or(tokens::SIM_FAMILY, |spec| spec.family());
        let prompt_tokens = tokens::count_messages(family, &walk.completion.messages);
        let tenant = walk.payer.tenant().to_string();
        let quality = walk
            .completion
            .labels
            .get(QUALITY_LABEL)
            .map(String::as_str)
            .or_else(|| {
                metadata
                    .get(weir_mesh::metadata::QUALITY)
                    .and_then(|value| value.to_str().ok())
            });
        let facts = RuleFacts {
            prompt: &prompt,
            prompt_tokens,
            quality,
            tenant: &tenant,
            plan: self.routes.plan(&tenant),
            soft_limit_reached,
        };
        let Some(ruled) = walk.plan.ruled(&facts) else {
            return;
        };
        let Some(rule) = ruled.rule() else {
            return;
        };
        let route = ruled.route_alias();
        tracing::debug!(
            tenant = %tenant, route, rule = rule.name(), tier = rule.tier(),
            "a routing rule picked the tier"
        );
        metrics::counter!(
            "weir_route_rule_total",
            "route" => route.to_string(),
            "rule" => rule.name().to_string()
        )
        .increment(1);
        let notice = if rule.needs_budget() {
            Notice {
                reason: BUDGET_STEERED.to_string(),
                message: format!(
                    "tenant {tenant} is above its soft budget limit; route {route} served this \
                     request from its {} tier (rule {})",
                    rule.tier(),
                    rule.name()
                ),
            }
        } else {
            Notice {
                reason: ROUTE_RULE.to_string(),
                message: format!(
                    "rule {} of route {route} picked tier {}",
                    rule.name(),
                    rule.tier()
                ),
            }
        };
        walk.notices.push(notice);
        walk.plan = ruled;
    }

    /// Steps 3 and 4 for one candidate, while the rate limit check that let the request start
    /// early finishes (see [`RATE_LIMIT_OVERLAPPED`]): a refused request's hold is released
    /// before it ends, and no model runs for it.
    pub(super) async fn prepare(&self, walk: &mut Walk, model: &str) -> Result<Prepared, ApiError> {
        let Some(verdict) = walk.verdict.clone() else {
            return self.prepare_candidate(walk, model).await;
        };
        let (admitted, prepared) =
            tokio::join!(verdict.admitted(), self.prepare_candidate(walk, model));
        if admitted {
            walk.verdict = None;
            return prepared;
        }
        let error = rate_limited(walk);
        if let Ok(prepared) = prepared {
            prepared.settlement.failed(&error);
        }
        Err(error)
    }

    /// Steps 3 and 4 for one candidate: its prompt (the session's context for it, then the new
    /// messages) and the hold on its worst-case cost.
    pub(super) async fn prepare_candidate(
        &self,
        walk: &mut Walk,
        model: &str,
    ) -> Result<Prepared, ApiError> {
        let spec = self.routes.catalog().get(model).ok_or_else(|| {
            ApiError::internal(format!("route candidate {model} left the catalog"))
        })?;
        let prompt = walk
            .history
            .prompt(&walk.call, &walk.completion, model, spec, &mut walk.notices)
            .await?;
        let prompt_tokens = tokens::count_messages(spec.family(), &prompt);
        let room = spec.context_window.saturating_sub(prompt_tokens);
        let max_output = walk.completion.max_output_tokens(spec).min(room);
        let hold = self
            .spend
            .reserve(
                &walk.call,
                &walk.payer,
                HoldFor {
                    model,
                    purpose: Purpose::Call,
                    prompt_tokens,
                    max_output_tokens: max_output,
                },
                &mut walk.notices,
            )
            .await?;
        let append = walk.history.append(&walk.completion);
        Ok(Prepared {
            prompt,
            max_output,
            settlement: Settlement::new(&walk.call, hold, append, spec.family()),
        })
    }
}
