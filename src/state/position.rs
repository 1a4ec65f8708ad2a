//! Source positions: where each source resumes, stored in the same atomic batch as the state
//! it produced.

use super::{c_key, StateError, Store, C, O};

pub(super) fn o_key(topic: &str, partition: i32) -> Vec<u8> {
    [O, topic.as_bytes(), b"\0", &partition.to_be_bytes()].concat()
}

impl Store {
    /// The next offset stored for a partition by the last durable checkpoint.
    pub fn stored_offset(&self, topic: &str, partition: i32) -> Result<Option<i64>, StateError> {
        let v = self
            .db
            .get(o_key(topic, partition))
            .map_err(|e| self.io(e))?;
        Ok(v.and_then(|b| <[u8; 8]>::try_from(b.as_ref()).ok())
            .map(i64::from_be_bytes))
    }

    /// All stored offsets (durable), as `(topic, partition, next_offset)`.
    pub fn stored_offsets(&self) -> Result<Vec<(String, i32, i64)>, StateError> {
        let mut out = Vec::new();
        for kv in self.db.scan_prefix(O) {
            let (k, v) = kv.map_err(|e| self.io(e))?;
            // `<topic>\0<partition: 4 bytes>`: the partition's bytes may hold NULs themselves,
            // so split by length, not by searching for the separator.
            let rest = &k[O.len()..];
            if rest.len() < 5 {
                continue;
            }
            let (topic, part) = (&rest[..rest.len() - 5], &rest[rest.len() - 4..]);
            if let (Ok(p), Ok(o)) = (<[u8; 4]>::try_from(part), <[u8; 8]>::try_from(v.as_ref())) {
                out.push((
                    String::from_utf8_lossy(topic).into(),
                    i32::from_be_bytes(p),
                    i64::from_be_bytes(o),
                ));
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
            .stored_offsets()?
            .into_iter()
            .filter(|(t, _, _)| t == topic)
            .map(|(_, p, _)| p)
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
