//! Embedded mode's test helpers: a payments table of the test's own, its slot and publication,
//! the daemon's arguments, and what state and the table hold.

use std::collections::BTreeMap;
use std::path::Path;

use super::*;

/// A payments table of the test's own: `schemas/payments.sql` itself, under the test's name.
pub async fn create_table(db: &tokio_postgres::Client, name: &str, full: bool) {
    let ddl = std::fs::read_to_string(root().join("schemas/payments.sql")).unwrap();
    assert!(
        ddl.contains("public.payments"),
        "schemas/payments.sql names the table"
    );
    let mut sql = ddl.replace("public.payments", &format!("public.{name}"));
    if full {
        sql += &format!("ALTER TABLE {name} REPLICA IDENTITY FULL;");
    }
    db.batch_execute(&sql).await.unwrap();
}

pub async fn insert(
    db: &tokio_postgres::Client,
    table: &str,
    key: &str,
    amount: &str,
    intent: Option<&str>,
) -> i64 {
    insert_in(db, table, key, amount, "usd", intent).await
}

/// [`insert`] in another currency.
pub async fn insert_in(
    db: &tokio_postgres::Client,
    table: &str,
    key: &str,
    amount: &str,
    currency: &str,
    intent: Option<&str>,
) -> i64 {
    db.query_one(
        &format!("INSERT INTO {table} (idempotency_key, amount, currency, stripe_payment_intent_id) VALUES ($1, $2::text::numeric, $3, $4) RETURNING id"),
        &[&key, &amount, &currency, &intent],
    )
    .await
    .unwrap()
    .get(0)
}

pub async fn status(db: &tokio_postgres::Client, table: &str, id: i64) -> String {
    db.query_one(&format!("SELECT status FROM {table} WHERE id = $1"), &[&id])
        .await
        .unwrap()
        .get(0)
}

/// The test's own names: table, slot, publication.
pub struct Names {
    pub table: String,
    pub slot: String,
    pub publication: String,
}

pub fn names(prefix: &str) -> Names {
    let run = unique(prefix);
    Names {
        table: format!("{run}_payments"),
        slot: format!("{run}_slot"),
        publication: format!("{run}_pub"),
    }
}

/// `paystream run` in embedded mode for a test, then `extra`.
pub fn embedded_args(
    s: &Stack,
    n: &Names,
    data_dir: &Path,
    port: u16,
    extra: &[&str],
) -> Vec<String> {
    let mut args: Vec<String> = [
        "run",
        "--source",
        "postgres",
        "--sink",
        "postgres",
        "--postgres-url",
        &s.pg_url,
        "--table",
        &n.table,
        "--slot",
        &n.slot,
        "--publication",
        &n.publication,
    ]
    .iter()
    .map(|a| a.to_string())
    .collect();
    args.extend(daemon_args(s, data_dir, port));
    with_extra(&mut args, extra);
    args
}

/// What the daemon holds: payment id → amount, from its live state API.
pub fn state_amounts(port: u16) -> Option<BTreeMap<String, String>> {
    let (code, body) = http_get(port, "/state/export")?;
    if code != 200 {
        return None;
    }
    Some(
        body.lines()
            .filter(|l| l.starts_with('{'))
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|e| e["emitted"].is_null())
            .map(|e| {
                (
                    e["id"].as_str().unwrap_or_default().to_string(),
                    e["amount"].as_str().unwrap_or_default().to_string(),
                )
            })
            .collect(),
    )
}

/// The table's pending rows: id → amount.
pub async fn db_pending(db: &tokio_postgres::Client, table: &str) -> BTreeMap<String, String> {
    db.query(
        &format!("SELECT id::text, amount::text FROM {table} WHERE status = 'pending'"),
        &[],
    )
    .await
    .unwrap()
    .iter()
    .map(|r| (r.get(0), r.get(1)))
    .collect()
}

/// Waits until the slot confirmed `lsn` (the daemon acknowledged everything before it).
pub async fn wait_confirmed(db: &tokio_postgres::Client, slot: &str, lsn: &str, secs: u64) {
    wait_for("the slot to confirm the WAL position", secs, || async {
        count(
            db,
            "SELECT (confirmed_flush_lsn >= $2::text::pg_lsn)::int::int8 FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot, &lsn],
        )
        .await
            == 1
    })
    .await;
}

pub async fn current_lsn(db: &tokio_postgres::Client) -> String {
    db.query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .unwrap()
        .get(0)
}

/// A test's own embedded-mode world: the stack, a connection, its table (REPLICA IDENTITY FULL
/// with `full`), slot and publication names, a data dir and a log dir.
pub struct Env {
    pub s: &'static Stack,
    pub db: tokio_postgres::Client,
    pub n: Names,
    pub dir: tempfile::TempDir,
    pub logs: std::path::PathBuf,
}

pub async fn env(prefix: &str, full: bool) -> Env {
    let s = pg_stripe_stack();
    let db = pg(&s.pg_url).await;
    let n = names(prefix);
    create_table(&db, &n.table, full).await;
    Env {
        s,
        db,
        logs: log_dir(&n.table),
        n,
        dir: tempfile::tempdir().unwrap(),
    }
}

impl Env {
    /// Stops the daemon cleanly (its final checkpoint), checks the logs for panics and drops
    /// the test's slot: one left behind would hold WAL on the dev cluster. On a connection of
    /// its own: the test's may not have lived through a Postgres restart.
    pub async fn finish(&self, run: &mut Proc) {
        assert!(run.term().success());
        assert_no_panic(&self.logs);
        pg(&self.s.pg_url)
            .await
            .execute("SELECT pg_drop_replication_slot($1)", &[&self.n.slot])
            .await
            .unwrap();
    }
}
