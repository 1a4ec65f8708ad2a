//! The checkpoint journal: how a checkpoint stays one atomic step while sled applies it in small
//! pieces.
//!
//! Why: sled 0.34's `apply_batch` pins one epoch guard for the whole batch, so every node version
//! the batch's inserts replace (each insert copies its leaf; splits copy their parents) stays
//! allocated until the batch ends. Measured on this machine (a probe writing 200-byte
//! values, random ids, two keys an id, 32 MiB cache): 100,000 ids in batches of 100 ids peaked
//! at 62 MB; in batches of 1,000 at 171 MB; in batches of 2,000 at 522 MB; 200,000 ids in
//! batches of 2,000 at 1.4 GB, in one batch at 2.1 GB. Plain inserts stayed at 86 MB for
//! 200,000. A checkpoint of a burst of new payments was such a batch (17.7 GB replaying 1M).
//!
//! So a checkpoint writes its changes twice:
//! 1. the commit: one small batch holding the journal (every change as one value, `m\0journal`)
//!    beside the positions, the entry count and the tally, then a flush. From here the
//!    checkpoint is durable, exactly as one batch of everything was: sled recovers this batch
//!    entirely or not at all.
//! 2. the application: the journal's changes applied to the tree in slices of [`SLICE`] ids,
//!    each its own small batch, then a flush. A crash in between leaves the tree part old,
//!    part new; the next open applies the journal again before anything reads the tree
//!    ([`replay`]). Applying it again is harmless: every record sets an id to its final value
//!    (or removes it), and removes the due-index row the id had before the checkpoint.
//!
//! The journal of a checkpoint stays in the tree until the next checkpoint's commit replaces
//! it, which happens only after this one's application was flushed: so the journal always
//! belongs to the last checkpoint, and every earlier one is wholly in the tree. A write to the
//! tree outside checkpoints that changes entries (a partition replace) removes the journal in
//! its own batch, under the checkpoint lock, so a reopen never applies an older checkpoint over
//! it.

use super::lookup::{x_key, Values};
use super::{d_key, p_key, StateError};

/// The key of the last checkpoint's journal.
pub(super) const META_JOURNAL: &[u8] = b"m\0journal";

/// Ids applied per sled batch (256 beat 64 by 15% in replay speed at +15 MB): small enough that a batch's pinned node versions stay a few
/// megabytes (see the module doc), large enough that the batches cost no more than plain
/// inserts.
const SLICE: usize = 256;

/// One change to the tree: the id, the due-index time it had before the checkpoint (`None`:
/// not in the tree, or not indexed), and its new JSON with its new due time (`None` for the
/// JSON: removed; `None` for the time: not indexed, its status was emitted). `lookups`: the
/// values the lookup index found it by before and finds it by after (`lookup`), only when they
/// changed (most changes are polls, which change neither its key nor its intent).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Record<'a> {
    pub(super) id: &'a str,
    pub(super) old_due: Option<u64>,
    pub(super) new: Option<(&'a [u8], Option<u64>)>,
    pub(super) lookups: Option<(Values<'a>, Values<'a>)>,
}

/// A journal being written: the records, encoded as they come.
///
/// Encoding (all integers big-endian): a version byte (2), then per record: the id's length
/// (u32) and bytes; a flags byte (1: old due present, 2: new entry present, 4: new due
/// present, 8: lookups present); the old due (u64) if present; the JSON's length (u32) and
/// bytes, and the new due (u64), if present; the old and then the new lookup values, each as a
/// count (u8) and per value its length (u32) and bytes, if present. Version 1 (written before
/// the lookup index) is the same without flag 8, and is read as such.
pub(super) struct Journal {
    buf: Vec<u8>,
}

const VERSION: u8 = 2;
const VERSION_1: u8 = 1;
const OLD_DUE: u8 = 1;
const NEW: u8 = 2;
const NEW_DUE: u8 = 4;
const LOOKUPS: u8 = 8;

impl Default for Journal {
    fn default() -> Self {
        Journal { buf: vec![VERSION] }
    }
}

impl Journal {
    pub(super) fn push(&mut self, r: Record<'_>) {
        let b = &mut self.buf;
        b.extend_from_slice(&(r.id.len() as u32).to_be_bytes());
        b.extend_from_slice(r.id.as_bytes());
        let mut flags = 0;
        if r.old_due.is_some() {
            flags |= OLD_DUE;
        }
        if let Some((_, due)) = r.new {
            flags |= NEW;
            if due.is_some() {
                flags |= NEW_DUE;
            }
        }
        if r.lookups.is_some() {
            flags |= LOOKUPS;
        }
        b.push(flags);
        if let Some(due) = r.old_due {
            b.extend_from_slice(&due.to_be_bytes());
        }
        if let Some((json, due)) = r.new {
            b.extend_from_slice(&(json.len() as u32).to_be_bytes());
            b.extend_from_slice(json);
            if let Some(due) = due {
                b.extend_from_slice(&due.to_be_bytes());
            }
        }
        if let Some((old, new)) = r.lookups {
            for values in [old, new] {
                b.push(values.iter().flatten().count() as u8);
                for v in values.iter().flatten() {
                    b.extend_from_slice(&(v.len() as u32).to_be_bytes());
                    b.extend_from_slice(v.as_bytes());
                }
            }
        }
    }

    pub(super) fn bytes(&self) -> &[u8] {
        &self.buf
    }
}

/// The records of an encoded journal, in order; an error names what is malformed.
pub(super) fn records(bytes: &[u8]) -> impl Iterator<Item = Result<Record<'_>, String>> {
    let mut at = 1;
    let mut failed = false;
    let version = bytes.first().copied();
    std::iter::from_fn(move || {
        if failed || at >= bytes.len() {
            return None;
        }
        if version != Some(VERSION) && version != Some(VERSION_1) {
            failed = true;
            return Some(Err(format!("unknown journal version {version:?}")));
        }
        let r = read(bytes, &mut at);
        failed = r.is_err();
        Some(r)
    })
}

fn read<'a>(b: &'a [u8], at: &mut usize) -> Result<Record<'a>, String> {
    fn take<'a>(b: &'a [u8], at: &mut usize, n: usize) -> Result<&'a [u8], String> {
        let s = b
            .get(*at..*at + n)
            .ok_or_else(|| format!("journal truncated at byte {at}"))?;
        *at += n;
        Ok(s)
    }
    fn u32_at(b: &[u8], at: &mut usize) -> Result<usize, String> {
        Ok(u32::from_be_bytes(take(b, at, 4)?.try_into().expect("4 bytes")) as usize)
    }
    fn u64_at(b: &[u8], at: &mut usize) -> Result<u64, String> {
        Ok(u64::from_be_bytes(
            take(b, at, 8)?.try_into().expect("8 bytes"),
        ))
    }
    fn str_at<'a>(b: &'a [u8], at: &mut usize, what: &str) -> Result<&'a str, String> {
        let n = u32_at(b, at)?;
        std::str::from_utf8(take(b, at, n)?).map_err(|e| format!("journal {what}: {e}"))
    }
    fn values_at<'a>(b: &'a [u8], at: &mut usize) -> Result<Values<'a>, String> {
        let n = take(b, at, 1)?[0];
        if n > 2 {
            return Err(format!("journal lookup count {n} at byte {at}"));
        }
        let mut vs = [None, None];
        for v in vs.iter_mut().take(n as usize) {
            *v = Some(str_at(b, at, "lookup value")?);
        }
        Ok(vs)
    }
    let id = str_at(b, at, "id")?;
    let flags = take(b, at, 1)?[0];
    let old_due = (flags & OLD_DUE != 0).then(|| u64_at(b, at)).transpose()?;
    let new = if flags & NEW != 0 {
        let n = u32_at(b, at)?;
        let json = take(b, at, n)?;
        let due = (flags & NEW_DUE != 0).then(|| u64_at(b, at)).transpose()?;
        Some((json, due))
    } else {
        None
    };
    let lookups = if flags & LOOKUPS != 0 {
        Some((values_at(b, at)?, values_at(b, at)?))
    } else {
        None
    };
    Ok(Record {
        id,
        old_due,
        new,
        lookups,
    })
}

/// Applies an encoded journal to the tree in slices of [`SLICE`] ids, calling `after_slice`
/// after each (the seam the durability test dies at). Not flushed: the caller flushes.
/// Returns how many records it applied.
pub(super) fn apply(
    db: &sled::Db,
    bytes: &[u8],
    mut after_slice: impl FnMut(),
    io: impl Fn(sled::Error) -> StateError,
) -> Result<usize, StateError> {
    let mut batch = sled::Batch::default();
    let mut n = 0;
    for r in records(bytes) {
        let r = r.map_err(|detail| StateError::Corrupt {
            key: String::from_utf8_lossy(META_JOURNAL).into(),
            detail,
        })?;
        // Removal first: when the due time did not change (or the journal is applied a second
        // time) the insert below replaces it in the batch, which keeps the last write of a key.
        // The same for the lookup rows.
        if let Some(due) = r.old_due {
            batch.remove(d_key(due, r.id));
        }
        if let Some((old, new)) = r.lookups {
            for v in old.iter().flatten() {
                batch.remove(x_key(v, r.id));
            }
            for v in new.iter().flatten() {
                batch.insert(x_key(v, r.id), &[][..]);
            }
        }
        match r.new {
            Some((json, due)) => {
                batch.insert(p_key(r.id), json);
                if let Some(due) = due {
                    batch.insert(d_key(due, r.id), &[][..]);
                }
            }
            None => batch.remove(p_key(r.id)),
        }
        n += 1;
        if n % SLICE == 0 {
            db.apply_batch(std::mem::take(&mut batch)).map_err(&io)?;
            after_slice();
        }
    }
    if n % SLICE != 0 {
        db.apply_batch(batch).map_err(&io)?;
        after_slice();
    }
    Ok(n)
}

/// At open, before anything reads the tree: applies the last checkpoint's journal again (its
/// application may have been cut short by a crash; see the module doc), then flushes. Returns
/// how many records it applied.
pub(super) fn replay(
    db: &sled::Db,
    io: impl Fn(sled::Error) -> StateError + Copy,
) -> Result<usize, StateError> {
    let Some(bytes) = db.get(META_JOURNAL).map_err(io)? else {
        return Ok(0);
    };
    let n = apply(db, &bytes, || {}, io)?;
    db.flush().map_err(io)?;
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_come_back_as_written() {
        let written = [
            Record {
                id: "a",
                old_due: None,
                new: Some((b"{\"x\":1}", Some(7))),
                lookups: Some(([None, None], [Some("k"), Some("pi_1")])),
            },
            Record {
                id: "bé",
                old_due: Some(u64::MAX),
                new: None,
                lookups: Some(([Some("ключ"), None], [None, None])),
            },
            Record {
                id: "",
                old_due: Some(3),
                new: Some((b"", None)),
                lookups: None,
            },
        ];
        let mut j = Journal::default();
        for r in written {
            j.push(r);
        }
        let read: Vec<_> = records(j.bytes()).collect::<Result<_, _>>().unwrap();
        assert_eq!(read, written);
        assert_eq!(records(Journal::default().bytes()).count(), 0);
    }

    #[test]
    fn a_damaged_journal_is_an_error_not_a_shorter_journal() {
        let mut j = Journal::default();
        j.push(Record {
            id: "abc",
            old_due: Some(1),
            new: Some((b"{}", Some(2))),
            lookups: Some(([Some("k"), None], [Some("k2"), Some("pi")])),
        });
        let bytes = j.bytes();
        for cut in 2..bytes.len() {
            let r: Result<Vec<_>, _> = records(&bytes[..cut]).collect();
            assert!(r.is_err(), "cut at {cut} read as {r:?}");
        }
        let mut other = bytes.to_vec();
        other[0] = 9;
        assert!(records(&other).next().unwrap().is_err());
    }

    #[test]
    fn a_journal_written_before_the_lookup_index_still_reads() {
        // Version 1, as the build before the lookup index wrote it: one record, id "a", flags
        // 2|4 (new entry, new due), JSON "{}", due 9.
        let mut v1 = vec![1, 0, 0, 0, 1, b'a', 6, 0, 0, 0, 2, b'{', b'}'];
        v1.extend_from_slice(&9u64.to_be_bytes());
        let read: Vec<_> = records(&v1).collect::<Result<_, _>>().unwrap();
        assert_eq!(
            read,
            [Record {
                id: "a",
                old_due: None,
                new: Some((b"{}", Some(9))),
                lookups: None,
            }]
        );
    }
}
