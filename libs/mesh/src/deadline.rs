//! Deadlines: how long a call may take, carried from the first caller to the last hop.
//!
//! # Why deadlines and not timeouts?
//!
//! A timeout is local: "this hop waits 2 s". Chained over three hops it lets a call run for 6 s
//! while the user gave up after 2, and every hop keeps working for nobody. A *deadline* is the
//! caller's: one absolute instant that every hop derives its own limits from, so work stops
//! everywhere when the answer can no longer be used, and a slow hop eats its own share of the
//! time, not the next hop's.
//!
//! gRPC carries a deadline as the time *remaining* when the call left the client, in the
//! `grpc-timeout` request header: `TimeoutValue TimeoutUnit`, one to eight ASCII digits followed
//! by `H` (hours), `M` (minutes), `S` (seconds), `m` (milliseconds), `u` (microseconds) or `n`
//! (nanoseconds), e.g. `250m` or `30S`. A server turns it into an absolute [`Deadline`] as soon
//! as the call arrives.
//!
//! # The two layers
//!
//! [`DeadlineLayer::server`] (outermost on every server, after tracing and metrics):
//! - reads `grpc-timeout` and takes the minimum with the method's cap. **Every method has a cap**
//!   ([`DEFAULT_CAP`], 60 s, unless [`DeadlineConfig::method_caps`] says otherwise): gRPC's
//!   default of "no deadline" lets a forgotten call hold a model slot forever;
//! - stores the [`Deadline`] in the request's extensions, where handlers find it with
//!   [`Deadline::from_request`] (tonic hands the `http::Request` extensions to
//!   `tonic::Request::extensions()`), and rewrites `grpc-timeout` to the capped value so code that
//!   reads the header ([`remaining`]) agrees;
//! - answers DEADLINE_EXCEEDED without running the handler if the deadline has already passed;
//! - answers DEADLINE_EXCEEDED, dropping the handler's future, if the handler has not answered
//!   by the deadline. (tonic's server also arms a timer from `grpc-timeout`, but answers
//!   CANCELLED; ours fires [`SERVER_ANSWER_LEAD`] earlier so the caller sees the right code.)
//!
//! [`DeadlineLayer::propagate`] (outermost on every client, after tracing):
//! - reads the outgoing request's [`Deadline`] from its extensions (put there by
//!   [`Deadline::apply_to`]), else from its `grpc-timeout` header measured from now;
//! - sends `grpc-timeout` = remaining − a safety margin ([`DEFAULT_MARGIN`], 5 ms), so the
//!   downstream answers DEADLINE_EXCEEDED with time to spare for the answer to travel back instead
//!   of both sides timing out at once;
//! - fails at once with DEADLINE_EXCEEDED, without calling, when no time remains after the margin;
//! - stores the reduced deadline in the extensions for the layers below it (retry, per-attempt
//!   timeout), so they bound themselves by the same instant;
//! - answers DEADLINE_EXCEEDED itself if no response has arrived by the caller's deadline, so a
//!   downstream that ignores `grpc-timeout` cannot hold the caller past it; and turns the
//!   `TimeoutExpired` error of tonic's channel (which enforces the `grpc-timeout` it is given and
//!   would report CANCELLED) into DEADLINE_EXCEEDED.
//!
//! A request without any deadline passes the client layer unchanged: the layer never invents a
//! timeout (the server side of the hop is where a cap belongs).
//!
//! Both layers bound the time to the response *headers*. A stream's body is bounded by its
//! handler, which reads the same [`Deadline`]. Cancellation needs no code: when the caller goes
//! away, tonic drops the handler's future, and with it every downstream call it was awaiting.
//!
//! Metrics: `weir_deadline_exceeded_total{side="server"|"client"}`.

use std::{
    collections::BTreeMap,
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll, ready},
    time::Duration,
};

use http::{HeaderMap, HeaderValue};
use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep};
use tonic::{Status, metadata::MetadataMap};
use tower::{BoxError, Layer, Service};

use crate::{ApiError, config::ConfigError, metadata::GRPC_TIMEOUT, outcome::is_tonic_timeout};

/// Most digits the gRPC spec allows in a `grpc-timeout` value.
pub const MAX_TIMEOUT_DIGITS: usize = 8;

/// Default cap on any method's deadline on the server side.
pub const DEFAULT_CAP: Duration = Duration::from_secs(60);

/// Default safety margin the client side subtracts from the time it sends downstream.
pub const DEFAULT_MARGIN: Duration = Duration::from_millis(5);

/// How much earlier than the deadline the server layer answers a handler that is still running.
///
/// The caller's own timer started before the request left it, so a server that answers exactly
/// at "arrival + grpc-timeout" loses the race about half the time and the caller sees its own
/// client-side timeout (tonic reports CANCELLED) instead of DEADLINE_EXCEEDED. The lead covers
/// the request's transit, the answer's transit and tokio's 1 ms timer granularity on one host or
/// a fast network; tonic's server-side `grpc-timeout` timer (answering CANCELLED) is beaten too.
pub const SERVER_ANSWER_LEAD: Duration = Duration::from_millis(5);

/// Parses a `grpc-timeout` value such as `100m` or `5S`. Returns `None` for anything the gRPC
/// spec does not allow: no digits, more than [`MAX_TIMEOUT_DIGITS`] digits, a sign, spaces, or an
/// unknown unit.
pub fn parse_grpc_timeout(value: &str) -> Option<Duration> {
    let unit = value.chars().last()?;
    let digits = &value[..value.len() - unit.len_utf8()];
    if digits.is_empty()
        || digits.len() > MAX_TIMEOUT_DIGITS
        || !digits.bytes().all(|b| b.is_ascii_digit())
    {
        return None;
    }
    // At most 8 digits, so the value fits in u64 and hours cannot overflow a Duration.
    let amount: u64 = digits.parse().ok()?;
    Some(match unit {
        'H' => Duration::from_secs(amount * 3600),
        'M' => Duration::from_secs(amount * 60),
        'S' => Duration::from_secs(amount),
        'm' => Duration::from_millis(amount),
        'u' => Duration::from_micros(amount),
        'n' => Duration::from_nanos(amount),
        _ => return None,
    })
}

/// Encodes `timeout` as a `grpc-timeout` value in the finest unit whose amount fits in
/// [`MAX_TIMEOUT_DIGITS`] digits, rounding down (sending a little less time is always safe;
/// sending more is not).
pub fn format_grpc_timeout(timeout: Duration) -> String {
    const MAX_AMOUNT: u128 = 99_999_999;
    let units: [(char, u128); 6] = [
        ('n', 1),
        ('u', 1_000),
        ('m', 1_000_000),
        ('S', 1_000_000_000),
        ('M', 60_000_000_000),
        ('H', 3_600_000_000_000),
    ];
    let nanos = timeout.as_nanos();
    for (unit, nanos_per_unit) in units {
        let amount = nanos / nanos_per_unit;
        if amount <= MAX_AMOUNT {
            return format!("{amount}{unit}");
        }
    }
    // Over 11,000 years: the largest value the header can say.
    format!("{MAX_AMOUNT}H")
}

/// The time the caller gave this call, from its `grpc-timeout` metadata; `None` when it set no
/// deadline (or sent a malformed one). Behind [`DeadlineLayer::server`] the header holds the
/// capped value; [`Deadline::from_request`] gives the absolute deadline instead.
pub fn remaining(metadata: &MetadataMap) -> Option<Duration> {
    let value = metadata.get(GRPC_TIMEOUT)?.to_str().ok()?;
    parse_grpc_timeout(value)
}

/// The `grpc-timeout` of raw HTTP headers, if present and well formed.
fn header_timeout(headers: &HeaderMap) -> Option<Duration> {
    let value = headers.get(GRPC_TIMEOUT)?.to_str().ok()?;
    parse_grpc_timeout(value)
}

/// Sets `grpc-timeout` to `timeout` in raw HTTP headers.
pub(crate) fn set_header_timeout(headers: &mut HeaderMap, timeout: Duration) {
    if let Ok(value) = HeaderValue::try_from(format_grpc_timeout(timeout)) {
        headers.insert(GRPC_TIMEOUT, value);
    }
}

/// An absolute deadline: the instant by which a call's answer must be back.
///
/// It lives in the request's extensions on both sides: the server layer puts the caller's
/// deadline there for handlers, and the client layer puts the reduced deadline there for the
/// retry and timeout layers below it. It uses tokio's clock, so tests run it on a paused clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Deadline(Instant);

impl Deadline {
    /// The deadline at `instant`.
    pub fn at(instant: Instant) -> Self {
        Self(instant)
    }

    /// The deadline `timeout` from now (saturating far in the future for absurd values).
    pub fn after(timeout: Duration) -> Self {
        let now = Instant::now();
        let instant = now
            .checked_add(timeout)
            .or_else(|| now.checked_add(Duration::from_secs(100 * 365 * 24 * 3600)))
            .unwrap_or(now);
        Self(instant)
    }

    /// The instant.
    pub fn instant(&self) -> Instant {
        self.0
    }

    /// Time left until the deadline; zero once it has passed.
    pub fn remaining(&self) -> Duration {
        self.0.saturating_duration_since(Instant::now())
    }

    /// Whether the deadline has passed.
    pub fn is_expired(&self) -> bool {
        Instant::now() >= self.0
    }

    /// The deadline `by` earlier (saturating at now's epoch: never later than `self`).
    pub fn earlier_by(&self, by: Duration) -> Self {
        Self(self.0.checked_sub(by).unwrap_or(self.0.min(Instant::now())))
    }

    /// The deadline in `extensions`, if a layer or [`Deadline::apply_to`] put one there.
    pub fn of(extensions: &http::Extensions) -> Option<Deadline> {
        extensions.get::<Deadline>().copied()
    }

    /// The deadline of an HTTP request: its extension, else its `grpc-timeout` measured from now.
    pub fn of_http<B>(request: &http::Request<B>) -> Option<Deadline> {
        Self::of(request.extensions())
            .or_else(|| header_timeout(request.headers()).map(Deadline::after))
    }

    /// The deadline of a call a handler received: the one [`DeadlineLayer::server`] stored,
    /// else the request's `grpc-timeout` measured from now (when the layer is not installed).
    pub fn from_request<T>(request: &tonic::Request<T>) -> Option<Deadline> {
        request
            .extensions()
            .get::<Deadline>()
            .copied()
            .or_else(|| remaining(request.metadata()).map(Deadline::after))
    }

    /// Makes an outgoing call carry this deadline: sets its `grpc-timeout` to the time remaining
    /// and stores the deadline itself in its extensions, where [`DeadlineLayer::propagate`]
    /// reads it exactly. A handler passes its deadline downstream in one line:
    ///
    /// ```ignore
    /// if let Some(deadline) = Deadline::from_request(&request) {
    ///     deadline.apply_to(&mut downstream_request);
    /// }
    /// ```
    pub fn apply_to<T>(&self, request: &mut tonic::Request<T>) {
        if let Ok(value) = format_grpc_timeout(self.remaining()).parse() {
            request.metadata_mut().insert(GRPC_TIMEOUT, value);
        }
        request.extensions_mut().insert(*self);
    }
}

/// Configuration of the deadline layers (`[<service>.deadline]` in `weir.toml`).
///
/// ```toml
/// [router.deadline]
/// cap = "60s"                 # every method's longest deadline (server side)
/// margin = "5ms"              # subtracted from what is sent downstream (client side)
/// [router.deadline.method_caps]
/// "/weir.router.v1.Router/Complete" = "120s"
/// ```
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct DeadlineConfig {
    /// Longest deadline a method gets on the server side, whatever the caller asked for; also the
    /// deadline of a call that did not set one. Default [`DEFAULT_CAP`].
    #[serde(with = "humantime_serde")]
    pub cap: Duration,
    /// Caps of particular methods, keyed by gRPC path (`/pkg.Service/Method`), overriding `cap`.
    pub method_caps: BTreeMap<String, humantime_serde::Serde<Duration>>,
    /// Safety margin subtracted from the time sent downstream. Default [`DEFAULT_MARGIN`].
    #[serde(with = "humantime_serde")]
    pub margin: Duration,
}

impl Default for DeadlineConfig {
    fn default() -> Self {
        Self {
            cap: DEFAULT_CAP,
            method_caps: BTreeMap::new(),
            margin: DEFAULT_MARGIN,
        }
    }
}

impl DeadlineConfig {
    /// Checks the values, naming the key under `key_prefix` (e.g. `router.deadline`) at fault.
    pub fn validate(&self, key_prefix: &str) -> Result<(), ConfigError> {
        if self.cap.is_zero() {
            return Err(ConfigError::invalid(
                format!("{key_prefix}.cap"),
                "must be positive (every method needs time to answer)",
            ));
        }
        if self.margin >= self.cap {
            return Err(ConfigError::invalid(
                format!("{key_prefix}.margin"),
                format!(
                    "must be shorter than the cap ({})",
                    humantime_serde::re::humantime::format_duration(self.cap)
                ),
            ));
        }
        for (method, cap) in &self.method_caps {
            let key = format!("{key_prefix}.method_caps.\"{method}\"");
            let well_formed = method
                .strip_prefix('/')
                .and_then(|rest| rest.split_once('/'))
                .is_some_and(|(service, name)| {
                    !service.is_empty() && !name.is_empty() && !name.contains('/')
                });
            if !well_formed {
                return Err(ConfigError::invalid(
                    key,
                    "must be a gRPC path such as \"/weir.router.v1.Router/Complete\"",
                ));
            }
            if cap.is_zero() {
                return Err(ConfigError::invalid(key, "must be positive"));
            }
        }
        Ok(())
    }

    /// The cap of the method at `path`.
    pub fn cap_for(&self, path: &str) -> Duration {
        self.method_caps.get(path).map_or(self.cap, |cap| **cap)
    }
}

/// Which side of a call the layer is on.
#[derive(Debug, Clone)]
enum Mode {
    Server(Arc<DeadlineConfig>),
    Propagate { margin: Duration },
}

/// Builds the deadline layers; see the [module docs](self).
#[derive(Debug, Clone)]
pub struct DeadlineLayer {
    mode: Mode,
}

impl DeadlineLayer {
    /// The server layer: caps, stores and enforces each call's deadline. Uses `config.cap` and
    /// `config.method_caps`.
    pub fn server(config: DeadlineConfig) -> Self {
        Self {
            mode: Mode::Server(Arc::new(config)),
        }
    }

    /// The client layer: sends the time remaining minus `margin`, fails at once when none is left.
    pub fn propagate(margin: Duration) -> Self {
        Self {
            mode: Mode::Propagate { margin },
        }
    }
}

impl<S> Layer<S> for DeadlineLayer {
    type Service = DeadlineService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        DeadlineService {
            inner,
            mode: self.mode.clone(),
        }
    }
}

/// The service [`DeadlineLayer`] builds.
#[derive(Debug, Clone)]
pub struct DeadlineService<S> {
    inner: S,
    mode: Mode,
}

impl<S, ReqB, B> Service<http::Request<ReqB>> for DeadlineService<S>
where
    S: Service<http::Request<ReqB>, Response = http::Response<B>>,
    S::Error: Into<BoxError>,
    B: Default,
{
    type Response = http::Response<B>;
    type Error = BoxError;
    type Future = future::ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, mut request: http::Request<ReqB>) -> Self::Future {
        match &self.mode {
            Mode::Server(config) => {
                let cap = config.cap_for(request.uri().path());
                let timeout = header_timeout(request.headers()).map_or(cap, |t| t.min(cap));
                let deadline = Deadline::after(timeout);
                if deadline.is_expired() {
                    return future::ResponseFuture::rejected(Side::Server, "on arrival");
                }
                set_header_timeout(request.headers_mut(), timeout);
                request.extensions_mut().insert(deadline);
                let answer_at = deadline.earlier_by(SERVER_ANSWER_LEAD);
                future::ResponseFuture::running(self.inner.call(request), answer_at, Side::Server)
            }
            Mode::Propagate { margin } => {
                let Some(deadline) = Deadline::of_http(&request) else {
                    return future::ResponseFuture::unbounded(self.inner.call(request));
                };
                let reduced = deadline.earlier_by(*margin);
                let remaining = reduced.remaining();
                if remaining.is_zero() {
                    return future::ResponseFuture::rejected(Side::Client, "before the call");
                }
                set_header_timeout(request.headers_mut(), remaining);
                request.extensions_mut().insert(reduced);
                future::ResponseFuture::running(self.inner.call(request), deadline, Side::Client)
            }
        }
    }
}

/// Which side answered DEADLINE_EXCEEDED (the metric label and the answer's form).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    /// An `Ok` trailers-only response, as a tonic server answers errors.
    Server,
    /// An `Err(Status)`, as tonic's client surfaces errors.
    Client,
}

impl Side {
    fn label(self) -> &'static str {
        match self {
            Side::Server => "server",
            Side::Client => "client",
        }
    }

    fn answer<B: Default>(self, when: &str) -> Result<http::Response<B>, BoxError> {
        metrics::counter!("weir_deadline_exceeded_total", "side" => self.label()).increment(1);
        let status = Status::from(ApiError::deadline_exceeded(format!(
            "the deadline passed {when}"
        )));
        match self {
            Side::Server => Ok(status.into_http()),
            Side::Client => Err(Box::new(status)),
        }
    }
}

/// The deadline layer's response future.
pub mod future {
    use super::*;

    pin_project! {
        /// Resolves to the inner service's answer, or DEADLINE_EXCEEDED when the deadline comes
        /// first.
        pub struct ResponseFuture<F> {
            #[pin]
            kind: Kind<F>,
        }
    }

    pin_project! {
        #[project = KindProj]
        enum Kind<F> {
            Rejected { side: Side, when: &'static str },
            Running { #[pin] inner: F, #[pin] sleep: Option<Sleep>, side: Side },
        }
    }

    impl<F> ResponseFuture<F> {
        pub(super) fn rejected(side: Side, when: &'static str) -> Self {
            Self {
                kind: Kind::Rejected { side, when },
            }
        }

        pub(super) fn running(inner: F, deadline: Deadline, side: Side) -> Self {
            Self {
                kind: Kind::Running {
                    inner,
                    sleep: Some(tokio::time::sleep_until(deadline.instant())),
                    side,
                },
            }
        }

        pub(super) fn unbounded(inner: F) -> Self {
            Self {
                kind: Kind::Running {
                    inner,
                    sleep: None,
                    side: Side::Client,
                },
            }
        }
    }

    impl<F, B, E> Future for ResponseFuture<F>
    where
        F: Future<Output = Result<http::Response<B>, E>>,
        E: Into<BoxError>,
        B: Default,
    {
        type Output = Result<http::Response<B>, BoxError>;

        fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
            match self.project().kind.project() {
                KindProj::Rejected { side, when } => Poll::Ready(side.answer(when)),
                KindProj::Running { inner, sleep, side } => {
                    // The answer wins a tie with the timer: it is already here.
                    if let Poll::Ready(result) = inner.poll(cx) {
                        return Poll::Ready(match result.map_err(Into::into) {
                            // tonic's channel enforces the `grpc-timeout` we sent and reports
                            // CANCELLED; the caller's deadline passed, so say so.
                            Err(error) if is_tonic_timeout(&*error) => {
                                side.answer("while waiting for the answer")
                            }
                            other => other,
                        });
                    }
                    match sleep.as_pin_mut() {
                        Some(sleep) => {
                            ready!(sleep.poll(cx));
                            Poll::Ready(side.answer("while waiting for the answer"))
                        }
                        None => Poll::Pending,
                    }
                }
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use tonic::{Code, metadata::MetadataValue};
    use tower::{ServiceExt, service_fn};

    use super::*;
    use crate::outcome;

    #[test]
    fn parses_every_unit() {
        assert_eq!(parse_grpc_timeout("2H"), Some(Duration::from_secs(7200)));
        assert_eq!(parse_grpc_timeout("3M"), Some(Duration::from_secs(180)));
        assert_eq!(parse_grpc_timeout("5S"), Some(Duration::from_secs(5)));
        assert_eq!(parse_grpc_timeout("250m"), Some(Duration::from_millis(250)));
        assert_eq!(parse_grpc_timeout("7u"), Some(Duration::from_micros(7)));
        assert_eq!(parse_grpc_timeout("9n"), Some(Duration::from_nanos(9)));
        assert_eq!(parse_grpc_timeout("0m"), Some(Duration::ZERO));
        assert_eq!(
            parse_grpc_timeout("99999999H"),
            Some(Duration::from_secs(99_999_999 * 3600))
        );
    }

    #[test]
    fn rejects_what_the_spec_does_not_allow() {
        for value in [
            "",
            "m",
            "S5",
            "123456789m",
            "-5S",
            "+5S",
            " 5S",
            "5 S",
            "5s",
            "5",
            "5ms",
            "1.5S",
            "5é",
            "٣S",
        ] {
            assert_eq!(parse_grpc_timeout(value), None, "{value:?}");
        }
    }

    #[test]
    fn remaining_reads_the_metadata() {
        let mut metadata = MetadataMap::new();
        assert_eq!(remaining(&metadata), None);
        metadata.insert(GRPC_TIMEOUT, MetadataValue::from_static("1500m"));
        assert_eq!(remaining(&metadata), Some(Duration::from_millis(1500)));
        metadata.insert(GRPC_TIMEOUT, MetadataValue::from_static("soon"));
        assert_eq!(remaining(&metadata), None);
    }

    #[test]
    fn formats_in_the_finest_unit_that_fits() {
        assert_eq!(format_grpc_timeout(Duration::ZERO), "0n");
        assert_eq!(format_grpc_timeout(Duration::from_millis(50)), "50000000n");
        assert_eq!(format_grpc_timeout(Duration::from_millis(795)), "795000u");
        assert_eq!(format_grpc_timeout(Duration::from_secs(60)), "60000000u");
        assert_eq!(format_grpc_timeout(Duration::from_secs(3600)), "3600000m");
        assert_eq!(format_grpc_timeout(Duration::from_secs(200_000)), "200000S");
        assert_eq!(format_grpc_timeout(Duration::MAX), "99999999H");
        for timeout in [
            Duration::from_nanos(1),
            Duration::from_micros(123_456_789),
            Duration::from_secs(99_999_999),
            Duration::from_secs(7 * 24 * 3600),
        ] {
            let text = format_grpc_timeout(timeout);
            let back = parse_grpc_timeout(&text).unwrap();
            assert!(back <= timeout, "{text} says more than {timeout:?}");
            assert!(text.len() <= MAX_TIMEOUT_DIGITS + 1, "{text}");
        }
    }

    #[test]
    fn config_defaults_parse_and_validate() {
        let config: DeadlineConfig = toml::from_str(
            r#"
            margin = "10ms"
            [method_caps]
            "/weir.router.v1.Router/Complete" = "2m"
            "#,
        )
        .unwrap();
        assert_eq!(config.cap, DEFAULT_CAP);
        assert_eq!(config.margin, Duration::from_millis(10));
        assert_eq!(
            config.cap_for("/weir.router.v1.Router/Complete"),
            Duration::from_secs(120)
        );
        assert_eq!(config.cap_for("/weir.router.v1.Router/GetJob"), DEFAULT_CAP);
        config.validate("router.deadline").unwrap();

        let mut bad = DeadlineConfig::default();
        bad.method_caps
            .insert("Complete".into(), Duration::from_secs(1).into());
        let error = bad.validate("router.deadline").unwrap_err().to_string();
        assert!(error.contains("router.deadline.method_caps"), "{error}");
        let bad = DeadlineConfig {
            cap: Duration::ZERO,
            ..DeadlineConfig::default()
        };
        let error = bad.validate("router.deadline").unwrap_err().to_string();
        assert!(error.contains("router.deadline.cap"), "{error}");
        assert!(toml::from_str::<DeadlineConfig>("caps = \"1s\"").is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn deadline_counts_down_on_the_paused_clock() {
        let deadline = Deadline::after(Duration::from_secs(1));
        tokio::time::advance(Duration::from_millis(300)).await;
        assert_eq!(deadline.remaining(), Duration::from_millis(700));
        assert!(!deadline.is_expired());
        tokio::time::advance(Duration::from_millis(700)).await;
        assert!(deadline.is_expired());
        assert_eq!(deadline.remaining(), Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn apply_to_and_from_request_round_trip() {
        let deadline = Deadline::after(Duration::from_millis(800));
        let mut request = tonic::Request::new(());
        deadline.apply_to(&mut request);
        assert_eq!(Deadline::from_request(&request), Some(deadline));
        assert_eq!(
            remaining(request.metadata()),
            Some(Duration::from_millis(800))
        );
        // Without the extension (a request straight off the wire), the header is measured from now.
        let mut bare = tonic::Request::new(());
        bare.metadata_mut()
            .insert(GRPC_TIMEOUT, MetadataValue::from_static("250m"));
        assert_eq!(
            Deadline::from_request(&bare).map(|d| d.remaining()),
            Some(Duration::from_millis(250))
        );
        // tonic hands http extensions to the handler's request, and back from a client's request.
        let mut http_request = http::Request::new(());
        http_request.extensions_mut().insert(deadline);
        let handler_request = tonic::Request::from_http(http_request);
        assert_eq!(Deadline::from_request(&handler_request), Some(deadline));
    }

    fn request(path: &str, timeout: Option<&'static str>) -> http::Request<tonic::body::Body> {
        let mut request = http::Request::builder()
            .uri(format!("http://weir.test{path}"))
            .body(tonic::body::Body::empty())
            .unwrap();
        if let Some(timeout) = timeout {
            request
                .headers_mut()
                .insert(GRPC_TIMEOUT, HeaderValue::from_static(timeout));
        }
        request
    }

    fn code_of(result: &Result<http::Response<tonic::body::Body>, BoxError>) -> Code {
        match result {
            Ok(response) => outcome::classify_response(response).code,
            Err(error) => outcome::classify_error(&**error).code,
        }
    }

    /// A handler that sleeps `delay`, then answers a started response; it counts its calls and
    /// reports the deadline it saw.
    fn handler(
        delay: Duration,
        calls: Arc<AtomicUsize>,
        seen: Arc<std::sync::Mutex<Option<Duration>>>,
    ) -> impl Service<
        http::Request<tonic::body::Body>,
        Response = http::Response<tonic::body::Body>,
        Error = BoxError,
        Future = impl Send,
    > + Clone {
        service_fn(move |request: http::Request<tonic::body::Body>| {
            calls.fetch_add(1, Ordering::SeqCst);
            let deadline = Deadline::of(request.extensions());
            *seen.lock().unwrap() = deadline.map(|d| d.remaining());
            async move {
                tokio::time::sleep(delay).await;
                Ok::<_, BoxError>(http::Response::new(tonic::body::Body::empty()))
            }
        })
    }

    fn server_config(cap: Duration) -> DeadlineConfig {
        let mut config = DeadlineConfig {
            cap,
            ..DeadlineConfig::default()
        };
        config
            .method_caps
            .insert("/t.T/Long".into(), Duration::from_secs(300).into());
        config
    }

    #[tokio::test(start_paused = true)]
    async fn server_answers_an_expired_call_without_running_the_handler() {
        let calls = Arc::new(AtomicUsize::new(0));
        let seen = Arc::default();
        let service = DeadlineLayer::server(DeadlineConfig::default()).layer(handler(
            Duration::ZERO,
            calls.clone(),
            seen,
        ));
        let result = service.oneshot(request("/t.T/M", Some("0m"))).await;
        assert_eq!(code_of(&result), Code::DeadlineExceeded);
        assert_eq!(calls.load(Ordering::SeqCst), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn server_caps_the_callers_deadline_per_method() {
        let calls = Arc::new(AtomicUsize::new(0));
        let seen = Arc::new(std::sync::Mutex::new(None));
        let layer = DeadlineLayer::server(server_config(Duration::from_secs(2)));
        let service = layer.layer(handler(Duration::ZERO, calls.clone(), seen.clone()));

        // The caller asks for an hour: the default cap (2 s here) wins.
        let result = service.clone().oneshot(request("/t.T/M", Some("1H"))).await;
        assert_eq!(code_of(&result), Code::Ok);
        assert_eq!(*seen.lock().unwrap(), Some(Duration::from_secs(2)));
        // No deadline at all: the cap applies too.
        service
            .clone()
            .oneshot(request("/t.T/M", None))
            .await
            .unwrap();
        assert_eq!(*seen.lock().unwrap(), Some(Duration::from_secs(2)));
        // A shorter deadline than the cap is kept.
        service
            .clone()
            .oneshot(request("/t.T/M", Some("150m")))
            .await
            .unwrap();
        assert_eq!(*seen.lock().unwrap(), Some(Duration::from_millis(150)));
        // A method with its own cap.
        service
            .oneshot(request("/t.T/Long", Some("1H")))
            .await
            .unwrap();
        assert_eq!(*seen.lock().unwrap(), Some(Duration::from_secs(300)));
        assert_eq!(calls.load(Ordering::SeqCst), 4);
    }

    #[tokio::test(start_paused = true)]
    async fn server_answers_deadline_exceeded_when_the_handler_is_too_slow() {
        let calls = Arc::new(AtomicUsize::new(0));
        let service = DeadlineLayer::server(DeadlineConfig::default()).layer(handler(
            Duration::from_secs(10),
            calls.clone(),
            Arc::default(),
        ));
        let start = Instant::now();
        let result = service.oneshot(request("/t.T/M", Some("500m"))).await;
        assert_eq!(code_of(&result), Code::DeadlineExceeded);
        let elapsed = start.elapsed();
        assert!(
            elapsed == Duration::from_millis(500) - SERVER_ANSWER_LEAD,
            "{elapsed:?}"
        );
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }

    /// A client-side fake channel that records the `grpc-timeout` it was sent.
    fn channel(
        sent: Arc<std::sync::Mutex<Option<Duration>>>,
        calls: Arc<AtomicUsize>,
    ) -> impl Service<
        http::Request<tonic::body::Body>,
        Response = http::Response<tonic::body::Body>,
        Error = BoxError,
        Future = impl Send,
    > + Clone {
        service_fn(move |request: http::Request<tonic::body::Body>| {
            calls.fetch_add(1, Ordering::SeqCst);
            *sent.lock().unwrap() = header_timeout(request.headers());
            async { Ok::<_, BoxError>(http::Response::new(tonic::body::Body::empty())) }
        })
    }

    #[tokio::test(start_paused = true)]
    async fn propagation_sends_what_remains_minus_the_margin() {
        let sent = Arc::new(std::sync::Mutex::new(None));
        let calls = Arc::new(AtomicUsize::new(0));
        let service = DeadlineLayer::propagate(DEFAULT_MARGIN).layer(channel(sent.clone(), calls));

        // A 1 s call that spent 200 ms at this hop before calling downstream.
        let deadline = Deadline::after(Duration::from_secs(1));
        tokio::time::advance(Duration::from_millis(200)).await;
        let mut outgoing = tonic::Request::new(());
        deadline.apply_to(&mut outgoing);
        let mut request = request("/t.T/M", None);
        // What tonic's client does with the tonic::Request's extensions.
        request
            .extensions_mut()
            .insert(Deadline::from_request(&outgoing).unwrap());
        service.clone().oneshot(request).await.unwrap();
        let sent_timeout = sent.lock().unwrap().unwrap();
        assert_eq!(sent_timeout, Duration::from_millis(800) - DEFAULT_MARGIN);

        // From the header alone (no extension), measured from now.
        service
            .oneshot(self::request("/t.T/M", Some("300m")))
            .await
            .unwrap();
        assert_eq!(
            *sent.lock().unwrap(),
            Some(Duration::from_millis(300) - DEFAULT_MARGIN)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn propagation_fails_at_once_when_no_time_remains() {
        let sent = Arc::new(std::sync::Mutex::new(None));
        let calls = Arc::new(AtomicUsize::new(0));
        let service = DeadlineLayer::propagate(DEFAULT_MARGIN).layer(channel(sent, calls.clone()));
        let mut request = request("/t.T/M", None);
        let deadline = Deadline::after(Duration::from_millis(100));
        tokio::time::advance(Duration::from_millis(97)).await;
        request.extensions_mut().insert(deadline);
        let start = Instant::now();
        let result = service.oneshot(request).await;
        assert_eq!(code_of(&result), Code::DeadlineExceeded);
        assert_eq!(start.elapsed(), Duration::ZERO);
        assert_eq!(calls.load(Ordering::SeqCst), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn propagation_bounds_a_hung_downstream_by_the_callers_deadline() {
        let hung = service_fn(|_request: http::Request<tonic::body::Body>| async {
            std::future::pending::<Result<http::Response<tonic::body::Body>, BoxError>>().await
        });
        let service = DeadlineLayer::propagate(DEFAULT_MARGIN).layer(hung);
        let start = Instant::now();
        let result = service.oneshot(request("/t.T/M", Some("250m"))).await;
        assert_eq!(code_of(&result), Code::DeadlineExceeded);
        assert_eq!(start.elapsed(), Duration::from_millis(250));
    }

    #[tokio::test(start_paused = true)]
    async fn propagation_reports_tonics_channel_timeout_as_deadline_exceeded() {
        // tonic's channel enforces the grpc-timeout it is sent, failing with TimeoutExpired,
        // which tonic's client would report as CANCELLED.
        let channel = service_fn(|request: http::Request<tonic::body::Body>| async move {
            let timeout = header_timeout(request.headers()).unwrap();
            tokio::time::sleep(timeout).await;
            Err::<http::Response<tonic::body::Body>, BoxError>(Box::new(tonic::TimeoutExpired(())))
        });
        let service = DeadlineLayer::propagate(DEFAULT_MARGIN).layer(channel);
        let start = Instant::now();
        let result = service.oneshot(request("/t.T/M", Some("100m"))).await;
        let status = tonic::Status::from_error(result.unwrap_err());
        assert_eq!(status.code(), Code::DeadlineExceeded);
        assert_eq!(start.elapsed(), Duration::from_millis(100) - DEFAULT_MARGIN);
    }

    #[tokio::test(start_paused = true)]
    async fn propagation_without_a_deadline_changes_nothing() {
        let sent = Arc::new(std::sync::Mutex::new(Some(Duration::ZERO)));
        let calls = Arc::new(AtomicUsize::new(0));
        let service =
            DeadlineLayer::propagate(DEFAULT_MARGIN).layer(channel(sent.clone(), calls.clone()));
        service.oneshot(request("/t.T/M", None)).await.unwrap();
        assert_eq!(*sent.lock().unwrap(), None);
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }
}
