//! Soft-limit events and the service's counters.
//!
//! Whether a commit crossed a scope's soft limit for the first time in its period is decided in
//! the commit script (HSETNX on the period's counter), so the event is raised exactly once per
//! period however many replicas commit at once. Raising it means: a `warn` log line, one more on
//! [`Metrics::soft_limit_events`], and, when `soft_limit_webhook` is set, a JSON POST
//! ([`SoftLimitEvent`]) sent in the background, once, with a 5 s timeout (a failed delivery is
//! logged, not retried: the log and the counter are the record).

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use serde::Serialize;

/// Timeout of one webhook delivery.
pub const WEBHOOK_TIMEOUT: Duration = Duration::from_secs(5);

/// Prometheus counter: reservations by `outcome` (`held`, or `exhausted` when refused with
/// RESOURCE_EXHAUSTED). Replays of an idempotent Reserve are not counted.
pub const RESERVATIONS_TOTAL: &str = "weir_budget_reservations_total";
/// Prometheus counter: commits that charged.
pub const COMMITS_TOTAL: &str = "weir_budget_commits_total";
/// Prometheus counter: commits whose actual cost exceeded the hold.
pub const OVERRUNS_TOTAL: &str = "weir_budget_overruns_total";
/// Prometheus counter: holds given back, by `reason` (`released` by the caller, `expired` by the
/// sweeper).
pub const RELEASES_TOTAL: &str = "weir_budget_releases_total";
/// Prometheus counter: soft-limit crossings by `tenant` (once per scope and period, across
/// replicas): the tenant is near exhausting a budget.
pub const SOFT_LIMIT_CROSSED_TOTAL: &str = "weir_budget_soft_limit_crossed_total";
/// Prometheus counter: reservations refused because a budget was exhausted, by `tenant`.
pub const EXHAUSTED_TOTAL: &str = "weir_budget_exhausted_total";

/// Counters of the budget service, for metrics (also reported to the `metrics` facade under the
/// names above, which `/metrics` exports).
#[derive(Debug, Default)]
pub struct Metrics {
    reservations: AtomicU64,
    refused: AtomicU64,
    commits: AtomicU64,
    overruns: AtomicU64,
    releases: AtomicU64,
    expired: AtomicU64,
    soft_limit_events: AtomicU64,
    webhook_failures: AtomicU64,
}

/// A snapshot of [`Metrics`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MetricsSnapshot {
    /// Reservations made (replays not counted).
    pub reservations: u64,
    /// Reservations refused with RESOURCE_EXHAUSTED.
    pub refused: u64,
    /// Commits that charged.
    pub commits: u64,
    /// Commits whose cost exceeded the hold.
    pub overruns: u64,
    /// Reservations released.
    pub releases: u64,
    /// Reservations expired by this process's sweeper.
    pub expired: u64,
    /// Soft-limit events raised by this process.
    pub soft_limit_events: u64,
    /// Webhook deliveries that failed.
    pub webhook_failures: u64,
}

impl Metrics {
    /// The current values.
    pub fn snapshot(&self) -> MetricsSnapshot {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        MetricsSnapshot {
            reservations: get(&self.reservations),
            refused: get(&self.refused),
            commits: get(&self.commits),
            overruns: get(&self.overruns),
            releases: get(&self.releases),
            expired: get(&self.expired),
            soft_limit_events: get(&self.soft_limit_events),
            webhook_failures: get(&self.webhook_failures),
        }
    }

    /// Number of soft-limit events raised by this process.
    pub fn soft_limit_events(&self) -> u64 {
        self.soft_limit_events.load(Ordering::Relaxed)
    }

    pub(crate) fn add_reservation(&self) {
        self.reservations.fetch_add(1, Ordering::Relaxed);
        metrics::counter!(RESERVATIONS_TOTAL, "outcome" => "held").increment(1);
    }
    pub(crate) fn add_refused(&self, tenant: &str) {
        self.refused.fetch_add(1, Ordering::Relaxed);
        metrics::counter!(RESERVATIONS_TOTAL, "outcome" => "exhausted").increment(1);
        metrics::counter!(EXHAUSTED_TOTAL, "tenant" => tenant.to_string()).increment(1);
    }

    /// Registers the unlabelled counters at 0, so a first event shows as an increase.
    pub(crate) fn register(&self) {
        for outcome in ["held", "exhausted"] {
            metrics::counter!(RESERVATIONS_TOTAL, "outcome" => outcome).increment(0);
        }
        metrics::counter!(COMMITS_TOTAL).increment(0);
        metrics::counter!(OVERRUNS_TOTAL).increment(0);
        for reason in ["released", "expired"] {
            metrics::counter!(RELEASES_TOTAL, "reason" => reason).increment(0);
        }
    }
    pub(crate) fn add_commit(&self, overrun: bool) {
        self.commits.fetch_add(1, Ordering::Relaxed);
        metrics::counter!(COMMITS_TOTAL).increment(1);
        if overrun {
            self.overruns.fetch_add(1, Ordering::Relaxed);
            metrics::counter!(OVERRUNS_TOTAL).increment(1);
        }
    }
    pub(crate) fn add_release(&self) {
        self.releases.fetch_add(1, Ordering::Relaxed);
        metrics::counter!(RELEASES_TOTAL, "reason" => "released").increment(1);
    }
    pub(crate) fn add_expired(&self, n: u64) {
        self.expired.fetch_add(n, Ordering::Relaxed);
        metrics::counter!(RELEASES_TOTAL, "reason" => "expired").increment(n);
    }
}

/// The JSON body POSTed to `soft_limit_webhook`.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct SoftLimitEvent {
    /// Always `budget.soft_limit_reached`.
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// Unique id of this event, for deduplication by the receiver.
    pub id: String,
    /// The tenant.
    pub tenant: String,
    /// The scope that crossed, as a QuotaFailure subject (`tenant:acme`, `user:u1`).
    pub subject: String,
    /// Spend in the period after the commit that crossed, micro-USD.
    pub spent_micros: i64,
    /// The soft limit, micro-USD.
    pub soft_limit_micros: i64,
    /// When, RFC 3339.
    pub time: String,
}

/// Raises soft-limit events.
#[derive(Debug, Clone)]
pub(crate) struct Events {
    pub(crate) metrics: Arc<Metrics>,
    webhook: Option<(reqwest::Client, String)>,
}

impl Events {
    pub(crate) fn new(metrics: Arc<Metrics>, webhook: Option<String>) -> Self {
        let webhook = webhook.map(|url| {
            let client = reqwest::Client::builder()
                .timeout(WEBHOOK_TIMEOUT)
                .build()
                .unwrap_or_default();
            (client, url)
        });
        Self { metrics, webhook }
    }

    pub(crate) fn soft_limit_reached(&self, event: SoftLimitEvent) {
        self.metrics
            .soft_limit_events
            .fetch_add(1, Ordering::Relaxed);
        metrics::counter!(SOFT_LIMIT_CROSSED_TOTAL, "tenant" => event.tenant.clone()).increment(1);
        tracing::warn!(
            tenant = %event.tenant,
            subject = %event.subject,
            spent_micros = event.spent_micros,
            soft_limit_micros = event.soft_limit_micros,
            "budget soft limit reached"
        );
        if let Some((client, url)) = &self.webhook {
            let client = client.clone();
            let url = url.clone();
            let metrics = self.metrics.clone();
            tokio::spawn(async move {
                let result = client
                    .post(&url)
                    .json(&event)
                    .send()
                    .await
                    .and_then(reqwest::Response::error_for_status);
                if let Err(error) = result {
                    metrics.webhook_failures.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(%error, event_id = %event.id, "soft-limit webhook failed");
                }
            });
        }
    }
}
