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
//!   the row and is [`Col::Unknown`](crate::change::Col::Unknown) in the [`Payment`](crate::change::Payment), meaning "the old value still stands".
//!
//! Decoding never panics and never guesses past what it can prove: anything else is a
//! [`DecodeError`] the daemon sends to the dead-letter topic.

pub mod avro;
mod columns;
mod envelope;
mod fast;
pub mod pgoutput;
pub mod registry;

use std::collections::BTreeMap;
use std::sync::Arc;

use serde_json::value::RawValue;

use crate::change::{ChangeEvent, Op, SourceInfo};
use columns::{converts_type, id_string, missing, normalize_col, payment_from};
use envelope::{decode_payload, parse_obj, raw_value, struct_fields};

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
    use crate::change::Col;

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
