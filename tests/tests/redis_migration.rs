//! `deploy/migrate-hash-tags.sh` on a real Redis server (`WEIR_TEST_REDIS_URL`): data written in
//! the key layout without hash tags (`<prefix>:<tenant>:<service>:...`) is invisible to this
//! version until the script has run, and whole afterwards: a session's turns are all there and
//! it takes new ones, a budget reservation's recorded key names and the hold index follow.
//! Skipped, with a printed reason, on a Redis Cluster (the script is for a single server).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;

use tonic::Code;
use weir::stack::Service;
use weir_proto::session::{
    AppendTurnsRequest, CreateSessionRequest, GetSessionRequest, ListTurnsRequest,
};
use weir_tests::{Mesh, delete_prefix, redis_connection, redis_url, unique_prefix, user};

fn config(prefix: &str) -> String {
    format!(
        r#"
[session]
redis_url = "{redis}"
key_prefix = "{prefix}"
default_ttl = "10m"
tombstone_ttl = "10m"
default_model = "sim-small"
summarize = false
"#,
        redis = redis_url()
    )
}

async fn cmd<T: redis::FromRedisValue>(command: &[&str]) -> T {
    let mut connection = redis_connection().await;
    let mut cmd = redis::cmd(command[0]);
    for arg in &command[1..] {
        cmd.arg(*arg);
    }
    cmd.query_async(&mut connection).await.unwrap()
}

fn migrate(prefix: &str) -> String {
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/migrate-hash-tags.sh"
    );
    let output = Command::new(script)
        .args([redis_url().as_str(), prefix])
        .output()
        .expect("the migration script runs");
    let stdout = String::from_utf8_lossy(&output.stdout).to_string();
    assert!(
        output.status.success(),
        "migrate-hash-tags.sh failed: {stdout} {}",
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

#[tokio::test]
async fn old_layout_keys_are_found_after_the_migration() {
    if weir_mesh::store::is_cluster_url(&redis_url()) {
        eprintln!("skipped: the migration script is for a single Redis server");
        return;
    }
    let prefix = unique_prefix();
    let mesh = Mesh::start_services(&config(&prefix), &[Service::Session]).await;
    let mut session = mesh.session();
    session
        .create_session(CreateSessionRequest {
            session_id: "old".into(),
            ..CreateSessionRequest::default()
        })
        .await
        .unwrap();
    for text in ["one", "two", "three"] {
        session
            .append_turns(AppendTurnsRequest {
                session_id: "old".into(),
                messages: vec![user(text)],
                request_id: text.into(),
                ..AppendTurnsRequest::default()
            })
            .await
            .unwrap();
    }

    // What an earlier version left: the same keys without the braces, a budget reservation that
    // names its counter by its old name, and the global index of held reservations.
    let mut connection = redis_connection().await;
    let tagged =
        weir_mesh::store::keys_matching(&mut connection, &format!("{prefix}:{{default}}:*"))
            .await
            .unwrap();
    assert!(tagged.len() >= 3, "the session's keys: {tagged:?}");
    for key in &tagged {
        let old = key.replacen("{default}", "default", 1);
        let () = cmd(&["RENAME", key, &old]).await;
    }
    let reservation = format!("{prefix}:default:budget:res:r1");
    let counter = format!("{prefix}:default:budget:ctr:tenant:p1");
    let () = cmd(&["HSET", &reservation, "st", "H", "c1", &counter]).await;
    let () = cmd(&[
        "ZADD",
        &format!("{prefix}:budget:expiries"),
        "1000",
        &reservation,
    ])
    .await;

    let status = session
        .get_session(GetSessionRequest {
            session_id: "old".into(),
        })
        .await
        .expect_err("this version does not read the old names");
    assert_eq!(status.code(), Code::NotFound, "{status:?}");

    let report = migrate(&prefix);
    assert!(report.contains("moved 1 budget holds"), "{report}");

    let turns = session
        .list_turns(ListTurnsRequest {
            session_id: "old".into(),
            page_size: 100,
            ..ListTurnsRequest::default()
        })
        .await
        .expect("the migrated session is found")
        .into_inner()
        .turns;
    let contents: Vec<String> = turns
        .into_iter()
        .map(|t| t.message.unwrap_or_default().content)
        .collect();
    assert_eq!(contents, ["one", "two", "three"]);
    let next = session
        .append_turns(AppendTurnsRequest {
            session_id: "old".into(),
            messages: vec![user("four")],
            request_id: "three".into(),
            ..AppendTurnsRequest::default()
        })
        .await;
    // Its request ids came along too: "three" again, with another message, is a reused id.
    let next = next.expect_err("a reused request_id with another message is refused");
    assert_eq!(next.code(), Code::InvalidArgument, "{next:?}");
    let next = session
        .append_turns(AppendTurnsRequest {
            session_id: "old".into(),
            messages: vec![user("four")],
            request_id: "four".into(),
            ..AppendTurnsRequest::default()
        })
        .await
        .expect("the migrated session takes new turns")
        .into_inner();
    assert_eq!(next.last_seq, 4);

    let tagged_reservation = format!("{prefix}:{{default}}:budget:res:r1");
    let recorded: String = cmd(&["HGET", &tagged_reservation, "c1"]).await;
    assert_eq!(
        recorded,
        format!("{prefix}:{{default}}:budget:ctr:tenant:p1")
    );
    let held: Vec<String> = cmd(&[
        "ZRANGE",
        &format!("{prefix}:{{default}}:budget:expiries"),
        "0",
        "-1",
    ])
    .await;
    assert_eq!(held, [tagged_reservation]);
    let due: Vec<String> =
        cmd(&["ZRANGE", &format!("{prefix}:{{budget:due}}:at"), "0", "-1"]).await;
    assert_eq!(due, ["default"], "the sweeper looks at the tenant again");

    let again = migrate(&prefix);
    assert!(again.contains("renamed 0 keys"), "idempotent: {again}");
    mesh.stop().await;
    delete_prefix(&prefix).await;
}
