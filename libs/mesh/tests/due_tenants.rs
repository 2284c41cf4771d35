//! The index of tenants with work due against a real Redis (`WEIR_TEST_REDIS_URL`, default
//! `redis://127.0.0.1:6379`, or a `redis+cluster://` URL): a mark is never lost to a sweeper's
//! settle, whichever lands first. Every test uses its own key prefix and deletes it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use weir_mesh::{
    due::DueTenants,
    store::{RedisConnection, connect, keys_matching},
};

async fn setup(test: &str) -> (RedisConnection, DueTenants, String) {
    let url =
        std::env::var("WEIR_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let conn = connect(&url).await.unwrap();
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    let prefix = format!("weir-test-due-{}-{nanos}-{test}", std::process::id());
    let due = DueTenants::new(&prefix, "svc");
    (conn, due, prefix)
}

async fn cleanup(conn: &mut RedisConnection, prefix: &str) {
    for key in keys_matching(conn, &format!("{prefix}:*")).await.unwrap() {
        let _: () = redis::cmd("DEL").arg(key).query_async(conn).await.unwrap();
    }
}

type Next = Result<Option<i64>, redis::RedisError>;

#[tokio::test]
async fn marks_keep_the_earliest_and_settles_move_or_remove_a_tenant() {
    let (mut conn, due, prefix) = setup("basic").await;
    due.mark(&mut conn, "acme", 500).await.unwrap();
    due.mark(&mut conn, "acme", 300).await.unwrap();
    due.mark(&mut conn, "acme", 900).await.unwrap();
    due.mark(&mut conn, "globex", 2_000).await.unwrap();
    assert!(due.due(&mut conn, 299, 10).await.unwrap().is_empty());
    assert_eq!(due.due(&mut conn, 300, 10).await.unwrap(), ["acme"]);

    // Settled with work left at 1000: due again then, not before.
    let next = due
        .settle(&mut conn, "acme", || async { Next::Ok(Some(1_000)) })
        .await
        .unwrap();
    assert_eq!(next, Some(1_000));
    assert!(due.due(&mut conn, 999, 10).await.unwrap().is_empty());
    assert_eq!(due.due(&mut conn, 1_000, 10).await.unwrap(), ["acme"]);

    // Settled with nothing left: gone.
    due.settle(&mut conn, "acme", || async { Next::Ok(None) })
        .await
        .unwrap();
    assert_eq!(due.due(&mut conn, i64::MAX, 10).await.unwrap(), ["globex"]);
    cleanup(&mut conn, &prefix).await;
}

#[tokio::test]
async fn a_mark_that_lands_while_a_sweeper_settles_is_kept() {
    let (mut conn, due, prefix) = setup("race").await;
    due.mark(&mut conn, "acme", 100).await.unwrap();
    // The sweeper finds nothing left, but a writer gives the tenant new work (due at 5000) and
    // marks it between the sweeper's recomputation and its settle.
    let mut writer = conn.clone();
    let writer_due = due.clone();
    due.settle(&mut conn, "acme", || async move {
        writer_due.mark(&mut writer, "acme", 5_000).await?;
        Next::Ok(None)
    })
    .await
    .unwrap();
    assert_eq!(
        due.due(&mut conn, i64::MAX, 10).await.unwrap(),
        ["acme"],
        "the late mark's tenant is still indexed"
    );
    // The settle could not tell, so it left the tenant due: the next settle sees the new work.
    assert_eq!(due.due(&mut conn, 100, 10).await.unwrap(), ["acme"]);
    due.settle(&mut conn, "acme", || async { Next::Ok(Some(5_000)) })
        .await
        .unwrap();
    assert!(due.due(&mut conn, 4_999, 10).await.unwrap().is_empty());
    assert_eq!(due.due(&mut conn, 5_000, 10).await.unwrap(), ["acme"]);
    cleanup(&mut conn, &prefix).await;
}
