//! Debezium change events → [`ChangeEvent`].
//!
//! One function, [`decode_value`], turns a Kafka message value written by Debezium's PostgreSQL
//! connector into a normalized change event: the JSON converter with schemas on
//! (`{"schema","payload"}`) or off, the ExtractNewRecordState (unwrap) output in default and
//! rewrite mode, ops c/u/d/r/t/m, tombstones, heartbeats and transaction BEGIN/END records.
//!
//! Rules that keep it exact and tolerant:
//! - Fields are read by name and unknown fields are ignored, so any Debezium 1.x–3.x layout works.
//! - Column values are kept as raw JSON text until their type is known, so a money value written
//!   as a JSON number (`decimal.format=NUMERIC`, `decimal.handling.mode=double`) is read from its
//!   text, never through `f64`. Every decimal comes out as an exact decimal string.
//! - A TOASTed column Debezium did not resend (`__debezium_unavailable_value`) stays a marker in
//!   the row and is [`Col::Unknown`] in the [`Payment`], meaning "the old value still stands".
//!
//! Decoding never panics and never guesses past what it can prove: anything else is a
//! [`DecodeError`] the daemon sends to the dead-letter topic.

pub mod avro;
mod fast;
pub mod pgoutput;
pub mod registry;

use std::collections::BTreeMap;
use std::sync::Arc;

use base64::Engine;
use serde_json::value::RawValue;
use serde_json::{Map, Value};

use crate::change::{ChangeEvent, Col, Decimal, Op, Payment, SourceInfo};

/// Debezium's default `unavailable.value.placeholder`.
pub const TOAST_PLACEHOLDER: &str = "__debezium_unavailable_value";

/// Names of the payments table's columns. Teams name them differently; all are configurable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ColumnNames {
    pub id: String,
    pub idempotency_key: String,
    pub amount: String,
    pub currency: String,
    pub status: String,
    pub stripe_payment_intent_id: String,
    pub created_at: String,
    pub updated_at: String,
    /// Stripe Connect: the column of the payment's connected account, if the table has one.
    pub account: Option<String>,
}

impl Default for ColumnNames {
    fn default() -> Self {
        Self {
            id: "id".into(),
            idempotency_key: "idempotency_key".into(),
            amount: "amount".into(),
            currency: "currency".into(),
            status: "status".into(),
            stripe_payment_intent_id: "stripe_payment_intent_id".into(),
            created_at: "created_at".into(),
            updated_at: "updated_at".into(),
            account: None,
        }
    }
}

/// How to read what the message itself does not say.
#[derive(Debug, Clone)]
pub struct DecodeOptions {
    /// Scale of Connect `Decimal` bytes when schemas are off (the schema carries it otherwise).
    pub amount_scale: u32,
    pub columns: ColumnNames,
    /// The connector's `unavailable.value.placeholder`.
    pub unavailable_placeholder: String,
}

impl Default for DecodeOptions {
    fn default() -> Self {
        Self {
            amount_scale: 2,
            columns: ColumnNames::default(),
            unavailable_placeholder: TOAST_PLACEHOLDER.into(),
        }
    }
}

/// Why a message could not be decoded. The fault is the producer's (or the connector
/// configuration's): retrying the same bytes cannot help, so such messages go to the DLQ. The
/// one exception is [`DecodeErrorKind::SchemaRegistryUnavailable`]: the registry's fault, retried
/// a bounded number of times before the message goes to the DLQ, from where it can be re-driven.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{kind}: {detail}")]
pub struct DecodeError {
    pub kind: DecodeErrorKind,
    pub detail: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecodeErrorKind {
    NotUtf8,
    InvalidJson,
    UnexpectedShape,
    UnknownOp,
    MissingColumn,
    BadValue,
    BadDecimal,
    /// Not the Confluent wire format, or an Avro body its writer schema cannot read.
    InvalidAvro,
    /// The schema id is not in the registry (or no registry is configured).
    UnknownSchema,
    /// The registry did not answer within the bounded retries; a re-drive later may succeed.
    SchemaRegistryUnavailable,
}

impl DecodeErrorKind {
    pub const ALL: [DecodeErrorKind; 10] = [
        Self::NotUtf8,
        Self::InvalidJson,
        Self::UnexpectedShape,
        Self::UnknownOp,
        Self::MissingColumn,
        Self::BadValue,
        Self::BadDecimal,
        Self::InvalidAvro,
        Self::UnknownSchema,
        Self::SchemaRegistryUnavailable,
    ];

    /// Stable, low-cardinality name: a metric label and the DLQ `reason` header.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::NotUtf8 => "not_utf8",
            Self::InvalidJson => "invalid_json",
            Self::UnexpectedShape => "unexpected_shape",
            Self::UnknownOp => "unknown_op",
            Self::MissingColumn => "missing_column",
            Self::BadValue => "bad_value",
            Self::BadDecimal => "bad_decimal",
            Self::InvalidAvro => "invalid_avro",
            Self::UnknownSchema => "unknown_schema",
            Self::SchemaRegistryUnavailable => "schema_registry_unavailable",
        }
    }
}

impl std::fmt::Display for DecodeErrorKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

fn err(kind: DecodeErrorKind, detail: impl Into<String>) -> DecodeError {
    DecodeError {
        kind,
        detail: detail.into(),
    }
}

/// Which converter wrote the messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// Per message: Confluent Avro if the first byte is 0x00 (no JSON text starts so), else JSON.
    Auto,
    Json,
    Avro,
}

/// What a [`Decoder`] is made from (`--format`, the decode options, the registry's settings).
pub struct DecoderSettings {
    pub format: Format,
    pub opts: DecodeOptions,
    pub registry: Option<registry::RegistrySettings>,
}

/// Decodes message values and keys in the configured format: JSON directly, Confluent Avro
/// through the schema registry and then the same normalization (see [`avro`]).
#[derive(Clone)]
pub struct Decoder {
    pub opts: DecodeOptions,
    pub format: Format,
    pub registry: Option<Arc<registry::Registry>>,
}

impl Decoder {
    /// The decoder `s` describes, with one registry client (shared by whoever clones the
    /// `Arc`) when a registry is set.
    pub fn new(s: DecoderSettings) -> Self {
        Decoder {
            opts: s.opts,
            format: s.format,
            registry: s.registry.map(|r| Arc::new(registry::Registry::new(r))),
        }
    }

    /// A JSON-only decoder (tests, tools).
    pub fn json(opts: DecodeOptions) -> Decoder {
        Decoder {
            opts,
            format: Format::Json,
            registry: None,
        }
    }

    /// The Avro body of `bytes` as JSON-converter bytes, or `None` when `bytes` is JSON.
    async fn avro_as_json(&self, bytes: &[u8]) -> Result<Option<Vec<u8>>, DecodeError> {
        let avro = match self.format {
            Format::Json => false,
            Format::Avro => true,
            Format::Auto => bytes.first() == Some(&avro::MAGIC),
        };
        if !avro {
            return Ok(None);
        }
        let (id, body) = avro::split_wire(bytes)?;
        let Some(reg) = &self.registry else {
            return Err(err(
                DecodeErrorKind::UnknownSchema,
                format!("Avro message with schema id {id}, but no --schema-registry-url is set"),
            ));
        };
        let schema = reg.schema(id).await.map_err(|e| match e {
            registry::RegistryError::Unavailable { .. } => {
                err(DecodeErrorKind::SchemaRegistryUnavailable, e.to_string())
            }
            registry::RegistryError::NotFound { .. } | registry::RegistryError::Invalid { .. } => {
                err(DecodeErrorKind::UnknownSchema, e.to_string())
            }
        })?;
        avro::to_connect_json(body, &schema).map(Some)
    }

    /// Runs a JSON decoder on `bytes`, after turning Avro into the JSON converter's form.
    async fn in_format<T>(
        &self,
        bytes: Option<&[u8]>,
        json: impl Fn(Option<&[u8]>, &DecodeOptions) -> Result<T, DecodeError>,
    ) -> Result<T, DecodeError> {
        match bytes {
            Some(b) => match self.avro_as_json(b).await? {
                Some(converted) => json(Some(&converted), &self.opts),
                None => json(Some(b), &self.opts),
            },
            None => json(None, &self.opts),
        }
    }

    /// [`decode_value`] in the configured format.
    pub async fn value(&self, value: Option<&[u8]>) -> Result<ChangeEvent, DecodeError> {
        self.in_format(value, decode_value).await
    }

    /// [`decode_for_state`] in the configured format.
    pub async fn for_state(&self, value: Option<&[u8]>) -> Result<ChangeEvent, DecodeError> {
        self.in_format(value, decode_for_state).await
    }

    /// [`decode_key`] in the configured format.
    pub async fn key(&self, key: &[u8]) -> Result<String, DecodeError> {
        self.in_format(Some(key), |k, opts| decode_key(k.expect("a key"), opts))
            .await
    }
}

type RawObj<'a> = BTreeMap<String, &'a RawValue>;

/// Parses `text` as a JSON object of raw values; `Ok(None)` for JSON `null`.
fn parse_obj<'a>(text: &'a str, what: &str) -> Result<Option<RawObj<'a>>, DecodeError> {
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

fn raw_value(raw: &RawValue) -> Value {
    // The raw text was already validated as JSON by the enclosing parse.
    serde_json::from_str(raw.get()).unwrap_or(Value::Null)
}

fn raw_str(obj: &RawObj<'_>, key: &str) -> Option<String> {
    match obj.get(key).map(|r| raw_value(r)) {
        Some(Value::String(s)) => Some(s),
        Some(Value::Bool(b)) => Some(b.to_string()),
        _ => None,
    }
}

fn raw_i64(obj: &RawObj<'_>, key: &str) -> Option<i64> {
    obj.get(key).and_then(|r| raw_value(r).as_i64())
}

/// Decodes one Kafka message value. `None` is a Kafka null value: a tombstone.
pub fn decode_value(
    value: Option<&[u8]>,
    opts: &DecodeOptions,
) -> Result<ChangeEvent, DecodeError> {
    let Some(bytes) = value else {
        return Ok(ChangeEvent::bare(Op::Tombstone));
    };
    let text = std::str::from_utf8(bytes)
        .map_err(|e| err(DecodeErrorKind::NotUtf8, format!("value is not UTF-8: {e}")))?;
    if text.trim().is_empty() {
        return Err(err(
            DecodeErrorKind::InvalidJson,
            "empty value (a tombstone is a Kafka null, not empty bytes)",
        ));
    }
    let Some(top) = parse_obj(text, "value")? else {
        return Ok(ChangeEvent::bare(Op::Tombstone));
    };
    // The JSON converter with schemas.enable=true wraps the payload: exactly these two keys.
    let (payload, schema) =
        if top.len() == 2 && top.contains_key("schema") && top.contains_key("payload") {
            let schema = raw_value(top["schema"]);
            match parse_obj(top["payload"].get(), "payload")? {
                Some(p) => (p, Some(schema)),
                None => return Ok(ChangeEvent::bare(Op::Tombstone)),
            }
        } else {
            (top, None)
        };
    decode_payload(&payload, schema.as_ref(), opts)
}

/// The fast path alone: `None` where it leaves the answer to [`decode_value`]. For the
/// differential tests and benchmarks; the daemon calls [`decode_for_state`].
pub fn decode_fast(value: &[u8], opts: &DecodeOptions) -> Option<ChangeEvent> {
    fast::decode(value, opts)
}

/// Decodes one Kafka message value for state: the same event as [`decode_value`] without what
/// state never reads (`before`, `after` and `table` are `None`). Most events
/// take the fast path (the private `fast` module); every other input, errors included, gets exactly the
/// general decoder's answer.
pub fn decode_for_state(
    value: Option<&[u8]>,
    opts: &DecodeOptions,
) -> Result<ChangeEvent, DecodeError> {
    if let Some(ev) = value.and_then(|v| fast::decode(v, opts)) {
        return Ok(ev);
    }
    decode_value(value, opts).map(|mut ev| {
        ev.before = None;
        ev.after = None;
        ev.table = None;
        ev
    })
}

fn decode_payload(
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
fn struct_fields(schema: &Value) -> BTreeMap<String, Value> {
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

fn decode_envelope(
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
fn decode_flat_row(
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
fn key_only_image(row: &Map<String, Value>, opts: &DecodeOptions) -> bool {
    let c = &opts.columns;
    let epoch = match row.get(&c.created_at) {
        Some(Value::String(s)) => s.starts_with("1970-01-01T00:00:00"),
        Some(Value::Number(n)) => n.as_i64() == Some(0),
        _ => false,
    };
    epoch || matches!(row.get(&c.idempotency_key), Some(Value::String(s)) if s.is_empty())
}

fn key_of(row: &Map<String, Value>, opts: &DecodeOptions) -> Map<String, Value> {
    row.iter()
        .filter(|(k, _)| **k == opts.columns.id)
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

fn normalize_row(
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

fn decimal_err(col: &str, e: impl std::fmt::Display) -> DecodeError {
    err(DecodeErrorKind::BadDecimal, format!("column {col:?}: {e}"))
}

fn decimal_from_base64(col: &str, s: &str, scale: u32) -> Result<Value, DecodeError> {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(s)
        .map_err(|e| decimal_err(col, format!("{s:?} is not base64 decimal bytes: {e}")))?;
    let d = Decimal::from_be_bytes(&bytes, scale).map_err(|e| decimal_err(col, e))?;
    Ok(Value::String(d.to_string()))
}

fn decimal_from_text(col: &str, s: &str) -> Result<Value, DecodeError> {
    Ok(Value::String(
        Decimal::parse(s)
            .map_err(|e| decimal_err(col, e))?
            .to_string(),
    ))
}

/// `io.debezium.data.VariableScaleDecimal`: `{"scale": 2, "value": "<base64>"}`.
fn variable_scale_decimal(col: &str, v: &Value) -> Result<Value, DecodeError> {
    let scale = v
        .get("scale")
        .and_then(Value::as_u64)
        .and_then(|s| u32::try_from(s).ok());
    match (scale, v.get("value").and_then(Value::as_str)) {
        (Some(scale), Some(bytes)) => decimal_from_base64(col, bytes, scale),
        _ => Err(decimal_err(col, format!("not a VariableScaleDecimal: {v}"))),
    }
}

fn is_vsd(v: &Value) -> bool {
    v.as_object()
        .is_some_and(|o| o.len() == 2 && o.contains_key("scale") && o.contains_key("value"))
}

fn time_err(col: &str, v: &Value) -> DecodeError {
    err(
        DecodeErrorKind::BadValue,
        format!("column {col:?}: bad time value {v}"),
    )
}

fn rfc3339_from_micros(col: &str, micros: i64, v: &Value) -> Result<Value, DecodeError> {
    let t = chrono::DateTime::from_timestamp_micros(micros).ok_or_else(|| time_err(col, v))?;
    Ok(Value::String(
        t.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true),
    ))
}

/// The Connect logical types [`normalize_col`] converts or checks by their schema: only these
/// reach its match of logical names, so a type handled there is listed here. The fast path
/// ([`fast`]) keeps a plain string of any other type as it is, relying on the same list.
fn converts_type(logical: &str) -> bool {
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
fn normalize_col(
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

fn missing(col: &str) -> DecodeError {
    err(
        DecodeErrorKind::MissingColumn,
        format!("column {col:?} is missing"),
    )
}

fn id_string(v: &Value, col: &str) -> Result<String, DecodeError> {
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
fn payment_from_row(
    row: &Map<String, Value>,
    opts: &DecodeOptions,
    full: bool,
) -> Result<Payment, DecodeError> {
    payment_from(|name| row.get(name).cloned(), opts, full)
}

/// [`payment_from_row`] over any row: `take(name)` gives a column's normalized value once. One
/// mapping for both decoders (see [`fast`]), so they cannot disagree on it.
fn payment_from(
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

/// Decodes a Kafka message key (`{"id": …}`, with or without a schema) to the payment id.
pub fn decode_key(key: &[u8], opts: &DecodeOptions) -> Result<String, DecodeError> {
    let text = std::str::from_utf8(key)
        .map_err(|e| err(DecodeErrorKind::NotUtf8, format!("key is not UTF-8: {e}")))?;
    let top = parse_obj(text, "key")?
        .ok_or_else(|| err(DecodeErrorKind::UnexpectedShape, "key is null"))?;
    let payload = if top.len() == 2 && top.contains_key("schema") && top.contains_key("payload") {
        parse_obj(top["payload"].get(), "key payload")?
            .ok_or_else(|| err(DecodeErrorKind::UnexpectedShape, "key payload is null"))?
    } else {
        top
    };
    let col = &opts.columns.id;
    let raw = match payload.get(col) {
        Some(r) => *r,
        // A key of one field under another name: that field is the key.
        None if payload.len() == 1 => *payload.values().next().expect("one field"),
        None => return Err(missing(col)),
    };
    id_string(&raw_value(raw), col)
}

/// The dead-letter series at 0, one per reason, before the first bad message (see
/// [`crate::metrics::init_run_series`]).
pub fn init_series() {
    for k in DecodeErrorKind::ALL {
        crate::metrics::METRICS
            .dlq_messages
            .with_label_values(&[k.as_str()]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dec(s: &str) -> Result<ChangeEvent, DecodeError> {
        decode_value(Some(s.as_bytes()), &DecodeOptions::default())
    }

    #[test]
    fn numeric_amount_is_read_from_text_not_float() {
        let ev = dec(r#"{"op":"c","after":{"id":7,"idempotency_key":"k","amount":12345678901.23,"currency":"usd","status":"pending"}}"#).unwrap();
        let p = ev.payment.unwrap();
        assert_eq!(p.amount, Col::Set("12345678901.23".into()));
        assert_eq!(p.id, "7");
        assert_eq!(p.stripe_payment_intent_id, Col::Unknown);
    }

    #[test]
    fn toast_placeholder_is_unknown() {
        let ev = dec(r#"{"op":"u","after":{"id":"a","idempotency_key":"__debezium_unavailable_value","amount":"E4c=","currency":"usd","status":"pending","stripe_payment_intent_id":"__debezium_unavailable_value"}}"#).unwrap();
        let p = ev.payment.unwrap();
        assert_eq!(p.idempotency_key, Col::Unknown);
        assert_eq!(p.stripe_payment_intent_id, Col::Unknown);
        assert_eq!(p.amount, Col::Set("49.99".into()));
        assert_eq!(ev.after.unwrap()["idempotency_key"], TOAST_PLACEHOLDER);
    }

    #[test]
    fn errors_name_the_problem() {
        assert_eq!(
            dec("{not json").unwrap_err().kind,
            DecodeErrorKind::InvalidJson
        );
        assert_eq!(
            dec("[1]").unwrap_err().kind,
            DecodeErrorKind::UnexpectedShape
        );
        assert_eq!(
            dec(r#"{"op":"x"}"#).unwrap_err().kind,
            DecodeErrorKind::UnknownOp
        );
        let e = dec(
            r#"{"op":"c","after":{"id":1,"amount":"E4c=","currency":"usd","status":"pending"}}"#,
        )
        .unwrap_err();
        assert_eq!(e.kind, DecodeErrorKind::MissingColumn);
        assert!(e.detail.contains("idempotency_key"), "{e}");
        let e = dec(r#"{"op":"c","after":{"id":1,"idempotency_key":"k","amount":"!!!!","currency":"usd","status":"pending"}}"#).unwrap_err();
        assert_eq!(e.kind, DecodeErrorKind::BadDecimal);
        assert_eq!(
            decode_value(Some(&[0xff, 0xfe]), &DecodeOptions::default())
                .unwrap_err()
                .kind,
            DecodeErrorKind::NotUtf8
        );
    }

    #[test]
    fn configured_column_names_are_used() {
        let mut opts = DecodeOptions::default();
        opts.columns.id = "payment_id".into();
        opts.columns.amount = "amount_minor".into();
        let ev = decode_value(
            Some(br#"{"op":"r","after":{"payment_id":"p1","idempotency_key":"k","amount_minor":"10.5","currency":"eur","status":"pending"}}"#),
            &opts,
        )
        .unwrap();
        let p = ev.payment.unwrap();
        assert_eq!((p.id.as_str(), p.amount), ("p1", Col::Set("10.5".into())));
        assert_eq!(decode_key(br#"{"payment_id":"p1"}"#, &opts).unwrap(), "p1");
    }

    #[test]
    fn keys_decode_with_and_without_schema() {
        let o = DecodeOptions::default();
        assert_eq!(decode_key(br#"{"id":42}"#, &o).unwrap(), "42");
        assert_eq!(
            decode_key(
                br#"{"schema":{"type":"struct"},"payload":{"id":"u-1"}}"#,
                &o
            )
            .unwrap(),
            "u-1"
        );
        assert!(decode_key(b"null", &o).is_err());
    }
}
