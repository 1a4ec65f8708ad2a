//! The private Postgres cluster: the payments table, its rows and the status audit.

pub async fn pg(url: &str) -> tokio_postgres::Client {
    let (c, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .expect("postgres");
    tokio::spawn(conn);
    c
}

/// Audit of every status change of `table` into `<table>_changes` ([`audit_table`]), so a test
/// can prove nothing moved twice or backwards.
pub async fn install_status_audit(c: &tokio_postgres::Client, table: &str) {
    let audit = audit_table(table);
    c.batch_execute(&format!(
        "CREATE TABLE IF NOT EXISTS {audit} (id bigint, old_status text, new_status text, at timestamptz DEFAULT now());
         CREATE OR REPLACE FUNCTION {audit}_fn() RETURNS trigger AS $$
         BEGIN INSERT INTO {audit}(id, old_status, new_status) VALUES (OLD.id, OLD.status, NEW.status); RETURN NEW; END $$ LANGUAGE plpgsql;
         DROP TRIGGER IF EXISTS audit_status ON {table};
         CREATE TRIGGER audit_status AFTER UPDATE ON {table} FOR EACH ROW WHEN (OLD.status IS DISTINCT FROM NEW.status) EXECUTE FUNCTION {audit}_fn();",
    ))
    .await
    .expect("audit trigger");
}

pub fn audit_table(table: &str) -> String {
    format!("{table}_changes")
}

/// A payments row as Debezium would carry it.
#[derive(Debug, Clone)]
pub struct Row {
    pub id: i64,
    pub idempotency_key: String,
    pub amount: String,
    pub currency: String,
    pub status: String,
    pub intent: Option<String>,
}

pub async fn insert_payment(
    c: &tokio_postgres::Client,
    table: &str,
    key: &str,
    amount: &str,
    intent: Option<&str>,
) -> Row {
    let r = c
        .query_one(
            &format!("INSERT INTO {table} (idempotency_key, amount, currency, stripe_payment_intent_id) VALUES ($1, $2::text::numeric, 'usd', $3) RETURNING id, amount::text, status"),
            &[&key, &amount, &intent],
        )
        .await
        .expect("insert");
    Row {
        id: r.get(0),
        idempotency_key: key.into(),
        amount: r.get(1),
        currency: "usd".into(),
        status: r.get(2),
        intent: intent.map(str::to_string),
    }
}

pub async fn read_payment(c: &tokio_postgres::Client, table: &str, id: i64) -> Row {
    let r = c
        .query_one(&format!("SELECT idempotency_key, amount::text, currency, status, stripe_payment_intent_id FROM {table} WHERE id = $1"), &[&id])
        .await
        .expect("select");
    Row {
        id,
        idempotency_key: r.get(0),
        amount: r.get(1),
        currency: r.get(2),
        status: r.get(3),
        intent: r.get(4),
    }
}

/// Inserts a pending row with a chosen id (tests generate events before the rows exist).
pub async fn insert_payment_with_id(c: &tokio_postgres::Client, r: &Row) {
    c.execute(
        "INSERT INTO payments (id, idempotency_key, amount, currency, stripe_payment_intent_id) OVERRIDING SYSTEM VALUE VALUES ($1, $2, $3::text::numeric, $4, $5)",
        &[&r.id, &r.idempotency_key, &r.amount, &r.currency, &r.intent],
    )
    .await
    .expect("insert with id");
}

/// Inserts `n` pending rows with ids `base..base+n` (keys `<prefix>-<id>`).
pub async fn insert_pending_rows(db: &tokio_postgres::Client, base: i64, n: i64, prefix: &str) {
    db.execute(
        "INSERT INTO payments (id, idempotency_key, amount, currency) OVERRIDING SYSTEM VALUE \
         SELECT g, $3 || '-' || g, 1.00, 'usd' FROM generate_series($1::int8, $2::int8) g",
        &[&base, &(base + n - 1), &prefix],
    )
    .await
    .unwrap();
}

/// The single `count(*)`-like integer a query returns.
pub async fn count(
    db: &tokio_postgres::Client,
    sql: &str,
    params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
) -> i64 {
    db.query_one(sql, params).await.unwrap().get(0)
}
