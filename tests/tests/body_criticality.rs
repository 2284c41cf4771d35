//! The request's `criticality` field and the `weir-criticality` header lead to one decision: the
//! router's admission sheds a request by the criticality its body claims (within its key's
//! ceiling), the same criticality the router forwards to inference.
//!
//! Real router and inference services on real sockets; the router with a fixed limit of 2 in
//! flight, so SHEDDABLE (50 % of it) is admitted only while nothing else is in flight.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use tokio_stream::StreamExt;
use tonic::{Code, metadata::MetadataValue};
use weir::stack::Service;
use weir_proto::common::Criticality;
use weir_tests::{Mesh, complete, complete_stream, eventually, reason};

const MODELS: &str = r#"
[models.slow]
sim = { output_tokens = 100, tokens_per_second = 10.0 }
[models.fast]
sim = { output_tokens = 4 }
"#;

/// A `Complete` to `fast` with `criticality` in its body (and none in its header): whether it was
/// shed.
async fn shed_by_body(router: &Mesh, criticality: Criticality) -> bool {
    let mut request = complete("fast", "hi");
    request.criticality = criticality.into();
    match router.router().complete(request).await {
        Ok(_) => false,
        Err(status) => {
            assert_eq!(status.code(), Code::Unavailable, "{status:?}");
            assert_eq!(reason(&status), "OVERLOADED", "{status:?}");
            true
        }
    }
}

#[tokio::test]
async fn the_body_criticality_is_what_the_router_sheds_by() {
    let inference = Mesh::start_services(
        &format!("{MODELS}\n[server.admission]\nenabled = false\n"),
        &[Service::Inference],
    )
    .await;
    let inference_url = inference.url(Service::Inference);
    let router = Mesh::start_with(
        &format!(
            "{MODELS}
[router.rate_limit]
enabled = false
[server.admission]
algorithm = \"static\"
initial_limit = 2
min_limit = 1
"
        ),
        &[Service::Router],
        |c| c.router.inference_url = inference_url,
    )
    .await;

    // Idle: a SHEDDABLE body is admitted.
    assert!(!shed_by_body(&router, Criticality::Sheddable).await);

    // One long stream in flight holds one of the two slots.
    let mut stream = router
        .router()
        .complete_stream(complete_stream("slow", "a long story"))
        .await
        .unwrap()
        .into_inner();
    stream.next().await.unwrap().unwrap();
    // The header alone says SHEDDABLE: shed (the control).
    let mut header_only = tonic::Request::new(complete("fast", "hi"));
    header_only
        .metadata_mut()
        .insert("weir-criticality", MetadataValue::from_static("SHEDDABLE"));
    let status = router.router().complete(header_only).await.unwrap_err();
    assert_eq!(reason(&status), "OVERLOADED");

    // No header (CRITICAL) but a SHEDDABLE body: shed the same way.
    assert!(
        eventually(Duration::from_secs(2), || shed_by_body(
            &router,
            Criticality::Sheddable
        ))
        .await,
        "a SHEDDABLE body is shed while SHEDDABLE's share is used"
    );
    // A CRITICAL body still fits.
    assert!(!shed_by_body(&router, Criticality::Critical).await);

    drop(stream);
    router.stop().await;
    inference.stop().await;
}
