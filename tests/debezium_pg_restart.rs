//! The Postgres master restarts under real Debezium. Rows inserted just before the restart are
//! in the WAL but maybe not yet streamed; the suite connector (`common::cdc`) loses its
//! replication connection, reconnects by itself (Debezium retries connection errors:
//! `errors.max.retries` is unlimited by default) and resumes from its slot. Every row, before
//! and after the restart, reaches paystream, resolves through the emulator, is written once by
//! the updater (which reconnects too), and leaves state when Debezium carries that write back.
//!
//! This binary restarts the shared dev Postgres, so it holds one test only.

mod common;

use common::*;

/// Three pending rows (the `n`th to `n+2`nd of the test) whose intents Stripe says succeeded,
/// for the amounts the rows hold.
async fn batch(
    s: &Stack,
    db: &tokio_postgres::Client,
    t: &Topics,
    name: &str,
    n: usize,
) -> Vec<i64> {
    let mut ids = Vec::new();
    for i in n..n + 3 {
        let cents = 1000 + i;
        let (pi, st) = intent_with_card(&s.stripe, &cents.to_string(), "4242424242424242");
        assert_eq!(st, "succeeded");
        let amount = format!("{}.{:02}", cents / 100, cents % 100);
        let key = format!("{}-{name}-{i}", t.run);
        ids.push(
            insert_payment(db, &t.table, &key, &amount, Some(&pi))
                .await
                .id,
        );
    }
    ids
}

/// Whether every row of `ids` holds `succeeded`.
async fn succeeded(db: &tokio_postgres::Client, t: &Topics, ids: &[i64]) -> bool {
    count(
        db,
        &format!(
            "SELECT count(*) FROM {} WHERE id = ANY($1) AND status = 'succeeded'",
            t.table
        ),
        &[&ids],
    )
    .await
        == ids.len() as i64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgres_restart_under_debezium_loses_nothing() {
    let s = stack();
    let db = pg(&s.pg_url).await;
    let t = cdc_topics(s, &db, "pgrestart", 1).await;
    install_status_audit(&db, &t.table).await;
    let logs = log_dir(&t.run);
    let data = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut daemon = spawn(
        &run_args(s, &t, data.path(), port, &["--retry-backoff", "500ms"]),
        &logs.join("run.log"),
    );
    let mut updater = spawn(&table_updater_args(s, &t, &[]), &logs.join("updater.log"));
    let first = batch(s, &db, &t, "first", 0).await;
    wait_for("the first rows resolved", 90, || succeeded(&db, &t, &first)).await;

    // Rows committed right before the restart: in the WAL, perhaps not yet streamed.
    let before = batch(s, &db, &t, "before", 3).await;
    drop(db);
    script("pg-down");
    std::thread::sleep(std::time::Duration::from_secs(3));
    script("pg-up");
    let db = pg(&s.pg_url).await;
    let after = batch(s, &db, &t, "after", 6).await;

    let all: Vec<i64> = first.iter().chain(&before).chain(&after).copied().collect();
    wait_for("every row resolved after the restart", 180, || {
        succeeded(&db, &t, &all)
    })
    .await;
    wait_for("Debezium carried every write back", 120, || async {
        let Some((200, body)) = http_get(port, "/state/stats") else {
            return false;
        };
        let st: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
        st["pending"] == 0 && st["awaiting_cdc"] == 0
    })
    .await;
    let changes = count(
        &db,
        &format!(
            "SELECT count(*) FROM {} WHERE id = ANY($1) AND old_status = 'pending' AND new_status = 'succeeded'",
            audit_table(&t.table)
        ),
        &[&all],
    )
    .await;
    let every = count(
        &db,
        &format!(
            "SELECT count(*) FROM {} WHERE id = ANY($1)",
            audit_table(&t.table)
        ),
        &[&all],
    )
    .await;
    assert_eq!(
        (changes, every),
        (9, 9),
        "each row changed once, pending → succeeded"
    );
    assert!(daemon.term().success());
    assert!(updater.term().success());
    assert_no_panic(&logs);
}
