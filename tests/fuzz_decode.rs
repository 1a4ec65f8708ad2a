//! A bounded, deterministic fuzz run of the decoder, in CI on every change.
//!
//! Seeds: every real Debezium event shape in `../shared/debezium` plus the kept corpus in
//! `tests/fuzz-corpus/decode/` (inputs that once broke something, and hand-made edge cases).
//! Each round mutates a seed (bit flips, byte edits, truncation, splices of two seeds, JSON
//! tokens swapped for extreme ones) and asserts the decoder's contract:
//! - it never panics, on values or keys, whatever the bytes;
//! - an accepted event's amount is an exact decimal (digits, one optional point, no exponent)
//!   and its id is not empty;
//! - it is deterministic (the same bytes decode the same way twice);
//! - the fast path (`decode_fast`, what the daemon runs) gives exactly the general decoder's
//!   event, rows and table name aside, wherever it answers, and `decode_for_state` equals the general
//!   decoder's answer (errors included) everywhere. The seeds include generated events in
//!   every decimal mode, schemas on and off, so the fast path is reached often.
//!
//! An input that breaks the contract is written to `target/fuzz-failures/` and named in the
//! failure; add it to the corpus once fixed. `PAYSTREAM_FUZZ_ITERS` sets the rounds (20000
//! here; `scripts/crash-test --long` runs a million) and `PAYSTREAM_FUZZ_SEED` replays a run.

mod common;

use std::path::PathBuf;

use paystream::decode::{decode_fast, decode_for_state, decode_key, decode_value, DecodeOptions};
use paystream::replay::generate::{generate, DecimalMode, GenSpec};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

fn seeds() -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let shared = std::env::var_os("PAYSTREAM_SHARED_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| common::root().join("../shared"));
    for dir in [
        shared.join("debezium/payments"),
        shared.join("debezium/doc"),
        common::root().join("tests/fuzz-corpus/decode"),
    ] {
        let Ok(rd) = std::fs::read_dir(&dir) else {
            continue;
        };
        let mut files: Vec<PathBuf> = rd.map(|e| e.unwrap().path()).collect();
        files.sort();
        for f in files {
            out.push(std::fs::read(f).unwrap());
        }
    }
    // Events as `paystream gen-events` writes them, the shape the benchmarks measure.
    for (decimal, schemas) in [
        (DecimalMode::Precise, false),
        (DecimalMode::Precise, true),
        (DecimalMode::String, true),
        (DecimalMode::Double, true),
    ] {
        let spec = GenSpec {
            payments: 3,
            pending_fraction: 0.3,
            delete_fraction: 0.5,
            in_flight: 3,
            schemas,
            decimal,
            seed: 5,
        };
        let mut buf = Vec::new();
        generate(&spec, &mut buf).unwrap();
        out.extend(
            buf.split(|b| *b == b'\n')
                .filter(|l| l.len() > 4)
                .map(<[u8]>::to_vec),
        );
    }
    assert!(
        out.len() >= 10,
        "too few seeds ({}); is ../shared there?",
        out.len()
    );
    out
}

const TOKENS: &[&[u8]] = &[
    b"null",
    b"true",
    b"-1",
    b"0",
    b"1e400",
    b"-0.0",
    b"18446744073709551616",
    b"\"\"",
    b"\"__debezium_unavailable_value\"",
    b"{}",
    b"[]",
    b"\"AA==\"",
    b"\"////////////////\"",
    b"\"\\u0000\"",
    b"\"\\ud800\"",
    b"99999999999999999999999999999999999999999",
    b"{\"scale\":-5,\"value\":\"AQ==\"}",
    b"\"c\"",
    b"\"d\"",
    b"\"t\"",
    b"\"m\"",
];

fn mutate(rng: &mut StdRng, seeds: &[Vec<u8>]) -> Vec<u8> {
    let mut v = seeds[rng.gen_range(0..seeds.len())].clone();
    for _ in 0..rng.gen_range(1..=4) {
        let len = v.len().max(1);
        match rng.gen_range(0..7) {
            0 if !v.is_empty() => {
                let i = rng.gen_range(0..v.len());
                v[i] ^= 1 << rng.gen_range(0..8);
            }
            1 if !v.is_empty() => {
                let i = rng.gen_range(0..v.len());
                v[i] = rng.gen();
            }
            2 => v.truncate(rng.gen_range(0..len)),
            3 if !v.is_empty() => {
                let i = rng.gen_range(0..v.len());
                v.remove(i);
            }
            4 => {
                let other = &seeds[rng.gen_range(0..seeds.len())];
                let cut = rng.gen_range(0..len.min(v.len() + 1));
                let from = rng.gen_range(0..other.len().max(1));
                v.truncate(cut);
                v.extend_from_slice(&other[from.min(other.len())..]);
            }
            _ => {
                // Replace a JSON scalar (a run after ':' up to ',' or '}') with an extreme token.
                let colons: Vec<usize> = v
                    .iter()
                    .enumerate()
                    .filter(|(_, b)| **b == b':')
                    .map(|(i, _)| i)
                    .collect();
                if let Some(&c) = colons.get(rng.gen_range(0..colons.len().max(1))) {
                    let end = v[c + 1..]
                        .iter()
                        .position(|b| *b == b',' || *b == b'}')
                        .map_or(v.len(), |p| c + 1 + p);
                    let tok = TOKENS[rng.gen_range(0..TOKENS.len())];
                    v.splice(c + 1..end, tok.iter().copied());
                }
            }
        }
    }
    v
}

fn exact_decimal(s: &str) -> bool {
    let s = s.strip_prefix('-').unwrap_or(s);
    let mut parts = s.split('.');
    let int = parts.next().unwrap_or("");
    let frac = parts.next();
    parts.next().is_none()
        && !int.is_empty()
        && int.bytes().all(|b| b.is_ascii_digit())
        && frac.is_none_or(|f| !f.is_empty() && f.bytes().all(|b| b.is_ascii_digit()))
}

fn save(input: &[u8]) -> PathBuf {
    let dir = common::root().join("target/fuzz-failures");
    std::fs::create_dir_all(&dir).unwrap();
    let name = format!("{:016x}", {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        input.hash(&mut h);
        h.finish()
    });
    let p = dir.join(name);
    std::fs::write(&p, input).unwrap();
    p
}

#[test]
fn decoder_survives_mutated_debezium_events() {
    let iters = common::knob("PAYSTREAM_FUZZ_ITERS", 20_000);
    let seed = common::knob("PAYSTREAM_FUZZ_SEED", rand::random::<u32>() as u64);
    let seeds = seeds();
    let opts = DecodeOptions::default();
    let mut rng = StdRng::seed_from_u64(seed);
    let (mut accepted, mut rejected, mut fast_answers) = (0u64, 0u64, 0u64);
    // Quiet the default panic message: a panic is reported with the saved input instead.
    std::panic::set_hook(Box::new(|_| {}));
    // Every seed as it is first, then the mutations.
    for i in 0..seeds.len() + iters as usize {
        let input = match seeds.get(i) {
            Some(s) => s.clone(),
            None => mutate(&mut rng, &seeds),
        };
        let outcome = std::panic::catch_unwind(|| {
            let a = decode_value(Some(&input), &opts);
            let b = decode_value(Some(&input), &opts);
            let _ = decode_key(&input, &opts);
            (
                a,
                b,
                decode_fast(&input, &opts),
                decode_for_state(Some(&input), &opts),
            )
        });
        let (a, b, fast, for_state) = match outcome {
            Ok(r) => r,
            Err(_) => {
                let _ = std::panic::take_hook();
                panic!(
                    "decoder panicked on {} (seed {seed})",
                    save(&input).display()
                );
            }
        };
        let same = match (&a, &b) {
            (Ok(x), Ok(y)) => {
                serde_json::to_string(x).unwrap() == serde_json::to_string(y).unwrap()
            }
            (Err(x), Err(y)) => x.to_string() == y.to_string(),
            _ => false,
        };
        let contract = match &a {
            Ok(ev) => ev.payment.as_ref().is_none_or(|p| {
                !p.id.is_empty()
                    && match &p.amount {
                        paystream::change::Col::Set(a) => exact_decimal(a),
                        paystream::change::Col::Unknown => true,
                    }
            }),
            Err(_) => true,
        };
        let lean = a.clone().map(|mut ev| {
            ev.before = None;
            ev.after = None;
            ev.table = None;
            ev
        });
        if let Some(f) = &fast {
            fast_answers += 1;
            if lean.as_ref().ok() != Some(f) {
                let _ = std::panic::take_hook();
                panic!(
                    "fast path differs on {}: fast {f:?}, general {a:?} (seed {seed})",
                    save(&input).display()
                );
            }
        }
        if for_state != lean {
            let _ = std::panic::take_hook();
            panic!(
                "decode_for_state differs on {}: {for_state:?}, general {a:?} (seed {seed})",
                save(&input).display()
            );
        }
        if !same || !contract {
            let _ = std::panic::take_hook();
            panic!(
                "decoder broke its contract (deterministic: {same}) on {}: {a:?} (seed {seed})",
                save(&input).display()
            );
        }
        match a {
            Ok(_) => accepted += 1,
            Err(_) => rejected += 1,
        }
    }
    let _ = std::panic::take_hook();
    eprintln!(
        "fuzz: {iters} mutated inputs from {} seeds (seed {seed}): {accepted} decoded ({fast_answers} also by the fast path, identically), {rejected} rejected with a reason, no panic",
        seeds.len()
    );
    assert!(
        fast_answers * 10 > accepted,
        "the fast path answers a real share of the accepted inputs ({fast_answers} of {accepted})"
    );
    assert!(
        accepted > 0 && rejected > 0,
        "the mutations reach both paths"
    );
}
