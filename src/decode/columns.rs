//! Column values as Debezium encodes them (decimals as base64 or text, variable-scale
//! decimals, timestamps as micros, TOASTed placeholders), normalized exactly, and the payment
//! read from a normalized row.

use std::collections::BTreeMap;

use base64::Engine;
use serde_json::value::RawValue;
use serde_json::{Map, Value};

use super::envelope::parse_obj;
use super::{err, DecodeError, DecodeErrorKind, DecodeOptions};
use crate::change::{Col, Decimal, Payment};

pub(super) fn normalize_row(
    raw: Option<&RawValue>,
    fields: Option<&BTreeMap<String, Value>>,
    opts: &DecodeOptions,
    what: &str,
) -> Result<Option<Map<String, Value>>, DecodeError> {
    let Some(raw) = raw else { return Ok(None) };
    let Some(obj) = parse_obj(raw.get(), what)? else {
        return Ok(None);
    };
    let mut row = Map::new();
    for (name, v) in &obj {
        row.insert(
            name.clone(),
            normalize_col(name, v, fields.and_then(|f| f.get(name)), opts)?,
        );
    }
    Ok(Some(row))
}

pub(super) fn decimal_err(col: &str, e: impl std::fmt::Display) -> DecodeError {
    err(DecodeErrorKind::BadDecimal, format!("column {col:?}: {e}"))
}

pub(super) fn decimal_from_base64(col: &str, s: &str, scale: u32) -> Result<Value, DecodeError> {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(s)
        .map_err(|e| decimal_err(col, format!("{s:?} is not base64 decimal bytes: {e}")))?;
    let d = Decimal::from_be_bytes(&bytes, scale).map_err(|e| decimal_err(col, e))?;
    Ok(Value::String(d.to_string()))
}

pub(super) fn decimal_from_text(col: &str, s: &str) -> Result<Value, DecodeError> {
    Ok(Value::String(
        Decimal::parse(s)
            .map_err(|e| decimal_err(col, e))?
            .to_string(),
    ))
}

/// `io.debezium.data.VariableScaleDecimal`: `{"scale": 2, "value": "<base64>"}`.
pub(super) fn variable_scale_decimal(col: &str, v: &Value) -> Result<Value, DecodeError> {
    let scale = v
        .get("scale")
        .and_then(Value::as_u64)
        .and_then(|s| u32::try_from(s).ok());
    match (scale, v.get("value").and_then(Value::as_str)) {
        (Some(scale), Some(bytes)) => decimal_from_base64(col, bytes, scale),
        _ => Err(decimal_err(col, format!("not a VariableScaleDecimal: {v}"))),
    }
}

pub(super) fn is_vsd(v: &Value) -> bool {
    v.as_object()
        .is_some_and(|o| o.len() == 2 && o.contains_key("scale") && o.contains_key("value"))
}

pub(super) fn time_err(col: &str, v: &Value) -> DecodeError {
    err(
        DecodeErrorKind::BadValue,
        format!("column {col:?}: bad time value {v}"),
    )
}

pub(super) fn rfc3339_from_micros(col: &str, micros: i64, v: &Value) -> Result<Value, DecodeError> {
    let t = chrono::DateTime::from_timestamp_micros(micros).ok_or_else(|| time_err(col, v))?;
    Ok(Value::String(
        t.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true),
    ))
}

/// The Connect logical types [`normalize_col`] converts or checks by their schema: only these
/// reach its match of logical names, so a type handled there is listed here. The fast path
/// ([`fast`]) keeps a plain string of any other type as it is, relying on the same list.
pub(super) fn converts_type(logical: &str) -> bool {
    matches!(
        logical,
        "org.apache.kafka.connect.data.Decimal"
            | "io.debezium.data.VariableScaleDecimal"
            | "io.debezium.time.MicroTimestamp"
            | "io.debezium.time.Timestamp"
            | "org.apache.kafka.connect.data.Timestamp"
            | "io.debezium.time.NanoTimestamp"
            | "io.debezium.time.Date"
            | "org.apache.kafka.connect.data.Date"
    )
}

/// Normalizes one column value to plain JSON, by its Connect schema when there is one.
pub(super) fn normalize_col(
    col: &str,
    raw: &RawValue,
    schema: Option<&Value>,
    opts: &DecodeOptions,
) -> Result<Value, DecodeError> {
    let text = raw.get().trim();
    if text == "null" {
        return Ok(Value::Null);
    }
    let is_number = text.starts_with(|c: char| c == '-' || c.is_ascii_digit());
    // Parsed here, not through `raw_value`: a number serde cannot hold (1e400) is a bad value,
    // never silently null.
    let v: Value = serde_json::from_str(text)
        .map_err(|e| err(DecodeErrorKind::BadValue, format!("column {col:?}: {e}")))?;
    if v.as_str() == Some(opts.unavailable_placeholder.as_str()) {
        return Ok(v);
    }
    let logical = schema
        .and_then(|s| s.get("name"))
        .and_then(Value::as_str)
        .unwrap_or("");
    let ty = schema
        .and_then(|s| s.get("type"))
        .and_then(Value::as_str)
        .unwrap_or("");
    let logical = if converts_type(logical) { logical } else { "" };
    match logical {
        "org.apache.kafka.connect.data.Decimal" => {
            let scale = schema
                .and_then(|s| s.pointer("/parameters/scale"))
                .and_then(|s| {
                    s.as_str()
                        .and_then(|s| s.parse().ok())
                        .or_else(|| s.as_u64().and_then(|n| u32::try_from(n).ok()))
                })
                .ok_or_else(|| decimal_err(col, "Decimal schema without parameters.scale"))?;
            return match &v {
                Value::String(s) => decimal_from_base64(col, s, scale),
                // decimal.format=NUMERIC: a JSON number while the schema still says Decimal.
                Value::Number(_) => decimal_from_text(col, text),
                other => Err(decimal_err(col, format!("unexpected {other}"))),
            };
        }
        "io.debezium.data.VariableScaleDecimal" => return variable_scale_decimal(col, &v),
        "io.debezium.time.MicroTimestamp" => {
            let n = v.as_i64().ok_or_else(|| time_err(col, &v))?;
            return rfc3339_from_micros(col, n, &v);
        }
        "io.debezium.time.Timestamp" | "org.apache.kafka.connect.data.Timestamp" => {
            let n = v.as_i64().ok_or_else(|| time_err(col, &v))?;
            return rfc3339_from_micros(
                col,
                n.checked_mul(1000).ok_or_else(|| time_err(col, &v))?,
                &v,
            );
        }
        "io.debezium.time.NanoTimestamp" => {
            let n = v.as_i64().ok_or_else(|| time_err(col, &v))?;
            let t = chrono::DateTime::from_timestamp_nanos(n);
            return Ok(Value::String(
                t.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true),
            ));
        }
        "io.debezium.time.Date" | "org.apache.kafka.connect.data.Date" => {
            let days = v.as_i64().ok_or_else(|| time_err(col, &v))?;
            let d = chrono::NaiveDate::from_ymd_opt(1970, 1, 1)
                .and_then(|e| e.checked_add_signed(chrono::TimeDelta::days(days)))
                .ok_or_else(|| time_err(col, &v))?;
            return Ok(Value::String(d.to_string()));
        }
        _ => {}
    }
    if is_vsd(&v) {
        return variable_scale_decimal(col, &v);
    }
    if col == opts.columns.amount {
        // The money column: exact whatever decimal.handling.mode wrote.
        return match &v {
            // double mode or decimal.format=NUMERIC: the number's own text, never an f64.
            Value::Number(_) if is_number => decimal_from_text(col, text),
            // string mode (schema says string, or the text has a decimal point) ...
            Value::String(s) if ty == "string" || s.contains('.') => decimal_from_text(col, s),
            // ... otherwise precise mode without a schema: Connect Decimal bytes, base64, with
            // the configured scale. Padded base64 is a multiple of 4 long; string mode always
            // prints the scale's decimals, so the two cannot be confused for NUMERIC(p, s>0).
            Value::String(s) if ty == "bytes" || s.len() % 4 == 0 => {
                decimal_from_base64(col, s, opts.amount_scale)
            }
            Value::String(s) => decimal_from_text(col, s),
            other => Err(decimal_err(col, format!("unexpected {other}"))),
        };
    }
    Ok(v)
}

pub(super) fn missing(col: &str) -> DecodeError {
    err(
        DecodeErrorKind::MissingColumn,
        format!("column {col:?} is missing"),
    )
}

pub(super) fn id_string(v: &Value, col: &str) -> Result<String, DecodeError> {
    match v {
        Value::String(s) if !s.is_empty() => Ok(s.clone()),
        // Integers only: 1.5 or 1e3 is not a row id, and must not become one.
        Value::Number(n) if n.is_i64() || n.is_u64() => Ok(n.to_string()),
        Value::Null => Err(err(
            DecodeErrorKind::BadValue,
            format!("key column {col:?} is null"),
        )),
        other => Err(err(
            DecodeErrorKind::BadValue,
            format!("key column {col:?} is not a string or integer: {other}"),
        )),
    }
}

/// Maps a normalized row to a [`Payment`]. With `full = false` (a delete's `before`, where only
/// the key is real) only the id is read.
pub(super) fn payment_from_row(
    row: &Map<String, Value>,
    opts: &DecodeOptions,
    full: bool,
) -> Result<Payment, DecodeError> {
    payment_from(|name| row.get(name).cloned(), opts, full)
}

/// [`payment_from_row`] over any row: `take(name)` gives a column's normalized value once. One
/// mapping for both decoders (see [`fast`]), so they cannot disagree on it.
pub(super) fn payment_from(
    mut take: impl FnMut(&str) -> Option<Value>,
    opts: &DecodeOptions,
    full: bool,
) -> Result<Payment, DecodeError> {
    let c = &opts.columns;
    let id = id_string(&take(&c.id).ok_or_else(|| missing(&c.id))?, &c.id)?;
    let mut p = Payment {
        id,
        idempotency_key: Col::Unknown,
        amount: Col::Unknown,
        currency: Col::Unknown,
        status: Col::Unknown,
        stripe_payment_intent_id: Col::Unknown,
        created_at: Col::Unknown,
        updated_at: Col::Unknown,
        account: Col::Unknown,
    };
    if !full {
        return Ok(p);
    }
    let placeholder = opts.unavailable_placeholder.as_str();
    // NOT NULL text columns: required in every full row.
    let mut required = |name: &str| -> Result<Col<String>, DecodeError> {
        match take(name) {
            None => Err(missing(name)),
            Some(Value::String(s)) if s == placeholder => Ok(Col::Unknown),
            Some(Value::String(s)) => Ok(Col::Set(s)),
            // Text only: a number where the status belongs is a broken producer, and reading
            // it as a (non-pending, hence final) status would drop a pending payment.
            Some(other) => Err(err(
                DecodeErrorKind::BadValue,
                format!("column {name:?} must be text, got {other}"),
            )),
        }
    };
    p.idempotency_key = required(&c.idempotency_key)?;
    p.amount = required(&c.amount)?;
    p.currency = required(&c.currency)?;
    p.status = required(&c.status)?;
    // Nullable columns, or ones a team's table may not have: absent means unknown.
    let mut optional = |name: &str| -> Result<Col<Option<String>>, DecodeError> {
        match take(name) {
            None => Ok(Col::Unknown),
            Some(Value::String(s)) if s == placeholder => Ok(Col::Unknown),
            Some(Value::Null) => Ok(Col::Set(None)),
            Some(Value::String(s)) => Ok(Col::Set(Some(s))),
            Some(Value::Number(n)) => Ok(Col::Set(Some(n.to_string()))),
            Some(other) => Err(err(
                DecodeErrorKind::BadValue,
                format!("column {name:?} must be text, got {other}"),
            )),
        }
    };
    p.stripe_payment_intent_id = optional(&c.stripe_payment_intent_id)?;
    p.created_at = optional(&c.created_at)?;
    p.updated_at = optional(&c.updated_at)?;
    if let Some(name) = &c.account {
        p.account = optional(name)?;
    }
    Ok(p)
}
