//! The broker stops under load for `PAYSTREAM_OUTAGE_SECS` (40 here: longer than the
//! producer's 30 s message timeout, so status sends time out inside the outage; `scripts/
//! crash-test --long` uses 60) and comes back. The rows go through real Debezium, whose Connect
//! worker loses the broker too. `paystream run` and the updater must reconnect by themselves,
//! say so in their logs and metrics, report not-ready while it lasts, and lose nothing: every
//! payment inserted before and after the outage ends up in state, every Stripe answer (some
//! arrive while the broker is down, so their status events wait) reaches Postgres exactly once,
//! and Debezium's carrying those writes back removes exactly those twelve.
//!
//! This binary stops the shared dev broker, so it holds one test only (test binaries run one
//! after another; tests inside one binary run in parallel).

mod common;

use std::collections::BTreeSet;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

fn script(name: &str) {
    let st = Command::new(root().join("scripts").join(name))
        .status()
        .unwrap();
    assert!(st.success(), "scripts/{name}");
}

fn ready(port: u16) -> Option<(u16, String)> {
    http_get(port, "/readyz")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn broker_outage_under_load_loses_nothing() {
    let outage = Duration::from_secs(knob("PAYSTREAM_OUTAGE_SECS", 40));
    let s = stack();
    let db = pg(&s.pg_url).await;
    let t = cdc_topics(s, &db, "kout", 2).await;
    let logs = log_dir(&t.run);
    eprintln!("broker outage of {outage:?}; logs: {}", logs.display());
    let base: i64 =
        t.run.trim_start_matches("kout").parse::<i64>().unwrap() % 1_000_000 * 1_000_000;

    // Twelve payments Stripe will answer, eight succeeded and four canceled; 600 more that it
    // never will (load: polled, never resolved).
    install_status_audit(&db, &t.table).await;
    let mut stripe_rows = Vec::new();
    for i in 0..12 {
        let pi = if i < 8 {
            intent_with_card(&s.stripe, &(300 + i).to_string(), "4242424242424242").0
        } else {
            intent_canceled(&s.stripe, &(300 + i).to_string())
        };
        let r = Row {
            id: base + i,
            idempotency_key: format!("{}-{i}", t.run),
            amount: format!("3.{:02}", i),
            currency: "usd".into(),
            status: "pending".into(),
            intent: Some(pi),
        };
        stripe_rows.push(r);
    }
    let load: Vec<Row> = (0..600)
        .map(|i| Row {
            id: base + 1000 + i,
            idempotency_key: format!("{}-load-{i}", t.run),
            amount: format!("{i}.50"),
            currency: "usd".into(),
            status: "pending".into(),
            intent: Some(format!("pi_unknown_{}_{i}", t.run)),
        })
        .collect();

    let data = tempfile::tempdir().unwrap();
    let port = free_port();
    let up_port = free_port();
    let args = run_args(
        s,
        &t,
        data.path(),
        port,
        &["--poll-interval", "2s", "--retry-backoff", "500ms"],
    );
    let mut daemon = spawn(&args, &logs.join("run.log"));
    let mut up_args = table_updater_args(s, &t, &[]);
    let j = up_args.iter().position(|a| a == "--metrics-addr").unwrap();
    up_args[j + 1] = format!("127.0.0.1:{up_port}");
    let mut updater = spawn(&up_args, &logs.join("updater.log"));
    wait_for("both ready", 60, || async {
        ready(port).map(|r| r.0) == Some(200) && ready(up_port).map(|r| r.0) == Some(200)
    })
    .await;

    // Before: half the load, then half the Stripe payments just before the broker stops, so
    // their first polls (2 s later) and status events fall inside the outage.
    let mut published = BTreeSet::new();
    for r in load[..300].iter().chain(&stripe_rows[..6]) {
        cdc_insert(&db, &t, r).await;
        published.insert(r.id.to_string());
    }
    let consumed = published.len() as f64;
    wait_for("the first half consumed", 30, || async {
        metric(port, "paystream_cdc_events_total", &[]) >= consumed
    })
    .await;

    // The outage.
    script("kafka-down");
    let started = Instant::now();
    let (mut run_not_ready, mut updater_not_ready) = (None, None);
    while started.elapsed() < outage {
        if run_not_ready.is_none() {
            if let Some((503, body)) = ready(port) {
                run_not_ready = Some((started.elapsed(), body));
            }
        }
        if updater_not_ready.is_none() {
            if let Some((503, body)) = ready(up_port) {
                updater_not_ready = Some((started.elapsed(), body));
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (run_after, run_why) = run_not_ready.expect("the daemon never reported not ready");
    let (up_after, up_why) = updater_not_ready.expect("the updater never reported not ready");
    assert!(run_why.contains("Kafka"), "{run_why}");
    assert!(up_why.contains("Kafka"), "{up_why}");
    // Still not ready at the end of the outage, and the outage counted.
    assert_eq!(ready(port).map(|r| r.0), Some(503));
    assert_eq!(ready(up_port).map(|r| r.0), Some(503));
    assert!(metric(port, "paystream_kafka_outages_total", &[]) >= 1.0);
    assert!(metric(up_port, "paystream_kafka_outages_total", &[]) >= 1.0);
    assert_eq!(metric(port, "paystream_kafka_brokers_up", &[]), 0.0);
    script("kafka-up");
    let down_for = started.elapsed();

    // After: both come back by themselves.
    let back = Instant::now();
    wait_for("both ready again", 120, || async {
        ready(port).map(|r| r.0) == Some(200) && ready(up_port).map(|r| r.0) == Some(200)
    })
    .await;
    let recovered_in = back.elapsed();
    for r in stripe_rows[6..].iter().chain(&load[300..]) {
        cdc_insert(&db, &t, r).await;
        published.insert(r.id.to_string());
    }

    // Every Stripe answer in Postgres, once, forward only.
    let ids: Vec<i64> = stripe_rows.iter().map(|r| r.id).collect();
    // Connect recovers from the outage on its own schedule (its group rebalances first), so
    // the second half may reach the topic a while after the broker is back.
    wait_for("all twelve answers in Postgres", 240, || async {
        rows_not_pending(&db, &t, &ids).await == 12
    })
    .await;
    // Debezium carries the twelve writes back: paystream then holds exactly the load.
    let load_ids: BTreeSet<String> = load.iter().map(|r| r.id.to_string()).collect();
    wait_for("the twelve removed by their CDC updates", 120, || async {
        metric(port, "paystream_pending_payments", &[]) == load_ids.len() as f64
            && metric(port, "paystream_awaiting_confirmation_payments", &[]) == 0.0
    })
    .await;
    let high: i64 = high_watermarks(&s.brokers, &t.cdc)
        .iter()
        .map(|(_, h)| h)
        .sum();
    wait_for(
        "the daemon's stored offsets at the end of the topic",
        60,
        || async { metric(port, "paystream_stored_offset", &[]) as i64 == high },
    )
    .await;
    assert!(daemon.term().success());
    assert!(updater.term().success());
    assert_no_panic(&logs);

    for (i, r) in stripe_rows.iter().enumerate() {
        let want = if i < 8 { "succeeded" } else { "failed" };
        assert_eq!(
            read_payment(&db, &t.table, r.id).await.status,
            want,
            "payment {}",
            r.id
        );
    }
    let changes: i64 = count(
        &db,
        &format!(
            "SELECT count(*) FROM {} WHERE id = ANY($1) AND old_status = 'pending'",
            audit_table(&t.table)
        ),
        &[&ids],
    )
    .await;
    let all: i64 = count(
        &db,
        &format!(
            "SELECT count(*) FROM {} WHERE id = ANY($1)",
            audit_table(&t.table)
        ),
        &[&ids],
    )
    .await;
    assert_eq!(
        (changes, all),
        (12, 12),
        "one pending → final change per payment"
    );

    // State: every inserted payment but the twelve Stripe answered is still there, none of them
    // emitted; status events went out for exactly the twelve.
    let store = paystream::state::Store::open(data.path()).unwrap();
    let entries = store.entries().unwrap();
    let held: BTreeSet<String> = entries.iter().map(|e| e.id.clone()).collect();
    assert_eq!(held, load_ids, "nothing lost across the outage");
    assert!(published.is_superset(&held));
    assert!(entries.iter().all(|e| e.emitted.is_none()));
    let emitted: BTreeSet<i64> = read_all(&s.brokers, &t.status)
        .iter()
        .map(|(k, _, _)| {
            String::from_utf8_lossy(k.as_deref().unwrap())
                .parse()
                .unwrap()
        })
        .collect();
    assert_eq!(emitted, ids.iter().copied().collect());

    let run_log = std::fs::read_to_string(logs.join("run.log")).unwrap();
    let up_log = std::fs::read_to_string(logs.join("updater.log")).unwrap();
    for (who, log) in [("run", &run_log), ("updater", &up_log)] {
        assert!(log.contains("kafka outage"), "{who} logged the outage");
        assert!(
            log.contains("kafka reachable again"),
            "{who} logged the recovery"
        );
    }
    eprintln!(
        "broker down for {down_for:?}: run not ready after {run_after:?}, updater after {up_after:?}; both ready again {recovered_in:?} after the restart; {} payments in state, 12 answers written once; {} status sends failed during the outage and were retried",
        held.len(),
        run_log.matches("status event not produced").count()
    );
}
