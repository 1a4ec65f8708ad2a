//! sled durability: nothing acknowledged is lost, whatever instant the process dies at.
//!
//! A child process (this test binary, running `durability_child_writer`) applies a
//! deterministic stream of CDC events to a [`Store`] with poll-like updates in between,
//! checkpoints after random batches and prints `acked N` once a checkpoint holding offset N
//! returned (the moment the daemon would commit N to Kafka). The parent SIGKILLs it at a
//! random instant, or the child aborts itself inside a checkpoint, between the batch write and
//! the flush. Then the parent reopens the store (which runs the recovery check) and asserts:
//! - the stored offset is at least the last acknowledged one (nothing acked was lost);
//! - the entries are exactly those the events before the stored offset imply (state and offset
//!   moved together: no torn checkpoint);
//! - the next run resumes from there (the child continues on the same directory).
//!
//! `PAYSTREAM_DURABILITY_ROUNDS` sets the number of kills (60 here; `scripts/crash-test --long`
//! runs more).

mod common;

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::Duration;

use paystream::change::ChangeEvent;
use paystream::decode::{decode_value, DecodeOptions};
use paystream::state::{Stage, Store};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const TOPIC: &str = "cdc";

/// The one partition the children write.
fn cdc() -> paystream::state::Position {
    paystream::state::Position::kafka(TOPIC, 0)
}
const IDS: i64 = 400;

/// The event at `offset`: a pure function, so parent and child agree without talking.
fn event_at(offset: i64) -> (ChangeEvent, Option<String>) {
    let id = (offset * 7919 + 13) % IDS;
    let row = |status: &str| {
        format!(
            r#"{{"op":"{op}","after":{{"id":{id},"idempotency_key":"k{id}","amount":"{offset}.25","currency":"eur","status":"{status}","stripe_payment_intent_id":"pi_{id}"}}}}"#,
            op = if status == "pending" && offset % 3 == 0 {
                "c"
            } else {
                "u"
            }
        )
    };
    let json = match offset % 10 {
        0..=5 => row("pending"),
        6 | 7 => row(if offset % 4 == 0 {
            "succeeded"
        } else {
            "failed"
        }),
        8 => format!(r#"{{"op":"d","before":{{"id":{id}}}}}"#),
        _ => {
            return (
                decode_value(None, &DecodeOptions::default()).unwrap(),
                Some(id.to_string()),
            )
        }
    };
    (
        decode_value(Some(json.as_bytes()), &DecodeOptions::default()).unwrap(),
        None,
    )
}

/// What the events before `end` imply: the model, independent of the store's code.
fn implied(end: i64) -> BTreeSet<String> {
    let mut pending = BTreeSet::new();
    for off in 0..end {
        let id = ((off * 7919 + 13) % IDS).to_string();
        if off % 10 <= 5 {
            pending.insert(id);
        } else {
            pending.remove(&id);
        }
    }
    pending
}

/// Not a test on its own: the writer the kill test runs in a child process (it is ignored in a
/// plain `cargo test` and needs `PAYSTREAM_DURABILITY_DIR`).
#[test]
#[ignore]
fn durability_child_writer() {
    let dir = std::env::var("PAYSTREAM_DURABILITY_DIR").expect("run by durability test only");
    let seed: u64 = std::env::var("PAYSTREAM_DURABILITY_SEED")
        .unwrap()
        .parse()
        .unwrap();
    let mut rng = StdRng::seed_from_u64(seed);
    // Some runs die inside a checkpoint: after its commit is written and before the flush, or
    // after a slice of its journal reached the tree.
    let abort_at_checkpoint: Option<u32> = rng.gen_bool(0.4).then(|| rng.gen_range(0..40));
    let mut abort_at_slice: Option<u32> = rng.gen_bool(0.5).then(|| rng.gen_range(0..3));
    let store = Store::open(std::path::Path::new(&dir)).expect("open");
    let at = cdc();
    let mut next = store.stored(&at).unwrap().unwrap_or(0);
    let mut out = std::io::stdout().lock();
    for n in 0.. {
        for _ in 0..rng.gen_range(1..60) {
            let (ev, key) = event_at(next);
            store
                .apply_event(&ev, key.as_deref(), (&at, next + 1), 1_000, 50, "pending")
                .unwrap();
            next += 1;
            // A poll result in between: reschedules a payment (moves its due-index row).
            let id = rng.gen_range(0..IDS).to_string();
            let due = rng.gen_range(0..10_000);
            store
                .update(&id, |e| {
                    e.polls += 1;
                    e.next_poll_ms = due;
                })
                .unwrap();
        }
        writeln!(out, "checkpoint {next}").unwrap();
        out.flush().unwrap();
        store
            .checkpoint_with(|stage| {
                if abort_at_checkpoint != Some(n) {
                    return;
                }
                match (stage, abort_at_slice) {
                    (Stage::Committed, None) => {
                        writeln!(out, "abort between write and flush").unwrap();
                    }
                    (Stage::Applying, Some(0)) => {
                        writeln!(out, "abort while applying the journal").unwrap();
                    }
                    (Stage::Applying, Some(k)) => {
                        abort_at_slice = Some(k - 1);
                        return;
                    }
                    _ => return,
                }
                out.flush().unwrap();
                std::process::abort();
            })
            .unwrap();
        writeln!(out, "acked {next}").unwrap();
        out.flush().unwrap();
    }
}

#[test]
fn kill_at_any_instant_loses_nothing_acknowledged() {
    let rounds = common::knob("PAYSTREAM_DURABILITY_ROUNDS", 60);
    let seed = common::knob("PAYSTREAM_DURABILITY_SEED", rand::random::<u32>() as u64);
    eprintln!("durability: {rounds} rounds, seed {seed}");
    let mut rng = StdRng::seed_from_u64(seed);
    let dir = tempfile::tempdir().unwrap();
    let (mut acked_total, mut in_checkpoint, mut aborted, mut in_journal) = (0i64, 0, 0, 0);
    let mut last_acked = 0i64;
    for round in 0..rounds {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "durability_child_writer",
                "--ignored",
                "--nocapture",
                "-q",
            ])
            .env("PAYSTREAM_DURABILITY_DIR", dir.path())
            .env("PAYSTREAM_DURABILITY_SEED", rng.gen::<u64>().to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let reader = std::thread::spawn(move || {
            BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
                .collect::<Vec<String>>()
        });
        std::thread::sleep(Duration::from_millis(rng.gen_range(20..250)));
        let _ = child.kill();
        let status = child.wait().unwrap();
        let lines = reader.join().unwrap();
        if let Some(a) = lines.iter().rev().find_map(|l| l.strip_prefix("acked ")) {
            last_acked = a.parse().unwrap();
        }
        // The writer's own last line says where it died: after "checkpoint N" (or "abort")
        // without "acked N", it died inside the checkpoint.
        let died_in_checkpoint = lines
            .iter()
            .rev()
            .find(|l| {
                ["checkpoint ", "acked ", "abort "]
                    .iter()
                    .any(|p| l.starts_with(p))
            })
            .is_some_and(|l| !l.starts_with("acked"));
        in_checkpoint += usize::from(died_in_checkpoint);
        aborted += usize::from(lines.iter().any(|l| l.starts_with("abort")));
        in_journal += usize::from(lines.iter().any(|l| l.starts_with("abort while applying")));

        let at = cdc();
        let store = Store::open(dir.path())
            .unwrap_or_else(|e| panic!("round {round} ({status}): the store does not reopen: {e}"));
        let stored = store.stored(&at).unwrap().unwrap_or(0);
        assert!(
            stored >= last_acked,
            "round {round}: acknowledged offset {last_acked} lost; the store resumes at {stored}"
        );
        let held: BTreeSet<String> = store.entries().unwrap().into_iter().map(|e| e.id).collect();
        assert_eq!(
            held,
            implied(stored),
            "round {round}: state is not the state of its own offset {stored} (seed {seed})"
        );
        acked_total = stored;
    }
    eprintln!(
        "durability: {rounds} kills ({aborted} aborts inside a checkpoint, {in_journal} of them while its journal was applied; {in_checkpoint} deaths inside a checkpoint in all), {acked_total} events made durable, every reopen passed the recovery check"
    );
    assert!(acked_total > 0, "the writer made progress");
}

/// sled 0.34.7 opens its highest `snap.*` file, `.generating` ones included, and refuses to open
/// when that one is partial, which is what a kill -9 during snapshot generation leaves (seen in
/// tests/crash_run.rs: "empty/corrupt snapshot file found", then "Read corrupted data"). The
/// store removes such a file and opens with everything checkpointed intact.
#[test]
fn an_incomplete_sled_snapshot_left_by_a_crash_does_not_stop_the_store() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = Store::open(dir.path()).unwrap();
        let at = cdc();
        for off in 0..50 {
            let (ev, key) = event_at(off);
            store
                .apply_event(&ev, key.as_deref(), (&at, off + 1), 1_000, 50, "pending")
                .unwrap();
        }
        store.checkpoint_with(|_| {}).unwrap();
    }
    // As sled's write_snapshot leaves it when killed before its rename: a newer LSN, cut short.
    let partial = dir.path().join("snap.00000000FFFFFFFF.generating");
    std::fs::write(&partial, b"cut short").unwrap();
    // sled's pool may still hold the dropped store's lock for a moment; wait as Store::open does.
    let alone = paystream::state::wait_for_lock(|| sled::Config::new().path(dir.path()).open());
    assert!(
        matches!(alone, Err(sled::Error::Corruption { .. })),
        "sled itself refuses the store: {alone:?}"
    );
    drop(alone);
    let store = Store::open(dir.path()).expect("the store opens");
    let at = cdc();
    assert!(!partial.exists());
    assert_eq!(store.stored(&at).unwrap(), Some(50));
    let held: BTreeSet<String> = store.entries().unwrap().into_iter().map(|e| e.id).collect();
    assert_eq!(held, implied(50));
}
