//! Poison input through the real broker: every malformed shape goes to the dead-letter topic,
//! byte for byte, with its reason and position in headers; the daemon neither panics nor stalls
//! (a row inserted after them all, which real Debezium carries, is applied), and its offsets
//! pass them all.

mod common;

use std::collections::HashMap;

use common::*;

/// (name, key, value, expected `paystream.reason`).
type Case = (&'static str, Option<Vec<u8>>, Vec<u8>, &'static str);

fn catalog() -> Vec<Case> {
    let row = |after: &str| {
        format!(r#"{{"op":"c","before":null,"after":{after},"source":{{"table":"payments"}}}}"#)
    };
    let ok = r#""idempotency_key":"k","amount":"AMg=","currency":"usd","status":"pending""#;
    let key = Some(br#"{"id":1}"#.to_vec());
    let mut giant = br#"{"op":"c","after":{"id":1,"idempotency_key":""#.to_vec();
    giant.extend(std::iter::repeat_n(b'x', 900_000));
    vec![
        ("truncated JSON", key.clone(), br#"{"op":"c","after":{"id":"#.to_vec(), "invalid_json"),
        ("id of the wrong type", key.clone(), row(&format!(r#"{{"id":true,{ok}}}"#)).into(), "bad_value"),
        ("fractional id", key.clone(), row(&format!(r#"{{"id":1.5,{ok}}}"#)).into(), "bad_value"),
        ("id out of range", key.clone(), row(&format!(r#"{{"id":1e400,{ok}}}"#)).into(), "bad_value"),
        ("numeric status", key.clone(), row(r#"{"id":1,"idempotency_key":"k","amount":"AMg=","currency":"usd","status":7}"#).into(), "bad_value"),
        ("amount as an object", key.clone(), row(r#"{"id":1,"idempotency_key":"k","amount":{"x":1},"currency":"usd","status":"pending"}"#).into(), "bad_decimal"),
        ("missing op", key.clone(), format!(r#"{{"after":{{"id":1,{ok}}}}}"#).into_bytes(), "missing_column"),
        ("unknown op", key.clone(), format!(r#"{{"op":"x","after":{{"id":1,{ok}}}}}"#).into_bytes(), "unknown_op"),
        ("decimal bytes not base64", key.clone(), row(r#"{"id":1,"idempotency_key":"k","amount":"!!notbase64","currency":"usd","status":"pending"}"#).into(), "bad_decimal"),
        ("decimal wider than 38 digits", key.clone(), row(r#"{"id":1,"idempotency_key":"k","amount":"f////////////////////////////////////////////////////w==","currency":"usd","status":"pending"}"#).into(), "bad_decimal"),
        (
            "Decimal schema without scale",
            key.clone(),
            format!(r#"{{"schema":{{"type":"struct","fields":[{{"type":"struct","field":"after","fields":[{{"type":"bytes","name":"org.apache.kafka.connect.data.Decimal","field":"amount","parameters":{{}}}}]}}]}},"payload":{}}}"#, row(&format!(r#"{{"id":1,{ok}}}"#))).into_bytes(),
            "bad_decimal",
        ),
        ("giant malformed message (900 kB)", key.clone(), giant, "invalid_json"),
        ("nesting 100000 deep", key.clone(), "[".repeat(100_000).into_bytes(), "invalid_json"),
        ("null key and garbage", None, b"garbage".to_vec(), "invalid_json"),
        ("binary, not UTF-8", key.clone(), vec![0xff, 0xfe, 0x00, 0x9c, 0x01], "not_utf8"),
        ("empty value (not a tombstone)", key.clone(), Vec::new(), "invalid_json"),
        ("a JSON array", key.clone(), b"[1,2,3]".to_vec(), "unexpected_shape"),
        ("a create without after", key.clone(), br#"{"op":"c","after":null}"#.to_vec(), "unexpected_shape"),
        (
            "valid JSON for another table",
            Some(br#"{"id":7}"#.to_vec()),
            br#"{"op":"c","before":null,"after":{"id":7,"name":"alice"},"source":{"table":"customers"}}"#.to_vec(),
            "missing_column",
        ),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_poison_shape_is_dead_lettered_and_the_daemon_goes_on() {
    let s = stack();
    let db = pg(&s.pg_url).await;
    let t = cdc_topics(s, &db, "poison", 1).await;
    let logs = log_dir(&t.run);
    let cases = catalog();
    let p = producer(&s.brokers);
    for (_, key, value, _) in &cases {
        publish(&p, &t.cdc, key.as_deref(), Some(value)).await;
    }
    // And then one good payment, a row Debezium carries: the daemon must get past all of the
    // above to track it.
    let good = Row {
        id: 42,
        idempotency_key: "poison-survivor".into(),
        amount: "4.20".into(),
        currency: "usd".into(),
        status: "pending".into(),
        intent: Some("pi_whatever".into()),
    };
    cdc_insert(&db, &t, &good).await;

    let data = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut daemon = spawn(
        &run_args(s, &t, data.path(), port, &["--poll-interval", "1h"]),
        &logs.join("run.log"),
    );
    let n = cases.len() as f64;
    wait_for(
        "every poison message dead-lettered and the good one tracked",
        60,
        || async {
            metric(port, "paystream_dlq_messages_total", &[]) >= n
                && metric(port, "paystream_cdc_events_total", &["outcome=\"tracked\""]) >= 1.0
        },
    )
    .await;
    wait_for("offsets past everything", 30, || async {
        metric(port, "paystream_stored_offset", &[]) >= n + 1.0
    })
    .await;
    assert!(daemon.term().success(), "clean exit after the poison");
    assert_no_panic(&logs);

    let dead = read_all(&s.brokers, &t.dlq);
    assert_eq!(
        dead.len(),
        cases.len(),
        "one dead letter per poison message"
    );
    for (i, ((name, key, value, reason), (dkey, dvalue, headers))) in
        cases.iter().zip(&dead).enumerate()
    {
        let h: HashMap<_, _> = headers.iter().cloned().collect();
        assert_eq!(h["paystream.reason"], *reason, "{name}: {h:?}");
        assert!(!h["paystream.error"].is_empty(), "{name}");
        assert_eq!(h["paystream.source.topic"], t.cdc);
        assert_eq!(h["paystream.source.offset"], i.to_string(), "{name}");
        assert_eq!(dkey, key, "{name}: key kept");
        // An empty value is stored as an empty payload (or none); every other one byte for byte.
        assert_eq!(
            dvalue.as_deref().unwrap_or_default(),
            value.as_slice(),
            "{name}: value kept byte for byte"
        );
    }
    let store = paystream::state::Store::open(data.path()).unwrap();
    let held: Vec<String> = store.entries().unwrap().into_iter().map(|e| e.id).collect();
    assert_eq!(
        held,
        vec!["42"],
        "only the good payment, poison tracked nothing"
    );
    eprintln!(
        "{} poison shapes dead-lettered with their reasons; the good event after them applied",
        cases.len()
    );
}
