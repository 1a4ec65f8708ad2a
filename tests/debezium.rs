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

async fn create_table(db: &tokio_postgres::Client, name: &str) {
    create_payments_table(db, name).await;
    db.batch_execute(&format!(
        "CREATE TABLE IF NOT EXISTS {name}_changes (id bigint, old_status text, new_status text);
         CREATE OR REPLACE FUNCTION {name}_audit() RETURNS trigger AS $$
         BEGIN INSERT INTO {name}_changes VALUES (OLD.id, OLD.status, NEW.status); RETURN NEW; END $$ LANGUAGE plpgsql;
         CREATE TRIGGER {name}_audit AFTER UPDATE ON {name} FOR EACH ROW
           WHEN (OLD.status IS DISTINCT FROM NEW.status) EXECUTE FUNCTION {name}_audit();"
    ))
    .await
    .unwrap();
}

async fn insert(
    db: &tokio_postgres::Client,
    table: &str,
    key: &str,
    amount: &str,
    pi: &str,
) -> i64 {
    db.query_one(
        &format!("INSERT INTO {table} (idempotency_key, amount, currency, stripe_payment_intent_id) VALUES ($1, $2::text::numeric, 'usd', $3) RETURNING id"),
        &[&key, &amount, &pi],
    )
    .await
    .unwrap()
    .get(0)
}

async fn status_of(db: &tokio_postgres::Client, table: &str, id: i64) -> String {
    db.query_one(&format!("SELECT status FROM {table} WHERE id = $1"), &[&id])
        .await
        .unwrap()
        .get(0)
}

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
    let t = Topics {
        cdc: format!("{run}.public.{table}"),
        status: format!("{run}-status"),
        dlq: format!("{run}-dlq"),
        run: run.clone(),
        table: table.clone(),
    };
    create_topics(&s.brokers, &[(&t.cdc, 1), (&t.status, 1), (&t.dlq, 1)]).await;
    let db = pg(&s.pg_url).await;
    create_table(&db, &table).await;
    let logs = log_dir(&run);

    // Pending before Debezium starts: its initial snapshot reads them.
    let (pi_ok, _) = intent_with_card(&s.stripe, "4999", "4242424242424242");
    let (pi_3ds, st) = intent_with_card(&s.stripe, "2500", "4000002760003184");
    assert_eq!(st, "requires_action");
    let ok = insert(&db, &table, "ok", "49.99", &pi_ok).await;
    let three_ds = insert(&db, &table, "3ds", "25.00", &pi_3ds).await;
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
    let later = insert(&db, &table, "later", "12.34", &pi_later).await;
    let canceled = insert(&db, &table, "canceled", "7.00", &pi_canceled).await;

    // kill -9 of paystream once the first status is in the table.
    wait_for("a first status written back", 90, || async {
        status_of(&db, &table, ok).await != "pending"
            || status_of(&db, &table, later).await != "pending"
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
    let after = insert(&db, &table, "after", "5.01", &pi_after).await;
    script("connect-up");

    wait_for("every final answer written back", 120, || async {
        let mut done = 0;
        for id in [ok, later, canceled, after] {
            done += usize::from(status_of(&db, &table, id).await != "pending");
        }
        done == 4
    })
    .await;
    assert_eq!(status_of(&db, &table, ok).await, "succeeded");
    assert_eq!(status_of(&db, &table, later).await, "succeeded");
    assert_eq!(status_of(&db, &table, after).await, "succeeded");
    assert_eq!(status_of(&db, &table, canceled).await, "failed");
    assert_eq!(status_of(&db, &table, three_ds).await, "pending");

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
            &format!("SELECT id, old_status, new_status FROM {table}_changes ORDER BY id"),
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
    db.batch_execute(&format!("DROP TABLE {table}_changes;"))
        .await
        .unwrap();
}
