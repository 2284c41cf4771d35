//! Bad input through the router gets the right status and a message that names what to fix.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use tonic::Code;
use tonic_types::StatusExt;
use weir_proto::common::GenerationParams;
use weir_tests::{Mesh, complete};

const CONFIG: &str = r#"
[models.small]
context_window = 64
max_output_tokens = 32
"#;

fn bad_field(status: &tonic::Status) -> Option<String> {
    status
        .get_error_details()
        .bad_request()
        .and_then(|b| b.field_violations.first().map(|v| v.field.clone()))
}

#[tokio::test]
async fn empty_message_list_is_invalid_argument_naming_messages() {
    let mesh = Mesh::start(CONFIG).await;
    let mut request = complete("small", "x");
    request.messages.clear();
    let status = mesh.router().complete(request).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(
        status.message().contains("messages"),
        "{}",
        status.message()
    );
    assert_eq!(bad_field(&status).as_deref(), Some("messages"));
    mesh.stop().await;
}

#[tokio::test]
async fn unknown_model_is_not_found() {
    let mesh = Mesh::start(CONFIG).await;
    let status = mesh
        .router()
        .complete(complete("no-such-model", "hi"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
    assert!(
        status.message().contains("no-such-model"),
        "{}",
        status.message()
    );
    mesh.stop().await;
}

#[tokio::test]
async fn negative_max_tokens_is_invalid_argument_naming_the_field() {
    let mesh = Mesh::start(CONFIG).await;
    let mut request = complete("small", "hi");
    request.params = Some(GenerationParams {
        max_tokens: Some(-1),
        ..Default::default()
    });
    let status = mesh.router().complete(request).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(
        status.message().contains("max_tokens"),
        "{}",
        status.message()
    );
    assert_eq!(bad_field(&status).as_deref(), Some("params.max_tokens"));
    mesh.stop().await;
}

#[tokio::test]
async fn oversized_prompt_is_invalid_argument() {
    let mesh = Mesh::start(CONFIG).await;
    let prompt = "word ".repeat(500);
    let status = mesh
        .router()
        .complete(complete("small", &prompt))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert_eq!(bad_field(&status).as_deref(), Some("messages"));
    assert!(
        status.message().contains("64"),
        "names the context window: {}",
        status.message()
    );
    mesh.stop().await;
}

#[tokio::test]
async fn streaming_validates_the_same_way() {
    let mesh = Mesh::start(CONFIG).await;
    let mut request = weir_tests::complete_stream("small", "hi");
    request.messages.clear();
    let status = match mesh.router().complete_stream(request).await {
        Err(status) => status,
        Ok(response) => {
            use tokio_stream::StreamExt;
            let first = response.into_inner().next().await;
            first.expect("an error item").expect_err("no answer")
        }
    };
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert_eq!(bad_field(&status).as_deref(), Some("messages"));
    mesh.stop().await;
}
