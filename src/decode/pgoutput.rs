//! Postgres' `pgoutput` logical decoding messages (protocol version 1, text format) → the same
//! [`ChangeEvent`]s the Debezium decoder gives state (embedded mode, `--source postgres`).
//!
//! The replication client ([`pgwire_replication`]) turns Begin and Commit into events of their
//! own; every other message arrives here as the bytes of one `XLogData`. Relation messages
//! describe a table's columns before its first row change in a session (and again after a
//! schema change); row messages refer to them by relation id, so [`PgOutput`] keeps them.
//!
//! Each row goes through `decode::payment_from`, the mapping the Debezium decoder uses, so a
//! row means the same payment whichever way it arrived. Values are the server's text output,
//! which is exact for NUMERIC; the replication session pins `DateStyle=ISO` and `TimeZone=UTC`
//! so timestamps read the same on every server, and they are written as RFC 3339 like
//! Debezium's. An unchanged TOASTed value (`'u'`) becomes the unavailable-value placeholder,
//! hence a column this event does not know, as Debezium's placeholder does.

use std::collections::HashMap;

use serde_json::Value;

use super::{err, payment_from, ChangeEvent, DecodeError, DecodeErrorKind, DecodeOptions, Op};

/// Type oids whose text paystream rewrites (everything else stays as the server wrote it).
const TIMESTAMP_OID: u32 = 1114;
const TIMESTAMPTZ_OID: u32 = 1184;

/// One column value of a tuple.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cell {
    Null,
    /// An unchanged TOASTed value the server did not resend.
    Unchanged,
    Text(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Column {
    pub name: String,
    pub type_oid: u32,
}

/// A table as a Relation message describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Relation {
    pub id: u32,
    pub namespace: String,
    pub name: String,
    pub columns: Vec<Column>,
}

/// One parsed pgoutput message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    Relation(Relation),
    Insert {
        relation: u32,
        new: Vec<Cell>,
    },
    /// `old` is the replica identity's old key (`K`, when the key changed) or, with REPLICA
    /// IDENTITY FULL, the whole old row (`O`).
    Update {
        relation: u32,
        old: Option<Vec<Cell>>,
        new: Vec<Cell>,
    },
    Delete {
        relation: u32,
        old: Vec<Cell>,
    },
    Truncate {
        relations: Vec<u32>,
    },
    /// Type, Origin, logical decoding messages and Begin/Commit (handled by the client):
    /// nothing for state.
    Other(u8),
}

fn bad(detail: impl Into<String>) -> DecodeError {
    err(DecodeErrorKind::UnexpectedShape, detail)
}

/// A cursor over one message's bytes; every read checks the length.
struct Reader<'a> {
    b: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.b.len() < n {
            return Err(bad("pgoutput message ends early"));
        }
        let (head, rest) = self.b.split_at(n);
        self.b = rest;
        Ok(head)
    }
    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }
    fn i16(&mut self) -> Result<i16, DecodeError> {
        Ok(i16::from_be_bytes(self.take(2)?.try_into().expect("2")))
    }
    fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_be_bytes(self.take(4)?.try_into().expect("4")))
    }
    fn string(&mut self) -> Result<String, DecodeError> {
        let end = self
            .b
            .iter()
            .position(|&c| c == 0)
            .ok_or_else(|| bad("pgoutput string without its terminator"))?;
        let s = std::str::from_utf8(&self.b[..end])
            .map_err(|e| err(DecodeErrorKind::NotUtf8, e.to_string()))?
            .to_string();
        self.b = &self.b[end + 1..];
        Ok(s)
    }
    fn tuple(&mut self) -> Result<Vec<Cell>, DecodeError> {
        let n = self.i16()?;
        let mut cells = Vec::with_capacity(n.max(0) as usize);
        for _ in 0..n {
            cells.push(match self.u8()? {
                b'n' => Cell::Null,
                b'u' => Cell::Unchanged,
                b't' => {
                    let len = self.u32()? as usize;
                    let bytes = self.take(len)?;
                    Cell::Text(
                        std::str::from_utf8(bytes)
                            .map_err(|e| err(DecodeErrorKind::NotUtf8, e.to_string()))?
                            .to_string(),
                    )
                }
                // Binary output is never requested (the client asks for text).
                b'b' => return Err(bad("binary tuple data (paystream asks for text)")),
                other => return Err(bad(format!("unknown tuple data kind {other:#04x}"))),
            });
        }
        Ok(cells)
    }
}

/// Parses one pgoutput message (protocol version 1).
pub fn parse(data: &[u8]) -> Result<Message, DecodeError> {
    let mut r = Reader { b: data };
    let tag = r.u8()?;
    let msg = match tag {
        b'R' => {
            let id = r.u32()?;
            let namespace = r.string()?;
            let name = r.string()?;
            let _replica_identity = r.u8()?;
            let n = r.i16()?;
            let mut columns = Vec::with_capacity(n.max(0) as usize);
            for _ in 0..n {
                let _flags = r.u8()?;
                let name = r.string()?;
                let type_oid = r.u32()?;
                let _typmod = r.u32()?;
                columns.push(Column { name, type_oid });
            }
            Message::Relation(Relation {
                id,
                // The server writes an empty namespace for pg_catalog.
                namespace: if namespace.is_empty() {
                    "pg_catalog".into()
                } else {
                    namespace
                },
                name,
                columns,
            })
        }
        b'I' => {
            let relation = r.u32()?;
            match r.u8()? {
                b'N' => Message::Insert {
                    relation,
                    new: r.tuple()?,
                },
                other => return Err(bad(format!("insert without a new tuple ({other:#04x})"))),
            }
        }
        b'U' => {
            let relation = r.u32()?;
            let mut kind = r.u8()?;
            let old = if kind == b'K' || kind == b'O' {
                let t = r.tuple()?;
                kind = r.u8()?;
                Some(t)
            } else {
                None
            };
            if kind != b'N' {
                return Err(bad(format!("update without a new tuple ({kind:#04x})")));
            }
            Message::Update {
                relation,
                old,
                new: r.tuple()?,
            }
        }
        b'D' => {
            let relation = r.u32()?;
            match r.u8()? {
                b'K' | b'O' => Message::Delete {
                    relation,
                    old: r.tuple()?,
                },
                other => return Err(bad(format!("delete without an old tuple ({other:#04x})"))),
            }
        }
        b'T' => {
            let n = r.u32()?;
            let _options = r.u8()?;
            let mut relations = Vec::with_capacity(n.min(1024) as usize);
            for _ in 0..n {
                relations.push(r.u32()?);
            }
            Message::Truncate { relations }
        }
        b'Y' | b'O' | b'M' | b'B' | b'C' => Message::Other(tag),
        other => return Err(bad(format!("unknown pgoutput message {other:#04x}"))),
    };
    Ok(msg)
}

/// RFC 3339 in UTC for a timestamp's text (`2024-05-01 12:34:56.789+00`), as Debezium writes
/// times; a text it cannot read (`infinity`) stays as it is.
fn rfc3339(text: &str, with_zone: bool) -> String {
    use chrono::SecondsFormat::AutoSi;
    let t = if with_zone {
        chrono::DateTime::parse_from_str(text, "%Y-%m-%d %H:%M:%S%.f%#z")
            .map(|t| t.with_timezone(&chrono::Utc))
            .ok()
    } else {
        chrono::NaiveDateTime::parse_from_str(text, "%Y-%m-%d %H:%M:%S%.f")
            .map(|t| t.and_utc())
            .ok()
    };
    t.map_or_else(|| text.to_string(), |t| t.to_rfc3339_opts(AutoSi, true))
}

/// Decodes a session's pgoutput messages for one table, remembering its relations.
pub struct PgOutput {
    opts: DecodeOptions,
    schema: String,
    table: String,
    relations: HashMap<u32, Relation>,
}

impl PgOutput {
    /// For `table` (`name` or `schema.name`; `public` when unqualified).
    pub fn new(opts: DecodeOptions, table: &str) -> Self {
        let (schema, table) = table.split_once('.').unwrap_or(("public", table));
        PgOutput {
            opts,
            schema: schema.into(),
            table: table.into(),
            relations: HashMap::new(),
        }
    }

    /// The table's name as events carry it (`schema.name`).
    pub fn table(&self) -> String {
        format!("{}.{}", self.schema, self.table)
    }

    /// The change events one message makes: none (a relation, another table, anything state
    /// does not read), one, or two (an update that changed the key: the old key is deleted and
    /// the new row upserted, as Debezium does).
    pub fn decode(&mut self, data: &[u8]) -> Result<Vec<ChangeEvent>, DecodeError> {
        let mut out = Vec::new();
        match parse(data)? {
            Message::Relation(rel) => {
                self.relations.insert(rel.id, rel);
            }
            Message::Insert { relation, new } => {
                if let Some(rel) = self.ours(relation)? {
                    out.push(self.row_event(Op::Create, rel, &new, true)?);
                }
            }
            Message::Update { relation, old, new } => {
                if let Some(rel) = self.ours(relation)? {
                    let ev = self.row_event(Op::Update, rel, &new, true)?;
                    if let Some(old) = old {
                        let gone = self.row_event(Op::Delete, rel, &old, false)?;
                        let (a, b) = (gone.payment.as_ref(), ev.payment.as_ref());
                        if a.map(|p| &p.id) != b.map(|p| &p.id) {
                            out.push(gone);
                        }
                    }
                    out.push(ev);
                }
            }
            Message::Delete { relation, old } => {
                if let Some(rel) = self.ours(relation)? {
                    out.push(self.row_event(Op::Delete, rel, &old, false)?);
                }
            }
            Message::Truncate { relations } => {
                let ours = relations
                    .iter()
                    .any(|r| self.relations.get(r).is_some_and(|rel| self.is_ours(rel)));
                if ours {
                    let mut ev = ChangeEvent::bare(Op::Truncate);
                    ev.table = Some(self.table());
                    out.push(ev);
                }
            }
            Message::Other(_) => {}
        }
        Ok(out)
    }

    fn is_ours(&self, rel: &Relation) -> bool {
        rel.namespace == self.schema && rel.name == self.table
    }

    /// The relation of a row message if it is the configured table. A row of a relation no
    /// Relation message described is a broken stream (the server always sends it first).
    fn ours(&self, id: u32) -> Result<Option<&Relation>, DecodeError> {
        let rel = self
            .relations
            .get(&id)
            .ok_or_else(|| bad(format!("row of relation {id} before its Relation message")))?;
        Ok(self.is_ours(rel).then_some(rel))
    }

    /// A row as a [`ChangeEvent`]: `full` for a new row, not for a delete's old key.
    pub fn row_event(
        &self,
        op: Op,
        rel: &Relation,
        cells: &[Cell],
        full: bool,
    ) -> Result<ChangeEvent, DecodeError> {
        if cells.len() != rel.columns.len() {
            return Err(bad(format!(
                "tuple of {} columns for {}.{} of {}",
                cells.len(),
                rel.namespace,
                rel.name,
                rel.columns.len()
            )));
        }
        let placeholder = &self.opts.unavailable_placeholder;
        let payment = payment_from(
            |name| {
                let i = rel.columns.iter().position(|c| c.name == name)?;
                Some(match &cells[i] {
                    Cell::Null => Value::Null,
                    Cell::Unchanged => Value::String(placeholder.clone()),
                    Cell::Text(t) => Value::String(match rel.columns[i].type_oid {
                        TIMESTAMPTZ_OID => rfc3339(t, true),
                        TIMESTAMP_OID => rfc3339(t, false),
                        _ => t.clone(),
                    }),
                })
            },
            &self.opts,
            full,
        )?;
        let mut ev = ChangeEvent::bare(op);
        ev.table = Some(self.table());
        ev.payment = Some(payment);
        Ok(ev)
    }

    /// A row read by the initial snapshot (text values by column name, as the simple query
    /// protocol returns them), as Debezium's snapshot `r` event.
    pub fn snapshot_event(
        &self,
        columns: &[Column],
        values: &[Option<&str>],
    ) -> Result<ChangeEvent, DecodeError> {
        let rel = Relation {
            id: 0,
            namespace: self.schema.clone(),
            name: self.table.clone(),
            columns: columns.to_vec(),
        };
        let cells: Vec<Cell> = values
            .iter()
            .map(|v| v.map_or(Cell::Null, |t| Cell::Text(t.to_string())))
            .collect();
        self.row_event(Op::Read, &rel, &cells, true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::change::Col;

    /// pgoutput bytes, written the way the server writes them.
    struct W(Vec<u8>);
    impl W {
        fn new(tag: u8) -> Self {
            W(vec![tag])
        }
        fn u8(mut self, v: u8) -> Self {
            self.0.push(v);
            self
        }
        fn i16(mut self, v: i16) -> Self {
            self.0.extend(v.to_be_bytes());
            self
        }
        fn u32(mut self, v: u32) -> Self {
            self.0.extend(v.to_be_bytes());
            self
        }
        fn s(mut self, v: &str) -> Self {
            self.0.extend(v.as_bytes());
            self.0.push(0);
            self
        }
        fn tuple(mut self, cells: &[Option<&str>]) -> Self {
            self = self.i16(cells.len() as i16);
            for c in cells {
                self = match c {
                    None => self.u8(b'n'),
                    Some("\u{1}") => self.u8(b'u'),
                    Some(t) => {
                        let w = self.u8(b't').u32(t.len() as u32);
                        let mut w = w;
                        w.0.extend(t.as_bytes());
                        w
                    }
                };
            }
            self
        }
    }

    const COLS: [(&str, u32); 8] = [
        ("id", 20),
        ("idempotency_key", 25),
        ("amount", 1700),
        ("currency", 25),
        ("status", 25),
        ("stripe_payment_intent_id", 25),
        ("created_at", TIMESTAMPTZ_OID),
        ("updated_at", TIMESTAMPTZ_OID),
    ];

    fn relation(id: u32, ns: &str, name: &str) -> Vec<u8> {
        let mut w = W::new(b'R').u32(id).s(ns).s(name).u8(b'd').i16(8);
        for (i, (c, oid)) in COLS.iter().enumerate() {
            w = w.u8(u8::from(i == 0)).s(c).u32(*oid).u32(u32::MAX);
        }
        w.0
    }

    fn row(id: &str, amount: &str, status: &str) -> Vec<Option<&'static str>> {
        let leak = |s: &str| -> &'static str { Box::leak(s.to_string().into_boxed_str()) };
        vec![
            Some(leak(id)),
            Some("key-1"),
            Some(leak(amount)),
            Some("usd"),
            Some(leak(status)),
            None,
            Some("2024-05-01 12:34:56.5+00"),
            Some("2024-05-01 12:35:02.123456+00"),
        ]
    }

    fn decoder() -> PgOutput {
        let mut d = PgOutput::new(DecodeOptions::default(), "payments");
        assert!(d
            .decode(&relation(16384, "public", "payments"))
            .unwrap()
            .is_empty());
        d
    }

    #[test]
    fn insert_maps_the_row_exactly() {
        let mut d = decoder();
        let ins = W::new(b'I')
            .u32(16384)
            .u8(b'N')
            .tuple(&row("42", "1234567.89", "pending"));
        let evs = d.decode(&ins.0).unwrap();
        assert_eq!(evs.len(), 1);
        let p = evs[0].payment.as_ref().unwrap();
        assert_eq!(evs[0].op, Op::Create);
        assert_eq!(evs[0].table.as_deref(), Some("public.payments"));
        assert_eq!(p.id, "42");
        // NUMERIC text as the server wrote it: no float on the way.
        assert_eq!(p.amount, Col::Set("1234567.89".into()));
        assert_eq!(p.status, Col::Set("pending".into()));
        assert_eq!(p.stripe_payment_intent_id, Col::Set(None));
        // Debezium's RFC 3339 form: milliseconds kept as three digits, micros as six.
        assert_eq!(
            p.created_at,
            Col::Set(Some("2024-05-01T12:34:56.500Z".into()))
        );
        assert_eq!(
            p.updated_at,
            Col::Set(Some("2024-05-01T12:35:02.123456Z".into()))
        );
    }

    #[test]
    fn update_with_unchanged_toast_and_key_change() {
        let mut d = decoder();
        let mut cells = row("42", "10.00", "succeeded");
        cells[1] = Some("\u{1}"); // unchanged TOASTed idempotency key
        let upd = W::new(b'U').u32(16384).u8(b'N').tuple(&cells);
        let evs = d.decode(&upd.0).unwrap();
        assert_eq!(evs.len(), 1);
        let p = evs[0].payment.as_ref().unwrap();
        assert_eq!(p.idempotency_key, Col::Unknown);
        assert_eq!(p.status, Col::Set("succeeded".into()));

        // The key changed: the old key is deleted, the new row upserted.
        let key: Vec<Option<&str>> = vec![Some("41"), None, None, None, None, None, None, None];
        let upd = W::new(b'U')
            .u32(16384)
            .u8(b'K')
            .tuple(&key)
            .u8(b'N')
            .tuple(&row("42", "10.00", "pending"));
        let evs = d.decode(&upd.0).unwrap();
        assert_eq!(
            evs.iter().map(|e| e.op).collect::<Vec<_>>(),
            [Op::Delete, Op::Update]
        );
        assert_eq!(evs[0].payment.as_ref().unwrap().id, "41");

        // REPLICA IDENTITY FULL sends the whole old row; same key: one update.
        let upd = W::new(b'U')
            .u32(16384)
            .u8(b'O')
            .tuple(&row("42", "10.00", "pending"))
            .u8(b'N')
            .tuple(&row("42", "10.00", "failed"));
        let evs = d.decode(&upd.0).unwrap();
        assert_eq!(evs.len(), 1);
        assert_eq!(evs[0].op, Op::Update);
    }

    #[test]
    fn delete_truncate_and_other_tables() {
        let mut d = decoder();
        let key: Vec<Option<&str>> = vec![Some("7"), None, None, None, None, None, None, None];
        let del = W::new(b'D').u32(16384).u8(b'K').tuple(&key);
        let evs = d.decode(&del.0).unwrap();
        assert_eq!(evs[0].op, Op::Delete);
        assert_eq!(evs[0].payment.as_ref().unwrap().id, "7");

        d.decode(&relation(99, "public", "orders")).unwrap();
        let ins = W::new(b'I')
            .u32(99)
            .u8(b'N')
            .tuple(&row("1", "1.00", "pending"));
        assert!(
            d.decode(&ins.0).unwrap().is_empty(),
            "another table's rows are not payments"
        );
        let t = W::new(b'T').u32(1).u8(0).u32(99);
        assert!(d.decode(&t.0).unwrap().is_empty());
        let t = W::new(b'T').u32(2).u8(0).u32(99).u32(16384);
        assert_eq!(d.decode(&t.0).unwrap()[0].op, Op::Truncate);
    }

    #[test]
    fn broken_messages_are_errors_never_panics() {
        let mut d = decoder();
        let ins = W::new(b'I')
            .u32(16384)
            .u8(b'N')
            .tuple(&row("42", "1.00", "pending"));
        for cut in 0..ins.0.len() {
            assert!(d.decode(&ins.0[..cut]).is_err(), "cut at {cut}");
        }
        let unknown_rel = W::new(b'I')
            .u32(5)
            .u8(b'N')
            .tuple(&row("1", "1.00", "pending"));
        assert!(d
            .decode(&unknown_rel.0)
            .unwrap_err()
            .detail
            .contains("before its Relation"));
        let mut nul_status = row("42", "1.00", "pending");
        nul_status[4] = None;
        let ins = W::new(b'I').u32(16384).u8(b'N').tuple(&nul_status);
        let e = d.decode(&ins.0).unwrap_err();
        assert_eq!(e.kind, DecodeErrorKind::BadValue, "{e}");
        assert!(d.decode(b"Z").is_err());
        assert!(d.decode(b"").is_err());
    }

    #[test]
    fn timestamps_in_any_zone_become_utc() {
        assert_eq!(
            rfc3339("2024-05-01 14:34:56+02", true),
            "2024-05-01T12:34:56Z"
        );
        assert_eq!(
            rfc3339("2024-05-01 12:34:56.123456", false),
            "2024-05-01T12:34:56.123456Z"
        );
        assert_eq!(rfc3339("infinity", true), "infinity");
    }
}
