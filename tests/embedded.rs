//! Embedded mode (`--source postgres --sink postgres`) on the real Postgres and the Stripe
//! emulator, with no broker: the initial snapshot, streamed inserts, updates and deletes,
//! write-back through the forward-only UPDATE and the change flowing back, `kill -9` at random
//! points, a dropped slot and a second instance on a busy slot, on tables with REPLICA
//! IDENTITY DEFAULT and FULL. Each test has its own table, slot and publication.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::embedded::*;
use common::*;
use rand::Rng;

async fn resolves_from_snapshot_and_stream(full: bool) {
    let t = env(if full { "embfull" } else { "embdef" }, full).await;
    let (s, db, n, dir, logs) = (t.s, &t.db, &t.n, &t.dir, &t.logs);

    // Before the start: the snapshot must find these.
    let (ok, st) = intent_with_card(&s.stripe, "4999", "4242424242424242");
    assert_eq!(st, "succeeded");
    let (declined, st) = intent_with_card(&s.stripe, "1250", "4000000000000341");
    assert_eq!(st, "requires_payment_method");
    let (three_ds, st) = intent_with_card(&s.stripe, "777", "4000002760003184");
    assert_eq!(st, "requires_action");
    // Stripe received 25.00 for a row that says 20.00: never written as succeeded.
    let (short, st) = intent_with_card(&s.stripe, "2500", "4242424242424242");
    assert_eq!(st, "succeeded");
    let a = insert(db, &n.table, "a", "49.99", Some(&ok)).await;
    let b = insert(db, &n.table, "b", "12.50", Some(&declined)).await;
    let c = insert(db, &n.table, "c", "7.77", Some(&three_ds)).await;
    let m = insert(db, &n.table, "m", "20.00", Some(&short)).await;
    let done = insert(db, &n.table, "done", "1.00", None).await;
    db.execute(
        &format!("UPDATE {} SET status = 'succeeded' WHERE id = $1", n.table),
        &[&done],
    )
    .await
    .unwrap();

    let port = free_port();
    let mut run = spawn(
        &embedded_args(s, n, dir.path(), port, &[]),
        &logs.join("run.log"),
    );
    wait_for(
        "snapshot payment resolved, the decline seen",
        60,
        || async {
            status(db, &n.table, a).await == "succeeded"
                && metric(port, "paystream_declines_total", &[]) >= 1.0
        },
    )
    .await;
    assert_eq!(metric(port, "paystream_snapshot_rows_total", &[]), 4.0);
    // A decline is not final: the customer retries on the same intent and pays.
    assert_eq!(status(db, &n.table, b).await, "pending");
    assert_eq!(
        retry_intent(&s.stripe, &declined, "4242424242424242"),
        "succeeded"
    );
    wait_for("the retried payment resolved", 60, || async {
        status(db, &n.table, b).await == "succeeded"
    })
    .await;
    // The amount mismatch was flagged, not written.
    wait_for("the amount mismatch flagged", 30, || async {
        metric(
            port,
            "paystream_mismatches_total",
            &["kind=\"amount_mismatch\""],
        ) >= 1.0
    })
    .await;
    assert_eq!(status(db, &n.table, m).await, "pending");
    let (code, body) = http_get(port, &format!("/state/get?q={m}")).unwrap();
    assert_eq!(code, 200, "{body}");
    let shown: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(shown[0]["flag"]["kind"], "amount_mismatch", "{shown}");
    let detail = shown[0]["flag"]["detail"].as_str().unwrap();
    assert!(
        detail.contains("2500") && detail.contains("20.00"),
        "{detail}"
    );

    // After the start: streamed inserts, an update that is not a status change, a delete.
    let (ok2, _) = intent_with_card(&s.stripe, "123456789", "4242424242424242");
    let e = insert(db, &n.table, "e", "1234567.89", Some(&ok2)).await;
    let f = insert(db, &n.table, "f", "3.00", None).await;
    db.execute(
        &format!("UPDATE {} SET amount = 8.88 WHERE id = $1", n.table),
        &[&c],
    )
    .await
    .unwrap();
    wait_for("the streamed payment resolved", 60, || async {
        status(db, &n.table, e).await == "succeeded"
    })
    .await;
    db.execute(&format!("DELETE FROM {} WHERE id = $1", n.table), &[&f])
        .await
        .unwrap();

    // State follows the table: the written-back statuses came back through replication and
    // removed those payments; the delete removed f; c is held with its new amount, m as it was.
    let want: BTreeMap<String, String> = [
        (c.to_string(), "8.88".to_string()),
        (m.to_string(), "20.00".to_string()),
    ]
    .into();
    wait_for("state to hold exactly the pending row", 30, || async {
        state_amounts(port).as_ref() == Some(&want)
    })
    .await;
    assert_eq!(db_pending(db, &n.table).await, want);
    assert_eq!(
        status(db, &n.table, c).await,
        "pending",
        "3DS stays pending"
    );
    assert_eq!(
        metric(
            port,
            "paystream_updater_rows_total",
            &["result=\"updated\""]
        ),
        3.0
    );
    assert_eq!(metric(port, "paystream_replication_connected", &[]), 1.0);
    let (code, _) = http_get(port, "/readyz").unwrap();
    assert_eq!(code, 200);

    // The slot holds no WAL back: with the table quiet and other tables writing, the
    // confirmed position passes what the server wrote after our last change.
    db.batch_execute(&format!(
        "CREATE TABLE {t}_other (x int); INSERT INTO {t}_other SELECT generate_series(1, 1000);",
        t = n.table
    ))
    .await
    .unwrap();
    let lsn = current_lsn(db).await;
    wait_confirmed(db, &n.slot, &lsn, 30).await;
    t.finish(&mut run).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn resolves_from_snapshot_and_stream_replica_identity_default() {
    resolves_from_snapshot_and_stream(false).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn resolves_from_snapshot_and_stream_replica_identity_full() {
    resolves_from_snapshot_and_stream(true).await;
}

/// SIGKILL at random instants (in the snapshot too) while a writer inserts, updates and deletes
/// rows: after a last start the pending set in state is exactly the table's, amounts exact,
/// and the slot retains no WAL once drained.
#[tokio::test(flavor = "multi_thread")]
async fn kill9_at_random_points_loses_nothing() {
    let t = env("embkill", false).await;
    let (s, db, n, dir, logs) = (t.s, &t.db, &t.n, &t.dir, &t.logs);
    // Rows without an intent stay pending (Stripe cannot find them); a long interval keeps
    // the emulator out of the way.
    let args = |port| embedded_args(s, n, dir.path(), port, &["--poll-interval", "10m"]);
    for i in 0..300 {
        insert(
            db,
            &n.table,
            &format!("pre-{i}"),
            &format!("{i}.{:02}", i % 100),
            None,
        )
        .await;
    }

    // The writer: what the payment API and other writers do, at random.
    let writer_url = s.pg_url.clone();
    let table = n.table.clone();
    let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
    let writer = tokio::spawn(async move {
        let db = pg(&writer_url).await;
        let mut i = 0u64;
        while !*stop_rx.borrow_and_update() {
            i += 1;
            let op = rand::thread_rng().gen_range(0..10);
            let sql = match op {
                0..=4 => format!("INSERT INTO {table} (idempotency_key, amount, currency) VALUES ('w-{i}', {}.{:02}, 'usd')", i % 1000, i % 100),
                5 | 6 => format!("UPDATE {table} SET amount = amount + 0.01 WHERE id = (SELECT id FROM {table} WHERE status = 'pending' ORDER BY random() LIMIT 1)"),
                7 => format!("UPDATE {table} SET status = 'succeeded' WHERE id = (SELECT id FROM {table} WHERE status = 'pending' ORDER BY random() LIMIT 1)"),
                8 => format!("DELETE FROM {table} WHERE id = (SELECT id FROM {table} ORDER BY random() LIMIT 1)"),
                // Several changes in one transaction.
                _ => format!("BEGIN; INSERT INTO {table} (idempotency_key, amount, currency) VALUES ('t-{i}', 5.55, 'usd'); UPDATE {table} SET amount = 6.66 WHERE idempotency_key = 't-{i}'; COMMIT"),
            };
            db.batch_execute(&sql).await.unwrap();
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        i
    });

    let kills = knob("PAYSTREAM_EMBEDDED_KILLS", 8);
    for k in 0..kills {
        let port = free_port();
        let mut p = spawn(&args(port), &logs.join("run.log"));
        // The first kill lands early, inside the initial snapshot or just after it.
        let ms = if k == 0 {
            rand::thread_rng().gen_range(10..300)
        } else {
            rand::thread_rng().gen_range(300..2500)
        };
        tokio::time::sleep(Duration::from_millis(ms)).await;
        p.kill9();
    }
    stop_tx.send(true).unwrap();
    let writes = writer.await.unwrap();

    let port = free_port();
    let mut p = spawn(&args(port), &logs.join("run.log"));
    let want = db_pending(db, &n.table).await;
    let mut last = None;
    wait_for("state to match the table after the kills", 60, || {
        last = state_amounts(port);
        let ok = last.as_ref() == Some(&want);
        async move { ok }
    })
    .await;
    let lsn = current_lsn(db).await;
    wait_confirmed(db, &n.slot, &lsn, 30).await;
    let log = std::fs::read_to_string(logs.join("run.log")).unwrap();
    eprintln!(
        "{kills} kills, {writes} writes; {} pending rows held exactly; {} starts took a snapshot, {} of them over a slot left by a snapshot that never became durable",
        want.len(),
        log.matches("initial snapshot loaded").count(),
        log.matches("dropping the replication slot").count(),
    );
    t.finish(&mut p).await;
}

/// An operator drops the slot: the next start refuses (state cannot know what it missed),
/// naming the slot and the recovery; `--resnapshot` rebuilds state from the table. A second
/// instance on a slot in use is refused at start.
#[tokio::test(flavor = "multi_thread")]
async fn a_dropped_slot_is_refused_then_rebuilt_with_resnapshot() {
    let t = env("embslot", false).await;
    let (s, db, n, dir, logs) = (t.s, &t.db, &t.n, &t.dir, &t.logs);
    let args = |port, extra: &[&str]| {
        let mut a = embedded_args(s, n, dir.path(), port, &["--poll-interval", "10m"]);
        a.extend(extra.iter().map(|x| x.to_string()));
        a
    };
    let a = insert(db, &n.table, "a", "10.00", None).await;
    // A slot as a first run leaves it when killed before its snapshot was durable: no
    // position in state, so nothing was acknowledged that state holds. It is replaced.
    db.execute(
        "SELECT pg_create_logical_replication_slot($1, 'pgoutput')",
        &[&n.slot],
    )
    .await
    .unwrap();
    let port = free_port();
    let mut run = spawn(&args(port, &[]), &logs.join("run.log"));
    wait_for("a in state", 30, || async {
        state_amounts(port).is_some_and(|m| m.contains_key(&a.to_string()))
    })
    .await;
    let log = std::fs::read_to_string(logs.join("run.log")).unwrap();
    assert!(log.contains("dropping the replication slot to take a new snapshot"));

    // A second daemon on the same slot (its own data dir) is refused.
    let other = tempfile::tempdir().unwrap();
    let mut second = embedded_args(s, n, other.path(), free_port(), &[]);
    second.push("--resnapshot".into());
    let (code, _, err) =
        output(std::process::Command::new(env!("CARGO_BIN_EXE_paystream")).args(&second));
    assert_ne!(code, 0);
    assert!(
        err.contains(&format!("replication slot \"{}\" is in use", n.slot)),
        "{err}"
    );

    assert!(run.term().success());
    db.execute("SELECT pg_drop_replication_slot($1)", &[&n.slot])
        .await
        .unwrap();
    // Meanwhile the table moves on: these changes are in no slot.
    let b = insert(db, &n.table, "b", "20.00", None).await;
    db.execute(&format!("DELETE FROM {} WHERE id = $1", n.table), &[&a])
        .await
        .unwrap();

    let (code, _, err) = output(
        std::process::Command::new(env!("CARGO_BIN_EXE_paystream")).args(args(free_port(), &[])),
    );
    assert_ne!(code, 0, "{err}");
    assert!(
        err.contains(&format!("replication slot \"{}\" does not exist", n.slot))
            && err.contains("--resnapshot"),
        "{err}"
    );

    let port = free_port();
    let mut run = spawn(&args(port, &["--resnapshot"]), &logs.join("run.log"));
    let want: BTreeMap<String, String> = [(b.to_string(), "20.00".to_string())].into();
    wait_for("state rebuilt from the table", 30, || async {
        state_amounts(port).as_ref() == Some(&want)
    })
    .await;
    let c = insert(db, &n.table, "c", "30.00", None).await;
    wait_for("streaming after the resnapshot", 30, || async {
        state_amounts(port).is_some_and(|m| m.contains_key(&c.to_string()))
    })
    .await;
    t.finish(&mut run).await;
}

/// A row paystream cannot read (a NULL status, on a table that allows one) goes to the dead
/// letters in the data dir with its reason and LSN; the daemon goes on with the next row.
#[tokio::test(flavor = "multi_thread")]
async fn an_unreadable_row_is_dead_lettered_and_the_stream_goes_on() {
    let t = env("embdlq", false).await;
    let (s, db, n, dir, logs) = (t.s, &t.db, &t.n, &t.dir, &t.logs);
    db.batch_execute(&format!(
        "ALTER TABLE {} ALTER status DROP NOT NULL",
        n.table
    ))
    .await
    .unwrap();
    let port = free_port();
    let mut run = spawn(
        &embedded_args(s, n, dir.path(), port, &["--poll-interval", "10m"]),
        &logs.join("run.log"),
    );
    wait_for("ready", 30, || async {
        http_get(port, "/readyz").map(|r| r.0) == Some(200)
    })
    .await;
    db.execute(
        &format!("INSERT INTO {} (idempotency_key, amount, currency, status) VALUES ('bad', 1.00, 'usd', NULL)", n.table),
        &[],
    )
    .await
    .unwrap();
    let good = insert(db, &n.table, "good", "2.00", None).await;
    let want: BTreeMap<String, String> = [(good.to_string(), "2.00".to_string())].into();
    wait_for("the next row tracked", 30, || async {
        state_amounts(port).as_ref() == Some(&want)
    })
    .await;
    let letters = std::fs::read_to_string(dir.path().join("dead-letters.jsonl")).unwrap();
    let lines: Vec<serde_json::Value> = letters
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 1, "{letters}");
    assert_eq!(lines[0]["reason"], "bad_value");
    assert_eq!(lines[0]["topic"], format!("postgres:{}", n.slot));
    assert!(
        lines[0]["offset"].as_i64().unwrap() > 0,
        "the LSN it came at"
    );
    assert!(
        lines[0]["error"].as_str().unwrap().contains("status"),
        "{letters}"
    );
    assert_eq!(
        metric(
            port,
            "paystream_dlq_messages_total",
            &["reason=\"bad_value\""]
        ),
        1.0
    );
    t.finish(&mut run).await;
}

/// Stripe never cancels an incomplete intent by itself. Without `--cancel-abandoned-after`
/// nothing is written however long a payment waits; with it and a read-only restricted key,
/// the cancel is refused, reported naming the permission, and nothing is written; with a key
/// that may write, the intents are canceled in Stripe (reason `abandoned`) and only then do
/// the payments resolve `failed` with that reason.
#[tokio::test(flavor = "multi_thread")]
async fn abandoned_payments_are_closed_only_when_asked_and_only_by_stripe() {
    let t = env("embaband", false).await;
    let (s, db, n, dir, logs) = (t.s, &t.db, &t.n, &t.dir, &t.logs);
    // The customer never chose a card, or never finished 3-D Secure.
    let no_card = stripe_post(
        &s.stripe,
        "/v1/payment_intents",
        &[("amount", "1000"), ("currency", "usd")],
    );
    assert_eq!(no_card["status"], "requires_payment_method");
    let no_card = no_card["id"].as_str().unwrap().to_string();
    let (three_ds, st) = intent_with_card(&s.stripe, "777", "4000002760003184");
    assert_eq!(st, "requires_action");
    let a = insert(db, &n.table, "a", "10.00", Some(&no_card)).await;
    let b = insert(db, &n.table, "b", "7.77", Some(&three_ds)).await;
    // Paid after the first run: the read-only key's run resolves it (reads are all it needs).
    let (paid, _) = intent(
        &s.stripe,
        &Intent {
            card: "4000002500003155",
            amount: "500",
            ..Intent::default()
        },
    );
    let c = insert(db, &n.table, "c", "5.00", Some(&paid)).await;
    let intent_of = |id: &str| stripe_get(&s.stripe, &format!("/v1/payment_intents/{id}"));

    // No closure asked for: polled, never written.
    let port = free_port();
    let mut run = spawn(
        &embedded_args(s, n, dir.path(), port, &[]),
        &logs.join("run.log"),
    );
    wait_for("both polled twice", 30, || async {
        metric(
            port,
            "paystream_polls_total",
            &["outcome=\"still_pending\""],
        ) >= 4.0
    })
    .await;
    assert!(run.term().success());
    assert_eq!(status(db, &n.table, a).await, "pending");
    let secret = intent_of(&paid)["client_secret"]
        .as_str()
        .unwrap()
        .to_string();
    stripe_post(
        &s.stripe,
        &format!("/v1/payment_intents/{paid}/_authenticate"),
        &[("client_secret", secret.as_str()), ("success", "true")],
    );
    assert_eq!(intent_of(&paid)["status"], "succeeded");

    // A read-only restricted key: the cancel is refused and reported; nothing written.
    let read_only = format!("rk_test_read_{}", n.slot);
    let port = free_port();
    let mut run = spawn(
        &embedded_args(
            s,
            n,
            dir.path(),
            port,
            &["--stripe-key", &read_only, "--cancel-abandoned-after", "1s"],
        ),
        &logs.join("run-read-only.log"),
    );
    wait_for("both cancels refused, the paid one written", 30, || async {
        metric(
            port,
            "paystream_abandoned_cancels_total",
            &["result=\"not_canceled\""],
        ) >= 2.0
            && status(db, &n.table, c).await == "succeeded"
    })
    .await;
    assert!(run.term().success());
    for id in [a, b] {
        assert_eq!(status(db, &n.table, id).await, "pending");
    }
    assert_eq!(intent_of(&no_card)["status"], "requires_payment_method");
    let log = std::fs::read_to_string(logs.join("run-read-only.log")).unwrap();
    assert!(
        log.contains("may not write PaymentIntents"),
        "the refusal names the permission"
    );

    // A key that may cancel: canceled in Stripe, then resolved from Stripe's answer.
    let port = free_port();
    let mut run = spawn(
        &embedded_args(s, n, dir.path(), port, &["--cancel-abandoned-after", "1s"]),
        &logs.join("run.log"),
    );
    wait_for("both abandoned payments failed", 30, || async {
        status(db, &n.table, a).await == "failed" && status(db, &n.table, b).await == "failed"
    })
    .await;
    for pi in [&no_card, &three_ds] {
        let now = intent_of(pi);
        assert_eq!(now["status"], "canceled");
        assert_eq!(now["cancellation_reason"], "abandoned");
    }
    assert_eq!(
        metric(
            port,
            "paystream_abandoned_cancels_total",
            &["result=\"canceled\""]
        ),
        2.0
    );
    t.finish(&mut run).await;
}
