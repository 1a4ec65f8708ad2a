//! Real Debezium for the tests whose scenario is a table change. One connector serves the whole
//! suite (`paystream-it`, registered with `scripts/register-connector` on the dev Connect worker
//! of `scripts/connect-up`, and left running): it captures every table named `cdc_*` of the
//! dev database into `it.public.<table>`, JSON with schemas, decimals precise, as
//! `connectors/payments.json` configures production. A test makes its own table and topic
//! ([`cdc_topics`]) and then only writes SQL; what paystream reads is what Debezium wrote.
//!
//! Why one connector and not one per test: registering one costs 11-20 s of rebalances on a
//! distributed worker and holds a replication slot until deleted. Why the publication is the
//! helper's (`publication.autocreate.mode=disabled`): a table made after the connector started
//! must be added to it, and pgoutput publishes a table's changes only from the transaction
//! after the one that added it (measured with the embedded engine: a row inserted in the same
//! transaction as `ALTER PUBLICATION … ADD TABLE` never arrived), so the ALTER commits first.

use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use super::*;

pub const CONNECTOR: &str = "paystream-it";
const PUBLICATION: &str = "paystream_it";
const PREFIX: &str = "it";

pub fn connect_url() -> String {
    format!(
        "http://127.0.0.1:{}",
        std::env::var("PAYSTREAM_CONNECT_PORT").unwrap_or_else(|_| "28083".into())
    )
}

/// `scripts/register-connector` with the dev stack's connection settings; `doc` is the config
/// file's JSON (placeholders left for the script to resolve), `env` sets more of them.
pub fn register_connector(
    name: &str,
    doc: &serde_json::Value,
    args: &[&str],
    env: &[(&str, &str)],
) -> (i32, String, String) {
    let cfg = root().join(format!("target/test-logs/{name}-connector.json"));
    std::fs::create_dir_all(cfg.parent().unwrap()).unwrap();
    std::fs::write(&cfg, doc.to_string()).unwrap();
    output(
        Command::new(root().join("scripts/register-connector"))
            .args(["--connect-url", &connect_url()])
            .args(["--config", cfg.to_str().unwrap(), "--timeout", "180"])
            .args(args)
            .envs(env.iter().copied())
            .env("CONNECTOR_NAME", name)
            .env("POSTGRES_HOST", "127.0.0.1")
            .env(
                "POSTGRES_PORT",
                std::env::var("PAYSTREAM_PG_PORT").unwrap_or_else(|_| "25432".into()),
            )
            .env("DEBEZIUM_USER", "postgres")
            .env("DEBEZIUM_PASSWORD", "unused-trust")
            // Heartbeats move the slot on a quiet table.
            .env("HEARTBEAT_INTERVAL_MS", "1000"),
    )
}

/// The suite connector RUNNING on the dev Connect worker (started if need be), once per test
/// binary; a connector left by an earlier binary or run is reused as it is.
pub async fn suite_connector(db: &tokio_postgres::Client) {
    static READY: OnceLock<()> = OnceLock::new();
    if READY.get().is_some() {
        return;
    }
    let has: i64 = db
        .query_one(
            "SELECT count(*) FROM pg_publication WHERE pubname = $1",
            &[&PUBLICATION],
        )
        .await
        .unwrap()
        .get(0);
    if has == 0 {
        // Several tests of one binary may race here: a duplicate is harmless.
        let _ = db
            .batch_execute(&format!("CREATE PUBLICATION {PUBLICATION}"))
            .await;
    }
    tokio::task::spawn_blocking(|| {
        READY.get_or_init(|| {
            script("connect-up");
            let mut doc = connector_doc();
            let c = &mut doc["config"];
            c["table.include.list"] = r"public\.cdc_.*".into();
            c["topic.prefix"] = PREFIX.into();
            c["slot.name"] = PUBLICATION.into();
            c["publication.name"] = PUBLICATION.into();
            c["publication.autocreate.mode"] = "disabled".into();
            // The tables are new: nothing to snapshot, and a snapshot of the tables earlier
            // runs left would only slow the start.
            c["snapshot.mode"] = "no_data".into();
            // Already RUNNING (an earlier test binary registered it): a re-registration would
            // restart the connector and wait out its settle time for nothing. (A changed
            // connectors/payments.json then needs the connector deleted by hand in a dev tree;
            // CI starts from none.)
            let (code, _, _) = register_connector(CONNECTOR, &doc, &["--status"], &[]);
            if code == 0 {
                return;
            }
            let (code, out, err) = register_connector(CONNECTOR, &doc, &[], &[]);
            assert_eq!(code, 0, "register-connector: {out}{err}");
        });
    })
    .await
    .unwrap();
}

/// A test's own topics and payments table, the table captured by real Debezium into `t.cdc`
/// (`cdc_partitions` partitions, keyed by id as Debezium keys it).
pub async fn cdc_topics(
    s: &Stack,
    db: &tokio_postgres::Client,
    prefix: &str,
    cdc_partitions: i32,
) -> Topics {
    suite_connector(db).await;
    let run = unique(prefix);
    let table = format!("cdc_{run}");
    let t = Topics {
        cdc: format!("{PREFIX}.public.{table}"),
        status: format!("{run}-status"),
        dlq: format!("{run}-dlq"),
        run,
        table: table.clone(),
    };
    create_topics(
        &s.brokers,
        &[(&t.cdc, cdc_partitions), (&t.status, 1), (&t.dlq, 1)],
    )
    .await;
    create_payments_table(db, &table).await;
    // Its own transaction, committed before any row: see the module doc.
    db.batch_execute(&format!(
        "ALTER PUBLICATION {PUBLICATION} ADD TABLE public.{table}"
    ))
    .await
    .unwrap();
    t
}

/// Inserts `r` as the payment service would, with its id, into the test's table.
pub async fn cdc_insert(db: &tokio_postgres::Client, t: &Topics, r: &Row) {
    db.execute(
        &format!(
            "INSERT INTO {} (id, idempotency_key, amount, currency, status, stripe_payment_intent_id)
             OVERRIDING SYSTEM VALUE VALUES ($1, $2, $3::text::numeric, $4, $5, $6)",
            t.table
        ),
        &[&r.id, &r.idempotency_key, &r.amount, &r.currency, &r.status, &r.intent],
    )
    .await
    .expect("insert");
}

/// Sets every column of row `r.id` to `r`'s values (an update Debezium carries as `u`).
pub async fn cdc_update(db: &tokio_postgres::Client, t: &Topics, r: &Row) {
    let n = db
        .execute(
            &format!(
                "UPDATE {} SET idempotency_key = $2, amount = $3::text::numeric, currency = $4,
                 status = $5, stripe_payment_intent_id = $6, updated_at = now() WHERE id = $1",
                t.table
            ),
            &[
                &r.id,
                &r.idempotency_key,
                &r.amount,
                &r.currency,
                &r.status,
                &r.intent,
            ],
        )
        .await
        .expect("update");
    assert_eq!(n, 1, "row {} exists", r.id);
}

pub async fn cdc_delete(db: &tokio_postgres::Client, t: &Topics, id: i64) {
    db.execute(&format!("DELETE FROM {} WHERE id = $1", t.table), &[&id])
        .await
        .expect("delete");
}

/// connectors/payments.json, the production registration the tests' connectors start from.
pub fn connector_doc() -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(root().join("connectors/payments.json")).unwrap())
        .unwrap()
}

/// Drops the replication slot `slot` once Connect let go of it (a deleted connector's task
/// releases it a moment later; Debezium leaves the slot behind).
pub async fn drop_slot(db: &tokio_postgres::Client, slot: &str) {
    for _ in 0..40 {
        let left: i64 = db
            .query_one(
                "SELECT count(*) FROM pg_replication_slots WHERE slot_name = $1",
                &[&slot],
            )
            .await
            .unwrap()
            .get(0);
        if left == 0 {
            return;
        }
        let _ = db
            .query(
                "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = $1 AND NOT active",
                &[&slot],
            )
            .await;
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Topics and a payments table `table` for a connector of the test's own
/// ([`register_table_connector`]: topic prefix = table, so the CDC topic is
/// `<table>.public.<table>`), one partition each.
pub async fn own_connector_topics(
    s: &Stack,
    db: &tokio_postgres::Client,
    run: &str,
    table: &str,
) -> Topics {
    let t = Topics {
        cdc: format!("{table}.public.{table}"),
        status: format!("{run}-status"),
        dlq: format!("{run}-dlq"),
        run: run.to_string(),
        table: table.to_string(),
    };
    create_topics(&s.brokers, &[(&t.cdc, 1), (&t.status, 1), (&t.dlq, 1)]).await;
    create_payments_table(db, table).await;
    t
}

/// The payments table `name` (schemas/payments.sql).
pub async fn create_payments_table(db: &tokio_postgres::Client, name: &str) {
    let ddl = std::fs::read_to_string(root().join("schemas/payments.sql")).unwrap();
    db.batch_execute(&ddl.replace("public.payments", &format!("public.{name}")))
        .await
        .unwrap();
}

/// A connector of the test's own for `table` (snapshot, slot and publication named after it),
/// registered to RUNNING; `args`/`env` add to `register_connector`'s.
pub fn register_table_connector(table: &str, args: &[&str], env: &[(&str, &str)]) {
    let mut doc = connector_doc();
    doc["config"]["table.include.list"] = format!("public.{table}").into();
    let mut env = env.to_vec();
    env.extend([
        ("SLOT_NAME", table),
        ("PUBLICATION_NAME", table),
        ("TOPIC_PREFIX", table),
    ]);
    let (code, out, err) = register_connector(table, &doc, args, &env);
    assert_eq!(code, 0, "register-connector: {out}{err}");
}

/// Deletes the connector of `table` and what it left in Postgres: its slot (once Connect let
/// go of it), its publication, and the table.
pub async fn drop_table_connector(db: &tokio_postgres::Client, table: &str) {
    let (code, out, err) = output(
        Command::new(root().join("scripts/register-connector"))
            .args(["--connect-url", &connect_url(), "--delete"])
            .env("CONNECTOR_NAME", table),
    );
    assert_eq!(code, 0, "{out}{err}");
    drop_slot(db, table).await;
    db.batch_execute(&format!(
        "DROP PUBLICATION IF EXISTS {table}; DROP TABLE IF EXISTS {table} CASCADE;"
    ))
    .await
    .unwrap();
}

/// `paystream updater` for a test's topics and table (its group named after the run), then
/// `extra`.
pub fn table_updater_args(s: &Stack, t: &Topics, extra: &[&str]) -> Vec<String> {
    let mut args = updater_args(
        s,
        &t.status,
        &format!("{}-updater", t.run),
        &["--table", &t.table],
    );
    with_extra(&mut args, extra);
    args
}

/// How many of the rows `ids` of the test's table are no longer pending.
pub async fn rows_not_pending(db: &tokio_postgres::Client, t: &Topics, ids: &[i64]) -> i64 {
    count(
        db,
        &format!(
            "SELECT count(*) FROM {} WHERE id = ANY($1) AND status <> 'pending'",
            t.table
        ),
        &[&ids],
    )
    .await
}
