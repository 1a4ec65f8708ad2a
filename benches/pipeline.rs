//! Micro-benchmarks of the hot path, one per part: decode one event (general decoder and the
//! state fast path, schemas off and on, beside a plain serde_json parse of the same bytes),
//! apply one event to state, the due-index scan, and a checkpoint of N dirty keys.
//!
//! `cargo bench --bench pipeline` (add `-- --quick` for a short run). Whole-process figures
//! come from `scripts/bench`.

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use paystream::decode::{decode_for_state, decode_value, DecodeOptions};
use paystream::replay::generate::{generate, DecimalMode, GenSpec};
use paystream::state::Store;

/// Lines of a generated file (creates, updates, finals, deletes; tombstones left out).
fn lines(payments: u64, schemas: bool) -> Vec<Vec<u8>> {
    let spec = GenSpec {
        payments,
        pending_fraction: 0.02,
        delete_fraction: 0.05,
        in_flight: 100,
        schemas,
        decimal: DecimalMode::Precise,
        seed: 1,
    };
    let mut buf = Vec::new();
    generate(&spec, &mut buf).expect("generate");
    buf.split(|b| *b == b'\n')
        .filter(|l| l.len() > 4)
        .map(<[u8]>::to_vec)
        .collect()
}

fn decode(c: &mut Criterion) {
    let opts = DecodeOptions::default();
    for schemas in [false, true] {
        let events = lines(200, schemas);
        let name = if schemas { "schemas_on" } else { "schemas_off" };
        let mut g = c.benchmark_group(format!("decode/{name}"));
        g.throughput(Throughput::Elements(events.len() as u64));
        g.bench_function("serde_json_value", |b| {
            b.iter(|| {
                for e in &events {
                    black_box(serde_json::from_slice::<serde_json::Value>(e).is_ok());
                }
            })
        });
        g.bench_function("general", |b| {
            b.iter(|| {
                for e in &events {
                    black_box(decode_value(Some(e), &opts).is_ok());
                }
            })
        });
        g.bench_function("for_state", |b| {
            b.iter(|| {
                for e in &events {
                    black_box(decode_for_state(Some(e), &opts).is_ok());
                }
            })
        });
        g.finish();
    }
}

fn apply(c: &mut Criterion) {
    let opts = DecodeOptions::default();
    let events: Vec<_> = lines(2_000, false)
        .iter()
        .map(|l| decode_for_state(Some(l), &opts).expect("decodes"))
        .collect();
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(dir.path()).expect("store");
    let at = paystream::state::Position::kafka("bench", 0);
    let mut g = c.benchmark_group("state");
    g.throughput(Throughput::Elements(events.len() as u64));
    // Every event of 2,000 payments, in file order, then a checkpoint outside the timing so
    // the overlay does not grow across iterations.
    g.bench_function("apply_event", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for i in 0..iters {
                let t = Instant::now();
                for (n, ev) in events.iter().enumerate() {
                    let r = store.apply_event(
                        ev,
                        None,
                        (&at, (i as i64) * 1_000_000 + n as i64 + 1),
                        1_000,
                        600_000,
                        "pending",
                    );
                    black_box(r.expect("applies"));
                }
                total += t.elapsed();
                store.checkpoint().expect("checkpoint");
            }
            total
        })
    });
    g.finish();
}

/// A store holding `n` pending payments, checkpointed, due at 1..=n ms.
fn pending_store(n: u64) -> (tempfile::TempDir, Store) {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(dir.path()).expect("store");
    let at = paystream::state::Position::kafka("bench", 0);
    let opts = DecodeOptions::default();
    for i in 0..n {
        let line = format!(
            r#"{{"op":"c","after":{{"id":"p{i:08}","idempotency_key":"k{i}","amount":"12.34","currency":"usd","status":"pending","stripe_payment_intent_id":"pi_{i}"}}}}"#
        );
        let ev = decode_for_state(Some(line.as_bytes()), &opts).expect("decodes");
        store
            .apply_event(&ev, None, (&at, i as i64 + 1), 0, 1 + i, "pending")
            .expect("applies");
    }
    store.checkpoint().expect("checkpoint");
    (dir, store)
}

fn due_scan(c: &mut Criterion) {
    let (_dir, store) = pending_store(100_000);
    let mut g = c.benchmark_group("state");
    // What the scheduler asks each tick: up to 100 due payments, most overdue first.
    g.throughput(Throughput::Elements(100));
    g.bench_function("due_100_of_100k", |b| {
        b.iter(|| {
            black_box(
                store
                    .due(50_000, 100, |_| false, |_| true)
                    .expect("due")
                    .len(),
            )
        })
    });
    g.finish();
}

fn checkpoint(c: &mut Criterion) {
    let (_dir, store) = pending_store(100_000);
    let mut g = c.benchmark_group("checkpoint");
    g.sample_size(10);
    for dirty in [1_000u64, 10_000] {
        g.throughput(Throughput::Elements(dirty));
        g.bench_function(format!("{dirty}_dirty_of_100k"), |b| {
            let mut round = 0u64;
            b.iter_batched(
                || {
                    round += 1;
                    for i in 0..dirty {
                        let id = format!("p{:08}", (i * 7 + round) % 100_000);
                        store
                            .update(&id, |e| e.next_poll_ms = 1_000_000 + round)
                            .expect("update");
                    }
                },
                |_| black_box(store.checkpoint().expect("checkpoint").positions.len()),
                BatchSize::PerIteration,
            )
        });
    }
    g.finish();
}

criterion_group!(benches, decode, apply, due_scan, checkpoint);
criterion_main!(benches);
