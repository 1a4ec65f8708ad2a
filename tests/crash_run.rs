//! `kill -9` at random instants, on the real servers.
//!
//! A generated Debezium stream for thousands of payments (creates, snapshot reads, pending
//! updates, final updates, deletes, tombstones, replayed windows, poison messages) is published
//! while `paystream run` is SIGKILLed again and again (`PAYSTREAM_CRASH_KILLS`, 20 here, 100+ by
//! `scripts/crash-test --long`) and the updater with it half of the time. A few dozen payments
//! have real PaymentIntents in the Stripe emulator; the test plays Debezium for the updater's
//! writes (each status change in Postgres is published back as an update).
//!
//! After the last restart and a drain it checks:
//! - the pending payments in sled are exactly those the published stream implies (folded by a
//!   model written here, not by paystream's code), and the stored offsets cover the topic;
//! - every payment Stripe resolved has its final status in Postgres, changed exactly once,
//!   pending → final (an audit trigger records every change), and the 3DS ones stay pending;
//! - every status event agrees with Stripe, and replays carry the same event_id;
//! - every poison message is on the dead-letter topic, and nothing else is.

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rdkafka::producer::{FutureProducer, FutureRecord};

/// What one CDC message implies for the set of pending payments.
#[derive(Debug, Clone, Copy)]
enum Implies {
    Pending(i64),
    Gone(i64),
    Poison,
}

#[derive(Clone)]
struct Msg {
    key: Option<Vec<u8>>,
    value: Option<Vec<u8>>,
    implies: Implies,
}

/// Where a message landed, in publish order.
struct Published {
    implies: Implies,
    partition: i32,
    offset: i64,
}

/// Publishes one message at a time and logs where it landed: the log's order is the topic's
/// order, whatever tasks publish.
struct Publisher {
    producer: FutureProducer,
    topic: String,
    log: tokio::sync::Mutex<Vec<Published>>,
}

impl Publisher {
    async fn send(&self, m: &Msg) {
        let mut log = self.log.lock().await;
        let (partition, offset) = loop {
            let mut rec: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(&self.topic);
            if let Some(k) = &m.key {
                rec = rec.key(k);
            }
            if let Some(v) = &m.value {
                rec = rec.payload(v);
            }
            match self.producer.send(rec, Duration::from_secs(10)).await {
                Ok(d) => break (d.partition, d.offset),
                Err((e, _)) => {
                    eprintln!("publish failed ({e}); retrying");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        };
        log.push(Published {
            implies: m.implies,
            partition,
            offset,
        });
    }
}

/// The model: the pending set a stream implies. Deliberately independent of `paystream::state`.
fn fold(log: &[Published]) -> BTreeSet<String> {
    let mut pending = BTreeSet::new();
    for p in log {
        match p.implies {
            Implies::Pending(id) => {
                pending.insert(id.to_string());
            }
            Implies::Gone(id) => {
                pending.remove(&id.to_string());
            }
            Implies::Poison => {}
        }
    }
    pending
}

fn upsert(op: &str, r: &Row, rng: &mut StdRng) -> Msg {
    Msg {
        key: Some(cdc_key(r.id)),
        value: Some(cdc_value(op, r, rng.gen_bool(0.3))),
        implies: if r.status == "pending" {
            Implies::Pending(r.id)
        } else {
            Implies::Gone(r.id)
        },
    }
}

fn poison(rng: &mut StdRng, id: i64) -> Msg {
    let shapes: [&[u8]; 6] = [
        b"{\"op\":\"c\",\"after\":{\"id\":",
        b"{\"payload\":{\"op\":\"x\",\"after\":{\"id\":1}}}",
        b"\x00\x01\x02\xff\xfe binary",
        b"[1,2,3]",
        b"{\"op\":\"c\",\"after\":{\"id\":7,\"idempotency_key\":\"k\",\"amount\":\"!!notbase64\",\"currency\":\"usd\",\"status\":\"pending\"}}",
        b"{\"before\":null,\"after\":{\"id\":1,\"name\":\"alice\"},\"op\":\"c\",\"source\":{\"table\":\"customers\"}}",
    ];
    let v = shapes[rng.gen_range(0..shapes.len())].to_vec();
    Msg {
        key: rng.gen_bool(0.5).then(|| cdc_key(id)),
        value: Some(v),
        implies: Implies::Poison,
    }
}

/// The main stream: each payment's own events in order, payments interleaved, with replayed
/// windows (Debezium re-sends a range after a connector restart) and poison messages.
fn generate(rng: &mut StdRng, run: &str, base: i64, n: usize, stripe: &[Row]) -> Vec<Msg> {
    let mut scripts: Vec<Vec<Msg>> = Vec::new();
    for r in stripe {
        let mut evs = vec![upsert(if rng.gen_bool(0.2) { "r" } else { "c" }, r, rng)];
        if rng.gen_bool(0.3) {
            evs.push(upsert("u", r, rng));
        }
        scripts.push(evs);
    }
    for i in 0..n {
        let mut r = Row {
            id: base + i as i64,
            idempotency_key: format!("{run}-{i}"),
            amount: format!("{}.{:02}", rng.gen_range(0..100_000), rng.gen_range(0..100)),
            currency: "usd".into(),
            status: "pending".into(),
            intent: rng.gen_bool(0.5).then(|| format!("pi_missing_{run}_{i}")),
        };
        let mut evs = vec![upsert(if rng.gen_bool(0.1) { "r" } else { "c" }, &r, rng)];
        for _ in 0..rng.gen_range(0..=2) {
            r.amount = format!("{}.{:02}", rng.gen_range(0..100_000), rng.gen_range(0..100));
            evs.push(upsert("u", &r, rng));
        }
        let roll: f64 = rng.gen();
        if roll < 0.55 {
            r.status = if rng.gen_bool(0.5) {
                "succeeded"
            } else {
                "failed"
            }
            .into();
            evs.push(upsert("u", &r, rng));
        }
        if (0.55..0.9).contains(&roll) || (roll < 0.55 && rng.gen_bool(0.1)) {
            evs.push(Msg {
                key: Some(cdc_key(r.id)),
                value: Some(cdc_value("d", &r, false)),
                implies: Implies::Gone(r.id),
            });
            evs.push(Msg {
                key: Some(cdc_key(r.id)),
                value: None,
                implies: Implies::Gone(r.id),
            });
        }
        scripts.push(evs);
    }
    // Stripe's payments start within the first third, so they resolve while kills go on.
    let mut order: Vec<usize> = (stripe.len()..scripts.len()).collect();
    for i in 0..stripe.len() {
        let at = rng.gen_range(0..=order.len() / 3);
        order.insert(at, i);
    }
    let mut next_start = 0;
    let mut active: Vec<std::vec::IntoIter<Msg>> = Vec::new();
    let mut out: Vec<Msg> = Vec::new();
    while next_start < order.len() || !active.is_empty() {
        if next_start < order.len() && (active.len() < 32 || rng.gen_bool(0.2)) {
            active.push(std::mem::take(&mut scripts[order[next_start]]).into_iter());
            next_start += 1;
            continue;
        }
        let i = rng.gen_range(0..active.len());
        match active[i].next() {
            Some(m) => out.push(m),
            None => {
                active.swap_remove(i);
                continue;
            }
        }
        if rng.gen_bool(0.01) {
            let w = rng.gen_range(1..=40).min(out.len());
            let window: Vec<Msg> = out[out.len() - w..].to_vec();
            out.extend(window);
        }
        if rng.gen_bool(0.004) {
            out.push(poison(rng, base));
        }
    }
    out
}

/// Stripe's answer for each of the test's intents: the status its payment must end with.
struct StripeCase {
    row: Row,
    expect: &'static str,
}

async fn stripe_cases(s: &Stack, run: &str, base: i64) -> Vec<StripeCase> {
    let mut cases = Vec::new();
    // "search": the row has no intent id; the intent carries the row's idempotency key in its
    // metadata, and paystream finds it by searching.
    let kinds: [(&str, &str, usize); 5] = [
        ("4242424242424242", "succeeded", 12),
        ("4000000000000341", "pending", 6), // a decline is not final
        ("canceled", "failed", 6),
        ("4000002760003184", "pending", 4),
        ("search", "succeeded", 4),
    ];
    let mut i = 0;
    for (card, expect, n) in kinds {
        for _ in 0..n {
            let cents = 100 + i as i64;
            let key = format!("{run}-stripe-{i}");
            let pi = match card {
                "canceled" => Some(intent_canceled(&s.stripe, &cents.to_string())),
                "search" => {
                    let (_, st) = intent_with_card_keyed(
                        &s.stripe,
                        &cents.to_string(),
                        "4242424242424242",
                        Some(&key),
                    );
                    assert_eq!(st, "succeeded");
                    None
                }
                _ => Some(intent_with_card(&s.stripe, &cents.to_string(), card).0),
            };
            cases.push(StripeCase {
                row: Row {
                    id: base + i as i64,
                    idempotency_key: key,
                    amount: format!("{}.{:02}", cents / 100, cents % 100),
                    currency: "usd".into(),
                    status: "pending".into(),
                    intent: pi,
                },
                expect,
            });
            i += 1;
        }
    }
    cases
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill9_at_random_instants_loses_nothing() {
    let kills = knob("PAYSTREAM_CRASH_KILLS", 20) as usize;
    let payments = knob("PAYSTREAM_CRASH_PAYMENTS", 3000) as usize;
    let seed = knob("PAYSTREAM_CRASH_SEED", rand::random::<u32>() as u64);
    eprintln!("crash test: kills={kills} payments={payments} seed={seed} (PAYSTREAM_CRASH_SEED replays it)");
    let mut rng = StdRng::seed_from_u64(seed);

    let s = stack();
    let t = topics(s, "crash", 3).await;
    let run = t.run.clone();
    // Ids of this run: unique across runs sharing the database.
    let base: i64 = run.trim_start_matches("crash").parse::<i64>().unwrap() % 1_000_000 * 1_000_000;

    let db = pg(&s.pg_url).await;
    install_status_audit(&db).await;
    let cases = stripe_cases(s, &run, base).await;
    for c in &cases {
        insert_payment_with_id(&db, &c.row).await;
    }
    let stripe_rows: Vec<Row> = cases.iter().map(|c| c.row.clone()).collect();
    let stream = generate(&mut rng, &run, base + 1000, payments, &stripe_rows);
    let poison_count = stream
        .iter()
        .filter(|m| matches!(m.implies, Implies::Poison))
        .count();
    eprintln!(
        "stream: {} messages ({} poison), {} payments with Stripe intents",
        stream.len(),
        poison_count,
        cases.len()
    );

    let publisher = Arc::new(Publisher {
        producer: producer(&s.brokers),
        topic: t.cdc.clone(),
        log: Default::default(),
    });
    // Pace the stream over most of the kill phase (a kill and rejoin take about 6 s).
    let per_msg = Duration::from_secs_f64(kills as f64 * 5.0 / stream.len() as f64);
    let main_done = Arc::new(AtomicBool::new(false));
    let main_sent = Arc::new(AtomicUsize::new(0));
    let last_main_of: HashMap<i64, usize> = stream
        .iter()
        .enumerate()
        .filter_map(|(i, m)| match m.implies {
            Implies::Pending(id) | Implies::Gone(id) => Some((id, i)),
            Implies::Poison => None,
        })
        .collect();
    let main = {
        let (p, done, sent) = (publisher.clone(), main_done.clone(), main_sent.clone());
        tokio::spawn(async move {
            let started = Instant::now();
            for (i, m) in stream.iter().enumerate() {
                p.send(m).await;
                sent.store(i + 1, Ordering::SeqCst);
                let due = started + per_msg * (i as u32 + 1);
                tokio::time::sleep_until(due.into()).await;
            }
            done.store(true, Ordering::SeqCst);
        })
    };

    // Debezium for the updater's writes: each status change in Postgres is published back as an
    // update, once all of that payment's stream events are out.
    let confirmed = Arc::new(tokio::sync::Mutex::new(BTreeSet::<i64>::new()));
    let stop_confirmer = Arc::new(AtomicBool::new(false));
    let confirmer = {
        let (p, confirmed, stop, sent) = (
            publisher.clone(),
            confirmed.clone(),
            stop_confirmer.clone(),
            main_sent.clone(),
        );
        let ids: Vec<i64> = cases.iter().map(|c| c.row.id).collect();
        let last_main: Vec<usize> = ids.iter().map(|id| last_main_of[id]).collect();
        let pg_url = s.pg_url.clone();
        tokio::spawn(async move {
            let db = pg(&pg_url).await;
            let mut rng = StdRng::seed_from_u64(1);
            while !stop.load(Ordering::SeqCst) {
                let rows = db
                    .query(
                        "SELECT DISTINCT id FROM status_changes WHERE id = ANY($1)",
                        &[&ids],
                    )
                    .await
                    .unwrap();
                for r in rows {
                    let id: i64 = r.get(0);
                    let idx = ids.iter().position(|x| *x == id).unwrap();
                    if confirmed.lock().await.contains(&id)
                        || sent.load(Ordering::SeqCst) <= last_main[idx]
                    {
                        continue;
                    }
                    let now = read_payment(&db, id).await;
                    p.send(&upsert("u", &now, &mut rng)).await;
                    confirmed.lock().await.insert(id);
                }
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        })
    };

    let data = tempfile::tempdir().unwrap();
    let logs = log_dir(&run);
    eprintln!("logs: {}", logs.display());
    let port = free_port();
    let args = run_args(
        s,
        &t,
        data.path(),
        port,
        &[
            "--poll-interval",
            "2s",
            "--retry-backoff",
            "500ms",
            "--stripe-rps",
            "100",
            "--stripe-concurrency",
            "16",
        ],
    );
    let up_args = updater_args(
        s,
        &t.status,
        &format!("{run}-updater"),
        &["--batch-size", "5"],
    );
    let mut updater = spawn(&up_args, &logs.join("updater-0.log"));
    let mut updater_kills = 0;
    let (mut early, mut late) = (0, 0);
    for k in 0..kills {
        let mut daemon = spawn(&args, &logs.join(format!("run-{k}.log")));
        if rng.gen_bool(0.25) {
            // During start-up: opening state, spreading overdue polls, joining the group.
            tokio::time::sleep(Duration::from_millis(rng.gen_range(20..1500))).await;
            early += 1;
        } else {
            // While consuming, polling and checkpointing.
            let end = Instant::now() + Duration::from_secs(30);
            while http_get(port, "/readyz").map(|r| r.0) != Some(200) && Instant::now() < end {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            tokio::time::sleep(Duration::from_millis(rng.gen_range(0..3000))).await;
            late += 1;
        }
        if let Some(st) = daemon.0.try_wait().unwrap() {
            panic!(
                "paystream run exited by itself ({st}) before kill {k}:\n{}",
                std::fs::read_to_string(logs.join(format!("run-{k}.log"))).unwrap()
            );
        }
        daemon.kill9();
        if rng.gen_bool(0.5) {
            updater.kill9();
            updater_kills += 1;
            updater = spawn(&up_args, &logs.join(format!("updater-{updater_kills}.log")));
        }
    }
    eprintln!(
        "{kills} kills of paystream run ({early} during start-up, {late} while consuming), {updater_kills} of the updater; {} of {} messages published so far",
        main_sent.load(Ordering::SeqCst),
        last_main_of.values().max().map_or(0, |m| m + 1)
    );

    // The last run drains everything.
    let mut daemon = spawn(&args, &logs.join("run-final.log"));
    main.await.unwrap();
    let resolvable: BTreeSet<i64> = cases
        .iter()
        .filter(|c| c.expect != "pending")
        .map(|c| c.row.id)
        .collect();
    wait_for(
        "every Stripe-resolved payment written and confirmed",
        180,
        || async { confirmed.lock().await.is_superset(&resolvable) },
    )
    .await;
    stop_confirmer.store(true, Ordering::SeqCst);
    confirmer.await.unwrap();
    let high: i64 = high_watermarks(&s.brokers, &t.cdc)
        .iter()
        .map(|(_, h)| h)
        .sum();
    wait_for(
        "the daemon's stored offsets to reach the end of the topic",
        120,
        || async { metric(port, "paystream_stored_offset", &[]) as i64 == high },
    )
    .await;
    assert!(daemon.term().success(), "clean exit on SIGTERM");
    updater.term();
    assert_no_panic(&logs);

    // 1. State holds exactly the pending set the stream implies, and its offsets cover the topic.
    let log = publisher.log.lock().await;
    let expected = fold(&log);
    let store = paystream::state::Store::open(data.path()).unwrap();
    let entries = store.entries().unwrap();
    let held: BTreeSet<String> = entries.iter().map(|e| e.id.clone()).collect();
    let missing: Vec<_> = expected.difference(&held).collect();
    let extra: Vec<_> = held.difference(&expected).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "state differs from the stream: lost {missing:?}, extra {extra:?} (seed {seed})"
    );
    let stored: BTreeMap<i32, i64> = store
        .stored_offsets()
        .unwrap()
        .into_iter()
        .filter(|(topic, _, _)| *topic == t.cdc)
        .map(|(_, p, o)| (p, o))
        .collect();
    let hw: BTreeMap<i32, i64> = high_watermarks(&s.brokers, &t.cdc).into_iter().collect();
    assert_eq!(stored, hw, "stored offsets are the end of every partition");

    // 2. Postgres: Stripe's answer, written once, forward only.
    let ids: Vec<i64> = cases.iter().map(|c| c.row.id).collect();
    let audit = db
        .query(
            "SELECT id, old_status, new_status FROM status_changes WHERE id = ANY($1) ORDER BY id, at",
            &[&ids],
        )
        .await
        .unwrap();
    let mut changes: BTreeMap<i64, Vec<(String, String)>> = BTreeMap::new();
    for r in &audit {
        changes
            .entry(r.get(0))
            .or_default()
            .push((r.get(1), r.get(2)));
    }
    for c in &cases {
        let now = read_payment(&db, c.row.id).await;
        assert_eq!(
            now.status, c.expect,
            "payment {} ({:?})",
            c.row.id, c.row.intent
        );
        let want: Vec<(String, String)> = if c.expect == "pending" {
            vec![]
        } else {
            vec![("pending".into(), c.expect.into())]
        };
        assert_eq!(
            changes.get(&c.row.id).cloned().unwrap_or_default(),
            want,
            "payment {}: exactly one change, pending → final",
            c.row.id
        );
    }

    // 3. Status events agree with Stripe; a replay carries the same event_id.
    let expect_of: HashMap<String, &str> = cases
        .iter()
        .map(|c| (c.row.id.to_string(), c.expect))
        .collect();
    let mut event_ids: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let status_events = read_all(&s.brokers, &t.status);
    for (_, value, _) in &status_events {
        let ev: serde_json::Value = serde_json::from_slice(value.as_ref().unwrap()).unwrap();
        let id = ev["payment_id"].as_str().unwrap().to_string();
        assert_eq!(
            expect_of.get(&id).copied(),
            ev["status"].as_str(),
            "status event disagrees with Stripe: {ev}"
        );
        event_ids
            .entry(id)
            .or_default()
            .insert(ev["event_id"].as_str().unwrap().into());
    }
    assert_eq!(
        event_ids
            .keys()
            .map(|k| k.parse::<i64>().unwrap())
            .collect::<BTreeSet<_>>(),
        resolvable,
        "a status event for every resolved payment and no other"
    );
    assert!(
        event_ids.values().all(|s| s.len() == 1),
        "one event_id per payment"
    );

    // 4. Every poison message is dead-lettered (at least once), and nothing else is.
    let poison_at: BTreeSet<(i32, i64)> = log
        .iter()
        .filter(|p| matches!(p.implies, Implies::Poison))
        .map(|p| (p.partition, p.offset))
        .collect();
    let dead = read_all(&s.brokers, &t.dlq);
    let dead_at: BTreeSet<(i32, i64)> = dead
        .iter()
        .map(|(_, _, h)| {
            let h: HashMap<_, _> = h.iter().cloned().collect();
            assert!(!h["paystream.reason"].is_empty());
            (
                h["paystream.source.partition"].parse().unwrap(),
                h["paystream.source.offset"].parse().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        dead_at, poison_at,
        "dead letters are exactly the poison messages"
    );

    eprintln!(
        "after {kills} kills: {} messages, {} pending in state (= the stream's), {} resolved once in Postgres, {} status events ({} payments), {} dead letters for {} poison messages",
        log.len(),
        held.len(),
        resolvable.len(),
        status_events.len(),
        event_ids.len(),
        dead.len(),
        poison_at.len()
    );
}
