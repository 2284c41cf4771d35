//! Every service answers gRPC health and reflection, an unknown batch is a clear NOT_FOUND, and
//! shutdown drains: NOT_SERVING first, in-flight calls finish.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use tokio_stream::StreamExt;
use tonic::Code;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};
use tonic_reflection::pb::v1::{
    ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
    server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
};
use weir::stack::Service;
use weir_proto::service_names;
use weir_tests::{Mesh, complete_stream};

fn service_name(service: Service) -> &'static str {
    match service {
        Service::Router => service_names::ROUTER,
        Service::Inference => service_names::INFERENCE,
        Service::Session => service_names::SESSION,
        Service::Budget => service_names::BUDGET,
        Service::Review => service_names::REVIEW,
        Service::Worker => unreachable!("job workers serve no gRPC service"),
    }
}

async fn health(mesh: &Mesh, service: Service, name: &str) -> Result<ServingStatus, tonic::Status> {
    let mut client = HealthClient::new(mesh.channel(service));
    let response = client
        .check(HealthCheckRequest {
            service: name.to_string(),
        })
        .await?;
    Ok(response.into_inner().status())
}

async fn list_services(mesh: &Mesh, service: Service) -> Vec<String> {
    let mut client = ServerReflectionClient::new(mesh.channel(service));
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses = client
        .server_reflection_info(tokio_stream::once(request))
        .await
        .expect("reflection answers")
        .into_inner();
    let response = responses.next().await.expect("one response").expect("ok");
    match response.message_response {
        Some(MessageResponse::ListServicesResponse(list)) => {
            list.service.into_iter().map(|s| s.name).collect()
        }
        other => panic!("unexpected reflection answer: {other:?}"),
    }
}

#[tokio::test]
async fn every_service_is_serving_and_lists_itself_through_reflection() {
    let mesh = Mesh::start("").await;
    for service in Service::ALL {
        let name = service_name(service);
        assert_eq!(
            health(&mesh, service, name).await.unwrap(),
            ServingStatus::Serving,
            "{service}"
        );
        assert_eq!(
            health(&mesh, service, "").await.unwrap(),
            ServingStatus::Serving
        );
        let listed = list_services(&mesh, service).await;
        assert!(
            listed.iter().any(|s| s == name),
            "{service} lists {listed:?}"
        );
        assert!(
            listed.iter().any(|s| s == "grpc.health.v1.Health"),
            "{listed:?}"
        );
    }
    mesh.stop().await;
}

#[tokio::test]
async fn reflection_serves_the_file_descriptors() {
    let mesh = Mesh::start("").await;
    let mut client = ServerReflectionClient::new(mesh.channel(Service::Router));
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::FileContainingSymbol(
            "weir.router.v1.RouterService".into(),
        )),
    };
    let mut responses = client
        .server_reflection_info(tokio_stream::once(request))
        .await
        .unwrap()
        .into_inner();
    let response = responses.next().await.unwrap().unwrap();
    match response.message_response {
        Some(MessageResponse::FileDescriptorResponse(files)) => {
            assert!(!files.file_descriptor_proto.is_empty());
        }
        other => panic!("unexpected reflection answer: {other:?}"),
    }
    mesh.stop().await;
}

#[tokio::test]
async fn an_unknown_batch_is_not_found() {
    use weir_proto::router::GetBatchRequest;
    let mesh = Mesh::start("").await;
    // A clear NOT_FOUND naming the batch, not a hang or a transport error.
    let status = mesh
        .router()
        .get_batch(GetBatchRequest {
            batch_id: "batch-nope".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
    assert!(status.message().contains("batch-nope"), "{status:?}");
    mesh.stop().await;
}

#[tokio::test]
async fn shutdown_reports_not_serving_and_lets_in_flight_streams_finish() {
    // A slow model, so a stream is still running when shutdown starts.
    let config = r#"
[server]
drain_delay = "300ms"
shutdown_grace = "10s"
[models.slow]
sim = { tokens_per_second = 40.0, output_tokens = 20 }
"#;
    let mesh = Mesh::start(config).await;
    let mut stream = mesh
        .router()
        .complete_stream(complete_stream("slow", "take your time"))
        .await
        .unwrap()
        .into_inner();
    let first = stream.next().await.unwrap().unwrap();
    assert!(first.event.is_some());

    let health_channel = mesh.channel(Service::Router);
    let stopping = tokio::spawn(mesh.stop());
    // During the drain delay the server still answers, and says it is going away.
    let client = HealthClient::new(health_channel);
    let not_serving = weir_tests::eventually(Duration::from_secs(2), || {
        let mut client = client.clone();
        async move {
            client
                .check(HealthCheckRequest {
                    service: service_names::ROUTER.into(),
                })
                .await
                .map(|r| r.into_inner().status() == ServingStatus::NotServing)
                .unwrap_or(false)
        }
    })
    .await;
    assert!(not_serving, "health turns NOT_SERVING while draining");

    // The in-flight stream still completes with its `done` event.
    let mut saw_done = false;
    while let Some(event) = stream.next().await {
        if let Some(weir_proto::router::complete_stream_response::Event::Done(_)) =
            event.expect("in-flight stream is not cut").event
        {
            saw_done = true;
        }
    }
    assert!(saw_done);
    stopping.await.unwrap();
}
