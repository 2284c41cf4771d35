//! `weir routes`: the router's routes, canaries and response cache from a terminal.
//!
//! ```text
//! weir routes [--router URL]...                        # each route, its weights, canary state, cache
//! weir routes canary resume ROUTE [--router URL]...    # turn a rolled-back canary back on
//! weir routes canary pause ROUTE [--router URL]...     # take a canary off now
//! ```
//!
//! Canary state is each router process's own, so both take every replica's address: `--router`
//! repeated or comma-separated (`WEIR_ROUTER_URL`, default `http://127.0.0.1:50051`). `resume`
//! and `pause` try every router given and fail, naming them, if any refused. The key is
//! `--api-key` (`WEIR_API_KEY`) and needs the `admin` role.

use std::{io::Write, time::SystemTime};

use clap::Subcommand;
use tonic::transport::Channel;
use weir_proto::router::{
    CanaryCheck, CanaryCheckResult, CanaryInfo, CanaryState, ListRoutesRequest, ListRoutesResponse,
    PauseCanaryRequest, ResumeCanaryRequest, RouteInfo,
    route_admin_service_client::RouteAdminServiceClient,
};

use crate::call::{failed, request};

/// Which routers, and the key.
#[derive(Debug, Clone, clap::Args)]
pub struct RoutesOptions {
    /// Router address; repeat (or separate with commas) for every replica.
    #[arg(
        long = "router",
        global = true,
        env = "WEIR_ROUTER_URL",
        value_delimiter = ',',
        default_value = "http://127.0.0.1:50051"
    )]
    pub routers: Vec<String>,
    /// API key with the `admin` role, sent as `authorization: Bearer <key>`.
    #[arg(long, global = true, env = "WEIR_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
}

/// A `weir routes` subcommand; none lists the routes.
#[derive(Debug, Clone, Subcommand)]
pub enum RoutesCommand {
    /// A route's canary.
    Canary {
        /// What to do with it.
        #[command(subcommand)]
        command: CanaryCommand,
    },
}

/// A `weir routes canary` subcommand.
#[derive(Debug, Clone, Subcommand)]
pub enum CanaryCommand {
    /// Turn a rolled-back or paused canary back on at its configured weight, on every router
    /// given.
    Resume {
        /// The route alias.
        route: String,
    },
    /// Take a canary off (weight 0) at once, on every router given, until it is resumed.
    Pause {
        /// The route alias.
        route: String,
    },
}

/// Runs `weir routes` (`command` `None` lists), writing its output to `out`.
pub async fn run(
    options: RoutesOptions,
    command: Option<RoutesCommand>,
    out: &mut impl Write,
) -> anyhow::Result<()> {
    let key = options.api_key.as_deref();
    match command {
        None => {
            for url in &options.routers {
                let listed = connect(url)
                    .await?
                    .list_routes(request(key, ListRoutesRequest {})?)
                    .await
                    .map_err(|s| failed(&s).context(format!("router {url}")))?
                    .into_inner();
                print_routes(url, &listed, out)?;
            }
            Ok(())
        }
        Some(RoutesCommand::Canary { command }) => {
            let mut failures = Vec::new();
            for url in &options.routers {
                match change(url, key, &command).await {
                    Ok(canary) => writeln!(
                        out,
                        "{url}: canary {} of route {} {} at weight {}",
                        canary.model,
                        command.route(),
                        command.done(),
                        weight(canary.current_weight)
                    )?,
                    Err(error) => failures.push(format!("{url}: {error:#}")),
                }
            }
            if failures.is_empty() {
                Ok(())
            } else {
                anyhow::bail!(
                    "the canary was not {} on {}",
                    command.done(),
                    failures.join("; ")
                )
            }
        }
    }
}

impl CanaryCommand {
    fn route(&self) -> &str {
        match self {
            CanaryCommand::Resume { route } | CanaryCommand::Pause { route } => route,
        }
    }

    fn done(&self) -> &'static str {
        match self {
            CanaryCommand::Resume { .. } => "resumed",
            CanaryCommand::Pause { .. } => "paused",
        }
    }
}

async fn connect(url: &str) -> anyhow::Result<RouteAdminServiceClient<Channel>> {
    let channel = Channel::from_shared(url.to_string())
        .map_err(|e| anyhow::anyhow!("invalid router URL {url:?}: {e}"))?
        .connect()
        .await
        .map_err(|e| anyhow::anyhow!("cannot reach the router at {url}: {e}"))?;
    Ok(RouteAdminServiceClient::new(channel))
}

/// Resumes or pauses the canary on the router at `url`; its state afterwards.
async fn change(
    url: &str,
    key: Option<&str>,
    command: &CanaryCommand,
) -> anyhow::Result<CanaryInfo> {
    let mut client = connect(url).await?;
    let route = command.route().to_string();
    let answered = match command {
        CanaryCommand::Resume { .. } => client
            .resume_canary(request(key, ResumeCanaryRequest { route })?)
            .await
            .map(|r| r.into_inner().route),
        CanaryCommand::Pause { .. } => client
            .pause_canary(request(key, PauseCanaryRequest { route })?)
            .await
            .map(|r| r.into_inner().route),
    };
    answered
        .map_err(|s| failed(&s))?
        .and_then(|r| r.canary)
        .ok_or_else(|| anyhow::anyhow!("the router answered without the canary"))
}

/// One router's routes as a table, then each canary's last check and the cache's hit rate.
fn print_routes(
    url: &str,
    listed: &ListRoutesResponse,
    out: &mut impl Write,
) -> anyhow::Result<()> {
    writeln!(out, "router {url}")?;
    let rows: Vec<[String; 5]> = listed.routes.iter().map(row).collect();
    let header = ["ROUTE", "MODELS", "CANARY", "WEIGHT (CONF/NOW)", "STATE"].map(String::from);
    let mut widths = header.clone().map(|h| h.len());
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.len());
        }
    }
    for row in std::iter::once(&header).chain(&rows) {
        let cells: Vec<String> = row
            .iter()
            .zip(widths)
            .map(|(cell, width)| format!("{cell:width$}"))
            .collect();
        writeln!(out, "{}", cells.join("  ").trim_end())?;
    }
    for route in &listed.routes {
        for tier in &route.tiers {
            writeln!(
                out,
                "  {} tier {}: {}",
                route.alias,
                tier.name,
                tier.models.join(" > ")
            )?;
        }
        if let Some(canary) = &route.canary {
            print_canary(&route.alias, canary, out)?;
        }
    }
    match &listed.cache {
        Some(cache) if cache.enabled => {
            let looked = cache.hits + cache.misses;
            let rate = if looked == 0 {
                "no lookups yet".to_string()
            } else {
                format!("{:.1}% hit rate", cache.hits as f64 * 100.0 / looked as f64)
            };
            writeln!(
                out,
                "cache: {} hits, {} misses ({rate})",
                cache.hits, cache.misses
            )?;
        }
        _ => writeln!(out, "cache: off")?,
    }
    Ok(())
}

fn row(route: &RouteInfo) -> [String; 5] {
    let (canary, weights, state) = match &route.canary {
        None => ("-".to_string(), "-".to_string(), "-".to_string()),
        Some(canary) => (
            canary.model.clone(),
            format!(
                "{}/{}",
                weight(canary.configured_weight),
                weight(canary.current_weight)
            ),
            state(canary).to_string(),
        ),
    };
    [
        route.alias.clone(),
        route.models.join(" > "),
        canary,
        weights,
        state,
    ]
}

fn state(canary: &CanaryInfo) -> &'static str {
    match canary.state() {
        CanaryState::RolledBack => "rolled back",
        CanaryState::Paused => "paused",
        CanaryState::Active | CanaryState::Unspecified => "active",
    }
}

fn print_canary(alias: &str, canary: &CanaryInfo, out: &mut impl Write) -> anyhow::Result<()> {
    if let Some(when) = canary.rolled_back_time {
        writeln!(
            out,
            "  {alias} canary {} {}: {}",
            state(canary),
            time(when),
            canary.rollback_reason
        )?;
    }
    let Some(check) = &canary.last_check else {
        return Ok(writeln!(out, "  {alias} canary: not checked yet")?);
    };
    writeln!(
        out,
        "  {alias} canary last check {}: {}; {} failed in a row of {} allowed",
        check.time.map(time).unwrap_or_default(),
        verdict(check),
        canary.failed_checks,
        canary.failed_checks_limit
    )?;
    Ok(())
}

fn verdict(check: &CanaryCheck) -> String {
    let figures = format!(
        "canary {}/{} failed, primary {}/{} failed",
        check.canary_failures, check.canary_calls, check.primary_failures, check.primary_calls
    );
    match check.result() {
        CanaryCheckResult::Failed => format!("failed ({}; {figures})", check.reason),
        CanaryCheckResult::Passed => format!("passed ({figures})"),
        CanaryCheckResult::Skipped | CanaryCheckResult::Unspecified => {
            format!("skipped, too few canary calls ({figures})")
        }
    }
}

/// A share as a short decimal: `0.1`, `0`, `0.25`.
fn weight(share: f64) -> String {
    let text = format!("{share:.4}");
    text.trim_end_matches('0').trim_end_matches('.').to_string()
}

fn time(timestamp: prost_types::Timestamp) -> String {
    SystemTime::try_from(timestamp)
        .map(|t| humantime::format_rfc3339_seconds(t).to_string())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights_are_short() {
        assert_eq!(weight(0.1), "0.1");
        assert_eq!(weight(0.0), "0");
        assert_eq!(weight(1.0), "1");
        assert_eq!(weight(0.25), "0.25");
    }
}
