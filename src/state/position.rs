//! Source positions: where each source resumes, stored in the same atomic batch as the state
//! it produced. Each source reads and writes its own kind of [`Position`]; they share the store's
//! one table (`o\0…`) so that one checkpoint makes all of them durable with the state.

use std::borrow::Cow;
use std::fmt;

use super::{c_key, StateError, Store, C, O};

/// Where a source resumes: each value names one position, stored as the next offset to read.
///
/// On disk a position is `o\0<name>\0<partition: i32 BE>`. A Kafka partition's name is its
/// topic; the others carry a prefix with a `:` (`postgres:<slot>`, `replay:<file>`,
/// `stripe:events`). Kafka topic names cannot hold a `:` (only `[a-zA-Z0-9._-]`), so no topic
/// is ever read back as another kind, and data dirs written before positions were typed read
/// the same.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Position {
    /// A partition of a Kafka topic (the CDC topic): the next offset to read.
    Kafka { topic: String, partition: i32 },
    /// Embedded mode: a replication slot's LSN, that of the last complete transaction.
    Slot(String),
    /// A file `paystream replay` read, by file name: the next line.
    File(String),
    /// The Stripe events feed's cursor: the newest event's creation time it has handled.
    FeedCursor,
}

const SLOT: &str = "postgres:";
const FILE: &str = "replay:";
const FEED_CURSOR: &str = "stripe:events";

impl Position {
    pub fn kafka(topic: &str, partition: i32) -> Position {
        Position::Kafka {
            topic: topic.to_string(),
            partition,
        }
    }

    /// The Kafka partition, 0 for positions without partitions.
    pub fn partition(&self) -> i32 {
        match self {
            Position::Kafka { partition, .. } => *partition,
            _ => 0,
        }
    }

    /// The name it is stored (and dead-lettered) under: the topic, or the prefixed name.
    pub fn name(&self) -> Cow<'_, str> {
        match self {
            Position::Kafka { topic, .. } => Cow::Borrowed(topic),
            Position::Slot(slot) => Cow::Owned(format!("{SLOT}{slot}")),
            Position::File(file) => Cow::Owned(format!("{FILE}{file}")),
            Position::FeedCursor => Cow::Borrowed(FEED_CURSOR),
        }
    }

    /// Whether this is a source's read position (a Kafka partition or a slot), as the offset
    /// gauges show them, rather than a file's or the events feed's.
    pub fn is_source(&self) -> bool {
        matches!(self, Position::Kafka { .. } | Position::Slot(_))
    }

    /// The Kafka partition of `topic` this is, if it is one.
    pub fn kafka_partition_of(&self, of: &str) -> Option<i32> {
        match self {
            Position::Kafka { topic, partition } if topic == of => Some(*partition),
            _ => None,
        }
    }

    fn from_stored(name: &str, partition: i32) -> Position {
        if let Some(slot) = name.strip_prefix(SLOT) {
            Position::Slot(slot.into())
        } else if let Some(file) = name.strip_prefix(FILE) {
            Position::File(file.into())
        } else if name == FEED_CURSOR {
            Position::FeedCursor
        } else {
            Position::kafka(name, partition)
        }
    }

    pub(super) fn key(&self) -> Vec<u8> {
        [
            O,
            self.name().as_bytes(),
            b"\0",
            &self.partition().to_be_bytes(),
        ]
        .concat()
    }
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Position::Kafka { topic, partition } => write!(f, "{topic}[{partition}]"),
            other => f.write_str(&other.name()),
        }
    }
}

impl Store {
    /// The next offset stored at `at` by the last durable checkpoint.
    pub fn stored(&self, at: &Position) -> Result<Option<i64>, StateError> {
        let v = self.db.get(at.key()).map_err(|e| self.io(e))?;
        Ok(v.and_then(|b| <[u8; 8]>::try_from(b.as_ref()).ok())
            .map(i64::from_be_bytes))
    }

    /// Every stored position (durable) with its next offset.
    pub fn positions(&self) -> Result<Vec<(Position, i64)>, StateError> {
        let mut out = Vec::new();
        for kv in self.db.scan_prefix(O) {
            let (k, v) = kv.map_err(|e| self.io(e))?;
            // `<name>\0<partition: 4 bytes>`: the partition's bytes may hold NULs themselves,
            // so split by length, not by searching for the separator.
            let rest = &k[O.len()..];
            if rest.len() < 5 {
                continue;
            }
            let (name, part) = (&rest[..rest.len() - 5], &rest[rest.len() - 4..]);
            if let (Ok(p), Ok(o)) = (<[u8; 4]>::try_from(part), <[u8; 8]>::try_from(v.as_ref())) {
                let at =
                    Position::from_stored(&String::from_utf8_lossy(name), i32::from_be_bytes(p));
                out.push((at, i64::from_be_bytes(o)));
            }
        }
        Ok(out)
    }

    /// The next changelog offset this store has seen for a CDC partition (see the layout).
    pub fn log_position(&self, partition: i32) -> Result<Option<i64>, StateError> {
        let v = self.db.get(c_key(partition)).map_err(|e| self.io(e))?;
        Ok(v.and_then(|b| <[u8; 8]>::try_from(b.as_ref()).ok())
            .map(i64::from_be_bytes))
    }

    /// The CDC partitions of `topic` this store holds anything of: a stored offset or a
    /// changelog position.
    pub fn local_partitions(&self, topic: &str) -> Result<Vec<i32>, StateError> {
        let mut out: std::collections::BTreeSet<i32> = self
            .positions()?
            .iter()
            .filter_map(|(at, _)| at.kafka_partition_of(topic))
            .collect();
        for kv in self.db.scan_prefix(C) {
            let (k, _) = kv.map_err(|e| self.io(e))?;
            if let Ok(p) = <[u8; 4]>::try_from(&k[C.len()..]) {
                out.insert(i32::from_be_bytes(p));
            }
        }
        Ok(out.into_iter().collect())
    }
}

#[cfg(test)]
mod tests {
    use super::Position;

    #[test]
    fn every_kind_reads_back_as_itself_from_its_stored_name() {
        for at in [
            Position::kafka("dbserver1.public.payments", 7),
            Position::Slot("paystream".into()),
            Position::File("events.jsonl".into()),
            Position::FeedCursor,
        ] {
            assert_eq!(Position::from_stored(&at.name(), at.partition()), at);
        }
        // The names data dirs hold from before positions were typed.
        assert_eq!(
            Position::from_stored("postgres:s1", 0),
            Position::Slot("s1".into())
        );
        assert_eq!(
            Position::from_stored("replay:a.jsonl", 0),
            Position::File("a.jsonl".into())
        );
        assert_eq!(
            Position::from_stored("stripe:events", 0),
            Position::FeedCursor
        );
    }
}
