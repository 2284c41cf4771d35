//! Prometheus metrics as an operator scrapes them: `GET /metrics` over real HTTP after real
//! traffic, parsed, and checked to have moved by exactly what was sent.
//!
//! The recorder is global to a process, so this binary holds a single test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{collections::BTreeMap, time::Duration};

use tokio_stream::StreamExt;
use tokio_util::sync::CancellationToken;
use weir::stack::Service;
use weir_mesh::telemetry;
use weir_proto::router::CompleteRequest;
use weir_tests::{Mesh, complete, complete_stream, eventually};

/// One scrape: every sample by its series (`name{labels}` with labels sorted), summed over series
/// that differ only in labels not asked for.
#[derive(Debug, Default)]
struct Scrape(BTreeMap<(String, BTreeMap<String, String>), f64>);

impl Scrape {
    async fn get(url: &str) -> Self {
        let response = reqwest::get(url).await.unwrap();
        assert_eq!(response.status(), 200);
        let content_type = response.headers()["content-type"]
            .to_str()
            .unwrap()
            .to_string();
        assert!(content_type.starts_with("text/plain"), "{content_type}");
        Self::parse(&response.text().await.unwrap())
    }

    fn parse(text: &str) -> Self {
        let mut samples = BTreeMap::new();
        for line in text.lines() {
            if line.starts_with('#') || line.trim().is_empty() {
                continue;
            }
            let (series, value) = line.rsplit_once(' ').expect("sample has a value");
            let value: f64 = value.parse().expect("sample value is a number");
            let (name, labels) = match series.split_once('{') {
                Some((name, rest)) => {
                    let body = rest.strip_suffix('}').expect("labels end with }");
                    let labels = body
                        .split("\",")
                        .filter(|pair| !pair.is_empty())
                        .map(|pair| {
                            let (key, value) = pair.split_once("=\"").expect("label is key=\"v\"");
                            (key.to_string(), value.trim_end_matches('"').to_string())
                        })
                        .collect();
                    (name.to_string(), labels)
                }
                None => (series.to_string(), BTreeMap::new()),
            };
            assert!(
                name.starts_with("weir_"),
                "every metric is prefixed weir_: {name}"
            );
            samples.insert((name, labels), value);
        }
        Self(samples)
    }

    /// The sum of `name` over the series whose labels include all of `labels`.
    fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.0
            .iter()
            .filter(|((n, l), _)| {
                n == name
                    && labels
                        .iter()
                        .all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v))
            })
            .map(|(_, v)| v)
            .sum()
    }

    /// The label values of `label` among the series of `name`.
    fn label_values(&self, name: &str, label: &str) -> Vec<String> {
        self.0
            .keys()
            .filter(|(n, _)| n == name)
            .filter_map(|(_, l)| l.get(label).cloned())
            .collect()
    }
}

const ROUTER: &str = "weir.router.v1.RouterService";
const INFERENCE: &str = "weir.inference.v1.InferenceService";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_move_by_exactly_the_traffic_sent() {
    let handle = telemetry::install_metrics_recorder();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/metrics", listener.local_addr().unwrap());
    let stop = CancellationToken::new();
    let server = tokio::spawn(telemetry::serve_metrics(listener, handle, stop.clone()));

    let mesh = Mesh::start_services(
        "[router.rate_limit]\nenabled = false\n",
        &[Service::Router, Service::Inference],
    )
    .await;
    let mut router = mesh.router();
    let before = Scrape::get(&url).await;

    const OK: usize = 7;
    const INVALID: usize = 3;
    const STREAMS: usize = 2;
    let mut output_tokens = 0;
    for i in 0..OK {
        let answer = router
            .complete(complete("sim-small", &format!("count me {i}")))
            .await
            .unwrap()
            .into_inner();
        output_tokens += answer.usage.unwrap().output_tokens;
    }
    for _ in 0..INVALID {
        let status = router
            .complete(CompleteRequest {
                model: "sim-small".to_string(),
                ..CompleteRequest::default()
            })
            .await
            .unwrap_err();
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
    }
    for _ in 0..STREAMS {
        let mut stream = router
            .complete_stream(complete_stream("sim-large", "stream me"))
            .await
            .unwrap()
            .into_inner();
        while let Some(event) = stream.next().await {
            event.unwrap();
        }
    }

    // A server counts a call when its response has ended, which can be just after the client saw
    // it: wait until the counts are in, then check they are exact.
    let expected = [
        (ROUTER, "Complete", "OK", OK),
        (ROUTER, "Complete", "INVALID_ARGUMENT", INVALID),
        (ROUTER, "CompleteStream", "OK", STREAMS),
        (INFERENCE, "Generate", "OK", OK),
        (INFERENCE, "GenerateStream", "OK", STREAMS),
    ];
    let delta = |after: &Scrape, service: &str, method: &str, code: &str| {
        let labels = [
            ("rpc_service", service),
            ("rpc_method", method),
            ("grpc_code", code),
        ];
        after.sum("weir_rpc_server_requests_total", &labels)
            - before.sum("weir_rpc_server_requests_total", &labels)
    };
    let settled = eventually(Duration::from_secs(10), || async {
        let after = Scrape::get(&url).await;
        expected
            .iter()
            .all(|(s, m, c, n)| delta(&after, s, m, c) >= *n as f64)
    })
    .await;
    assert!(settled, "counts never reached the traffic sent");
    let after = Scrape::get(&url).await;
    for (service, method, code, n) in expected {
        assert_eq!(
            delta(&after, service, method, code),
            n as f64,
            "{service}/{method} {code}"
        );
    }
    // Nothing else was answered by the router.
    let router_total = after.sum("weir_rpc_server_requests_total", &[("service", "router")])
        - before.sum("weir_rpc_server_requests_total", &[("service", "router")]);
    assert_eq!(router_total, (OK + INVALID + STREAMS) as f64);
    // The latency histogram counted the same calls.
    let timed = after.sum(
        "weir_rpc_server_duration_seconds_count",
        &[("rpc_service", ROUTER), ("rpc_method", "Complete")],
    ) - before.sum(
        "weir_rpc_server_duration_seconds_count",
        &[("rpc_service", ROUTER), ("rpc_method", "Complete")],
    );
    assert_eq!(timed, (OK + INVALID) as f64);

    // Model metrics: tokens by model and type, time to first token of the streams.
    let tokens = |scrape: &Scrape| {
        scrape.sum(
            "weir_model_tokens_total",
            &[("model", "sim-small"), ("type", "output")],
        )
    };
    assert_eq!(tokens(&after) - tokens(&before), output_tokens as f64);
    let ttft = |scrape: &Scrape| {
        scrape.sum(
            "weir_model_time_to_first_token_seconds_count",
            &[("model", "sim-large")],
        )
    };
    assert_eq!(ttft(&after) - ttft(&before), STREAMS as f64);

    // Breaker state: one series per backend, for every catalog model, all closed.
    let catalog = mesh.inference_api().catalog();
    let backends = after.label_values("weir_circuit_breaker_state", "backend");
    for (model, _) in catalog.iter() {
        assert!(
            backends.iter().any(|b| b == model),
            "no breaker state for {model}: {backends:?}"
        );
        assert_eq!(
            after.sum("weir_circuit_breaker_state", &[("backend", model)]),
            0.0,
            "{model}'s breakers are closed"
        );
    }

    mesh.stop().await;
    stop.cancel();
    server.await.unwrap().unwrap();
}

/// Every metric the alert rules and the dashboard in deploy/ query is one the code exports: a
/// renamed metric would otherwise leave an alert silently watching nothing.
#[test]
fn deploy_queries_only_metrics_the_code_exports() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut source = String::new();
    let mut dirs = vec![root.join("libs"), root.join("services")];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                source.push_str(&std::fs::read_to_string(&path).unwrap());
            }
        }
    }
    let mut checked = 0;
    for file in [
        "deploy/prometheus/alerts.yml",
        "deploy/grafana/dashboards/weir.json",
    ] {
        let text = std::fs::read_to_string(root.join(file)).unwrap();
        let mut rest = text.as_str();
        while let Some(start) = rest.find("weir_") {
            let tail = &rest[start..];
            let end = tail
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
                .unwrap_or(tail.len());
            let name = &tail[..end];
            rest = &tail[end..];
            // Recording rules (level:metric:operation) are defined in alerts.yml itself.
            if name.contains(':') {
                continue;
            }
            let base = ["_bucket", "_count", "_sum"]
                .iter()
                .find_map(|suffix| name.strip_suffix(suffix))
                .unwrap_or(name);
            assert!(
                source.contains(&format!("\"{base}\"")),
                "{file} queries {name}, which no Weir code exports"
            );
            checked += 1;
        }
    }
    assert!(checked > 20, "only {checked} metric references found");
}
