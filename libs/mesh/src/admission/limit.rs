//! The shared state of one server's admission control: the in-flight count, the limit and how
//! it adapts, the permits and the [`Admitted`] handle.

use std::{
    fmt,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU8, AtomicUsize, Ordering},
    },
    time::Duration,
};

use http::Response;
use metrics::{Counter, Gauge};
use tokio::time::Instant;

use super::config::{AdmissionConfig, DEFAULT_SERVICE_LABEL, LimitAlgorithm};
use crate::{
    criticality::Criticality, error::ApiError, metadata::RETRY_PUSHBACK_MS, outcome::Class,
};

pub use crate::outcome::OVERLOADED;

/// The shared state of one server's admission control: the in-flight count and the limit.
/// Cheap to clone; clones share the state.
#[derive(Clone)]
pub struct AdmissionController {
    shared: Arc<Shared>,
}

struct Shared {
    config: AdmissionConfig,
    service: String,
    in_flight: AtomicUsize,
    /// The current limit, rounded down, for the admission fast path.
    limit: AtomicUsize,
    gradient: Mutex<Gradient>,
    metrics: Metrics,
}

/// Metric handles, registered once so that admitting and shedding cost no registry lookup.
struct Metrics {
    limit: Gauge,
    in_flight: Gauge,
    /// `weir_shed_requests_total` by criticality, in [`Criticality::ALL`] order.
    shed: [Counter; 4],
}

/// The adaptive limit's state; see the module doc of [`crate::admission`].
struct Gradient {
    limit: f64,
    /// The current sampling window.
    window_start: Instant,
    samples: u32,
    latency_sum: f64,
    /// The most requests in flight seen while this window's samples completed.
    peak_in_flight: usize,
    /// The baseline is the lower of these two: the lowest window latency of the current epoch
    /// of `baseline_window / 2` windows and of the previous one (a windowed minimum).
    baseline_current: Option<f64>,
    baseline_previous: Option<f64>,
    windows_in_epoch: u32,
}

impl fmt::Debug for AdmissionController {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AdmissionController")
            .field("service", &self.shared.service)
            .field("in_flight", &self.in_flight())
            .field("limit", &self.limit())
            .finish()
    }
}

/// Why a request was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("overloaded: {criticality} requests are admitted below {cap} in flight (limit {limit})")]
pub struct Shed {
    /// The request's criticality.
    pub criticality: Criticality,
    /// In-flight requests when it was refused.
    pub in_flight: usize,
    /// The current limit.
    pub limit: usize,
    /// The in-flight count below which this criticality is admitted.
    pub cap: usize,
}

fn index(criticality: Criticality) -> usize {
    Criticality::ALL
        .iter()
        .position(|c| *c == criticality)
        .unwrap_or(1)
}

impl AdmissionController {
    /// A controller with `config` (assumed validated), reporting metrics with `service = "server"`.
    pub fn new(config: &AdmissionConfig) -> Self {
        Self::named(config, DEFAULT_SERVICE_LABEL)
    }

    /// A controller whose metrics carry `service` (several servers may share a process).
    pub fn named(config: &AdmissionConfig, service: &str) -> Self {
        let limit = f64::from(config.initial_limit.max(1));
        let label = service.to_string();
        let metrics = Metrics {
            limit: metrics::gauge!("weir_admission_limit", "service" => label.clone()),
            in_flight: metrics::gauge!("weir_admission_in_flight", "service" => label.clone()),
            shed: Criticality::ALL.map(|c| {
                metrics::counter!(
                    "weir_shed_requests_total",
                    "service" => label.clone(),
                    "criticality" => c.as_str(),
                )
            }),
        };
        metrics.limit.set(limit);
        Self {
            shared: Arc::new(Shared {
                config: config.clone(),
                service: label,
                in_flight: AtomicUsize::new(0),
                limit: AtomicUsize::new(limit as usize),
                gradient: Mutex::new(Gradient {
                    limit,
                    window_start: Instant::now(),
                    samples: 0,
                    latency_sum: 0.0,
                    peak_in_flight: 0,
                    baseline_current: None,
                    baseline_previous: None,
                    windows_in_epoch: 0,
                }),
                metrics,
            }),
        }
    }

    /// Requests in flight now.
    pub fn in_flight(&self) -> usize {
        self.shared.in_flight.load(Ordering::Acquire)
    }

    /// The current limit.
    pub fn limit(&self) -> usize {
        self.shared.limit.load(Ordering::Acquire)
    }

    /// The in-flight count below which `criticality` is admitted under `limit`.
    fn cap(&self, criticality: Criticality, limit: usize) -> usize {
        let shares = &self.shared.config.shares;
        let share = match criticality {
            Criticality::Sheddable => shares.sheddable,
            Criticality::SheddablePlus => shares.sheddable_plus,
            Criticality::Critical => 1.0,
            Criticality::CriticalPlus => shares.critical_plus,
        };
        ((limit as f64 * share).floor() as usize).max(1)
    }

    /// Admits a request of `criticality`, or says why not. The permit gives the slot back when
    /// dropped. A refusal costs two atomic loads.
    pub fn try_acquire(&self, criticality: Criticality) -> Result<Permit, Shed> {
        let shared = &self.shared;
        if !shared.config.enabled {
            let previous = shared.in_flight.fetch_add(1, Ordering::AcqRel);
            shared.metrics.in_flight.set((previous + 1) as f64);
            return Ok(self.permit(criticality));
        }
        let limit = self.limit();
        let cap = self.cap(criticality, limit);
        let mut current = shared.in_flight.load(Ordering::Acquire);
        loop {
            if current >= cap {
                return Err(Shed {
                    criticality,
                    in_flight: current,
                    limit,
                    cap,
                });
            }
            match shared.in_flight.compare_exchange_weak(
                current,
                current + 1,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => break,
                Err(actual) => current = actual,
            }
        }
        shared.metrics.in_flight.set((current + 1) as f64);
        Ok(self.permit(criticality))
    }

    fn permit(&self, criticality: Criticality) -> Permit {
        Permit {
            admitted: Admitted {
                shared: self.shared.clone(),
                criticality: Arc::new(AtomicU8::new(index(criticality) as u8)),
            },
            admitted_at: Instant::now(),
        }
    }

    /// The error of a shed request, counted in `weir_shed_requests_total`, and whether it must
    /// tell the client not to retry at all (see the module doc).
    fn shed_error(&self, shed: &Shed) -> (ApiError, bool) {
        self.shared.metrics.shed[index(shed.criticality)].increment(1);
        let error = ApiError::unavailable(
            OVERLOADED,
            format!(
                "the server is overloaded and sheds {} requests above {} in flight; retry later",
                shed.criticality, shed.cap
            ),
        )
        .with_metadata("criticality", shed.criticality.as_str())
        .with_metadata("limit", shed.limit.to_string());
        // Batch work refused while the server is full even for CRITICAL traffic is told not to
        // retry at all: its retries would only compete with interactive traffic.
        let saturated = shed.in_flight >= self.cap(Criticality::Critical, shed.limit);
        if shed.criticality == Criticality::Sheddable && saturated {
            (error, true)
        } else {
            (error.with_retry_after(self.shared.config.pushback), false)
        }
    }

    /// The answer to a shed request (see the module doc).
    pub fn shed_response<B: Default>(&self, shed: &Shed) -> Response<B> {
        let (error, do_not_retry) = self.shed_error(shed);
        let mut status = tonic::Status::from(error);
        if do_not_retry {
            status
                .metadata_mut()
                .insert(RETRY_PUSHBACK_MS, tonic::metadata::MetadataValue::from(-1));
        }
        status.into_http()
    }

    /// Feeds one finished request to the adaptive limit: a request that took `latency` and ended
    /// as `class`. Only completed work and backend failures are
    /// samples ([`Class::is_sample`]); anything else is ignored.
    pub fn record(&self, latency: Duration, class: Class) {
        let shared = &self.shared;
        let config = &shared.config;
        if !class.is_sample() || !config.enabled || config.algorithm == LimitAlgorithm::Static {
            return;
        }
        let in_flight = self.in_flight();
        let Ok(mut gradient) = shared.gradient.lock() else {
            return;
        };
        gradient.samples += 1;
        gradient.latency_sum += latency.as_secs_f64();
        gradient.peak_in_flight = gradient.peak_in_flight.max(in_flight);
        let now = Instant::now();
        if now.duration_since(gradient.window_start) < config.window
            || gradient.samples < config.min_window_samples
        {
            return;
        }
        let old = gradient.limit;
        gradient.end_window(config, now);
        if gradient.limit != old {
            shared
                .limit
                .store(gradient.limit as usize, Ordering::Release);
            shared.metrics.limit.set(gradient.limit.floor());
        }
    }
}

impl Gradient {
    /// Closes the current window: updates the baseline and moves the limit by the window's
    /// latency gradient (see the module doc).
    fn end_window(&mut self, config: &AdmissionConfig, now: Instant) {
        let latency = self.latency_sum / f64::from(self.samples.max(1));
        let peak = self.peak_in_flight;
        self.window_start = now;
        self.samples = 0;
        self.latency_sum = 0.0;
        self.peak_in_flight = 0;

        // The baseline: a windowed minimum of the window latencies (the no-load latency).
        self.baseline_current = Some(self.baseline_current.map_or(latency, |b| b.min(latency)));
        self.windows_in_epoch += 1;
        if self.windows_in_epoch >= config.baseline_window.div_ceil(2) {
            self.baseline_previous = self.baseline_current.take();
            self.windows_in_epoch = 0;
        }
        let baseline = match (self.baseline_current, self.baseline_previous) {
            (Some(a), Some(b)) => a.min(b),
            (Some(a), None) | (None, Some(a)) => a,
            (None, None) => latency,
        };
        let target = match config.latency_threshold {
            Some(threshold) => threshold.as_secs_f64(),
            None => baseline * config.latency_tolerance,
        };
        let gradient = if latency > 0.0 {
            (target / latency).clamp(config.backoff_ratio, 1.0)
        } else {
            1.0
        };
        let limit = self.limit;
        let min = f64::from(config.min_limit);
        let max = f64::from(config.max_limit);
        let next = if gradient < 1.0 {
            // Congested: shrink in proportion to the excess latency, but keep √limit of queue
            // headroom, so the limit settles where the two balance instead of collapsing. This
            // happens whether or not the limit is in use: a limit far above what is in flight
            // while latency climbs would let the queue grow unchecked until it is reached.
            (limit * gradient + limit.sqrt()).min(limit)
        } else {
            // Healthy: grow by the same headroom, so the limit recovers within seconds. Beyond
            // the configured starting point only while it is in use (at least half of it in
            // flight during the window): an idle server that grew its limit without bound would
            // lose its protection.
            let in_use = peak * 2 >= limit as usize;
            let ceiling = if in_use {
                max
            } else {
                f64::from(config.initial_limit).max(limit)
            };
            (limit + limit.sqrt()).min(ceiling)
        };
        self.limit = next.clamp(min, max);
    }
}

/// One admitted request's slot. Dropping it gives the slot back, so cancelled, failed and finished
/// requests all return their permits.
pub struct Permit {
    admitted: Admitted,
    admitted_at: Instant,
}

impl fmt::Debug for Permit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Permit")
            .field("admitted_at", &self.admitted_at)
            .field("criticality", &self.admitted.criticality())
            .finish()
    }
}

impl Permit {
    /// The handle a handler finds in the request's extensions.
    pub fn admitted(&self) -> &Admitted {
        &self.admitted
    }

    /// Records this request's outcome into the adaptive limit (see
    /// [`AdmissionController::record`]).
    pub(super) fn sample(&self, class: Class) {
        let controller = AdmissionController {
            shared: self.admitted.shared.clone(),
        };
        controller.record(self.admitted_at.elapsed(), class);
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        let shared = &self.admitted.shared;
        let previous = shared.in_flight.fetch_sub(1, Ordering::AcqRel);
        shared
            .metrics
            .in_flight
            .set(previous.saturating_sub(1) as f64);
    }
}

/// The admission of one request, as its handler sees it: the admission layer inserts it into the
/// request's extensions (`request.extensions().get::<Admitted>()`). Cheap to clone: an `Arc` to
/// the server's admission state and one to the request's criticality, shared by every clone.
///
/// It exists for handlers that learn a request's real criticality only after decoding its body
/// (the router's `criticality` field), while admission ran on the `weir-criticality` header:
/// [`Admitted::readmit`] re-checks the slot the request already holds under the new criticality.
#[derive(Clone)]
pub struct Admitted {
    shared: Arc<Shared>,
    criticality: Arc<AtomicU8>,
}

impl fmt::Debug for Admitted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Admitted")
            .field("service", &self.shared.service)
            .field("criticality", &self.criticality())
            .finish()
    }
}

impl Admitted {
    /// The criticality the request is admitted under: the one it was admitted with, or the last
    /// one [`Admitted::readmit`] accepted.
    pub fn criticality(&self) -> Criticality {
        Criticality::ALL
            .get(usize::from(self.criticality.load(Ordering::Acquire)))
            .copied()
            .unwrap_or_default()
    }

    /// Re-checks the slot this request holds under `criticality`: `Ok` when a request of that
    /// criticality would have been admitted at the current load (the in-flight count, this request
    /// included, is within that criticality's share of the current limit), and the handle's
    /// criticality becomes `criticality` for the rest of the call. Otherwise the OVERLOADED error
    /// a shed request gets (UNAVAILABLE, reason `OVERLOADED`, counted in
    /// `weir_shed_requests_total`), with RetryInfo = the configured pushback except for a
    /// SHEDDABLE request refused while the server is full even for CRITICAL, which gets no
    /// RetryInfo. The handler should then return that error; its slot is given back when the call
    /// ends. With admission disabled it is always `Ok`.
    pub fn readmit(&self, criticality: Criticality) -> Result<(), ApiError> {
        let controller = AdmissionController {
            shared: self.shared.clone(),
        };
        if self.shared.config.enabled {
            let in_flight = controller.in_flight();
            let limit = controller.limit();
            let cap = controller.cap(criticality, limit);
            // The in-flight count includes this request: the others must be below the cap.
            let others = in_flight.saturating_sub(1);
            if others >= cap {
                let shed = Shed {
                    criticality,
                    in_flight: others,
                    limit,
                    cap,
                };
                tracing::debug!(%shed, "shed on readmission");
                return Err(controller.shed_error(&shed).0);
            }
        }
        self.criticality
            .store(index(criticality) as u8, Ordering::Release);
        Ok(())
    }
}
