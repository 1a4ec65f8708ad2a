//! Test harness: the real servers (started by the project's scripts), Debezium-shaped events,
//! and paystream processes.
#![allow(dead_code)]

pub mod cdc;
pub mod embedded;
pub mod registry;

#[allow(unused_imports)]
pub use cdc::*;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};

pub struct Stack {
    pub brokers: String,
    pub pg_url: String,
    pub stripe: String,
}

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn port(var: &str, default: u16) -> u16 {
    std::env::var(var)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Brings the dev stack up once per test binary (idempotent scripts).
pub fn stack() -> &'static Stack {
    static S: OnceLock<Stack> = OnceLock::new();
    S.get_or_init(|| {
        let st = Command::new(root().join("scripts/dev-up"))
            .stdout(Stdio::null())
            .status()
            .expect("scripts/dev-up");
        assert!(st.success(), "scripts/dev-up failed");
        Stack {
            brokers: format!("127.0.0.1:{}", port("PAYSTREAM_KAFKA_PORT", 29092)),
            pg_url: format!(
                "host=127.0.0.1 port={} user=postgres dbname=payments",
                port("PAYSTREAM_PG_PORT", 25432)
            ),
            stripe: format!("http://127.0.0.1:{}", port("PAYSTREAM_STRIPE_PORT", 28420)),
        }
    })
}

/// Postgres and the Stripe emulator only (embedded mode needs no broker), once per test binary.
pub fn pg_stripe_stack() -> &'static Stack {
    static S: OnceLock<Stack> = OnceLock::new();
    S.get_or_init(|| {
        for s in ["pg-up", "stripe-up"] {
            let st = Command::new(root().join("scripts").join(s))
                .stdout(Stdio::null())
                .status()
                .expect(s);
            assert!(st.success(), "scripts/{s} failed");
        }
        Stack {
            brokers: String::new(),
            pg_url: format!(
                "host=127.0.0.1 port={} user=postgres dbname=payments",
                port("PAYSTREAM_PG_PORT", 25432)
            ),
            stripe: format!("http://127.0.0.1:{}", port("PAYSTREAM_STRIPE_PORT", 28420)),
        }
    })
}

pub fn unique(prefix: &str) -> String {
    let n = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("{prefix}{}", n % 1_000_000_000_000)
}

pub const KAFKA_TEST_OPTIONS: &str = "session.timeout.ms=6000;heartbeat.interval.ms=1000";

// ---------- Stripe emulator ----------

pub fn stripe_post(base: &str, path: &str, form: &[(&str, &str)]) -> serde_json::Value {
    stripe_post_in(base, path, form, None)
}

/// [`stripe_post`] in a Stripe Connect account (`Stripe-Account`), when given.
pub fn stripe_post_in(
    base: &str,
    path: &str,
    form: &[(&str, &str)],
    account: Option<&str>,
) -> serde_json::Value {
    let mut cmd = Command::new("curl");
    cmd.args([
        "-sS",
        "-X",
        "POST",
        "-H",
        "Authorization: Bearer sk_test_paystream",
    ])
    .arg(format!("{base}{path}"));
    if let Some(a) = account {
        cmd.arg("-H").arg(format!("Stripe-Account: {a}"));
    }
    for (k, v) in form {
        cmd.arg("-d").arg(format!("{k}={v}"));
    }
    let out = cmd.output().expect("curl");
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{path}: {e}: {}", String::from_utf8_lossy(&out.stdout)))
}

pub fn stripe_get(base: &str, path: &str) -> serde_json::Value {
    stripe_get_in(base, path, None)
}

/// [`stripe_get`] in a Stripe Connect account, when given.
pub fn stripe_get_in(base: &str, path: &str, account: Option<&str>) -> serde_json::Value {
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "-H", "Authorization: Bearer sk_test_paystream"]);
    if let Some(a) = account {
        cmd.arg("-H").arg(format!("Stripe-Account: {a}"));
    }
    let out = cmd.arg(format!("{base}{path}")).output().expect("curl");
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{path}: {e}: {}", String::from_utf8_lossy(&out.stdout)))
}

pub fn card_pm(base: &str, number: &str) -> String {
    let pm = stripe_post(
        base,
        "/v1/payment_methods",
        &[
            ("type", "card"),
            ("card[number]", number),
            ("card[exp_month]", "12"),
            ("card[exp_year]", "2034"),
            ("card[cvc]", "123"),
        ],
    );
    pm["id"].as_str().unwrap().to_string()
}

/// A PaymentIntent confirmed with `card`; returns (id, status).
pub fn intent_with_card(base: &str, amount: &str, number: &str) -> (String, String) {
    intent_with_card_keyed(base, amount, number, None)
}

/// Like [`intent_with_card`], with `metadata[idempotency_key]` set when `key` is given (the
/// payment service's link when a row has no intent id yet: paystream then searches by it).
pub fn intent_with_card_keyed(
    base: &str,
    amount: &str,
    number: &str,
    key: Option<&str>,
) -> (String, String) {
    intent(
        base,
        &Intent {
            amount,
            card: number,
            key,
            ..Intent::default()
        },
    )
}

/// A PaymentIntent to create and confirm in the emulator.
pub struct Intent<'a> {
    /// In the currency's minor unit.
    pub amount: &'a str,
    pub currency: &'a str,
    pub card: &'a str,
    /// `metadata[idempotency_key]`.
    pub key: Option<&'a str>,
    /// `capture_method=manual`: the confirm authorizes, a capture takes the money.
    pub manual_capture: bool,
    /// Stripe Connect: the connected account the intent is made in.
    pub account: Option<&'a str>,
}

impl Default for Intent<'_> {
    fn default() -> Self {
        Intent {
            amount: "1000",
            currency: "usd",
            card: "4242424242424242",
            key: None,
            manual_capture: false,
            account: None,
        }
    }
}

/// Creates and confirms `spec`; returns (id, status).
pub fn intent(base: &str, spec: &Intent<'_>) -> (String, String) {
    let pm = card_pm(base, spec.card);
    let mut form = vec![
        ("amount", spec.amount),
        ("currency", spec.currency),
        ("payment_method", pm.as_str()),
    ];
    if let Some(k) = spec.key {
        form.push(("metadata[idempotency_key]", k));
    }
    if spec.manual_capture {
        form.push(("capture_method", "manual"));
    }
    let pi = stripe_post_in(base, "/v1/payment_intents", &form, spec.account);
    let id = pi["id"].as_str().unwrap().to_string();
    // A decline answers the confirm with a 402 error; the intent itself holds the outcome.
    let pi = stripe_post_in(
        base,
        &format!("/v1/payment_intents/{id}/confirm"),
        &[],
        spec.account,
    );
    let status = match pi["status"].as_str() {
        Some(s) => s.to_string(),
        // The 402 of a decline: the intent as it is now.
        None => stripe_get_in(base, &format!("/v1/payment_intents/{id}"), spec.account)["status"]
            .as_str()
            .unwrap_or("")
            .to_string(),
    };
    (id, status)
}

/// A POST of JSON to one of the emulator's own endpoints (`/_paystream/...`).
pub fn emulator_post(base: &str, path: &str, body: &serde_json::Value) -> serde_json::Value {
    let out = std::process::Command::new("curl")
        .args([
            "-sS",
            "-X",
            "POST",
            "-H",
            "Content-Type: application/json",
            "-d",
        ])
        .arg(body.to_string())
        .arg(format!("{base}{path}"))
        .output()
        .unwrap();
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{path}: {e}: {}", String::from_utf8_lossy(&out.stdout)))
}

pub fn bulk_intents(base: &str, n: usize, card: &str, prefix: &str) -> Vec<String> {
    let v = emulator_post(
        base,
        "/_paystream/bulk_intents",
        &serde_json::json!({"n": n, "card": card, "key_prefix": prefix}),
    );
    v["ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i.as_str().unwrap().to_string())
        .collect()
}

/// Confirms intents; returns the emulator's time of it (the clock of its request log).
pub fn confirm(base: &str, ids: &[String]) -> f64 {
    emulator_post(
        base,
        "/_paystream/bulk_confirm",
        &serde_json::json!({ "ids": ids }),
    )["at"]
        .as_f64()
        .unwrap()
}

/// This key's requests: (emulator time, method, path).
pub fn requests(base: &str, key: &str) -> (Vec<(f64, String, String)>, f64) {
    let out = std::process::Command::new("curl")
        .args(["-sS", &format!("{base}/_paystream/stats?key={key}")])
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let log = v["log"]
        .as_array()
        .map(|l| {
            l.iter()
                .map(|r| {
                    (
                        r[0].as_f64().unwrap(),
                        r[1].as_str().unwrap().to_string(),
                        r[2].as_str().unwrap().to_string(),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    (log, v["max_per_second"].as_f64().unwrap_or(0.0))
}

pub fn retrieves_of(log: &[(f64, String, String)], intent: &str, after: f64) -> usize {
    let path = format!("/v1/payment_intents/{intent}");
    log.iter()
        .filter(|(t, m, p)| *t > after && m == "GET" && *p == path)
        .count()
}

/// The customer retries a declined intent with another card: a new attempt on the same intent,
/// as Stripe allows (the emulator's wrapper adds it). Returns the intent's status after it.
pub fn retry_intent(base: &str, id: &str, number: &str) -> String {
    let pm = card_pm(base, number);
    let pi = stripe_post(
        base,
        &format!("/v1/payment_intents/{id}/confirm"),
        &[("payment_method", pm.as_str())],
    );
    pi["status"].as_str().unwrap_or("").to_string()
}

pub fn intent_canceled(base: &str, amount: &str) -> String {
    let pi = stripe_post(
        base,
        "/v1/payment_intents",
        &[("amount", amount), ("currency", "usd")],
    );
    let id = pi["id"].as_str().unwrap().to_string();
    let c = stripe_post(base, &format!("/v1/payment_intents/{id}/cancel"), &[]);
    assert_eq!(c["status"], "canceled");
    id
}

// ---------- Postgres ----------

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

// ---------- Debezium-shaped events ----------

/// Connect Decimal bytes (minimal two's complement, big-endian) of a decimal string, base64.
pub fn decimal_b64(amount: &str, scale: u32) -> String {
    use base64::Engine;
    let d = paystream::change::Decimal::parse(amount).unwrap();
    let unscaled = d.unscaled * 10i128.pow(scale - d.scale);
    let bytes = unscaled.to_be_bytes();
    let mut i = 0;
    while i < 15
        && ((bytes[i] == 0 && bytes[i + 1] & 0x80 == 0)
            || (bytes[i] == 0xff && bytes[i + 1] & 0x80 != 0))
    {
        i += 1;
    }
    base64::engine::general_purpose::STANDARD.encode(&bytes[i..])
}

fn row_json(r: &Row) -> serde_json::Value {
    serde_json::json!({
        "id": r.id, "idempotency_key": r.idempotency_key, "amount": decimal_b64(&r.amount, 2),
        "currency": r.currency, "status": r.status, "stripe_payment_intent_id": r.intent,
        "created_at": "2026-11-22T00:00:00.000000Z", "updated_at": "2026-11-22T00:00:00.000000Z"
    })
}

fn value_schema() -> serde_json::Value {
    let cols = serde_json::json!([
        {"type":"int64","optional":false,"field":"id"},
        {"type":"string","optional":false,"field":"idempotency_key"},
        {"type":"bytes","optional":false,"name":"org.apache.kafka.connect.data.Decimal","version":1,"parameters":{"scale":"2","connect.decimal.precision":"12"},"field":"amount"},
        {"type":"string","optional":false,"field":"currency"},
        {"type":"string","optional":false,"default":"pending","field":"status"},
        {"type":"string","optional":true,"field":"stripe_payment_intent_id"},
        {"type":"string","optional":false,"name":"io.debezium.time.ZonedTimestamp","version":1,"field":"created_at"},
        {"type":"string","optional":false,"name":"io.debezium.time.ZonedTimestamp","version":1,"field":"updated_at"}
    ]);
    serde_json::json!({"type":"struct","name":"paysvc.public.payments.Envelope","optional":false,"fields":[
        {"type":"struct","fields":cols,"optional":true,"name":"paysvc.public.payments.Value","field":"before"},
        {"type":"struct","fields":cols,"optional":true,"name":"paysvc.public.payments.Value","field":"after"},
        {"type":"string","optional":false,"field":"op"}
    ]})
}

/// A Debezium change event value for `r` (op c/u/r with `after`, or d with the key in `before`).
pub fn cdc_value(op: &str, r: &Row, with_schema: bool) -> Vec<u8> {
    let (before, after) = if op == "d" {
        (serde_json::json!({"id": r.id}), serde_json::Value::Null)
    } else {
        (serde_json::Value::Null, row_json(r))
    };
    let payload = serde_json::json!({
        "before": before, "after": after,
        "source": {"version":"3.0.0.Final","connector":"postgresql","name":"paysvc","ts_ms":1,"snapshot":"false","db":"payments","schema":"public","table":"payments","txId":1,"lsn":1},
        "op": op, "ts_ms": 1
    });
    let v = if with_schema {
        serde_json::json!({"schema": value_schema(), "payload": payload})
    } else {
        payload
    };
    serde_json::to_vec(&v).unwrap()
}

/// Publishes Debezium's event for `r` (see [`cdc_value`]), keyed by its id as Debezium keys it.
pub async fn publish_row(p: &FutureProducer, topic: &str, op: &str, r: &Row, with_schema: bool) {
    publish(
        p,
        topic,
        Some(&cdc_key(r.id)),
        Some(&cdc_value(op, r, with_schema)),
    )
    .await;
}

pub fn cdc_key(id: i64) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({"id": id})).unwrap()
}

// ---------- Kafka ----------

pub async fn create_topics(brokers: &str, topics: &[(&str, i32)]) {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("broker.address.family", "v4")
        .create()
        .unwrap();
    let new: Vec<NewTopic> = topics
        .iter()
        .map(|(t, p)| NewTopic::new(t, *p, TopicReplication::Fixed(1)))
        .collect();
    let res = admin
        .create_topics(
            &new,
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
        )
        .await
        .expect("create topics");
    for r in res {
        r.expect("topic created");
    }
}

pub fn producer(brokers: &str) -> FutureProducer {
    ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("broker.address.family", "v4")
        .set("enable.idempotence", "true")
        .create()
        .unwrap()
}

pub async fn publish(p: &FutureProducer, topic: &str, key: Option<&[u8]>, value: Option<&[u8]>) {
    let mut rec: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(topic);
    if let Some(k) = key {
        rec = rec.key(k);
    }
    if let Some(v) = value {
        rec = rec.payload(v);
    }
    p.send(rec, Duration::from_secs(10))
        .await
        .map_err(|(e, _)| e)
        .expect("publish");
}

/// (key, value, headers) of one record.
pub type Record = (Option<Vec<u8>>, Option<Vec<u8>>, Vec<(String, String)>);

/// The partition ids of `topic`, from the broker's metadata.
fn partitions(c: &BaseConsumer, topic: &str) -> Vec<i32> {
    let md = c
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .unwrap();
    md.topics()[0].partitions().iter().map(|p| p.id()).collect()
}

/// Every record of a topic (all partitions) from the beginning up to the high watermark:
/// (key, value, headers).
pub fn read_all(brokers: &str, topic: &str) -> Vec<Record> {
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("broker.address.family", "v4")
        .set("group.id", unique("reader"))
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let parts = partitions(&c, topic);
    let mut out = Vec::new();
    for p in parts {
        let (_, high) = c
            .fetch_watermarks(topic, p, Duration::from_secs(10))
            .unwrap();
        if high == 0 {
            continue;
        }
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(topic, p, Offset::Beginning)
            .unwrap();
        c.assign(&tpl).unwrap();
        drop(tpl);
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        let mut next = 0;
        while next < high && std::time::Instant::now() < deadline {
            if let Some(Ok(m)) = c.poll(Duration::from_millis(200)) {
                next = m.offset() + 1;
                let headers = m
                    .headers()
                    .map(|h| {
                        use rdkafka::message::Headers;
                        h.iter()
                            .map(|x| {
                                (
                                    x.key.to_string(),
                                    String::from_utf8_lossy(x.value.unwrap_or_default())
                                        .into_owned(),
                                )
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                out.push((
                    m.key().map(<[u8]>::to_vec),
                    m.payload().map(<[u8]>::to_vec),
                    headers,
                ));
            }
        }
    }
    out
}

// ---------- paystream processes ----------

/// A test's own topics, so tests sharing the broker never see each other's records.
#[derive(Clone)]
pub struct Topics {
    pub run: String,
    pub cdc: String,
    pub status: String,
    pub dlq: String,
    /// The payments table whose changes reach `cdc`: the test's own under real Debezium
    /// ([`cdc_topics`]), `payments` for hand-made events.
    pub table: String,
}

pub async fn topics(s: &Stack, prefix: &str, cdc_partitions: i32) -> Topics {
    let run = unique(prefix);
    let t = Topics {
        cdc: format!("{run}.public.payments"),
        status: format!("{run}-status"),
        dlq: format!("{run}-dlq"),
        run,
        table: "payments".into(),
    };
    create_topics(
        &s.brokers,
        &[(&t.cdc, cdc_partitions), (&t.status, 1), (&t.dlq, 1)],
    )
    .await;
    t
}

/// `paystream run` arguments for a test: short intervals, the stack's servers, then `extra`
/// (flag/value pairs, replacing a default flag of the same name).
pub fn run_args(
    s: &Stack,
    t: &Topics,
    data_dir: &Path,
    metrics_port: u16,
    extra: &[&str],
) -> Vec<String> {
    let mut args: Vec<String> = [
        "run",
        "--brokers",
        &s.brokers,
        "--cdc-topic",
        &t.cdc,
        "--status-topic",
        &t.status,
        "--dlq-topic",
        &t.dlq,
        "--group-id",
        &t.run,
    ]
    .iter()
    .map(|a| a.to_string())
    .collect();
    args.extend(daemon_args(s, data_dir, metrics_port));
    with_extra(&mut args, extra);
    args
}

/// What every test daemon runs with, whatever its source: its data dir and admin port, short
/// intervals, the emulator and a test key.
pub fn daemon_args(s: &Stack, data_dir: &Path, metrics_port: u16) -> Vec<String> {
    [
        "--data-dir",
        data_dir.to_str().unwrap(),
        "--poll-interval",
        "1s",
        "--checkpoint-interval",
        "200ms",
        "--stripe-api-base",
        &s.stripe,
        "--stripe-key",
        "sk_test_paystream",
        "--metrics-addr",
        &format!("127.0.0.1:{metrics_port}"),
    ]
    .iter()
    .map(|a| a.to_string())
    .collect()
}

/// A loopback port free right now (for --metrics-addr), picked at random below Linux's
/// ephemeral range (32768 and up). A port the kernel hands out (`bind :0`) can be taken by any
/// outgoing connection (librdkafka opens many) before the daemon binds it; CI saw exactly that.
/// 20000-24999 also stays clear of the dev stack's ports.
pub fn free_port() -> u16 {
    use rand::Rng;
    loop {
        let p = rand::thread_rng().gen_range(20_000..25_000);
        if std::net::TcpListener::bind(("127.0.0.1", p)).is_ok() {
            return p;
        }
    }
}

/// [`sample`] of one fresh scrape of `port` (0 when nothing answers).
pub fn metric(port: u16, name: &str, parts: &[&str]) -> f64 {
    sample(&scrape(port), name, parts)
}

/// One scrape of /metrics, so several values can be read from the same instant.
pub fn scrape(port: u16) -> String {
    http_get(port, "/metrics").map(|r| r.1).unwrap_or_default()
}

/// Sum of the samples of exactly `name` (not of metrics whose names merely start with it) in a
/// scrape, over the lines containing every one of `parts` (e.g. `outcome="failed"`).
pub fn sample(text: &str, name: &str, parts: &[&str]) -> f64 {
    text.lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
                && parts.iter().all(|p| l.contains(p))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Runs a command to its end: (exit code, stdout, stderr), the output as text.
pub fn output(cmd: &mut Command) -> (i32, String, String) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

pub struct Proc(pub Child);

impl Proc {
    pub fn kill9(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
    /// SIGTERM, then wait for a clean exit (final checkpoint).
    pub fn term(&mut self) -> std::process::ExitStatus {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.0.id().to_string())
            .status();
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(s) = self.0.try_wait().unwrap() {
                return s;
            }
            if std::time::Instant::now() > deadline {
                self.kill9();
                panic!("paystream did not stop within 30s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn spawn<A: AsRef<std::ffi::OsStr>>(args: &[A], log: &Path) -> Proc {
    spawn_logging(
        args,
        log,
        "info,paystream=debug,stripe=error,tokio_cron_scheduler=warn",
    )
}

/// [`spawn`] with its own `RUST_LOG` filter.
pub fn spawn_logging<A: AsRef<std::ffi::OsStr>>(args: &[A], log: &Path, filter: &str) -> Proc {
    let f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_paystream"))
        .args(args)
        .env("RUST_LOG", filter)
        .env("PAYSTREAM_KAFKA_OPTIONS", KAFKA_TEST_OPTIONS)
        .stdout(f.try_clone().unwrap())
        .stderr(f)
        .spawn()
        .expect("spawn paystream");
    Proc(child)
}

/// Polls `f` every 250 ms until it is true; panics naming `what` after `secs`.
pub async fn wait_for<F, Fut>(what: &str, secs: u64, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let end = std::time::Instant::now() + Duration::from_secs(secs);
    while std::time::Instant::now() < end {
        if f().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    panic!("timed out after {secs}s waiting for {what}");
}

/// GET on loopback without a client library: (status code, body). `None` if nothing answers.
pub fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).ok()?;
    let code = buf.split(' ').nth(1)?.parse().ok()?;
    let body = buf.split_once("\r\n\r\n").map(|(_, b)| b.to_string())?;
    Some((code, body))
}

/// `paystream updater` arguments for a test: the stack's Postgres, then `extra`.
pub fn updater_args(s: &Stack, status_topic: &str, group: &str, extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = [
        "updater",
        "--brokers",
        &s.brokers,
        "--status-topic",
        status_topic,
        "--group-id",
        group,
        "--postgres-url",
        &s.pg_url,
        "--metrics-addr",
        "127.0.0.1:0",
        "--batch-linger",
        "50ms",
    ]
    .iter()
    .map(|a| a.to_string())
    .collect();
    with_extra(&mut args, extra);
    args
}

/// Appends flag/value pairs, each replacing a default flag of the same name (clap rejects a
/// flag given twice).
pub fn with_extra(args: &mut Vec<String>, extra: &[&str]) {
    for pair in extra.chunks(2) {
        if let Some(i) = args.iter().position(|a| a == pair[0]) {
            args.drain(i..i + 2);
        }
    }
    args.extend(extra.iter().map(|a| a.to_string()));
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

/// High watermark of every partition of `topic`, by partition.
pub fn high_watermarks(brokers: &str, topic: &str) -> Vec<(i32, i64)> {
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("broker.address.family", "v4")
        .create()
        .unwrap();
    let parts = partitions(&c, topic);
    parts
        .into_iter()
        .map(|p| {
            (
                p,
                c.fetch_watermarks(topic, p, Duration::from_secs(10))
                    .unwrap()
                    .1,
            )
        })
        .collect()
}

/// A test's knob from the environment (the `--long` forms of scripts set them).
pub fn knob(var: &str, default: u64) -> u64 {
    std::env::var(var)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Panics if any log in `dir` shows a panic.
pub fn assert_no_panic(dir: &Path) {
    for f in std::fs::read_dir(dir).unwrap() {
        let p = f.unwrap().path();
        let text = std::fs::read_to_string(&p).unwrap_or_default();
        assert!(
            !text.contains("panicked"),
            "{} shows a panic:\n{}",
            p.display(),
            text.lines()
                .filter(|l| l.contains("panicked"))
                .collect::<Vec<_>>()
                .join("\n")
        );
        // A log file is not a terminal: no colour codes (they break every grep on the logs).
        assert!(
            !text.contains('\u{1b}'),
            "{} holds ANSI escape codes",
            p.display()
        );
    }
}

/// A directory for a test's logs that outlives the test (under target/, ignored by git), so a
/// failure in CI can be read afterwards.
pub fn log_dir(name: &str) -> PathBuf {
    let d = root().join("target/test-logs").join(name);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Runs one of the project's scripts (e.g. `kafka-down`), failing the test if it fails.
pub fn script(name: &str) {
    let st = Command::new(root().join("scripts").join(name))
        .status()
        .unwrap();
    assert!(st.success(), "scripts/{name}");
}

/// A status event as paystream produces it, for tests that drive the updater directly.
pub fn status_event(id: i64, status: &str) -> Vec<u8> {
    use paystream::sink::{event_id, StatusEvent};
    serde_json::to_vec(&StatusEvent {
        event_id: event_id(&id.to_string(), status),
        payment_id: id.to_string(),
        idempotency_key: format!("k-{id}"),
        stripe_payment_intent_id: Some(format!("pi_{id}")),
        status: status.into(),
        stripe_status: if status == "succeeded" {
            "succeeded"
        } else {
            "canceled"
        }
        .into(),
        reason: None,
        observed_at: "2026-11-22T00:00:00.000Z".into(),
        producer: "paystream".into(),
        amount_received: Some(if status == "succeeded" { 1000 } else { 0 }),
        currency: Some("usd".into()),
        decline_count: 0,
    })
    .unwrap()
}

/// The sum of a group's committed offsets over partitions `0..partitions` of `topic`.
/// Blocking (librdkafka): call it from `spawn_blocking` in async tests.
pub fn committed(brokers: &str, group: &str, topic: &str, partitions: i32) -> i64 {
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("broker.address.family", "v4")
        .set("group.id", group)
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition(topic, p);
    }
    let got = c.committed_offsets(tpl, Duration::from_secs(10)).unwrap();
    let sum = got
        .elements()
        .iter()
        .map(|e| match e.offset() {
            Offset::Offset(o) => o,
            _ => 0,
        })
        .sum();
    // librdkafka's list must go before its consumer (see the broker notes on hangs).
    drop(got);
    sum
}

/// Waits until a group's committed offsets on `topic` sum to `want`.
pub async fn wait_committed(
    s: &Stack,
    group: &str,
    topic: &str,
    partitions: i32,
    want: i64,
    what: &str,
    secs: u64,
) {
    wait_for(what, secs, || {
        let (b, g, t) = (s.brokers.clone(), group.to_string(), topic.to_string());
        async move {
            tokio::task::spawn_blocking(move || committed(&b, &g, &t, partitions))
                .await
                .unwrap()
                == want
        }
    })
    .await;
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
