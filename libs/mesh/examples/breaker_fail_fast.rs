//! How fast does an open circuit breaker refuse a call?
//!
//! Opens the breaker of one backend, then times 100 000 refused calls two ways: the core
//! (`Breaker::try_acquire`, what the inference service wraps its HTTP upstream calls in) and the
//! tower layer (`CircuitBreaker::call` → the UNAVAILABLE `CIRCUIT_OPEN` `Status` with its
//! ErrorInfo and RetryInfo details, as a gRPC caller receives it). Prints percentiles; asserts
//! nothing.
//!
//! ```text
//! cargo run --release -p weir-mesh --example breaker_fail_fast
//! ```

use std::{sync::Arc, time::Duration};

use tower::{BoxError, Layer, Service, ServiceExt};
use weir_mesh::{
    backend::BackendKey,
    breaker::{Breaker, BreakerConfig, CircuitBreakerLayer},
};

const CALLS: usize = 100_000;

type Request = http::Request<tonic::body::Body>;
type Response = http::Response<tonic::body::Body>;

fn config() -> BreakerConfig {
    BreakerConfig {
        // Long enough that the breaker stays open for the whole run.
        open_duration: Duration::from_secs(600),
        max_open_duration: Duration::from_secs(600),
        ..BreakerConfig::default()
    }
}

fn report(name: &str, mut samples: Vec<Duration>) {
    samples.sort_unstable();
    let at = |q: f64| samples[((samples.len() - 1) as f64 * q) as usize];
    println!(
        "{name:<42} median {:>8.2?}  p99 {:>8.2?}  p99.9 {:>8.2?}  max {:>8.2?}  ({} calls)",
        at(0.5),
        at(0.99),
        at(0.999),
        at(1.0),
        samples.len()
    );
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), BoxError> {
    // Core.
    let breaker = Arc::new(Breaker::new(BackendKey::new("gpt-4o"), config()));
    for _ in 0..20 {
        if let Ok(permit) = breaker.try_acquire() {
            permit.record(tonic::Code::Unavailable);
        }
    }
    let mut admitted = 0;
    let mut samples = Vec::with_capacity(CALLS);
    for _ in 0..CALLS {
        let started = std::time::Instant::now();
        let refused = breaker.try_acquire().is_err();
        samples.push(started.elapsed());
        admitted += usize::from(!refused);
    }
    report("core: Breaker::try_acquire refused", samples);

    // Tower layer, with the Status a caller gets.
    let backend = tower::service_fn(|_: Request| async {
        Err::<Response, BoxError>("connection refused".into())
    });
    let layer = CircuitBreakerLayer::new(config());
    let mut service = layer.layer(backend);
    let request = || {
        let mut request = http::Request::new(tonic::body::Body::empty());
        request.extensions_mut().insert(BackendKey::new("gpt-4o"));
        request
    };
    for _ in 0..20 {
        let _ = service.ready().await?.call(request()).await;
    }
    let mut samples = Vec::with_capacity(CALLS);
    for _ in 0..CALLS {
        let request = request();
        let started = std::time::Instant::now();
        let refused = service.ready().await?.call(request).await.is_err();
        samples.push(started.elapsed());
        admitted += usize::from(!refused);
    }
    report("layer: CircuitBreaker call → CIRCUIT_OPEN", samples);
    if admitted > 0 {
        println!("note: {admitted} calls were admitted; the breaker was not open throughout");
    }
    Ok(())
}
