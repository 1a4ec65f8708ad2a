//! Event files for `replay` and the benchmarks: Debezium message values (PostgreSQL connector,
//! default envelope as Debezium 2.x writes it, one per line) for N payments, about 570 bytes a
//! line with schemas off.
//!
//! Each payment lives through: a create (pending, no intent yet), an update setting the intent,
//! a pending update, then the final update (succeeded, failed or canceled) and one more update
//! of the final row; a share of payments is deleted instead (a delete, then a tombstone line).
//! A share stays pending: create and two pending updates only. Lifecycles of `in_flight`
//! payments are interleaved at random, as concurrent transactions commit.
//!
//! A tombstone is the word `null` on its line, as `kcat` and the console consumer print a Kafka
//! null value.

use std::io::{self, Write};

use base64::Engine;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// How the connector writes the amount (`decimal.handling.mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DecimalMode {
    /// Connect Decimal bytes, base64 (the default mode).
    Precise,
    /// A decimal string.
    String,
    /// A JSON number (what the double mode writes; read from its text, never as a float).
    Double,
}

/// What to generate.
#[derive(Debug, Clone, clap::Args)]
pub struct GenSpec {
    /// Number of payments.
    #[arg(long, default_value_t = 200_000)]
    pub payments: u64,
    /// Share of payments still pending at the end of the file.
    #[arg(long, default_value_t = 0.02)]
    pub pending_fraction: f64,
    /// Share of resolved payments that are deleted (delete + tombstone) after their final update.
    #[arg(long, default_value_t = 0.05)]
    pub delete_fraction: f64,
    /// Payments whose events are interleaved at any moment. Small: a payment's events are close
    /// together (most never outlive a checkpoint). Large: they spread over the file.
    #[arg(long, default_value_t = 10_000)]
    pub in_flight: usize,
    /// Wrap every value in the JSON converter's schema (`schemas.enable=true`).
    #[arg(long)]
    pub schemas: bool,
    #[arg(long, value_enum, default_value_t = DecimalMode::Precise)]
    pub decimal: DecimalMode,
    /// Seed of the generator: the same seed gives the same file.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
}

/// What a generated file holds.
#[derive(Debug, Default, Clone, PartialEq, Eq, serde::Serialize)]
pub struct GenSummary {
    pub lines: u64,
    pub bytes: u64,
    pub payments: u64,
    /// Payments pending at the end of the file.
    pub pending: u64,
}

const SCHEMA_TEMPLATE: &str = include_str!("envelope-schema.json.tmpl");

struct Life {
    n: u64,
    step: u8,
    stays_pending: bool,
    deleted: bool,
    final_status: &'static str,
    cents: u64,
}

/// Steps of a lifecycle: 0 create, 1 intent set, 2 pending update, 3 final, 4 final touch or
/// delete, 5 tombstone (after a delete).
fn steps(l: &Life) -> u8 {
    match (l.stays_pending, l.deleted) {
        (true, _) => 3,
        (false, true) => 6,
        (false, false) => 5,
    }
}

/// Writes the file; returns what it holds.
pub fn generate(spec: &GenSpec, out: &mut impl Write) -> io::Result<GenSummary> {
    let mut rng = StdRng::seed_from_u64(spec.seed);
    let schema = match spec.decimal {
        DecimalMode::Precise => None,
        DecimalMode::String => Some(r#"{"type":"string","optional":false,"field":"amount"}"#),
        DecimalMode::Double => Some(r#"{"type":"double","optional":false,"field":"amount"}"#),
    }
    .unwrap_or(r#"{"type":"bytes","optional":false,"name":"org.apache.kafka.connect.data.Decimal","version":1,"parameters":{"scale":"2","connect.decimal.precision":"12"},"field":"amount"}"#);
    let schema = SCHEMA_TEMPLATE.trim().replace("{AMOUNT}", schema);
    let mut sum = GenSummary::default();
    let mut live: Vec<Life> = Vec::with_capacity(spec.in_flight.max(1));
    let mut started = 0u64;
    // Database-side clock and log position, advancing per event.
    let mut ts_ms: u64 = 1_714_566_896_790;
    let mut lsn: u64 = 27_592_960;
    let mut tx: u64 = 771;
    let mut line = String::with_capacity(4096 + schema.len());
    loop {
        while live.len() < spec.in_flight.max(1) && started < spec.payments {
            let roll: f64 = rng.gen();
            live.push(Life {
                n: started,
                step: 0,
                stays_pending: rng.gen::<f64>() < spec.pending_fraction,
                deleted: rng.gen::<f64>() < spec.delete_fraction,
                final_status: if roll < 0.85 {
                    "succeeded"
                } else if roll < 0.95 {
                    "failed"
                } else {
                    "canceled"
                },
                cents: rng.gen_range(50..5_000_000),
            });
            started += 1;
        }
        if live.is_empty() {
            break;
        }
        let i = rng.gen_range(0..live.len());
        ts_ms += rng.gen_range(0..3);
        lsn += 160;
        tx += 1;
        line.clear();
        let l = &live[i];
        write_event(&mut line, l, spec, &schema, ts_ms, lsn, tx);
        line.push('\n');
        out.write_all(line.as_bytes())?;
        sum.lines += 1;
        sum.bytes += line.len() as u64;
        let l = &mut live[i];
        l.step += 1;
        if l.step >= steps(l) {
            sum.payments += 1;
            sum.pending += u64::from(l.stays_pending);
            live.swap_remove(i);
        }
    }
    out.flush()?;
    Ok(sum)
}

/// A UUID-shaped id, unique per payment number.
fn payment_id(n: u64) -> String {
    let h = n.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0x3f9c_1d6e_8a41_4c7b;
    format!(
        "{:08x}-{:04x}-4{:03x}-9{:03x}-{:012x}",
        (h >> 32) as u32,
        (h >> 16) as u16,
        h as u16 & 0xfff,
        (n >> 48) as u16 & 0xfff,
        n & 0xffff_ffff_ffff
    )
}

fn amount_json(cents: u64, mode: DecimalMode) -> String {
    match mode {
        DecimalMode::Precise => {
            // Connect Decimal: big-endian two's complement of the unscaled value, shortest form.
            let b = (cents as i64).to_be_bytes();
            let skip = b
                .iter()
                .zip(b.iter().skip(1))
                .take_while(|(x, next)| **x == 0 && **next & 0x80 == 0)
                .count();
            format!(
                "\"{}\"",
                base64::engine::general_purpose::STANDARD.encode(&b[skip..])
            )
        }
        DecimalMode::String => format!("\"{}.{:02}\"", cents / 100, cents % 100),
        DecimalMode::Double => format!("{}.{:02}", cents / 100, cents % 100),
    }
}

fn write_event(
    out: &mut String,
    l: &Life,
    spec: &GenSpec,
    schema: &str,
    ts_ms: u64,
    lsn: u64,
    tx: u64,
) {
    use std::fmt::Write as _;
    let id = payment_id(l.n);
    if l.step == 5 {
        out.push_str("null");
        return;
    }
    let (op, status) = match l.step {
        0 => ("c", "pending"),
        1 | 2 => ("u", "pending"),
        3 => ("u", l.final_status),
        _ if l.deleted => ("d", l.final_status),
        _ => ("u", l.final_status),
    };
    let intent = if l.step == 0 {
        "null".to_string()
    } else {
        format!("\"pi_3PBq{:020x}\"", l.n.wrapping_mul(2_654_435_761))
    };
    let created = chrono::DateTime::from_timestamp_millis((ts_ms - 1000) as i64)
        .unwrap_or_default()
        .format("%Y-%m-%dT%H:%M:%S%.6fZ");
    let updated = chrono::DateTime::from_timestamp_millis(ts_ms as i64)
        .unwrap_or_default()
        .format("%Y-%m-%dT%H:%M:%S%.6fZ");
    let row = format!(
        r#"{{"id":"{id}","idempotency_key":"order-{n}-attempt-1","amount":{amount},"currency":"usd","status":"{status}","stripe_payment_intent_id":{intent},"created_at":"{created}","updated_at":"{updated}"}}"#,
        n = l.n,
        amount = amount_json(l.cents, spec.decimal),
    );
    let (before, after) = if op == "d" {
        (row.as_str(), "null")
    } else {
        ("null", row.as_str())
    };
    if spec.schemas {
        let _ = write!(out, r#"{{"schema":{schema},"payload":"#);
    }
    let _ = write!(
        out,
        r#"{{"before":{before},"after":{after},"source":{{"version":"3.0.0.Final","connector":"postgresql","name":"paysvc","ts_ms":{ts_ms},"snapshot":"false","db":"payments","sequence":"[\"{prev}\",\"{lsn}\"]","schema":"public","table":"payments","txId":{tx},"lsn":{lsn},"xmin":null}},"transaction":null,"op":"{op}","ts_ms":{done}}}"#,
        prev = lsn - 160,
        done = ts_ms + 200,
    );
    if spec.schemas {
        out.push('}');
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::change::{Col, Op};
    use crate::decode::{decode_value, DecodeOptions};

    fn spec(decimal: DecimalMode, schemas: bool) -> GenSpec {
        GenSpec {
            payments: 300,
            pending_fraction: 0.1,
            delete_fraction: 0.2,
            in_flight: 50,
            schemas,
            decimal,
            seed: 7,
        }
    }

    /// Every generated line decodes, amounts come out exact in every mode, and the pending
    /// count the generator reports is what applying the file's final statuses leaves.
    #[test]
    fn generated_events_decode_exactly() {
        let mut by_mode = Vec::new();
        for (mode, schemas) in [
            (DecimalMode::Precise, false),
            (DecimalMode::Precise, true),
            (DecimalMode::String, true),
            (DecimalMode::Double, false),
        ] {
            let mut buf = Vec::new();
            let sum = generate(&spec(mode, schemas), &mut buf).unwrap();
            let again = generate(&spec(mode, schemas), &mut Vec::new()).unwrap();
            assert_eq!(sum, again, "same seed, same file");
            assert_eq!(sum.payments, 300);
            assert!(sum.pending > 10 && sum.pending < 60, "{sum:?}");
            let mut status = std::collections::HashMap::new();
            let mut amounts = std::collections::BTreeMap::new();
            for line in buf.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
                let value = (line != b"null").then_some(line);
                let ev = decode_value(value, &DecodeOptions::default())
                    .unwrap_or_else(|e| panic!("{mode:?}: {e:?}"));
                let Some(p) = ev.payment else {
                    assert_eq!(ev.op, Op::Tombstone);
                    continue;
                };
                if ev.op == Op::Delete {
                    status.remove(&p.id);
                    continue;
                }
                let Col::Set(amount) = &p.amount else {
                    panic!("amount unknown")
                };
                let (units, cents) = amount.split_once('.').expect("two decimals");
                assert!(units.parse::<u64>().is_ok() && cents.len() == 2, "{amount}");
                amounts.insert(p.id.clone(), amount.clone());
                let Col::Set(s) = p.status else {
                    panic!("status unknown")
                };
                status.insert(p.id, s);
            }
            let pending = status.values().filter(|s| *s == "pending").count() as u64;
            assert_eq!(pending, sum.pending, "{mode:?}");
            by_mode.push(amounts);
        }
        // Every mode writes the same amounts (same seed), and each decodes to the same decimal.
        assert!(by_mode.windows(2).all(|w| w[0] == w[1]));
    }
}
