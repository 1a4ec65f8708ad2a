//! The Debezium message value: the envelope (`payload`, `before`/`after`, `op`, `source`, with
//! or without its `schema`) and the flattened rows of the unwrap SMT, read into a change event.

use std::collections::BTreeMap;

use serde_json::value::RawValue;
use serde_json::{Map, Value};

use super::columns::{normalize_col, normalize_row, payment_from_row};
use super::{err, DecodeError, DecodeErrorKind, DecodeOptions, RawObj};
use crate::change::{ChangeEvent, Op, SourceInfo};

/// Parses `text` as a JSON object of raw values; `Ok(None)` for JSON `null`.
pub(super) fn parse_obj<'a>(text: &'a str, what: &str) -> Result<Option<RawObj<'a>>, DecodeError> {
    let t = text.trim_start();
    if t.starts_with("null") {
        let v: Value = serde_json::from_str(text)
            .map_err(|e| err(DecodeErrorKind::InvalidJson, format!("{what}: {e}")))?;
        if v.is_null() {
            return Ok(None);
        }
    }
    if !t.starts_with('{') {
        // Still report malformed JSON as such before complaining about the shape.
        serde_json::from_str::<&RawValue>(text)
            .map_err(|e| err(DecodeErrorKind::InvalidJson, format!("{what}: {e}")))?;
        return Err(err(
            DecodeErrorKind::UnexpectedShape,
            format!("{what} is not a JSON object"),
        ));
    }
    serde_json::from_str(text)
        .map(Some)
        .map_err(|e| err(DecodeErrorKind::InvalidJson, format!("{what}: {e}")))
}

pub(super) fn raw_value(raw: &RawValue) -> Value {
    // The raw text was already validated as JSON by the enclosing parse.
    serde_json::from_str(raw.get()).unwrap_or(Value::Null)
}

pub(super) fn raw_str(obj: &RawObj<'_>, key: &str) -> Option<String> {
    match obj.get(key).map(|r| raw_value(r)) {
        Some(Value::String(s)) => Some(s),
        Some(Value::Bool(b)) => Some(b.to_string()),
        _ => None,
    }
}

pub(super) fn raw_i64(obj: &RawObj<'_>, key: &str) -> Option<i64> {
    obj.get(key).and_then(|r| raw_value(r).as_i64())
}

pub(super) fn decode_payload(
    p: &RawObj<'_>,
    schema: Option<&Value>,
    opts: &DecodeOptions,
) -> Result<ChangeEvent, DecodeError> {
    if p.contains_key("op") {
        return decode_envelope(p, schema, opts);
    }
    let status = raw_str(p, "status");
    if matches!(status.as_deref(), Some("BEGIN" | "END"))
        && (p.contains_key("event_count") || p.contains_key("data_collections"))
    {
        let mut ev = ChangeEvent::bare(Op::Transaction);
        // Transaction ids are `txId:LSN`; the part before ':' is the txId.
        ev.source.tx_id =
            raw_str(p, "id").and_then(|id| id.split(':').next().and_then(|t| t.parse().ok()));
        ev.source.ts_ms = raw_i64(p, "ts_ms");
        return Ok(ev);
    }
    if p.len() == 1 && (p.contains_key("ts_ms") || p.contains_key("serverName")) {
        let mut ev = ChangeEvent::bare(Op::Heartbeat);
        ev.source.ts_ms = raw_i64(p, "ts_ms");
        return Ok(ev);
    }
    decode_flat_row(p, schema, opts)
}

/// Column schemas of a Connect struct schema, by column name.
pub(super) fn struct_fields(schema: &Value) -> BTreeMap<String, Value> {
    schema
        .get("fields")
        .and_then(Value::as_array)
        .map(|fields| {
            fields
                .iter()
                .filter_map(|f| Some((f.get("field")?.as_str()?.to_string(), f.clone())))
                .collect()
        })
        .unwrap_or_default()
}

pub(super) fn decode_envelope(
    p: &RawObj<'_>,
    schema: Option<&Value>,
    opts: &DecodeOptions,
) -> Result<ChangeEvent, DecodeError> {
    let op_text = raw_str(p, "op").unwrap_or_default();
    let op = match op_text.as_str() {
        "c" => Op::Create,
        "u" => Op::Update,
        "d" => Op::Delete,
        "r" => Op::Read,
        "t" => Op::Truncate,
        "m" => Op::Message,
        other => {
            return Err(err(
                DecodeErrorKind::UnknownOp,
                format!("unknown op {other:?}"),
            ))
        }
    };
    let mut ev = ChangeEvent::bare(op);
    if let Some(src) = p.get("source") {
        if let Ok(Some(src)) = parse_obj(src.get(), "source") {
            ev.source = SourceInfo {
                lsn: raw_i64(&src, "lsn"),
                tx_id: raw_i64(&src, "txId"),
                ts_ms: raw_i64(&src, "ts_ms"),
                snapshot: raw_str(&src, "snapshot"),
            };
            let (sch, tbl) = (
                raw_str(&src, "schema").unwrap_or_default(),
                raw_str(&src, "table").unwrap_or_default(),
            );
            if !tbl.is_empty() {
                ev.table = Some(if sch.is_empty() {
                    tbl
                } else {
                    format!("{sch}.{tbl}")
                });
            }
        }
    }
    if matches!(op, Op::Truncate | Op::Message) {
        return Ok(ev);
    }
    let envelope_fields = schema.map(struct_fields).unwrap_or_default();
    let row_schema = |name: &str| envelope_fields.get(name).map(struct_fields);
    ev.before = normalize_row(
        p.get("before").copied(),
        row_schema("before").as_ref(),
        opts,
        "before",
    )?;
    ev.after = normalize_row(
        p.get("after").copied(),
        row_schema("after").as_ref(),
        opts,
        "after",
    )?;
    ev.payment = Some(match op {
        Op::Delete => {
            let before = ev
                .before
                .as_ref()
                .ok_or_else(|| err(DecodeErrorKind::UnexpectedShape, "delete without before"))?;
            let p = payment_from_row(before, opts, false)?;
            if key_only_image(before, opts) {
                ev.before = Some(key_of(before, opts));
            }
            p
        }
        _ => {
            let after = ev.after.as_ref().ok_or_else(|| {
                err(
                    DecodeErrorKind::UnexpectedShape,
                    format!("op {:?} without after", op.as_str()),
                )
            })?;
            payment_from_row(after, opts, true)?
        }
    });
    Ok(ev)
}

/// ExtractNewRecordState output: the row itself, with `__op`, `__deleted`, `__table`, `__lsn`,
/// `__source_ts_ms`… when `add.fields` / rewrite mode asked for them.
pub(super) fn decode_flat_row(
    p: &RawObj<'_>,
    schema: Option<&Value>,
    opts: &DecodeOptions,
) -> Result<ChangeEvent, DecodeError> {
    let deleted = raw_str(p, "__deleted").as_deref() == Some("true");
    // Without `__op` the row is the current state of the table row, an upsert: reported as `u`.
    let op = match raw_str(p, "__op").as_deref() {
        _ if deleted => Op::Delete,
        Some("c") => Op::Create,
        Some("r") => Op::Read,
        Some("u") | None => Op::Update,
        Some("d") => Op::Delete,
        Some(other) => {
            return Err(err(
                DecodeErrorKind::UnknownOp,
                format!("unknown __op {other:?}"),
            ))
        }
    };
    let mut ev = ChangeEvent::bare(op);
    ev.table = raw_str(p, "__table");
    ev.source = SourceInfo {
        lsn: raw_i64(p, "__lsn"),
        tx_id: raw_i64(p, "__txId"),
        ts_ms: raw_i64(p, "__source_ts_ms"),
        snapshot: raw_str(p, "__snapshot"),
    };
    let fields = schema.map(struct_fields);
    let mut row = Map::new();
    for (name, raw) in p.iter().filter(|(k, _)| !k.starts_with("__")) {
        row.insert(
            name.clone(),
            normalize_col(name, raw, fields.as_ref().and_then(|f| f.get(name)), opts)?,
        );
    }
    let payment = payment_from_row(&row, opts, op != Op::Delete)?;
    ev.payment = Some(payment);
    if op == Op::Delete {
        // The unwrap SMT's rewritten delete is the same old image, fill values included.
        ev.before = Some(if key_only_image(&row, opts) {
            key_of(&row, opts)
        } else {
            row
        });
    } else {
        ev.after = Some(row);
    }
    Ok(ev)
}

/// Whether a delete's old image holds only the key. Under `REPLICA IDENTITY DEFAULT` Debezium
/// 3.6.3 fills every NOT NULL column Postgres did not send: `""` for text, 0 for numbers, the
/// column default (`pending`) and the epoch for timestamps (seen through the real connector:
/// tests/golden/real). A real payment row never has an empty idempotency key nor a
/// `created_at` at the epoch, so either tells the fill apart from a FULL image.
pub(super) fn key_only_image(row: &Map<String, Value>, opts: &DecodeOptions) -> bool {
    let c = &opts.columns;
    let epoch = match row.get(&c.created_at) {
        Some(Value::String(s)) => s.starts_with("1970-01-01T00:00:00"),
        Some(Value::Number(n)) => n.as_i64() == Some(0),
        _ => false,
    };
    epoch || matches!(row.get(&c.idempotency_key), Some(Value::String(s)) if s.is_empty())
}

pub(super) fn key_of(row: &Map<String, Value>, opts: &DecodeOptions) -> Map<String, Value> {
    row.iter()
        .filter(|(k, _)| **k == opts.columns.id)
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}
