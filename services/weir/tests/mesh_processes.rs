//! Mesh identity across processes, as deployed: `weir serve` per service, sharing API keys and a
//! mesh secret from the environment. The router's mesh tokens are believed by a session service
//! in another process; a router with another secret is not; and a service with keys but no secret
//! refuses to start.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use tonic::{Code, Request, transport::Channel};
use weir_proto::{
    common::{Message, Role},
    router::{CompleteRequest, router_service_client::RouterServiceClient},
    session::{
        CreateSessionRequest, ListTurnsRequest, session_service_client::SessionServiceClient,
    },
};

use common::{Serve, serve_command};
const KEY: &str = "acme-process-key-0123456789abcdef";
const SECRET: &str = "process-mesh-secret-0123456789abcdef0123";

/// A config file shared by the processes of one test (`name`): one key and, with `mesh`, the
/// secret read from `WEIR_TEST_MESH_SECRET`.
fn config_file(name: &str, mesh: bool) -> PathBuf {
    let path = std::env::temp_dir().join(format!(
        "weir-mesh-processes-{}-{name}.toml",
        std::process::id()
    ));
    let mesh = if mesh {
        "[mesh]\nsecret_env = \"WEIR_TEST_MESH_SECRET\"\n"
    } else {
        ""
    };
    std::fs::write(
        &path,
        format!(
            "[[auth.api_keys]]\ntenant = \"acme\"\nkey = \"{KEY}\"\n{mesh}\
             [session]\ndefault_model = \"sim-small\"\n\
             [router.rate_limit]\nenabled = false\n"
        ),
    )
    .unwrap();
    path
}

/// `weir serve <service>` with the test's config and, if given, the mesh secret.
fn command(service: &str, config: &Path, secret: Option<&str>) -> Command {
    let mut command = serve_command(service, config);
    match secret {
        Some(secret) => command.env("WEIR_TEST_MESH_SECRET", secret),
        None => command.env_remove("WEIR_TEST_MESH_SECRET"),
    };
    command
}

fn with_key<T>(body: T) -> Request<T> {
    let mut request = Request::new(body);
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {KEY}").parse().unwrap());
    request
        .metadata_mut()
        .insert("weir-tenant", "victim".parse().unwrap());
    request
}

fn complete(session: &str) -> CompleteRequest {
    CompleteRequest {
        model: "sim-small".into(),
        messages: vec![Message {
            role: Role::User.into(),
            content: "hello".into(),
            ..Message::default()
        }],
        session_id: session.into(),
        ..CompleteRequest::default()
    }
}

fn router(config: &Path, secret: &str, inference: &Serve, session: &Serve) -> Serve {
    let mut command = command("router", config, Some(secret));
    command
        .env("WEIR_ROUTER__INFERENCE_URL", &inference.url)
        .env("WEIR_ROUTER__SESSION_URL", &session.url);
    Serve::start(command, "router")
}

#[tokio::test]
async fn services_in_separate_processes_share_keys_and_the_mesh_secret() {
    let config = config_file("shared", true);
    let inference = Serve::start(command("inference", &config, Some(SECRET)), "inference");
    let session = Serve::start(command("session", &config, Some(SECRET)), "session");
    let mut sessions = SessionServiceClient::new(session.channel());

    // Directly at the session service: the key decides, the named tenant does not.
    let mut anonymous = Request::new(CreateSessionRequest::default());
    anonymous
        .metadata_mut()
        .insert("weir-tenant", "acme".parse().unwrap());
    let status = sessions.create_session(anonymous).await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    sessions
        .create_session(with_key(CreateSessionRequest {
            session_id: "chat".into(),
            ..CreateSessionRequest::default()
        }))
        .await
        .unwrap();

    // Through a router process with the same secret: its mesh tokens are believed.
    let good = router(&config, SECRET, &inference, &session);
    let mut client = RouterServiceClient::new(good.channel());
    client.complete(with_key(complete("chat"))).await.unwrap();
    let turns = |mut sessions: SessionServiceClient<Channel>| async move {
        sessions
            .list_turns(with_key(ListTurnsRequest {
                session_id: "chat".into(),
                ..ListTurnsRequest::default()
            }))
            .await
            .unwrap()
            .into_inner()
            .turns
            .len()
    };
    assert_eq!(
        turns(sessions.clone()).await,
        2,
        "the question and the answer"
    );

    // A router with another secret is not part of this mesh: the session service refuses it.
    let stranger = router(
        &config,
        "another-mesh-secret-0123456789abcdef01234",
        &inference,
        &session,
    );
    let status = RouterServiceClient::new(stranger.channel())
        .complete(with_key(complete("chat")))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    assert_eq!(turns(sessions).await, 2, "nothing appended");
    let _ = std::fs::remove_file(config);
}

#[test]
fn keys_without_a_mesh_secret_fail_at_start_up_naming_the_key() {
    let config = config_file("no-secret", false);
    let output = command("budget", &config, None)
        .stdout(Stdio::null())
        .output()
        .unwrap();
    assert!(!output.status.success());
    let error = String::from_utf8(output.stderr).unwrap();
    assert!(error.contains("mesh.secret"), "{error}");
    assert!(error.contains("WEIR_MESH__SECRET"), "{error}");
    let _ = std::fs::remove_file(config);
}
