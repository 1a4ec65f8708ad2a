//! The store's unit tests.
use super::*;
use crate::change::ChangeEvent;
use crate::decode::{decode_value, DecodeOptions};
use crate::state::Position;

/// Partition `p` of the test topic `t`.
fn t(p: i32) -> Position {
    Position::kafka("t", p)
}

fn ev(json: &str) -> ChangeEvent {
    decode_value(Some(json.as_bytes()), &DecodeOptions::default()).unwrap()
}

/// Applies `ev` as if read at `offset` of partition 0 of topic `t`, pending status "pending".
fn apply(
    s: &Store,
    ev: &ChangeEvent,
    key: Option<&str>,
    offset: i64,
    now_ms: u64,
    interval_ms: u64,
) -> Applied {
    s.apply_event(ev, key, (&t(0), offset), now_ms, interval_ms, "pending")
        .unwrap()
}

fn create(id: &str, status: &str) -> ChangeEvent {
    ev(&format!(
        r#"{{"op":"c","after":{{"id":"{id}","idempotency_key":"k-{id}","amount":"10.00","currency":"usd","status":"{status}","stripe_payment_intent_id":"pi_{id}"}}}}"#
    ))
}

#[test]
fn offsets_and_state_survive_reopen_only_after_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    {
        let s = Store::open(dir.path()).unwrap();
        apply(&s, &create("a", "pending"), None, 1, 1000, 600);
        s.checkpoint().unwrap();
        // Not checkpointed: must be gone after reopen, offset included.
        apply(&s, &create("b", "pending"), None, 2, 1000, 600);
    }
    let s = reopen(dir.path()).unwrap();
    assert_eq!(s.stored(&t(0)).unwrap(), Some(1));
    assert_eq!(s.positions().unwrap(), vec![(t(0), 1)]);
    let ids: Vec<_> = s.entries().unwrap().into_iter().map(|e| e.id).collect();
    assert_eq!(ids, vec!["a"]);
}

#[test]
fn final_status_and_delete_and_tombstone_remove() {
    let dir = tempfile::tempdir().unwrap();
    let s = Store::open(dir.path()).unwrap();
    for id in ["a", "b", "c"] {
        assert_eq!(
            apply(&s, &create(id, "pending"), None, 1, 0, 10),
            Applied::Tracked
        );
    }
    s.checkpoint().unwrap();
    assert_eq!(
        apply(&s, &create("a", "succeeded"), None, 2, 0, 10),
        Applied::Removed
    );
    let del = ev(
        r#"{"op":"d","before":{"id":"b","idempotency_key":"","amount":"AA==","currency":"","status":"pending"}}"#,
    );
    assert_eq!(apply(&s, &del, None, 3, 0, 10), Applied::Removed);
    let tomb = decode_value(None, &DecodeOptions::default()).unwrap();
    assert_eq!(apply(&s, &tomb, Some("c"), 4, 0, 10), Applied::Removed);
    assert_eq!(apply(&s, &tomb, Some("c"), 5, 0, 10), Applied::Ignored);
    s.checkpoint().unwrap();
    assert!(s.entries().unwrap().is_empty());
    assert_eq!(
        s.due(u64::MAX - 1, 10, |_| false, |_| true).unwrap(),
        vec![]
    );
    assert_eq!(s.stored(&t(0)).unwrap(), Some(5));
}

#[test]
fn due_index_follows_rescheduling_and_emission() {
    let dir = tempfile::tempdir().unwrap();
    let s = Store::open(dir.path()).unwrap();
    apply(&s, &create("a", "pending"), None, 1, 0, 100);
    apply(&s, &create("b", "pending"), None, 2, 50, 100);
    s.checkpoint().unwrap();
    assert!(s.due(99, 10, |_| false, |_| true).unwrap().is_empty());
    let due: Vec<_> = s
        .due(160, 10, |_| false, |_| true)
        .unwrap()
        .into_iter()
        .map(|e| e.id)
        .collect();
    assert_eq!(due, vec!["a", "b"]);
    // Rescheduled in the overlay: skipped at once, even before the index is rewritten.
    s.update("a", |e| e.next_poll_ms = 500).unwrap();
    s.update("b", |e| {
        e.emitted = Some(Emitted {
            status: "succeeded".into(),
            event_id: "x".into(),
            at_ms: 1,
            reason: None,
        })
    })
    .unwrap();
    assert!(s.due(160, 10, |_| false, |_| true).unwrap().is_empty());
    s.checkpoint().unwrap();
    let due: Vec<_> = s
        .due(600, 10, |_| false, |_| true)
        .unwrap()
        .into_iter()
        .map(|e| e.id)
        .collect();
    assert_eq!(due, vec!["a"], "an emitted payment is not polled again");
    assert_eq!(
        s.stats(600, 100, u64::MAX).unwrap().awaiting_confirmation,
        1
    );
    // A pending-status update keeps the schedule and the emission.
    apply(&s, &create("b", "pending"), None, 3, 700, 100);
    assert!(s.get("b").unwrap().unwrap().emitted.is_some());
}

#[test]
fn overdue_polls_are_spread_not_fired_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let s = Store::open(dir.path()).unwrap();
    for i in 0..100 {
        apply(&s, &create(&format!("p{i:03}"), "pending"), None, i, 0, 10);
    }
    s.checkpoint().unwrap();
    assert_eq!(s.spread_overdue(1000, |n| n as u64 * 10).unwrap(), 100);
    s.checkpoint().unwrap();
    // 100 over a 1000 ms window: ten per 100 ms, never all at once.
    assert_eq!(s.due(1000, 1000, |_| false, |_| true).unwrap().len(), 1);
    assert_eq!(s.due(1099, 1000, |_| false, |_| true).unwrap().len(), 10);
    assert_eq!(s.due(1999, 1000, |_| false, |_| true).unwrap().len(), 100);
}

/// Opens the store's sled tree directly, as a crash or a sled bug might have left it.
fn raw(dir: &Path, f: impl FnOnce(&sled::Db)) {
    let db = super::wait_for_lock(|| sled::Config::new().path(dir).open()).unwrap();
    f(&db);
    db.flush().unwrap();
}

/// Store::open waits for the lock a just-dropped store's sled threads may still hold.
fn reopen(dir: &Path) -> Result<Store, StateError> {
    Store::open(dir)
}

fn open_err(dir: &Path) -> String {
    match reopen(dir) {
        Ok(_) => panic!("opened a broken store"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn recovery_check_refuses_a_store_that_broke_its_invariants() {
    let dir = tempfile::tempdir().unwrap();
    {
        let s = Store::open(dir.path()).unwrap();
        for id in ["a", "b", "c"] {
            apply(&s, &create(id, "pending"), None, 1, 0, 10);
        }
        s.checkpoint().unwrap();
        apply(&s, &create("b", "succeeded"), None, 2, 0, 10);
        s.checkpoint().unwrap();
    }
    // Whole checkpoints reopen fine.
    assert_eq!(reopen(dir.path()).unwrap().entries().unwrap().len(), 2);

    // A lost index row (half of a batch).
    raw(dir.path(), |db| {
        db.remove(d_key(10, "a")).unwrap();
    });
    let e = open_err(dir.path());
    assert!(
        e.contains("pending payment a is not in the due index"),
        "{e}"
    );
    assert!(e.contains("recovery check"), "{e}");
    raw(dir.path(), |db| {
        db.insert(d_key(10, "a"), &[][..]).unwrap();
    });

    // An entry the last checkpoint did not write (count mismatch), fully indexed.
    raw(dir.path(), |db| {
        let mut e: Entry = serde_json::from_slice(&db.get(p_key("a")).unwrap().unwrap()).unwrap();
        e.id = "z".into();
        db.insert(p_key("z"), serde_json::to_vec(&e).unwrap())
            .unwrap();
        db.insert(d_key(10, "z"), &[][..]).unwrap();
    });
    let e = open_err(dir.path());
    assert!(
        e.contains("the last checkpoint left 2 entries, the store holds 3"),
        "{e}"
    );
    raw(dir.path(), |db| {
        db.remove(p_key("z")).unwrap();
        db.remove(d_key(10, "z")).unwrap();
    });

    // An unreadable entry, and an index row pointing nowhere.
    raw(dir.path(), |db| {
        db.insert(p_key("c"), &b"{not json"[..]).unwrap();
        db.insert(d_key(5, "ghost"), &[][..]).unwrap();
    });
    let e = open_err(dir.path());
    assert!(e.contains("entry c does not parse"), "{e}");
    assert!(e.contains("ghost, which has no entry"), "{e}");
    raw(dir.path(), |db| {
        let mut c: Entry = serde_json::from_slice(&db.get(p_key("a")).unwrap().unwrap()).unwrap();
        (c.id, c.idempotency_key, c.stripe_payment_intent_id) =
            ("c".into(), "k-c".into(), Some("pi_c".into()));
        db.insert(p_key("c"), serde_json::to_vec(&c).unwrap())
            .unwrap();
        db.remove(d_key(5, "ghost")).unwrap();
    });
    assert_eq!(reopen(dir.path()).unwrap().entries().unwrap().len(), 2);

    // A lost lookup row, and one naming a value the entry does not hold.
    raw(dir.path(), |db| {
        db.remove(lookup::x_key("pi_a", "a")).unwrap();
        db.insert(lookup::x_key("k-zz", "c"), &[][..]).unwrap();
    });
    let e = open_err(dir.path());
    assert!(
        e.contains(r#"payment a is not in the lookup index under "pi_a""#),
        "{e}"
    );
    assert!(
        e.contains(r#"lookup index finds payment c under "k-zz", which the entry does not hold"#),
        "{e}"
    );
}

fn ids_found(s: &Store, q: &str) -> Vec<String> {
    s.find_by_value(q)
        .unwrap()
        .into_iter()
        .map(|e| e.id)
        .collect()
}

/// The rows `x\0…` the tree holds for `id`, as (value) strings.
fn lookup_rows(dir: &Path, id: &str) -> Vec<String> {
    let mut out = Vec::new();
    raw(dir, |db| {
        for kv in db.scan_prefix(lookup::X) {
            let k = kv.unwrap().0;
            let (v, i) = lookup::split(&k).unwrap();
            if i == id.as_bytes() {
                out.push(String::from_utf8(v.to_vec()).unwrap());
            }
        }
    });
    out
}

/// `state get` by idempotency key or intent id reads the lookup index: the overlay's changes
/// stand over the tree's, a changed intent moves the row, a shared intent finds both payments,
/// a removal drops the rows, and the reopened store's recovery check agrees.
#[test]
fn lookups_by_key_and_intent_follow_every_write() {
    let dir = tempfile::tempdir().unwrap();
    {
        let s = Store::open(dir.path()).unwrap();
        for id in ["a", "b"] {
            apply(&s, &create(id, "pending"), None, 1, 0, 10);
        }
        // Not checkpointed yet: found in the overlay.
        assert_eq!(ids_found(&s, "k-a"), ["a"]);
        assert_eq!(ids_found(&s, "pi_b"), ["b"]);
        s.checkpoint().unwrap();
        assert_eq!(ids_found(&s, "k-a"), ["a"]);
        assert_eq!(ids_found(&s, "pi_a"), ["a"]);
        assert!(
            ids_found(&s, "k-").is_empty(),
            "a prefix of a key finds nothing"
        );

        // A new intent on the same payment, and two payments sharing one.
        let moved = |id: &str, pi: &str| {
            ev(&format!(
                r#"{{"op":"u","after":{{"id":"{id}","idempotency_key":"k-{id}","amount":"10.00","currency":"usd","status":"pending","stripe_payment_intent_id":"{pi}"}}}}"#
            ))
        };
        apply(&s, &moved("a", "pi_shared"), None, 2, 0, 10);
        apply(&s, &moved("c", "pi_shared"), None, 3, 0, 10);
        assert!(
            ids_found(&s, "pi_a").is_empty(),
            "the overlay's change stands"
        );
        assert_eq!(ids_found(&s, "pi_shared"), ["a", "c"]);
        s.checkpoint().unwrap();
        assert!(ids_found(&s, "pi_a").is_empty());
        assert_eq!(ids_found(&s, "pi_shared"), ["a", "c"]);
        assert_eq!(ids_found(&s, "k-a"), ["a"]);

        // Final: gone from the index (in the overlay at once, in the tree after the checkpoint).
        apply(&s, &create("b", "succeeded"), None, 4, 0, 10);
        assert!(ids_found(&s, "k-b").is_empty());
        s.checkpoint().unwrap();
        assert!(ids_found(&s, "pi_b").is_empty());
    }
    assert!(lookup_rows(dir.path(), "b").is_empty());
    let mut rows = lookup_rows(dir.path(), "a");
    rows.sort();
    assert_eq!(rows, ["k-a", "pi_shared"]);
    let s = reopen(dir.path()).unwrap();
    assert_eq!(ids_found(&s, "pi_shared"), ["a", "c"]);
    assert_eq!(inspect::find(&s, "k-c", "pending").unwrap()[0].id, "c");
}

/// A store of layout 3 (no lookup index) gains it at its recovery check, then says version 4.
#[test]
fn a_layout_3_store_gains_its_lookup_index_at_the_recovery_check() {
    let dir = checkpointed_abc();
    raw(dir.path(), |db| {
        db.insert(META_FORMAT, FORMAT_V3).unwrap();
        for kv in db.scan_prefix(lookup::X) {
            db.remove(kv.unwrap().0).unwrap();
        }
    });
    assert!(lookup_rows(dir.path(), "a").is_empty());
    let s = reopen(dir.path()).unwrap();
    assert_eq!(ids_found(&s, "pi_b"), ["b"]);
    assert_eq!(ids_found(&s, "k-c"), ["c"]);
    drop(s);
    raw(dir.path(), |db| {
        assert_eq!(db.get(META_FORMAT).unwrap().unwrap().as_ref(), FORMAT);
    });
    // And it opens as version 4, its index checked.
    reopens_with_pending(dir.path(), 3);
}

#[test]
fn a_store_without_its_marker_but_with_data_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    raw(dir.path(), |db| {
        db.insert(b"something else", &b"x"[..]).unwrap();
    });
    assert!(open_err(dir.path()).contains("no layout marker"));
}

#[test]
fn a_second_opener_is_told_the_store_is_in_use() {
    let dir = tempfile::tempdir().unwrap();
    let _first = Store::open(dir.path()).unwrap();
    let e = match Store::open(dir.path()) {
        Ok(_) => panic!("opened a store another handle holds"),
        Err(e) => e.to_string(),
    };
    assert!(e.contains("in use by another process"), "{e}");
}

#[test]
fn truncate_clears_everything() {
    let dir = tempfile::tempdir().unwrap();
    let s = Store::open(dir.path()).unwrap();
    apply(&s, &create("a", "pending"), None, 1, 0, 10);
    s.checkpoint().unwrap();
    apply(&s, &create("b", "pending"), None, 2, 0, 10);
    let t = ev(
        r#"{"op":"t","before":null,"after":null,"source":{"schema":"public","table":"payments"}}"#,
    );
    assert_eq!(apply(&s, &t, None, 3, 0, 10), Applied::Removed);
    s.checkpoint().unwrap();
    assert!(s.entries().unwrap().is_empty());
}

#[test]
fn scans_merge_the_overlay_in_id_order() {
    let dir = tempfile::tempdir().unwrap();
    let s = Store::open(dir.path()).unwrap();
    for id in ["b", "d", "f"] {
        apply(&s, &create(id, "pending"), None, 1, 0, 10);
    }
    s.checkpoint().unwrap();
    // Not checkpointed: a new first, middle and last entry, one removal, one change.
    for id in ["a", "c", "g"] {
        apply(&s, &create(id, "pending"), None, 2, 0, 10);
    }
    apply(&s, &create("d", "succeeded"), None, 3, 0, 10);
    s.update("f", |e| e.polls = 7).unwrap();
    let seen: Vec<(String, u64)> = s
        .entries()
        .unwrap()
        .into_iter()
        .map(|e| (e.id, e.polls))
        .collect();
    let want: Vec<(String, u64)> = [("a", 0), ("b", 0), ("c", 0), ("f", 7), ("g", 0)]
        .map(|(i, p)| (i.to_string(), p))
        .to_vec();
    assert_eq!(seen, want);
    // The same after the checkpoint, when all of it comes from the tree.
    s.checkpoint().unwrap();
    let again: Vec<(String, u64)> = s
        .entries()
        .unwrap()
        .into_iter()
        .map(|e| (e.id, e.polls))
        .collect();
    assert_eq!(again, want);
    // A scan stops when told to.
    let mut n = 0;
    s.scan(|_| {
        n += 1;
        n < 2
    })
    .unwrap();
    assert_eq!(n, 2);
}

#[test]
fn stats_count_due_times_and_age_buckets() {
    let dir = tempfile::tempdir().unwrap();
    let s = Store::open(dir.path()).unwrap();
    let h = 3_600_000;
    // First seen at 0, 30 min, 2 h, 10 h, 30 h into a clock read at 30 h; interval 10 min.
    for (i, seen) in [0, h / 2, 2 * h, 10 * h, 30 * h].into_iter().enumerate() {
        apply(
            &s,
            &create(&format!("p{i}"), "pending"),
            None,
            i as i64,
            seen,
            600_000,
        );
    }
    s.update("p1", |e| {
        e.emitted = Some(Emitted {
            status: "failed".into(),
            event_id: "e".into(),
            at_ms: 1,
            reason: Some("card_declined".into()),
        })
    })
    .unwrap();
    // The counts are the last checkpoint's (see state::tally).
    s.checkpoint().unwrap();
    let st = s.stats(30 * h, 600_000, 24 * h).unwrap();
    assert_eq!(
        st,
        s.stats_by_scan(30 * h, 600_000, 24 * h).unwrap(),
        "the tally is the scan's"
    );
    assert_eq!((st.pending, st.awaiting_confirmation), (4, 1));
    // p0, p2, p3 are overdue; p4 is due 10 min after it was seen, within the next interval.
    assert_eq!((st.due_now, st.due_next_interval), (3, 1));
    assert_eq!(
        st.by_age,
        [1, 0, 0, 1, 2],
        "<10m, 10m-1h, 1h-6h, 6h-24h, >=24h"
    );
    assert_eq!(st.oldest_pending, Some(0), "p0, first seen at 0");
    // Seen 24 h ago or more and still pending: p0 and p2 (p1 is emitted).
    assert_eq!(st.stale, 2);
    assert_eq!((st.flagged, st.declined), (0, 0));
}

#[test]
fn poll_history_keeps_the_newest_and_counts_all() {
    let mut e = Store::open(tempfile::tempdir().unwrap().path())
        .map(|s| {
            apply(&s, &create("a", "pending"), None, 1, 0, 10);
            s.get("a").unwrap().unwrap()
        })
        .unwrap();
    for i in 0..(HISTORY_LEN as u64 + 3) {
        e.record_poll(i, "still_pending", Some("processing"));
    }
    assert_eq!(e.polls, HISTORY_LEN as u64 + 3);
    assert_eq!(e.history.len(), HISTORY_LEN);
    assert_eq!(e.history[0].at_ms, 3);
    assert_eq!(e.last_outcome(), Some("still_pending"));
    let c = e.last_cdc.as_ref().unwrap();
    assert_eq!((c.op.as_str(), c.offset), ("c", 0));
}

/// An entry as builds before poll history wrote it (layout 1): still read, its dropped
/// field ignored, its new fields defaulted. Upgrades within a layout need no migration.
#[test]
fn entries_written_by_an_older_build_still_read() {
    let old = r#"{"id":"7","idempotency_key":"k","amount":"1.00","currency":"usd",
        "stripe_payment_intent_id":"pi_7","created_at":null,"partition":0,
        "first_seen_ms":5,"next_poll_ms":9,"failures":0,"polls":3,
        "last_outcome":"still_pending:processing","emitted":null}"#;
    let e: Entry = serde_json::from_str(old).unwrap();
    assert_eq!(
        (e.polls, e.history.len(), e.last_cdc.is_none()),
        (3, 0, true)
    );
    assert_eq!(e.updated_at, None);
    let emitted: Emitted =
        serde_json::from_str(r#"{"status":"failed","event_id":"x","at_ms":1}"#).unwrap();
    assert_eq!(emitted.reason, None);
}

/// A changelog that logs the partitions in `owned` and keeps what it was handed.
struct Recorded {
    owned: Vec<i32>,
    fail: bool,
    records: Mutex<Vec<(i32, String, bool)>>,
    markers: Mutex<Vec<(i32, i64)>>,
}

impl ChangeLog for Recorded {
    fn cdc_topic(&self) -> &str {
        "t"
    }
    fn logs(&self, partition: i32) -> bool {
        self.owned.contains(&partition)
    }
    fn write(&self, b: &LogBatch<'_>) -> Result<Vec<(i32, i64)>, changelog::LogError> {
        if self.fail {
            return Err(changelog::LogError {
                topic: "log".into(),
                detail: "down".into(),
            });
        }
        let mut r = self.records.lock().unwrap();
        for (p, id, v) in &b.records {
            r.push((*p, id.to_string(), v.is_some()));
        }
        self.markers.lock().unwrap().extend(&b.offsets);
        // Like the broker: a next offset for each partition written to.
        let mut ps: Vec<i32> = b.records.iter().map(|r| r.0).collect();
        ps.extend(b.offsets.iter().map(|(p, _)| *p));
        ps.sort_unstable();
        ps.dedup();
        Ok(ps.into_iter().map(|p| (p, 100 + p as i64)).collect())
    }
}

fn log(owned: &[i32], fail: bool) -> Recorded {
    Recorded {
        owned: owned.to_vec(),
        fail,
        records: Mutex::default(),
        markers: Mutex::default(),
    }
}

fn apply_on(s: &Store, id: &str, status: &str, partition: i32, offset: i64) {
    s.apply_event(
        &create(id, status),
        None,
        (&t(partition), offset),
        1000,
        600,
        "pending",
    )
    .unwrap();
}

#[test]
fn a_logged_checkpoint_logs_owned_partitions_and_drops_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let s = Store::open(dir.path()).unwrap();
    apply_on(&s, "a", "pending", 0, 1);
    apply_on(&s, "b", "pending", 1, 1);
    let l = log(&[0], false);
    let cp = s.checkpoint_logged(Some(&l), |_| {}).unwrap();
    assert_eq!(cp.positions, vec![(t(0), 1)]);
    assert_eq!(*l.records.lock().unwrap(), vec![(0, "a".to_string(), true)]);
    assert_eq!(*l.markers.lock().unwrap(), vec![(0, 1)]);
    assert_eq!(s.log_position(0).unwrap(), Some(100));
    assert_eq!(s.log_position(1).unwrap(), None);
    // Partition 1 is someone else's: neither in the tree nor in the overlay any more.
    assert!(s.get("b").unwrap().is_none());
    assert!(s.get("a").unwrap().is_some());

    // A removal is logged on the partition the tree holds the entry under.
    apply_on(&s, "a", "succeeded", 0, 2);
    s.checkpoint_logged(Some(&l), |_| {}).unwrap();
    assert_eq!(l.records.lock().unwrap()[1], (0, "a".to_string(), false));
    drop(s);
    let s = reopen(dir.path()).unwrap();
    assert_eq!(s.entry_count(), 0);
    assert_eq!(s.stored(&t(0)).unwrap(), Some(2));
}

#[test]
fn a_failed_changelog_write_writes_nothing_and_keeps_the_changes() {
    let dir = tempfile::tempdir().unwrap();
    let s = Store::open(dir.path()).unwrap();
    apply_on(&s, "a", "pending", 0, 1);
    let e = s
        .checkpoint_logged(Some(&log(&[0], true)), |_| {})
        .unwrap_err();
    assert!(e.retryable(), "{e}");
    assert_eq!(s.stored(&t(0)).unwrap(), None);
    assert_eq!(s.entry_count(), 0);
    // The next checkpoint, with the broker back, writes them.
    let l = log(&[0], false);
    s.checkpoint_logged(Some(&l), |_| {}).unwrap();
    assert_eq!(l.records.lock().unwrap().len(), 1);
    assert_eq!(s.stored(&t(0)).unwrap(), Some(1));
    assert_eq!(s.entry_count(), 1);
}

#[test]
fn replacing_a_partition_swaps_its_entries_offsets_and_position_only() {
    let dir = tempfile::tempdir().unwrap();
    let s = Store::open(dir.path()).unwrap();
    for (id, p) in [("a", 0), ("b", 1), ("c", 1)] {
        apply_on(&s, id, "pending", p, 5);
    }
    s.checkpoint().unwrap();
    // Not yet checkpointed: dropped with its partition.
    apply_on(&s, "d", "pending", 1, 6);
    let entry = |id: &str| {
        let mut e = s.get("b").unwrap().unwrap();
        e.id = id.into();
        e.next_poll_ms = 42;
        serde_json::to_vec(&e).unwrap()
    };
    let restored = changelog::Restored {
        entries: [("c".to_string(), entry("c")), ("e".to_string(), entry("e"))]
            .into_iter()
            .collect(),
        next_offset: Some(9),
        log_position: Some(77),
        records: 5,
    };
    s.replace_partition(&t(1), &restored).unwrap();
    let ids: Vec<String> = s.entries().unwrap().into_iter().map(|e| e.id).collect();
    assert_eq!(ids, ["a", "c", "e"]);
    assert_eq!(s.get("c").unwrap().unwrap().next_poll_ms, 42);
    assert_eq!(s.stored(&t(1)).unwrap(), Some(9));
    assert_eq!(s.stored(&t(0)).unwrap(), Some(5));
    assert_eq!(s.log_position(1).unwrap(), Some(77));
    assert_eq!(s.local_partitions("t").unwrap(), vec![0, 1]);
    let due: Vec<String> = s
        .due(1_000_000, 10, |_| false, |p| p == 1)
        .unwrap()
        .into_iter()
        .map(|e| e.id)
        .collect();
    assert_eq!(due, ["c", "e"]);
    // The restored entries are found by their values (copies of b: its key and intent).
    assert_eq!(ids_found(&s, "k-b"), ["c", "e"]);
    assert_eq!(ids_found(&s, "pi_a"), ["a"]);
    // Evicting leaves nothing of the partition; the recovery check agrees with the counts.
    s.replace_partition(&t(1), &changelog::Restored::default())
        .unwrap();
    assert!(ids_found(&s, "k-b").is_empty());
    assert_eq!(s.local_partitions("t").unwrap(), vec![0]);
    drop(s);
    let s = reopen(dir.path()).unwrap();
    assert_eq!(s.entry_count(), 1);
    assert_eq!(s.entries().unwrap().len(), 1);
}

#[test]
fn adopting_a_partition_logs_all_its_entries_at_the_next_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let s = Store::open(dir.path()).unwrap();
    for (id, p) in [("a", 0), ("b", 1), ("c", 1)] {
        apply_on(&s, id, "pending", p, 5);
    }
    s.checkpoint().unwrap();
    assert_eq!(s.adopt_partition(1).unwrap(), 2);
    let l = log(&[1], false);
    s.checkpoint_logged(Some(&l), |_| {}).unwrap();
    let ids: Vec<String> = l
        .records
        .lock()
        .unwrap()
        .iter()
        .map(|r| r.1.clone())
        .collect();
    assert_eq!(ids.len(), 2);
    assert!(ids.contains(&"b".to_string()) && ids.contains(&"c".to_string()));
    assert_eq!(s.log_position(1).unwrap(), Some(101));
}

#[tokio::test]
async fn a_burst_of_changes_wakes_the_checkpoint_loop_once() {
    use std::time::Duration;
    let dir = tempfile::tempdir().unwrap();
    let s = Store::open(dir.path()).unwrap();
    let quiet = Duration::from_millis(50);
    // Opening changed nothing.
    assert!(tokio::time::timeout(quiet, s.changed()).await.is_err());
    apply(&s, &create("a", "pending"), None, 1, 1000, 600);
    apply(&s, &create("b", "pending"), None, 2, 1000, 600);
    s.update("a", |e| e.failures = 1).unwrap();
    // Made while nobody waited: kept, and one wake for the burst.
    tokio::time::timeout(quiet, s.changed())
        .await
        .expect("a change wakes the waiter");
    assert!(tokio::time::timeout(quiet, s.changed()).await.is_err());
    // An update of a payment state no longer holds changes nothing, and wakes nobody.
    assert!(!s.update("gone", |e| e.failures = 1).unwrap());
    assert!(tokio::time::timeout(quiet, s.changed()).await.is_err());
}

/// The tally (state::tally) against a scan, through every kind of write: new payments, polls
/// that move due times, flags, declines, emitted statuses, removals, a partition replaced by a
/// restore, a reopen. First-seen times are whole minutes (the tally's resolution for ages);
/// due times are not (due counts are exact).
#[test]
fn the_tally_equals_a_scan_after_every_kind_of_write() {
    let dir = tempfile::tempdir().unwrap();
    let minute = 60_000;
    let check = |s: &Store, what: &str| {
        for now in [
            0,
            7 * minute + 123,
            45 * minute + 59_999,
            400 * minute,
            3_000 * minute,
        ] {
            for (interval, stale) in [(600_000, 24 * 3_600_000), (37_001, 5 * minute)] {
                assert_eq!(
                    s.stats(now, interval, stale).unwrap(),
                    s.stats_by_scan(now, interval, stale).unwrap(),
                    "{what}, at {now} ms, interval {interval}, stale {stale}"
                );
            }
            let scanned = s.stats_by_scan(now, 1, u64::MAX).unwrap().due_now;
            assert_eq!(
                s.count_due(now).unwrap(),
                scanned,
                "{what}: count_due at {now}"
            );
        }
    };
    {
        let s = Store::open(dir.path()).unwrap();
        for i in 0..60u64 {
            let at = t((i % 2) as i32);
            s.apply_event(
                &create(&format!("p{i:02}"), "pending"),
                None,
                (&at, i as i64 + 1),
                (i * 37 % 200) * minute,
                600_000 + i * 1_234,
                "pending",
            )
            .unwrap();
        }
        s.checkpoint().unwrap();
        check(&s, "sixty created");
        for i in (0..60u64).step_by(3) {
            s.update(&format!("p{i:02}"), |e| {
                e.next_poll_ms += 17 * minute + 11;
                if i % 2 == 0 {
                    e.flag = Some(Flag {
                        kind: "amount_mismatch".into(),
                        detail: "x".into(),
                        since_ms: 1,
                    });
                }
                if i % 9 == 0 {
                    e.declines = Some(Declines {
                        count: 1,
                        last_code: "card_declined".into(),
                        last_at_ms: 1,
                        last_attempt: "a".into(),
                    });
                }
            })
            .unwrap();
        }
        s.checkpoint().unwrap();
        check(&s, "polled, flagged, declined");
        for i in (1..60u64).step_by(4) {
            s.update(&format!("p{i:02}"), |e| {
                e.emitted = Some(Emitted {
                    status: "succeeded".into(),
                    event_id: "e".into(),
                    at_ms: 1,
                    reason: None,
                })
            })
            .unwrap();
        }
        for i in (2..60u64).step_by(5) {
            apply(
                &s,
                &create(&format!("p{i:02}"), "succeeded"),
                None,
                100,
                0,
                10,
            );
        }
        s.checkpoint().unwrap();
        check(&s, "emitted and removed");
        // Partition 1 replaced by a restore holding two of its entries and one new one.
        let mut restored = changelog::Restored::default();
        for id in ["p01", "p03"] {
            if let Some(e) = s.get(id).unwrap() {
                restored
                    .entries
                    .insert(id.into(), serde_json::to_vec(&e).unwrap());
            }
        }
        let mut e = s.get("p00").unwrap().unwrap();
        e.id = "r99".into();
        e.partition = 1;
        restored
            .entries
            .insert("r99".into(), serde_json::to_vec(&e).unwrap());
        s.replace_partition(&t(1), &restored).unwrap();
        check(&s, "partition 1 replaced");
    }
    let s = reopen(dir.path()).unwrap();
    check(&s, "reopened");
}

/// A stored tally that is not the entries' (a bug) is rewritten from the recovery check's scan:
/// the counts are derived, so the store still opens, and they are right again.
#[test]
fn recovery_check_rewrites_a_tally_that_is_not_the_entries() {
    let dir = tempfile::tempdir().unwrap();
    {
        let s = Store::open(dir.path()).unwrap();
        for id in ["a", "b"] {
            apply(&s, &create(id, "pending"), None, 1, 0, 10);
        }
        s.checkpoint().unwrap();
    }
    raw(dir.path(), |db| {
        let mut head = db.get(tally::META_TALLY).unwrap().unwrap().to_vec();
        head[..8].copy_from_slice(&3u64.to_be_bytes());
        db.insert(tally::META_TALLY, head).unwrap();
        db.insert(b"h\0f\0\0\0\0\0\0\0\x09", &5u64.to_be_bytes()[..])
            .unwrap();
    });
    reopens_with_pending(dir.path(), 2);
    raw(dir.path(), |db| {
        let stored = tally::Tally::read(db).unwrap().unwrap();
        assert_eq!(
            (stored.pending, stored.first_seen.len()),
            (2, 1),
            "{stored:?}"
        );
    });
}

/// A store holding pending payments a, b and c (offsets 1 to 3), checkpointed and closed.
fn checkpointed_abc() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let s = Store::open(dir.path()).unwrap();
    for (i, id) in ["a", "b", "c"].into_iter().enumerate() {
        apply(&s, &create(id, "pending"), None, i as i64 + 1, 0, 10);
    }
    s.checkpoint().unwrap();
    dir
}

/// A store of layout 1 (no tally) is upgraded by its recovery check: the tally from the scan
/// and version 2 in one batch, and the counts are right at once.
#[test]
fn a_layout_1_store_gains_its_tally_at_the_recovery_check() {
    let dir = checkpointed_abc();
    raw(dir.path(), |db| {
        db.insert(META_FORMAT, FORMAT_V1).unwrap();
        db.remove(tally::META_TALLY).unwrap();
        for kv in db.scan_prefix(b"h\0") {
            db.remove(kv.unwrap().0).unwrap();
        }
    });
    reopens_with_pending(dir.path(), 3);
    raw(dir.path(), |db| {
        assert_eq!(db.get(META_FORMAT).unwrap().unwrap().as_ref(), FORMAT);
    });
}

/// Reopens the store at `dir` and checks its counts: `pending`, and the same as a scan's.
fn reopens_with_pending(dir: &Path, pending: u64) {
    let s = reopen(dir).unwrap();
    let st = s.stats(0, 10, u64::MAX).unwrap();
    assert_eq!(st.pending, pending);
    assert_eq!(st, s.stats_by_scan(0, 10, u64::MAX).unwrap());
}

/// A checkpoint whose commit is durable but whose journal reached the tree only in part (a
/// crash after its first slice): the reopen applies the journal again, and the store is that
/// checkpoint's state, due index and counts included.
#[test]
fn a_checkpoint_cut_short_while_its_journal_is_applied_is_whole_after_reopen() {
    let ids_and_due = |s: &Store| -> Vec<(String, u64)> {
        let entries = s.entries().unwrap().into_iter();
        entries.map(|e| (e.id, e.next_poll_ms)).collect()
    };
    let dir = tempfile::tempdir().unwrap();
    let expected: Vec<(String, u64)>;
    {
        let s = Store::open(dir.path()).unwrap();
        // Payment `<prefix><i>` with `status`, read at `offset`.
        let put = |prefix: &str, i: i64, status: &str, offset: i64| {
            apply(
                &s,
                &create(&format!("{prefix}{i:03}"), status),
                None,
                offset,
                1000,
                600,
            );
        };
        for i in 0..600 {
            put("a", i, "pending", i + 1);
        }
        s.checkpoint().unwrap();
        // Removals, new payments and moved due times: more than one slice of each.
        for i in 0..300 {
            put("a", i, "succeeded", 601 + i);
        }
        for i in 0..400 {
            put("b", i, "pending", 901 + i);
        }
        for i in 300..600 {
            s.update(&format!("a{i:03}"), |e| e.next_poll_ms = 5_000 + i as u64)
                .unwrap();
        }
        expected = ids_and_due(&s);
        let cut = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            s.checkpoint_with(|stage| {
                if stage == Stage::Applying {
                    panic!("crash after the first slice");
                }
            })
        }));
        assert!(cut.is_err());
    }
    // As the crash left it: the commit is there, the entries are part old, part new.
    raw(dir.path(), |db| {
        let held = db.scan_prefix(P).count();
        assert_ne!(held, expected.len(), "the cut did not leave a partial tree");
        assert_eq!(
            db.get(META_ENTRIES).unwrap().unwrap().as_ref(),
            (expected.len() as u64).to_be_bytes()
        );
    });
    let s = reopen(dir.path()).unwrap();
    assert_eq!(ids_and_due(&s), expected);
    assert_eq!(s.stored(&t(0)).unwrap(), Some(1300));
    let stats = s.stats(u64::MAX / 2, 600, 10).unwrap();
    assert_eq!((stats.pending, stats.due_now), (700, 700));
    assert_eq!(
        s.due(u64::MAX / 2, 10_000, |_| false, |_| true)
            .unwrap()
            .len(),
        700
    );
}
