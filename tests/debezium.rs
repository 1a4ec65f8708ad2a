//! The whole loop through real Debezium: a table of the test's own on the dev Postgres, Debezium
//! 3.6.3's PostgreSQL connector on a real Kafka Connect 3.9 worker (registered with
//! `scripts/register-connector`), `paystream run` on its topic, the Stripe emulator, the status
//! topic, `paystream updater` writing the rows, and Debezium carrying those writes back so that
//! paystream drops the payments. Covers the initial snapshot of rows already pending, rows
//! inserted while streaming, a `kill -9` of paystream and a `kill -9` of the Connect worker in
//! the middle of the flow (Connect resumes from its stored offsets and may send changes again:
//! the duplicates are counted and shown harmless: every row changes once).

mod common;

use std::time::Duration;

use common::*;

/// Registers the connector of `table` with the project's script, waiting for RUNNING.
fn register(table: &str) {
    register_table_connector(table, &[], &[]);
}

fn kill9_connect() {
    let pid = std::fs::read_to_string(root().join(".dev/connect.pid")).unwrap();
    let st = std::process::Command::new("kill")
        .args(["-9", pid.trim()])
        .status()
        .unwrap();
    assert!(st.success());
    std::thread::sleep(Duration::from_millis(500));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_debezium_carries_payments_in_and_statuses_back() {
    let s = stack();
    script("connect-up");
    let run = unique("dbz");
    let table = run.clone();
    let db = pg(&s.pg_url).await;
    let t = own_connector_topics(s, &db, &run, &table).await;
    install_status_audit(&db, &table).await;
    let logs = log_dir(&run);

    // Pending before Debezium starts: its initial snapshot reads them.
    let (pi_ok, _) = intent_with_card(&s.stripe, "4999", "4242424242424242");
    let (pi_3ds, st) = intent_with_card(&s.stripe, "2500", "4000002760003184");
    assert_eq!(st, "requires_action");
    let ok = insert_payment(&db, &table, "ok", "49.99", Some(&pi_ok))
        .await
        .id;
    let three_ds = insert_payment(&db, &table, "3ds", "25.00", Some(&pi_3ds))
        .await
        .id;
    register(&table);

    let data = tempfile::tempdir().unwrap();
    let port = free_port();
    let args = run_args(s, &t, data.path(), port, &["--retry-backoff", "500ms"]);
    let mut daemon = spawn(&args, &logs.join("run-1.log"));
    let _updater = spawn(
        &updater_args(
            s,
            &t.status,
            &format!("{run}-updater"),
            &["--table", &table],
        ),
        &logs.join("updater.log"),
    );

    // Streamed while paystream runs.
    let (pi_later, _) = intent_with_card(&s.stripe, "1234", "4242424242424242");
    let pi_canceled = intent_canceled(&s.stripe, "700");
    let later = insert_payment(&db, &table, "later", "12.34", Some(&pi_later))
        .await
        .id;
    let canceled = insert_payment(&db, &table, "canceled", "7.00", Some(&pi_canceled))
        .await
        .id;

    // kill -9 of paystream once the first status is in the table.
    wait_for("a first status written back", 90, || async {
        read_payment(&db, &table, ok).await.status != "pending"
            || read_payment(&db, &table, later).await.status != "pending"
    })
    .await;
    daemon.kill9();
    let port = free_port();
    let args = run_args(s, &t, data.path(), port, &["--retry-backoff", "500ms"]);
    let mut daemon = spawn(&args, &logs.join("run-2.log"));

    // kill -9 of the Connect worker with a change in flight; a new worker resumes from the
    // offsets the old one stored (the group first waits out the dead member's session).
    let (pi_after, _) = intent_with_card(&s.stripe, "501", "4242424242424242");
    kill9_connect();
    let after = insert_payment(&db, &table, "after", "5.01", Some(&pi_after))
        .await
        .id;
    script("connect-up");

    wait_for("every final answer written back", 120, || async {
        let mut done = 0;
        for id in [ok, later, canceled, after] {
            done += usize::from(read_payment(&db, &table, id).await.status != "pending");
        }
        done == 4
    })
    .await;
    assert_eq!(read_payment(&db, &table, ok).await.status, "succeeded");
    assert_eq!(read_payment(&db, &table, later).await.status, "succeeded");
    assert_eq!(read_payment(&db, &table, after).await.status, "succeeded");
    assert_eq!(read_payment(&db, &table, canceled).await.status, "failed");
    assert_eq!(read_payment(&db, &table, three_ds).await.status, "pending");

    // Debezium carried the writes back: paystream holds only the 3DS payment.
    wait_for("paystream dropped the final rows", 60, || async {
        let Some((200, body)) = http_get(port, "/state/stats") else {
            return false;
        };
        let st: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
        st["pending"] == 1 && st["awaiting_cdc"] == 0
    })
    .await;
    let (code, body) = http_get(port, &format!("/state/get?q={three_ds}")).unwrap();
    assert_eq!(code, 200, "the 3DS payment is the one held: {body}");

    // Each row changed once, pending → final, whatever Debezium or paystream sent again.
    let changes: Vec<(i64, String, String)> = db
        .query(
            &format!(
                "SELECT id, old_status, new_status FROM {} ORDER BY id",
                audit_table(&table)
            ),
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    let mut want = vec![
        (ok, "pending".to_string(), "succeeded".to_string()),
        (later, "pending".into(), "succeeded".into()),
        (canceled, "pending".into(), "failed".into()),
        (after, "pending".into(), "succeeded".into()),
    ];
    want.sort();
    assert_eq!(changes, want);
    // What Debezium really wrote: every record decodes, none was dead-lettered.
    let cdc = read_all(&s.brokers, &t.cdc);
    let dead = read_all(&s.brokers, &t.dlq);
    assert!(dead.is_empty(), "dead letters: {dead:?}");
    let creates = cdc
        .iter()
        .filter(|(_, v, _)| {
            v.as_deref()
                .is_some_and(|v| v.windows(8).any(|w| w == b"\"op\":\"c\""))
        })
        .count();
    eprintln!(
        "{} CDC records from Debezium ({creates} creates for 3 inserted while streaming: {} sent again after the worker's kill)",
        cdc.len(),
        creates.saturating_sub(3)
    );
    assert!(daemon.term().success());

    // Clean up Connect and Postgres: the connector, its slot and publication.
    drop_table_connector(&db, &table).await;
    db.batch_execute(&format!("DROP TABLE {};", audit_table(&table)))
        .await
        .unwrap();
}
