//! The pipeline end to end on real servers: rows inserted in Postgres → real Debezium (the
//! suite's connector on the dev Connect worker: `common::cdc`) → `paystream run` (sled state,
//! Stripe polls against the emulator) → status events → `paystream updater` → the row →
//! Debezium carries that write back → removed from state.
//! Includes a `kill -9` of the daemon in the middle of the flow and a restart, and a declined
//! payment that the customer then retries on the same intent and pays.

mod common;

use std::collections::{BTreeMap, HashMap};

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pending_payments_resolve_through_stripe_and_reach_postgres() {
    let s = stack();
    let db = pg(&s.pg_url).await;
    let t = cdc_topics(s, &db, "it", 2).await;
    let run = t.run.clone();

    // Stripe: one of each outcome.
    let (pi_ok, st) = intent_with_card(&s.stripe, "4999", "4242424242424242");
    assert_eq!(st, "succeeded");
    let (pi_declined, st) = intent_with_card(&s.stripe, "1500", "4000000000000341");
    assert_eq!(st, "requires_payment_method");
    let (pi_3ds, st) = intent_with_card(&s.stripe, "2500", "4000002760003184");
    assert_eq!(st, "requires_action");
    let pi_canceled = intent_canceled(&s.stripe, "900");

    // Postgres: the payment service's rows, all pending; Debezium streams their creates.
    install_status_audit(&db, &t.table).await;
    let ok = insert_payment(&db, &t.table, &format!("{run}-ok"), "49.99", Some(&pi_ok)).await;
    let declined = insert_payment(
        &db,
        &t.table,
        &format!("{run}-declined"),
        "15.00",
        Some(&pi_declined),
    )
    .await;
    let three_ds =
        insert_payment(&db, &t.table, &format!("{run}-3ds"), "25.00", Some(&pi_3ds)).await;
    let canceled = insert_payment(
        &db,
        &t.table,
        &format!("{run}-canceled"),
        "1234567.89",
        Some(&pi_canceled),
    )
    .await;
    let rows = [&ok, &declined, &three_ds, &canceled];

    let data = tempfile::tempdir().unwrap();
    let logs = tempfile::tempdir().unwrap();
    let metrics_port = free_port();
    let args = run_args(
        s,
        &t,
        data.path(),
        metrics_port,
        &["--retry-backoff", "500ms"],
    );
    let start_daemon = |log: &str| spawn(&args, &logs.path().join(log));
    let mut daemon = start_daemon("run-1.log");
    let _updater = spawn(
        &table_updater_args(s, &t, &[]),
        &logs.path().join("updater.log"),
    );

    // And one poison message among Debezium's (what Debezium never writes, so by hand).
    let p = producer(&s.brokers);
    publish(&p, &t.cdc, Some(b"{\"id\":0}"), Some(b"{this is not json")).await;

    // In the middle of the flow: as soon as the first payment resolved, kill -9 and restart.
    wait_for("a first status written to Postgres", 90, || async {
        db.query_one(
            &format!(
                "SELECT count(*) FROM {} WHERE id = ANY($1)",
                audit_table(&t.table)
            ),
            &[&rows.iter().map(|r| r.id).collect::<Vec<_>>()],
        )
        .await
        .unwrap()
        .get::<_, i64>(0)
            > 0
    })
    .await;
    daemon.kill9();
    let mut daemon = start_daemon("run-2.log");

    wait_for("two final statuses in Postgres", 90, || async {
        let mut n = 0;
        for r in [&ok, &canceled] {
            n += usize::from(read_payment(&db, &t.table, r.id).await.status != "pending");
        }
        n == 2
    })
    .await;
    // A decline is an attempt, not the end: seen by the restarted daemon, counted, and the
    // payment stays pending.
    wait_for("the decline seen since the restart", 30, || async {
        metric(
            metrics_port,
            "paystream_polls_total",
            &["outcome=\"declined\""],
        ) >= 1.0
    })
    .await;
    // (paystream_declines_total counts each attempt once across restarts: the first run may
    // have recorded this one already, so the restarted process need not count it.)
    assert_eq!(
        read_payment(&db, &t.table, declined.id).await.status,
        "pending"
    );
    // The customer retries on the same intent with another card, and pays.
    assert_eq!(
        retry_intent(&s.stripe, &pi_declined, "4242424242424242"),
        "succeeded"
    );
    wait_for("the retried payment succeeded in Postgres", 60, || async {
        read_payment(&db, &t.table, declined.id).await.status != "pending"
    })
    .await;
    assert_eq!(read_payment(&db, &t.table, ok.id).await.status, "succeeded");
    assert_eq!(
        read_payment(&db, &t.table, declined.id).await.status,
        "succeeded"
    );
    assert_eq!(
        read_payment(&db, &t.table, canceled.id).await.status,
        "failed"
    );

    // Debezium carries the updater's writes back; the restarted daemon drops the three once it
    // has read those updates.
    wait_for("the three CDC updates applied", 90, || async {
        metric(
            metrics_port,
            "paystream_cdc_events_total",
            &["op=\"u\"", "outcome=\"removed\""],
        ) >= 3.0
    })
    .await;
    // And the 3DS payment has been polled again since the restart, twice (its first poll in
    // the killed run may not have reached a checkpoint; polls start once a partition is
    // assigned, so the restarted run may not have polled it twice by the time the updates
    // are applied).
    wait_for(
        "the 3DS payment polled twice since the restart",
        30,
        || async { metric(metrics_port, "paystream_polls_total", &["still_pending"]) >= 2.0 },
    )
    .await;
    assert!(daemon.term().success(), "clean exit on SIGTERM");
    assert_eq!(
        read_payment(&db, &t.table, three_ds.id).await.status,
        "pending",
        "requires_action never resolves"
    );

    // State: only the 3DS payment is left, still polled, never emitted.
    let store = paystream::state::Store::open(data.path()).unwrap();
    let left = store.entries().unwrap();
    assert_eq!(
        left.iter().map(|e| e.id.clone()).collect::<Vec<_>>(),
        vec![three_ds.id.to_string()],
        "{left:#?}"
    );
    let e = &left[0];
    assert!(e.emitted.is_none());
    assert!(e.polls >= 2, "the 3DS payment is polled again: {e:?}");
    // 25.00 as Debezium carries an unconstrained NUMERIC: VariableScaleDecimal drops trailing
    // zeros when streaming (tests/golden/real), the value is the row's.
    assert_eq!(e.amount, "25");
    let last = e.history.last().expect("poll history");
    assert_eq!(
        (last.outcome.as_str(), last.stripe_status.as_deref()),
        ("still_pending", Some("requires_action"))
    );
    let offsets: i64 = store
        .positions()
        .unwrap()
        .iter()
        .filter(|(at, _)| at.kafka_partition_of(&t.cdc).is_some())
        .map(|(_, o)| *o)
        .sum();
    assert_eq!(
        offsets, 8,
        "all 8 CDC messages (Debezium's 4 creates and 3 updates, the poison one) durable in offsets"
    );

    // Each resolved row changed exactly once, pending → final: nothing written twice or backwards.
    let audit = db
        .query(
            &format!(
                "SELECT id, old_status, new_status FROM {} WHERE id = ANY($1) ORDER BY id",
                audit_table(&t.table)
            ),
            &[&rows.iter().map(|r| r.id).collect::<Vec<_>>()],
        )
        .await
        .unwrap();
    let changes: Vec<(i64, String, String)> = audit
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    assert_eq!(
        changes,
        vec![
            (ok.id, "pending".into(), "succeeded".into()),
            (declined.id, "pending".into(), "succeeded".into()),
            (canceled.id, "pending".into(), "failed".into())
        ]
    );

    // Status events: right status and reason; any replay after the kill carries the same event_id.
    let mut by_payment: BTreeMap<String, Vec<serde_json::Value>> = BTreeMap::new();
    for (key, value, _) in read_all(&s.brokers, &t.status) {
        let ev: serde_json::Value = serde_json::from_slice(&value.unwrap()).unwrap();
        assert_eq!(
            String::from_utf8(key.unwrap()).unwrap(),
            ev["payment_id"].as_str().unwrap()
        );
        by_payment
            .entry(ev["payment_id"].as_str().unwrap().to_string())
            .or_default()
            .push(ev);
    }
    let expect: HashMap<String, (&str, Option<&str>)> = HashMap::from([
        (ok.id.to_string(), ("succeeded", None)),
        (declined.id.to_string(), ("succeeded", None)),
        (canceled.id.to_string(), ("failed", Some("canceled"))),
    ]);
    assert_eq!(by_payment.len(), 3, "{by_payment:#?}");
    for (id, evs) in &by_payment {
        let (st, reason) = expect[id];
        for ev in evs {
            assert_eq!(ev["status"], st);
            assert_eq!(ev["reason"].as_str(), reason);
            assert_eq!(ev["event_id"], evs[0]["event_id"]);
            assert_eq!(ev["producer"], "paystream");
            assert_eq!(ev["currency"], "usd");
        }
    }
    // What Stripe said travels with the event: the amount received (minor units) matches the
    // row, and the retried payment carries the decline it went through.
    let ev = |r: &Row| by_payment[&r.id.to_string()][0].clone();
    assert_eq!(ev(&ok)["amount_received"], 4999);
    assert_eq!(ev(&ok)["decline_count"], 0);
    assert_eq!(ev(&declined)["amount_received"], 1500);
    assert_eq!(
        ev(&declined)["stripe_payment_intent_id"],
        pi_declined.as_str()
    );
    assert!(
        ev(&declined)["decline_count"].as_u64() >= Some(1),
        "{:?}",
        ev(&declined)
    );

    // The poison message went to the DLQ with its reason and position.
    let dead = read_all(&s.brokers, &t.dlq);
    assert_eq!(dead.len(), 1);
    let headers: HashMap<_, _> = dead[0].2.iter().cloned().collect();
    assert_eq!(headers["paystream.reason"], "invalid_json");
    assert_eq!(headers["paystream.source.topic"], t.cdc);
    assert_eq!(dead[0].1.as_deref(), Some(&b"{this is not json"[..]));
}
