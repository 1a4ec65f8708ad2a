//! Avro end to end. Messages are encoded with apache-avro from schemas that mirror what
//! Debezium's AvroData registers (`tests/golden/avro/`), served by a registry double that
//! follows the Confluent REST API (`common::registry`).
//!
//! - Golden: the same payment as JSON-with-schema and as Avro normalizes to identical output.
//! - Schema evolution: a second schema id with an added optional column decodes without restart.
//! - Policy: an unknown id or an unreachable registry sends the message to the dead letters with
//!   the reason; each id is fetched once.
//! - Pipeline: real Debezium writing Avro through Confluent's AvroConverter (registering its
//!   schemas with the double), Avro out through the real broker, the updater reading Avro.

mod common;

use apache_avro::types::Value as Avro;
use apache_avro::Schema;
use common::registry::RegistryDouble;
use common::*;
use paystream::decode::registry::{Registry, RegistrySettings};
use paystream::decode::{DecodeErrorKind, DecodeOptions, Decoder, Format};

const V1: &str = include_str!("golden/avro/payments-envelope-v1.avsc");
const V2: &str = include_str!("golden/avro/payments-envelope-v2.avsc");
const KEY: &str = include_str!("golden/avro/payments-key.avsc");

/// The Avro Debezium writes for `r` (op c/u/r with `after`), mirroring `cdc_value`'s JSON.
fn avro_value(schema_text: &str, id: u32, op: &str, r: &Row, note: Option<&str>) -> Vec<u8> {
    use base64::Engine;
    let schema = Schema::parse_str(schema_text).unwrap();
    let amount = base64::engine::general_purpose::STANDARD
        .decode(decimal_b64(&r.amount, 2))
        .unwrap();
    let mut row = vec![
        ("id".to_string(), Avro::Long(r.id)),
        (
            "idempotency_key".into(),
            Avro::String(r.idempotency_key.clone()),
        ),
        ("amount".into(), Avro::Decimal(amount.into())),
        ("currency".into(), Avro::String(r.currency.clone())),
        ("status".into(), Avro::String(r.status.clone())),
        (
            "stripe_payment_intent_id".into(),
            opt(r.intent.clone().map(Avro::String)),
        ),
        (
            "created_at".into(),
            Avro::String("2026-11-22T00:00:00.000000Z".into()),
        ),
        (
            "updated_at".into(),
            Avro::String("2026-11-22T00:00:00.000000Z".into()),
        ),
    ];
    if schema_text.contains("\"note\"") {
        row.push(("note".into(), opt(note.map(|n| Avro::String(n.into())))));
    }
    let source = Avro::Record(vec![
        ("version".into(), Avro::String("3.0.0.Final".into())),
        ("connector".into(), Avro::String("postgresql".into())),
        ("name".into(), Avro::String("paysvc".into())),
        ("ts_ms".into(), Avro::Long(1)),
        // This union lists the string first: ["string", "null"].
        (
            "snapshot".into(),
            Avro::Union(0, Box::new(Avro::String("false".into()))),
        ),
        ("db".into(), Avro::String("payments".into())),
        ("sequence".into(), opt(None)),
        ("ts_us".into(), opt(None)),
        ("ts_ns".into(), opt(None)),
        ("schema".into(), Avro::String("public".into())),
        ("table".into(), Avro::String("payments".into())),
        ("txId".into(), opt(Some(Avro::Long(1)))),
        ("lsn".into(), opt(Some(Avro::Long(1)))),
        ("xmin".into(), opt(None)),
    ]);
    let envelope = Avro::Record(vec![
        ("before".into(), opt(None)),
        ("after".into(), opt(Some(Avro::Record(row)))),
        ("source".into(), source),
        ("transaction".into(), opt(None)),
        ("op".into(), Avro::String(op.into())),
        ("ts_ms".into(), opt(Some(Avro::Long(1)))),
        ("ts_us".into(), opt(None)),
        ("ts_ns".into(), opt(None)),
    ]);
    // Written as given (unions spelled out: apache-avro's `resolve` cannot follow the `after`
    // union's reference to the `Value` record); `to_avro_datum` validates against the schema.
    let datum = apache_avro::to_avro_datum(&schema, envelope).unwrap();
    wire(id, datum)
}

/// A `["null", T]` union's value.
fn opt(v: Option<Avro>) -> Avro {
    match v {
        None => Avro::Union(0, Box::new(Avro::Null)),
        Some(v) => Avro::Union(1, Box::new(v)),
    }
}

fn avro_key(id: u32, payment: i64) -> Vec<u8> {
    let schema = Schema::parse_str(KEY).unwrap();
    let v = Avro::Record(vec![("id".into(), Avro::Long(payment))]);
    wire(id, apache_avro::to_avro_datum(&schema, v).unwrap())
}

fn wire(id: u32, datum: Vec<u8>) -> Vec<u8> {
    let mut out = vec![0u8];
    out.extend_from_slice(&id.to_be_bytes());
    out.extend(datum);
    out
}

/// Every record of `topic` (librdkafka blocks: off the runtime).
async fn read_topic(brokers: &str, topic: &str) -> Vec<Record> {
    let (b, t) = (brokers.to_string(), topic.to_string());
    tokio::task::spawn_blocking(move || read_all(&b, &t))
        .await
        .unwrap()
}

fn row(id: i64, amount: &str, intent: Option<&str>) -> Row {
    Row {
        id,
        idempotency_key: format!("k-{id}"),
        amount: amount.into(),
        currency: "usd".into(),
        status: "pending".into(),
        intent: intent.map(str::to_string),
    }
}

fn decoder(url: &str, attempts: u32) -> Decoder {
    Decoder {
        opts: DecodeOptions::default(),
        format: Format::Auto,
        registry: Some(std::sync::Arc::new(Registry::new(RegistrySettings {
            url: url.into(),
            auth: None,
            timeout: std::time::Duration::from_secs(2),
            attempts,
        }))),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn avro_and_json_with_schema_normalize_to_the_same_event() {
    let reg = RegistryDouble::start().await;
    let v1 = reg.register("paysvc.public.payments-value", V1);
    let key_id = reg.register("paysvc.public.payments-key", KEY);
    let d = decoder(&reg.url, 1);
    let rows = [
        row(1, "49.99", Some("pi_1")),
        row(2, "1234567.89", None),
        row(3, "-49.99", Some("pi_3")),
        row(4, "0", None),
        row(5, "1.28", Some("pi_5")),
    ];
    for r in &rows {
        for op in ["c", "u", "r"] {
            let json = d.value(Some(&cdc_value(op, r, true))).await.unwrap();
            let avro = d
                .value(Some(&avro_value(V1, v1, op, r, None)))
                .await
                .unwrap();
            assert_eq!(
                serde_json::to_value(&avro).unwrap(),
                serde_json::to_value(&json).unwrap(),
                "payment {} op {op}",
                r.id
            );
            // The state path reads the same payment.
            let fast = d
                .for_state(Some(&avro_value(V1, v1, op, r, None)))
                .await
                .unwrap();
            assert_eq!(fast.payment, json.payment);
        }
        assert_eq!(
            d.key(&avro_key(key_id, r.id)).await.unwrap(),
            r.id.to_string()
        );
    }
    // Fetched once per id, however many messages carry it.
    assert_eq!(reg.requests(&format!("/schemas/ids/{v1}")), 1);
    // A tombstone is a Kafka null in Avro too.
    assert_eq!(
        d.value(None).await.unwrap().op,
        paystream::change::Op::Tombstone
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_schema_id_with_an_added_optional_column_decodes_without_restart() {
    let reg = RegistryDouble::start().await;
    let v1 = reg.register("paysvc.public.payments-value", V1);
    let d = decoder(&reg.url, 1);
    let r = row(7, "10.50", Some("pi_7"));
    let first = d
        .value(Some(&avro_value(V1, v1, "c", &r, None)))
        .await
        .unwrap();
    // The table gains a column; Debezium registers the next version while we run.
    let v2 = reg.register("paysvc.public.payments-value", V2);
    assert_ne!(v1, v2);
    let second = d
        .value(Some(&avro_value(V2, v2, "u", &r, Some("gift"))))
        .await
        .unwrap();
    assert_eq!(second.payment, first.payment);
    assert_eq!(second.after.as_ref().unwrap()["note"], "gift");
    assert_eq!(reg.requests(&format!("/schemas/ids/{v2}")), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_ids_bad_bytes_and_an_unreachable_registry_are_named_errors() {
    let reg = RegistryDouble::start().await;
    let v1 = reg.register("paysvc.public.payments-value", V1);
    let d = decoder(&reg.url, 3);
    let r = row(9, "5.00", None);
    let e = d
        .value(Some(&avro_value(V1, 999, "c", &r, None)))
        .await
        .unwrap_err();
    assert_eq!(e.kind, DecodeErrorKind::UnknownSchema, "{e}");
    assert!(e.detail.contains("999"), "{e}");
    // A 404 is an answer: not retried.
    assert_eq!(reg.requests("/schemas/ids/999"), 1);
    let mut bad = avro_value(V1, v1, "c", &r, None);
    bad.truncate(bad.len() - 3);
    let e = d.value(Some(&bad)).await.unwrap_err();
    assert_eq!(e.kind, DecodeErrorKind::InvalidAvro, "{e}");
    let e = d.value(Some(&[0, 0, 1])).await.unwrap_err();
    assert_eq!(e.kind, DecodeErrorKind::InvalidAvro, "{e}");
    // Down: bounded retries (3 attempts), then the named error; no panic, no hang.
    reg.set_unavailable(true);
    let v2 = reg.register("paysvc.public.payments-value", V2);
    let e = d
        .value(Some(&avro_value(V2, v2, "c", &r, None)))
        .await
        .unwrap_err();
    assert_eq!(e.kind, DecodeErrorKind::SchemaRegistryUnavailable, "{e}");
    assert_eq!(reg.requests(&format!("/schemas/ids/{v2}")), 3);
    // Ids already fetched keep working while it is down.
    d.value(Some(&avro_value(V1, v1, "c", &r, None)))
        .await
        .unwrap();
    // JSON needs no registry in auto mode.
    d.value(Some(&cdc_value("c", &r, false))).await.unwrap();
    // Without a registry, Avro is an unknown schema, not a crash.
    let none = Decoder {
        registry: None,
        ..decoder(&reg.url, 1)
    };
    let e = none
        .value(Some(&avro_value(V1, v1, "c", &r, None)))
        .await
        .unwrap_err();
    assert_eq!(e.kind, DecodeErrorKind::UnknownSchema, "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn basic_auth_is_sent() {
    let reg = RegistryDouble::start().await;
    let v1 = reg.register("paysvc.public.payments-value", V1);
    reg.require_basic_auth("svc:s3cret");
    let r = row(11, "1.00", None);
    let e = decoder(&reg.url, 1)
        .value(Some(&avro_value(V1, v1, "c", &r, None)))
        .await
        .unwrap_err();
    assert_eq!(
        e.kind,
        DecodeErrorKind::UnknownSchema,
        "401 is refused: {e}"
    );
    let with_auth = Decoder {
        opts: DecodeOptions::default(),
        format: Format::Avro,
        registry: Some(std::sync::Arc::new(Registry::new(RegistrySettings {
            url: reg.url.clone(),
            auth: Some("svc:s3cret".parse().unwrap()),
            timeout: std::time::Duration::from_secs(2),
            attempts: 1,
        }))),
    };
    with_auth
        .value(Some(&avro_value(V1, v1, "c", &r, None)))
        .await
        .unwrap();
}

/// Avro in and Avro out through the real broker, with real Debezium writing Avro: a connector
/// of the test's own registered with `scripts/register-connector --avro`, Confluent's
/// AvroConverter on Connect registering its schemas with the registry double. The daemon reads
/// Debezium's snapshot of the pending row, polls the emulator, writes an Avro status event
/// under a registered schema, the updater reads it and writes the row, and Debezium's Avro
/// update of that write removes the payment. An Avro message with an unknown schema id (by
/// hand: Debezium never writes one) goes to the dead letters.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipeline_with_avro_in_and_avro_out() {
    let s = stack();
    let reg = RegistryDouble::start().await;
    let db = pg(&s.pg_url).await;
    let run = unique("avro");
    let table = format!("avro_{run}");
    let t = own_connector_topics(s, &db, &run, &table).await;
    let logs = log_dir(&t.run);

    // Pending before the connector starts: Debezium's snapshot reads it.
    let (pi_ok, st) = intent_with_card(&s.stripe, "4999", "4242424242424242");
    assert_eq!(st, "succeeded");
    let ok = insert_payment(&db, &table, &format!("{}-ok", t.run), "49.99", Some(&pi_ok)).await;
    script("connect-up");
    let url = reg.url.clone();
    let tbl = table.clone();
    tokio::task::spawn_blocking(move || {
        register_table_connector(&tbl, &["--avro"], &[("SCHEMA_REGISTRY_URL", url.as_str())])
    })
    .await
    .unwrap();
    let (key_id, _) = reg
        .latest(&format!("{}-key", t.cdc))
        .expect("Debezium's AvroConverter registered the key schema");

    let p = producer(&s.brokers);
    let unknown = avro_value(V1, 4242, "c", &row(1, "1.00", None), None);
    publish(&p, &t.cdc, Some(&avro_key(key_id, 1)), Some(&unknown)).await;

    let data = tempfile::tempdir().unwrap();
    let port = free_port();
    let registry = ["--schema-registry-url", reg.url.as_str()];
    let mut extra = vec!["--format", "avro", "--status-format", "avro"];
    extra.extend(registry);
    let mut daemon = spawn(
        &run_args(s, &t, data.path(), port, &extra),
        &logs.join("run.log"),
    );
    let mut updater = spawn(
        &table_updater_args(s, &t, &registry),
        &logs.join("updater.log"),
    );
    wait_for("the status written to Postgres", 90, || async {
        read_payment(&db, &table, ok.id).await.status == "succeeded"
    })
    .await;
    wait_for(
        "Debezium's Avro update of that write applied",
        90,
        || async {
            metric(
                port,
                "paystream_cdc_events_total",
                &["op=\"u\"", "outcome=\"removed\""],
            ) >= 1.0
        },
    )
    .await;

    // The status event is Avro, written with the schema registered under <topic>-value.
    let (status_id, status_schema) = reg
        .latest(&format!("{}-value", t.status))
        .expect("status schema registered");
    let records = read_topic(&s.brokers, &t.status).await;
    assert_eq!(records.len(), 1, "one status event");
    let value = records[0].1.as_deref().unwrap();
    assert_eq!(
        &value[..5],
        &[&[0u8][..], &status_id.to_be_bytes()].concat()[..]
    );
    let schema = Schema::parse_str(&status_schema).unwrap();
    let ev: paystream::sink::StatusEvent = apache_avro::from_value(
        &apache_avro::from_avro_datum(&schema, &mut &value[5..], None).unwrap(),
    )
    .unwrap();
    assert_eq!(
        (ev.payment_id.as_str(), ev.status.as_str()),
        (ok.id.to_string().as_str(), "succeeded")
    );
    assert_eq!(ev.stripe_payment_intent_id.as_deref(), Some(pi_ok.as_str()));

    // What Debezium's converter wrote decodes exactly: the snapshot read of the pending row
    // and the update to succeeded, the amount as the row holds it.
    let d = decoder(&reg.url, 1);
    let mut seen = Vec::new();
    for (_, v, _) in read_topic(&s.brokers, &t.cdc).await {
        let Some(v) = v else { continue };
        if v == unknown {
            continue;
        }
        let ev = d.value(Some(&v)).await.unwrap();
        let p = ev.payment.unwrap();
        assert_eq!(p.id, ok.id.to_string());
        assert_eq!(p.amount, paystream::change::Col::Set("49.99".into()));
        seen.push((ev.op, format!("{:?}", p.status)));
    }
    assert_eq!(
        seen,
        vec![
            (paystream::change::Op::Read, "Set(\"pending\")".to_string()),
            (
                paystream::change::Op::Update,
                "Set(\"succeeded\")".to_string()
            )
        ]
    );

    // The unknown schema id went to the dead letters, with the reason.
    let dlq = read_topic(&s.brokers, &t.dlq).await;
    assert_eq!(dlq.len(), 1, "{dlq:?}");
    assert_eq!(
        dlq[0].1.as_deref(),
        Some(&unknown[..]),
        "the message, unchanged"
    );
    let reason = dlq[0].2.iter().find(|(k, _)| k == "paystream.reason");
    assert_eq!(reason.map(|(_, v)| v.as_str()), Some("unknown_schema"));
    assert_eq!(
        metric(port, "paystream_dlq_messages_total", &["unknown_schema"]),
        1.0
    );
    assert!(daemon.term().success());
    assert!(updater.term().success());
    assert_no_panic(&logs);
    drop_table_connector(&db, &table).await;
}

/// `paystream decode` reads Avro as hex per line and as a binary file of one message, and
/// prints what it prints for the same payment in JSON.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_decode_command_reads_avro_hex_lines_and_binary_files() {
    let reg = RegistryDouble::start().await;
    let v1 = reg.register("paysvc.public.payments-value", V1);
    let r = row(21, "1234567.89", Some("pi_21"));
    let dir = tempfile::tempdir().unwrap();
    let avro = avro_value(V1, v1, "c", &r, None);
    let hex: String = avro.iter().map(|b| format!("{b:02x}")).collect();
    let (hex_file, bin_file, json_file) = (
        dir.path().join("hex.txt"),
        dir.path().join("one.avro"),
        dir.path().join("json.txt"),
    );
    std::fs::write(&hex_file, format!("{hex}\n{hex}\n")).unwrap();
    std::fs::write(&bin_file, &avro).unwrap();
    std::fs::write(&json_file, cdc_value("c", &r, true)).unwrap();
    let url = reg.url.clone();
    let decode = move |file: std::path::PathBuf| {
        let url = url.clone();
        async move {
            tokio::task::spawn_blocking(move || {
                output(
                    std::process::Command::new(env!("CARGO_BIN_EXE_paystream"))
                        .args(["decode", "--schema-registry-url", &url])
                        .arg(file),
                )
            })
            .await
            .unwrap()
        }
    };
    let (code, json_out, err) = decode(json_file).await;
    assert_eq!(code, 0, "{err}");
    let (code, hex_out, err) = decode(hex_file).await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(hex_out, format!("{json_out}{json_out}"));
    let (code, bin_out, err) = decode(bin_file).await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(bin_out, json_out);
    assert!(json_out.contains("\"1234567.89\""), "{json_out}");
}
