//! The endpoint set: which endpoints exist, which are ejected, and which one takes a call.

use std::{
    net::SocketAddr,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicUsize, Ordering},
    },
};

use rand::{Rng, SeedableRng, rngs::StdRng};
use tokio::{sync::watch, time::Instant};

use crate::local::Transport;

use super::BalanceConfig;

/// One address of the service, with its own transport (a lazy channel, or the in-process server
/// when this process hosts that address).
#[derive(Debug)]
pub(crate) struct Endpoint {
    pub(crate) addr: SocketAddr,
    pub(crate) transport: Transport,
    in_flight: AtomicUsize,
    ejections: metrics::Counter,
}

/// A call's hold on its endpoint: counted in flight until dropped (with the response body, so a
/// stream counts until it ends).
#[derive(Debug)]
pub(crate) struct InFlight(pub(crate) Arc<Endpoint>);

impl InFlight {
    fn new(endpoint: Arc<Endpoint>) -> Self {
        endpoint.in_flight.fetch_add(1, Ordering::Relaxed);
        Self(endpoint)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// What a finished attempt says about its endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// The endpoint answered: its failure streak ends.
    Success,
    /// The endpoint's own fault (UNAVAILABLE, a refused or cut connection).
    Failure,
    /// Nothing about the endpoint (the caller's mistake or deadline, a load refusal).
    Ignored,
}

#[derive(Debug)]
struct Entry {
    endpoint: Arc<Endpoint>,
    consecutive_failures: u32,
    /// Set while, and after, the endpoint was ejected: when its last ejection began and ends.
    ejection: Option<(Instant, Instant)>,
    times_ejected: u32,
}

impl Entry {
    fn is_ejected(&self, now: Instant) -> bool {
        self.ejection.is_some_and(|(_, until)| now < until)
    }
}

#[derive(Debug)]
struct State {
    entries: Vec<Entry>,
    rng: StdRng,
}

/// The endpoints of one service and their health, shared by every clone of a balancer and its
/// resolver task.
#[derive(Debug)]
pub(crate) struct Pool {
    service: String,
    config: BalanceConfig,
    state: Mutex<State>,
    /// Bumped on every update of the endpoint set: calls made before the first resolution wait
    /// for it.
    resolved: watch::Sender<u64>,
    healthy: metrics::Gauge,
}

impl Pool {
    pub(crate) fn new(service: &str, config: BalanceConfig, rng: Option<u64>) -> Self {
        let rng = rng.map_or_else(StdRng::from_os_rng, StdRng::seed_from_u64);
        Self {
            service: service.to_string(),
            config,
            state: Mutex::new(State {
                entries: Vec::new(),
                rng,
            }),
            resolved: watch::Sender::new(0),
            healthy: metrics::gauge!(
                "weir_balance_healthy_endpoints",
                "service" => service.to_string()
            ),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn config(&self) -> &BalanceConfig {
        &self.config
    }

    pub(crate) fn service(&self) -> &str {
        &self.service
    }

    /// Waits until the endpoint set was resolved at least once.
    pub(crate) async fn resolved(&self) {
        let mut updates = self.resolved.subscribe();
        // The sender lives in `self`, so this cannot fail while we borrow it.
        let _ = updates.wait_for(|generation| *generation > 0).await;
    }

    /// Replaces the endpoint set by `addrs`: known endpoints keep their transport and health,
    /// new ones get a transport from `connect`, missing ones are dropped (their calls in flight
    /// hold their own reference and finish).
    pub(crate) fn update(
        &self,
        addrs: &[SocketAddr],
        connect: impl Fn(SocketAddr) -> Result<Transport, tonic::transport::Error>,
    ) {
        let now = Instant::now();
        let mut state = self.state();
        let before: Vec<SocketAddr> = state.entries.iter().map(|e| e.endpoint.addr).collect();
        state
            .entries
            .retain(|entry| addrs.contains(&entry.endpoint.addr));
        for addr in addrs {
            if state
                .entries
                .iter()
                .any(|entry| entry.endpoint.addr == *addr)
            {
                continue;
            }
            let transport = match connect(*addr) {
                Ok(transport) => transport,
                Err(error) => {
                    tracing::warn!(service = %self.service, %addr, %error, "endpoint left out");
                    continue;
                }
            };
            state.entries.push(Entry {
                endpoint: Arc::new(Endpoint {
                    addr: *addr,
                    transport,
                    in_flight: AtomicUsize::new(0),
                    ejections: metrics::counter!(
                        "weir_endpoint_ejections_total",
                        "service" => self.service.clone(),
                        "endpoint" => addr.to_string()
                    ),
                }),
                consecutive_failures: 0,
                ejection: None,
                times_ejected: 0,
            });
        }
        let after: Vec<SocketAddr> = state.entries.iter().map(|e| e.endpoint.addr).collect();
        if before != after {
            tracing::info!(service = %self.service, endpoints = ?after, "endpoints changed");
        }
        self.set_healthy(&state, now);
        drop(state);
        self.resolved.send_modify(|generation| *generation += 1);
    }

    /// The addresses of the endpoints, in the order they were added.
    pub(crate) fn addrs(&self) -> Vec<SocketAddr> {
        self.state()
            .entries
            .iter()
            .map(|e| e.endpoint.addr)
            .collect()
    }

    /// The addresses of the endpoints ejected now.
    pub(crate) fn ejected(&self) -> Vec<SocketAddr> {
        let now = Instant::now();
        let state = self.state();
        let ejected = state.entries.iter().filter(|e| e.is_ejected(now));
        ejected.map(|e| e.endpoint.addr).collect()
    }

    fn set_healthy(&self, state: &State, now: Instant) {
        let healthy = state.entries.iter().filter(|e| !e.is_ejected(now)).count();
        self.healthy.set(healthy as f64);
    }

    /// The endpoint for the next call (see the module docs of [`super`]): power of two choices
    /// over calls in flight among the endpoints not ejected; for a retry, among those without a
    /// failure streak if there are any. `None` when there are no endpoints.
    pub(crate) fn pick(&self, retry: bool) -> Option<InFlight> {
        let now = Instant::now();
        let mut state = self.state();
        self.set_healthy(&state, now);
        let State { entries, rng } = &mut *state;
        let mut candidates: Vec<&Entry> = entries.iter().filter(|e| !e.is_ejected(now)).collect();
        if retry && candidates.iter().any(|e| e.consecutive_failures == 0) {
            candidates.retain(|e| e.consecutive_failures == 0);
        }
        if candidates.is_empty() {
            // Every endpoint is ejected (more than the cap, after the set shrank): never refuse
            // for that; the one ejected longest ago is the likeliest to be back.
            let oldest = entries
                .iter()
                .min_by_key(|e| e.ejection.map(|(at, _)| at))?;
            return Some(InFlight::new(oldest.endpoint.clone()));
        }
        let chosen = match candidates.len() {
            1 => candidates[0],
            n => {
                let first = rng.random_range(0..n);
                let second = (first + rng.random_range(1..n)) % n;
                let (a, b) = (candidates[first], candidates[second]);
                let load = |e: &Entry| e.endpoint.in_flight.load(Ordering::Relaxed);
                if load(b) < load(a) { b } else { a }
            }
        };
        Some(InFlight::new(chosen.endpoint.clone()))
    }

    /// Records a finished attempt on `endpoint`, ejecting it after
    /// [`BalanceConfig::consecutive_failures`] failures in a row if the cap allows.
    pub(crate) fn record(&self, endpoint: &Arc<Endpoint>, verdict: Verdict) {
        if verdict == Verdict::Ignored {
            return;
        }
        let now = Instant::now();
        let mut state = self.state();
        let ejected_now = state.entries.iter().filter(|e| e.is_ejected(now)).count();
        let cap = self.config.max_ejected(state.entries.len());
        let Some(entry) = state
            .entries
            .iter_mut()
            .find(|e| Arc::ptr_eq(&e.endpoint, endpoint))
        else {
            return; // Removed by a re-resolution while the call ran.
        };
        if verdict == Verdict::Success {
            entry.consecutive_failures = 0;
            return;
        }
        entry.consecutive_failures = entry.consecutive_failures.saturating_add(1);
        if entry.consecutive_failures < self.config.consecutive_failures
            || entry.is_ejected(now)
            || ejected_now >= cap
        {
            return;
        }
        // A streak of ejections restarts once the endpoint has served a whole
        // max_ejection_time since its last one.
        entry.times_ejected = match entry.ejection {
            Some((_, until)) if now < until + self.config.max_ejection_time => {
                entry.times_ejected.saturating_add(1)
            }
            _ => 1,
        };
        let time = self.config.ejection_time(entry.times_ejected);
        entry.ejection = Some((now, now + time));
        entry.consecutive_failures = 0;
        entry.endpoint.ejections.increment(1);
        tracing::warn!(
            service = %self.service,
            endpoint = %entry.endpoint.addr,
            ejection = ?time,
            times = entry.times_ejected,
            "endpoint ejected after {} failures in a row",
            self.config.consecutive_failures
        );
        self.set_healthy(&state, now);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    /// A pool of `n` endpoints on ports 1..=n (never called: the tests record outcomes).
    fn pool(n: u16, config: BalanceConfig) -> Pool {
        let pool = Pool::new("test", config, Some(7));
        let addrs: Vec<SocketAddr> = (1..=n).map(addr).collect();
        pool.update(&addrs, |addr| {
            crate::client::lazy_channel(&format!("http://{addr}")).map(Transport::from)
        });
        pool
    }

    fn endpoint(pool: &Pool, port: u16) -> Arc<Endpoint> {
        let state = pool.state();
        let entry = state.entries.iter().find(|e| e.endpoint.addr == addr(port));
        entry.unwrap().endpoint.clone()
    }

    fn fail(pool: &Pool, port: u16, times: u32) {
        let endpoint = endpoint(pool, port);
        for _ in 0..times {
            pool.record(&endpoint, Verdict::Failure);
        }
    }

    fn picks(pool: &Pool, retry: bool, calls: usize) -> Vec<u16> {
        let mut ports: Vec<u16> = (0..calls)
            .map(|_| pool.pick(retry).unwrap().0.addr.port())
            .collect();
        ports.sort_unstable();
        ports.dedup();
        ports
    }

    #[tokio::test(start_paused = true)]
    async fn failures_in_a_row_eject_until_the_ejection_time_has_passed() {
        let pool = pool(2, BalanceConfig::default());
        fail(&pool, 1, 4);
        pool.record(&endpoint(&pool, 1), Verdict::Success);
        fail(&pool, 1, 4);
        assert!(pool.ejected().is_empty(), "a success ends the streak");
        pool.record(&endpoint(&pool, 1), Verdict::Ignored);
        fail(&pool, 1, 1);
        assert_eq!(pool.ejected(), [addr(1)], "ignored outcomes do not");
        assert_eq!(picks(&pool, false, 50), [2]);
        tokio::time::advance(Duration::from_secs(29)).await;
        assert_eq!(picks(&pool, false, 50), [2]);
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(pool.ejected().is_empty());
        assert_eq!(picks(&pool, false, 50), [1, 2], "back after 30 s");
    }

    #[tokio::test(start_paused = true)]
    async fn ejections_in_a_row_last_longer_up_to_the_cap_then_the_streak_restarts() {
        let pool = pool(2, BalanceConfig::default());
        let mut expected = [30, 60, 90, 120, 150, 180, 210, 240, 270, 300, 300].into_iter();
        for _ in 0..11 {
            fail(&pool, 1, 5);
            let seconds = expected.next().unwrap();
            tokio::time::advance(Duration::from_secs(seconds) - Duration::from_millis(1)).await;
            assert_eq!(pool.ejected(), [addr(1)], "{seconds}s");
            tokio::time::advance(Duration::from_millis(1)).await;
            assert!(pool.ejected().is_empty(), "{seconds}s");
        }
        // Healthy for a whole max_ejection_time: the next ejection is a first one again.
        tokio::time::advance(Duration::from_secs(300)).await;
        fail(&pool, 1, 5);
        tokio::time::advance(Duration::from_secs(30)).await;
        assert!(pool.ejected().is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn at_most_the_cap_is_ejected_and_calls_are_never_refused() {
        let pool = pool(4, BalanceConfig::default());
        for port in 1..=4 {
            fail(&pool, port, 5);
        }
        assert_eq!(pool.ejected(), [addr(1), addr(2)], "50 % of 4");
        assert_eq!(picks(&pool, false, 50), [3, 4]);
        // The set shrinks to the two ejected endpoints: the one ejected first serves.
        pool.update(&[addr(1), addr(2)], |_| unreachable!("known endpoints"));
        assert_eq!(picks(&pool, false, 20), [1]);
        // A single endpoint is never ejected (50 % of 1 is 0).
        let single = self::pool(1, BalanceConfig::default());
        fail(&single, 1, 50);
        assert!(single.ejected().is_empty());
        let off = self::pool(
            2,
            BalanceConfig {
                max_ejection_percent: 0,
                ..BalanceConfig::default()
            },
        );
        fail(&off, 1, 50);
        assert!(off.ejected().is_empty(), "0 % turns ejection off");
    }

    #[tokio::test(start_paused = true)]
    async fn a_retry_avoids_endpoints_whose_last_attempt_failed() {
        let pool = pool(3, BalanceConfig::default());
        fail(&pool, 1, 1);
        assert_eq!(picks(&pool, true, 50), [2, 3]);
        assert_eq!(
            picks(&pool, false, 50),
            [1, 2, 3],
            "first attempts still go there"
        );
        fail(&pool, 2, 1);
        fail(&pool, 3, 1);
        assert_eq!(
            picks(&pool, true, 50),
            [1, 2, 3],
            "none without a streak: all"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_less_loaded_of_two_takes_the_call_and_a_stream_counts_until_dropped() {
        let pool = pool(2, BalanceConfig::default());
        let held: Vec<InFlight> = (0..3).map(|_| pool.pick(false).unwrap()).collect();
        // Two endpoints: both are always the two choices, so the calls alternate.
        let ports: Vec<u16> = held.iter().map(|h| h.0.addr.port()).collect();
        assert!(ports.contains(&1) && ports.contains(&2), "{ports:?}");
        let busy = endpoint(&pool, 1);
        let extra: Vec<InFlight> = (0..5).map(|_| InFlight::new(busy.clone())).collect();
        assert_eq!(picks(&pool, false, 20), [2]);
        drop(extra);
        drop(held);
        assert_eq!(busy.in_flight.load(Ordering::Relaxed), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_re_resolution_keeps_the_health_of_known_endpoints() {
        let pool = pool(2, BalanceConfig::default());
        fail(&pool, 1, 5);
        let before = endpoint(&pool, 1);
        pool.update(&[addr(1), addr(2), addr(3)], |addr| {
            crate::client::lazy_channel(&format!("http://{addr}")).map(Transport::from)
        });
        assert!(Arc::ptr_eq(&before, &endpoint(&pool, 1)), "same channel");
        assert_eq!(pool.ejected(), [addr(1)]);
        pool.update(&[addr(2), addr(3)], |_| unreachable!("known endpoints"));
        assert_eq!(pool.addrs(), [addr(2), addr(3)]);
        // A call still holding the removed endpoint records nothing, and does not panic.
        pool.record(&before, Verdict::Failure);
    }
}
