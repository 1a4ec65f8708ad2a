//! `paystream replay` as users run it: a generated file of Debezium events (plus an
//! undecodable line) into a fresh data dir, read back with `paystream state`; resuming after
//! a clean end and after `kill -9`. Needs no servers: replay reads files and writes sled.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use paystream::replay::generate::{generate, DecimalMode, GenSpec};

fn write_events(path: &Path, payments: u64, poison_at: Option<usize>) -> u64 {
    let spec = GenSpec {
        payments,
        pending_fraction: 0.1,
        delete_fraction: 0.05,
        in_flight: 500,
        schemas: false,
        decimal: DecimalMode::Precise,
        seed: 11,
    };
    let mut buf = Vec::new();
    let sum = generate(&spec, &mut buf).unwrap();
    if let Some(at) = poison_at {
        let mut lines: Vec<&[u8]> = buf.split(|b| *b == b'\n').collect();
        lines.insert(at, b"{\"op\":\"c\",\"after\":{\"id\":\"p1\"");
        buf = lines.join(&b'\n');
    }
    std::fs::write(path, buf).unwrap();
    sum.pending
}

fn replay(input: &Path, data: &Path, extra: &[&str]) -> serde_json::Value {
    let (code, out, err) = common::output(
        Command::new(env!("CARGO_BIN_EXE_paystream"))
            .args(["replay", "--no-poll", "--input"])
            .arg(input)
            .arg("--data-dir")
            .arg(data)
            .args(extra),
    );
    assert_eq!(code, 0, "replay failed: {err}");
    let last = out.lines().last().expect("a summary line");
    serde_json::from_str(last).unwrap_or_else(|e| panic!("{last:?}: {e}"))
}

fn state_pending(data: &Path) -> u64 {
    let (code, out, err) = common::output(
        Command::new(env!("CARGO_BIN_EXE_paystream"))
            .args(["state", "--metrics-addr", "127.0.0.1:1", "--data-dir"])
            .arg(data)
            .args(["export"]),
    );
    assert_eq!(code, 0, "state export failed: {err}");
    out.lines().count() as u64
}

#[test]
fn replay_counts_dead_letters_and_resumes_where_it_stopped() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("events.jsonl");
    let data = dir.path().join("state");
    let pending = write_events(&input, 2_000, Some(100));
    let lines = std::fs::read(&input)
        .unwrap()
        .iter()
        .filter(|b| **b == b'\n')
        .count() as u64;

    let s = replay(&input, &data, &[]);
    assert_eq!(s["events"], lines, "{s}");
    assert_eq!(s["dead_lettered"], 1, "{s}");
    assert_eq!(s["pending"], pending, "{s}");
    assert_eq!(s["tracked"], 2_000, "{s}");
    assert_eq!(
        s["applied"].as_u64().unwrap() + s["ignored"].as_u64().unwrap() + 1,
        lines,
        "{s}"
    );
    assert!(s["peak_rss_bytes"].as_u64().unwrap() > 0, "{s}");
    assert_eq!(state_pending(&data), pending);

    // The dead letter names the line, the reason, and keeps the bytes.
    let dl = std::fs::read_to_string(data.join("replay-dead-letters.jsonl")).unwrap();
    let dl: serde_json::Value = serde_json::from_str(dl.lines().next().unwrap()).unwrap();
    assert_eq!(dl["offset"], 100, "{dl}");
    assert_eq!(dl["reason"], "invalid_json", "{dl}");
    assert_eq!(
        dl["value"], "{\"op\":\"c\",\"after\":{\"id\":\"p1\"",
        "{dl}"
    );
    assert_eq!(dl["topic"], "replay:events.jsonl", "{dl}");

    // Again: everything was checkpointed with its position, so nothing is read twice.
    let again = replay(&input, &data, &[]);
    assert_eq!(again["events"], 0, "{again}");
    assert_eq!(again["skipped"], lines, "{again}");
    assert_eq!(again["pending"], pending, "{again}");
}

#[test]
fn replay_killed_at_any_moment_resumes_without_losing_a_pending_payment() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("events.jsonl");
    let data = dir.path().join("state");
    let pending = write_events(&input, 60_000, None);
    // Killed mid-file (checkpoints every 20 ms), three times, then run to the end.
    let mut killed_mid_file = 0;
    for wait_ms in [150u64, 400, 800] {
        let mut child = Command::new(env!("CARGO_BIN_EXE_paystream"))
            .args([
                "replay",
                "--no-poll",
                "--checkpoint-interval",
                "20ms",
                "--input",
            ])
            .arg(&input)
            .arg("--data-dir")
            .arg(&data)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let started = Instant::now();
        while started.elapsed() < Duration::from_millis(wait_ms) {
            if child.try_wait().unwrap().is_some() {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        if child.try_wait().unwrap().is_none() {
            child.kill().unwrap(); // SIGKILL
            killed_mid_file += 1;
        }
        child.wait().unwrap();
    }
    let s = replay(&input, &data, &[]);
    assert!(
        killed_mid_file > 0 && s["skipped"].as_u64().unwrap() > 0,
        "no kill landed mid-file (killed {killed_mid_file}, {s}): the file is too small for this machine"
    );
    assert_eq!(s["pending"], pending, "{s}");
    assert_eq!(state_pending(&data), pending);
}
