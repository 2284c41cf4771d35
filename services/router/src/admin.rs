//! `weir.router.v1.RouteAdminService`: operators read the routes and their canaries' state, and
//! resume a rolled-back canary ([`crate::canary`]).
//!
//! Every RPC needs the `admin` role (the server's role rule, see [`crate::server`]). The state is
//! this process's: with several router replicas an operator asks each one (`weir routes
//! --router URL --router URL`).
//!
//! - `ListRoutes`: each route (alias order) with its default tier, named tiers and canary
//!   (configured and current weight, active or rolled back with when and why, failed checks so
//!   far, the last check's figures), and the response cache's hits and misses since start.
//! - `ResumeCanary`: the route's canary back at its configured weight with no failed check
//!   counted; `PauseCanary`: the route's canary off (weight 0) at once, until resumed. Both:
//!   NOT_FOUND (`ROUTE_NOT_FOUND`) for an unknown route, FAILED_PRECONDITION
//!   (`NO_CANARY`) for a route without a canary, INVALID_ARGUMENT for an empty `route`.

use std::{sync::Arc, time::SystemTime};

use tonic::{Code, Request, Response, Status};
use weir_mesh::ApiError;
use weir_proto::router::{
    CacheStats, CanaryCheck, CanaryCheckResult, CanaryInfo, CanaryState, ListRoutesRequest,
    ListRoutesResponse, PauseCanaryRequest, PauseCanaryResponse, ResumeCanaryRequest,
    ResumeCanaryResponse, RouteInfo, RouteTier,
    route_admin_service_server::{RouteAdminService, RouteAdminServiceServer},
};

use crate::{
    cache::ResponseCache,
    canary::{self, Canary, Cause, Verdict},
    route::{Candidate, Route, RouteTable},
};

/// ErrorInfo reason of a canary RPC on a route that has no canary.
pub const NO_CANARY: &str = "NO_CANARY";

/// The admin service over one router's routes and response cache. Cheap to clone.
#[derive(Debug, Clone)]
pub struct RouteAdmin {
    routes: Arc<RouteTable>,
    cache: ResponseCache,
}

impl RouteAdmin {
    /// The service for `routes` (the same table the router resolves requests against, so that
    /// a resumed canary is the one requests see) and `cache`.
    pub(crate) fn new(routes: Arc<RouteTable>, cache: ResponseCache) -> Self {
        Self { routes, cache }
    }

    /// The generated tonic server.
    pub fn into_service(self) -> RouteAdminServiceServer<Self> {
        RouteAdminServiceServer::new(self)
    }

    fn canary_of(&self, alias: &str) -> Result<(&Route, &Canary), ApiError> {
        if alias.is_empty() {
            return Err(ApiError::invalid_argument(
                "route",
                "required: name a route alias (see ListRoutes)",
            ));
        }
        let Some(route) = self.routes.get(alias) else {
            let known: Vec<&str> = self.routes.routes().map(Route::alias).collect();
            let message = format!("route \"{alias}\" not found; routes: {}", known.join(", "));
            return Err(ApiError::new(Code::NotFound, "ROUTE_NOT_FOUND", message)
                .with_metadata("route", alias.to_string()));
        };
        let canary = route.canary().ok_or_else(|| {
            ApiError::new(
                Code::FailedPrecondition,
                NO_CANARY,
                format!(
                    "route \"{alias}\" has no canary: add [router.routes.{alias}.canary] to the \
                     config"
                ),
            )
        })?;
        Ok((route, canary))
    }
}

#[tonic::async_trait]
impl RouteAdminService for RouteAdmin {
    async fn list_routes(
        &self,
        _request: Request<ListRoutesRequest>,
    ) -> Result<Response<ListRoutesResponse>, Status> {
        let (hits, misses) = self.cache.hits_and_misses();
        Ok(Response::new(ListRoutesResponse {
            routes: self.routes.routes().map(route_info).collect(),
            cache: Some(CacheStats {
                enabled: self.cache.is_on(),
                hits,
                misses,
            }),
        }))
    }

    async fn resume_canary(
        &self,
        request: Request<ResumeCanaryRequest>,
    ) -> Result<Response<ResumeCanaryResponse>, Status> {
        let alias = request.into_inner().route;
        let (route, canary) = self.canary_of(&alias)?;
        canary.resume();
        Ok(Response::new(ResumeCanaryResponse {
            route: Some(route_info(route)),
        }))
    }

    async fn pause_canary(
        &self,
        request: Request<PauseCanaryRequest>,
    ) -> Result<Response<PauseCanaryResponse>, Status> {
        let alias = request.into_inner().route;
        let (route, canary) = self.canary_of(&alias)?;
        canary.pause(SystemTime::now());
        Ok(Response::new(PauseCanaryResponse {
            route: Some(route_info(route)),
        }))
    }
}

fn models(candidates: &[Candidate]) -> Vec<String> {
    candidates.iter().map(|c| c.model().to_string()).collect()
}

fn route_info(route: &Route) -> RouteInfo {
    RouteInfo {
        alias: route.alias().to_string(),
        description: route.description().to_string(),
        models: models(route.candidates()),
        tiers: route
            .tiers()
            .map(|(name, candidates)| RouteTier {
                name: name.to_string(),
                models: models(candidates),
            })
            .collect(),
        canary: route.canary().map(canary_info),
    }
}

fn canary_info(canary: &Canary) -> CanaryInfo {
    let status = canary.status();
    let settings = canary.settings();
    let state = match status.off.as_ref().map(|off| off.cause) {
        None => CanaryState::Active,
        Some(Cause::Checks) => CanaryState::RolledBack,
        Some(Cause::Operator) => CanaryState::Paused,
    };
    CanaryInfo {
        model: status.model,
        configured_weight: status.configured_weight,
        current_weight: status.current_weight,
        state: state.into(),
        rolled_back_time: status.off.as_ref().map(|off| off.at.into()),
        rollback_reason: status.off.map(|off| off.reason).unwrap_or_default(),
        failed_checks: status.failed_checks,
        failed_checks_limit: settings.failed_checks,
        interval: prost_types::Duration::try_from(settings.interval).ok(),
        last_check: status.last_check.map(check),
    }
}

fn check(check: canary::Check) -> CanaryCheck {
    let duration = |d: Option<std::time::Duration>| d.and_then(|d| d.try_into().ok());
    let (result, reason) = match check.verdict {
        Verdict::Skipped => (CanaryCheckResult::Skipped, String::new()),
        Verdict::Passed => (CanaryCheckResult::Passed, String::new()),
        Verdict::Failed(reason) => (CanaryCheckResult::Failed, reason),
    };
    let figures = check.figures;
    CanaryCheck {
        time: Some(check.at.into()),
        result: result.into(),
        reason,
        canary_calls: figures.canary_calls,
        canary_failures: figures.canary_failures,
        primary_calls: figures.primary_calls,
        primary_failures: figures.primary_failures,
        canary_latency_p95: duration(figures.canary_p95),
        primary_latency_p95: duration(figures.primary_p95),
    }
}
