//! The state changelog: the record format scale-out hands state over with, and its restore.
//!
//! With `--changelog`, each checkpoint copies the state changes of the partitions this
//! instance owns to the compacted topic `<group>-state-changelog`, partitioned like the CDC
//! topic (one payment's CDC events, state entry and changelog records share a partition
//! number), before sled holds them. An instance that is assigned a partition whose changelog
//! has moved past what its own store saw restores the partition from the changelog up to the
//! high watermark, as Kafka Streams does, instead of replaying the CDC topic.
//!
//! # Record format, version 1
//! Every record carries the header `paystream-changelog: 1`; a restore refuses any other
//! version (a newer build's records are not guessed at).
//! - key = the payment id (UTF-8), value = the state entry as JSON, exactly as sled holds it
//!   (`state::Entry`): the payment is pending in state.
//! - key = the payment id, no value (a tombstone): the payment left state. Compaction drops the
//!   key's older records, then the tombstone itself after `delete.retention.ms`.
//! - key = [`OFFSET_KEY`] (starts with a NUL, which no Postgres text id can hold), value =
//!   `{"topic": "...", "partition": N, "next_offset": N}`: the CDC position the records before
//!   it reflect. Written last in each checkpoint, so records before it are never newer than it
//!   says, except after a crash between the changelog write and sled's (then the records are
//!   ahead, and the CDC events replayed from the marker are applied a second time: harmless,
//!   each event upserts or removes by id).
//!
//! # Restore
//! Read from the beginning to the high watermark; the last record per key wins; the last
//! offset marker gives where the CDC partition resumes (none: from its beginning).
//!
//! Only the partition's owner writes (see `scaleout` for how a paused instance that
//! lost its partitions is kept from writing).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The header naming the record format version.
pub const VERSION_HEADER: &str = "paystream-changelog";
/// The format version this build writes and reads.
pub const VERSION: &[u8] = b"1";
/// The key of the CDC offset marker.
pub const OFFSET_KEY: &[u8] = b"\0offset";

/// The changelog's broker failed: nothing of the checkpoint was written to sled, the next
/// checkpoint writes it again. Retrying helps once the broker is back.
#[derive(Debug, thiserror::Error)]
#[error("state changelog {topic}: {detail}")]
pub struct LogError {
    pub topic: String,
    pub detail: String,
}

impl LogError {
    /// The changelog's broker did not take the batch: a later checkpoint tries again.
    pub fn retryable(&self) -> bool {
        true
    }
}

/// A changelog record that cannot be restored: written by something else, or by a newer
/// build. The partition is not taken over (no guessing at state).
#[derive(Debug, thiserror::Error)]
#[error("state changelog {topic} partition {partition} offset {offset}: {detail}")]
pub struct RestoreError {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub detail: String,
}

/// The value of the CDC offset marker.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OffsetMarker {
    pub topic: String,
    pub partition: i32,
    pub next_offset: i64,
}

/// One partition's state as the changelog holds it.
#[derive(Debug, Default)]
pub struct Restored {
    /// Payment id → entry JSON.
    pub entries: BTreeMap<String, Vec<u8>>,
    /// Where the CDC partition resumes; `None`: from its beginning.
    pub next_offset: Option<i64>,
    /// The changelog offset the restore reached (its high watermark when it began).
    pub log_position: Option<i64>,
    /// Records read (tombstones and markers included).
    pub records: u64,
}

impl Restored {
    /// Applies one changelog record, in offset order.
    pub fn apply(
        &mut self,
        key: Option<&[u8]>,
        value: Option<&[u8]>,
        version: Option<&[u8]>,
    ) -> Result<(), String> {
        self.records += 1;
        if version != Some(VERSION) {
            return Err(format!(
                "record format {:?}, this build reads {:?}",
                version.map(String::from_utf8_lossy),
                String::from_utf8_lossy(VERSION)
            ));
        }
        let key = key.ok_or("record without a key")?;
        if key == OFFSET_KEY {
            let m: OffsetMarker = serde_json::from_slice(value.ok_or("empty offset marker")?)
                .map_err(|e| format!("offset marker: {e}"))?;
            self.next_offset = Some(m.next_offset);
            return Ok(());
        }
        let id = std::str::from_utf8(key).map_err(|_| "payment id is not UTF-8")?;
        match value {
            Some(v) => {
                self.entries.insert(id.to_string(), v.to_vec());
            }
            None => {
                self.entries.remove(id);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn last_record_per_key_wins_and_the_last_marker_gives_the_offset() {
        let mut r = Restored::default();
        let v = Some(VERSION);
        let marker = |n: i64| {
            serde_json::to_vec(&OffsetMarker {
                topic: "t".into(),
                partition: 0,
                next_offset: n,
            })
            .unwrap()
        };
        r.apply(Some(b"a"), Some(b"{\"x\":1}"), v).unwrap();
        r.apply(Some(b"b"), Some(b"{\"x\":2}"), v).unwrap();
        r.apply(Some(OFFSET_KEY), Some(&marker(7)), v).unwrap();
        r.apply(Some(b"a"), None, v).unwrap();
        r.apply(Some(b"b"), Some(b"{\"x\":3}"), v).unwrap();
        r.apply(Some(OFFSET_KEY), Some(&marker(9)), v).unwrap();
        assert_eq!(r.records, 6);
        assert_eq!(r.next_offset, Some(9));
        assert_eq!(
            r.entries.into_iter().collect::<Vec<_>>(),
            vec![("b".to_string(), b"{\"x\":3}".to_vec())]
        );
    }

    #[test]
    fn another_format_version_is_refused() {
        let mut r = Restored::default();
        let e = r.apply(Some(b"a"), Some(b"{}"), Some(b"2")).unwrap_err();
        assert!(e.contains("format"), "{e}");
        assert!(r.apply(Some(b"a"), Some(b"{}"), None).is_err());
    }
}
