//! The change-event model: what one row change of the payments table means to paystream,
//! whichever source it came from (Debezium JSON or Avro, pgoutput, a replay file) and whichever
//! part reads it (state, inspection, the poller). A leaf: it knows no other module, so every
//! decoder builds it and every consumer reads it without knowing how it was encoded.

pub mod decimal;

use serde::Serialize;
use serde_json::{Map, Value};

pub use decimal::Decimal;

/// What a change event did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Op {
    #[serde(rename = "c")]
    Create,
    #[serde(rename = "u")]
    Update,
    #[serde(rename = "d")]
    Delete,
    /// A snapshot read (any `source.snapshot` value).
    #[serde(rename = "r")]
    Read,
    #[serde(rename = "t")]
    Truncate,
    /// A logical decoding message (`pg_logical_emit_message`).
    #[serde(rename = "m")]
    Message,
    #[serde(rename = "tombstone")]
    Tombstone,
    #[serde(rename = "heartbeat")]
    Heartbeat,
    #[serde(rename = "transaction")]
    Transaction,
}

impl Op {
    pub fn as_str(self) -> &'static str {
        match self {
            Op::Create => "c",
            Op::Update => "u",
            Op::Delete => "d",
            Op::Read => "r",
            Op::Truncate => "t",
            Op::Message => "m",
            Op::Tombstone => "tombstone",
            Op::Heartbeat => "heartbeat",
            Op::Transaction => "transaction",
        }
    }
}

/// Where in the source database the change came from.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct SourceInfo {
    pub lsn: Option<i64>,
    #[serde(rename = "txId")]
    pub tx_id: Option<i64>,
    pub ts_ms: Option<i64>,
    pub snapshot: Option<String>,
}

/// A column of a [`Payment`] as far as this event knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Col<T> {
    Set(T),
    /// Not carried by this event: a TOASTed value Debezium did not resend, or the filler of a
    /// delete's `before` (only the key is real there). The previous value still stands.
    Unknown,
}

impl<T> Col<T> {
    pub fn is_unknown(&self) -> bool {
        matches!(self, Col::Unknown)
    }
}

impl<T: Serialize> Serialize for Col<T> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Col::Set(v) => v.serialize(s),
            // Never reached through Payment: unknown columns are skipped there.
            Col::Unknown => s.serialize_none(),
        }
    }
}

/// The payment a change event is about, mapped from the configured columns. In JSON, a column
/// this event does not carry is left out; a SQL NULL is `null`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Payment {
    pub id: String,
    #[serde(skip_serializing_if = "Col::is_unknown")]
    pub idempotency_key: Col<String>,
    /// Exact decimal string, e.g. `"1234567.89"`.
    #[serde(skip_serializing_if = "Col::is_unknown")]
    pub amount: Col<String>,
    #[serde(skip_serializing_if = "Col::is_unknown")]
    pub currency: Col<String>,
    #[serde(skip_serializing_if = "Col::is_unknown")]
    pub status: Col<String>,
    #[serde(skip_serializing_if = "Col::is_unknown")]
    pub stripe_payment_intent_id: Col<Option<String>>,
    #[serde(skip_serializing_if = "Col::is_unknown")]
    pub created_at: Col<Option<String>>,
    #[serde(skip_serializing_if = "Col::is_unknown")]
    pub updated_at: Col<Option<String>>,
    /// Stripe Connect: the payment's connected account (`--account-column`).
    #[serde(skip_serializing_if = "Col::is_unknown")]
    pub account: Col<Option<String>>,
}

/// A decoded Debezium message value.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ChangeEvent {
    pub op: Op,
    pub table: Option<String>,
    /// The old row. For a delete under `REPLICA IDENTITY DEFAULT` only the key column: Postgres
    /// sends just the key, and Debezium fills the other NOT NULL columns with stand-ins (`""`,
    /// 0, the column default, 1970 timestamps) that are not the row's data, so they are dropped
    /// here (see `key_only_image`).
    pub before: Option<Map<String, Value>>,
    pub after: Option<Map<String, Value>>,
    pub payment: Option<Payment>,
    pub source: SourceInfo,
}

impl ChangeEvent {
    /// An event with no rows yet: the decoder fills in what the record carries.
    pub fn bare(op: Op) -> Self {
        ChangeEvent {
            op,
            table: None,
            before: None,
            after: None,
            payment: None,
            source: SourceInfo::default(),
        }
    }
}
