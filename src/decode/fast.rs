//! The decoder's fast path, for what state needs of the events that make up almost all of a CDC
//! stream: envelopes with op c, u, d or r, schemas on or off.
//!
//! Why a second path: the general decoder ([`super::decode_value`]) builds the whole
//! normalized row as a JSON map and parses each level of the message again for every field
//! it reads; at the daemon's rates that was most of its time. This path reads each message
//! in one borrowed pass per level, keeps no row, and remembers the last Connect schema it saw
//! (Debezium sends the same one with every message of a table).
//!
//! Why it cannot disagree with the general decoder: it answers only when it succeeds, and
//! anything unusual (another op, a duplicate key, a value of an unexpected type, any error)
//! makes it give up, so the general decoder answers instead, errors included. Where it does
//! answer, it uses the same column normalization and the same row → payment mapping
//! ([`super::normalize_col`], [`super::payment_from`]). `tests/fuzz_decode.rs` checks on every
//! seed and mutation that both give the same event.

use std::borrow::Cow;
use std::cell::RefCell;
use std::collections::BTreeMap;
use std::fmt;
use std::rc::Rc;

use serde::de::{self, Deserializer, IgnoredAny, MapAccess, Visitor};
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::Value;

use super::{
    normalize_col, payment_from, struct_fields, ChangeEvent, DecodeOptions, Op, SourceInfo,
};

/// The fields of one object level that this path reads, each at most once.
#[derive(Default)]
struct Envelope<'a> {
    keys: usize,
    before: Option<&'a RawValue>,
    after: Option<&'a RawValue>,
    source: Option<&'a RawValue>,
    op: Option<&'a RawValue>,
    schema: Option<&'a RawValue>,
    payload: Option<&'a RawValue>,
}

impl<'de> Deserialize<'de> for Envelope<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Envelope<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<Self::Value, A::Error> {
                let mut e = Envelope::default();
                while let Some(k) = m.next_key::<Cow<'de, str>>()? {
                    e.keys += 1;
                    let slot = match k.as_ref() {
                        "before" => &mut e.before,
                        "after" => &mut e.after,
                        "source" => &mut e.source,
                        "op" => &mut e.op,
                        "schema" => &mut e.schema,
                        "payload" => &mut e.payload,
                        _ => {
                            m.next_value::<IgnoredAny>()?;
                            continue;
                        }
                    };
                    // The general decoder keeps the last of duplicate keys; not worth copying.
                    if slot.is_some() {
                        return Err(de::Error::custom("duplicate key"));
                    }
                    *slot = Some(m.next_value()?);
                }
                Ok(e)
            }
        }
        d.deserialize_map(V)
    }
}

/// `source`, read as the general decoder reads it (last duplicate wins there too).
struct Source(SourceInfo, Option<String>, Option<String>);

impl<'de> Deserialize<'de> for Source {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Source;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<Self::Value, A::Error> {
                let mut s = Source(SourceInfo::default(), None, None);
                // As `raw_str` / `raw_i64` read a value.
                let text = |v: Value| match v {
                    Value::String(s) => Some(s),
                    Value::Bool(b) => Some(b.to_string()),
                    _ => None,
                };
                while let Some(k) = m.next_key::<Cow<'de, str>>()? {
                    match k.as_ref() {
                        "lsn" => s.0.lsn = m.next_value::<Value>()?.as_i64(),
                        "txId" => s.0.tx_id = m.next_value::<Value>()?.as_i64(),
                        "ts_ms" => s.0.ts_ms = m.next_value::<Value>()?.as_i64(),
                        "snapshot" => s.0.snapshot = text(m.next_value()?),
                        "schema" => s.1 = text(m.next_value()?),
                        "table" => s.2 = text(m.next_value()?),
                        _ => {
                            m.next_value::<IgnoredAny>()?;
                        }
                    }
                }
                Ok(s)
            }
        }
        d.deserialize_map(V)
    }
}

/// A row's columns as raw text, in message order, no duplicates.
struct Row<'a>(Vec<(Cow<'a, str>, &'a RawValue)>);

impl<'de> Deserialize<'de> for Row<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Row<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<Self::Value, A::Error> {
                let mut cols: Vec<(Cow<'de, str>, &'de RawValue)> = Vec::with_capacity(12);
                while let Some(k) = m.next_key::<Cow<'de, str>>()? {
                    if cols.iter().any(|(n, _)| *n == k) {
                        return Err(de::Error::custom("duplicate column"));
                    }
                    let v = m.next_value()?;
                    cols.push((k, v));
                }
                Ok(Row(cols))
            }
        }
        d.deserialize_map(V)
    }
}

/// Column schemas of `before` and `after`, from a Connect envelope schema.
type RowSchemas = (
    Option<BTreeMap<String, Value>>,
    Option<BTreeMap<String, Value>>,
);

thread_local! {
    /// The last envelope schema seen (its text) and what was read from it.
    static SCHEMA: RefCell<Option<(String, Rc<RowSchemas>)>> = const { RefCell::new(None) };
}

fn row_schemas(raw: &RawValue) -> Rc<RowSchemas> {
    SCHEMA.with(|c| {
        let mut c = c.borrow_mut();
        if let Some((text, rows)) = c.as_ref() {
            if text == raw.get() {
                return rows.clone();
            }
        }
        let schema: Value = serde_json::from_str(raw.get()).unwrap_or(Value::Null);
        let fields = struct_fields(&schema);
        let rows = Rc::new((
            fields.get("before").map(struct_fields),
            fields.get("after").map(struct_fields),
        ));
        *c = Some((raw.get().to_string(), rows.clone()));
        rows
    })
}

/// Logical types whose string values the general normalization changes or rejects.
fn converts_strings(logical: &str) -> bool {
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

/// A row normalized column by column, as [`super::normalize_row`] does; `None` for JSON null.
fn row<'a>(
    raw: Option<&'a RawValue>,
    fields: Option<&BTreeMap<String, Value>>,
    opts: &DecodeOptions,
) -> Option<Option<Vec<(Cow<'a, str>, Value)>>> {
    let Some(raw) = raw else {
        return Some(None);
    };
    if raw.get().trim() == "null" {
        return Some(None);
    }
    let Row(cols) = serde_json::from_str(raw.get()).ok()?;
    let mut out = Vec::with_capacity(cols.len());
    for (name, v) in cols {
        let schema = fields.and_then(|f| f.get(name.as_ref()));
        let text = v.get();
        // A plain string (no escapes) in a column nothing converts is itself: the common case,
        // without parsing it again.
        let plain = text.len() >= 2
            && text.starts_with('"')
            && !text.contains('\\')
            && name != opts.columns.amount.as_str()
            && !schema
                .and_then(|s| s.get("name"))
                .and_then(Value::as_str)
                .is_some_and(converts_strings);
        let value = if plain {
            Value::String(text[1..text.len() - 1].to_string())
        } else {
            normalize_col(&name, v, schema, opts).ok()?
        };
        out.push((name, value));
    }
    Some(Some(out))
}

/// The event without its normalized rows (`before`, `after`), or `None` where the general
/// decoder must answer.
pub(super) fn decode(bytes: &[u8], opts: &DecodeOptions) -> Option<ChangeEvent> {
    let text = std::str::from_utf8(bytes).ok()?;
    let top: Envelope<'_> = serde_json::from_str(text).ok()?;
    let (p, schema) = match (top.keys, top.schema, top.payload) {
        (2, Some(schema), Some(payload)) => (serde_json::from_str(payload.get()).ok()?, Some(schema)),
        _ => (top, None),
    };
    let op = match p.op?.get() {
        r#""c""# => Op::Create,
        r#""u""# => Op::Update,
        r#""d""# => Op::Delete,
        r#""r""# => Op::Read,
        _ => return None,
    };
    let mut ev = ChangeEvent::bare(op);
    if let Some(src) = p.source {
        let Source(info, sch, tbl) = serde_json::from_str(src.get()).ok()?;
        ev.source = info;
        let (sch, tbl) = (sch.unwrap_or_default(), tbl.unwrap_or_default());
        if !tbl.is_empty() {
            ev.table = Some(if sch.is_empty() {
                tbl
            } else {
                format!("{sch}.{tbl}")
            });
        }
    }
    let schemas = schema.map(row_schemas);
    let (before_fields, after_fields) = match schemas.as_deref() {
        Some((b, a)) => (b.as_ref(), a.as_ref()),
        None => (None, None),
    };
    let before = row(p.before, before_fields, opts)?;
    let after = row(p.after, after_fields, opts)?;
    let (mut cols, full) = match op {
        Op::Delete => (before?, false),
        _ => (after?, true),
    };
    // Each configured column is asked for once, so its value can move into the payment,
    // unless a team configured one column under two names: then each gets a copy.
    let c = &opts.columns;
    let names = [
        &c.id,
        &c.idempotency_key,
        &c.amount,
        &c.currency,
        &c.status,
        &c.stripe_payment_intent_id,
        &c.created_at,
        &c.updated_at,
    ];
    let distinct = names
        .iter()
        .enumerate()
        .all(|(i, n)| !names[i + 1..].contains(n));
    let take = |name: &str| {
        let v = &mut cols.iter_mut().find(|(n, _)| n == name)?.1;
        Some(if distinct {
            std::mem::take(v)
        } else {
            v.clone()
        })
    };
    ev.payment = Some(payment_from(take, opts, full).ok()?);
    Some(ev)
}
