//! Tenant rate limits across router replicas, over real gRPC and a real Redis: two router
//! instances sharing one Redis enforce one limit between them, and when that Redis goes away each
//! falls back to its own share (the limit ÷ `replicas`) instead of failing requests.
//!
//! The shared Redis is `WEIR_TEST_REDIS_URL` (default `redis://127.0.0.1:6379`); the fallback test
//! starts (and kills) a private `redis-server` of its own.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicUsize, Ordering},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    time::Instant,
};
use tonic::{Code, transport::Channel};
use tonic_types::StatusExt;
use weir::stack::Service;
use weir_proto::router::router_service_client::RouterServiceClient;
use weir_tests::{Mesh, complete, eventually, reason, redis_connection, redis_url};

/// Global limit of the tests: bursts of 10, then one request per second.
const BURST: usize = 10;
/// Router instances sharing it: each one's fallback share is a burst of 10 ÷ 2 = 5.
const REPLICAS: usize = 2;

/// A key prefix no other run (or test) shares, so buckets never carry over.
fn unique_prefix(test: &str) -> String {
    static COUNTER: AtomicUsize = AtomicUsize::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    format!(
        "weir-test-{}-{nanos}-{}-{test}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

fn config(redis_url: &str, key_prefix: &str, redis_timeout: &str) -> String {
    format!(
        r#"
[models.quick]
sim = {{ output_tokens = 2 }}

[router.rate_limit]
requests_per_second = 1.0
burst = {BURST}
replicas = {REPLICAS}
redis_url = "{redis_url}"
key_prefix = "{key_prefix}"
redis_timeout = "{redis_timeout}"
"#
    )
}

/// One router replica: a router and the inference service it calls, in a stack of their own.
async fn replica(config: &str) -> Mesh {
    Mesh::start_services(config, &[Service::Inference, Service::Router]).await
}

/// The `limit` the refusal names (e.g. `1/s (burst 10)`): the shared limit or the local share.
fn limit(status: &tonic::Status) -> String {
    status
        .get_error_details()
        .error_info()
        .and_then(|i| i.metadata.get("limit").cloned())
        .unwrap_or_default()
}

/// Checks that `status` is a rate-limit refusal a client can act on: RESOURCE_EXHAUSTED, reason
/// RATE_LIMITED, the default tenant's quota named, and a positive time to come back.
fn assert_rate_limited(status: &tonic::Status) {
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert_eq!(reason(status), "RATE_LIMITED", "{status:?}");
    let details = status.get_error_details();
    let subjects: Vec<String> = details
        .quota_failure()
        .map(|q| q.violations.iter().map(|v| v.subject.clone()).collect())
        .unwrap_or_default();
    assert_eq!(subjects, ["tenant:default"], "{status:?}");
    let retry = details
        .retry_info()
        .and_then(|r| r.retry_delay)
        .unwrap_or_default();
    assert!(
        retry > Duration::ZERO,
        "RetryInfo must be positive: {status:?}"
    );
}

/// What `n` requests, one after another, got from `router`.
#[derive(Debug, Default)]
struct Tally {
    admitted: usize,
    refused: Vec<tonic::Status>,
    /// Anything other than OK or a rate-limit refusal.
    other: Vec<tonic::Status>,
    slowest: Duration,
}

async fn send(router: &mut RouterServiceClient<Channel>, n: usize, label: &str) -> Tally {
    let mut tally = Tally::default();
    for i in 0..n {
        let mut request = tonic::Request::new(complete("quick", &format!("{label} {i}")));
        request.set_timeout(Duration::from_secs(5));
        let started = Instant::now();
        let result = router.complete(request).await;
        tally.slowest = tally.slowest.max(started.elapsed());
        match result {
            Ok(_) => tally.admitted += 1,
            Err(status) if status.code() == Code::ResourceExhausted => tally.refused.push(status),
            Err(status) => tally.other.push(status),
        }
    }
    tally
}

#[tokio::test]
async fn two_routers_on_one_redis_share_one_limit() {
    let prefix = unique_prefix("shared");
    // A generous Redis timeout: this test is about sharing, and a cold first connection on a busy
    // machine must not send a request to the local fallback (that case is the next test's).
    let config = config(&redis_url(), &prefix, "1s");
    let a = replica(&config).await;
    let b = replica(&config).await;

    // 15 requests through A, then 15 through B, as fast as they are answered (well under 1 s, so
    // at most one token refills on the way).
    let through_a = send(&mut a.router(), 15, "a").await;
    let through_b = send(&mut b.router(), 15, "b").await;
    println!(
        "shared limit: A admitted {} of 15, B admitted {} of 15 (burst {BURST} shared by {REPLICAS})",
        through_a.admitted, through_b.admitted
    );
    assert!(through_a.other.is_empty(), "{:?}", through_a.other);
    assert!(through_b.other.is_empty(), "{:?}", through_b.other);

    // One limit in total: the burst of 10, plus at most one refilled token.
    let total = through_a.admitted + through_b.admitted;
    assert!(
        (BURST..=BURST + 1).contains(&total),
        "the two routers admitted {total} in total: {through_a:?} {through_b:?}"
    );
    // And it is the *shared* limit, not two local ones: local limits at the replica's share
    // would have admitted 5 through each router, 10 as well, but never the whole burst through
    // A and (next to) nothing through B.
    assert!(
        through_a.admitted >= BURST,
        "A spends the whole shared burst: {through_a:?}"
    );
    assert!(
        through_b.admitted <= 1,
        "B finds the burst spent by A: {through_b:?}"
    );
    for status in through_a.refused.iter().chain(&through_b.refused) {
        assert_rate_limited(status);
        assert_eq!(
            limit(status),
            "1/s (burst 10)",
            "refused by the global limit, not a local share: {status:?}"
        );
    }
    assert_eq!(
        through_a.refused.len() + through_b.refused.len(),
        30 - total
    );

    a.stop().await;
    b.stop().await;
}

/// A private `redis-server`, killed when dropped (also when the test fails).
struct PrivateRedis {
    child: Option<Child>,
    port: u16,
}

impl PrivateRedis {
    /// Starts `redis-server` on a free port, without persistence, and waits until it answers PING.
    async fn start() -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string()])
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server is installed");
        let redis = Self {
            child: Some(child),
            port,
        };
        assert!(
            eventually(Duration::from_secs(5), || redis.answers_ping()).await,
            "the private redis-server on port {port} must answer PING"
        );
        redis
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    async fn answers_ping(&self) -> bool {
        self.command(&["PING"]).await.as_deref() == Some("+PONG")
    }

    /// Sends one command and returns the first line of the reply (`None` when Redis does not
    /// answer within 500 ms).
    async fn command(&self, args: &[&str]) -> Option<String> {
        let exchange = async {
            let mut stream = TcpStream::connect(("127.0.0.1", self.port)).await.ok()?;
            let mut request = format!("*{}\r\n", args.len());
            for arg in args {
                request.push_str(&format!("${}\r\n{arg}\r\n", arg.len()));
            }
            stream.write_all(request.as_bytes()).await.ok()?;
            let mut reply = Vec::new();
            while !reply.ends_with(b"\r\n") {
                let mut byte = [0u8; 1];
                if stream.read(&mut byte).await.ok()? == 0 {
                    return None;
                }
                reply.push(byte[0]);
            }
            reply.truncate(reply.len() - 2);
            String::from_utf8(reply).ok()
        };
        tokio::time::timeout(Duration::from_millis(500), exchange)
            .await
            .ok()
            .flatten()
    }

    /// Kills the server and waits until it is gone.
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        self.kill();
    }
}

#[tokio::test]
async fn routers_fall_back_to_their_local_share_when_redis_stops() {
    let mut redis = PrivateRedis::start().await;
    let prefix = unique_prefix("fallback");
    let config = config(&redis.url(), &prefix, "50ms");
    let a = replica(&config).await;
    let b = replica(&config).await;

    // While Redis is up, requests go through on the shared limit: the tenant's bucket appears in
    // Redis. (The first call also opens the connection; should that take longer than the 50 ms
    // timeout on a busy machine, the call is decided locally and Redis is skipped for a second,
    // so ask again until the shared bucket exists.)
    let bucket = format!("{prefix}:{{default}}:ratelimit");
    let router = a.router();
    let shared = eventually(Duration::from_secs(5), || {
        let (mut router, redis, bucket) = (router.clone(), &redis, &bucket);
        async move {
            let sent = send(&mut router, 1, "shared").await;
            assert_eq!(sent.admitted, 1, "a request within the limit: {sent:?}");
            if redis.command(&["EXISTS", bucket]).await.as_deref() == Some(":1") {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
            false
        }
    })
    .await;
    assert!(shared, "the shared bucket {bucket} must appear in Redis");

    redis.kill();
    assert!(!redis.answers_ping().await, "the private Redis is stopped");

    // Redis is gone: every request is still answered, by each router's local limiter at its share
    // of the limit (burst 10 ÷ 2 replicas = 5), never refused because the store is down.
    let through_a = send(&mut a.router(), 10, "a").await;
    let through_b = send(&mut b.router(), 10, "b").await;
    println!(
        "redis down: A admitted {} of 10, B admitted {} of 10 (local share: burst {}); \
         slowest answer {} ms",
        through_a.admitted,
        through_b.admitted,
        BURST / REPLICAS,
        through_a.slowest.max(through_b.slowest).as_millis()
    );
    for (name, tally) in [("A", &through_a), ("B", &through_b)] {
        assert!(
            tally.other.is_empty(),
            "router {name}: only OK or RESOURCE_EXHAUSTED while Redis is down, got {:?}",
            tally.other
        );
        assert!(
            (1..=BURST / REPLICAS + 1).contains(&tally.admitted),
            "router {name} admits about its local share ({}): {tally:?}",
            BURST / REPLICAS
        );
        for status in &tally.refused {
            assert_rate_limited(status);
            assert_eq!(
                limit(status),
                "0.5/s (burst 5)",
                "router {name} enforces its share of the limit: {status:?}"
            );
        }
    }

    a.stop().await;
    b.stop().await;
}

/// A request that starts while its rate limit check runs (the tenant had headroom) and is then
/// refused, because the shared bucket was spent elsewhere meanwhile: it gets the same refusal as
/// one checked first, no model runs for it, and the hold its walk made meanwhile is released, not
/// charged.
#[tokio::test]
async fn a_request_refused_after_it_started_is_released_not_charged() {
    let prefix = unique_prefix("overlap");
    let redis = redis_url();
    let config = format!(
        r#"
[models.quick]
sim = {{ output_tokens = 2 }}
price = {{ input_micros_per_mtok = 1000000, output_micros_per_mtok = 1000000 }}

[router]
budget_url = "http://127.0.0.1:50054"
session_url = ""
[router.rate_limit]
requests_per_second = 1.0
burst = 50
redis_url = "{redis}"
key_prefix = "{prefix}"
redis_timeout = "1s"
[budget]
redis_url = "{redis}"
key_prefix = "{prefix}"
"#
    );
    let mesh = Mesh::start_services(
        &config,
        &[Service::Inference, Service::Budget, Service::Router],
    )
    .await;
    let mut router = mesh.router();
    // Admitted, checked first; its check leaves 49 of the burst, so the next request starts
    // before its own check has answered.
    let first = router
        .complete(complete("quick", "first"))
        .await
        .expect("the first request is admitted");
    assert!(first.get_ref().cost_micros > 0);

    // Another replica spends the shared bucket: its theoretical arrival time is an hour away.
    let mut conn = redis_connection().await;
    let now_us = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_micros();
    let bucket = format!("{prefix}:{{default}}:ratelimit");
    let _: () = redis::cmd("SET")
        .arg(&bucket)
        .arg((now_us + 3_600_000_000).to_string())
        .arg("PX")
        .arg(3_600_000)
        .query_async(&mut conn)
        .await
        .unwrap();

    let status = router
        .complete(complete("quick", "second"))
        .await
        .expect_err("the bucket is spent");
    assert_rate_limited(&status);

    // Two reservations were made: the first committed, the refused one released (on a task of
    // its own, hence the bounded wait); nothing is left held, and only one request was charged.
    let pattern = format!("{prefix}:{{default}}:budget:res:*");
    let states = || {
        let (mut conn, pattern) = (conn.clone(), pattern.clone());
        async move {
            let keys = weir_mesh::store::keys_matching(&mut conn, &pattern)
                .await
                .unwrap();
            let mut states = Vec::new();
            for key in keys {
                let state: String = redis::cmd("HGET")
                    .arg(&key)
                    .arg("st")
                    .query_async(&mut conn)
                    .await
                    .unwrap();
                states.push(state);
            }
            states.sort();
            states
        }
    };
    let settled = eventually(Duration::from_secs(5), || async {
        states().await == ["C", "R"]
    })
    .await;
    assert!(settled, "one committed, one released: {:?}", states().await);
    mesh.stop().await;
    weir_tests::delete_prefix(&prefix).await;
}
