//! Hand-made Debezium-shaped events, for what Debezium never emits (poison, other tables) and
//! for tests that drive the topic directly; shapes from `../shared/debezium/`.

use rdkafka::producer::FutureProducer;

use super::*;

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
