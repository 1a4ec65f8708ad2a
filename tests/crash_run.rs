//! `kill -9` at random instants, on the real servers, with real Debezium in the loop.
//!
//! A generated workload for thousands of payments runs as SQL on the test's own table (inserts,
//! pending updates, final statuses written by someone else, deletes, which Debezium turns into
//! creates, updates, deletes and tombstones), with poison messages published among Debezium's
//! records, while `paystream run` is SIGKILLed again and again (`PAYSTREAM_CRASH_KILLS`, 20
//! here, 100+ by `scripts/crash-test --long`) and the updater with it half of the time. A few
//! dozen payments have real PaymentIntents in the Stripe emulator; Debezium carries the
//! updater's writes back.
//!
//! After the last restart and a drain it checks:
//! - the pending payments in sled are exactly the rows the table holds pending (the table is
//!   the model: nothing of paystream's computes it), and the stored offsets cover the topic;
//! - every payment Stripe resolved has its final status in Postgres, changed exactly once,
//!   pending → final (an audit trigger records every change), and the 3DS ones stay pending;
//! - every status event agrees with Stripe, and replays carry the same event_id;
//! - every poison message is on the dead-letter topic, and nothing else is.

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rdkafka::producer::{FutureProducer, FutureRecord};

/// One step of the payment service's work on the table, or a poison message (what Debezium
/// never writes, published by hand onto the same topic).
enum Change {
    Insert(Row),
    Update(Row),
    Delete(i64),
    Poison(Vec<u8>, Option<Vec<u8>>),
}

fn poison(rng: &mut StdRng, id: i64) -> Change {
    let shapes: [&[u8]; 6] = [
        b"{\"op\":\"c\",\"after\":{\"id\":",
        b"{\"payload\":{\"op\":\"x\",\"after\":{\"id\":1}}}",
        b"\x00\x01\x02\xff\xfe binary",
        b"[1,2,3]",
        b"{\"op\":\"c\",\"after\":{\"id\":7,\"idempotency_key\":\"k\",\"amount\":\"!!notbase64\",\"currency\":\"usd\",\"status\":\"pending\"}}",
        b"{\"before\":null,\"after\":{\"id\":1,\"name\":\"alice\"},\"op\":\"c\",\"source\":{\"table\":\"customers\"}}",
    ];
    let v = shapes[rng.gen_range(0..shapes.len())].to_vec();
    Change::Poison(v, rng.gen_bool(0.5).then(|| cdc_key(id)))
}

/// The main workload: each payment's own changes in order (insert, amount updates, maybe a
/// final status written by someone else, maybe a delete), payments interleaved, with poison
/// messages. Debezium turns each statement into its events; its re-sends after a Connect
/// restart are tests/debezium.rs's subject.
fn generate(rng: &mut StdRng, run: &str, base: i64, n: usize, stripe: &[Row]) -> Vec<Change> {
    let mut scripts: Vec<Vec<Change>> = Vec::new();
    for r in stripe {
        let mut evs = vec![Change::Insert(r.clone())];
        if rng.gen_bool(0.3) {
            evs.push(Change::Update(r.clone()));
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
        let mut evs = vec![Change::Insert(r.clone())];
        for _ in 0..rng.gen_range(0..=2) {
            r.amount = format!("{}.{:02}", rng.gen_range(0..100_000), rng.gen_range(0..100));
            evs.push(Change::Update(r.clone()));
        }
        let roll: f64 = rng.gen();
        if roll < 0.55 {
            r.status = if rng.gen_bool(0.5) {
                "succeeded"
            } else {
                "failed"
            }
            .into();
            evs.push(Change::Update(r.clone()));
        }
        if (0.55..0.9).contains(&roll) || (roll < 0.55 && rng.gen_bool(0.1)) {
            evs.push(Change::Delete(r.id));
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
    let mut active: Vec<std::vec::IntoIter<Change>> = Vec::new();
    let mut out: Vec<Change> = Vec::new();
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
        if rng.gen_bool(0.004) {
            out.push(poison(rng, base));
        }
    }
    out
}

/// Publishes a poison message and returns where it landed.
async fn publish_poison(
    p: &FutureProducer,
    topic: &str,
    value: &[u8],
    key: Option<&[u8]>,
) -> (i32, i64) {
    loop {
        let mut rec: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(topic).payload(value);
        if let Some(k) = key {
            rec = rec.key(k);
        }
        match p.send(rec, Duration::from_secs(10)).await {
            Ok(d) => return (d.partition, d.offset),
            Err((e, _)) => {
                eprintln!("publish failed ({e}); retrying");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
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
    let db = pg(&s.pg_url).await;
    let t = cdc_topics(s, &db, "crash", 3).await;
    let run = t.run.clone();
    let base: i64 = 1;

    install_status_audit(&db, &t.table).await;
    let cases = stripe_cases(s, &run, base).await;
    let stripe_rows: Vec<Row> = cases.iter().map(|c| c.row.clone()).collect();
    let stream = generate(&mut rng, &run, base + 1000, payments, &stripe_rows);
    let poison_count = stream
        .iter()
        .filter(|m| matches!(m, Change::Poison(..)))
        .count();
    eprintln!(
        "workload: {} changes ({} poison), {} payments with Stripe intents",
        stream.len(),
        poison_count,
        cases.len()
    );

    // The payment service's statements, paced over most of the kill phase (a kill and rejoin
    // take about 6 s); Debezium carries each to the topic. The updater's writes come back the
    // same way, so nothing here plays Debezium.
    let per_msg = Duration::from_secs_f64(kills as f64 * 5.0 / stream.len() as f64);
    let main_sent = Arc::new(AtomicUsize::new(0));
    let total = stream.len();
    let main = {
        let (sent, pg_url, t2, brokers) = (
            main_sent.clone(),
            s.pg_url.clone(),
            t.clone(),
            s.brokers.clone(),
        );
        tokio::spawn(async move {
            let db = pg(&pg_url).await;
            let p = producer(&brokers);
            let mut poison_at = BTreeSet::new();
            let started = Instant::now();
            for (i, m) in stream.iter().enumerate() {
                match m {
                    Change::Insert(r) => cdc_insert(&db, &t2, r).await,
                    Change::Update(r) => cdc_update(&db, &t2, r).await,
                    Change::Delete(id) => cdc_delete(&db, &t2, *id).await,
                    Change::Poison(v, k) => {
                        poison_at.insert(publish_poison(&p, &t2.cdc, v, k.as_deref()).await);
                    }
                }
                sent.store(i + 1, Ordering::SeqCst);
                let due = started + per_msg * (i as u32 + 1);
                tokio::time::sleep_until(due.into()).await;
            }
            poison_at
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
    let up_args = table_updater_args(s, &t, &["--batch-size", "5"]);
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
        "{kills} kills of paystream run ({early} during start-up, {late} while consuming), {updater_kills} of the updater; {} of {total} changes made so far",
        main_sent.load(Ordering::SeqCst),
    );

    // The last run drains everything.
    let mut daemon = spawn(&args, &logs.join("run-final.log"));
    let poison_at = main.await.unwrap();
    let resolvable: BTreeSet<i64> = cases
        .iter()
        .filter(|c| c.expect != "pending")
        .map(|c| c.row.id)
        .collect();
    let ids: Vec<i64> = resolvable.iter().copied().collect();
    wait_for("every Stripe-resolved payment written", 180, || async {
        rows_not_pending(&db, &t, &ids).await == ids.len() as i64
    })
    .await;
    // The model is the table itself: what is still pending there is what state must hold,
    // once paystream has read everything Debezium wrote (the updater's writes included).
    let expected: BTreeSet<String> = db
        .query(
            &format!("SELECT id::text FROM {} WHERE status = 'pending'", t.table),
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    wait_for(
        "the daemon holding what the table holds pending",
        180,
        || async {
            let Some((200, body)) = http_get(port, "/state/stats") else {
                return false;
            };
            let st: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
            st["pending"] == expected.len() && st["awaiting_cdc"] == 0
        },
    )
    .await;
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

    // 1. State holds exactly the rows the table holds pending, and its offsets cover the topic.
    let store = paystream::state::Store::open(data.path()).unwrap();
    let entries = store.entries().unwrap();
    let held: BTreeSet<String> = entries.iter().map(|e| e.id.clone()).collect();
    let missing: Vec<_> = expected.difference(&held).collect();
    let extra: Vec<_> = held.difference(&expected).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "state differs from the table: lost {missing:?}, extra {extra:?} (seed {seed})"
    );
    let stored: BTreeMap<i32, i64> = store
        .positions()
        .unwrap()
        .into_iter()
        .filter_map(|(at, o)| Some((at.kafka_partition_of(&t.cdc)?, o)))
        .collect();
    let hw: BTreeMap<i32, i64> = high_watermarks(&s.brokers, &t.cdc).into_iter().collect();
    assert_eq!(stored, hw, "stored offsets are the end of every partition");

    // 2. Postgres: Stripe's answer, written once, forward only.
    let ids: Vec<i64> = cases.iter().map(|c| c.row.id).collect();
    let audit = db
        .query(
            &format!(
                "SELECT id, old_status, new_status FROM {} WHERE id = ANY($1) ORDER BY id, at",
                audit_table(&t.table)
            ),
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
        let now = read_payment(&db, &t.table, c.row.id).await;
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
        "after {kills} kills: {high} messages, {} pending in state (= the table's), {} resolved once in Postgres, {} status events ({} payments), {} dead letters for {} poison messages",
        held.len(),
        resolvable.len(),
        status_events.len(),
        event_ids.len(),
        dead.len(),
        poison_at.len()
    );
}
