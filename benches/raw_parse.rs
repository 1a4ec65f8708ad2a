//! The physical limit `scripts/bench` compares replay with: read a file of JSON lines and parse
//! each line with serde_json, doing nothing else, on one core.
//!
//! `cargo run --release --bin raw-parse -- FILE` prints one JSON line: lines, bytes, and
//! lines per second for two parses: into `serde_json::Value` (a full tree, what any consumer
//! that looks at the fields needs at least) and into `IgnoredAny` (validation only, the floor);
//! and, for the split of replay's time, paystream's own decoder alone.

use std::io::BufRead;
use std::time::Instant;

fn pass(path: &str, mut parse: impl FnMut(&[u8]) -> bool) -> (u64, u64, f64) {
    let f = std::fs::File::open(path).expect("input file");
    let mut r = std::io::BufReader::with_capacity(1 << 20, f);
    let mut line = Vec::with_capacity(64 * 1024);
    let (mut n, mut bytes, mut bad) = (0u64, 0u64, 0u64);
    let t = Instant::now();
    loop {
        line.clear();
        if r.read_until(b'\n', &mut line).expect("read") == 0 {
            break;
        }
        bytes += line.len() as u64;
        let text = line.trim_ascii();
        if !text.is_empty() && text != b"null" && !parse(text) {
            bad += 1;
        }
        n += 1;
    }
    assert_eq!(bad, 0, "every line parses");
    (n, bytes, t.elapsed().as_secs_f64())
}

fn main() {
    let path = std::env::args().nth(1).expect("usage: raw-parse FILE");
    // A warm-up pass brings the file into the page cache, as replay finds it after generation.
    pass(&path, |_| true);
    let (n, bytes, value_s) = pass(&path, |l| {
        serde_json::from_slice::<serde_json::Value>(l).is_ok()
    });
    let (_, _, ignored_s) = pass(&path, |l| {
        serde_json::from_slice::<serde::de::IgnoredAny>(l).is_ok()
    });
    let opts = paystream::decode::DecodeOptions::default();
    let (_, _, decode_s) = pass(&path, |l| {
        paystream::decode::decode_for_state(Some(l), &opts).is_ok()
    });
    println!(
        "{}",
        serde_json::json!({
            "lines": n,
            "bytes": bytes,
            "value_lines_per_s": n as f64 / value_s,
            "ignored_any_lines_per_s": n as f64 / ignored_s,
            "paystream_decode_lines_per_s": n as f64 / decode_s,
        })
    );
}
