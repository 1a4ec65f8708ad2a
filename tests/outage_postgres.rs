//! The Postgres master stops for `PAYSTREAM_OUTAGE_SECS` (30 here) while status events keep
//! arriving. The updater must hold its offsets (no commit past what Postgres has), report not
//! ready, retry with backoff, and apply every update once Postgres is back: nothing skipped,
//! each row changed once.
//!
//! This binary stops the shared dev Postgres, so it holds one test only.

mod common;

use std::time::{Duration, Instant};

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_outage_holds_offsets_and_applies_everything_after() {
    let outage = Duration::from_secs(knob("PAYSTREAM_OUTAGE_SECS", 30));
    let s = stack();
    let run = unique("pgout");
    let topic = format!("{run}-status");
    let group = format!("{run}-updater");
    create_topics(&s.brokers, &[(&topic, 1)]).await;
    let logs = log_dir(&run);
    eprintln!("postgres outage of {outage:?}; logs: {}", logs.display());

    let db = pg(&s.pg_url).await;
    install_status_audit(&db, "payments").await;
    let base: i64 =
        run.trim_start_matches("pgout").parse::<i64>().unwrap() % 1_000_000 * 1_000_000 + 700_000;
    let n = 300i64;
    insert_pending_rows(&db, base, n, "pgout").await;
    drop(db);

    let port = free_port();
    let mut args = updater_args(s, &topic, &group, &["--batch-size", "20"]);
    let j = args.iter().position(|a| a == "--metrics-addr").unwrap();
    args[j + 1] = format!("127.0.0.1:{port}");
    let mut updater = spawn(&args, &logs.join("updater.log"));
    wait_for("the updater ready", 60, || async {
        http_get(port, "/readyz").map(|r| r.0) == Some(200)
    })
    .await;

    let p = producer(&s.brokers);
    for id in base..base + 100 {
        publish(
            &p,
            &topic,
            Some(id.to_string().as_bytes()),
            Some(&status_event(id, "succeeded")),
        )
        .await;
    }
    wait_committed(
        s,
        &group,
        &topic,
        1,
        100,
        "the first 100 applied and committed",
        60,
    )
    .await;

    script("pg-down");
    let started = Instant::now();
    for id in base + 100..base + n {
        publish(
            &p,
            &topic,
            Some(id.to_string().as_bytes()),
            Some(&status_event(id, "succeeded")),
        )
        .await;
    }
    let mut not_ready = None;
    let mut max_committed = 0;
    while started.elapsed() < outage {
        if not_ready.is_none() {
            if let Some((503, body)) = http_get(port, "/readyz") {
                not_ready = Some((started.elapsed(), body));
            }
        }
        let (b, g, t) = (s.brokers.clone(), group.clone(), topic.clone());
        let c = tokio::task::spawn_blocking(move || committed(&b, &g, &t, 1))
            .await
            .unwrap();
        max_committed = max_committed.max(c);
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let errors = metric(port, "paystream_updater_postgres_errors_total", &[]);
    script("pg-up");
    let down_for = started.elapsed();
    let (after, why) = not_ready.expect("the updater never reported not ready");
    assert!(why.contains("postgres"), "{why}");
    assert_eq!(
        max_committed, 100,
        "offsets held while Postgres was down (none past what it had)"
    );
    assert!(errors >= 2.0, "retries counted ({errors})");

    let back = Instant::now();
    wait_committed(
        s,
        &group,
        &topic,
        1,
        n,
        "everything applied and committed after recovery",
        120,
    )
    .await;
    let caught_up = back.elapsed();
    assert!(updater.term().success());
    assert_no_panic(&logs);

    let db = pg(&s.pg_url).await;
    let rows: i64 = count(
        &db,
        "SELECT count(*) FROM payments WHERE id BETWEEN $1 AND $2 AND status = 'succeeded'",
        &[&base, &(base + n - 1)],
    )
    .await;
    assert_eq!(rows, n, "every update applied");
    let changes: i64 = count(
        &db,
        "SELECT count(*) FROM payments_changes WHERE id BETWEEN $1 AND $2",
        &[&base, &(base + n - 1)],
    )
    .await;
    assert_eq!(changes, n, "each row changed once");
    let log = std::fs::read_to_string(logs.join("updater.log")).unwrap();
    assert!(log.contains("batch not applied; retrying") || log.contains("postgres unavailable"));
    eprintln!(
        "postgres down for {down_for:?}: not ready after {after:?}, offsets held at 100 of {n}, {errors} errors counted; all {n} applied {caught_up:?} after it came back"
    );
}
