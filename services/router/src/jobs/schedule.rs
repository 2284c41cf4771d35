//! Recurring batches: `[[router.jobs.schedules]]` creates a batch from an OpenAI batch input file
//! on a cron schedule.
//!
//! ```toml
//! [[router.jobs.schedules]]
//! name = "nightly-digest"            # letters, digits, '-' and '_'; unique
//! cron = "0 2 * * *"                 # minute hour day month weekday (a 6th, leading field: seconds)
//! timezone = "Europe/Stockholm"      # IANA name; default UTC
//! tenant = "acme"                    # whose batch it is (and who pays)
//! input = "/etc/weir/nightly.jsonl"  # OpenAI batch input, read at each run
//! completion_window = "12h"          # default [router.jobs.batches] default_window
//! catch_up = "1h"                    # how late a missed run may still start (default 1h)
//! labels = { team = "search" }       # added to the batch, with schedule = <name> and
//!                                    # schedule_run = <the run time, RFC 3339>
//! ```
//!
//! # Exactly one batch per run, from any number of processes
//!
//! Every process that runs workers (the router with `workers > 0`, `weir serve worker`) runs the
//! schedules. Each run is created with `CreateBatch` through the router (over gRPC, signed with the
//! mesh identity for the schedule's tenant, like a job's `Complete`), with the `request_id`
//! `schedule:<name>:<run time, Unix seconds>`. `CreateBatch` is idempotent by `request_id`, so
//! when three processes fire the same run, one batch is created and the others get it back. The
//! input is checked like any `CreateBatch`; a run whose file is missing or invalid is logged and
//! skipped (it would fail the same way again), and the next run reads the file afresh.
//!
//! # Missed runs
//!
//! A process that starts (or wakes) within `catch_up` after a run time creates that run late: a
//! restart during a deploy does not skip the nightly batch, and a run already created by another
//! process is returned, not repeated. Runs older than `catch_up` are skipped, as cron and
//! Kubernetes' CronJob (`startingDeadlineSeconds`) do, rather than piling up after an outage.
//! While the router cannot be reached, a run is retried (1 s, doubling to 30 s) until its
//! `catch_up` has passed.

use std::{
    collections::{BTreeMap, HashSet},
    path::PathBuf,
    str::FromStr,
    time::Duration,
};

use chrono::{DateTime, Utc};
use croner::{Cron, parser::CronParser};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use tonic::{Code, Status};
use weir_mesh::{config::ConfigError, criticality::Criticality, metadata::TENANT, tenant::Tenant};
use weir_proto::router::{Batch, CreateBatchRequest};

use super::worker::RouterClient;
use crate::openai::batch_input;

/// Default `catch_up`.
pub const DEFAULT_CATCH_UP: Duration = Duration::from_secs(3600);
/// First pause before a failed run is tried again (doubled up to [`MAX_RETRY`]).
const FIRST_RETRY: Duration = Duration::from_secs(1);
/// Longest pause between tries of a failed run.
const MAX_RETRY: Duration = Duration::from_secs(30);

fn utc() -> String {
    "UTC".to_string()
}

fn default_catch_up() -> Duration {
    DEFAULT_CATCH_UP
}

/// One `[[router.jobs.schedules]]` entry (see the module documentation).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScheduleConfig {
    /// Unique name: letters, digits, `-` and `_`.
    pub name: String,
    /// Cron expression: 5 fields (minute hour day-of-month month day-of-week), or 6 with seconds
    /// first.
    pub cron: String,
    /// IANA time zone the expression is read in (default `UTC`).
    #[serde(default = "utc")]
    pub timezone: String,
    /// The tenant the batch belongs to.
    pub tenant: String,
    /// OpenAI batch input file (JSONL), read at each run.
    pub input: PathBuf,
    /// Completion window of each batch (default: `[router.jobs.batches] default_window`).
    #[serde(default, with = "humantime_serde::option")]
    pub completion_window: Option<Duration>,
    /// How late a missed run may still be created (default 1 h).
    #[serde(default = "default_catch_up", with = "humantime_serde")]
    pub catch_up: Duration,
    /// Labels of each batch (plus `schedule = <name>`, `schedule_run = <run time>`).
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

/// A parsed schedule.
#[derive(Debug, Clone)]
pub struct Schedule {
    config: ScheduleConfig,
    cron: Cron,
    timezone: chrono_tz::Tz,
    tenant: Tenant,
}

impl Schedule {
    /// Parses and checks `config`, naming the bad key under `key` (`router.jobs.schedules[0]`).
    pub fn new(config: ScheduleConfig, key: &str) -> Result<Self, ConfigError> {
        let invalid =
            |field: &str, message: String| ConfigError::invalid(format!("{key}.{field}"), message);
        if config.name.is_empty()
            || config.name.len() > 64
            || !config
                .name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err(invalid(
                "name",
                "1 to 64 letters, digits, '-' or '_'".to_string(),
            ));
        }
        let cron = CronParser::builder()
            .build()
            .parse(&config.cron)
            .map_err(|error| {
                invalid(
                    "cron",
                    format!(
                        "{error}: expected 5 fields (minute hour day month weekday), or 6 with \
                         seconds first, e.g. \"0 2 * * *\""
                    ),
                )
            })?;
        let timezone = chrono_tz::Tz::from_str(&config.timezone).map_err(|_| {
            invalid(
                "timezone",
                format!(
                    "unknown time zone {:?}: use an IANA name such as \"UTC\" or \
                     \"Europe/Stockholm\"",
                    config.timezone
                ),
            )
        })?;
        let tenant =
            Tenant::new(&config.tenant).map_err(|error| invalid("tenant", error.to_string()))?;
        if config.input.as_os_str().is_empty() {
            return Err(invalid(
                "input",
                "the path of an OpenAI batch input file (JSONL) is required".to_string(),
            ));
        }
        if config.catch_up.is_zero() {
            return Err(invalid("catch_up", "must be > 0".to_string()));
        }
        Ok(Self {
            config,
            cron,
            timezone,
            tenant,
        })
    }

    /// The schedule's name.
    pub fn name(&self) -> &str {
        &self.config.name
    }

    /// The first run strictly after `after`.
    pub fn next_after(&self, after: DateTime<Utc>) -> Option<DateTime<Utc>> {
        let local = after.with_timezone(&self.timezone);
        self.cron
            .find_next_occurrence(&local, false)
            .ok()
            .map(|t| t.with_timezone(&Utc))
    }

    /// The latest run at or before `now`, if it is at most `catch_up` old: a run a process that
    /// starts now still creates.
    pub fn missed(&self, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
        let local = now.with_timezone(&self.timezone);
        let previous = self
            .cron
            .find_previous_occurrence(&local, true)
            .ok()?
            .with_timezone(&Utc);
        let late = (now - previous).to_std().unwrap_or(Duration::MAX);
        (late <= self.config.catch_up).then_some(previous)
    }

    /// The first run to create from `now`: a missed one within `catch_up`, else the next.
    pub fn first_run(&self, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
        self.missed(now).or_else(|| self.next_after(now))
    }

    /// The `request_id` of the run at `run`: the same in every process.
    pub fn request_id(&self, run: DateTime<Utc>) -> String {
        format!("schedule:{}:{}", self.config.name, run.timestamp())
    }

    /// The `CreateBatch` of the run at `run`, from the input file; an error says what is wrong
    /// with the file.
    pub async fn request(&self, run: DateTime<Utc>) -> Result<CreateBatchRequest, String> {
        let path = &self.config.input;
        let text = tokio::fs::read_to_string(path)
            .await
            .map_err(|error| format!("cannot read {}: {error}", path.display()))?;
        let input =
            batch_input::parse(&text).map_err(|error| format!("{}: {error}", path.display()))?;
        let mut labels: std::collections::HashMap<String, String> =
            self.config.labels.clone().into_iter().collect();
        labels.insert("schedule".to_string(), self.config.name.clone());
        labels.insert("schedule_run".to_string(), run.to_rfc3339());
        Ok(CreateBatchRequest {
            items: input.items,
            completion_window: self
                .config
                .completion_window
                .map(|window| prost_types::Duration {
                    seconds: i64::try_from(window.as_secs()).unwrap_or(i64::MAX),
                    nanos: i32::try_from(window.subsec_nanos()).unwrap_or(0),
                }),
            request_id: self.request_id(run),
            labels,
            ..CreateBatchRequest::default()
        })
    }
}

/// Checks a list of schedules: each valid, names unique.
pub fn parse_all(configs: &[ScheduleConfig], key: &str) -> Result<Vec<Schedule>, ConfigError> {
    let mut names = HashSet::new();
    configs
        .iter()
        .enumerate()
        .map(|(n, config)| {
            let key = format!("{key}[{n}]");
            let schedule = Schedule::new(config.clone(), &key)?;
            if !names.insert(config.name.clone()) {
                return Err(ConfigError::invalid(
                    format!("{key}.name"),
                    format!("{:?} names two schedules: each needs its own", config.name),
                ));
            }
            Ok(schedule)
        })
        .collect()
}

/// Runs `schedules` until `shutdown`, creating each run's batch through `client`.
pub fn spawn(
    schedules: Vec<Schedule>,
    client: RouterClient,
    shutdown: CancellationToken,
) -> Vec<tokio::task::JoinHandle<()>> {
    schedules
        .into_iter()
        .map(|schedule| tokio::spawn(run(schedule, client.clone(), shutdown.clone())))
        .collect()
}

async fn run(schedule: Schedule, client: RouterClient, shutdown: CancellationToken) {
    let Some(mut due) = schedule.first_run(Utc::now()) else {
        tracing::warn!(schedule = schedule.name(), "the schedule never fires");
        return;
    };
    loop {
        let wait = (due - Utc::now()).to_std().unwrap_or(Duration::ZERO);
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(wait) => {}
        }
        fire(&schedule, &client, due, &shutdown).await;
        // The next run after this one; if this process was suspended past several, the latest
        // still within catch_up (missed) comes first.
        let now = Utc::now();
        due = match schedule.next_after(due) {
            Some(next) if next < now => schedule.first_run(now).unwrap_or(next),
            Some(next) => next,
            None => return,
        };
    }
}

/// Creates the batch of the run at `run`, retrying while the router cannot answer and the run is
/// within its catch-up.
async fn fire(
    schedule: &Schedule,
    client: &RouterClient,
    run: DateTime<Utc>,
    shutdown: &CancellationToken,
) {
    let outcome = |outcome: &'static str| {
        metrics::counter!(
            "weir_router_batch_schedule_runs_total",
            "schedule" => schedule.name().to_string(),
            "outcome" => outcome,
        )
        .increment(1);
    };
    let request = match schedule.request(run).await {
        Ok(request) => request,
        Err(problem) => {
            tracing::error!(schedule = schedule.name(), %run, %problem, "scheduled batch skipped: its input is not usable");
            outcome("invalid_input");
            return;
        }
    };
    let give_up = run
        + chrono::Duration::from_std(schedule.config.catch_up)
            .unwrap_or(chrono::Duration::hours(1));
    let mut pause = FIRST_RETRY;
    loop {
        match create(schedule, client, request.clone()).await {
            Ok(batch) => {
                let labels = &batch.labels;
                tracing::info!(
                    schedule = schedule.name(), %run, batch = batch.id,
                    items = batch.counts.map_or(0, |c| c.total), ?labels,
                    "scheduled batch created (or found, if another process created it)"
                );
                outcome("created");
                return;
            }
            Err(status) if retryable(&status) && Utc::now() < give_up => {
                tracing::warn!(schedule = schedule.name(), %run, %status, ?pause, "scheduled batch not created yet; retrying");
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = tokio::time::sleep(pause) => {}
                }
                pause = (pause * 2).min(MAX_RETRY);
            }
            Err(status) => {
                tracing::error!(schedule = schedule.name(), %run, %status, "scheduled batch not created");
                outcome("failed");
                return;
            }
        }
    }
}

async fn create(
    schedule: &Schedule,
    client: &RouterClient,
    body: CreateBatchRequest,
) -> Result<Batch, Status> {
    let mut request = tonic::Request::new(body);
    request.set_timeout(Duration::from_secs(60));
    let tenant = tonic::metadata::MetadataValue::try_from(schedule.tenant.as_str())
        .map_err(|_| Status::internal("tenant id is not valid metadata"))?;
    request.metadata_mut().insert(TENANT, tenant);
    // Creating a batch is cheap, but not interactive: shed before user traffic.
    Criticality::SheddablePlus.set_on(&mut request);
    let mut client = client.clone();
    client
        .create_batch(request)
        .await?
        .into_inner()
        .batch
        .ok_or_else(|| Status::internal("CreateBatch answered without a batch"))
}

/// Whether trying the same run again may succeed.
fn retryable(status: &Status) -> bool {
    matches!(
        status.code(),
        Code::Unavailable
            | Code::DeadlineExceeded
            | Code::ResourceExhausted
            | Code::Aborted
            | Code::Unknown
    )
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn config(cron: &str) -> ScheduleConfig {
        ScheduleConfig {
            name: "nightly".to_string(),
            cron: cron.to_string(),
            timezone: utc(),
            tenant: "acme".to_string(),
            input: PathBuf::from("/tmp/in.jsonl"),
            completion_window: None,
            catch_up: Duration::from_secs(600),
            labels: BTreeMap::new(),
        }
    }

    fn at(text: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(text)
            .unwrap()
            .with_timezone(&Utc)
    }

    #[test]
    fn runs_follow_the_expression_in_its_time_zone() {
        let schedule = Schedule::new(config("0 2 * * *"), "s").unwrap();
        assert_eq!(
            schedule.next_after(at("2026-12-03T01:00:00Z")),
            Some(at("2026-12-03T02:00:00Z"))
        );
        // Strictly after: a run time is not its own next run.
        assert_eq!(
            schedule.next_after(at("2026-12-03T02:00:00Z")),
            Some(at("2026-12-04T02:00:00Z"))
        );
        let mut stockholm = config("0 2 * * *");
        stockholm.timezone = "Europe/Stockholm".to_string();
        let schedule = Schedule::new(stockholm, "s").unwrap();
        // 02:00 in Stockholm is 01:00 UTC in winter.
        assert_eq!(
            schedule.next_after(at("2026-12-03T00:00:00Z")),
            Some(at("2026-12-03T01:00:00Z"))
        );
        // Six fields: seconds first.
        let schedule = Schedule::new(config("*/10 * * * * *"), "s").unwrap();
        assert_eq!(
            schedule.next_after(at("2026-12-03T00:00:01Z")),
            Some(at("2026-12-03T00:00:10Z"))
        );
    }

    #[test]
    fn a_missed_run_is_created_late_only_within_catch_up() {
        let schedule = Schedule::new(config("0 2 * * *"), "s").unwrap();
        // Started 5 minutes after the run (catch_up 10 minutes): the run is created late.
        assert_eq!(
            schedule.first_run(at("2026-12-03T02:05:00Z")),
            Some(at("2026-12-03T02:00:00Z"))
        );
        // An hour late: skipped; the next run is tomorrow's.
        assert_eq!(
            schedule.first_run(at("2026-12-03T03:00:00Z")),
            Some(at("2026-12-04T02:00:00Z"))
        );
        // The request_id of a run is the same in every process.
        assert_eq!(
            schedule.request_id(at("2026-12-03T02:00:00Z")),
            format!(
                "schedule:nightly:{}",
                at("2026-12-03T02:00:00Z").timestamp()
            )
        );
    }

    #[test]
    fn bad_schedules_name_their_key() {
        let problem = |config: ScheduleConfig| {
            parse_all(&[config], "router.jobs.schedules")
                .unwrap_err()
                .to_string()
        };
        assert!(problem(config("0 2 * *")).contains("router.jobs.schedules[0].cron"));
        let mut zone = config("0 2 * * *");
        zone.timezone = "Mars/Olympus".to_string();
        assert!(problem(zone).contains("timezone"));
        let mut name = config("0 2 * * *");
        name.name = "night ly".to_string();
        assert!(problem(name).contains("name"));
        let mut tenant = config("0 2 * * *");
        tenant.tenant = String::new();
        assert!(problem(tenant).contains("tenant"));
        let twice = parse_all(
            &[config("0 2 * * *"), config("0 3 * * *")],
            "router.jobs.schedules",
        )
        .unwrap_err()
        .to_string();
        assert!(twice.contains("schedules[1].name"), "{twice}");
    }

    #[tokio::test]
    async fn a_run_reads_its_input_file_afresh() {
        let dir = std::env::temp_dir().join(format!("weir-schedule-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut config = config("0 2 * * *");
        config.input = dir.join("in.jsonl");
        config
            .labels
            .insert("team".to_string(), "search".to_string());
        let schedule = Schedule::new(config, "s").unwrap();
        let run = at("2026-12-03T02:00:00Z");
        let missing = schedule.request(run).await.unwrap_err();
        assert!(missing.contains("cannot read"), "{missing}");
        std::fs::write(
            dir.join("in.jsonl"),
            r#"{"custom_id":"a","method":"POST","url":"/v1/chat/completions","body":{"model":"auto","messages":[{"role":"user","content":"hi"}]}}"#,
        )
        .unwrap();
        let request = schedule.request(run).await.unwrap();
        assert_eq!(request.items.len(), 1);
        assert_eq!(request.request_id, schedule.request_id(run));
        assert_eq!(request.labels["schedule"], "nightly");
        assert_eq!(request.labels["team"], "search");
        std::fs::write(dir.join("in.jsonl"), "not json\n").unwrap();
        let invalid = schedule.request(run).await.unwrap_err();
        assert!(invalid.contains("line 1"), "{invalid}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
