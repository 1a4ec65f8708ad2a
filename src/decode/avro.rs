//! Debezium's Avro (Confluent AvroConverter) → the same [`ChangeEvent`](super::ChangeEvent) as its JSON.
//!
//! A message is the Confluent wire format: byte 0x00, the writer schema's registry id (4 bytes,
//! big-endian), then the Avro binary datum. The writer schema comes from the schema registry
//! ([`super::registry`]); apache-avro decodes the datum with it.
//!
//! The datum is then turned into exactly what Debezium's JSON converter with schemas on would
//! have written for the same row, `{"schema": …, "payload": …}`, and handed to
//! [`super::decode_value`]: one normalization for both formats, so a payment reads the same
//! whichever converter the connector runs (the golden tests compare the two). The Connect
//! schema is rebuilt from the Avro schema's JSON, which keeps what AvroData wrote beside the
//! Avro types: `connect.name` (the logical type: Decimal, VariableScaleDecimal, MicroTimestamp,
//! ZonedTimestamp…) and `connect.parameters` (a Decimal's scale). apache-avro's parsed
//! [`Schema`] drops those properties on primitive types, hence the second walk.
//!
//! Schema evolution needs nothing here: each message is read with its own writer schema (the
//! registry id in it), so a later schema id with a new optional column decodes as soon as it
//! appears, and unknown columns are ignored downstream as in JSON.

use std::collections::HashMap;

use apache_avro::types::Value as Avro;
use apache_avro::Schema;
use base64::Engine;
use serde_json::{json, Map, Value};

use super::{err, DecodeError, DecodeErrorKind};

/// The Confluent wire format's first byte.
pub const MAGIC: u8 = 0;

/// A registered writer schema: apache-avro's, for the binary, and the Connect schema rebuilt
/// from its JSON, for normalization.
#[derive(Debug)]
pub struct WriterSchema {
    pub avro: Schema,
    pub connect: Value,
}

impl WriterSchema {
    /// Parses a schema as the registry returns it (the Avro schema's JSON text).
    pub fn parse(text: &str) -> Result<WriterSchema, String> {
        let avro = Schema::parse_str(text).map_err(|e| e.to_string())?;
        let json: Value = serde_json::from_str(text).map_err(|e| e.to_string())?;
        let connect = connect_schema(&json, &mut HashMap::new(), None);
        Ok(WriterSchema { avro, connect })
    }
}

/// Splits a Confluent wire-format message into its schema id and Avro body.
pub fn split_wire(bytes: &[u8]) -> Result<(u32, &[u8]), DecodeError> {
    match bytes {
        [MAGIC, a, b, c, d, body @ ..] => Ok((u32::from_be_bytes([*a, *b, *c, *d]), body)),
        [MAGIC, ..] => Err(err(
            DecodeErrorKind::InvalidAvro,
            format!(
                "{} bytes: too short for the Confluent wire format (0x00, 4-byte schema id, datum)",
                bytes.len()
            ),
        )),
        _ => Err(err(
            DecodeErrorKind::InvalidAvro,
            "not the Confluent Avro wire format (the first byte is not 0x00)",
        )),
    }
}

/// Decodes an Avro body with its writer schema into the JSON-converter form
/// `{"schema": …, "payload": …}`, as bytes for [`super::decode_value`] / [`super::decode_key`].
pub fn to_connect_json(body: &[u8], schema: &WriterSchema) -> Result<Vec<u8>, DecodeError> {
    let datum = read_datum(body, schema)?;
    let doc = json!({"schema": schema.connect, "payload": to_json(&datum)?});
    Ok(serde_json::to_vec(&doc).expect("JSON values serialize"))
}

/// Reads one Avro body with its writer schema; bytes left over mean a wrong schema or a
/// damaged message.
pub fn read_datum(body: &[u8], schema: &WriterSchema) -> Result<Avro, DecodeError> {
    let mut reader = body;
    let datum = apache_avro::from_avro_datum(&schema.avro, &mut reader, None)
        .map_err(|e| err(DecodeErrorKind::InvalidAvro, format!("Avro datum: {e}")))?;
    if !reader.is_empty() {
        return Err(err(
            DecodeErrorKind::InvalidAvro,
            format!("{} bytes left after the Avro datum", reader.len()),
        ));
    }
    Ok(datum)
}

/// An Avro datum as the Connect JSON converter writes the same value: bytes and decimals as
/// base64 of the same two's-complement bytes, unions as their branch, enums as their symbol.
pub fn to_json(v: &Avro) -> Result<Value, DecodeError> {
    let b64 = |b: &[u8]| Value::String(base64::engine::general_purpose::STANDARD.encode(b));
    Ok(match v {
        Avro::Null => Value::Null,
        Avro::Boolean(b) => Value::Bool(*b),
        Avro::Int(n) | Avro::Date(n) | Avro::TimeMillis(n) => json!(n),
        Avro::Long(n)
        | Avro::TimeMicros(n)
        | Avro::TimestampMillis(n)
        | Avro::TimestampMicros(n)
        | Avro::TimestampNanos(n)
        | Avro::LocalTimestampMillis(n)
        | Avro::LocalTimestampMicros(n)
        | Avro::LocalTimestampNanos(n) => json!(n),
        // Floats only where the connector itself wrote floats (decimal.handling.mode=double:
        // already lossy at the source); serde_json prints the shortest text that reads back.
        Avro::Float(f) => json!(f),
        Avro::Double(f) => json!(f),
        Avro::Bytes(b) | Avro::Fixed(_, b) => b64(b),
        Avro::String(s) | Avro::Enum(_, s) => Value::String(s.clone()),
        Avro::Uuid(u) => Value::String(u.to_string()),
        Avro::Union(_, inner) => to_json(inner)?,
        Avro::Array(items) => Value::Array(items.iter().map(to_json).collect::<Result<_, _>>()?),
        Avro::Map(m) => Value::Object(
            m.iter()
                .map(|(k, v)| Ok((k.clone(), to_json(v)?)))
                .collect::<Result<Map<_, _>, DecodeError>>()?,
        ),
        Avro::Record(fields) => Value::Object(
            fields
                .iter()
                .map(|(k, v)| Ok((k.clone(), to_json(v)?)))
                .collect::<Result<Map<_, _>, DecodeError>>()?,
        ),
        Avro::Decimal(d) => b64(&Vec::<u8>::try_from(d)
            .map_err(|e| err(DecodeErrorKind::BadDecimal, format!("Avro decimal: {e}")))?),
        Avro::BigDecimal(d) => Value::String(d.to_string()),
        Avro::Duration(_) => {
            return Err(err(
                DecodeErrorKind::InvalidAvro,
                "Avro duration values are not used by Debezium",
            ))
        }
    })
}

/// The Connect type name of an Avro primitive.
fn connect_primitive(avro: &str) -> Option<&'static str> {
    Some(match avro {
        "null" => "null",
        "boolean" => "boolean",
        "int" => "int32",
        "long" => "int64",
        "float" => "float32",
        "double" => "float64",
        "bytes" | "fixed" => "bytes",
        "string" | "enum" => "string",
        _ => return None,
    })
}

/// The full name of a named type declared (or referenced) in namespace `ns`.
fn full_name(name: &str, ns: Option<&str>) -> String {
    match ns {
        Some(ns) if !name.contains('.') && !ns.is_empty() => format!("{ns}.{name}"),
        _ => name.to_string(),
    }
}

/// Rebuilds the Connect schema (as the JSON converter prints it) of an Avro schema's JSON.
/// `named` holds the record/enum/fixed types seen so far, for later references by name.
fn connect_schema(avro: &Value, named: &mut HashMap<String, Value>, ns: Option<&str>) -> Value {
    match avro {
        Value::String(name) => match connect_primitive(name) {
            Some(t) => json!({"type": t}),
            None => named
                .get(&full_name(name, ns))
                .or_else(|| named.get(name))
                .cloned()
                .unwrap_or_else(|| json!({"type": "unknown", "name": name})),
        },
        // A union: Debezium writes ["null", T] for an optional column.
        Value::Array(branches) => {
            let non_null: Vec<&Value> = branches
                .iter()
                .filter(|b| b.as_str() != Some("null"))
                .collect();
            match non_null.as_slice() {
                [one] => {
                    let mut s = connect_schema(one, named, ns);
                    if let Some(o) = s.as_object_mut() {
                        o.insert("optional".into(), Value::Bool(true));
                    }
                    s
                }
                _ => json!({"type": "union"}),
            }
        }
        Value::Object(o) => {
            let ty = o.get("type").cloned().unwrap_or(Value::Null);
            let own_ns = o.get("namespace").and_then(Value::as_str).or(ns);
            let mut s = match ty.as_str() {
                Some("record") => {
                    let name =
                        full_name(o.get("name").and_then(Value::as_str).unwrap_or(""), own_ns);
                    let record_ns = name.rsplit_once('.').map(|(n, _)| n.to_string());
                    let fields: Vec<Value> = o
                        .get("fields")
                        .and_then(Value::as_array)
                        .map(|fs| {
                            fs.iter()
                                .map(|f| {
                                    let mut fs = connect_schema(
                                        f.get("type").unwrap_or(&Value::Null),
                                        named,
                                        record_ns.as_deref(),
                                    );
                                    if let Some(fo) = fs.as_object_mut() {
                                        fo.insert(
                                            "field".into(),
                                            f.get("name").cloned().unwrap_or(Value::Null),
                                        );
                                    }
                                    fs
                                })
                                .collect()
                        })
                        .unwrap_or_default();
                    let s = json!({"type": "struct", "name": name, "fields": fields});
                    named.insert(name, s.clone());
                    s
                }
                Some(t @ ("enum" | "fixed")) => {
                    let name =
                        full_name(o.get("name").and_then(Value::as_str).unwrap_or(""), own_ns);
                    let s = json!({"type": connect_primitive(t).expect("enum and fixed map")});
                    named.insert(name, s.clone());
                    s
                }
                Some("array") => json!({"type": "array"}),
                Some("map") => json!({"type": "map"}),
                // A primitive with properties, or a nested type definition.
                _ => connect_schema(&ty, named, own_ns),
            };
            let so = s.as_object_mut().expect("connect schemas are objects");
            // AvroData's own record of the Connect type: the logical name and its parameters.
            if let Some(name) = o.get("connect.name") {
                so.insert("name".into(), name.clone());
            }
            let mut params = o
                .get("connect.parameters")
                .and_then(Value::as_object)
                .cloned()
                .unwrap_or_default();
            if o.get("logicalType").and_then(Value::as_str) == Some("decimal") {
                so.entry("name")
                    .or_insert_with(|| json!("org.apache.kafka.connect.data.Decimal"));
                if let Some(scale) = o.get("scale").and_then(Value::as_u64) {
                    params
                        .entry("scale")
                        .or_insert_with(|| json!(scale.to_string()));
                }
            }
            if !params.is_empty() {
                so.insert("parameters".into(), Value::Object(params));
            }
            s
        }
        _ => json!({"type": "unknown"}),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_format_is_checked() {
        assert_eq!(
            split_wire(&[0, 0, 0, 1, 7, 42]).unwrap(),
            (263, &[42u8][..])
        );
        assert_eq!(
            split_wire(&[0, 0, 1]).unwrap_err().kind,
            DecodeErrorKind::InvalidAvro
        );
        assert!(split_wire(b"{}").unwrap_err().detail.contains("0x00"));
    }

    #[test]
    fn connect_schema_keeps_logical_names_scales_and_optionality() {
        let s = WriterSchema::parse(
            r#"{"type":"record","name":"Value","namespace":"p.public.payments","fields":[
                {"name":"id","type":"long"},
                {"name":"amount","type":{"type":"bytes","scale":2,"precision":12,"connect.version":1,
                  "connect.parameters":{"scale":"2","connect.decimal.precision":"12"},
                  "connect.name":"org.apache.kafka.connect.data.Decimal","logicalType":"decimal"}},
                {"name":"created_at","type":{"type":"string","connect.version":1,"connect.name":"io.debezium.time.ZonedTimestamp"}},
                {"name":"note","type":["null","string"],"default":null}]}"#,
        )
        .unwrap();
        let fields = s.connect["fields"].as_array().unwrap();
        assert_eq!(fields[0], json!({"type": "int64", "field": "id"}));
        assert_eq!(fields[1]["name"], "org.apache.kafka.connect.data.Decimal");
        assert_eq!(fields[1]["parameters"]["scale"], "2");
        assert_eq!(fields[2]["name"], "io.debezium.time.ZonedTimestamp");
        assert_eq!(
            fields[3],
            json!({"type": "string", "optional": true, "field": "note"})
        );
        assert_eq!(s.connect["name"], "p.public.payments.Value");
    }

    #[test]
    fn named_types_are_resolved_where_referenced() {
        let s = WriterSchema::parse(
            r#"{"type":"record","name":"Envelope","namespace":"p.public.payments","fields":[
                {"name":"before","type":["null",{"type":"record","name":"Value","fields":[{"name":"id","type":"long"}]}],"default":null},
                {"name":"after","type":["null","Value"],"default":null},
                {"name":"op","type":"string"}]}"#,
        )
        .unwrap();
        let f = s.connect["fields"].as_array().unwrap();
        assert_eq!(f[1]["name"], "p.public.payments.Value");
        assert_eq!(f[1]["fields"][0]["field"], "id");
        assert_eq!(f[1]["optional"], true);
    }

    /// A NUMERIC column without precision (VariableScaleDecimal, a record of scale + bytes) and
    /// an Avro enum, through the whole Avro path to the normalized row.
    #[test]
    fn variable_scale_decimals_and_enums_normalize_like_json() {
        let s = WriterSchema::parse(
            r#"{"type":"record","name":"Envelope","namespace":"p.public.payments","fields":[
                {"name":"after","type":["null",{"type":"record","name":"Value","fields":[
                  {"name":"id","type":"long"},
                  {"name":"idempotency_key","type":"string"},
                  {"name":"amount","type":{"type":"record","name":"VariableScaleDecimal","namespace":"io.debezium.data",
                    "fields":[{"name":"scale","type":"int"},{"name":"value","type":"bytes"}],
                    "connect.name":"io.debezium.data.VariableScaleDecimal"}},
                  {"name":"currency","type":"string"},
                  {"name":"status","type":{"type":"enum","name":"status","symbols":["pending","succeeded"]}}]}],"default":null},
                {"name":"op","type":"string"}]}"#,
        )
        .unwrap();
        let row = Avro::Record(vec![
            ("id".into(), Avro::Long(5)),
            ("idempotency_key".into(), Avro::String("k".into())),
            (
                "amount".into(),
                Avro::Record(vec![
                    ("scale".into(), Avro::Int(2)),
                    ("value".into(), Avro::Bytes(vec![0x07, 0x5b, 0xcd, 0x15])),
                ]),
            ),
            ("currency".into(), Avro::String("usd".into())),
            ("status".into(), Avro::Enum(0, "pending".into())),
        ]);
        let v = Avro::Record(vec![
            ("after".into(), Avro::Union(1, Box::new(row))),
            ("op".into(), Avro::String("c".into())),
        ]);
        let body = apache_avro::to_avro_datum(&s.avro, v).unwrap();
        let json = to_connect_json(&body, &s).unwrap();
        let ev = super::super::decode_value(Some(&json), &Default::default()).unwrap();
        let p = ev.payment.unwrap();
        assert_eq!(p.amount, crate::change::Col::Set("1234567.89".into()));
        assert_eq!(p.status, crate::change::Col::Set("pending".into()));
        assert_eq!(p.id, "5");
    }

    #[test]
    fn decimals_become_the_same_base64_bytes_as_in_json() {
        let d = Avro::Decimal(apache_avro::Decimal::from(vec![0x13, 0x87]));
        assert_eq!(to_json(&d).unwrap(), json!("E4c="));
        let neg = Avro::Decimal(apache_avro::Decimal::from(vec![0xec, 0x79]));
        assert_eq!(to_json(&neg).unwrap(), json!("7Hk="));
    }
}
