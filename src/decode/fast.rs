//! The decoder's fast path, for what state needs of the events that make up almost all of a CDC
//! stream: envelopes with op c, u, d or r, schemas on or off.
//!
//! Why a second path: the general decoder ([`super::decode_value`]) builds the whole
//! normalized row as a JSON map and parses each level of the message again for every field
//! it reads; at the daemon's rates that was most of its time. This path reads each message
//! in one borrowed pass, keeps no row map and no table name, and remembers the last Connect
//! schema it saw (Debezium sends the same one with every message of a table).
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

use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, Visitor};
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::Value;

use super::{
    converts_type, normalize_col, payment_from, struct_fields, ChangeEvent, DecodeOptions, Op,
    SourceInfo,
};

/// What one object level of a message holds for this path, read in one pass: rows and
/// `source` are parsed where they stand (rows normalized by the schema seen before them).
#[derive(Default)]
struct Level<'a> {
    keys: usize,
    op: Option<&'a RawValue>,
    source: Option<Source>,
    /// `Some(None)`: JSON null.
    before: Option<Option<Cols<'a>>>,
    after: Option<Option<Cols<'a>>>,
    schema: Option<&'a RawValue>,
    /// Parsed only when `schema` came first (as Debezium writes it); else the path gives up.
    payload: Option<Box<Level<'a>>>,
}

type Cols<'a> = Vec<(Cow<'a, str>, Value)>;

/// Reads one level; `schemas` are the row schemas that apply to its rows.
struct LevelSeed<'o> {
    opts: &'o DecodeOptions,
    schemas: Option<Rc<RowSchemas>>,
}

impl<'de> DeserializeSeed<'de> for LevelSeed<'_> {
    type Value = Level<'de>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for LevelSeed<'_> {
    type Value = Level<'de>;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an object")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<Self::Value, A::Error> {
        let mut l = Level::default();
        let (before_fields, after_fields) = match self.schemas.as_deref() {
            Some((b, a)) => (b.as_ref(), a.as_ref()),
            None => (None, None),
        };
        // The general decoder keeps the last of duplicate keys; not worth copying.
        let dup = || de::Error::custom("duplicate key");
        while let Some(k) = m.next_key::<Cow<'de, str>>()? {
            l.keys += 1;
            match k.as_ref() {
                "op" if l.op.is_none() => l.op = Some(m.next_value()?),
                "source" if l.source.is_none() => l.source = Some(m.next_value()?),
                "before" if l.before.is_none() => {
                    l.before = Some(m.next_value_seed(RowSeed {
                        opts: self.opts,
                        fields: before_fields,
                    })?)
                }
                "after" if l.after.is_none() => {
                    l.after = Some(m.next_value_seed(RowSeed {
                        opts: self.opts,
                        fields: after_fields,
                    })?)
                }
                "schema" if l.schema.is_none() => l.schema = Some(m.next_value()?),
                "payload" if l.payload.is_none() => {
                    let Some(schema) = l.schema else {
                        return Err(de::Error::custom("payload before schema"));
                    };
                    let seed = LevelSeed {
                        opts: self.opts,
                        schemas: Some(row_schemas(schema)),
                    };
                    l.payload = Some(Box::new(m.next_value_seed(seed)?));
                }
                "op" | "source" | "before" | "after" | "schema" | "payload" => return Err(dup()),
                _ => {
                    m.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(l)
    }
}

/// `source`, read as the general decoder reads it (last duplicate wins there too).
struct Source(SourceInfo);

impl<'de> Deserialize<'de> for Source {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Source;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<Self::Value, A::Error> {
                let mut s = Source(SourceInfo::default());
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

/// A row, normalized column by column as [`super::normalize_row`] does; `None` for JSON null.
struct RowSeed<'f, 'o> {
    opts: &'o DecodeOptions,
    fields: Option<&'f BTreeMap<String, Value>>,
}

impl<'de> DeserializeSeed<'de> for RowSeed<'_, '_> {
    type Value = Option<Cols<'de>>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_option(self)
    }
}

impl<'de> Visitor<'de> for RowSeed<'_, '_> {
    type Value = Option<Cols<'de>>;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an object or null")
    }
    fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_map(self)
    }
    fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<Self::Value, A::Error> {
        let mut cols: Cols<'de> = Vec::with_capacity(12);
        while let Some(name) = m.next_key::<Cow<'de, str>>()? {
            if cols.iter().any(|(n, _)| *n == name) {
                return Err(de::Error::custom("duplicate column"));
            }
            let raw: &'de RawValue = m.next_value()?;
            let schema = self.fields.and_then(|f| f.get(name.as_ref()));
            let text = raw.get();
            // A plain string (no escapes) in a column nothing converts is itself: the common
            // case, without parsing it again.
            let plain = text.len() >= 2
                && text.starts_with('"')
                && !text.contains('\\')
                && name != self.opts.columns.amount.as_str()
                && !schema
                    .and_then(|s| s.get("name"))
                    .and_then(Value::as_str)
                    .is_some_and(converts_type);
            let value = if plain {
                Value::String(text[1..text.len() - 1].to_string())
            } else {
                normalize_col(&name, raw, schema, self.opts)
                    .map_err(|e| de::Error::custom(e.detail))?
            };
            cols.push((name, value));
        }
        Ok(Some(cols))
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

/// The event without its normalized rows (`before`, `after`), or `None` where the general
/// decoder must answer.
pub(super) fn decode(bytes: &[u8], opts: &DecodeOptions) -> Option<ChangeEvent> {
    let text = std::str::from_utf8(bytes).ok()?;
    let mut de = serde_json::Deserializer::from_str(text);
    let top = LevelSeed {
        opts,
        schemas: None,
    }
    .deserialize(&mut de)
    .ok()?;
    de.end().ok()?;
    // The JSON converter with schemas.enable=true wraps the payload: exactly these two keys.
    let p = match top.payload {
        Some(payload) if top.keys == 2 && top.schema.is_some() => *payload,
        _ => top,
    };
    let op = match p.op?.get() {
        r#""c""# => Op::Create,
        r#""u""# => Op::Update,
        r#""d""# => Op::Delete,
        r#""r""# => Op::Read,
        _ => return None,
    };
    let mut ev = ChangeEvent::bare(op);
    if let Some(Source(info)) = p.source {
        ev.source = info;
    }
    let (before, after) = (p.before.flatten(), p.after.flatten());
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
